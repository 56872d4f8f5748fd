"""Stage 4, finetune: one fold x one variant. Train the variant's model on the fold's training images (plus the
augmentation policy and the fold's GAN samples when the variant asks), then write class probabilities for the
fold's validation images and for the external test set.

Strategies (a variant's `strategy`):
- `full`: fine-tune every weight (pipeline/training.py): discriminative learning rates, warm-up then cosine
  decay, label smoothing, optional mixup/cutmix and EMA, early stopping on an inner split of the fold's
  training images (never its validation images). Variants with and without GAN samples take the same number of
  optimiser steps (epochs are counted over the real images), so the ablation compares ingredients, not compute.
- `linear_probe`: the backbone stays frozen; its features are computed once and cached on disk
  (data/cache/features), and a logistic regression is fitted on them.

Writes `predictions.npz`, `history.json` and `meta.json` into data/finetune/rR-foldK-V/, and the training curves
with dvclive into reports/finetune/rR-foldK-V/ (DVC plots). Runs data-parallel under torchrun with the same
command: `torchrun --nproc_per_node N -m pipeline.finetune --fold K --variant V`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline import atomic, paths
from pipeline.augmentations import augment_seeded, load_policy
from pipeline.backbones import Classifier, create_backbone
from pipeline.errors import PipelineError
from pipeline.features import FeatureCache, ImageFeatures, LinearProbe
from pipeline.images import Collected, load_collected
from pipeline.params import FinetuneParams, Variant
from pipeline.runtime import (Checkpointing, World, cli, leave_process_group, pick_device, seed_everything, stage_args,
                              torchrun_world)
from pipeline.training import FitSetup, TrainingSet, fit, predict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneInputs:
    collected: Path  # collect's output folder
    policy: Path  # augment's policy.json (read only when the variant augments)
    synthetic: Path  # synthesize's folder for this fold (read only when the variant uses synthetic data)


@dataclass(frozen=True)
class FinetuneOutputs:
    folder: Path  # predictions.npz, history.json, meta.json
    live: Path  # dvclive's curves and summary (DVC plots and metrics)
    checkpoints: Path | None = None  # where a killed run's state waits to be resumed
    features: Path | None = None  # the frozen-feature cache of linear probes


def outputs_for(repeat: int, fold: int, variant: str) -> FinetuneOutputs:
    name = f"{paths.split_name(repeat, fold)}-{variant}"
    return FinetuneOutputs(paths.finetune_dir(repeat, fold, variant), paths.FINETUNE_REPORTS / name,
                           paths.CHECKPOINTS / "finetune" / name, paths.FEATURE_CACHE)


@dataclass(frozen=True)
class Job:
    """Everything a strategy needs for one fold x variant."""

    params: FinetuneParams
    variant: Variant
    data: TrainingSet
    held_out: tuple[np.ndarray, np.ndarray]  # the fold's validation images, the external test images
    classes: int
    inputs: FinetuneInputs
    outputs: FinetuneOutputs
    device: torch.device
    world: World


@dataclass
class Outcome:
    probs: tuple[np.ndarray, np.ndarray]  # for the validation and the external images
    history: list[dict]
    meta: dict


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def load_synthetic(inputs: FinetuneInputs, fold: int, like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(inputs.synthetic / paths.SAMPLES_FILE) as data:
            fake, labels = data["images"], data["labels"].astype(np.int64)
    except FileNotFoundError:
        raise PipelineError(f"{inputs.synthetic}: no GAN samples for fold {fold}; run `dvc repro synthesize`") from None
    if fake.shape[1:] != like.shape[1:]:
        raise PipelineError(f"GAN samples are {fake.shape[1:]} but the data is {like.shape[1:]}; "
                            "re-run `dvc repro synthesize`")
    return fake, labels


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


def training_set(collected: Collected, inputs: FinetuneInputs, fold: int, repeat: int, variant: Variant,
                 params: FinetuneParams, seed: int) -> TrainingSet:
    rows = collected.fold_split(fold, repeat)[0]
    images, targets = collected.select(rows)
    targets = targets.astype(np.int64)
    if params.inner_val > 0 and variant.strategy == "full":
        keep, inner = inner_split(targets, rows["group"].to_numpy(), params.inner_val, seed)
        images, targets, inner_images, inner_targets = images[keep], targets[keep], images[inner], targets[inner]
    else:
        inner_images, inner_targets = images[:0], targets[:0]
    fake, fake_targets = (load_synthetic(inputs, fold, images) if variant.synthetic
                          else (images[:0], targets[:0]))
    return TrainingSet(images, targets, fake, fake_targets, inner_images, inner_targets)


def fingerprint(params: FinetuneParams, variant: Variant, data: TrainingSet, world: World, device: torch.device) -> str:
    """What a checkpoint must match to be resumed: the data, every setting that shapes training (not the number of
    DataLoader workers, which changes nothing, nor `checkpoint_every`), the processes and the device type."""
    digest = hashlib.sha256()
    shaping = {k: v for k, v in asdict(params).items() if k not in ("workers", "checkpoint_every", "compile")}
    digest.update(json.dumps([shaping, asdict(variant), world.size, device.type], sort_keys=True).encode())
    for array in (data.images, data.targets, data.synthetic, data.synthetic_targets, data.inner, data.inner_targets):
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------


LIVE_NAMES = {"loss": "train/loss", "train_accuracy": "train/accuracy", "inner_loss": "inner/loss",
              "inner_accuracy": "inner/accuracy", "lr_body": "lr/body", "lr_head": "lr/head"}  # record -> dvclive


@contextlib.contextmanager
def live_log(folder: Path, enabled: bool) -> Iterator[Callable[[dict], None]]:
    """A callback that logs each epoch's record with dvclive into `folder` (metrics.json and plots/metrics/*.tsv,
    declared as DVC metrics and plots); a no-op on non-main processes."""
    if not enabled:
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
    model = Classifier(create_backbone(variant.backbone, variant.weights), num_classes=job.classes,
                       input_size=variant.input_size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if world.size > 1:  # batch statistics over the global batch, as one process would compute them
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    policy = None
    if variant.augment:
        policy = load_policy(job.inputs.policy)
    checkpoint = None
    if job.outputs.checkpoints is not None:
        checkpoint = Checkpointing(job.outputs.checkpoints, params.checkpoint_every,
                                   fingerprint(params, variant, job.data, world, device))
    start = time.perf_counter()
    with live_log(job.outputs.live, world.is_main) as on_epoch:
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
    return Outcome(probs, result.history, meta)


def augmented_views(images: np.ndarray, policy, views: int, seed: int) -> np.ndarray:
    """`views` augmented copies of every image, each drawn with its own seed (view-major)."""
    out = [augment_seeded(policy, image, seed * 7919 + view * len(images) + i)
           for view in range(views) for i, image in enumerate(images)]
    return np.stack(out) if out else images[:0]


def linear_probe(job: Job) -> Outcome | None:
    if not job.world.is_main:
        return None  # nothing to share out: one process fits it in seconds
    params, variant, data = job.params, job.variant, job.data
    start = time.perf_counter()
    features = FeatureCache(ImageFeatures(variant.backbone, variant.input_size, job.device, variant.weights),
                            job.outputs.features)
    parts = [(features(data.images), data.targets)]
    if variant.augment:
        views = augmented_views(data.images, load_policy(job.inputs.policy), params.probe_views, params.seed)
        parts.append((features(views), np.tile(data.targets, params.probe_views)))
    if len(data.synthetic):
        parts.append((features(data.synthetic), data.synthetic_targets))
    train_x, train_y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    probe = LinearProbe(params.probe_c, job.classes, job.device).fit(train_x, train_y)
    seconds = time.perf_counter() - start
    probs = tuple(probe.predict_proba(features(images)) for images in job.held_out)
    history = [{"epoch": 1, "train_accuracy": float((probe.predict_proba(train_x).argmax(1) == train_y).mean())}]
    meta = {"train_seconds": round(seconds, 2), "probe_features": int(train_x.shape[1]),
            "probe_training_rows": len(train_x), "feature_cache_hits": features.hits,
            "feature_cache_misses": features.misses}
    return Outcome(probs, history, meta)


STRATEGIES: dict[str, Callable[[Job], Outcome | None]] = {"full": full, "linear_probe": linear_probe}


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def run(params: FinetuneParams, variant: Variant, fold: int, inputs: FinetuneInputs,
        output: Path | FinetuneOutputs, repeat: int = 0, world: World = World()) -> dict:
    """Train one fold (of one repeat) x variant; write its outputs; return meta.json's content (empty on the
    non-main processes of a torchrun)."""
    out = output if isinstance(output, FinetuneOutputs) else FinetuneOutputs(Path(output),
                                                                            Path(output).parent / "live")
    seed = params.seed + fold + 1000 * repeat
    seed_everything(seed)
    params = dataclasses.replace(params, seed=seed)
    device = pick_device(params.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # torchrun: this process's own GPU
    collected = load_collected(inputs.collected)
    data = training_set(collected, inputs, fold, repeat, variant, params, seed)
    val_rows, external_rows = collected.fold_split(fold, repeat)[1], collected.external
    val_images, val_targets = collected.select(val_rows)
    held_out = (val_images, collected.select(external_rows)[0])
    job = Job(params, variant, data, held_out, len(collected.classes), inputs, out, device, world)
    outcome = STRATEGIES[variant.strategy](job)
    leave_process_group()  # the rest is the main process's alone
    if outcome is None:
        return {}
    meta = {"repeat": repeat, "fold": fold, "variant": asdict(variant), "device": str(device),
            "processes": world.size, "train_real": len(data.images), "train_synthetic": len(data.synthetic),
            "inner_validation": len(data.inner), **outcome.meta,
            "val_accuracy": float((outcome.probs[0].argmax(1) == val_targets).mean())}
    with atomic.atomic_dir(out.folder) as tmp:
        np.savez_compressed(tmp / paths.PREDICTIONS_FILE, val_index=val_rows["index"].to_numpy(),
                            val_probs=outcome.probs[0], test_index=external_rows["index"].to_numpy(),
                            test_probs=outcome.probs[1])
        atomic.write_text(tmp / "history.json", json.dumps(outcome.history, indent=1) + "\n")
        atomic.write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
    if variant.strategy != "full":  # one point, so DVC finds the declared curves for every variant
        with live_log(out.live, True) as on_epoch:
            for record in outcome.history:
                on_epoch(record)
    log.info("finetune repeat %d fold %d (%s, %s): %d real + %d synthetic images, %.1fs training, validation "
             "accuracy %.3f", repeat, fold, variant.backbone, variant.strategy, len(data.images), len(data.synthetic),
             meta["train_seconds"], meta["val_accuracy"])
    return meta


def main(argv: list[str] | None = None) -> None:
    args, params = stage_args(__doc__, argv, fold=True, variant=True)
    if args.variant not in params.variants:
        raise PipelineError(f"--variant {args.variant!r} is not in params `variants` ({', '.join(params.variants)})")
    inputs = FinetuneInputs(paths.COLLECTED, paths.AUGMENT / paths.POLICY_FILE,
                            paths.synthetic_dir(args.repeat, args.fold))
    world = torchrun_world()
    try:
        run(params.finetune, params.variants[args.variant], args.fold, inputs,
            outputs_for(args.repeat, args.fold, args.variant), args.repeat, world)
    finally:
        leave_process_group()  # when run() failed before parting


if __name__ == "__main__":
    cli(main)
