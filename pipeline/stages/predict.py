"""Predict the classes of image files with a model the final stage wrote.

    python -m pipeline.stages.predict PATH... [--model data/model] [--device auto] [--batch 32] [--max-pixels N]
                                      [--out predictions.csv]

PATH may be a file, a folder (searched recursively for images) or a glob. Every file is prepared exactly as
collect prepared the training images, and refused by the same limits: a picture of more pixels than collect's
max_pixels is refused from its header, before decoding, so a decompression bomb cannot exhaust memory. Files are
read and predicted a batch at a time, so memory stays flat however many there are. Writes a CSV with one row per
file (path, predicted class, its probability, the probability of every class, and the error for a file or folder
that could not be read) and prints a short table. A file that cannot be read does not stop the run; the exit
status is 1 when any failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.inference import model as inference
from pipeline.runtime import atomic, paths
from pipeline.runtime.cli import cli, setup_logging
from pipeline.runtime.compute import channels_last, pick_device
from pipeline.runtime.progress import Progress
from pipeline.training.loop import predict

log = logging.getLogger(__name__)
SHOWN_ROWS = 20


def probabilities(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch: int) -> np.ndarray:
    """Class probabilities for uint8 N x H x W x C images, in batches; channels-last and bf16 on CUDA (the
    training loop's own prediction)."""
    return predict(model, images, device, int(model.backbone.num_classes), batch)


def batches(reads: Iterable[inference.Read], size: int) -> Iterator[list[inference.Read]]:
    """The reads in order, cut after every `size` usable images: only one batch of images is ever held, and each
    forward pass sees the images one pass over every file would have (the same numbers, whatever the failures)."""
    pending: list[inference.Read] = []
    usable = 0
    for read in reads:
        pending.append(read)
        usable += read.image is not None
        if usable == size:
            yield pending
            pending, usable = [], 0
    if pending:
        yield pending


def run(patterns: list[str], model_dir: Path, device: torch.device, batch: int = 32,
        max_pixels: int | None = None) -> pd.DataFrame:
    """One row per file the patterns name, in order: predictions, or the reason a file could not be used. Files are
    read and predicted `batch` at a time, so memory does not grow with their number. `max_pixels` overrides the
    card's limit for decompression bombs (0: none)."""
    model, card = inference.load_model(model_dir, device)
    channels_last(model)
    how = inference.preparation(card, max_pixels)
    named = inference.expand(patterns)
    classes = card["classes"]
    table = np.full((len(named), len(classes)), np.nan, dtype=np.float32)
    shown, errors = [], []
    with Progress(named, desc="predict", unit="file", logger=log) as files:
        for chunk in batches((inference.read_image(n, how) for n in files), batch):
            ok = np.flatnonzero([r.image is not None for r in chunk])
            if len(ok):
                images = np.stack([chunk[i].image for i in ok])
                table[len(shown) + ok] = probabilities(model, images, device, batch)
            shown += [r.path for r in chunk]
            errors += [r.error for r in chunk]
    return predictions_table(shown, errors, table, classes)


def predictions_table(shown: list[str], errors: list[str], table: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """path, predicted, probability, error, p_<class>... (a row without probabilities could not be read)."""
    ok = np.array([error == "" for error in errors], dtype=bool)
    best = np.nan_to_num(table, nan=-1.0).argmax(1)
    out = pd.DataFrame({"path": shown,
                        "predicted": np.where(ok, np.asarray(classes, dtype=object)[best], ""),
                        "probability": np.where(ok, table[np.arange(len(shown)), best], np.nan),
                        "error": errors})
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
    parser.add_argument("--max-pixels", type=int, help="refuse files with more pixels than this, before decoding "
                        "them (default: the limit collect used, from the model card; 0: no limit)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, not {args.batch}")
    if args.max_pixels is not None and args.max_pixels < 0:
        parser.error(f"--max-pixels must be 0 (no limit) or more, not {args.max_pixels}")
    setup_logging()
    table = run(args.paths, args.model, pick_device(args.device), args.batch, args.max_pixels)
    atomic.write_text(args.out, table.to_csv(index=False))
    print(summary(table))
    print(f"written to {args.out}")
    if (table.error != "").any():
        sys.exit(1)


if __name__ == "__main__":
    cli(main)
