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

import dataclasses
import hashlib
import io
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import atomic, paths
from pipeline.errors import PipelineError
from pipeline.images import LABELLED, Collected, load_collected
from pipeline.learners import Job, Workspace, real_training_set, train
from pipeline.params import FinetuneParams, ScarcityParams, Variant
from pipeline.runtime import World, cli, pick_device, seed_everything, stage_args
from pipeline.sources import BUNDLED

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScarcityInputs:
    collected: Path  # collect's output folder
    policy: Path  # augment's policy.json (read only when the variant augments)


@dataclass(frozen=True)
class ScarcityOutputs:
    folder: Path  # predictions.npz, meta.json
    checkpoints: Path | None = None  # finished folds (and a killed fold's training state) until the point is done
    features: Path | None = None  # the frozen-feature cache of linear probes


def outputs_for(n: int, variant: str) -> ScarcityOutputs:
    return ScarcityOutputs(paths.scarcity_dir(n, variant), paths.CHECKPOINTS / "scarcity" / f"n{n}-{variant}",
                           paths.FEATURE_CACHE)


@dataclass(frozen=True)
class Draw:
    train: np.ndarray  # manifest indices of the drawn images, n per class
    folds: np.ndarray  # repeats x drawn images: each image's validation fold in that repeat
    test: np.ndarray  # manifest indices of the fixed test set


class NotEnoughImages(Exception):
    """A point asks for more images of a class than the data has."""


# --------------------------------------------------------------------------------------------------
# The draw
# --------------------------------------------------------------------------------------------------


def test_and_pool(collected: Collected, params: ScarcityParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(test rows, drawable external rows): `holdout` external images (0 = all of them) drawn first; a bundled
    dataset's other external images may be drawn for training, unless they are near-duplicates of a test image."""
    external = collected.external
    rng = np.random.default_rng(params.seed)
    if params.holdout and params.holdout < len(external):
        test = external.iloc[np.sort(rng.choice(len(external), params.holdout, replace=False))]
    else:
        test = external
    rest = external.drop(test.index)
    pool = rest[rest.source.isin(set(BUNDLED)) & ~rest.group.isin(set(test.group))]
    return test, pool


def class_orders(collected: Collected, pool: pd.DataFrame, seed: int) -> dict[int, np.ndarray]:
    """Per class, the order in which images are drawn: labelled ones first, then the pool, each seeded-shuffled."""
    rng = np.random.default_rng(seed + 1)
    targets = collected.manifest.target.to_numpy()
    sources = [rows["index"].to_numpy() for rows in (collected.labelled, pool)]
    return {target: np.concatenate([rng.permutation(p[targets[p] == target]) for p in sources])
            for target in range(len(collected.classes))}


def assign_folds(collected: Collected, train: np.ndarray, seed: int) -> np.ndarray:
    """repeats x images: stratified, group-aware k-fold with collect's k and repeats (repeat r shuffles with
    seed + 1000 r, as collect does)."""
    from sklearn.model_selection import StratifiedGroupKFold

    rows = collected.manifest.iloc[train]
    k = len(collected.folds)
    folds = np.full((len(collected.repeats), len(train)), -1, dtype=np.int64)
    for r in collected.repeats:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + 1000 * r)
        for fold, (_, val) in enumerate(splitter.split(np.zeros(len(rows)), rows.target, rows.group)):
            folds[r, val] = fold
    if (folds < 0).any() or any(len(np.unique(f)) < k for f in folds):
        raise NotEnoughImages(f"near-duplicate groups leave fewer than {k} folds with images")
    return folds


def draw(collected: Collected, params: ScarcityParams, n: int) -> Draw:
    if n < len(collected.folds):
        raise NotEnoughImages(f"{n} images per class cannot give each of the {len(collected.folds)} folds one")
    test, pool = test_and_pool(collected, params)
    orders = class_orders(collected, pool, params.seed)
    short = {collected.classes[t]: len(order) for t, order in orders.items() if len(order) < n}
    if short:
        name, have = min(short.items(), key=lambda kv: kv[1])
        raise NotEnoughImages(f"class {name!r} has {have} images to draw from, fewer than {n}")
    train = np.sort(np.concatenate([order[:n] for order in orders.values()]))
    return Draw(train, assign_folds(collected, train, params.seed), test["index"].to_numpy())


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One point x variant: what every fold shares."""

    finetune: FinetuneParams
    variant: Variant
    collected: Collected
    draw: Draw
    inputs: ScarcityInputs
    outputs: ScarcityOutputs
    device: torch.device


def fold_key(point: Point, repeat: int, fold: int) -> str:
    """What a kept fold must match to be reused: the settings and exactly which images it trained on."""
    digest = hashlib.sha256(json.dumps([asdict(point.finetune), asdict(point.variant), repeat, fold,
                                        point.device.type], sort_keys=True).encode())
    for array in (point.draw.train, point.draw.folds[repeat], point.draw.test):
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def train_fold(point: Point, repeat: int, fold: int) -> dict[str, np.ndarray]:
    """Train on the drawn images outside `fold`; probabilities for those inside it and for the test set."""
    kept = point.outputs.checkpoints / f"r{repeat}-fold{fold}.npz" if point.outputs.checkpoints else None
    key = fold_key(point, repeat, fold)
    if kept is not None and kept.exists():
        with np.load(kept) as done:
            if str(done["key"]) == key:
                return {name: done[name] for name in ("val_probs", "test_probs", "seconds")}
    seed = point.finetune.seed + fold + 1000 * repeat
    seed_everything(seed)
    params = dataclasses.replace(point.finetune, seed=seed)
    collected, in_fold = point.collected, point.draw.folds[repeat] == fold
    images, targets = collected.images[point.draw.train], collected.manifest.target.to_numpy()[point.draw.train]
    groups = collected.manifest.group.to_numpy()[point.draw.train]
    data = real_training_set(images[~in_fold], targets[~in_fold], groups[~in_fold], params, point.variant, seed)
    held_out = (images[in_fold], collected.images[point.draw.test])
    workspace = Workspace(None, kept.with_suffix("") if kept else None, point.outputs.features)
    job = Job(params, point.variant, data, held_out, len(collected.classes), point.inputs.policy, workspace,
              point.device, World())
    outcome = train(job)
    result = {"val_probs": outcome.probs[0], "test_probs": outcome.probs[1],
              "seconds": np.float64(outcome.meta["train_seconds"])}
    if kept is not None:
        buffer = io.BytesIO()
        np.savez(buffer, key=key, **result)
        atomic.write_bytes(kept, buffer.getvalue())
    return result


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
        _write(outputs.folder, meta, None)
        return meta
    point = Point(finetune, variant, collected, drawn, inputs, outputs, pick_device(finetune.device))
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
    _write(outputs.folder, meta, {"train_index": drawn.train, "folds": drawn.folds, "oof_probs": oof,
                                  "test_index": drawn.test, "test_probs": test_probs})
    if outputs.checkpoints is not None and outputs.checkpoints.exists():
        shutil.rmtree(outputs.checkpoints)
    log.info("scarcity: %s at %d images per class: out-of-fold accuracy %.3f (%.1fs training)",
             variant.backbone, n, meta["oof_accuracy"], meta["train_seconds"])
    return meta


def _write(folder: Path, meta: dict, arrays: dict[str, np.ndarray] | None) -> None:
    with atomic.atomic_dir(folder) as tmp:
        if arrays is not None:
            np.savez_compressed(tmp / paths.PREDICTIONS_FILE, **arrays)
        atomic.write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args, params = stage_args(__doc__, argv, variant=True, images_per_class=True)
    if args.variant not in params.scarcity.variants:
        raise PipelineError(f"--variant {args.variant!r} is not in params `scarcity.variants` "
                            f"({', '.join(params.scarcity.variants)})")
    inputs = ScarcityInputs(paths.COLLECTED, paths.AUGMENT / paths.POLICY_FILE)
    run(params.scarcity, params.finetune, params.variants[args.variant], args.images_per_class, inputs,
        outputs_for(args.images_per_class, args.variant))


if __name__ == "__main__":
    cli(main)
