"""Sample-time truncation (`synthesize.truncation`): how much of a GAN's output carries its class when z is drawn
closer to the centre, and what the samples lose in variety. Each fold's GAN is trained once, with the params.yaml
settings, and sampled at every truncation in --truncations; the same filter and measures as the synthesize stage
judge each set.

    python benchmarks/gan_truncation.py [--folds 0 1 2 3 4] [--truncations 1.0 0.8 0.6] [--set synthesize.steps=400]

Printed per fold and truncation, then as means over the folds: the filter's acceptance, beside its acceptance of
real development images (what samples as good as real ones would score); FID of the accepted samples
against the fold's real training images (backbone features); novelty (their mean distance to the nearest real
image, which falls as variety goes); and CAS, a classifier trained on the accepted samples, beside the same
classifier trained on the real training images, both tested on 1,000 images of the external development part (a
fold's 20 validation images are too few to tell settings apart; the final test is never used to compare them).
"""

from __future__ import annotations

import argparse
import dataclasses
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


def fold_results(params, collected, policy, fold: int, truncations: list[float]) -> dict[float, dict]:
    """Train fold `fold`'s GAN as the synthesize stage does (its seed included), then judge each truncation."""
    rows = check_no_leak(collected, fold, 0)
    gan = dataclasses.replace(params.synthesize, seed=params.synthesize.seed + fold)  # the stage's stream for repeat 0
    seed_everything(gan.seed)
    device = pick_device(gan.device)
    start = time.perf_counter()
    made = make_samples(gan, collected, rows, device, checkpoint=None, policy=policy)
    print(f"fold {fold}: GAN trained in {made.seconds:.0f} s", flush=True)
    stored = collected.select(rows[0])[0].shape[1]
    results = {}
    for t in truncations:
        if t == gan.truncation:  # make_samples already judged the candidates drawn at params.yaml's truncation
            quality = dict(made.quality)
        else:
            fake, labels = candidates(dataclasses.replace(gan, truncation=t), made.trained, stored, device)
            _, _, quality = judge(gan, collected, fake, labels, rows, device, policy)
        quality["cas_ratio_dev"] = quality["cas_synthetic_dev"] / max(quality["cas_real_dev"], 1e-9)
        results[t] = quality
        print(f"fold {fold} | truncation {t:.2f} | " + " ".join(f"{k} {quality[k]:.4f}" for k in SHOWN), flush=True)
    print(f"fold {fold}: {time.perf_counter() - start:.0f} s in all", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--truncations", type=float, nargs="+", default=[1.0, 0.8, 0.6])
    parser.add_argument("--set", action="append", default=[], help="override a param, e.g. synthesize.steps=800")
    args = parser.parse_args()
    params = parse_params(workspace.override(yaml.safe_load(Path("params.yaml").read_text()), args.set))
    work = Path(tempfile.mkdtemp(prefix="gan-truncation-"))
    collect.run(params.collect, work / "collected", work / "collect-reports")
    collected = load_collected(work / "collected")
    policy = build_policy(params.augment.transforms, params.augment.seed)  # as the augment stage builds it
    per_fold = [fold_results(params, collected, policy, fold, args.truncations) for fold in args.folds]
    print(f"\nmean over folds {args.folds} ({params.synthesize.steps} steps); lowest acceptance of a fold in brackets:")
    print(f"{'truncation':>10}" + "".join(f"{k:>20}" for k in SHOWN))
    for t in args.truncations:
        means = [np.mean([r[t][k] for r in per_fold]) for k in SHOWN]
        lowest = min(r[t]["acceptance"] for r in per_fold)
        print(f"{t:>10.2f}" + "".join(f"{v:20.4f}" for v in means) + f"   [{lowest:.4f}]")


if __name__ == "__main__":
    main()
