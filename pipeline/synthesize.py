"""Stage 3, synthesize: per fold, a class-conditional GAN trained only on that fold's training images.

Writes `samples.npz` (uint8 images and their conditioning labels), `grid.png` (one row per class),
`generator.safetensors` (the EMA generator), `history.json` (losses) and `meta.json`, which records the
sha256 of every image the GAN was trained on, so anyone can check it never saw the fold's validation images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from pipeline import atomic, paths
from pipeline.gan import generate, sample_grid, train_gan
from pipeline.images import load_collected, save_png
from pipeline.params import SynthesizeParams
from pipeline.runtime import cli, pick_device, seed_everything, stage_args

log = logging.getLogger(__name__)
GRID_COLUMNS = 10


def run(params: SynthesizeParams, fold: int, collected_dir: Path, output: Path, repeat: int = 0) -> dict:
    collected = load_collected(collected_dir)
    train_rows, _ = collected.fold_split(fold, repeat)
    images, targets = collected.select(train_rows)
    # each fold's GAN its own random stream
    params = dataclasses.replace(params, seed=params.seed + fold + 1000 * repeat)
    seed_everything(params.seed)
    device = pick_device(params.device)
    start = time.perf_counter()
    trained = train_gan(images, targets, len(collected.classes), params, device)
    seconds = time.perf_counter() - start
    fake, labels = generate(trained.generator, per_class=params.samples_per_class, z_dim=params.z_dim,
                            seed=params.seed, device=device)
    meta = {"repeat": repeat, "fold": fold, "device": str(device), "steps": params.steps,
            "train_seconds": round(seconds, 2),
            "samples": len(fake), "classes": list(collected.classes),
            "trained_on_sha256": sorted(train_rows.sha256)}
    with atomic.atomic_dir(output) as tmp:
        np.savez_compressed(tmp / paths.SAMPLES_FILE, images=fake, labels=labels)
        tile = sample_grid(fake, labels, len(collected.classes), GRID_COLUMNS)
        save_png(tmp / "grid.png", tile, scale=max(1, 64 // images.shape[1]))
        state = {k: v.detach().cpu().contiguous() for k, v in trained.generator.state_dict().items()}
        save_file(state, str(tmp / "generator.safetensors"))
        atomic.write_text(tmp / "history.json", json.dumps(trained.history, indent=1) + "\n")
        atomic.write_text(tmp / "meta.json", json.dumps(meta, indent=1) + "\n")
    log.info("synthesize repeat %d fold %d: GAN trained on %d images in %.1fs, wrote %d samples", repeat, fold,
             len(images), seconds, len(fake))
    return meta


def main(argv: list[str] | None = None) -> None:
    args, params = stage_args(__doc__, argv, fold=True)
    run(params.synthesize, args.fold, paths.COLLECTED, paths.synthetic_dir(args.repeat, args.fold), args.repeat)


if __name__ == "__main__":
    cli(main)
