"""A small class-conditional GAN for datasets of a few dozen images per class.

Two generators (`synthesize.condition`): `image`, the default, varies a real training image of the class
(ExemplarGenerator, DAGAN) and is judged on (reference, image) pairs; `label` makes an image from the class alone:
Generator: DCGAN-style transposed-conv upsampling from a 4x4 map, conditioned on the class through
conditional batch norm (a per-class gain and bias) and a class embedding fed in beside z.
Discriminator: strided convs down to 4x4, global sum pooling, a linear output plus Miyato & Koyama's
projection term, spectral norm on every layer. Hinge loss, DiffAugment (Zhao et al. 2020) on real and
fake images in both steps, a small mode-seeking term (Mao et al. 2019) against per-class collapse, and
an EMA copy of the generator for sampling. Widths are kept small on purpose: the whole thing must
train a few hundred steps on a 2-core CPU in about half a minute.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.data.pictures import grid
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
from pipeline.runtime.compute import World, autocast, random_states, recalibrating_batch_norm
from pipeline.runtime.progress import Progress

if TYPE_CHECKING:  # the attributes train_gan reads; any object with them will do (tests use their own)
    from pipeline.runtime.params import SynthesizeParams as GanConfig

log = logging.getLogger(__name__)

MIN_RESOLUTION = 16
MAX_RESOLUTION = 128
ALLOWED_CHANNELS = (1, 3)
# Widest layer, as a multiple of base_channels: stops the 4x4 end of 64/128-pixel models from
# growing 8-16x wider than the 32-pixel one (cost grows with width squared).
MAX_WIDTH_MULTIPLIER = 8
# Forward passes used to re-estimate the EMA generator's batch-norm statistics after training.
BN_RECALIBRATION_BATCHES = 16
BN_RECALIBRATION_BATCH_SIZE = 64
# DCGAN's weight init for the generator. PyTorch's default gives the 1-channel output layer ~7x
# larger weights, which Adam at 2e-4 cannot move far in a few hundred steps.
GENERATOR_INIT_STD = 0.02
# Weight of the mode-seeking term. Without it, G learns to ignore z within a class (one image per
# class); at 0.1 and above samples turn to noise. Measured on 80 digits, 400 steps: 0.03 keeps
# within-class pixel spread near the data's while most samples stay recognisably in their class.
MODE_SEEKING_WEIGHT = 0.03
# ExemplarGenerator's channels at the full side, where the reference joins them for a last 3x3 convolution.
# Measured on digits (folds 0-2, 400 steps): with the reference beside the last layer FID fell from 236 to 192
# and acceptance rose from 0.50 to 0.52, while samples stayed as far from the training images (novelty 1.28).
FULL_SIDE_CHANNELS = 16
GRID_PADDING = 2
GRID_PAD_VALUE = 255  # white, so cells stay visible on dark (e.g. MNIST-like) backgrounds


# --------------------------------------------------------------------------------------------------
# DiffAugment: differentiable augmentations applied identically to real and fake images, so D cannot
# tell them apart by the augmentation and G still receives gradients through it. Each function draws
# independent parameters per sample from torch's global RNG (seeded by train_gan).
# --------------------------------------------------------------------------------------------------


def _per_sample_uniform(x: Tensor) -> Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)


def _random_brightness(x: Tensor) -> Tensor:
    return x + (_per_sample_uniform(x) - 0.5)


def _random_saturation(x: Tensor) -> Tensor:
    # With one channel the channel mean is the image itself, so this is a no-op for greyscale.
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_per_sample_uniform(x) * 2) + mean


def _random_contrast(x: Tensor) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_per_sample_uniform(x) + 0.5) + mean


def rand_color(x: Tensor) -> Tensor:
    """Random brightness, saturation and contrast per sample."""
    return _random_contrast(_random_saturation(_random_brightness(x)))


def rand_translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    """Shift each sample by up to `ratio` of its size in each direction, filling with zeros."""
    n, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy  # source row for each target row
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx
    # Index into a copy padded by one zero pixel on each side; out-of-range sources land on padding.
    rows = (rows + 1).clamp(0, h + 1)
    cols = (cols + 1).clamp(0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # NHWC so one gather moves all channels
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def rand_cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
    """Zero one square of `ratio` of the image size per sample, centred anywhere in the image."""
    n, _, h, w = x.shape
    cut_h, cut_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    centre_y = torch.randint(0, h, (n, 1, 1), device=x.device)
    centre_x = torch.randint(0, w, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = centre_y - cut_h // 2, centre_x - cut_w // 2
    inside = (rows >= top) & (rows < top + cut_h) & (cols >= left) & (cols < left + cut_w)
    return x * (~inside).unsqueeze(1).to(x.dtype)


DIFFAUGMENT: dict[str, Callable[[Tensor], Tensor]] = {
    "color": rand_color,
    "translation": rand_translation,
    "cutout": rand_cutout,
}


def _parse_policy(policy: str) -> list[Callable[[Tensor], Tensor]]:
    names = [name.strip() for name in policy.split(",") if name.strip()]
    unknown = [name for name in names if name not in DIFFAUGMENT]
    if unknown:
        raise ValueError(
            f"unknown DiffAugment policy {', '.join(map(repr, unknown))} in {policy!r}; "
            f"allowed names (comma-separated): {', '.join(DIFFAUGMENT)}"
        )
    return [DIFFAUGMENT[name] for name in names]


def diff_augment(x: Tensor, policy: str) -> Tensor:
    """Apply the comma-separated DiffAugment `policy` to an NCHW batch in [-1, 1]; "" is identity."""
    for augment in _parse_policy(policy):
        x = augment(x)
    return x


class AdaptiveAugment(nn.Module):
    """DiffAugment whose strength adapts, in the spirit of ADA (Karras et al. 2020).

    Each operation of the policy is applied to each sample with probability `p`. With a positive `target`,
    `p` starts at 0 and every `interval` steps moves by batch x interval / `speed_images` towards keeping
    r = E[sign(D(real))] at `target`: r near 1 means the discriminator is sure of every real image, i.e. it
    is memorising the few it has, so augmentation rises. With `target` 0, `p` stays at 1: plain DiffAugment.
    `p` is a buffer, so it is saved and restored with the checkpoint.
    """

    def __init__(self, policy: str, *, target: float, speed_images: int, interval: int):
        super().__init__()
        self.operations = _parse_policy(policy)
        self.target, self.speed_images, self.interval = target, speed_images, interval
        self.register_buffer("p", torch.tensor(0.0 if target > 0 else 1.0))
        self.register_buffer("signs", torch.zeros(2))  # running sum of sign(D(real)) and its count

    def forward(self, x: Tensor) -> Tensor:
        p = float(self.p)
        for operation in self.operations:
            if p >= 1.0:
                x = operation(x)
            elif p > 0.0:
                chosen = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p
                x = torch.where(chosen, operation(x), x)
        return x

    @torch.no_grad()
    def observe(self, real_logits: Tensor) -> None:
        self.signs += torch.stack([real_logits.float().sign().sum(), real_logits.new_tensor(real_logits.numel(),
                                                                                             dtype=torch.float)])

    @torch.no_grad()
    def adjust(self, step: int, batch_images: int) -> float | None:
        """Every `interval` steps: move p and return the overfitting measure r it was moved on."""
        if self.target <= 0 or step % self.interval or not self.operations:
            return None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.signs)  # every process moves p alike
        r = float(self.signs[0] / self.signs[1].clamp(min=1))
        step_size = batch_images * self.interval / self.speed_images
        self.p.copy_((self.p + np.sign(r - self.target) * step_size).clamp(0.0, 1.0))
        self.signs.zero_()
        return r


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------


def _num_blocks(resolution: int) -> int:
    """Up/down-sampling blocks between a 4x4 map and `resolution`."""
    return int(math.log2(resolution // 4))


def _widths(resolution: int, base_channels: int) -> list[int]:
    """Channel width at 4x4, 8x8, ... up to resolution/2, halving as resolution doubles."""
    n = _num_blocks(resolution)
    cap = base_channels * MAX_WIDTH_MULTIPLIER
    return [min(base_channels * 2 ** (n - 1 - i), cap) for i in range(n)]


def _check_architecture(*, num_classes: int, channels: int, resolution: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if channels not in ALLOWED_CHANNELS:
        raise ValueError(f"channels must be one of {ALLOWED_CHANNELS}, got {channels}")
    if not _is_supported_resolution(resolution):
        raise ValueError(
            f"resolution must be a power of two in {MIN_RESOLUTION}..{MAX_RESOLUTION}, got {resolution}"
        )


def _is_supported_resolution(size: int) -> bool:
    is_power_of_two = size > 0 and size & (size - 1) == 0
    return is_power_of_two and MIN_RESOLUTION <= size <= MAX_RESOLUTION


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose affine gain and bias are looked up per class."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_features, affine=False)
        self.gain = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        # DCGAN's batch-norm init (gain ~ N(1, 0.02)): classes differ slightly from the start
        # instead of sharing one identical gain that they must first break away from.
        nn.init.normal_(self.gain.weight, 1.0, 0.02)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        gain = self.gain(y)[:, :, None, None]
        bias = self.bias(y)[:, :, None, None]
        return self.norm(x) * gain + bias


class UpBlock(nn.Module):
    """Double the resolution with a transposed conv, then class-conditional norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, num_classes: int):
        super().__init__()
        # 4x4 stride-2 transposed conv: ~half the multiply-adds of upsample + 3x3 conv.
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False)
        self.norm = ConditionalBatchNorm2d(out_channels, num_classes)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(x), y))


class Generator(nn.Module):
    """(z, y) -> NCHW images in [-1, 1]."""

    mode_seeking_weight = MODE_SEEKING_WEIGHT

    def __init__(self, *, num_classes: int, channels: int, resolution: int, z_dim: int, base_channels: int):
        super().__init__()
        _check_architecture(num_classes=num_classes, channels=channels, resolution=resolution)
        self.num_classes, self.channels, self.resolution, self.z_dim = num_classes, channels, resolution, z_dim
        widths = _widths(resolution, base_channels)
        # Batch norm's per-channel gain and bias cannot place class-specific shapes on the 4x4 map;
        # an embedding beside z can. With conditional batch norm alone, samples stayed at chance
        # class accuracy after 400 steps.
        self.class_embed = nn.Embedding(num_classes, z_dim)
        self.project = nn.Linear(2 * z_dim, widths[0] * 4 * 4, bias=False)  # a bias would be cancelled by the norm
        self.project_norm = ConditionalBatchNorm2d(widths[0], num_classes)
        self.blocks = nn.ModuleList(
            UpBlock(w_in, w_out, num_classes) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.to_image = nn.ConvTranspose2d(widths[-1], channels, 4, stride=2, padding=1)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.ConvTranspose2d)):
                nn.init.normal_(module.weight, 0.0, GENERATOR_INIT_STD)

    def references(self, labels: Tensor) -> None:
        """This generator needs no reference images (ExemplarGenerator's does)."""
        return None

    def forward(self, z: Tensor, y: Tensor, reference: Tensor | None = None) -> Tensor:
        x = self.project(torch.cat([z, self.class_embed(y)], dim=1)).view(z.shape[0], -1, 4, 4)
        x = F.relu(self.project_norm(x, y))
        for block in self.blocks:
            x = block(x, y)
        return torch.tanh(self.to_image(x))


class ExemplarGenerator(nn.Module):
    """(z, y, reference) -> a new image of class y in the likeness of `reference`, a real training image of that
    class: the Data Augmentation GAN (DAGAN, Antoniou, Storkey & Edwards 2018), made for a few images per class.

    A label-conditioned generator must learn from scratch what each class looks like, which a few hundred CPU steps
    on eight images a class do not teach (a classifier trained on its samples stayed near chance). This one starts
    from a real image of the class and learns to vary it: an encoder takes the reference down to 4x4, z and the
    class embedding join it there, and a decoder with class-conditional batch norm upsamples it, with the encoder's
    map of the same side beside it at every side and the reference itself beside the last layer. The discriminator
    (`pairs`) sees (reference, image) pairs: two different real images of a class, or a reference and a sample made
    from it, so a copy of the reference is as fake as a sample of the wrong class (`novelty` in
    pipeline/gan/quality.py measures how far samples stay from the training images). The training images are
    buffers (`exemplars`), so the generator samples on its own and is saved whole.
    """

    mode_seeking_weight = 0.06  # measured like Generator's: 0 collapsed samples onto few shapes, 0.03-0.1 were alike

    def __init__(self, *, num_classes: int, channels: int, resolution: int, z_dim: int, base_channels: int,
                 exemplars: Tensor, exemplar_labels: Tensor):
        super().__init__()
        _check_architecture(num_classes=num_classes, channels=channels, resolution=resolution)
        self.num_classes, self.channels, self.resolution, self.z_dim = num_classes, channels, resolution, z_dim
        widths = _widths(resolution, base_channels)  # at 4x4, 8x8, ..., resolution / 2
        down = [channels, *reversed(widths)]
        self.encoder = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w_in, w_out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(w_out),
                          nn.LeakyReLU(0.2))
            for w_in, w_out in zip(down[:-1], down[1:])
        )
        self.class_embed = nn.Embedding(num_classes, z_dim)
        self.project = nn.Linear(2 * z_dim, widths[0] * 4 * 4, bias=False)
        self.project_norm = ConditionalBatchNorm2d(widths[0], num_classes)
        self.blocks = nn.ModuleList(  # each takes its input beside the encoder's map of the same side
            UpBlock(2 * w_in, w_out, num_classes) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.to_full_side = nn.ConvTranspose2d(2 * widths[-1], FULL_SIDE_CHANNELS, 4, stride=2, padding=1)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.ConvTranspose2d)):
                nn.init.normal_(module.weight, 0.0, GENERATOR_INIT_STD)
        self.to_image = nn.Conv2d(FULL_SIDE_CHANNELS + channels, channels, 3, padding=1)  # beside the reference
        self.register_buffer("exemplars", exemplars.detach().clone())
        self.register_buffer("exemplar_labels", exemplar_labels.detach().clone())

    def references(self, labels: Tensor) -> Tensor:
        """A reference image for each label: the class's exemplars in turn, in the order the labels come (a class
        without exemplars borrows any image; the sample filter, which never saw that class, rejects its samples)."""
        index = torch.empty_like(labels)
        for label in labels.unique():
            where = (labels == label).nonzero().squeeze(1)
            pool = (self.exemplar_labels == label).nonzero().squeeze(1)
            pool = pool if pool.numel() else torch.arange(len(self.exemplar_labels), device=labels.device)
            index[where] = pool[torch.arange(len(where), device=labels.device) % len(pool)]
        return self.exemplars[index]

    def forward(self, z: Tensor, y: Tensor, reference: Tensor | None = None) -> Tensor:
        reference = self.references(y) if reference is None else reference
        x, skips = reference, []
        for layer in self.encoder:
            x = layer(x)
            skips.append(x)
        code = self.project(torch.cat([z, self.class_embed(y)], dim=1)).view(z.shape[0], -1, 4, 4)
        x = torch.cat([skips.pop(), F.relu(self.project_norm(code, y))], dim=1)
        for block in self.blocks:
            x = torch.cat([block(x, y), skips.pop()], dim=1)
        x = F.leaky_relu(self.to_full_side(x), 0.2)
        return torch.tanh(self.to_image(torch.cat([x, reference], dim=1)))


class Discriminator(nn.Module):
    """(x, y) -> one real/fake logit per image, shape (N,). With `pairs`, x is a (reference, image) pair stacked
    on the channels (ExemplarGenerator's discriminator)."""

    def __init__(self, *, num_classes: int, channels: int, resolution: int, base_channels: int, pairs: bool = False):
        super().__init__()
        _check_architecture(num_classes=num_classes, channels=channels, resolution=resolution)
        widths = [channels * (2 if pairs else 1), *reversed(_widths(resolution, base_channels))]
        self.convs = nn.ModuleList(
            spectral_norm(nn.Conv2d(w_in, w_out, 4, stride=2, padding=1))
            for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.linear = spectral_norm(nn.Linear(widths[-1], 1))
        # Projection term: <embed(y), features> rewards features that match the claimed class.
        self.embed = spectral_norm(nn.Embedding(num_classes, widths[-1]))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        features = x.sum(dim=(2, 3))  # global sum pooling over the final 4x4 map
        return self.linear(features).squeeze(1) + (self.embed(y) * features).sum(dim=1)


# --------------------------------------------------------------------------------------------------
# Input validation and data
# --------------------------------------------------------------------------------------------------


def _validate_uint8_nhwc(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} shape {getattr(images, 'shape', '')}"
        raise ValueError(f"images must be a uint8 NHWC numpy array, got {got}")
    if images.shape[0] == 0:
        raise ValueError("images is empty: need at least one image")
    if images.shape[3] not in ALLOWED_CHANNELS:
        raise ValueError(f"images must be uint8 NHWC with {ALLOWED_CHANNELS} channels, got shape {images.shape}")


def _validate_training_images(images: np.ndarray) -> None:
    _validate_uint8_nhwc(images)
    _, h, w, _ = images.shape
    if h != w:
        raise ValueError(f"images must be square (H == W), got {h}x{w}")
    if not _is_supported_resolution(h):
        raise ValueError(
            f"image size must be a power of two in {MIN_RESOLUTION}..{MAX_RESOLUTION}, got {h}x{w}"
        )


def _validate_labels(labels: np.ndarray, num_images: int, num_classes: int) -> None:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != num_images:
        raise ValueError(f"labels must have shape ({num_images},) to match images, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
        raise ValueError(f"label {outside[0]} is outside 0..{num_classes - 1} (num_classes={num_classes})")


def _to_device_tensors(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    """uint8 NHWC -> float NCHW in [-1, 1] on device, once: the dataset is tiny."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y = torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: pandas may hand over a read-only view
    return x.to(device), y.to(device)


def _to_uint8_nhwc(x: Tensor) -> np.ndarray:
    x = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainedGan:
    generator: Generator | ExemplarGenerator  # EMA weights, eval mode, on CPU: use this one for sampling
    history: list[dict]  # every log_every steps: step, loss_d, loss_g, d_real, d_fake, p, r (plain floats)
    augment_p: float  # the augmentation probability at the end of training
    resumed_from: int  # the step a checkpoint resumed from (0: trained from scratch)


@dataclass
class _Models:
    generator: nn.Module  # the Generator, wrapped in DistributedDataParallel under torchrun
    discriminator: nn.Module  # likewise
    ema: Generator | ExemplarGenerator
    augment: AdaptiveAugment
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer

    @property
    def plain_discriminator(self) -> Discriminator:
        """D without the DDP wrapper: the generator step must not start a gradient reduction for D."""
        return getattr(self.discriminator, "module", self.discriminator)

    @property
    def plain_generator(self) -> Generator | ExemplarGenerator:
        return getattr(self.generator, "module", self.generator)


def _feature_discriminator(cfg: GanConfig, *, num_classes: int, channels: int, resolution: int) -> nn.Module:
    from pipeline.gan.projected import FeatureDiscriminator  # loads timm: only when asked for

    _check_architecture(num_classes=num_classes, channels=channels, resolution=resolution)
    return FeatureDiscriminator(num_classes=num_classes, base_channels=cfg.base_channels,
                                backbone=cfg.feature_backbone, feature_size=cfg.feature_size)


DISCRIMINATORS = {  # synthesize.discriminator -> a builder of (cfg, num_classes, channels, resolution)
    "pixels": lambda cfg, **shape: Discriminator(base_channels=cfg.base_channels, **shape),
    "features": _feature_discriminator,
    "pairs": lambda cfg, **shape: Discriminator(base_channels=cfg.base_channels, pairs=True, **shape),
}
GENERATORS = {  # synthesize.condition -> a builder of (cfg, data, num_classes, channels, resolution)
    "label": lambda cfg, data, **shape: Generator(z_dim=cfg.z_dim, base_channels=cfg.base_channels, **shape),
    "image": lambda cfg, data, **shape: ExemplarGenerator(z_dim=cfg.z_dim, base_channels=cfg.base_channels,
                                                          exemplars=data[0], exemplar_labels=data[1], **shape),
}


def _build_models(
    cfg: GanConfig, data: tuple[Tensor, Tensor], *, num_classes: int, channels: int, resolution: int,
    device: torch.device, world: World
) -> _Models:
    shape = {"num_classes": num_classes, "channels": channels, "resolution": resolution}
    generator = GENERATORS[cfg.condition](cfg, data, **shape).to(device)
    judged_by = "pairs" if cfg.condition == "image" else cfg.discriminator
    discriminator = DISCRIMINATORS[judged_by](cfg, **shape).to(device)
    ema = copy.deepcopy(generator).requires_grad_(False)
    augment = AdaptiveAugment(cfg.diffaugment, target=cfg.ada_target, speed_images=cfg.ada_images,
                              interval=cfg.ada_interval).to(device)
    # beta1 = 0 as in SNGAN/BigGAN: momentum on a moving adversarial target mostly adds lag.
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_g, betas=(0.0, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr_d, betas=(0.0, 0.999))
    if world.size > 1:  # gradients averaged across processes; batch_size is per process
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        generator = DistributedDataParallel(generator, device_ids=ids)
        discriminator = DistributedDataParallel(discriminator, device_ids=ids)
    return _Models(generator, discriminator, ema, augment, opt_g, opt_d)


@dataclass
class _Batch:
    real: Tensor
    real_labels: Tensor
    z: Tensor
    fake_labels: Tensor
    # ExemplarGenerator only: the image each real one is paired with (another of its class; real pairs are two
    # different images of a class), and the reference each fake is made from
    references: Tensor | None = None
    fake_references: Tensor | None = None


def _sample_batch(data: tuple[Tensor, Tensor], cfg: GanConfig, rng: torch.Generator) -> _Batch:
    """Real images drawn with replacement, z on CPU from `rng` (device-independent), all moved to device. For the
    exemplar generator each real image also gets a partner: another image of its class, drawn after z."""
    images, labels = data
    index = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=rng).to(images.device)
    z = torch.randn(cfg.batch_size, cfg.z_dim, generator=rng).to(images.device)
    real_labels = labels[index]
    if cfg.condition != "image":
        return _Batch(images[index], real_labels, z, _paired(real_labels))
    references = images[index]
    partner = _partners(labels, index, rng)
    return _Batch(images[partner], real_labels, z, _paired(real_labels), references, _paired(references))


def _partners(labels: Tensor, index: Tensor, rng: torch.Generator) -> Tensor:
    """For each image index, another image of the same class drawn uniformly (itself when it is its class's only
    one)."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - starts[labels[order]]
    n = counts[labels[index]]
    shift = 1 + (torch.rand(len(index), generator=rng).to(index.device) * (n - 1)).long()
    return order[starts[labels[index]] + (rank[index] + shift) % n]


def _paired(values: Tensor) -> Tensor:
    """The fake batch's labels (or references), where samples i and i + N//2 share them, for the mode-seeking term.

    Drawn from the real batch's, so fakes follow the data's class frequencies.
    """
    half = values.shape[0] // 2
    return torch.cat([values[:half], values[:half], values[2 * half:]])


def _mode_seeking_penalty(fake: Tensor, z: Tensor) -> Tensor:
    """1 / (image distance / z distance) over same-class pairs: large when G ignores z."""
    half = fake.shape[0] // 2
    if half == 0:
        return fake.new_zeros((), dtype=torch.float32)
    image_distance = (fake[:half] - fake[half:2 * half]).float().abs().mean()
    z_distance = (z[:half] - z[half:2 * half]).abs().mean()
    return 1.0 / (image_distance / z_distance + 1e-5)


def _judged(models: _Models, images: Tensor, references: Tensor | None) -> Tensor:
    """What the discriminator sees: the augmented images, or (reference, image) pairs each augmented on its own."""
    if references is None:
        return models.augment(images)
    augmented = models.augment(torch.cat([images, references]))
    return torch.cat(augmented.chunk(2)[::-1], dim=1)


def _discriminator_step(models: _Models, batch: _Batch, fake: Tensor) -> tuple[Tensor, ...]:
    """One hinge-loss update of D; returns (loss, mean real logit, mean fake logit), detached."""
    real = batch.real
    pairs = batch.references is not None
    references = torch.cat([batch.references, batch.fake_references]) if pairs else None
    both = _judged(models, torch.cat([real, fake.detach()]), references)  # per-sample augment params
    with autocast(real.device):
        logits = models.discriminator(both, torch.cat([batch.real_labels, batch.fake_labels])).float()
    d_real, d_fake = logits.split(real.shape[0])
    models.augment.observe(d_real.detach())
    loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
    models.opt_d.zero_grad(set_to_none=True)
    loss.backward()
    models.opt_d.step()
    return loss.detach(), d_real.detach().mean(), d_fake.detach().mean()


def _generator_step(models: _Models, batch: _Batch, fake: Tensor) -> Tensor:
    """One update of G through the (frozen) discriminator; returns the detached adversarial loss.

    The logged loss leaves out the mode-seeking term so it stays comparable to loss_d.
    """
    discriminator = models.plain_discriminator
    discriminator.requires_grad_(False)  # skip D's weight gradients: only G is updated here
    with autocast(fake.device):
        adversarial = -discriminator(_judged(models, fake, batch.fake_references), batch.fake_labels).float().mean()
    loss = adversarial + models.plain_generator.mode_seeking_weight * _mode_seeking_penalty(fake, batch.z)
    models.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    models.opt_g.step()
    discriminator.requires_grad_(True)
    return adversarial.detach()


@torch.no_grad()
def _update_ema(ema: nn.Module, generator: nn.Module, decay: float, step: int) -> None:
    # Warm the decay up (TF's num_updates rule): with a fixed 0.999 over a few hundred steps the
    # average would still be ~70% the random initial weights.
    decay = min(decay, (1 + step) / (10 + step))
    for ema_param, param in zip(ema.parameters(), generator.parameters()):
        ema_param.lerp_(param, 1.0 - decay)


@torch.no_grad()
def _recalibrate_batch_norm(ema: Generator | ExemplarGenerator, *, seed: int, device: torch.device) -> None:
    """Re-estimate the EMA generator's batch-norm statistics from its own activations.

    The running statistics tracked during training belong to the raw generator's latest weights,
    not to the averaged ones; using them in eval mode would mis-scale every layer.
    """
    rng = torch.Generator().manual_seed(seed)
    with recalibrating_batch_norm(ema):
        for _ in range(BN_RECALIBRATION_BATCHES):
            z = torch.randn(BN_RECALIBRATION_BATCH_SIZE, ema.z_dim, generator=rng).to(device)
            y = torch.randint(0, ema.num_classes, (BN_RECALIBRATION_BATCH_SIZE,), generator=rng).to(device)
            with autocast(device):
                ema(z, y)


def _log_entry(step: int, losses: tuple[Tensor, ...], p: float, r: float | None) -> dict:
    loss_d, loss_g, d_real, d_fake = (value.item() for value in losses)
    return {"step": step, "loss_d": loss_d, "loss_g": loss_g, "d_real": d_real, "d_fake": d_fake, "p": p,
            "r": r}


# --- checkpoints: everything a resumed run needs to continue exactly where the killed one stopped ---------------

CHECKPOINT_FILE = "checkpoint.safetensors"
OPTIMIZERS = ("opt_g", "opt_d")  # _Models' optimizer attributes, each saved as a part of that name


def _stateful(models: _Models) -> dict[str, nn.Module]:
    """The modules a checkpoint holds, by part name (the plain ones: a checkpoint never depends on DDP)."""
    return {"generator": models.plain_generator, "discriminator": models.plain_discriminator, "ema": models.ema,
            "augment": models.augment}


def _save_checkpoint(path: Path, models: _Models, step: int, history: list[dict], states: list[dict],
                     fingerprint: str) -> None:
    tensors = {name: module.state_dict() for name, module in _stateful(models).items()} | random_parts(states)
    meta = {"step": step, "history": history}
    for name in OPTIMIZERS:
        slots, meta[name] = optimizer_parts(name, getattr(models, name))
        tensors |= slots
    save_checkpoint(path, tensors, meta, fingerprint)


def _checked_state(saved: Saved, models: _Models, world: World) -> dict:
    """The checkpoint's parts, each checked to fit the models before anything is loaded into them."""
    return {"modules": {name: module_state(saved, name, module) for name, module in _stateful(models).items()},
            "optimizers": {name: optimizer_state(saved, name, getattr(models, name)) for name in OPTIMIZERS},
            "random": random_state(saved, world, "batches"),
            "step": int(saved.meta["step"]), "history": list(saved.meta["history"])}


def _resume(checkpoint: Checkpointing | None, models: _Models, rng: torch.Generator, device: torch.device,
            world: World) -> tuple[int, list[dict]]:
    """Load a matching, whole checkpoint into the models; (steps already done, history so far), or (0, [])."""
    if checkpoint is None:
        return 0, []
    loaded = load_checkpoint(checkpoint.folder / CHECKPOINT_FILE, checkpoint.fingerprint,
                             lambda saved: _checked_state(saved, models, world))
    if loaded is None:
        return 0, []
    for name, module in _stateful(models).items():
        module.load_state_dict(loaded["modules"][name])
    for name, state in loaded["optimizers"].items():
        getattr(models, name).load_state_dict(state)
    if loaded["random"] is not None:
        restore_random(loaded["random"], device, batches=rng)
    log.info("resuming GAN training from step %d (augmentation p = %.3f)", loaded["step"], float(models.augment.p))
    return loaded["step"], loaded["history"]


def train_gan(
    images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: GanConfig, device: torch.device,
    checkpoint: Checkpointing | None = None, world: World = World(),
) -> TrainedGan:
    """Train a class-conditional GAN on uint8 NHWC `images`; return the EMA generator and a loss log.

    With `checkpoint`, the state is saved every `checkpoint.every` steps and a matching checkpoint is resumed
    (step count, augmentation strength, optimiser moments and random streams included); it is deleted once
    training ends. Under torchrun (`world.size` > 1) each process draws its own batches and DDP averages the
    gradients; only the main process saves.
    """
    _validate_training_images(images)
    _validate_labels(labels, images.shape[0], num_classes)
    device = torch.device(device)
    _parse_policy(cfg.diffaugment)  # fail on a bad policy before any work
    torch.manual_seed(cfg.seed)  # network init: the same on every process
    rng = torch.Generator().manual_seed(cfg.seed + world.rank)  # batches and z: a local stream per process
    data = _to_device_tensors(images, labels, device)
    n, resolution, channels = images.shape[0], images.shape[1], images.shape[3]
    models = _build_models(cfg, data, num_classes=num_classes, channels=channels, resolution=resolution,
                           device=device, world=world)
    torch.manual_seed(cfg.seed + 7919 * world.rank)  # DiffAugment draws: different on every process
    done, history = _resume(checkpoint, models, rng, device, world)
    log.info(
        "training GAN on %d images (%dx%dx%d, %d classes) for %d steps on %s%s",
        n, resolution, resolution, channels, num_classes, cfg.steps, device,
        f" x {world.size} processes" if world.size > 1 else "",
    )
    started = time.perf_counter()
    progress = Progress(range(done + 1, cfg.steps + 1), desc="gan", unit="step", logger=log,
                        disable=None if world.is_main else True)
    for step in progress:
        batch = _sample_batch(data, cfg, rng)
        with autocast(device):
            fake = models.generator(batch.z, batch.fake_labels, batch.fake_references)  # D sees it detached
        loss_d, d_real, d_fake = _discriminator_step(models, batch, fake)
        loss_g = _generator_step(models, batch, fake)
        r = models.augment.adjust(step, cfg.batch_size * world.size)
        _update_ema(models.ema, models.plain_generator, cfg.ema_decay, step)
        if step % cfg.log_every == 0:
            history.append(_log_entry(step, (loss_d, loss_g, d_real, d_fake), float(models.augment.p), r))
            progress.set_postfix(loss_d=f"{history[-1]['loss_d']:.3f}", loss_g=f"{history[-1]['loss_g']:.3f}",
                                 p=f"{history[-1]['p']:.2f}")
        if checkpoint and step % checkpoint.every == 0 and step < cfg.steps:
            states = random_states(device, world, batches=rng)
            if world.is_main:
                _save_checkpoint(checkpoint.folder / CHECKPOINT_FILE, models, step, history, states,
                                 checkpoint.fingerprint)
    progress.close()
    _recalibrate_batch_norm(models.ema, seed=cfg.seed, device=device)
    log.info("GAN trained: steps %d-%d in %.1f s, augmentation p = %.3f", done + 1, cfg.steps,
             time.perf_counter() - started, float(models.augment.p))
    if checkpoint and world.is_main:
        (checkpoint.folder / CHECKPOINT_FILE).unlink(missing_ok=True)  # the stage's outputs now hold the result
    return TrainedGan(generator=models.ema.cpu().eval(), history=history, augment_p=float(models.augment.p),
                      resumed_from=done)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(
    generator: Generator | ExemplarGenerator, *, per_class: int, z_dim: int, seed: int, device: torch.device,
    truncation: float = 1.0, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Sample exactly `per_class` images for every class, class-major; returns (uint8 NHWC, int64 labels).

    Moves `generator` to `device` and puts it in eval mode. z is drawn on CPU from a local generator,
    so the same seed gives the same latents on any device and for any batch_size.
    """
    if per_class < 1 or batch_size < 1:
        raise ValueError(f"per_class and batch_size must be at least 1, got {per_class} and {batch_size}")
    if z_dim != generator.z_dim:
        raise ValueError(f"z_dim {z_dim} does not match the generator's z_dim {generator.z_dim}")
    device = torch.device(device)
    generator.to(device).eval()
    labels = torch.arange(generator.num_classes).repeat_interleave(per_class)
    z = torch.randn(labels.shape[0], z_dim, generator=torch.Generator().manual_seed(seed)) * truncation
    references = generator.references(labels.to(device))  # None, or the exemplars in turn within each class
    chunks = []
    for start in range(0, labels.shape[0], batch_size):
        part = slice(start, start + batch_size)
        z_batch, y_batch = z[part].to(device), labels[part].to(device)
        with autocast(device):
            chunks.append(_to_uint8_nhwc(generator(z_batch, y_batch, None if references is None else references[part])))
    return np.concatenate(chunks), labels.numpy()


def sample_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """One row per class (in class order), up to `per_class` of its images, 2px padding; uint8 HxWxC."""
    _validate_uint8_nhwc(images)
    _validate_labels(labels, images.shape[0], num_classes)
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    cells = np.full((num_classes, per_class, *images.shape[1:]), GRID_PAD_VALUE, dtype=np.uint8)  # short rows: blank
    for row in range(num_classes):
        mine = images[labels == row][:per_class]
        cells[row, :len(mine)] = mine
    return grid(cells.reshape(-1, *images.shape[1:]), per_class, pad=GRID_PADDING, ground=GRID_PAD_VALUE)
