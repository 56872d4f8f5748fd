"""Storage and loading at photo scale: `collect` on 2,000 photos (clothing-small's 1,000 and their mirror images,
about 256 x 341 px, stored at 256 px by the photos preset), the size of what it stores, how long a stage takes to
load it, and a no-op `dvc repro` of the photos preset's whole stage graph.

    python benchmarks/photo_storage.py [--photos ../shared/datasets/clothing-small] [--repeats 5]

Each figure is printed beside a baseline measured in the same run: loading against reading the same pixels as
one uncompressed .npy file, and the no-op `dvc repro` against `dvc --version`. Only collect really runs; every
later stage's outputs are placeholders recorded with `dvc commit` (as in noop_repro.py), so the no-op times
DVC's checking of the real collected data and of the preset's stage graph.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks` importable
from pipeline import presets  # noqa: E402
from pipeline.data.collected import load_collected  # noqa: E402

from benchmarks import workspace  # noqa: E402
from benchmarks.noop_repro import seconds, time_noop  # noqa: E402

PHOTOS = workspace.ROOT.parent / "shared" / "datasets" / "clothing-small"


def doubled_folder(source: Path, dest: Path) -> int:
    """Every photo of `source`'s class folders, and its mirror image (a distinct picture for collect), in `dest`."""
    count = 0
    for photo in sorted(source.glob("*/*")):
        if not photo.is_file() or photo.suffix.lower() not in {".jpg", ".jpeg", ".png"}:
            continue
        folder = dest / photo.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(photo) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.save(folder / f"{photo.stem}.jpg", quality=95)
            ImageOps.mirror(image).save(folder / f"{photo.stem}-mirrored.jpg", quality=95)
        count += 2
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = workspace.make_repo(Path(tmp) / "repo")
        presets.apply("photos", repo / "params.yaml")
        files = doubled_folder(args.photos, repo / "data" / "raw")
        raw_bytes = sum(p.stat().st_size for p in (repo / "data" / "raw").rglob("*.jpg"))
        collect_seconds = seconds([sys.executable, "-m", "dvc", "repro", "collect"], repo)
        stored = repo / "data" / "collected"
        data = load_collected(stored)
        images = data.images
        load = workspace.best_of(lambda: load_collected(stored), 3)
        plain = Path(tmp) / "plain.npy"
        np.save(plain, images)
        plain_load = workspace.best_of(lambda: np.load(plain), 3)
        stored_bytes = sum(p.stat().st_size for p in stored.iterdir())
        print(f"{files} photos, {raw_bytes / 1e6:.1f} MB of JPEG; collect stored {len(images)} at "
              f"{images.shape[1]} x {images.shape[2]} x {images.shape[3]}: {stored_bytes / 1e6:.1f} MB on disk "
              f"({images.nbytes / 1e6:.1f} MB of pixels); `dvc repro collect` {collect_seconds:.1f} s")
        print(f"load_collected: {load:.2f} s; the same pixels as one uncompressed .npy: {plain_load:.2f} s "
              f"(ratio {load / plain_load:.1f})")
        stages, noop, version = time_noop(repo, args.repeats)
        print(f"no-op dvc repro of the photos preset's {stages} stages: median {statistics.median(noop):.2f} s "
              f"(min {min(noop):.2f}); dvc --version: median {statistics.median(version):.2f} s; "
              f"ratio {statistics.median(noop) / statistics.median(version):.1f}")


if __name__ == "__main__":
    main()
