"""Does the data-efficient GAN earn its keep? The default exemplar generator (DAGAN, `synthesize.condition:
image`) beside the label-conditioned GAN (`condition: label`, at its learning rates of 0.0002) with DiffAugment and
adaptive augmentation strength, with DiffAugment at a fixed strength, without augmentation, with the discriminator
on frozen pretrained features (Projected GAN, `synthesize.discriminator: features`), and with its filter also
asking that a sample lie near a real image of its class (`synthesize.near_real: 1`), the same steps and seeds, on
the default folds.

    python benchmarks/gan_ablation.py [--folds 0 1 2 3 4] [--versions 0 3] [--set synthesize.steps=400 ...]

For each fold it runs the synthesize stage once per version (in a temporary folder) and prints, for each: FID
and KID of all candidates against the fold's real training images (the same number of images on both sides, so
the biased FID is comparable), the filter's acceptance rate, and CAS (a classifier trained on the accepted
samples only, tested on the fold's real validation images) beside the same classifier trained on the real
training images; and the same two, plus one trained on all candidates, tested on 1,000 images of the external
development part (the validation part of a fold is 20 images, too few to tell versions apart; the final test
is never used to compare versions). (`augment_p` is the final
augmentation probability; it means nothing without a policy.)
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
from pipeline.runtime import paths  # noqa: E402
from pipeline.runtime.params import parse_params  # noqa: E402
from pipeline.stages import augment, collect, synthesize  # noqa: E402
from pipeline.stages.synthesize import SynthesizeOutputs  # noqa: E402

from benchmarks import workspace  # noqa: E402

LABEL = {"condition": "label", "lr_g": 0.0002, "lr_d": 0.0002}  # the label GAN, at the rates it was measured at
VERSIONS = {  # name -> overrides of the synthesize params
    "exemplar generator, DAGAN (default)": {},
    "label GAN, DiffAugment + adaptive p": LABEL,
    "label GAN, DiffAugment, fixed p = 1": {**LABEL, "ada_target": 0.0},
    "label GAN, no augmentation": {**LABEL, "diffaugment": "", "ada_target": 0.0},
    "label GAN, feature discriminator": {**LABEL, "discriminator": "features"},
    "label GAN, filter also near the real images": {**LABEL, "near_real": 1.0},
}
SHOWN = ["fid_candidates", "kid_candidates", "acceptance", "novelty_candidates", "cas_synthetic", "cas_real",
         "cas_candidates_dev", "cas_synthetic_dev", "cas_real_dev", "augment_p", "seconds"]


def load(settings: list[str]):
    return parse_params(workspace.override(yaml.safe_load(Path("params.yaml").read_text()), settings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", action="append", default=[], help="override a param, e.g. synthesize.steps=800")
    parser.add_argument("--versions", type=int, nargs="+", default=list(range(len(VERSIONS))),
                        help="which versions, by number: " + "; ".join(f"{i} {n}" for i, n in enumerate(VERSIONS)))
    args = parser.parse_args()
    versions = {name: overrides for i, (name, overrides) in enumerate(VERSIONS.items()) if i in args.versions}
    params = load(args.set)
    work = Path(tempfile.mkdtemp(prefix="gan-ablation-"))
    collect.run(params.collect, work / "collected", work / "collect-reports")
    augment.run(params.augment, work / "collected", work / "augment")  # the filter's views come from its policy
    results: dict[str, list[dict]] = {name: [] for name in versions}
    for fold in args.folds:
        for number, (name, overrides) in enumerate(versions.items()):
            version = dataclasses.replace(params.synthesize, **overrides)
            folder = work / f"fold{fold}-version{number}"
            start = time.perf_counter()
            meta = synthesize.run(version, fold, work / "collected",
                                  SynthesizeOutputs(folder, folder / "reports", "ablation"),
                                  policy=work / "augment" / paths.POLICY_FILE)
            meta["seconds"] = time.perf_counter() - start
            results[name].append(meta)
            print(f"fold {fold} | {name:36} | " + " ".join(f"{k} {_fmt(meta[k])}" for k in SHOWN), flush=True)
    print(f"\nmean over folds {args.folds} ({params.synthesize.steps} steps, {params.collect.images_per_class} "
          f"labelled images per class):")
    print(f"{'version':38}" + "".join(f"{k:>24}" for k in SHOWN))
    for name, metas in results.items():
        means = [np.mean([m[k] for m in metas if m[k] is not None] or [np.nan]) for k in SHOWN]
        print(f"{name:38}" + "".join(f"{v:24.4f}" for v in means))
    default, *others = results
    for other in others:
        better = [a["fid_candidates"] < b["fid_candidates"] for a, b in zip(results[default], results[other])]
        print(f"the default has a lower FID than '{other}' on {sum(better)} of {len(better)} folds")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
