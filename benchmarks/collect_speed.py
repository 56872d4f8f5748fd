"""How fast the collect stage takes in a folder of JPEGs, against a bare Pillow loop in the same run.

    python benchmarks/collect_speed.py [--images 10000] [--side 256] [--keep DIR]

It writes `--images` distinct JPEGs of `--side` px (10 classes, random smooth colour patterns) into a temporary
folder, then times, on the same files:
- baseline: one process opening, decoding and resizing each file with Pillow, nothing else;
- collect with one worker process, and with every core (`collect.workers: 0`): decoding, EXIF, mode conversion,
  hashes, near-duplicate search, folds and all outputs.
It prints images/s for each and the ratios. The target: 10,000 JPEGs of 256 px within 60 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `pipeline` importable
from pipeline.data.sources import worker_count  # noqa: E402
from pipeline.runtime.params import load_params  # noqa: E402
from pipeline.stages import collect  # noqa: E402

CLASSES = 10


def write_jpegs(root: Path, count: int, side: int) -> list[Path]:
    """Distinct pictures: an 8 x 8 random colour field enlarged smoothly, plus grain, saved at quality 90."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((side, side),
                                                                                         Image.Resampling.BICUBIC)
        pixels = np.clip(np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (side, side, 3)), 0, 255)
        path = root / f"class{i % CLASSES}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
        files.append(path)
    return files


def bare_pillow(files: list[Path], size: int) -> float:
    """Seconds for the least any loader must do: open, decode, resize to the stored size."""
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as image:
            image.convert("L").resize((size, size), Image.Resampling.LANCZOS)
    return time.perf_counter() - start


def timed_collect(raw: Path, out: Path, workers: int) -> float:
    base = load_params("params.yaml").collect
    params = dataclasses.replace(base, source="folder", folder=str(raw), workers=workers)
    start = time.perf_counter()
    summary = collect.run(params, out / f"collected{workers}", out / f"reports{workers}")
    seconds = time.perf_counter() - start
    assert summary["accepted"] == summary["inputs"], summary  # every synthetic file is a distinct, valid image
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--keep", type=Path, help="write the JPEGs and outputs here and keep them")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="collect-speed-"))
    try:
        start = time.perf_counter()
        files = write_jpegs(work / "raw", args.images, args.side)
        print(f"wrote {len(files)} JPEGs of {args.side} px in {time.perf_counter() - start:.1f} s")
        size = load_params("params.yaml").collect.image_size
        bare_pillow(files[:200], size)  # warm the page cache and Pillow's codecs
        baseline = bare_pillow(files, size)
        one = timed_collect(work / "raw", work, workers=1)
        cores = worker_count(0)
        every = timed_collect(work / "raw", work, workers=0)
        n = len(files)
        print(f"{'':34}{'seconds':>9}{'images/s':>10}{'vs bare':>9}")
        for name, seconds in [("bare Pillow loop (1 process)", baseline), ("collect, 1 worker", one),
                              (f"collect, {cores} workers (default)", every)]:
            print(f"{name:34}{seconds:9.1f}{n / seconds:10.0f}{seconds / baseline:9.2f}")
        print(f"speed-up from {cores} workers: {one / every:.2f}x; "
              f"target: {n} images within {60 * n / 10_000:.0f} s -> {'met' if every <= 60 * n / 10_000 else 'MISSED'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
