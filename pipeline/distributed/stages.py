"""Which stages a parallel run must run, read from DVC itself: its stage graph, and what it finds stale."""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.runtime.errors import PipelineError

# Stages whose work is training or inference: they may share a GPU. The rest (collect, augment, evaluate) use the
# CPU only. Keyed by the name before `@` in a stage's DVC address.
ACCELERATED = frozenset({"synthesize", "finetune", "scarcity", "final"})


@dataclass(frozen=True)
class StagePlan:
    name: str                   # DVC's address: `finetune@r0-fold1-cnn`, or `data/raw.dvc` for tracked data
    upstream: tuple[str, ...]   # every stage it depends on, directly or not, dependencies first
    to_run: bool                # stale (or downstream of a stale stage): a worker runs it

    @property
    def accelerated(self) -> bool:  # may use the GPU
        return self.name.split("@")[0] in ACCELERATED


def plan(root: Path, targets: list[str] | None = None) -> list[StagePlan]:
    """Every stage the targets need (all of dvc.yaml by default), dependencies first. A stage runs when DVC finds
    it changed (dependencies, params, command or outputs) or when a stage it depends on runs."""
    import networkx as nx
    from dvc.repo import Repo

    # inside root: DVC names stages relative to the current folder; the lock: DVC's rule for reading stage state
    with _inside(root), Repo(str(root)) as repo, repo.lock:
        graph = repo.index.graph  # an edge points from a stage to a stage it depends on
        wanted = [s for t in targets for s in repo.stage.collect(t)] if targets else list(graph.nodes)
        order = list(nx.dfs_postorder_nodes(graph.subgraph(_with_upstream(graph, wanted))))
        stale: set = set()
        plans = []
        for stage in order:
            needs = nx.descendants(graph, stage)
            upstream = [s for s in order if s in needs]
            runs = bool(stage.cmd) and not stage.frozen and (
                bool(stale.intersection(upstream)) or bool(stage.changed()))
            if runs:
                stale.add(stage)
            plans.append(StagePlan(stage.addressing, tuple(s.addressing for s in upstream), runs))
        _check_inputs_reach_workers(root, [s for s in order if s in stale], graph)
    return plans


@contextlib.contextmanager
def _inside(folder: Path):
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _with_upstream(graph, stages) -> set:
    import networkx as nx

    return set(stages).union(*(nx.descendants(graph, s) for s in stages))


def _check_inputs_reach_workers(root: Path, stages, graph) -> None:
    """A worker sees what git holds (committed or not) and what DVC tracks. An input that is neither, such as a
    photo folder git ignores and DVC does not track, would be silently missing there: refuse before any work."""
    produced = {str(out.fs_path) for stage in graph for out in stage.outs}
    for stage in stages:
        for dep in stage.deps:
            path = Path(dep.fs_path)
            if not path.exists() or any(str(path) == p or str(path).startswith(p + "/") for p in produced):
                continue  # another stage's output (or DVC will name the missing dependency itself)
            ignored = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--",
                                      str(path.relative_to(root))], cwd=root, capture_output=True, text=True,
                                     check=True).stdout.split()
            if ignored:
                raise PipelineError(
                    f"stage {stage.addressing} depends on {path.relative_to(root)}, but git ignores "
                    f"{len(ignored)} file(s) in it (e.g. {ignored[0]}) and DVC does not track them, so workers "
                    f"would not see them. Track the data with `dvc add {path.relative_to(root)}` (then commit the "
                    ".dvc file) or stop ignoring it in git")
