"""The compact on-disk dataset the collect stage writes, and how stages read it.

The whole dataset is one `images.npz` (uint8, N x H x W x C) plus `manifest.csv`: DVC hashes two files
instead of thousands on every `dvc repro`. The arrays are stored, not deflated: on 2,000 photos at 256 px zlib
saved a third of the size (256 of 393 MB) but made every stage's load 25 times slower (3.8 s against 0.15 s;
benchmarks/photo_storage.py), and every stage loads it.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.runtime import atomic
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.paths import IMAGES_FILE, MANIFEST_FILE

# One row per stored image. `group` joins near-duplicates (and a CSV's own groups): a group never spans folds.
# `source` says where the row came from (folder, csv, url, mnist, digits, lfw). One fold column per repeat.
# `part` says what an image is for: cross-validation (the labelled images), the development part of the external
# images (settings are chosen on it) or the final test (it only reports).
MANIFEST_COLUMNS = ["index", "path", "label", "target", "group", "sha256", "width", "height", "source", "split",
                    "part"]
FOLD_PREFIX = "fold_r"
# external: a fixed set (the rest of a bundled dataset, a folder's test/) that no variant, fold or final model
# trains on; collect.dev_fraction of it is the development part, the rest the final test.
# unlabelled: the pool without labels (data/raw/unlabelled/, a CSV's rows without a label, a bundled dataset's
# images beyond the external set) that semi-supervised variants learn from and "what to label next" ranks;
# label "" and target -1, its part is `unlabelled` too. A pool image near-duplicating an external image is
# rejected; one near-duplicating a labelled image is left out of the folds that validate on that image.
LABELLED, EXTERNAL, UNLABELLED = "labelled", "external", "unlabelled"
CV, DEV, TEST = "cv", "dev", "test"
EXTERNAL_PARTS = (DEV, TEST)


def natural_key(text: str) -> list:
    """Sort key comparing runs of digits as numbers: class "2" before "10", "r0-fold2" before "r0-fold10".
    Class names sorted with it give the targets 0..n-1, so a change here renumbers every dataset's classes."""
    parts = re.split(r"(\d+)", text)  # the captured digit runs land at the odd places
    return [int(part) if i % 2 else part for i, part in enumerate(parts)]


def fold_column(repeat: int) -> str:
    """The manifest column holding each labelled image's fold in one repeat (-1 for external images)."""
    return f"{FOLD_PREFIX}{repeat}"


def repeats_in(columns) -> list[int]:
    """The repeats whose fold columns are among `columns`, in order."""
    return sorted(int(c.removeprefix(FOLD_PREFIX)) for c in columns if c.startswith(FOLD_PREFIX))


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
    def unlabelled(self) -> pd.DataFrame:
        return self.manifest[self.manifest.split == UNLABELLED]

    def pool_for(self, fold: int | None, repeat: int = 0) -> pd.DataFrame:
        """The unlabelled rows a fold may learn from: none in a group (near-duplicates) with one of the fold's
        validation images, whose score would otherwise see its own twin in training. `fold=None` (the final
        model, which validates on nothing): the whole pool."""
        pool = self.unlabelled
        if fold is None:
            return pool
        validation = self.fold_split(fold, repeat)[1]
        return pool[~pool.group.isin(set(validation.group))]

    def part(self, name: str) -> pd.DataFrame:
        """The external images of one part (DEV or TEST), in manifest order."""
        return self.manifest[(self.manifest.split == EXTERNAL) & (self.manifest.part == name)]

    @property
    def repeats(self) -> list[int]:
        return repeats_in(self.manifest.columns)

    @property
    def folds(self) -> list[int]:
        return sorted(int(f) for f in self.labelled[fold_column(0)].unique())

    def fold_split(self, fold: int, repeat: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(training rows, validation rows) of one fold of one repeat; no row is in both."""
        if fold not in self.folds or repeat not in self.repeats:
            raise PipelineError(f"fold {fold} of repeat {repeat} is not in the collected data (folds: {self.folds}, "
                                f"repeats: {self.repeats}); re-run `dvc repro collect` after changing collect.folds "
                                "or collect.repeats")
        rows = self.labelled
        in_fold = rows[fold_column(repeat)] == fold
        return rows[~in_fold], rows[in_fold]

    def select(self, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Images and integer targets of some manifest rows."""
        index = rows["index"].to_numpy()
        return self.images[index], rows.target.to_numpy(dtype=np.int64)


def save_collected(folder: Path, images: np.ndarray, manifest: pd.DataFrame, classes: list[str]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=images, classes=np.array(classes))
    atomic.write_bytes(folder / IMAGES_FILE, buffer.getvalue())
    folds = [fold_column(r) for r in repeats_in(manifest.columns)]
    atomic.write_text(folder / MANIFEST_FILE, manifest[MANIFEST_COLUMNS + folds].to_csv(index=False))


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
