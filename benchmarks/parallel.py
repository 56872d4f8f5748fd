"""Wall time of the whole pipeline from scratch, in one run, as ratios to a plain serial `dvc repro` (machines here
are noisy): the same under a warm stage server (what `./dev.sh repro` runs: pipeline/runtime/warm.py), and
`python -m pipeline.distributed --jobs N` (what `./dev.sh repro --jobs N` runs, a warm server included).

Each starts from the same fresh copy of the repository. The serial runs are what a user runs (torch takes every
core in each stage); each parallel task gets cores / N, and its torch threads likewise. The parallel run's log gives
where its time went: Ray's start, each task's clone, its `dvc repro` (restoring upstream outputs, then the stage),
its push to the shared remote, and the final `dvc repro --pull` that restores everything here.

    python benchmarks/parallel.py [--jobs 2] [--smoke] [--runs serial,warm,parallel] [--keep DIR] [--set k=v ...]

`--smoke` shrinks params to the test suite's smoke size (minutes instead of most of an hour on 2 cores). On a
machine with a GPU, each training task gets 1 / N of it (`--gpus-per-task` of pipeline.distributed).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks` importable
from benchmarks import workspace  # noqa: E402

TASK = re.compile(r"\] (\S+) (?:ran|restored from the run-cache) on .* in (\d+) s \(([\d.]+) s setup, ([\d.]+) s push\)")


def params_text(smoke: bool, settings: list[str]) -> str:
    import yaml

    params = yaml.safe_load((workspace.ROOT / "params.yaml").read_text())
    if smoke:
        sys.path.insert(0, str(workspace.ROOT / "tests"))
        from conftest import TINY, with_overrides

        params = with_overrides(params, TINY)
    return yaml.safe_dump(workspace.override(params, settings), sort_keys=False)


def timed(command: list[str], repo: Path) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=repo, env=workspace.ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return seconds, result.stdout + result.stderr


RUNS = {  # name -> (what it is, its command)
    "serial": ("serial dvc repro", ["-m", "dvc", "repro"]),
    "warm": ("serial dvc repro, warm stage server (./dev.sh repro)",
             ["-m", "pipeline.runtime.warm", "run", "--", sys.executable, "-m", "dvc", "repro"]),
    "parallel": ("--jobs N (./dev.sh repro --jobs N)", ["-m", "pipeline.distributed", "--jobs"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="the test suite's smoke-size params")
    parser.add_argument("--runs", default="serial,warm,parallel",
                        help="which runs, in order, the first the baseline of the ratios (default: all three)")
    parser.add_argument("--keep", type=Path, help="keep the repositories under this folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    runs = args.runs.split(",")
    if not runs or set(runs) - set(RUNS):
        parser.error(f"--runs: a comma-separated list from {', '.join(RUNS)}")
    base = args.keep or Path(tempfile.mkdtemp(prefix="parallel-bench-"))
    text = params_text(args.smoke, args.set)
    seconds = {}
    for name in runs:
        repo = base / name
        repo.mkdir(parents=True)
        workspace.make_repo(repo, text)
        what, command = RUNS[name]
        command = [sys.executable, *command, *([str(args.jobs)] if name == "parallel" else [])]
        seconds[name], log = timed(command, repo)
        first = seconds[runs[0]]
        stages = log.count("Running stage") if name != "parallel" else len(TASK.findall(log))
        print(f"{what.replace('N', str(args.jobs))}: {stages} stages in {seconds[name]:.0f} s "
              f"({seconds[name] / 60:.1f} min); {runs[0]} / {name} = {first / seconds[name]:.2f}", flush=True)
        if name == "parallel":
            describe_parallel(log)
        if name != runs[0]:
            print(f"  metrics against the {runs[0]} run: {metrics_difference(base / runs[0], repo)}", flush=True)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


def describe_parallel(log: str) -> None:
    tasks = TASK.findall(log)
    setup = sum(float(t[2]) for t in tasks)
    push = sum(float(t[3]) for t in tasks)
    busy = sum(float(t[1]) for t in tasks)
    final = log.split("the final dvc repro here:")[-1]
    print(f"  task time summed {busy:.0f} s, of which clone and configure {setup:.0f} s, push {push:.0f} s; "
          f"final restore ran {final.count('Running stage')} stage(s), restored {final.count('is cached')}")
    ray_up = re.search(r"(\d\d:\d\d:\d\d) pipeline.distributed.runner: \d+ of", log)
    first = re.search(r"(\d\d:\d\d:\d\d) pipeline.distributed.runner: each task", log)
    if ray_up and first:
        print(f"  Ray start: {_seconds(first.group(1)) - _seconds(ray_up.group(1))} s")


def metrics_difference(one: Path, other: Path) -> str:
    """How far the DVC metrics of two runs (reports/metrics.json) lie apart: identical, or the largest gap."""
    import json

    a, b = (json.loads((repo / "reports" / "metrics.json").read_text()) for repo in (one, other))
    if a == b:
        return f"identical ({len(a)} figures)"
    gaps = {key: abs(a[key] - b.get(key, float("nan"))) for key in a if isinstance(a[key], (int, float))}
    key = max(gaps, key=lambda k: gaps[k] if gaps[k] == gaps[k] else float("inf"))
    return f"{sum(g != 0 for g in gaps.values())} of {len(a)} differ; the largest gap {gaps[key]:.4f} ({key})"


def _seconds(clock: str) -> int:
    h, m, s = (int(x) for x in clock.split(":"))
    return h * 3600 + m * 60 + s


if __name__ == "__main__":
    main()
