"""The settings that act after a GAN has trained: how its candidates are drawn (`truncation`, how many per class)
and how they are judged (`filter_views`, the augmented views of the real images the filter also learns from).
Each fold's GAN is trained once, with the params.yaml settings, then sampled and judged under every combination
of the values given; the same filter and measures as the synthesize stage judge each set.

    python benchmarks/gan_judging.py [--folds 0 1 2 3 4] [--vary truncation=1.0,0.8,0.6]
                                     [--vary filter_views=0,16 --vary candidates_per_class=64,128]
                                     [--set synthesize.steps=400]

Printed per fold and combination, then as means over the folds: the filter's acceptance, beside its acceptance of
real development images (what samples as good as real ones would score); FID of the accepted samples against the
fold's real training images (backbone features); novelty (their median distance to the nearest real image, which
falls as variety goes); and CAS, a classifier trained on the accepted samples, beside the same classifier trained
on the real training images, both tested on 1,000 images of the external development part (a fold's 20
validation images are too few to tell settings apart; the final test is never used to compare them). The lowest
fold's acceptance and CAS ratio are printed too: the issue's goals hold for every fold, not for the mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `pipeline` importable
from pipeline.augmentation.policy import build_policy  # noqa: E402
from pipeline.data.collected import load_collected  # noqa: E402
from pipeline.gan.samples import candidates, check_no_leak, judge, make_samples  # noqa: E402
from pipeline.runtime.compute import pick_device, seed_everything  # noqa: E402
from pipeline.runtime.params import parse_params  # noqa: E402
from pipeline.stages import collect  # noqa: E402

from benchmarks import workspace  # noqa: E402

SHOWN = ["acceptance", "acceptance_real_dev", "accepted", "fid_accepted", "novelty_accepted", "cas_synthetic_dev",
         "cas_real_dev", "cas_ratio_dev"]
AFTER_TRAINING = {"truncation": float, "candidates_per_class": int, "filter_views": int}  # what --vary may vary


def combinations(vary: list[str]) -> list[dict]:
    """`KEY=V1,V2` settings as every combination of their values, e.g. [{"truncation": 1.0, "filter_views": 0}, ...]."""
    axes = {}
    for setting in vary:
        key, _, values = setting.partition("=")
        if key not in AFTER_TRAINING or not values:
            sys.exit(f"--vary {setting}: give KEY=V1,V2,... with KEY one of {', '.join(AFTER_TRAINING)}")
        axes[key] = [AFTER_TRAINING[key](v) for v in values.split(",")]
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def label(combination: dict) -> str:
    return " ".join(f"{k} {v}" for k, v in combination.items()) or "params.yaml"


def fold_results(params, collected, policy, fold: int, combos: list[dict]) -> list[dict]:
    """Train fold `fold`'s GAN as the synthesize stage does (its seed included), then judge each combination."""
    rows = check_no_leak(collected, fold, 0)
    gan = dataclasses.replace(params.synthesize, seed=params.synthesize.seed + fold)  # the stage's stream for repeat 0
    seed_everything(gan.seed)
    device = pick_device(gan.device)
    start = time.perf_counter()
    made = make_samples(gan, collected, rows, device, checkpoint=None, policy=policy)
    print(f"fold {fold}: GAN trained in {made.seconds:.0f} s", flush=True)
    stored = collected.select(rows[0])[0].shape[1]
    results = []
    for combo in combos:
        setting = dataclasses.replace(gan, **combo)
        if setting == gan:  # make_samples already judged the candidates drawn and judged as params.yaml says
            quality = dict(made.quality)
        else:
            fake, labels = candidates(setting, made.trained, stored, device)
            _, _, quality = judge(setting, collected, fake, labels, rows, device, policy)
        results.append(quality)
        print(f"fold {fold} | {label(combo)} | " + " ".join(f"{k} {quality[k]:.4f}" for k in SHOWN), flush=True)
    print(f"fold {fold}: {time.perf_counter() - start:.0f} s in all", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                        help=f"values to try of one of {', '.join(AFTER_TRAINING)} (repeat for a grid)")
    parser.add_argument("--set", action="append", default=[], help="override a param, e.g. synthesize.steps=800")
    args = parser.parse_args()
    params = parse_params(workspace.override(yaml.safe_load(Path("params.yaml").read_text()), args.set))
    combos = combinations(args.vary or ["truncation=1.0,0.8,0.6"])
    work = Path(tempfile.mkdtemp(prefix="gan-judging-"))
    collect.run(params.collect, work / "collected", work / "collect-reports")
    collected = load_collected(work / "collected")
    policy = build_policy(params.augment.transforms, params.augment.seed)  # as the augment stage builds it
    per_fold = [fold_results(params, collected, policy, fold, combos) for fold in args.folds]
    print(f"\nmean over folds {args.folds} ({params.synthesize.steps} steps); in brackets the lowest fold's "
          "acceptance and CAS ratio:")
    print(f"{'setting':>40}" + "".join(f"{k:>20}" for k in SHOWN))
    for i, combo in enumerate(combos):
        means = [np.mean([r[i][k] for r in per_fold]) for k in SHOWN]
        lowest = [min(r[i][k] for r in per_fold) for k in ("acceptance", "cas_ratio_dev")]
        print(f"{label(combo):>40}" + "".join(f"{v:20.4f}" for v in means)
              + f"   [{lowest[0]:.4f}, {lowest[1]:.4f}]")


if __name__ == "__main__":
    main()
