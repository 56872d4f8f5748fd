"""Time a `dvc repro` with nothing changed on the default pipeline's full stage graph, in seconds and against
`dvc --version` in the same run (machines here are noisy, so the ratio is the figure to compare).

No stage is run: every declared output is a placeholder file, `dvc commit` records the graph, and then the no-op
`dvc repro` checks every stage's dependencies, params and outputs exactly as after a real run. That isolates
what the layout of dvc.yaml costs (how many stages, how many dependency paths) from the training itself.

    python benchmarks/noop_repro.py [--repeats 5] [--deps dvc.yaml-variant]

`--deps` swaps in another dvc.yaml (e.g. one listing modules file by file) to compare layouts on the same graph.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks` importable
from benchmarks import workspace  # noqa: E402


def placeholder_outputs(repo: Path) -> int:
    """Create every output the stage graph declares that is not there yet (folders get one small file); return how
    many stages."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        stages = dvc_repo.index.stages
        for stage in stages:
            for out in stage.outs:
                _placeholder(Path(out.fs_path), stage.addressing)
        for stage in stages:  # files inside another stage's output folder (data/augment/policy.json)
            for dep in stage.deps:
                if not Path(dep.fs_path).exists():
                    _placeholder(Path(dep.fs_path), stage.addressing)
    return len(stages)


def _placeholder(path: Path, stage: str) -> None:
    if path.exists():  # a stage that really ran
        return
    if path.suffix in {".json", ".csv", ".md", ".html", ".png", ".npz"}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n")
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / "placeholder.txt").write_text(stage + "\n")


def seconds(command: list[str], repo: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=repo, env=workspace.ENV, check=True, capture_output=True)
    return time.perf_counter() - start


def time_noop(repo: Path, repeats: int) -> tuple[int, list[float], list[float]]:
    """Record the stage graph (placeholders for every output not there yet), check that a `dvc repro` then runs
    nothing, and time it `repeats` times beside `dvc --version`: (stages, no-op seconds, --version seconds)."""
    stages = placeholder_outputs(repo)
    workspace.dvc(repo, "commit", "--force", "--quiet")
    out = workspace.dvc(repo, "repro")
    assert "Running stage" not in out, out  # the graph is recorded: nothing to run
    dvc = [sys.executable, "-m", "dvc"]
    noop = [seconds([*dvc, "repro"], repo) for _ in range(repeats)]
    return stages, noop, [seconds([*dvc, "--version"], repo) for _ in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--deps", type=Path, help="another dvc.yaml to time on the same stage graph")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = workspace.make_repo(Path(tmp))
        if args.deps:
            shutil.copy(args.deps, repo / "dvc.yaml")
        stages, noop, version = time_noop(repo, args.repeats)
    deps = sum(1 for line in (args.deps or workspace.ROOT / "dvc.yaml").read_text().splitlines()
               if line.strip().startswith("- pipeline/"))
    print(f"{stages} stages, {deps} code dependency entries in dvc.yaml (before matrix expansion)")
    print(f"no-op dvc repro: median {statistics.median(noop):.2f} s (min {min(noop):.2f}); dvc --version: median "
          f"{statistics.median(version):.2f} s; ratio {statistics.median(noop) / statistics.median(version):.1f}")


if __name__ == "__main__":
    main()
