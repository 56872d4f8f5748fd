"""Settings chosen from the data: `collect.channels: auto` and `collect.image_size: auto` for a folder or CSV of
the user's own pictures, and warnings when explicit settings do not fit the pictures (the bundled digits' 32 px
grayscale on colour photos).

Only the files' headers are read (mode and size), before decoding, so a thousand photos take a fraction of a
second. A file whose header cannot be read is skipped here; decoding then rejects it with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from pipeline.runtime.params import AUTO, CollectParams

log = logging.getLogger(__name__)

# The largest native input of the packaged ImageNet backbones (EfficientNet-Lite0/1/2: 224, 240, 260 px): storing
# more than this buys a pretrained backbone nothing, so `image_size: auto` stops there.
AUTO_MAX_SIDE = 260
AUTO_MIN_SIDE = 32
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
SMALL_FOR_PHOTOS = 64  # a stored side below this, on pictures four times larger, throws most of them away


@dataclasses.dataclass(frozen=True)
class Looked:
    """What the headers say: how many pictures could be read, how many are in colour, their shorter sides."""

    read: int
    colour: int
    shorter_sides: np.ndarray

    @staticmethod
    def at(files: Iterable[Path]) -> "Looked":
        colour, sides = 0, []
        for file in files:
            try:
                with Image.open(file) as image:
                    colour += image.mode not in GREY_MODES
                    sides.append(min(image.size))
            except Exception:  # noqa: BLE001 - any unreadable header: decoding will reject the file and say why
                continue
        return Looked(len(sides), colour, np.array(sides, dtype=np.int64))


def choose(params: CollectParams, looked: Looked) -> tuple[CollectParams, dict]:
    """`params` with `auto` resolved, and a record of what was chosen and why, with warnings, for the log, the
    summary and the data card."""
    record: dict = {"warnings": []}
    channels, size = params.channels, params.image_size
    median = int(np.median(looked.shorter_sides)) if looked.read else 0
    share = looked.colour / looked.read if looked.read else 0.0
    if channels == AUTO:
        channels = 3 if looked.colour else 1
        record["channels"] = {"value": channels, "why": f"{looked.colour} of {looked.read} pictures are in colour"}
    elif channels == 1 and share > 0.5:
        record["warnings"].append(
            f"collect.channels is 1 but {looked.colour} of {looked.read} pictures are in colour: they are stored "
            "as grayscale, which throws colour away; set collect.channels: auto (or 3), or use the photos preset "
            "(README, Your own photos)")
    if size == AUTO:
        size = int(np.clip(median, AUTO_MIN_SIDE, AUTO_MAX_SIDE)) if looked.read else AUTO_MAX_SIDE
        record["image_size"] = {"value": size, "why": f"the pictures' median shorter side is {median} px, and the "
                                f"packaged backbones' largest native input {AUTO_MAX_SIDE} px"}
    elif size < SMALL_FOR_PHOTOS and median >= 4 * size:
        record["warnings"].append(
            f"collect.image_size is {size} px but the pictures' median shorter side is {median} px: pretrained "
            "backbones see most detail at about 224 px; set collect.image_size: auto, or use the photos preset")
    for key in ("channels", "image_size"):
        if key in record:
            log.info("collect.%s: auto -> %s (%s)", key, record[key]["value"], record[key]["why"])
    for warning in record["warnings"]:
        log.warning("%s", warning)
    return dataclasses.replace(params, channels=channels, image_size=size), record
