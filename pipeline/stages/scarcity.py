"""Stage scarcity: one point of the label-scarcity curve x one variant. Draw `n` labelled images per class, split
them into the same number of folds (and repeats) as collect, train the variant on each fold as finetune does,
and write the out-of-fold probabilities and each fold model's probabilities on a fixed test set.

The draws are nested: a class's images are ordered once (its labelled images first, in a seeded shuffle, then,
for a bundled dataset, its unlabelled pool), and every point takes the first `n`, so the 5 images of a point are
among the 10 of the next. The test set is `scarcity.holdout` external images drawn before anything else, the same
at every point, and no drawn image shares a near-duplicate group with it. A point that asks for more images than a
class has is not run: its meta.json says why, and the report shows it.

Writes `predictions.npz` and `meta.json` into data/scarcity/nN-V/. Each finished fold is kept under
data/checkpoints/scarcity/ until the point is done, so a killed run picks up where it stopped.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.data.collected import LABELLED, load_collected
from pipeline.data.draws import NotEnoughImages, draw
from pipeline.runtime import atomic, paths
from pipeline.runtime.cli import cli, stage_args
from pipeline.runtime.compute import pick_device
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.params import FinetuneParams, ScarcityParams, Variant
from pipeline.training.curve_points import Point, train_fold

log = logging.getLogger(__name__)
# The params sections this stage reads; dvc.yaml lists the same (a test checks both).
PARAMS = ("finetune", "scarcity", "variants")


@dataclass(frozen=True)
class ScarcityInputs:
    collected: Path  # collect's output folder
    policy: Path  # augment's policy.json (read only when the variant augments)


@dataclass(frozen=True)
class ScarcityOutputs:
    folder: Path  # predictions.npz, meta.json
    checkpoints: Path | None = None  # finished folds (and a killed fold's training state) until the point is done
    features: Path | None = None  # the frozen-feature cache of linear probes
    run: Path | None = None  # how the run went (seconds): DVC metrics of their own


def outputs_for(n: int, variant: str) -> ScarcityOutputs:
    name = f"n{n}-{variant}"
    return ScarcityOutputs(paths.scarcity_dir(n, variant), paths.CHECKPOINTS / "scarcity" / name,
                           paths.FEATURE_CACHE, paths.run_facts(paths.SCARCITY_REPORTS, name))




# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def run(params: ScarcityParams, finetune: FinetuneParams, variant: Variant, n: int, inputs: ScarcityInputs,
        outputs: ScarcityOutputs) -> dict:
    """Cross-validate `variant` on `n` drawn images per class; write predictions and meta; return the meta."""
    collected = load_collected(inputs.collected)
    meta: dict = {"images_per_class": n, "variant": asdict(variant), "classes": len(collected.classes)}
    try:
        drawn = draw(collected, params, n)
    except NotEnoughImages as why:
        meta["not_run"] = str(why)
        log.warning("scarcity: %d images per class not run: %s", n, why)
        _write(outputs, meta, None)
        return meta
    point = Point(finetune, variant, collected, drawn, inputs.policy, outputs.checkpoints, outputs.features,
                  pick_device(finetune.device))
    repeats, folds = collected.repeats, collected.folds
    oof = np.full((len(repeats), len(drawn.train), len(collected.classes)), np.nan, dtype=np.float32)
    test_probs = np.zeros((len(repeats), len(folds), len(drawn.test), len(collected.classes)), dtype=np.float32)
    seconds = []
    for r in repeats:
        for k in folds:
            result = train_fold(point, r, k)
            oof[r, drawn.folds[r] == k] = result["val_probs"]
            test_probs[r, k] = result["test_probs"]
            seconds.append(float(result["seconds"]))
    targets = collected.manifest.target.to_numpy()
    meta.update({"train_images": len(drawn.train), "test_images": len(drawn.test),
                 "from_pool": int((collected.manifest.split.to_numpy()[drawn.train] != LABELLED).sum()),
                 "train_seconds": round(sum(seconds), 2), "device": str(point.device),
                 "oof_accuracy": float(np.mean(oof.argmax(-1) == targets[drawn.train]))})
    _write(outputs, meta, {"train_index": drawn.train, "folds": drawn.folds, "oof_probs": oof,
                                  "test_index": drawn.test, "test_probs": test_probs})
    if outputs.checkpoints is not None and outputs.checkpoints.exists():
        shutil.rmtree(outputs.checkpoints)
    log.info("scarcity: %s at %d images per class: out-of-fold accuracy %.3f (%.1fs training)",
             variant.backbone, n, meta["oof_accuracy"], meta["train_seconds"])
    return meta


def _write(outputs: ScarcityOutputs, meta: dict, arrays: dict[str, np.ndarray] | None) -> None:
    same, run = atomic.split_run_facts(meta)
    if outputs.run is not None:
        atomic.write_json(outputs.run, run)
    with atomic.atomic_dir(outputs.folder) as tmp:
        if arrays is not None:
            np.savez_compressed(tmp / paths.PREDICTIONS_FILE, **arrays)
        atomic.write_json(tmp / "meta.json", same)


def main(argv: list[str] | None = None) -> None:
    args, params = stage_args(__doc__, argv, PARAMS, variant=True, images_per_class=True)
    if args.variant not in params.scarcity.variants:
        raise PipelineError(f"--variant {args.variant!r} is not in params `scarcity.variants` "
                            f"({', '.join(params.scarcity.variants)})")
    inputs = ScarcityInputs(paths.COLLECTED, paths.AUGMENT / paths.POLICY_FILE)
    run(params.scarcity, params.finetune, params.variants[args.variant], args.images_per_class, inputs,
        outputs_for(args.images_per_class, args.variant))


if __name__ == "__main__":
    cli(main)
