"""Stage 2, augment: build the albumentations policy from params, save it, and preview it on training images.

Writes `policy.json` (albumentations' own serialisation, which finetune loads) and `preview.png`: each pair
of rows shows real labelled images and, under them, one augmented draw of each.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.augmentation.policy import augment_image, build_policy, describe, save_policy
from pipeline.data.collected import load_collected
from pipeline.data.pictures import grid, save_png
from pipeline.runtime import atomic, paths
from pipeline.runtime.cli import cli, stage_args
from pipeline.runtime.params import AugmentParams

log = logging.getLogger(__name__)
# The params sections this stage reads; dvc.yaml lists the same (a test checks both).
PARAMS = ("augment",)
PREVIEW_COLUMNS = 8


def preview(policy, images: np.ndarray, columns: int = PREVIEW_COLUMNS) -> np.ndarray:
    """Rows of originals interleaved with rows of their augmented versions."""
    rows = []
    for start in range(0, len(images), columns):
        chunk = images[start:start + columns]
        rows.append(chunk)
        rows.append(np.stack([augment_image(policy, image) for image in chunk]))
    padded = [np.concatenate([r, np.zeros((columns - len(r), *r.shape[1:]), np.uint8)]) for r in rows]
    return grid(np.concatenate(padded), columns)


def run(params: AugmentParams, collected_dir: Path, output: Path) -> None:
    collected = load_collected(collected_dir)
    images, _ = collected.select(collected.labelled)
    rng = np.random.default_rng(params.seed)
    shown = images[np.sort(rng.choice(len(images), min(params.preview_images, len(images)), replace=False))]
    policy = build_policy(params.transforms, params.seed)
    with atomic.atomic_dir(output) as tmp:
        save_policy(policy, tmp / paths.POLICY_FILE)
        scale = max(1, 96 // images.shape[1])  # enlarge tiny images so a person can see the transforms
        save_png(tmp / paths.PREVIEW_FILE, preview(policy, shown), scale=scale)
    log.info("augment: policy %s, preview of %d images", describe(params.transforms), len(shown))


def main(argv: list[str] | None = None) -> None:
    _, params = stage_args(__doc__, argv, PARAMS)
    run(params.augment, paths.COLLECTED, paths.AUGMENT)


if __name__ == "__main__":
    cli(main)
