"""Does the unlabelled pool help, and what does it cost? Semi-supervised variants (FixMatch with an EMA teacher,
pipeline/training/semi.py) against the same recipe on the labels alone, on digits and on photos.

    ./dev.sh python benchmarks/semi_supervised.py [--parts digits photos] [--folds 0 1 2 3 4] [--device auto]
        [--workspace DIR] [--pool N] [--full-epochs 300] [--full-input-size 16] [--set pseudo_threshold=0.9 ...]
        [--epochs-scale 1]
        [--photos ../shared/datasets/clothing-small] [--photo-recipes full probe] [--photo-size 64]
        [--photo-epochs 15] [--photo-seed 0 1 2] [--photo-input-size 64]

digits: the repository's params.yaml (mnist, 10 labelled per class, 5-fold CV, an external set of 2,000 images
split into a development part and a final test, and a pool of collect.unlabelled_limit images, or --pool N) is
collected and augmented, then every fold in --folds trains
- cnn: the compact CNN on the labels alone (params.yaml's variant),
- cnn_pool: the same with the unlabelled pool (params.yaml's variant, its bounded epochs),
- full: cnn_pool with --full-epochs epochs, at --full-input-size px, and the --set finetune overrides (e.g. `--set unlabelled_ratio=7`).
The issue's goal: a single fold model with accuracy >= 0.985 on the final test images. Each variant's line
says whether its fold models reach it (the lowest fold, and the mean over folds).

photos: a folder source built from clothing-small: per class, 10 labelled photos (a seeded draw) in train/<class>/,
the rest split (seeded, per class) into halves: unlabelled/ (the pool) and test/<class>/, which collect splits into
a development part and a final test (collect.dev_fraction 0.5). Collected with the photos preset, with
collect.folds = --folds (so they must be 0..k-1, k >= 2). Two recipes (--photo-recipes), each without and with
the pool, each with a table of its own:
- full: EfficientNet-Lite0 (packaged ImageNet weights) fully fine-tuned for --photo-epochs epochs (FixMatch with
  the pool), photos stored at --photo-size px, at --photo-input-size (default 64, the stored side, which a CPU
  affords; 0 is the model's own 224 px with the stored pictures upsampled, for a GPU: on a 2-core CPU a fold's
  pool variant then took minutes and 14-20 GB of memory);
- probe: the photos preset's `probe_lite2` (a linear probe on EfficientNet-Lite2's frozen features at its own
  260 px, photos stored at 256; with the pool, class-balanced self-training, pipeline/training/probe.py).

With several --photo-seed draws, each recipe's pool arm is also compared with its labels-only arm over all the
draws' development parts together (and their final tests, to report only).

Each part prints one table per recipe (columns explained above it) and the paired differences of each pool variant against
its labels-only reference: on cross-validation (the corrected resampled t over folds, Nadeau & Bengio) and on the
development part (a paired bootstrap over development images, or groups of near-duplicates, with the fold models
as repeats: the difference of the fold models' mean accuracy). Settings are compared on the development part;
the final-test columns only report. Then the wall time and the device.

Without --workspace everything happens in a temporary folder that is removed at the end. With it, collected data
and finished fold runs are kept (keyed by their params) and reused by a later run with the same settings, and a
killed fold run resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks` importable
from pipeline import presets  # noqa: E402
from pipeline.data.collected import DEV, TEST, Collected, load_collected  # noqa: E402
from pipeline.evaluation.statistics import Comparison, corrected_t_test, paired_bootstrap  # noqa: E402
from pipeline.runtime import paths  # noqa: E402
from pipeline.runtime.compute import pick_device  # noqa: E402
from pipeline.runtime.params import FinetuneParams, Params, Variant, parse_params  # noqa: E402
from pipeline.stages import augment, collect, finetune  # noqa: E402

from benchmarks import workspace  # noqa: E402

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "datasets" / "clothing-small"
GOAL = 0.985  # the goal: one fold model's accuracy on the final test images
ALPHA = 0.05
PHOTO_LABELLED = 10  # labelled photos per class
PROBE_STORED = 256  # the photos preset's `image_size: auto` on clothing-small (the photos' shorter side)
PHOTO_NAMES = {"full": "lite0", "probe": "probe"}  # a photo recipe -> its labels-only arm (the pool arm adds _pool)
LITE0_FULL = {"backbone": "efficientnet_lite0", "weights": "packaged", "strategy": "full", "augment": True,
              "synthetic": False}


@dataclass(frozen=True)
class Arm:
    """One variant as trained here: its own finetune params (the digits' `full` has overrides) and variant."""

    name: str
    finetune: FinetuneParams
    variant: Variant


@dataclass(frozen=True)
class Prepared:
    """A part's collected data and augmentation policy, and the folder its fold runs go to."""

    collected: Path
    policy: Path
    runs: Path


@dataclass(frozen=True)
class FoldRun:
    """What one fold model gave."""

    fold: int
    val_accuracy: float
    train_seconds: float  # the training loop's own time
    wall_seconds: float  # the whole finetune stage: loading, training, predicting every held-out image
    pool_images: int  # pool images the fold learnt from (0 for labels-only variants)
    test_probs: np.ndarray  # external images (development and final test) x classes, in Collected.external order
    test_index: np.ndarray  # their manifest indices


@dataclass(frozen=True)
class External:
    """The external images' targets and groups, and which belong to the development part and the final test."""

    index: np.ndarray  # manifest indices, in Collected.external order
    targets: np.ndarray
    groups: np.ndarray
    dev: np.ndarray  # bool mask
    test: np.ndarray  # bool mask
    val_train_ratio: float  # a fold's validation images over its training images (the corrected t's ratio)

    @classmethod
    def of(cls, data: Collected) -> External:
        rows = data.external
        training, validation = data.fold_split(data.folds[0])
        return cls(rows["index"].to_numpy(), rows.target.to_numpy(np.int64), rows.group.astype(str).to_numpy(), (rows.part == DEV).to_numpy(),
                   (rows.part == TEST).to_numpy(), len(validation) / len(training))


# ---- params ---------------------------------------------------------------------------------------------------------

def digest(*parts) -> str:
    """A short hash of params (dataclasses or plain values): the name of a folder that only these params fill."""
    plain = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:10]


def finetune_settings(settings: list[str]) -> list[str]:
    """`key=value` or `finetune.key=value` -> `finetune.key=value`."""
    return [s if s.startswith("finetune.") else f"finetune.{s}" for s in settings]


def digits_params(args) -> tuple[Params, list[Arm]]:
    """params.yaml with the benchmark's settings, and the three digit arms."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    settings = [f"finetune.device={args.device}"]
    if args.pool is not None:
        settings.append(f"collect.unlabelled_limit={args.pool}")
    for name in ("cnn", "cnn_pool"):
        epochs = max(1, round(raw["variants"][name]["epochs"] * args.epochs_scale))
        settings.append(f"variants.{name}.epochs={epochs}")
    params = parse_params(workspace.override(raw, settings))  # override changes raw in place: full starts from it
    full_raw = workspace.override(json.loads(json.dumps(raw)), finetune_settings(args.set))
    full_finetune = parse_params(full_raw).finetune  # validated like params.yaml: a bad key or value names itself
    arms = [Arm("cnn", params.finetune, params.variants["cnn"]),
            Arm("cnn_pool", params.finetune, params.variants["cnn_pool"]),
            Arm("full", full_finetune, dataclasses.replace(
                params.variants["cnn_pool"], epochs=args.full_epochs,
                input_size=params.variants["cnn_pool"].input_size if args.full_input_size is None
                else args.full_input_size))]
    return params, arms


def photo_params(args, folder: Path, recipe: str) -> tuple[Params, list[Arm]]:
    """params.yaml with the photos preset and the benchmark's settings, and the recipe's two arms: labels alone,
    and with the pool.
    - full: EfficientNet-Lite0 fully fine-tuned (FixMatch with the pool), at --photo-input-size from photos
      stored at --photo-size;
    - probe: the preset's `probe_lite2` (Lite2's frozen features at its own 260 px, photos stored at 256, a
      linear probe on 8 augmented views; class-balanced self-training with the pool)."""
    raw = presets.merged(yaml.safe_load((ROOT / "params.yaml").read_text()), "photos")
    size = args.photo_size if recipe == "full" else PROBE_STORED
    raw = workspace.override(raw, [f"collect.folder={folder}", f"collect.image_size={size}",
                                   f"collect.folds={json.dumps(args.folds)}", "collect.dev_fraction=0.5",
                                   f"finetune.device={args.device}"])
    base = ({**LITE0_FULL, "input_size": args.photo_input_size, "epochs": args.photo_epochs} if recipe == "full"
            else raw["variants"]["probe_lite2"])
    names = (PHOTO_NAMES[recipe], f"{PHOTO_NAMES[recipe]}_pool")
    for name, pool in zip(names, (False, True)):
        raw["variants"][name] = {**base, "unlabelled": pool}
    params = parse_params(raw)
    return params, [Arm(name, params.finetune, params.variants[name]) for name in names]


# ---- data ---------------------------------------------------------------------------------------------------------

def prepare(params: Params, root: Path) -> Prepared:
    """Collect and augment into `root` (reused when a kept workspace already holds them for these params)."""
    collected = root / f"collected-{digest(params.collect)}"
    if not (collected / paths.MANIFEST_FILE).is_file():
        start = time.perf_counter()
        collect.run(params.collect, collected, root / f"reports-{digest(params.collect)}")
        log.info("collected in %.0f s", time.perf_counter() - start)
    policy_dir = collected.with_name(f"augment-{digest(params.collect, params.augment)}")
    if not (policy_dir / paths.POLICY_FILE).is_file():
        augment.run(params.augment, collected, policy_dir)
    return Prepared(collected, policy_dir / paths.POLICY_FILE, root / "runs")


def build_photo_folder(source: Path, dest: Path, seed: int) -> Path:
    """train/<class>/ with PHOTO_LABELLED photos per class, and the rest halved per class into unlabelled/ and
    test/<class>/; seeded, so the same seed builds the same folder."""
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        files = np.array(sorted(p for p in folder.iterdir() if p.is_file()))
        order = rng.permutation(len(files))
        labelled, rest = order[:PHOTO_LABELLED], order[PHOTO_LABELLED:]
        half = len(rest) // 2
        for part, picked in ((f"train/{folder.name}", labelled), ("unlabelled", rest[:half]),
                             (f"test/{folder.name}", rest[half:])):
            (tmp / part).mkdir(parents=True, exist_ok=True)
            for file in files[np.sort(picked)]:
                name = file.name if part != "unlabelled" else f"{folder.name}-{file.name}"  # no clash once flat
                shutil.copyfile(file, tmp / part / name)
    tmp.rename(dest)
    return dest


# ---- training -------------------------------------------------------------------------------------------------------

def train_fold(prepared: Prepared, arm: Arm, fold: int) -> FoldRun:
    """Train one arm on one fold, or read back the run a kept workspace finished before."""
    key = digest(prepared.collected.name, prepared.policy.parent.name, arm.finetune, arm.variant)
    run_dir = prepared.runs / f"{arm.name}-{key}" / f"fold{fold}"
    done = run_dir / "result.json"
    if not done.is_file():
        outputs = finetune.FinetuneOutputs(run_dir / "out", run_dir / "live", run_dir / "checkpoints",
                                           prepared.runs / "features")  # frozen features, keyed by model and pixels
        inputs = finetune.FinetuneInputs(prepared.collected, prepared.policy, run_dir / "no-synthetic")
        start = time.perf_counter()
        meta = finetune.run(arm.finetune, arm.variant, fold, inputs, outputs)
        result = {"val_accuracy": meta["val_accuracy"], "train_seconds": meta["train_seconds"],
                  "wall_seconds": round(time.perf_counter() - start, 2), "pool_images": meta["train_unlabelled"]}
        done.write_text(json.dumps(result))
    result = json.loads(done.read_text())
    with np.load(run_dir / "out" / paths.PREDICTIONS_FILE) as predictions:
        probs, index = predictions["test_probs"], predictions["test_index"]
    log.info("%s fold %d: validation %.3f, %.0f s training, %d pool images", arm.name, fold,
             result["val_accuracy"], result["train_seconds"], result["pool_images"])
    return FoldRun(fold, result["val_accuracy"], result["train_seconds"], result["wall_seconds"],
                   result["pool_images"], probs, index)


def train_arms(prepared: Prepared, arms: list[Arm], folds: list[int]) -> dict[str, list[FoldRun]]:
    return {arm.name: [train_fold(prepared, arm, fold) for fold in folds] for arm in arms}


# ---- report ---------------------------------------------------------------------------------------------------------

def accuracies(runs: list[FoldRun], ext: External, mask: np.ndarray) -> np.ndarray:
    """Each fold model's accuracy on the external images in `mask`."""
    return np.array([(r.test_probs[mask].argmax(1) == ext.targets[mask]).mean() for r in runs])


def ensemble(runs: list[FoldRun], ext: External, mask: np.ndarray) -> float:
    """The fold models' mean probabilities' accuracy on the external images in `mask`."""
    probs = np.mean([r.test_probs[mask] for r in runs], axis=0)
    return float((probs.argmax(1) == ext.targets[mask]).mean())


def fold_probs(runs: list[FoldRun], mask: np.ndarray) -> np.ndarray:
    return np.stack([r.test_probs[mask] for r in runs])


def dev_difference(base: list[FoldRun], other: list[FoldRun], ext: External, resamples: int) -> Comparison:
    """Mean over folds of (other's fold model - base's fold model) accuracy on the development part, with a
    paired bootstrap over development images (groups of near-duplicates), the fold models as repeats."""
    return paired_bootstrap(ext.targets[ext.dev], fold_probs(base, ext.dev), fold_probs(other, ext.dev),
                            resamples=resamples, groups=ext.groups[ext.dev])


def spread(values: np.ndarray) -> str:
    return f"{values.mean():.3f} ({values.min():.3f}..{values.max():.3f})"


def interval(c: Comparison) -> str:
    if np.isnan(c.low):
        return f"{c.difference:+.3f} [n/a]"
    return f"{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}]"


def print_table(results: dict[str, list[FoldRun]], ext: External, reference: str, resamples: int) -> None:
    print(f"{'variant':<11} {'CV':>6} {'dev folds (min..max)':>22} {'dev ens':>7} {'test folds (min..max)':>22} "
          f"{'test ens':>8} {'pool':>5} {'train s':>8} {'wall s':>7}   {'dev vs ' + reference + ' [95%]':>24}")
    for name, runs in results.items():
        against = "" if name == reference else interval(dev_difference(results[reference], runs, ext, resamples))
        print(f"{name:<11} {np.mean([r.val_accuracy for r in runs]):>6.3f} {spread(accuracies(runs, ext, ext.dev)):>22} "
              f"{ensemble(runs, ext, ext.dev):>7.3f} {spread(accuracies(runs, ext, ext.test)):>22} "
              f"{ensemble(runs, ext, ext.test):>8.3f} {np.mean([r.pool_images for r in runs]):>5.0f} "
              f"{np.mean([r.train_seconds for r in runs]):>8.1f} {np.mean([r.wall_seconds for r in runs]):>7.1f}   "
              f"{against:>24}")


def print_columns(ext: External, folds: list[int], reference: str) -> None:
    print(f"{len(folds)} fold(s) {folds}; development part {ext.dev.sum()} images, final test {ext.test.sum()}. "
          "Settings are compared on the development part; the test columns only report.\n"
          "  CV: mean validation accuracy of the fold models\n"
          "  dev folds, test folds: the fold models' accuracy on the development part, on the final test: mean "
          "(lowest..highest fold)\n"
          "  dev ens, test ens: the fold ensemble's (mean probabilities) accuracy\n"
          "  pool: pool images a fold learnt from; train s, wall s: seconds per fold, training loop and whole stage\n"
          f"  dev vs {reference}: mean over folds of the fold models' accuracy difference on the development part, "
          "with a 95% paired bootstrap interval over development images (groups of near-duplicates; the fold "
          "models as repeats)")


def print_comparisons(results: dict[str, list[FoldRun]], ext: External, reference: str, resamples: int) -> None:
    """Each other variant minus the reference, on CV (corrected resampled t over folds) and on the development
    part (paired bootstrap), with p-values."""
    for name, runs in results.items():
        if name == reference:
            continue
        diffs = [r.val_accuracy - b.val_accuracy for r, b in zip(runs, results[reference])]
        cv, dev = corrected_t_test(diffs, ext.val_train_ratio), dev_difference(results[reference], runs, ext, resamples)
        for where, c, how in (("CV", cv, "corrected resampled t over folds"),
                              ("development", dev, "paired bootstrap over development images")):
            verdict = "n/a (one fold)" if np.isnan(c.p_value) else (
                "significant" if c.p_value < ALPHA else "not significant") + f" at {ALPHA}"
            print(f"{name} - {reference} on {where:<11}: {interval(c):>24}  p = {c.p_value:.3f}  {verdict} ({how})")


def print_goal(results: dict[str, list[FoldRun]], ext: External) -> None:
    print(f"The issue's goal: a single fold model >= {GOAL} on the final test images ({ext.test.sum()}).")
    for name, runs in results.items():
        test = accuracies(runs, ext, ext.test)
        print(f"  {name:<9} lowest fold {test.min():.3f} ({'reaches' if test.min() >= GOAL else 'misses'} it), "
              f"mean {test.mean():.3f} ({'reaches' if test.mean() >= GOAL else 'misses'} it), "
              f"{(test >= GOAL).sum()} of {len(test)} fold models reach it")


def report(title: str, results: dict[str, list[FoldRun]], prepared: Prepared, reference: str,
           resamples: int) -> External:
    ext = External.of(load_collected(prepared.collected))
    for name, runs in results.items():
        if any(not np.array_equal(r.test_index, ext.index) for r in runs):
            sys.exit(f"{name}: its predictions are not of the collected external images; delete {prepared.runs}")
    folds = [r.fold for r in results[reference]]
    print(f"\n## {title}")
    print_columns(ext, folds, reference)
    print_table(results, ext, reference, resamples)
    print_comparisons(results, ext, reference, resamples)
    return ext


# ---- parts ----------------------------------------------------------------------------------------------------------

def digits_part(args, work: Path) -> None:
    params, arms = digits_params(args)
    prepared = prepare(params, work / "digits")
    results = train_arms(prepared, arms, args.folds)
    ext = report(f"digits: mnist, {params.collect.images_per_class} labelled per class, pool of at most "
                 f"{params.collect.unlabelled_limit or 'every'} images; epochs " +
                 ", ".join(f"{a.name} {a.variant.epochs}" for a in arms), results, prepared, "cnn",
                 params.evaluate.bootstrap)
    print_goal(results, ext)


def photos_part(args, work: Path) -> None:
    if args.folds != list(range(len(args.folds))) or len(args.folds) < 2:
        sys.exit(f"photos: --folds become collect.folds, which must be 0..k-1 with k >= 2 (e.g. 0 1 2 3 4); "
                 f"got {args.folds}")
    for recipe in args.photo_recipes:
        draws = []
        for seed in args.photo_seed:
            folder = build_photo_folder(args.photos, work / "photos" / f"raw-seed{seed}", seed)
            params, arms = photo_params(args, folder, recipe)
            prepared = prepare(params, work / "photos")
            results = train_arms(prepared, arms, args.folds)
            how = (f"EfficientNet-Lite0 full fine-tuning, {args.photo_epochs} epochs, stored at {args.photo_size} "
                   f"px, input {args.photo_input_size or 'its own (224)'} px" if recipe == "full" else
                   f"the photos preset's probe_lite2 (Lite2 at 260 px, stored at {PROBE_STORED} px), self-training "
                   f"with the pool: {params.finetune.self_training_rounds} rounds, up to "
                   f"{params.finetune.self_training_share:g} of the pool")
            ext = report(f"photos, draw {seed}: clothing-small, {PHOTO_LABELLED} labelled per class; {how}", results,
                         prepared, arms[0].name, params.evaluate.bootstrap)
            draws.append((seed, ext, results))
        if len(draws) > 1:
            print_pooled(draws, arms[0].name, arms[1].name, params.evaluate.bootstrap)


def print_pooled(draws: list[tuple[int, External, dict[str, list[FoldRun]]]], reference: str, other: str,
                 resamples: int) -> None:
    """`other` - `reference` over every draw's development part together: the draws' development images side by
    side (their near-duplicate groups kept apart by draw), each draw's fold models as the repeats, so the
    difference is the mean over draws and folds, weighted by development images, and its paired bootstrap
    resamples images of every draw. The test parts likewise, to report only."""
    for where in ("dev", "test"):
        targets, base, pooled, groups = [], [], [], []
        for seed, ext, results in draws:
            mask = getattr(ext, where)
            targets.append(ext.targets[mask])
            base.append(fold_probs(results[reference], mask))
            pooled.append(fold_probs(results[other], mask))
            groups.append(np.char.add(f"draw{seed}:", ext.groups[mask].astype(str)))
        c = paired_bootstrap(np.concatenate(targets), np.concatenate(base, axis=1), np.concatenate(pooled, axis=1),
                             resamples=resamples, groups=np.concatenate(groups))
        name = "development parts" if where == "dev" else "final tests (report only)"
        verdict = "significant" if c.p_value < ALPHA else "not significant"
        print(f"{other} - {reference}, {len(draws)} draws' {name} pooled ({sum(len(t) for t in targets)} images): "
              f"{interval(c)}  p = {c.p_value:.3f}  {verdict} at {ALPHA} (paired bootstrap)")


PARTS = {"digits": digits_part, "photos": photos_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                        help="digits: the folds of params.yaml's CV to train; photos: collect.folds (0..k-1)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--workspace", type=Path, help="keep data and finished runs here (default: a temp dir)")
    parser.add_argument("--pool", type=int, help="digits: collect.unlabelled_limit (default: params.yaml's)")
    parser.add_argument("--full-epochs", type=int, default=300, help="digits: epochs of the `full` variant")
    parser.add_argument("--full-input-size", type=int,
                        help="digits: the `full` variant's input_size (default: cnn_pool's; 16: a quarter the work)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="digits' `full` variant only: a finetune setting (YAML value), e.g. unlabelled_ratio=7")
    parser.add_argument("--epochs-scale", type=float, default=1.0,
                        help="digits: multiply cnn's and cnn_pool's epochs (a smoke test: 0.05)")
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    parser.add_argument("--photo-size", type=int, default=64, help="photos: collect.image_size")
    parser.add_argument("--photo-epochs", type=int, default=15)
    parser.add_argument("--photo-input-size", type=int, default=64,
                        help="photos: Lite0's input_size (0 = its own 224 px, the stored pictures upsampled: a GPU's)")
    parser.add_argument("--photo-recipes", nargs="+", choices=list(PHOTO_NAMES), default=list(PHOTO_NAMES),
                        help="photos: full (Lite0 fine-tuned, FixMatch) and probe (the preset's Lite2 probe, "
                             "self-training), each without and with the pool")
    parser.add_argument("--photo-seed", type=int, nargs="+", default=[0],
                        help="photos: the labelled draws and pool/test splits (several: a table each, then the "
                             "difference over all their development parts together)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="semi-bench-") as tmp:
        work = args.workspace.resolve() if args.workspace else Path(tmp)
        for part in args.parts:
            PARTS[part](args, work)
    print(f"\nwall time {time.perf_counter() - began:.0f} s; device {pick_device(args.device)}")


if __name__ == "__main__":
    main()
