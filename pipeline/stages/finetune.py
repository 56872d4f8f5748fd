"""Stage 4, finetune: one fold x one variant. Train the variant's model on the fold's training images (plus the
augmentation policy and the fold's GAN samples when the variant asks), then write class probabilities for the
fold's validation images and for the external test set.

How a variant learns (`full` fine-tuning, `partial` or a `linear_probe`) is in pipeline/training/learners.py.

Writes `predictions.npz`, `history.json` and `meta.json` into data/finetune/rR-foldK-V/, and the training curves
with dvclive into reports/finetune/rR-foldK-V/ (DVC plots). Runs data-parallel under torchrun with the same
command: `torchrun --nproc_per_node N -m pipeline.stages.finetune --fold K --variant V`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.collected import Collected, load_collected
from pipeline.runtime import atomic, paths
from pipeline.runtime.cli import cli, stage_args
from pipeline.runtime.compute import World, leave_process_group, pick_device, seed_everything, torchrun_world
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.params import FinetuneParams, Variant
from pipeline.training.learners import Job, Workspace, live_log, real_training_set, train, with_pool
from pipeline.training.loop import TrainingSet

log = logging.getLogger(__name__)
# The params sections this stage reads; dvc.yaml lists the same (a test checks both).
PARAMS = ("finetune", "variants")


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


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def load_synthetic(inputs: FinetuneInputs, fold: int,
                   like: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The fold's accepted GAN samples, their classes and the sample filter's confidence in those classes
    (None when the samples file has none)."""
    try:
        with np.load(inputs.synthetic / paths.SAMPLES_FILE) as data:
            fake, labels = data["images"], data["labels"].astype(np.int64)
            scores = data["scores"] if "scores" in data.files else None  # samples written before scores were kept
    except FileNotFoundError:
        raise PipelineError(f"{inputs.synthetic}: no GAN samples for fold {fold}; run `dvc repro synthesize`") from None
    if fake.shape[1:] != like.shape[1:]:
        raise PipelineError(f"GAN samples are {fake.shape[1:]} but the data is {like.shape[1:]}; "
                            "re-run `dvc repro synthesize`")
    return fake, labels, None if scores is None else scores.astype(np.float32)


def training_set(collected: Collected, inputs: FinetuneInputs, fold: int, repeat: int, variant: Variant,
                 params: FinetuneParams, seed: int) -> TrainingSet:
    rows = collected.fold_split(fold, repeat)[0]
    images, targets = collected.select(rows)
    data = real_training_set(images, targets, rows["group"].to_numpy(), params, variant, seed)
    if variant.synthetic:
        fake, fake_targets, confidence = load_synthetic(inputs, fold, images)
        data = dataclasses.replace(data, synthetic=fake, synthetic_targets=fake_targets,
                                   synthetic_confidence=confidence)
    if variant.unlabelled:
        data = with_pool(data, collected, fold, repeat)
    return data


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
    pool_rows = collected.unlabelled  # every variant predicts the whole pool, for "what to label next"
    held_out = (val_images, collected.select(external_rows)[0], collected.select(pool_rows)[0])
    workspace = Workspace(out.live, out.checkpoints, out.features)
    job = Job(params, variant, data, held_out, len(collected.classes), inputs.policy, workspace, device, world)
    outcome = train(job)
    leave_process_group()  # the rest is the main process's alone
    if outcome is None:
        return {}
    meta = {"repeat": repeat, "fold": fold, "variant": asdict(variant), "device": str(device),
            "processes": world.size, "train_real": len(data.images), "train_synthetic": len(data.synthetic),
            "train_unlabelled": len(data.unlabelled) if data.semi_supervised else 0,
            "inner_validation": len(data.inner), **outcome.meta,
            "val_accuracy": float((outcome.probs[0].argmax(1) == val_targets).mean())}
    same, run = atomic.split_run_facts(meta)
    with atomic.atomic_dir(out.folder) as tmp:
        np.savez_compressed(tmp / paths.PREDICTIONS_FILE, val_index=val_rows["index"].to_numpy(),
                            val_probs=outcome.probs[0], test_index=external_rows["index"].to_numpy(),
                            test_probs=outcome.probs[1], pool_index=pool_rows["index"].to_numpy(),
                            pool_probs=outcome.probs[2])
        atomic.write_json(tmp / "history.json", outcome.history, indent=1)
        atomic.write_json(tmp / "meta.json", same)
    atomic.write_json(paths.run_facts(out.live.parent, out.live.name), run)
    if variant.strategy != "full":  # one point, so DVC finds the declared curves for every variant
        with live_log(out.live, True) as on_epoch:
            for record in outcome.history:
                on_epoch(record)
    log.info("finetune repeat %d fold %d (%s, %s): %d real + %d synthetic images, %.1fs training, validation "
             "accuracy %.3f", repeat, fold, variant.backbone, variant.strategy, len(data.images), len(data.synthetic),
             meta["train_seconds"], meta["val_accuracy"])
    return meta


def main(argv: list[str] | None = None) -> None:
    args, params = stage_args(__doc__, argv, PARAMS, fold=True, variant=True)
    if args.variant not in params.variants:
        raise PipelineError(f"--variant {args.variant!r} is not in params `variants` ({', '.join(params.variants)})")
    inputs = FinetuneInputs(paths.COLLECTED, paths.AUGMENT / paths.POLICY_FILE,
                            paths.synthetic_dir(args.repeat, args.fold))
    world = torchrun_world(params.finetune.device)
    try:
        run(params.finetune, params.variants[args.variant], args.fold, inputs,
            outputs_for(args.repeat, args.fold, args.variant), args.repeat, world)
    finally:
        leave_process_group()  # when run() failed before parting


if __name__ == "__main__":
    cli(main)
