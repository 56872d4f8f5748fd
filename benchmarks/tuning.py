"""The settings behind the defaults, re-measured so that nothing is chosen on the final test.

    python benchmarks/tuning.py --workspace DIR [--only cnn_epochs lite0_size ...] [--folds 0 1 2 3 4]

DIR is a repository where the full study has run (`python benchmarks/pipeline_time.py --preset study --keep DIR`
makes one; questions on the default's own variants work on a default run too): its collected data, augmentation
policy, GAN samples and default fold predictions are reused. Each question
trains its alternatives on the same folds (outside DVC, in DIR/tuning/) and prints, per setting, the
cross-validated accuracy (mean over folds), the development part's accuracy (fold models' mean and their
ensemble) and the training time.

The rule that chooses: a setting other than the default must beat the default on the development part, its fold
ensemble's accuracy higher with a paired bootstrap interval (over groups of development images) above 0; the
default otherwise stays, being the cheaper or the simpler. The final test's accuracy is printed for the chosen
setting only: it reports, it does not choose.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks` importable
from pipeline.data.collected import DEV, TEST, load_collected  # noqa: E402
from pipeline.evaluation.statistics import paired_bootstrap  # noqa: E402
from pipeline.runtime import paths  # noqa: E402
from pipeline.runtime.params import Params, load_params  # noqa: E402
from pipeline.stages import finetune, synthesize  # noqa: E402

from benchmarks import workspace  # noqa: E402


@dataclass(frozen=True)
class Question:
    variant: str  # the variant whose setting is in question
    alternatives: dict[str, list[str]]  # name -> `key=value` overrides of params.yaml
    why: str
    default: str = "default"
    gan: bool = field(default=False)  # the alternatives need their own GAN samples


QUESTIONS = {
    "cnn_epochs": Question("cnn", {"100 epochs": ["variants.cnn.epochs=100"]},
                           "the compact CNN's epochs (the study preset's 200; the default takes 100 for its time "
                           "budget)"),
    "lite0_epochs": Question("augment", {"20 epochs": ["variants.augment.epochs=20"],
                                         "15 epochs": ["variants.augment.epochs=15"]},
                             "EfficientNet-Lite0's epochs of full fine-tuning (default 30)"),
    "lite0_size": Question("augment", {"48 px": ["variants.augment.input_size=48"]},
                           "EfficientNet-Lite0's input size (default 64 px, chosen here against 48)"),
    "gan_samples": Question("synthetic", {"up to 50 per class": ["synthesize.candidates_per_class=128",
                                                                 "synthesize.keep_per_class=50"]},
                            "GAN samples per class (default: at most 8 of 32 candidates)", gan=True),
    "synthetic_share": Question("cnn_synthetic", {"share 0.25": ["finetune.synthetic_share=0.25"],
                                                  "share 0.5": ["finetune.synthetic_share=0.5"]},
                                "the share of GAN samples in each batch (default 0.1)"),
    "synthetic_weight": Question("cnn_synthetic", {"weight 0.5": ["finetune.synthetic_weight=0.5"],
                                                   "weight 0.25": ["finetune.synthetic_weight=0.25"]},
                                 "the GAN samples' loss weight against 1 for a real image (default 1)"),
    "synthetic_soft": Question("cnn_synthetic", {"soft targets": ["finetune.synthetic_soft=true"]},
                               "the GAN samples' targets: the filter's confidence in their class (default: one-hot)"),
    "semi_supervised": Question("cnn_pool", {"threshold 0.8": ["finetune.pseudo_threshold=0.8"],
                                             "pool from 25%": ["finetune.unlabelled_start=0.25"]},
                                "the semi-supervised variant's pseudo-label threshold (default 0.7) and when the pool "
                                "joins (default half way)"),
    "near_real": Question("cnn_synthetic", {"near_real 1.0": ["synthesize.near_real=1.0"]},
                          "the GAN samples' filter also asking for nearness to a real image (default: off)", gan=True),
    "regularisers": Question("cnn", {"early stopping": ["finetune.inner_val=0.2", "finetune.patience=20"],
                                     "EMA 0.99": ["finetune.ema_decay=0.99"], "mixup 0.2": ["finetune.mixup=0.2"]},
                             "the compact CNN with the optional regularisers (default: all off)"),
}


def _fill(raw: dict, defaults: dict) -> dict:
    """`raw` with the keys it lacks taken from `defaults` (settings added to params.yaml since `raw` was written)."""
    for key, value in defaults.items():
        if key not in raw:
            raw[key] = value
        elif isinstance(value, dict) and isinstance(raw[key], dict) and key != "variants":
            _fill(raw[key], value)
    return raw


def params_with(base: Path, settings: list[str]) -> Params:
    """The workspace's params (keys added since its run from this checkout's params.yaml) with `key=value`
    overrides, validated like params.yaml itself."""
    raw = _fill(yaml.safe_load(base.read_text()), yaml.safe_load((workspace.ROOT / "params.yaml").read_text()))
    raw = workspace.override(raw, settings)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return load_params(f.name)


@dataclass
class Scored:
    cv: float  # mean validation accuracy over folds
    fold_probs: np.ndarray  # fold models x external images x classes
    seconds: float  # training time over the folds


def train_setting(ws: Path, question: Question, settings: list[str], folds: list[int], out: Path) -> float:
    """Train the question's variant with these settings on every fold into `out`; return the training seconds."""
    params = params_with(ws / "params.yaml", settings)
    collected, policy = ws / paths.COLLECTED, ws / paths.AUGMENT / paths.POLICY_FILE
    seconds = 0.0
    for fold in folds:
        done = out / f"fold{fold}-seconds.json"
        if done.is_file():  # trained by an earlier, interrupted run of this script
            seconds += json.loads(done.read_text())
            continue
        fold_seconds = 0.0
        synthetic = ws / paths.synthetic_dir(0, fold)
        if question.gan:
            synthetic = out / "synthetic" / f"r0-fold{fold}"
            start = time.perf_counter()
            synthesize.run(params.synthesize, fold, collected,
                           synthesize.SynthesizeOutputs(synthetic, out / "synthesize", f"r0-fold{fold}"),
                           policy=policy)
            fold_seconds += time.perf_counter() - start
        meta = finetune.run(params.finetune, params.variants[question.variant], fold,
                            finetune.FinetuneInputs(collected, policy, synthetic), out / f"fold{fold}")
        run_facts = json.loads(paths.run_facts(out, "live").read_text())
        fold_seconds += run_facts.get("train_seconds", meta.get("train_seconds", 0.0))
        done.write_text(json.dumps(fold_seconds))
        seconds += fold_seconds
    return seconds


def default_seconds(ws: Path, variant: str, folds: list[int], wait: float = 3600) -> float:
    """The default run's own training time, from the facts finetune kept beside its metrics (waiting up to `wait`
    seconds for a `dvc repro` still running in the workspace to write them)."""
    facts = [paths.run_facts(ws / paths.FINETUNE_REPORTS, f"{paths.split_name(0, fold)}-{variant}") for fold in folds]
    deadline = time.monotonic() + wait
    while not all(f.is_file() for f in facts) and time.monotonic() < deadline:
        time.sleep(10)
    return sum(json.loads(f.read_text())["train_seconds"] for f in facts)


def score(folders: list[Path], targets: np.ndarray, seconds: float) -> Scored:
    cv, probs = [], []
    for folder in folders:
        with np.load(folder / paths.PREDICTIONS_FILE) as p:
            cv.append(float((p["val_probs"].argmax(1) == targets[p["val_index"]]).mean()))
            probs.append(p["test_probs"])
    return Scored(float(np.mean(cv)), np.stack(probs), seconds)


def ask(ws: Path, name: str, question: Question, folds: list[int]) -> None:
    variants = yaml.safe_load((ws / "params.yaml").read_text())["variants"]
    if question.variant not in variants:
        sys.exit(f"{name}: the workspace's params have no variant {question.variant!r} (it has "
                 f"{', '.join(variants)}); run this question on a workspace of the study preset "
                 f"(`python benchmarks/pipeline_time.py --keep DIR --preset study`)")
    data = load_collected(ws / paths.COLLECTED)
    targets = data.manifest.target.to_numpy()
    external = data.external
    parts = external.part.to_numpy()
    ext_targets, groups = targets[external["index"].to_numpy()], external.group.to_numpy()
    dev, test = parts == DEV, parts == TEST
    trained = {}
    for alt, settings in question.alternatives.items():  # first, so a default run still going can finish meanwhile
        out = ws / "tuning" / name / alt.replace(" ", "_")
        trained[alt] = (out, train_setting(ws, question, settings, folds, out))
    default_time = default_seconds(ws, question.variant, folds)  # first: it waits for the default run's outputs
    scored = {question.default: score([ws / paths.finetune_dir(0, f, question.variant) for f in folds], targets,
                                      default_time)}
    for alt, (out, seconds) in trained.items():
        scored[alt] = score([out / f"fold{f}" for f in folds], targets, seconds)
    print(f"\n## {name}: {question.why} (variant `{question.variant}`, {len(folds)} folds; development part "
          f"{dev.sum()} images, final test {test.sum()})")
    print(f"{'setting':<22} {'CV':>6} {'dev folds':>10} {'dev ensemble':>13} {'vs default on dev [95%]':>30} "
          f"{'train s':>8}")
    base = scored[question.default]
    chosen, best_gain = question.default, 0.0
    for alt, s in scored.items():
        dev_folds = float(np.mean([(p[dev].argmax(1) == ext_targets[dev]).mean() for p in s.fold_probs]))
        dev_ens = float((s.fold_probs.mean(0)[dev].argmax(1) == ext_targets[dev]).mean())
        against = ""
        if alt != question.default:
            c = paired_bootstrap(ext_targets[dev], base.fold_probs.mean(0)[dev], s.fold_probs.mean(0)[dev],
                                 groups=groups[dev])
            against = f"{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}]"
            if c.low > 0 and c.difference > best_gain:
                chosen, best_gain = alt, c.difference
        print(f"{alt:<22} {s.cv:>6.3f} {dev_folds:>10.3f} {dev_ens:>13.3f} {against:>30} {s.seconds:>8.1f}")
    final = scored[chosen]
    test_folds = float(np.mean([(p[test].argmax(1) == ext_targets[test]).mean() for p in final.fold_probs]))
    test_ens = float((final.fold_probs.mean(0)[test].argmax(1) == ext_targets[test]).mean())
    print(f"chosen on the development part: {chosen}; its final test (reported, not used): fold models "
          f"{test_folds:.3f}, ensemble {test_ens:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True, help="a repository where `dvc repro` has run")
    parser.add_argument("--only", nargs="+", choices=list(QUESTIONS), default=list(QUESTIONS))
    parser.add_argument("--folds", nargs="+", type=int, default=None, help="default: every fold of the run")
    args = parser.parse_args()
    ws = args.workspace.resolve()
    folds = args.folds or load_collected(ws / paths.COLLECTED).folds
    for name in args.only:
        ask(ws, name, QUESTIONS[name], folds)


if __name__ == "__main__":
    main()
