"""Image grids and PNG files for the previews, data cards and sample grids."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.runtime import atomic


def grid(images: np.ndarray, columns: int, pad: int = 2, ground: int = 128) -> np.ndarray:
    """Tile N x H x W x C uint8 images into one image, `columns` per row, `pad` pixels apart on a `ground` of that
    grey level (mid-grey by default: it frames both dark and light pictures)."""
    n, h, w, c = images.shape
    rows = max(1, -(-n // columns))
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), ground, dtype=np.uint8)
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
