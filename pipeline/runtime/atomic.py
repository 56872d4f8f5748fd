"""Write outputs so that a killed run never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _clear_leftovers(path: Path) -> None:
    """Remove what a killed write of `path` left beside it: its temporary file or folder, or the old folder it was
    replacing. A SIGKILL runs no cleanup, and nothing else writes `path` while its stage runs (DVC's lock)."""
    for leftover in path.parent.glob(f".{glob_escape(path.name)}.*"):
        if leftover.suffix in (".tmp", ".old"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` in one rename. A killed run
    leaves either the old folder or none (DVC then runs the stage again), never a half-written one in its place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs should look like any other folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = tmp.with_suffix(".old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def strict(value):
    """`value` with every NaN and infinity replaced by None, recursively, and numpy scalars as Python numbers:
    JSON has no NaN, and strict parsers (browsers' JSON.parse, jq, most other languages) refuse Python's."""
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# differ between two runs of the same inputs: kept out of the outputs that carry results
RUN_FACTS = ("train_seconds", "train_images_per_second", "steps_per_second", "resumed_from_epoch",
             "resumed_from_step")


def split_run_facts(meta: dict) -> tuple[dict, dict]:
    """(what the inputs determine, how this run went): the first goes into cached outputs, which must be the same
    bytes whenever the same inputs are trained again (so a killed and resumed run, or a forced re-run, changes no
    hash downstream); the second into a DVC metrics file of its own."""
    return ({k: v for k, v in meta.items() if k not in RUN_FACTS}, {k: v for k, v in meta.items() if k in RUN_FACTS})


def write_json(path: Path, value, indent: int | None = 2) -> None:
    """Write `value` as strict JSON (NaN and infinity become null), atomically."""
    write_text(path, json.dumps(strict(value), indent=indent, allow_nan=False) + "\n")
