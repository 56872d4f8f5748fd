"""Image decoding, the compact on-disk dataset the collect stage writes, and image grids for previews.

The whole dataset is one `images.npz` (uint8, N x H x W x C) plus `manifest.csv`: DVC hashes two files
instead of thousands on every `dvc repro`.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from pipeline import atomic
from pipeline.errors import PipelineError
from pipeline.paths import IMAGES_FILE, MANIFEST_FILE

MANIFEST_COLUMNS = ["index", "path", "label", "target", "sha256", "width", "height", "split", "fold"]
LABELLED, EXTERNAL = "labelled", "external"
MODES = {1: "L", 3: "RGB"}


def to_square(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """Centre-crop to a square, resize to `size` and return an HxWxC uint8 array with `channels` channels."""
    image = ImageOps.exif_transpose(image)
    if image.mode not in ("L", "RGB"):
        # Flatten transparency onto black, as digits and most icons are drawn on a dark ground.
        image = image.convert("RGBA")
        ground = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(ground, image)
    image = image.convert(MODES[channels])
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8).reshape(size, size, channels)


def decode_file(path: Path, size: int, channels: int) -> tuple[np.ndarray, int, int]:
    """Decode an image file fully; return the square array and the original width and height."""
    with Image.open(path) as image:
        image.load()  # decode now, so a truncated file fails here and not later
        width, height = image.size
        return to_square(image, size, channels), width, height


def pixel_sha256(image: np.ndarray) -> str:
    """Hash of the decoded pixels and their shape: the same picture saved twice hashes the same."""
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Collected:
    """The collect stage's output: all images, their manifest and the class names (index = target)."""

    images: np.ndarray
    manifest: pd.DataFrame
    classes: tuple[str, ...]

    @property
    def labelled(self) -> pd.DataFrame:
        return self.manifest[self.manifest.split == LABELLED]

    @property
    def external(self) -> pd.DataFrame:
        return self.manifest[self.manifest.split == EXTERNAL]

    @property
    def folds(self) -> list[int]:
        return sorted(int(f) for f in self.labelled.fold.unique())

    def fold_split(self, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(training rows, validation rows) of one fold; no row is in both."""
        if fold not in self.folds:
            raise PipelineError(f"fold {fold} is not in the collected data (folds: {self.folds}); "
                                "re-run `dvc repro collect` after changing collect.folds")
        rows = self.labelled
        return rows[rows.fold != fold], rows[rows.fold == fold]

    def select(self, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Images and integer targets of some manifest rows."""
        index = rows["index"].to_numpy()
        return self.images[index], rows.target.to_numpy(dtype=np.int64)


def save_collected(folder: Path, images: np.ndarray, manifest: pd.DataFrame, classes: list[str]) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images, classes=np.array(classes))
    atomic.write_bytes(folder / IMAGES_FILE, buffer.getvalue())
    atomic.write_text(folder / MANIFEST_FILE, manifest[MANIFEST_COLUMNS].to_csv(index=False))


def load_collected(folder: Path) -> Collected:
    folder = Path(folder)
    try:
        with np.load(folder / IMAGES_FILE) as data:
            images, classes = data["images"], tuple(str(c) for c in data["classes"])
        manifest = pd.read_csv(folder / MANIFEST_FILE, keep_default_na=False)
    except FileNotFoundError as err:
        raise PipelineError(f"{err.filename} is missing: run `dvc repro collect` first") from None
    if len(manifest) != len(images) or list(manifest["index"]) != list(range(len(images))):
        raise PipelineError(f"{folder}: manifest.csv and images.npz disagree; re-run `dvc repro collect`")
    return Collected(images, manifest, classes)


def grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """Tile N x H x W x C uint8 images into one image, `columns` per row, on a grey ground."""
    n, h, w, c = images.shape
    rows = max(1, -(-n // columns))
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
    return out


def save_png(path: Path, image: np.ndarray, scale: int = 1) -> None:
    """Save an HxWxC uint8 array as PNG, optionally enlarged with nearest-neighbour so small images stay sharp."""
    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    atomic.write_bytes(path, buffer.getvalue())
