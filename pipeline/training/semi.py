"""Semi-supervised training on the unlabelled pool: FixMatch (Sohn et al., NeurIPS 2020) with an EMA teacher.

The first `unlabelled_start` of the training steps are on labels alone, with a warm-up and cosine schedule of
their own, so the teacher has converged on the labels before it says anything; then the learning rate restarts
(loop.two_phase_lr_lambda) and every step adds `unlabelled_ratio` pool images per labelled image. Each pool image
is seen twice:
- a weak view, shifted by up to an eighth of its side (FixMatch's flip-and-shift without the flip, which would
  turn a digit or a letter into another), which the teacher labels; the teacher is the exponential moving
  average of the student's weights (Mean Teacher, Tarvainen & Valpola 2017; FixMatch evaluates such an average),
  so pseudo-labels change slowly and the model that is kept is the teacher. It labels with its batch norm on
  the pool batch's own statistics (compute.batch_statistics): its running averages, gathered on augmented
  labelled batches, made it unsure of plain pool images (on the default digits' fold 0, 17% of pool images
  passed a 0.8 threshold by the end of training, against 52% with the batch's statistics);
- a strong view: the variant's albumentations policy (the labelled images' augmentation) plus a cutout of up to
  half the side, as FixMatch's strong view is RandAugment plus Cutout.

The student learns the teacher's class on the strong view wherever the teacher's confidence reaches
`pseudo_threshold`: loss = labelled loss + `unlabelled_weight` x mean over the pool batch of
mask x cross-entropy. Like the labelled batches, each pool batch is a pure function of (seed, epoch, step), so
a resumed run continues exactly and the number of DataLoader workers changes nothing.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augmentation.policy import augment_seeded
from pipeline.runtime.compute import World
from pipeline.runtime.params import FinetuneParams


@dataclass(frozen=True)
class PoolBatches:
    """Weak and strong views of the pool images of every step."""

    pool: np.ndarray  # uint8 N x H x W x C
    policy: Any | None  # the variant's albumentations policy (None: the strong view is the shift and the cutout)
    per_process: int  # pool images per step and process
    seed: int
    world: World

    def indices(self, epoch: int, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, step, self.world.rank])
        return rng.choice(len(self.pool), self.per_process, replace=len(self.pool) < self.per_process)

    def views(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weak, strong) uint8 N x H x W x C batches of the step's pool images."""
        rng = np.random.default_rng([self.seed, epoch, step, self.world.rank, 1])
        images = self.pool[self.indices(epoch, step)]
        weak = np.stack([shifted(image, rng) for image in images])
        first = int(rng.integers(2**31))
        strong = [augment_seeded(self.policy, image, first + i) if self.policy is not None else shifted(image, rng)
                  for i, image in enumerate(images)]
        strong = np.stack([cut_out(image, rng) for image in strong])
        return torch.from_numpy(weak), torch.from_numpy(strong)


def shifted(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image moved by up to 1/8 of its side in each direction, the uncovered border reflected."""
    side = image.shape[0]
    most = max(1, side // 8)
    dy, dx = rng.integers(-most, most + 1, size=2)
    padded = np.pad(image, ((most, most), (most, most), (0, 0)), mode="reflect")
    return padded[most + dy:most + dy + side, most + dx:most + dx + image.shape[1]]


def cut_out(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A square of up to half the side set to the image's mean (FixMatch's Cutout)."""
    h, w = image.shape[:2]
    size = int(rng.integers(1, max(2, min(h, w) // 2) + 1))
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    out = image.copy()
    out[top:top + size, left:left + size] = image.mean((0, 1)).astype(image.dtype)
    return out


class FixMatch:
    """When the pool joins, and the loss on its images."""

    def __init__(self, params: FinetuneParams, pool: np.ndarray, policy: Any | None, steps_per_epoch: int,
                 epochs: int, world: World, ahead: bool = False):
        local = params.batch_size // world.size
        # made ahead, the views need a policy of their own: the labelled batches are augmented with the same one
        # meanwhile, and re-seeding a shared one from two threads would mix their draws
        own = copy.deepcopy(policy) if ahead else policy
        self.batches = PoolBatches(pool, own, params.unlabelled_ratio * local, params.seed, world)
        self.steps_per_epoch, self.total_steps = steps_per_epoch, epochs * steps_per_epoch
        self.start_step = self.first_step(params, self.total_steps)
        self.threshold, self.weight = params.pseudo_threshold, params.unlabelled_weight
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="pool-views") if ahead else None
        self._next: tuple[tuple[int, int], Future] | None = None

    def views(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's (weak, strong) views; with `ahead`, the next step's set going on a background thread, made
        while this step trains on the GPU (the same views as made in line: they are a function of (epoch, step)).
        Not on a CPU, whose cores torch's own threads already keep busy: there the thread slowed a 16 px
        cnn_pool fold on 2 cores from 65.1 and 70.1 s to 79.2 and 76.5."""
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == (epoch, step):
            out = ahead[1].result()
        else:  # the first pool step, or after a resume
            out = self.batches.views(epoch, step)
        following = epoch * self.steps_per_epoch + step + 1
        if self._ahead is not None and following < self.total_steps:
            at = divmod(following, self.steps_per_epoch)
            self._next = (at, self._ahead.submit(self.batches.views, *at))
        return out

    def close(self) -> None:
        self._next = None
        if self._ahead is not None:
            self._ahead.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def first_step(params: FinetuneParams, total_steps: int) -> int:
        """The step at which the pool joins (the learning-rate schedule restarts there too)."""
        return round(params.unlabelled_start * total_steps)

    def active(self, step: int) -> bool:
        return step >= self.start_step

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weighted pool loss, the share of pool images whose pseudo-label passed the threshold)."""
        confidence, pseudo = teacher_logits.float().softmax(1).max(1)
        mask = (confidence >= self.threshold).float()
        per_image = F.cross_entropy(student_logits.float(), pseudo, reduction="none")
        return self.weight * (per_image * mask).mean(), mask.mean()
