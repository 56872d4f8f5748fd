"""Stage 4, finetune: one fold x one variant. Fine-tune a timm backbone on the fold's training images (plus the
augmentation policy and the fold's GAN samples when the variant asks), then write class probabilities for the
fold's validation images and for the external test set.

Every variant gets the same number of optimiser steps (epochs are counted over the fold's real images), so the
ablation compares ingredients, not compute.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from pipeline import atomic, paths
from pipeline.augmentations import augment_image, load_policy
from pipeline.backbones import Classifier, create_backbone
from pipeline.errors import PipelineError
from pipeline.images import Collected, load_collected
from pipeline.params import FinetuneParams, Variant
from pipeline.runtime import autocast, cli, pick_device, recalibrating_batch_norm, seed_everything, stage_args

log = logging.getLogger(__name__)
EVAL_BATCH = 256


@dataclass(frozen=True)
class FinetuneInputs:
    collected: Path  # collect's output folder
    policy: Path  # augment's policy.json (read only when the variant augments)
    synthetic: Path  # synthesize's folder for this fold (read only when the variant uses synthetic data)


class ImageSet(Dataset):
    """Decoded uint8 HxWxC images held in memory; the policy (if any) runs per item, in the loader."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, policy=None):
        self.images, self.targets, self.policy = images, targets, policy

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        if self.policy is not None:
            image = augment_image(self.policy, image)
        return to_tensor(image[None])[0], int(self.targets[i])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """N x H x W x C uint8 -> N x C x H x W float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to the device; channels-last (which helps convolutions on CUDA tensor cores) only there."""
    if device.type != "cuda":
        return x
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def load_training_set(collected: Collected, inputs: FinetuneInputs, fold: int, variant: Variant,
                      seed: int, repeat: int = 0) -> tuple[ImageSet, int]:
    """The fold's training images (real first, then any GAN samples) and how many of them are synthetic."""
    images, targets = collected.select(collected.fold_split(fold, repeat)[0])
    synthetic = 0
    if variant.synthetic:
        try:
            with np.load(inputs.synthetic / paths.SAMPLES_FILE) as data:
                fake, fake_targets = data["images"], data["labels"].astype(np.int64)
        except FileNotFoundError:
            raise PipelineError(f"{inputs.synthetic}: no GAN samples for fold {fold}; run `dvc repro synthesize`")
        if fake.shape[1:] != images.shape[1:]:
            raise PipelineError(f"GAN samples are {fake.shape[1:]} but the data is {images.shape[1:]}; "
                                "re-run `dvc repro synthesize`")
        images, targets, synthetic = np.concatenate([images, fake]), np.concatenate([targets, fake_targets]), len(fake)
    policy = None
    if variant.augment:
        policy = load_policy(inputs.policy)
        policy.set_random_seed(seed)  # albumentations ignores global seeds
    return ImageSet(images, targets, policy), synthetic


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up to the base rate, then cosine decay to zero."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_optimizer(model: Classifier, params: FinetuneParams, pretrained: bool) -> torch.optim.Optimizer:
    body, head = model.param_groups()
    # A randomly initialised body has nothing to preserve, so it learns at the head's rate.
    body_lr = params.lr_body if pretrained else params.lr_head
    return torch.optim.AdamW([{"params": body, "lr": body_lr}, {"params": head, "lr": params.lr_head}],
                             weight_decay=params.weight_decay)


def train(model: Classifier, data: ImageSet, params: FinetuneParams, steps_per_epoch: int,
          device: torch.device, pretrained: bool) -> list[dict]:
    generator = torch.Generator().manual_seed(params.seed)
    batch = min(params.batch_size, len(data))
    sampler = RandomSampler(data, num_samples=steps_per_epoch * batch, generator=generator)
    loader = DataLoader(data, batch_size=batch, sampler=sampler, drop_last=True, num_workers=0,
                        pin_memory=device.type == "cuda")
    optimizer = make_optimizer(model, params, pretrained)
    total = params.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, params.warmup_epochs * steps_per_epoch))
    history = []
    model.train()
    progress = tqdm(range(params.epochs), desc="finetune", disable=None)
    for epoch in progress:
        losses, correct, seen = [], 0, 0
        for x, y in loader:
            x = to_device(x, device)
            y = y.to(device, non_blocking=True)
            with autocast(device):
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=params.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "train_accuracy": correct / seen,
                        "lr_head": scheduler.get_last_lr()[1]})
        progress.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc=f"{history[-1]['train_accuracy']:.2f}")
    return history


@torch.no_grad()
def recalibrate_batch_norm(model: Classifier, images: np.ndarray, device: torch.device) -> None:
    """Re-estimate batch-norm statistics on the un-augmented training images. After a few hundred steps the
    running averages still mix in ImageNet's statistics (momentum 0.1), which are far from small grayscale
    images; exact averages over the training set make eval-mode predictions match what training saw."""
    if len(images) < 2:
        return  # batch norm cannot estimate a variance from one image
    with recalibrating_batch_norm(model):
        for start in range(0, len(images), EVAL_BATCH):
            chunk = images[start:start + EVAL_BATCH]
            if len(chunk) > 1:
                with autocast(device):
                    model(to_device(to_tensor(chunk), device))


@torch.inference_mode()
def predict(model: Classifier, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Class probabilities (float32, N x classes) for uint8 NHWC images."""
    model.eval()
    out = []
    for start in range(0, len(images), EVAL_BATCH):
        x = to_device(to_tensor(images[start:start + EVAL_BATCH]), device)
        with autocast(device):
            logits = model(x)
        out.append(logits.float().softmax(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.backbone.num_classes), np.float32)


def run(params: FinetuneParams, variant: Variant, fold: int, inputs: FinetuneInputs, output: Path,
        repeat: int = 0) -> dict:
    """Train one fold (of one repeat) x variant; write predictions.npz, history.json and meta.json into `output`."""
    seed = params.seed + fold + 1000 * repeat
    seed_everything(seed)
    device = pick_device(params.device)
    collected = load_collected(inputs.collected)
    data, synthetic = load_training_set(collected, inputs, fold, variant, seed, repeat)
    val_rows, external_rows = collected.fold_split(fold, repeat)[1], collected.external
    real = len(data) - synthetic
    steps_per_epoch = math.ceil(real / min(params.batch_size, len(data)))
    model = Classifier(create_backbone(params.backbone, variant.weights), num_classes=len(collected.classes),
                       input_size=params.input_size)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    history = train(model, data, params, steps_per_epoch, device, pretrained=variant.weights != "none")
    recalibrate_batch_norm(model, data.images[:real], device)  # real images come first in the training set
    train_seconds = time.perf_counter() - start
    val_images, val_targets = collected.select(val_rows)
    ext_images, _ = collected.select(external_rows)
    start = time.perf_counter()
    val_probs, ext_probs = predict(model, val_images, device), predict(model, ext_images, device)
    predict_seconds = time.perf_counter() - start
    meta = {"repeat": repeat, "fold": fold, "variant": variant.__dict__, "backbone": params.backbone,
            "device": str(device),
            "train_real": real, "train_synthetic": synthetic, "steps": params.epochs * steps_per_epoch,
            "train_seconds": round(train_seconds, 2), "predict_seconds": round(predict_seconds, 2),
            "val_accuracy": float((val_probs.argmax(1) == val_targets).mean())}
    with atomic.atomic_dir(output) as tmp:
        np.savez_compressed(tmp / paths.PREDICTIONS_FILE, val_index=val_rows["index"].to_numpy(),
                            val_probs=val_probs, test_index=external_rows["index"].to_numpy(), test_probs=ext_probs)
        atomic.write_text(tmp / "history.json", json.dumps(history, indent=1) + "\n")
        atomic.write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
    log.info("finetune repeat %d fold %d: %d real + %d synthetic images, %.1fs training, validation accuracy %.3f",
             repeat, fold, real, synthetic, train_seconds, meta["val_accuracy"])
    return meta


def main(argv: list[str] | None = None) -> None:
    args, params = stage_args(__doc__, argv, fold=True, variant=True)
    if args.variant not in params.variants:
        raise PipelineError(f"--variant {args.variant!r} is not in params `variants` ({', '.join(params.variants)})")
    inputs = FinetuneInputs(paths.COLLECTED, paths.AUGMENT / paths.POLICY_FILE,
                            paths.synthetic_dir(args.repeat, args.fold))
    output = paths.finetune_dir(args.repeat, args.fold, args.variant)
    run(params.finetune, params.variants[args.variant], args.fold, inputs, output, args.repeat)


if __name__ == "__main__":
    cli(main)
