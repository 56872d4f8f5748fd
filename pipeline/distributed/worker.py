"""One stage on a worker: a fresh clone at the coordinator's snapshot, DVC restores what the stage needs from the
shared remote and runs it, and its outputs and run-cache entry go back to that remote.

Nothing here knows about Ray: `run_stage` is a plain function the runner hands to Ray as a task (and tests can
call directly).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.runtime import warm

LOG_TAIL_LINES = 60  # what a failure report shows of the stage's log


@dataclass(frozen=True)
class StageTask:
    stage: str                 # DVC address of the stage to run
    upstream: tuple[str, ...]  # the stages it depends on, dependencies first: restored, not run
    source: str                # where git fetches the snapshot from: the coordinator's repo path, or a git URL
    ref: str                   # the snapshot's ref (or commit id) at `source`
    remote: str                # the shared DVC remote's URL: a folder, s3://..., ssh://...
    cpus: int                  # CPU cores given to the task: torch threads follow it, never more
    scratch: str = ""          # where clones go on the worker ("" = the system's temporary folder)
    warm_idle: float = 60.0    # the machine's warm stage server stops after this many idle seconds (0: no server)


@dataclass(frozen=True)
class StageResult:
    stage: str
    host: str
    ran: bool                  # DVC ran the command (False: DVC found it in the run-cache and restored it)
    setup_s: float             # clone and configure
    repro_s: float             # restore upstream outputs, run the stage
    push_s: float              # outputs and run-cache entry to the remote


class StageFailed(Exception):
    """The stage's `dvc repro` (or push) failed; the message ends with the last lines of its log."""

    def __init__(self, stage: str, host: str, log: str):
        tail = "\n".join(log.splitlines()[-LOG_TAIL_LINES:])
        super().__init__(f"stage {stage} failed on {host}; the end of its log:\n{tail}")
        self.stage, self.host, self.log = stage, host, log

    def __reduce__(self):  # Ray sends it back to the coordinator pickled
        return StageFailed, (self.stage, self.host, self.log)


def run_stage(task: StageTask) -> StageResult:
    host = socket.gethostname()
    root = Path(task.scratch or tempfile.gettempdir()) / "fewshot-parallel"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=task.stage.replace("@", "-").replace("/", "-") + "-", dir=root))
    try:
        start = time.perf_counter()
        _checkout(task, work)
        env = _stage_env(work, task.cpus)
        if task.warm_idle > 0:  # the machine's server has torch imported: stages skip that (pipeline/runtime/warm.py)
            server = warm.node_socket()
            env[warm.ENV] = str(server)
            warm.ensure_server(server, task.warm_idle, root / "warm-server.log", cwd=work)
        setup = time.perf_counter()
        log = _dvc(work, env, task, "repro", "--pull", "--single-item", *task.upstream, task.stage)
        repro = time.perf_counter()
        log += _dvc(work, env, task, "push", "--run-cache", task.stage)
        end = time.perf_counter()
        return StageResult(task.stage, host, f"Running stage '{task.stage}'" in log,
                           setup - start, repro - setup, end - repro)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _checkout(task: StageTask, work: Path) -> None:
    """A clean workspace at the snapshot, whose DVC cache is its own and whose default remote is the shared one.
    The cache links files into the workspace instead of copying them (DVC makes them read-only, and every stage
    writes new files rather than editing its inputs)."""
    for args in (["init", "-q"], ["fetch", "-q", "--depth", "1", task.source, task.ref], ["checkout", "-q", "FETCH_HEAD"]):
        result = subprocess.run(["git", *args], cwd=work, capture_output=True, text=True)
        if result.returncode != 0:
            raise StageFailed(task.stage, socket.gethostname(), f"git {' '.join(args)}:\n{result.stderr}")
    (work / ".dvc" / "config.local").write_text(
        "[core]\n    remote = parallel\n    autostage = false\n"
        f"['remote \"parallel\"']\n    url = {task.remote}\n"
        "[cache]\n    type = \"hardlink,copy\"\n")


def _stage_env(work: Path, cpus: int) -> dict:
    """This interpreter's environment first on PATH (DVC runs `python -m pipeline.stages...`), the clone's code on
    PYTHONPATH, and every thread pool sized to the task's CPUs so tasks side by side never oversubscribe."""
    threads = str(max(1, cpus))
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(work), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": threads}


def _dvc(work: Path, env: dict, task: StageTask, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=work, env=env, capture_output=True, text=True)
    log = f"$ dvc {' '.join(args)}\n{result.stdout}{result.stderr}"
    if result.returncode != 0:
        raise StageFailed(task.stage, socket.gethostname(), log)
    return log
