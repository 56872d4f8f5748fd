"""Training one point of the label-scarcity curve fold by fold, exactly as finetune trains, keeping finished folds
so a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.collected import Collected
from pipeline.data.draws import Draw
from pipeline.runtime import atomic
from pipeline.runtime.compute import World, seed_everything
from pipeline.runtime.fingerprint import fingerprint
from pipeline.runtime.params import FinetuneParams, Variant
from pipeline.training.backbones import weights_source
from pipeline.training.learners import Job, Workspace, real_training_set, train


@dataclass(frozen=True)
class Point:
    """One point x variant: what every fold shares."""

    finetune: FinetuneParams
    variant: Variant
    collected: Collected
    draw: Draw
    policy: Path  # augment's policy.json (read only when the variant augments)
    kept: Path | None  # finished folds (and a killed fold's training state) until the point is done
    features: Path | None  # the frozen-feature cache of linear probes
    device: torch.device


def fold_key(point: Point, repeat: int, fold: int) -> str:
    """What a kept fold must match to be reused (pipeline/runtime/fingerprint.py): the settings, exactly which
    images it trained and was tested on (their pixels, classes and near-duplicate groups too), the augmentation
    policy's contents when the variant augments, the starting weights' contents, the device and its precision, and
    the library versions."""
    draw, manifest = point.draw, point.collected.manifest
    rows = np.concatenate([draw.train, draw.test])
    data = (draw.train, draw.folds[repeat], draw.test, point.collected.images[rows], manifest.target.to_numpy()[rows],
            manifest.group.to_numpy()[rows])
    variant = point.variant
    return fingerprint(data=data, params=[point.finetune, variant, repeat, fold],
                       policy=point.policy if variant.augment else None,
                       weights=weights_source(variant.backbone, variant.weights), device=point.device)


def train_fold(point: Point, repeat: int, fold: int) -> dict[str, np.ndarray]:
    """Train on the drawn images outside `fold`; probabilities for those inside it and for the test set."""
    kept = point.kept / f"r{repeat}-fold{fold}.npz" if point.kept else None
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
    workspace = Workspace(None, kept.with_suffix("") if kept else None, point.features)
    job = Job(params, point.variant, data, held_out, len(collected.classes), point.policy, workspace,
              point.device, World())
    outcome = train(job)
    result = {"val_probs": outcome.probs[0], "test_probs": outcome.probs[1],
              "seconds": np.float64(outcome.meta["train_seconds"])}
    if kept is not None:
        buffer = io.BytesIO()
        np.savez(buffer, key=key, **result)
        atomic.write_bytes(kept, buffer.getvalue())
    return result
