"""Atomic writes leave either the old file or the new one, and JSON is written strictly (no NaN)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.runtime import atomic


def refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_json_is_strict_nan_and_infinity_become_null(tmp_path):
    value = {"nan": float("nan"), "inf": [1.0, float("inf"), -np.inf], "numpy": np.float32(0.5),
             "nested": {"n": np.float64("nan"), "k": np.int64(3)}, "text": "NaN", "tuple": (1, 2)}
    atomic.write_json(tmp_path / "out.json", value)
    text = (tmp_path / "out.json").read_text()
    assert json.loads(text, parse_constant=refuse) == {"nan": None, "inf": [1.0, None, None], "numpy": 0.5,
                                                       "nested": {"n": None, "k": 3}, "text": "NaN",
                                                       "tuple": [1, 2]}
    with pytest.raises(ValueError, match="NaN is not JSON"):
        json.loads(json.dumps({"x": float("nan")}), parse_constant=refuse)  # what the plain dump would have written


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from pipeline.runtime import atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # files cannot grow past 4 KB: the disk is "full"
folder = Path(sys.argv[1])
try:
    atomic.write_json(folder / "out.json", {"version": 2, "values": list(range(5000))})
except OSError as err:
    print("file failed:", err.errno)
try:
    with atomic.atomic_dir(folder / "stage") as tmp:
        (tmp / "small.txt").write_text("new")
        np.save(tmp / "big.npy", np.zeros(10_000))
except OSError as err:
    print("folder failed:", type(err).__name__)
"""


def test_a_write_that_fails_part_way_leaves_the_previous_outputs(tmp_path):
    """A real failure in the middle of writing (the file-size limit stands in for a full disk): the previous file
    and the previous output folder stay as they were, and no temporary file or folder is left behind."""
    import subprocess
    import sys

    from conftest import ROOT

    atomic.write_json(tmp_path / "out.json", {"version": 1})
    with atomic.atomic_dir(tmp_path / "stage") as tmp:
        (tmp / "small.txt").write_text("old")
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    # 27 is EFBIG: the write itself failed, part-way, not something before it
    assert done.stdout.split("\n")[:2] == ["file failed: 27", "folder failed: OSError"], done.stdout + done.stderr
    assert json.loads((tmp_path / "out.json").read_text()) == {"version": 1}
    assert [p.name for p in (tmp_path / "stage").iterdir()] == ["small.txt"]
    assert (tmp_path / "stage" / "small.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "stage"]


def test_what_a_killed_write_left_behind_is_cleared_by_the_next_write(tmp_path):
    """SIGKILL runs no cleanup: the temporary folder, the old folder being replaced and a temporary file stay
    beside the output until the next write of the same output removes them (and only them)."""
    (tmp_path / ".stage.k1ll3d.tmp").mkdir()
    (tmp_path / ".stage.k1ll3d.tmp" / "half.npz").write_bytes(b"half")
    (tmp_path / ".stage.0ld.old").mkdir()
    (tmp_path / ".out.json.x7.tmp").write_text("{")
    (tmp_path / ".other.x7.tmp").write_text("not ours")
    with atomic.atomic_dir(tmp_path / "stage") as tmp:
        (tmp / "done.txt").write_text("done")
    atomic.write_json(tmp_path / "out.json", {"done": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.x7.tmp", "out.json", "stage"]
