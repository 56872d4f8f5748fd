"""A photo benchmark: the photos preset's recipes against the plain reference, on real photos with few labels.

    python benchmarks/photos.py [--photos ../shared/datasets/clothing-small] [--per-class 10 20] [--draws 3]
                                [--device auto] [--recipes reference probe probe_lite2 partial full]
                                [--set finetune.partial_blocks=2 --set 'variants.mine={...}' ...]

On clothing-small (1,000 CC0 photos in 10 classes), for each number of labelled photos per class and each seeded
draw, the rest of the photos are split (stratified, seeded) into a development half and a test half. Every
recipe trains on the labelled photos and predicts the rest; the table gives, per recipe, the accuracy on the
development half and on the test half (mean over draws, with the range of the per-draw 95% bootstrap intervals)
and the seconds per draw. The recipe the pipeline would pick is chosen on the development half; its test figure
is then the result, beside the reference's test figure. The test halves choose nothing.

- reference: frozen EfficientNet-Lite0 at 224 px, scikit-learn's logistic regression on its features (the
  starting point the photo issue measured: 0.701 with 10 per class on the other 900 photos);
- the preset's variants (presets/photos.yaml), trained by the pipeline's own strategies (linear probes on
  augmented views, partial fine-tuning) with the preset's finetune settings and augmentation;
- full: full fine-tuning of Lite0 at 224 px, on a GPU only (about 6 images/s on a 2-core CPU);
- with GAN samples, asked for by name (`--recipes partial partial_synthetic probe probe+gan`): the preset's
  synthetic variants, and any variant with `+gan`. Each draw trains the preset's GAN (`synthesize`, at its 64 px)
  on that draw's labelled photos only, filters its candidates with a probe of those photos and of their
  augmented views (`synthesize.filter_views`, drawn with the preset's policy), as the synthesize stage does, and
  every such recipe of the draw trains on the same accepted samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks` importable
from pipeline import presets  # noqa: E402
from pipeline.augmentation.policy import build_policy, load_policy, save_policy  # noqa: E402
from pipeline.data.decode import Normalise, decode_file  # noqa: E402
from pipeline.data.folds import dev_part  # noqa: E402
from pipeline.evaluation.statistics import bootstrap_intervals, paired_bootstrap  # noqa: E402
from pipeline.gan.conditional import train_gan  # noqa: E402
from pipeline.gan.samples import accept, candidates, fit_filter, resize  # noqa: E402
from pipeline.runtime.compute import World, pick_device, seed_everything  # noqa: E402
from pipeline.runtime.params import Params, Variant, gan_side, parse_params  # noqa: E402
from pipeline.training import learners  # noqa: E402
from pipeline.training.probe import FeatureCache, ImageFeatures  # noqa: E402

from benchmarks import workspace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "datasets" / "clothing-small"
SIDE = 256  # the preset's `image_size: auto` on these photos (their shorter side)


def preset_params(settings: list[str]) -> Params:
    """params.yaml with the photos preset applied, as `./dev.sh preset photos` would write it, then `settings`
    (`key.sub=value`, as for `dvc exp run -S`): alternatives to compare on the development halves."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text((ROOT / "params.yaml").read_text())
        presets.apply("photos", path)
        raw = yaml.safe_load(path.read_text())
    raw["collect"].update(channels=3, image_size=SIDE)  # what auto chooses here, fixed for the arrays below
    return parse_params(workspace.override(raw, settings))


def load_photos(folder: Path, limit: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    how = Normalise(SIDE, 3, "crop")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    images, targets = [], []
    for target, name in enumerate(classes):
        for file in sorted((folder / name).iterdir())[:limit or None]:
            images.append(decode_file(file, how, hashed=False).pixels)
            targets.append(target)
    return np.stack(images), np.array(targets), classes


def reference(images: np.ndarray, targets: np.ndarray, train: np.ndarray, device, cache: Path) -> np.ndarray:
    """Frozen Lite0 at 224 px and scikit-learn's logistic regression: probabilities for every photo."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    features = FeatureCache(ImageFeatures("efficientnet_lite0", 224, device), cache)(images)
    scaler = StandardScaler().fit(features[train])
    model = LogisticRegression(max_iter=3000).fit(scaler.transform(features[train]), targets[train])
    return model.predict_proba(scaler.transform(features))


def gan_samples(params: Params, images: np.ndarray, targets: np.ndarray, classes: int, policy: Path,
                device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The accepted GAN samples for these labelled photos, their classes and the filter's confidence, made as the
    synthesize stage makes them (its GAN, side, candidates, filter with its views and thresholds)."""
    cfg = params.synthesize
    seed_everything(cfg.seed)
    trained = train_gan(resize(images, gan_side(cfg.image_size, SIDE)), targets, classes, cfg, device)
    fake, labels = candidates(cfg, trained, SIDE, device)
    extract = ImageFeatures(cfg.feature_backbone, cfg.feature_size, device)
    real_f = extract(images)
    probe = fit_filter(cfg, extract, images, targets, real_f, load_policy(policy), device)
    chosen = accept(cfg, probe, real_f, targets, extract(fake), labels, classes)
    print(f"GAN: {len(chosen.keep)} of {len(fake)} candidates accepted", flush=True)
    return fake[chosen.keep], labels[chosen.keep], chosen.scores[chosen.keep]


def pipeline_recipe(params: Params, variant: Variant, images, targets, train, policy: Path, device,
                    cache: Path, classes: int, samples=None) -> np.ndarray:
    """One of the preset's variants through the pipeline's strategies: probabilities for every photo (all photos
    are the held-out set, so their features are computed once and cached for every draw)."""
    seed_everything(params.finetune.seed)
    data = learners.real_training_set(images[train], targets[train], np.arange(len(train)), params.finetune,
                                      variant, params.finetune.seed)
    if variant.synthetic:
        data = dataclasses.replace(data, synthetic=samples[0], synthetic_targets=samples[1],
                                   synthetic_confidence=samples[2])
    job = learners.Job(params.finetune, variant, data, (images[:0], images), classes, policy,
                       learners.Workspace(None, None, cache), device, World())
    return learners.train(job).probs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    parser.add_argument("--per-class", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, default=0, help="photos per class to use (0 = all; a quick check)")
    parser.add_argument("--recipes", nargs="+", default=None, help="default: reference, every preset variant "
                        "without GAN samples, and full on a GPU")
    parser.add_argument("--cache", type=Path, help="keep the held-out photos' features here, for later runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change the preset's params (YAML value), e.g. finetune.partial_blocks=2")
    args = parser.parse_args()
    device = pick_device(args.device)
    params = preset_params(args.set)
    variants = dict(params.variants)
    variants["full"] = Variant("efficientnet_lite0", "packaged", "full", 0, 15, True, False, False)
    variants |= {f"{n}+gan": dataclasses.replace(v, synthetic=True) for n, v in list(variants.items())
                 if not v.synthetic}
    recipes = args.recipes or ["reference", *[n for n, v in params.variants.items() if not v.synthetic]] + (
        ["full"] if device.type == "cuda" else [])  # by default no GAN: one per draw is slow on a CPU
    unknown = [r for r in recipes if r != "reference" and r not in variants]
    if unknown:
        sys.exit(f"unknown recipe(s) {unknown}; known: reference, {', '.join(variants)}")
    images, targets, classes = load_photos(args.photos, args.limit)
    print(f"{len(images)} photos, {len(classes)} classes, stored at {SIDE} px; device {device}; "
          f"torch threads {torch.get_num_threads()}")
    work = Path(tempfile.mkdtemp(prefix="photos-bench-"))
    cache = args.cache or work / "cache"
    policy = work / "policy.json"
    save_policy(build_policy(params.augment.transforms, params.augment.seed), policy)
    rows, dev_probs = [], {}  # (per_class, recipe) -> [(dev indices, their probabilities), one per draw]
    for per_class in args.per_class:
        for draw in range(args.draws):
            rng = np.random.default_rng(draw)
            train = np.sort(np.concatenate([rng.choice(np.flatnonzero(targets == c), per_class, replace=False)
                                            for c in range(len(classes))]))
            rest = np.setdiff1d(np.arange(len(images)), train)
            dev_mask = dev_part(pd.Series(targets[rest]), pd.Series(rest), 0.5, seed=draw)
            parts = {"dev": rest[dev_mask], "test": rest[~dev_mask]}
            samples = None
            if any(r != "reference" and variants[r].synthetic for r in recipes):
                start = time.perf_counter()
                samples = gan_samples(params, images[train], targets[train], len(classes), policy, device)
                print(f"n={per_class} draw {draw} GAN samples in {time.perf_counter() - start:.1f} s", flush=True)
            for recipe in recipes:
                start = time.perf_counter()
                if recipe == "reference":
                    probs = reference(images, targets, train, device, cache)
                else:
                    probs = pipeline_recipe(params, variants[recipe], images, targets, train, policy, device,
                                            cache, len(classes), samples)
                seconds = time.perf_counter() - start
                row = {"per_class": per_class, "draw": draw, "recipe": recipe, "seconds": seconds}
                for part, index in parts.items():
                    low_high = bootstrap_intervals(targets[index], probs[index], 0.95, 1000)["accuracy"]
                    row.update({part: float((probs[index].argmax(1) == targets[index]).mean()),
                                f"{part}_low": low_high[0], f"{part}_high": low_high[1]})
                rows.append(row)
                dev_probs.setdefault((per_class, recipe), []).append((parts["dev"], probs[parts["dev"]]))
                print(f"n={per_class} draw {draw} {recipe:<12} dev {row['dev']:.3f} test {row['test']:.3f} "
                      f"[{row['test_low']:.3f}, {row['test_high']:.3f}] {seconds:.1f} s", flush=True)
    report(pd.DataFrame(rows))
    report_gan(dev_probs, variants, targets)


def report(table: pd.DataFrame) -> None:
    """Per number of labels: each recipe's means over draws; the recipe chosen on the development half, and its
    test figure beside the reference's."""
    for per_class, part in table.groupby("per_class"):
        summary = part.groupby("recipe", sort=False).agg(
            dev=("dev", "mean"), test=("test", "mean"), test_low=("test_low", "min"), test_high=("test_high", "max"),
            seconds=("seconds", "mean"))
        print(f"\n{per_class} labelled photos per class, {part.draw.nunique()} draws (test: mean, and the lowest "
              "and highest per-draw 95% bootstrap bounds)")
        print(f"{'recipe':<12} {'dev':>6} {'test':>6} {'test interval':>17} {'s per draw':>11}")
        for recipe, r in summary.iterrows():
            print(f"{recipe:<12} {r.dev:>6.3f} {r.test:>6.3f}   [{r.test_low:.3f}, {r.test_high:.3f}] "
                  f"{r.seconds:>11.1f}")
        candidates = summary.drop(index="reference", errors="ignore")
        if len(candidates) and "reference" in summary.index:
            chosen = candidates.dev.idxmax()
            gain = summary.test[chosen] - summary.test["reference"]
            print(f"chosen on the development half: {chosen}; test {summary.test[chosen]:.3f} against the "
                  f"reference's {summary.test['reference']:.3f} ({gain:+.3f})")


def report_gan(dev_probs: dict, variants: dict[str, Variant], targets: np.ndarray) -> None:
    """Each recipe with GAN samples against the same recipe without them, on the development halves of every draw
    pooled (paired bootstrap; the same photo in several draws' halves is one group)."""
    for (per_class, recipe), with_gan in dev_probs.items():
        variant = variants.get(recipe)
        if variant is None or not variant.synthetic:
            continue
        plain = dataclasses.replace(variant, synthetic=False)
        base = next((n for n, v in variants.items() if v == plain and (per_class, n) in dev_probs), None)
        if base is None:
            continue
        index = np.concatenate([i for i, _ in dev_probs[(per_class, base)]])
        a = np.concatenate([p for _, p in dev_probs[(per_class, base)]])
        b = np.concatenate([p for _, p in with_gan])
        c = paired_bootstrap(targets[index], a, b, groups=index)
        print(f"GAN samples, {per_class} per class: {base} -> {recipe} on the development halves "
              f"{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}] p {c.p_value:.3f}")


if __name__ == "__main__":
    main()
