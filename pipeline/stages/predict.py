"""Predict the classes of image files with a model the final stage wrote.

    python -m pipeline.stages.predict PATH... [--model data/model] [--device auto] [--out predictions.csv]

PATH may be a file, a folder (searched recursively for images) or a glob. Every file is prepared exactly as
collect prepared the training images. Writes a CSV with one row per file (path, predicted class, its probability,
the probability of every class, and the error for a file that could not be read) and prints a short table. A file
that cannot be read does not stop the run; the exit status is 1 when any failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.inference import model as inference
from pipeline.runtime import atomic, paths
from pipeline.runtime.cli import cli, setup_logging
from pipeline.runtime.compute import pick_device
from pipeline.training.loop import predict

log = logging.getLogger(__name__)
SHOWN_ROWS = 20


def probabilities(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch: int) -> np.ndarray:
    """Class probabilities for uint8 N x H x W x C images, in batches; channels-last and bf16 on CUDA (the
    training loop's own prediction)."""
    return predict(model, images, device, int(model.backbone.num_classes), batch)


def run(patterns: list[str], model_dir: Path, device: torch.device, batch: int = 32) -> pd.DataFrame:
    """One row per file the patterns name, in order: predictions, or the reason a file could not be used."""
    model, card = inference.load_model(model_dir, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    reads = [inference.read_image(shown, path, card) for shown, path in inference.expand(patterns)]
    good = [r for r in reads if r.image is not None]
    probs = probabilities(model, np.stack([r.image for r in good]), device, batch) if good else None
    classes = card["classes"]
    ok = np.array([r.image is not None for r in reads], dtype=bool)
    table = np.full((len(reads), len(classes)), np.nan, dtype=np.float32)
    if probs is not None:
        table[ok] = probs
    best = np.nan_to_num(table, nan=-1.0).argmax(1)
    out = pd.DataFrame({"path": [r.path for r in reads],
                        "predicted": np.where(ok, np.asarray(classes, dtype=object)[best], ""),
                        "probability": np.where(ok, table[np.arange(len(reads)), best], np.nan),
                        "error": [r.error for r in reads]})
    return pd.concat([out, pd.DataFrame(table, columns=[f"p_{c}" for c in classes])], axis=1)


def summary(table: pd.DataFrame) -> str:
    shown = table[["path", "predicted", "probability", "error"]].head(SHOWN_ROWS)
    text = shown.to_string(index=False, float_format=lambda v: f"{v:.3f}", max_colwidth=60)
    failed = int((table.error != "").sum())
    more = f"\n… and {len(table) - SHOWN_ROWS} more" if len(table) > SHOWN_ROWS else ""
    return f"{text}{more}\n{len(table)} files: {len(table) - failed} predicted, {failed} could not be read"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("paths", nargs="+", help="image files, folders or globs")
    parser.add_argument("--model", type=Path, default=paths.MODEL, help=f"model folder (default: {paths.MODEL})")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write")
    args = parser.parse_args(argv)
    setup_logging()
    table = run(args.paths, args.model, pick_device(args.device), args.batch)
    atomic.write_text(args.out, table.to_csv(index=False))
    print(summary(table))
    print(f"written to {args.out}")
    if (table.error != "").any():
        sys.exit(1)


if __name__ == "__main__":
    cli(main)
