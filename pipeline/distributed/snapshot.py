"""The working tree as a git commit, made without touching the user's branch, index or files.

Workers check this commit out, so a parallel run uses exactly what a serial `dvc repro` here would: uncommitted
edits to code, params.yaml and dvc.lock included, and untracked files git does not ignore. It is kept under one
ref (`REF`), replaced by each run, so git's garbage collection leaves it alone while workers fetch it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from pipeline.runtime.errors import PipelineError

REF = "refs/fewshot/parallel"


def _git(root: Path, *args: str, env: dict | None = None) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise PipelineError(f"git {' '.join(args)} failed in {root}: {result.stderr.strip()}")
    return result.stdout.strip()


def snapshot(root: Path) -> str:
    """Commit the working tree (tracked and untracked-but-not-ignored files) on top of HEAD into `REF`, through a
    temporary index; return the commit's id."""
    if not (root / ".git").exists():
        raise PipelineError(f"{root} is not a git repository: parallel runs send workers a git commit to check out")
    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True,
                          text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index"),
               "GIT_AUTHOR_NAME": "pipeline", "GIT_AUTHOR_EMAIL": "pipeline@localhost",
               "GIT_COMMITTER_NAME": "pipeline", "GIT_COMMITTER_EMAIL": "pipeline@localhost"}
        if head:
            _git(root, "read-tree", head, env=env)
        _git(root, "add", "-A", env=env)
        tree = _git(root, "write-tree", env=env)
        parents = ["-p", head] if head else []
        commit = _git(root, "commit-tree", tree, *parents, "-m", "working tree for a parallel run", env=env)
    _git(root, "update-ref", REF, commit)
    return commit


def clean_head(root: Path) -> str:
    """HEAD's commit id, for workers that fetch from a git URL rather than this folder: there a snapshot of
    uncommitted work would not exist, so the working tree must have none."""
    changed = _git(root, "status", "--porcelain", "--untracked-files=normal")
    if changed:
        raise PipelineError("--source: workers fetch a commit from that URL, but this working tree has "
                            f"uncommitted changes ({changed.splitlines()[0].strip()}, ...); commit them (dvc.lock "
                            "too) and push the commit there, then run again")
    return _git(root, "rev-parse", "HEAD")
