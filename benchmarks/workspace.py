"""A throw-away git repository holding this project's files, for end-to-end DVC runs (the e2e test and the
timing benchmark), so the developer's own workspace and DVC cache are never touched; and the benchmarks' shared
timer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# dvc runs `python -m pipeline.<stage>`, which must be this interpreter's; git (and `dvc exp`) need an identity,
# which a bare CI machine does not have.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "GIT_AUTHOR_NAME": "pipeline", "GIT_AUTHOR_EMAIL": "pipeline@localhost",
       "GIT_COMMITTER_NAME": "pipeline", "GIT_COMMITTER_EMAIL": "pipeline@localhost"}


def override(params: dict, settings: list[str]) -> dict:
    """Apply `key.sub=value` settings (value in YAML, as for `dvc exp run -S`) to a params mapping, in place."""
    import yaml

    for setting in settings:
        dotted, value = setting.split("=", 1)
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = yaml.safe_load(value)
    return params


def run(*args: str, cwd: Path) -> str:
    """Run a command; on failure raise with its output, which says what went wrong."""
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def best_of(fn, repeats: int) -> float:
    """The fastest of `repeats` calls of `fn`, in seconds (the least disturbed by other work on a noisy machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def dvc(repo: Path, *args: str) -> str:
    return run(sys.executable, "-m", "dvc", *args, cwd=repo)


def make_repo(dest: Path, params_yaml: str | None = None) -> Path:
    """Copy the working tree's tracked and untracked-but-not-ignored files (no tests, no benchmarks) into
    `dest`, optionally replace params.yaml, and commit it all in a new git repository."""
    names = run("git", "ls-files", "-co", "--exclude-standard", cwd=ROOT).splitlines()
    for name in names:
        if (ROOT / name).is_file() and not name.startswith(("tests/", "benchmarks/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    if params_yaml is not None:
        (dest / "params.yaml").write_text(params_yaml)
    run("git", "init", "-q", cwd=dest)
    run("git", "add", "-A", cwd=dest)
    run("git", "commit", "-qm", "pipeline copy", cwd=dest)
    return dest
