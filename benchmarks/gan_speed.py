"""GAN training speed: steps per second at a given resolution and batch, on the device `auto` picks (CUDA with
bf16 autocast when there is one), with the default augmentation and, as the baseline in the same run, without it.

    python benchmarks/gan_speed.py [--resolution 64] [--batch 64] [--steps 50] [--device auto]

Random images stand in for data: speed does not depend on what the pictures show.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `pipeline` importable
from pipeline.gan.conditional import train_gan  # noqa: E402
from pipeline.runtime.compute import pick_device  # noqa: E402
from pipeline.runtime.params import load_params  # noqa: E402

CLASSES, PER_CLASS = 10, 10


def steps_per_second(cfg, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    warm = dataclasses.replace(cfg, steps=3, log_every=3)
    train_gan(images, labels, CLASSES, warm, device)  # first calls pick kernels and allocate memory
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_gan(images, labels, CLASSES, cfg, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return cfg.steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (CLASSES * PER_CLASS, args.resolution, args.resolution, args.channels), np.uint8)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    cfg = dataclasses.replace(load_params().synthesize, steps=args.steps, batch_size=args.batch,
                              log_every=args.steps)
    plain = steps_per_second(dataclasses.replace(cfg, diffaugment="", ada_target=0.0), images, labels, device)
    default = steps_per_second(cfg, images, labels, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; {args.resolution} px, {args.channels} channels, batch {args.batch}, {args.steps} steps"
          f"{', bf16 autocast' if device.type == 'cuda' else ''}")
    print(f"no augmentation (baseline)          {plain:8.2f} steps/s  {plain * args.batch:9.0f} images/s")
    print(f"DiffAugment + adaptive p (default)  {default:8.2f} steps/s  {default * args.batch:9.0f} images/s"
          f"  ratio {default / plain:.2f}")


if __name__ == "__main__":
    main()
