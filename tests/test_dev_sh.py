"""dev.sh puts its environment's bin first on PATH, whether VENV is given relative to the repository or absolute.

The real dev.sh runs against a stand-in environment: bin/python is a two-line script that says who it is, and the
install stamp dev.sh writes after pip is already there, so no venv is built and nothing is installed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def fake_venv(folder: Path) -> Path:
    """A folder dev.sh takes for an installed environment whose python prints its own path and arguments."""
    python = folder / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "$0 $*"\n')
    python.chmod(0o755)
    # the stamp dev.sh writes once pip has installed this exact pyproject.toml and constraints.txt
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "constraints.txt").read_bytes())
    (folder / f".installed-{digest.hexdigest()[:16]}").touch()
    return python


@pytest.mark.parametrize("given", ["absolute", "relative"])
def test_dev_sh_runs_the_venvs_python_for_an_absolute_or_relative_venv(tmp_path, given):
    python = fake_venv(tmp_path / "env")
    venv = str(tmp_path / "env") if given == "absolute" else os.path.relpath(tmp_path / "env", ROOT)
    # run from another folder: a relative VENV is relative to the repository, not to the caller
    env = {**os.environ, "VENV": venv, "PYTHON": sys.executable}
    result = subprocess.run([str(ROOT / "dev.sh"), "python", "-c", "print(1)"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()  # one call: the stamp matched, so dev.sh did not run `python -m pip`
    ran, *args = line.split()
    assert Path(ran).resolve() == python.resolve() and args == ["-c", "print(1)"]


def test_dev_sh_preset_applies_a_preset_with_the_venvs_python(tmp_path):
    python = fake_venv(tmp_path / "env")
    env = {**os.environ, "VENV": str(tmp_path / "env"), "PYTHON": sys.executable}
    result = subprocess.run([str(ROOT / "dev.sh"), "preset", "photos"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    ran, *args = line.split()
    assert Path(ran).resolve() == python.resolve() and args == ["-m", "pipeline.presets", "photos"]


WARM_RUN = ["python", "-m", "pipeline.runtime.warm", "run", "--log", ".dvc/tmp/warm-server.log", "--"]


@pytest.mark.parametrize("args, warm, runs", [
    (["--jobs", "2", "final"], "1", ["python", "-m", "pipeline.distributed", "--jobs", "2", "final"]),
    (["-j2"], "1", ["python", "-m", "pipeline.distributed", "-j2"]),
    (["--cluster=10.0.0.1:6379"], "1", ["python", "-m", "pipeline.distributed", "--cluster=10.0.0.1:6379"]),
    # no --jobs: DVC itself, one stage at a time, its stages forked from a warm server unless WARM=0
    (["--force", "evaluate"], "1", [*WARM_RUN, "dvc", "repro", "--force", "evaluate"]),
    (["--force", "evaluate"], "0", ["dvc", "repro", "--force", "evaluate"]),
])
def test_dev_sh_repro_goes_to_ray_only_with_jobs_or_a_cluster(tmp_path, args, warm, runs):
    fake_venv(tmp_path / "env")
    dvc = tmp_path / "env" / "bin" / "dvc"
    dvc.write_text('#!/bin/sh\necho "$0 $*"\n')
    dvc.chmod(0o755)
    env = {**os.environ, "VENV": str(tmp_path / "env"), "PYTHON": sys.executable, "WARM": warm}
    result = subprocess.run([str(ROOT / "dev.sh"), "repro", *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    line = result.stdout.splitlines()[0]  # then, after a real run, the report's first sections
    ran, *given = line.split()
    assert [Path(ran).name, *given] == runs
