"""How a variant learns from one training set: the strategies (`full` fine-tuning, `partial`, `linear_probe`), shared by the
stages that train variants (finetune: one fold of the ablation; scarcity: the label-scarcity curve).

- `full`: fine-tune every weight (pipeline/training/loop.py): discriminative learning rates, warm-up then cosine
  decay, label smoothing, optional mixup/cutmix and EMA, early stopping on an inner split of the training images
  (never the validation images). Variants with and without GAN samples take the same number of optimiser steps
  (epochs are counted over the real images), so the ablation compares ingredients, not compute.
- `partial`: only the backbone's last stages and the head train, on the frozen trunk's cached outputs
  (pipeline/training/partial.py): fine-tuning at a photo backbone's native size that a CPU can afford.
- `linear_probe`: the backbone stays frozen; its features are computed once and cached on disk
  (data/cache/features), and a logistic regression is fitted on them; with the unlabelled pool, by
  class-balanced self-training (probe.self_train).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline.augmentation.policy import augmented_views, load_policy
from pipeline.data.collected import Collected
from pipeline.runtime.checkpoint import Checkpointing
from pipeline.runtime.compute import World, channels_last
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.fingerprint import fingerprint
from pipeline.runtime.params import FinetuneParams, Variant
from pipeline.training.backbones import Classifier, create_backbone, weights_source
from pipeline.training.loop import FitSetup, TrainingSet, fit, predict
from pipeline.training.partial import partial
from pipeline.training.probe import FeatureCache, ImageFeatures, LinearProbe, self_train


@dataclass(frozen=True)
class Workspace:
    """Where a strategy may write besides its result; None turns a part off."""

    live: Path | None = None  # dvclive's curves and summary (DVC plots and metrics)
    checkpoints: Path | None = None  # where a killed run's state waits to be resumed
    features: Path | None = None  # the frozen-feature cache of linear probes


@dataclass(frozen=True)
class Job:
    """Everything a strategy needs for one fold x variant."""

    params: FinetuneParams
    variant: Variant
    data: TrainingSet
    held_out: tuple[np.ndarray, ...]  # the fold's validation images, the external test images (and the pool)
    classes: int
    policy: Path  # augment's policy.json (read only when the variant augments)
    workspace: Workspace
    device: torch.device
    world: World


@dataclass
class Outcome:
    probs: tuple[np.ndarray, np.ndarray]  # for the validation and the external images
    history: list[dict]
    meta: dict
    model: torch.nn.Module | None = None  # the trained network (a probe folded into one), for the final model


def inner_split(targets: np.ndarray, groups: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, inner) positions: about `share` of the images, stratified by class and keeping near-duplicate
    groups together, so early stopping never scores a copy of a training image."""
    from sklearn.model_selection import StratifiedGroupKFold

    splits = max(2, round(1 / share))
    smallest = int(np.unique(targets, return_counts=True)[1].min()) if len(targets) else 0
    if smallest < splits:
        raise PipelineError(f"finetune.inner_val = {share}: a class has only {smallest} training image(s) in this "
                            f"fold, too few to hold out 1 in {splits} for early stopping; lower inner_val or set it to 0")
    splitter = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
    return next(splitter.split(np.zeros(len(targets)), targets, groups))


def real_training_set(images: np.ndarray, targets: np.ndarray, groups: np.ndarray, params: FinetuneParams,
                      variant: Variant, seed: int) -> TrainingSet:
    """The training set without GAN samples; with `inner_val` (full fine-tuning only) part of it is held out,
    stratified and group-aware, for early stopping."""
    targets = targets.astype(np.int64)
    if params.inner_val > 0 and variant.strategy == "full":
        keep, inner = inner_split(targets, groups, params.inner_val, seed)
        return TrainingSet(images[keep], targets[keep], images[:0], targets[:0], images[inner], targets[inner])
    return TrainingSet(images, targets, images[:0], targets[:0], images[:0], targets[:0])


def with_pool(data: TrainingSet, collected: Collected, fold: int | None, repeat: int = 0) -> TrainingSet:
    """The training set with the pool images this fold may learn from (Collected.pool_for); no pool is an error,
    not a quiet supervised run under a semi-supervised name."""
    pool = collected.pool_for(fold, repeat)
    if pool.empty:
        raise PipelineError("a variant has unlabelled: true but the collected data has no unlabelled images: put "
                            "them in data/raw/unlabelled/ (or CSV rows without a label), or raise "
                            "collect.unlabelled_limit above 0 for a bundled dataset with collect.external_limit set")
    return dataclasses.replace(data, unlabelled=collected.select(pool)[0])


def checkpoint_fingerprint(params: FinetuneParams, variant: Variant, data: TrainingSet, policy: Path, world: World,
                           device: torch.device) -> str:
    """What a checkpoint must match to be resumed (pipeline/runtime/fingerprint.py): the data, every setting that
    shapes training (not the number of DataLoader workers, which changes nothing, nor `checkpoint_every`), the
    augmentation policy's contents when the variant augments (a resumed run must not mix two policies), the
    starting weights' contents, the processes, the device and its precision, and the library versions."""
    shaping = {k: v for k, v in asdict(params).items() if k not in ("workers", "checkpoint_every", "compile")}
    arrays = (data.images, data.targets, data.synthetic, data.synthetic_targets, data.inner, data.inner_targets)
    if params.synthetic_soft and data.synthetic_confidence is not None:
        arrays += (data.synthetic_confidence,)  # the soft targets are made of them
    if data.semi_supervised:
        arrays += (data.unlabelled,)
    return fingerprint(data=arrays, params=[shaping, variant, world.size], policy=policy if variant.augment else None,
                       weights=weights_source(variant.backbone, variant.weights), device=device)


LIVE_NAMES = {"loss": "train/loss", "train_accuracy": "train/accuracy", "inner_loss": "inner/loss",
              "inner_accuracy": "inner/accuracy", "lr_body": "lr/body", "lr_head": "lr/head"}  # record -> dvclive


@contextlib.contextmanager
def live_log(folder: Path | None, enabled: bool) -> Iterator[Callable[[dict], None]]:
    """A callback that logs each epoch's record with dvclive into `folder` (metrics.json and plots/metrics/*.tsv,
    declared as DVC metrics and plots); a no-op on non-main processes and without a folder."""
    if not enabled or folder is None:
        yield lambda record: None
        return
    from dvclive import Live

    live = Live(dir=str(folder), save_dvc_exp=False, dvcyaml=None, report=None)

    def log_epoch(record: dict) -> None:
        for key, value in record.items():
            if key in LIVE_NAMES:
                live.log_metric(LIVE_NAMES[key], value)
        live.next_step()
    try:
        yield log_epoch
    finally:
        live.end()


def full(job: Job) -> Outcome | None:
    params, variant, device, world = job.params, job.variant, job.device, job.world
    model = channels_last(Classifier(create_backbone(variant.backbone, variant.weights), num_classes=job.classes,
                                     input_size=variant.input_size).to(device))
    if device.type == "cuda" and world.size > 1:  # batch statistics over the global batch, as one process would
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # compute them
    policy = None
    if variant.augment:
        policy = load_policy(job.policy)
    checkpoint = None
    if job.workspace.checkpoints is not None:
        checkpoint = Checkpointing(job.workspace.checkpoints, params.checkpoint_every,
                                   checkpoint_fingerprint(params, variant, job.data, job.policy, world, device))
    start = time.perf_counter()
    with live_log(job.workspace.live, world.is_main) as on_epoch:
        result = fit(model, job.data, FitSetup(params, variant.epochs, variant.weights != "none", policy, device,
                                               world, checkpoint, on_epoch))
    seconds = time.perf_counter() - start
    if not world.is_main:
        return None
    probs = tuple(predict(result.model, images, device, job.classes) for images in job.held_out)
    epochs, per_epoch = len(result.history), result.steps_per_epoch
    shown = (epochs - result.resumed_from) * per_epoch * params.batch_size  # images this run trained on
    meta = {"epochs_run": epochs, "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
            "resumed_from_epoch": result.resumed_from, "steps": epochs * per_epoch, "train_seconds": round(seconds, 2),
            "train_images_per_second": round(shown / max(seconds, 1e-9), 1)}
    return Outcome(probs, result.history, meta, result.model)


def frozen_training_rows(job: Job, frozen: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A frozen network's outputs for the training images, plus `probe_views` augmented views of each when the
    variant augments, plus the GAN samples: the rows a probe or a partial top trains on, and their targets."""
    params, data = job.params, job.data
    parts = [(frozen(data.images), data.targets)]
    if job.variant.augment:
        views = augmented_views(data.images, load_policy(job.policy), params.probe_views, params.seed)
        parts.append((frozen(views), np.tile(data.targets, params.probe_views)))
    if len(data.synthetic):
        parts.append((frozen(data.synthetic), data.synthetic_targets))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def linear_probe(job: Job) -> Outcome | None:
    if not job.world.is_main:
        return None  # nothing to share out: one process fits it in seconds
    params, variant = job.params, job.variant
    start = time.perf_counter()
    features = FeatureCache(ImageFeatures(variant.backbone, variant.input_size, job.device, variant.weights),
                            job.workspace.features)
    train_x, train_y = frozen_training_rows(job, features)

    def fit(rows: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> LinearProbe:
        return LinearProbe(params.probe_c, job.classes, job.device,
                           per_feature=params.probe_scale == "feature").fit(rows, targets, weights)
    rounds = []
    if job.data.semi_supervised:  # a pool image weighs as much as a labelled image with its augmented views
        per_image = 1 + params.probe_views if job.variant.augment else 1
        probe, rounds = self_train(fit, train_x, train_y, features(job.data.unlabelled), params.self_training_rounds,
                                   params.self_training_share, params.unlabelled_weight * per_image)
    else:
        probe = fit(train_x, train_y, np.ones(len(train_x)))
    seconds = time.perf_counter() - start
    probs = tuple(probe.predict_proba(features(images)) for images in job.held_out)
    history = [{"epoch": 1, "train_accuracy": float((probe.predict_proba(train_x).argmax(1) == train_y).mean())}]
    meta = {"train_seconds": round(seconds, 2), "probe_features": int(train_x.shape[1]),
            "probe_training_rows": len(train_x), "feature_cache_hits": features.hits,
            "feature_cache_misses": features.misses}
    if rounds:
        meta["self_training"] = rounds
    return Outcome(probs, history, meta, probe_as_classifier(features.extract, probe, job.classes))


@torch.no_grad()
def probe_as_classifier(extract: ImageFeatures, probe: LinearProbe, classes: int) -> Classifier:
    """The frozen backbone and the probe as one network (the standardisation folded into the head), so the final
    model and its exports need no separate scaler."""
    frozen = extract.model
    model = Classifier(create_backbone(frozen.backbone.default_cfg["architecture"], "none"), num_classes=classes,
                       input_size=frozen.input_size)
    model.backbone.load_state_dict(frozen.backbone.state_dict(), strict=False)  # all but the new head
    model.mean.copy_(frozen.mean)
    model.std.copy_(frozen.std)
    probe.fold_into(model.backbone.get_classifier())
    return model.eval()


STRATEGIES: dict[str, Callable[[Job], Outcome | None]] = {"full": full, "partial": partial,
                                                          "linear_probe": linear_probe}


def train(job: Job) -> Outcome | None:
    """Run the variant's strategy; None on the non-main processes of a torchrun."""
    return STRATEGIES[job.variant.strategy](job)

