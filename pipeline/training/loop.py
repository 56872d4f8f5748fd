"""The fine-tuning engine: batches planned ahead, augmentation in DataLoader workers, discriminative learning
rates with warm-up and cosine decay, label smoothing, optional mixup/cutmix and EMA, early stopping on an inner
split, safetensors checkpoints with exact resume, and data-parallel training under torchrun.

Reproducibility rests on one idea: every batch, and every augmentation of every image in it, is a pure function
of (seed, epoch, position). So the same params give the same model whatever the number of DataLoader workers,
a run resumed from a checkpoint continues exactly as if it had never stopped, and under torchrun each process
takes its slice of the very batch one process would have used.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.augmentation.policy import augment_seeded
from pipeline.runtime.checkpoint import (
    Checkpointing,
    Saved,
    load_checkpoint,
    module_state,
    optimizer_parts,
    optimizer_state,
    random_parts,
    random_state,
    restore_random,
    save_checkpoint,
)
from pipeline.runtime.compute import (
    World,
    autocast,
    batch_statistics,
    channels_last,
    random_states,
    recalibrating_batch_norm,
)
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.params import FinetuneParams
from pipeline.runtime.progress import Progress
from pipeline.training.backbones import Classifier
from pipeline.training.semi import FixMatch

log = logging.getLogger(__name__)
EVAL_BATCH = 256
CHECKPOINT_FILE = "checkpoint.safetensors"


# --------------------------------------------------------------------------------------------------
# Data: what each step's batch holds, and the images themselves
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSet:
    images: np.ndarray  # real training images, uint8 N x H x W x C
    targets: np.ndarray  # their class ids
    synthetic: np.ndarray  # GAN samples (0 rows when the variant uses none)
    synthetic_targets: np.ndarray
    inner: np.ndarray  # held out from `images` for early stopping (0 rows: no early stopping)
    inner_targets: np.ndarray
    synthetic_confidence: np.ndarray | None = None  # the sample filter's confidence in each GAN sample's class
    unlabelled: np.ndarray | None = None  # the pool a semi-supervised variant learns from (pipeline/training/semi.py)

    @property
    def semi_supervised(self) -> bool:
        return self.unlabelled is not None and len(self.unlabelled) > 0

    @property
    def all_images(self) -> np.ndarray:
        return np.concatenate([self.images, self.synthetic]) if len(self.synthetic) else self.images

    @property
    def all_targets(self) -> np.ndarray:
        return np.concatenate([self.targets, self.synthetic_targets]).astype(np.int64)


class BatchPlan:
    """Which images make up every step's batch: real images cycle in random order, GAN samples (if any) fill
    `synthetic_share` of each batch, positions are shuffled, and each position gets its own augmentation seed.
    An epoch is ceil(real images / batch) steps whatever the synthetic share, so variants with and without GAN
    samples take the same number of optimiser steps."""

    def __init__(self, *, real: int, synthetic: int, batch: int, synthetic_share: float, seed: int, world: World):
        if batch % world.size:
            raise PipelineError(f"finetune.batch_size ({batch}) must divide evenly over the {world.size} "
                                "processes of this torchrun")
        self.real, self.synthetic, self.batch, self.seed, self.world = real, synthetic, batch, seed, world
        self.fake_per_batch = min(batch - 1, round(synthetic_share * batch)) if synthetic else 0
        self.steps_per_epoch = math.ceil(real / batch)

    def _stream(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """`length` indices below n: whole random permutations one after another, so every image comes up."""
        rounds = math.ceil(length / n) if length else 0
        parts = [torch.randperm(n, generator=generator) for _ in range(rounds)]
        return torch.cat(parts)[:length] if parts else torch.zeros(0, dtype=torch.long)

    def epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This process's (image index, augmentation seed) pairs for every step of `epoch`; synthetic images are
        indexed after the real ones."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        steps, fake = self.steps_per_epoch, self.fake_per_batch
        reals = self._stream(self.real, steps * (self.batch - fake), generator)
        fakes = self._stream(self.synthetic, steps * fake, generator) + self.real
        local = self.batch // self.world.size
        mine = slice(self.world.rank * local, (self.world.rank + 1) * local)
        out = []
        for step in range(steps):
            ids = torch.cat([reals[step * (self.batch - fake):(step + 1) * (self.batch - fake)],
                             fakes[step * fake:(step + 1) * fake]])
            ids = ids[torch.randperm(self.batch, generator=generator)]
            first = ((self.seed * 7919 + epoch) * steps + step) * self.batch
            seeds = range(first, first + self.batch)
            out.append(list(zip(ids[mine].tolist(), list(seeds)[mine])))
        return out


class PlannedBatches(Sampler):
    """The plan's batches for epochs [start, end), for a DataLoader's batch_sampler."""

    def __init__(self, plan: BatchPlan, start: int, end: int):
        self.plan, self.start, self.end = plan, start, end

    def __iter__(self):
        for epoch in range(self.start, self.end):
            yield from self.plan.epoch(epoch)

    def __len__(self) -> int:
        return (self.end - self.start) * self.plan.steps_per_epoch


class AugmentedImages(Dataset):
    """Items are (index, seed): the image, augmented by the policy re-seeded with `seed` (albumentations has its
    own random streams, which global seeds and DataLoader worker seeding do not reach). The DataLoader fetches a
    whole batch at once through __getitems__: one gather and one tensor, not a collate over per-image tensors."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, policy: Any | None):
        self.images, self.targets, self.policy = images, targets, policy

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, items: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's images, targets and indices (GAN samples are indexed after the real images)."""
        indices = np.fromiter((index for index, _ in items), dtype=np.int64, count=len(items))
        if self.policy is None:
            images = self.images[indices]
        else:
            images = np.stack([augment_seeded(self.policy, self.images[index], seed) for index, seed in items])
        return torch.from_numpy(images), torch.from_numpy(self.targets[indices]), torch.from_numpy(indices)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, targets, indices = self.__getitems__([item])
        return images[0], targets[0], indices[0]


def whole_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The DataLoader's collate_fn: __getitems__ already made the batch."""
    return batch


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker distinct numpy and python streams derived from torch's per-worker seed, for
    any third-party code that draws from them (our augmentations are seeded per image)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def to_batch(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 N x H x W x C (moved as bytes: 4x less traffic) -> float N x C x H x W in [0, 1] on `device`,
    channels-last (what the convolution kernels prefer, on the CPU as on CUDA)."""
    return channels_last(images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255))


# --------------------------------------------------------------------------------------------------
# Regularisers: mixup / cutmix, learning-rate schedule
# --------------------------------------------------------------------------------------------------


class MixupCutmix:
    """Batch mixup (Zhang et al. 2018) and cutmix (Yun et al. 2019) with soft targets; when both are on, each
    batch uses one, chosen by a coin. Draws come from its own numpy stream, whose state checkpoints keep."""

    def __init__(self, mixup: float, cutmix: float, seed: int):
        self.mixup, self.cutmix = mixup, cutmix
        self.rng = np.random.default_rng(seed)

    @property
    def enabled(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or self.rng.random() < 0.5)
        lam = float(self.rng.beta(*(2 * [self.cutmix if use_cutmix else self.mixup])))
        perm = torch.from_numpy(self.rng.permutation(len(x))).to(x.device)
        if use_cutmix:
            h, w = x.shape[-2:]
            cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
            cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
            top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            x = x.clone()
            x[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (h * w)  # the share actually kept
        else:
            x = lam * x + (1 - lam) * x[perm]
        return x, lam * targets + (1 - lam) * targets[perm]


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the base rate, then cosine decay to zero."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def two_phase_lr_lambda(total_steps: int, warmup_steps: int, pool_start: int) -> Callable[[int], float]:
    """A semi-supervised variant's schedule: the labelled phase is a whole warm-up and cosine of its own, so the
    teacher that starts labelling the pool has converged on the labels; then the rate restarts (Loshchilov &
    Hutter's warm restart) for the phase with the pool, which a rate already near zero would waste."""
    first = lr_lambda(pool_start, min(warmup_steps, max(pool_start - 1, 0)))
    second = lr_lambda(total_steps - pool_start, min(warmup_steps, max(total_steps - pool_start - 1, 0)))
    return lambda step: first(step) if step < pool_start else second(step - pool_start)


def make_optimizer(model: Classifier, params: FinetuneParams, pretrained: bool) -> torch.optim.Optimizer:
    body, head = model.param_groups()
    # A randomly initialised body has nothing to preserve, so it learns at the head's rate.
    body_lr = params.lr_body if pretrained else params.lr_head
    return torch.optim.AdamW([{"params": body, "lr": body_lr}, {"params": head, "lr": params.lr_head}],
                             weight_decay=params.weight_decay)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def calibration_images(data: TrainingSet, most: int = 2048) -> np.ndarray:
    """The images batch norm is recalibrated on: the real training images, and with a pool (which the model
    trained on too) up to `most` of its images in all."""
    if not data.semi_supervised:
        return data.images
    return np.concatenate([data.images, data.unlabelled[:max(0, most - len(data.images))]])


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, images: np.ndarray, device: torch.device) -> None:
    """Re-estimate batch-norm statistics on un-augmented training images. After a few hundred steps the running
    averages still mix in ImageNet's statistics (momentum 0.1), which are far from small grayscale images; exact
    averages over the training set make eval-mode predictions match what training saw."""
    if len(images) < 2:
        return  # batch norm cannot estimate a variance from one image
    with recalibrating_batch_norm(model):
        for start in range(0, len(images), EVAL_BATCH):
            chunk = images[start:start + EVAL_BATCH]
            if len(chunk) > 1:
                with autocast(device):
                    model(to_batch(torch.from_numpy(np.ascontiguousarray(chunk)), device))


@torch.inference_mode()
def predict(model: nn.Module, images: np.ndarray, device: torch.device, num_classes: int,
            batch: int = EVAL_BATCH) -> np.ndarray:
    """Class probabilities (float32, N x classes) for uint8 NHWC images, `batch` at a time."""
    model.eval()
    out = [np.zeros((0, num_classes), np.float32)]
    for start in range(0, len(images), batch):
        x = to_batch(torch.from_numpy(np.ascontiguousarray(images[start:start + batch])), device)
        with autocast(device):
            logits = model(x)
        out.append(logits.float().softmax(1).cpu().numpy())
    return np.concatenate(out)


def inner_scores(model: nn.Module, data: TrainingSet, device: torch.device) -> tuple[float, float]:
    """(cross-entropy, accuracy) on the inner split, after recalibrating batch norm on the real training images."""
    recalibrate_batch_norm(model, data.images, device)
    probs = predict(model, data.inner, device, int(model.backbone.num_classes))
    rows = np.arange(len(probs))
    loss = float(-np.log(np.clip(probs[rows, data.inner_targets], 1e-12, None)).mean())
    return loss, float((probs.argmax(1) == data.inner_targets).mean())


# --------------------------------------------------------------------------------------------------
# Training state, checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    model: Classifier
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    mix: MixupCutmix
    ema: nn.Module | None  # torch.optim.swa_utils.AveragedModel of `model`
    epoch: int = 0  # epochs done
    history: list[dict] = field(default_factory=list)
    best: dict[str, torch.Tensor] | None = None  # weights at the best inner-validation loss (early stopping)
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are evaluated and kept: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model


def save_state(path: Path, state: TrainState, randoms: list[dict[str, torch.Tensor]], fingerprint: str) -> None:
    """Everything needed to continue exactly, in pipeline/runtime/checkpoint.py's one format."""
    tensors, optimizer = optimizer_parts("optim", state.optimizer)
    tensors |= {"model": state.model.state_dict()} | random_parts(randoms)
    if state.ema is not None:
        tensors["ema"] = state.ema.state_dict()
    if state.best is not None:
        tensors["best"] = state.best
    meta = {"epoch": state.epoch, "history": state.history, "optim": optimizer,
            "scheduler": state.scheduler.state_dict() | {"lr_lambdas": None}, "mix": state.mix.rng.bit_generator.state,
            "best_loss": state.best_loss, "best_epoch": state.best_epoch, "bad_epochs": state.bad_epochs}
    save_checkpoint(path, tensors, meta, fingerprint)


def _checked_state(saved: Saved, state: TrainState, world: World) -> dict:
    """The checkpoint's parts, each checked to fit `state` before anything is loaded into it."""
    meta = saved.meta
    optimizer = optimizer_state(saved, "optim", state.optimizer)
    return {"model": module_state(saved, "model", state.model), "optim": optimizer,
            "scheduler": meta["scheduler"] | {"lr_lambdas": [None] * len(optimizer["param_groups"])},
            "ema": module_state(saved, "ema", state.ema) if state.ema is not None else None,
            "best": module_state(saved, "best", state.evaluated) if "best" in saved.tensors else None,
            "random": random_state(saved, world),
            **{key: meta[key] for key in ("epoch", "history", "mix", "best_loss", "best_epoch", "bad_epochs")}}


def load_state(path: Path, state: TrainState, fingerprint: str, device: torch.device, world: World) -> bool:
    """Load a matching, whole checkpoint into `state`; False (and nothing changed) when there is none, it does
    not match or it is damaged."""
    loaded = load_checkpoint(path, fingerprint, lambda saved: _checked_state(saved, state, world))
    if loaded is None:
        return False
    state.model.load_state_dict(loaded["model"])
    state.optimizer.load_state_dict(loaded["optim"])
    state.scheduler.load_state_dict(loaded["scheduler"])
    if state.ema is not None:
        state.ema.load_state_dict(loaded["ema"])
    state.best = loaded["best"]
    state.mix.rng.bit_generator.state = loaded["mix"]
    state.epoch, state.history = loaded["epoch"], loaded["history"]
    state.best_loss, state.best_epoch = loaded["best_loss"], loaded["best_epoch"]
    state.bad_epochs = loaded["bad_epochs"]
    if loaded["random"] is not None:
        restore_random(loaded["random"], device)
    log.info("resuming fine-tuning after epoch %d", state.epoch)
    return True


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitSetup:
    params: FinetuneParams
    epochs: int
    pretrained: bool  # the body starts from pretrained weights (and so learns at the lower lr_body)
    policy: Any | None  # a built albumentations policy, or None
    device: torch.device
    world: World = World()
    checkpoint: Checkpointing | None = None
    on_epoch: Callable[[dict], None] | None = None  # called on the main process with each epoch's record


@dataclass
class FitResult:
    model: Classifier  # the kept weights (best inner epoch, or the EMA, or the last), eval mode, batch norm recalibrated
    history: list[dict]
    resumed_from: int  # epochs a checkpoint had already done (0: none)
    stopped_early: bool
    best_epoch: int  # the epoch whose weights were kept
    steps_per_epoch: int
    step_seconds: float  # wall time spent in optimiser steps (data loading included), this run's epochs only


def _build_state(model: Classifier, setup: FitSetup, steps_per_epoch: int, teacher: bool) -> TrainState:
    """The optimiser, schedule, mixing and the weight average: `ema_decay`'s, or with the pool (`teacher`) the
    teacher's at `teacher_decay` unless ema_decay asks for another."""
    params = setup.params
    optimizer = make_optimizer(model, params, setup.pretrained)
    total = setup.epochs * steps_per_epoch
    warmup = min(params.warmup_epochs, setup.epochs - 1) * steps_per_epoch
    schedule = (two_phase_lr_lambda(total, warmup, FixMatch.first_step(params, total)) if teacher
                else lr_lambda(total, warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ema = None
    decay = params.ema_decay or (params.teacher_decay if teacher else 0)
    if decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    return TrainState(model, optimizer, scheduler, MixupCutmix(params.mixup, params.cutmix, params.seed), ema)


def _wrap(model: Classifier, setup: FitSetup) -> nn.Module:
    """What the training step calls: the model, under DDP when there are several processes, compiled if asked."""
    trained: nn.Module = model
    if setup.world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [setup.device.index] if setup.device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=ids)
    if setup.params.compile:
        trained = torch.compile(trained)
    return trained


class SyntheticLoss:
    """How GAN samples count in the loss: each weighs `synthetic_weight` against 1 for a real image, and with
    `synthetic_soft` its target puts the sample filter's confidence on its class and spreads the rest evenly
    over the others (a sample the filter barely accepted teaches less certainty). Real images keep their one-hot
    targets; label smoothing applies to every target, as for real images."""

    def __init__(self, data: TrainingSet, params: FinetuneParams, num_classes: int, device: torch.device):
        self.real, self.num_classes = len(data.images), num_classes
        total = self.real + len(data.synthetic)
        self.weight = torch.ones(total, device=device)
        self.weight[self.real:] = params.synthetic_weight
        self.confidence = torch.ones(total, device=device)
        if params.synthetic_soft and len(data.synthetic):
            if data.synthetic_confidence is None:
                raise PipelineError("finetune.synthetic_soft needs the GAN samples' filter confidences "
                                    "(scores in samples.npz); re-run `dvc repro synthesize`")
            self.confidence[self.real:] = torch.as_tensor(data.synthetic_confidence, dtype=torch.float32,
                                                          device=device).clamp(1 / num_classes, 1)
        self.active = len(data.synthetic) > 0 and (params.synthetic_weight != 1 or params.synthetic_soft)

    def targets(self, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Soft targets: one-hot for real images, the filter's confidence for GAN samples."""
        confidence = self.confidence[ids].unsqueeze(1)
        rest = (1 - confidence) / max(self.num_classes - 1, 1)
        one_hot = F.one_hot(y, self.num_classes).float()
        return one_hot * confidence + (1 - one_hot) * rest

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, ids: torch.Tensor, smoothing: float) -> torch.Tensor:
        per_image = F.cross_entropy(logits, target, label_smoothing=smoothing, reduction="none")
        return (per_image * self.weight[ids]).mean()


def _loader(data: TrainingSet, setup: FitSetup, plan: BatchPlan, start: int) -> DataLoader:
    workers = setup.params.workers
    return DataLoader(AugmentedImages(data.all_images, data.all_targets, setup.policy),
                      batch_sampler=PlannedBatches(plan, start, setup.epochs), collate_fn=whole_batch,
                      num_workers=workers,
                      worker_init_fn=seed_worker, persistent_workers=False, prefetch_factor=4 if workers else None,
                      pin_memory=setup.device.type == "cuda",
                      generator=torch.Generator().manual_seed(setup.params.seed))  # keeps torch's global stream untouched


@dataclass(frozen=True)
class Losses:
    """What a step's loss is made of besides the labelled images' cross-entropy."""

    synthetic: SyntheticLoss
    semi: FixMatch | None  # the pool's loss, for a semi-supervised variant


def _pool_loss(state: TrainState, trained: nn.Module, x: torch.Tensor, semi: FixMatch, step: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labelled logits, the pool's loss, its pseudo-label pass rate): the teacher labels the weak views, and
    the student sees the labelled batch and the strong views in one forward pass (one set of batch statistics,
    as in FixMatch)."""
    weak, strong = semi.views(state.epoch, step)
    teacher = state.ema.module
    with torch.no_grad(), batch_statistics(teacher), autocast(device):
        teacher_logits = teacher(to_batch(weak, device))
    with autocast(device):
        logits = trained(torch.cat([x, to_batch(strong, device)]))
    pool_loss, passed = semi.loss(logits[len(x):], teacher_logits)
    return logits[:len(x)], pool_loss, passed


def _train_epoch(state: TrainState, trained: nn.Module, batches, steps: int, setup: FitSetup,
                 num_classes: int, losses: Losses) -> dict:
    """One epoch of optimiser steps; the epoch's mean loss and training accuracy (over every process)."""
    device, smoothing = setup.device, setup.params.label_smoothing
    synthetic, semi = losses.synthetic, losses.semi
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    passed_sum, pool_steps = torch.zeros((), dtype=torch.float64, device=device), 0
    seen = 0
    state.model.train()
    for step in range(steps):
        images, y, ids = next(batches)
        x, y = to_batch(images, device), y.to(device, non_blocking=True)
        ids = ids.to(device, non_blocking=True)
        target = synthetic.targets(y, ids) if synthetic.active else y
        if state.mix.enabled:
            x, target = state.mix(x, target if synthetic.active else F.one_hot(y, num_classes).float())
        pool_loss = None
        if semi is not None and semi.active(state.epoch * steps + step):
            logits, pool_loss, passed = _pool_loss(state, trained, x, semi, step, device)
            passed_sum += passed
            pool_steps += 1
        else:
            with autocast(device):
                logits = trained(x)
        if synthetic.active:
            loss = synthetic(logits.float(), target, ids, smoothing)
        else:
            loss = F.cross_entropy(logits.float(), target, label_smoothing=smoothing)
        if pool_loss is not None:
            loss = loss + pool_loss
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update_parameters(state.model)
        # summed on the device: reading a number back every step would stall a GPU's queue
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64).to(device)])
    if setup.world.size > 1:
        torch.distributed.all_reduce(totals)
    loss_sum, correct, seen = totals.tolist()
    lrs = state.scheduler.get_last_lr()
    record = {"epoch": state.epoch + 1, "loss": loss_sum / seen, "train_accuracy": correct / seen,
              "lr_body": lrs[0], "lr_head": lrs[1]}
    if pool_steps:  # the share of pool images whose pseudo-label passed, on this process
        record["pool_pass_rate"] = float(passed_sum) / pool_steps
    return record


def _early_stopping(state: TrainState, record: dict, data: TrainingSet, setup: FitSetup) -> bool:
    """Score the inner split, keep the best weights; True when patience has run out."""
    loss, accuracy = inner_scores(state.evaluated, data, setup.device)
    record.update(inner_loss=loss, inner_accuracy=accuracy)
    if loss < state.best_loss:
        state.best_loss, state.best_epoch, state.bad_epochs = loss, record["epoch"], 0
        state.best = {k: v.detach().clone() for k, v in state.evaluated.state_dict().items()}
    else:
        state.bad_epochs += 1
    return state.bad_epochs >= setup.params.patience


def fit(model: Classifier, data: TrainingSet, setup: FitSetup) -> FitResult:
    """Train `model` (already on the device) on `data`; see the module docstring for what is guaranteed."""
    num_classes = int(model.backbone.num_classes)
    plan = BatchPlan(real=len(data.images), synthetic=len(data.synthetic), batch=setup.params.batch_size,
                     synthetic_share=setup.params.synthetic_share, seed=setup.params.seed, world=setup.world)
    state = _build_state(model, setup, plan.steps_per_epoch, teacher=data.semi_supervised)
    path = setup.checkpoint.folder / CHECKPOINT_FILE if setup.checkpoint else None
    resumed = path is not None and load_state(path, state, setup.checkpoint.fingerprint, setup.device, setup.world)
    resumed_from = state.epoch
    if setup.on_epoch is not None and setup.world.is_main:
        for record in state.history:  # the curves so far, so the log is whole after a resume
            setup.on_epoch(record)
    trained = _wrap(model, setup)
    semi = (FixMatch(setup.params, data.unlabelled, setup.policy, plan.steps_per_epoch, setup.epochs, setup.world,
                     ahead=setup.device.type == "cuda") if data.semi_supervised else None)
    losses = Losses(SyntheticLoss(data, setup.params, num_classes, setup.device), semi)
    batches = iter(_loader(data, setup, plan, state.epoch))
    stopped, step_seconds = False, 0.0
    progress = Progress(range(state.epoch, setup.epochs), desc="finetune", unit="epoch", logger=log,
                        disable=None if setup.world.is_main else True)
    for _ in progress:
        started = time.perf_counter()
        record = _train_epoch(state, trained, batches, plan.steps_per_epoch, setup, num_classes, losses)
        step_seconds += time.perf_counter() - started
        state.epoch += 1
        if len(data.inner):
            stopped = _early_stopping(state, record, data, setup)
        state.history.append(record)
        progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_accuracy']:.2f}")
        if setup.on_epoch is not None and setup.world.is_main:
            setup.on_epoch(record)
        if stopped:
            log.info("early stopping after epoch %d: no better inner-validation loss for %d epochs (best: epoch %d)",
                     state.epoch, setup.params.patience, state.best_epoch)
            break
        if setup.checkpoint and state.epoch % setup.checkpoint.every == 0 and state.epoch < setup.epochs:
            randoms = random_states(setup.device, setup.world)
            if setup.world.is_main:
                save_state(path, state, randoms, setup.checkpoint.fingerprint)
    progress.close()
    del batches  # stops DataLoader workers at once, also after early stopping
    if semi is not None:
        semi.close()
    kept = state.evaluated
    if state.best is not None:
        kept.load_state_dict(state.best)
    recalibrate_batch_norm(kept, calibration_images(data), setup.device)
    if path is not None and setup.world.is_main:
        path.unlink(missing_ok=True)  # the stage's outputs now hold the result
    best_epoch = state.best_epoch if state.best is not None else state.epoch
    log.info("trained %d epochs%s", state.epoch, f" (resumed after epoch {resumed_from})" if resumed else "")
    return FitResult(kept.eval(), state.history, resumed_from, stopped, best_epoch, plan.steps_per_epoch,
                     step_seconds)
