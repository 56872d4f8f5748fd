"""Wall time of the whole pipeline from scratch: serial `dvc repro` against `python -m pipeline.distributed --jobs N`
(what `./dev.sh repro --jobs N` runs), in one run, as a ratio (machines here are noisy).

Both start from the same fresh copy of the repository. The serial run is what a user runs (torch takes every
core in each stage); each parallel task gets cores / N, and its torch threads likewise. The parallel run's log gives
where its time went: Ray's start, each task's clone, its `dvc repro` (restoring upstream outputs, then the stage),
its push to the shared remote, and the final `dvc repro --pull` that restores everything here.

    python benchmarks/parallel.py [--jobs 2] [--smoke] [--keep DIR] [--set key=value ...]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="the test suite's smoke-size params")
    parser.add_argument("--keep", type=Path, help="keep both repositories under this folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="parallel-bench-"))
    text = params_text(args.smoke, args.set)
    serial, parallel = base / "serial", base / "parallel"
    for repo in (serial, parallel):
        repo.mkdir(parents=True)
        workspace.make_repo(repo, text)

    serial_s, serial_log = timed([sys.executable, "-m", "dvc", "repro"], serial)
    stages = serial_log.count("Running stage")
    print(f"serial dvc repro: {stages} stages in {serial_s:.0f} s ({serial_s / 60:.1f} min)", flush=True)
    parallel_s, log = timed([sys.executable, "-m", "pipeline.distributed", "--jobs", str(args.jobs)], parallel)
    tasks = TASK.findall(log)
    print(f"--jobs {args.jobs}: {len(tasks)} Ray tasks, {parallel_s:.0f} s ({parallel_s / 60:.1f} min); "
          f"serial / parallel = {serial_s / parallel_s:.2f}")
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
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


def _seconds(clock: str) -> int:
    h, m, s = (int(x) for x in clock.split(":"))
    return h * 3600 + m * 60 + s


if __name__ == "__main__":
    main()
