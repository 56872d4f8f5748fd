"""The coordinator: ready stages go to Ray as tasks, finished ones come back through the shared DVC remote, and a
final `dvc repro --pull` here restores every output from DVC's run-cache and runs nothing.

Ray schedules and retries; DVC decides what runs, runs it and verifies what comes back (a run-cache entry is keyed
by the hashes of the stage's command, dependencies and params, so an output is only restored where DVC would have
produced the same). A stage that finished is on the remote before the coordinator hears of it: killing the
coordinator loses nothing finished, and running the command again restores those stages instead of rerunning them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.distributed import snapshot, stages
from pipeline.distributed.worker import StageFailed, StageResult, StageTask, run_stage
from pipeline.runtime.errors import PipelineError

log = logging.getLogger(__name__)

LOCAL_REMOTE = ".dvc/tmp/parallel-remote"  # the shared remote when the project has none and none is given


@dataclass(frozen=True)
class Options:
    jobs: int = 0                    # stages at a time on this machine (0 with `cluster`: as the cluster allows)
    cluster: str = ""                # a running Ray cluster's address (HOST:PORT or ray://HOST:10001)
    remote: str = ""                 # shared DVC remote URL; default: the project's default remote, else LOCAL_REMOTE
    cpus_per_task: int = 0           # 0: this machine's cores / jobs (at least 1); 2 on a cluster
    gpus_per_task: float = -1.0      # GPU share of a training stage; -1: the GPUs / jobs (at most 1), 0 without any
    retries: int = 1                 # a failed task, or one whose worker died, runs again this many times
    source: str = ""                 # git URL workers fetch the snapshot from; default: this repository's folder
    targets: tuple[str, ...] = ()    # stages or dvc.yaml files to reproduce (default: the whole pipeline)
    warm_idle: float = 60.0          # each machine's warm stage server stops after this many idle seconds (0: none)


@dataclass(frozen=True)
class Outcome:
    finished: list[StageResult]
    final_log: str                   # what the coordinator's own `dvc repro --pull` printed


def reproduce(root: Path, options: Options) -> Outcome:
    """Run the stale stages of `root`'s pipeline on Ray, then restore them here; raise PipelineError naming every
    stage that failed (after its retries) with the end of its log, once all that could run has run."""
    root = root.resolve()
    plans = stages.plan(root, list(options.targets) or None)
    to_run = [p for p in plans if p.to_run]
    remote, dvc_env = _shared_remote(root, options.remote)
    finished: list[StageResult] = []
    if to_run:
        log.info("%d of %d stages to run; shared DVC remote %s", len(to_run), len(plans), remote)
        needed = {name for p in to_run for name in p.upstream}
        _push_up_to_date(root, dvc_env, [p.name for p in plans if not p.to_run and p.name in needed])
        if options.source:  # workers on other machines fetch a pushed commit
            source, ref = options.source, snapshot.clean_head(root)
        else:  # they fetch the working tree's snapshot from this folder
            snapshot.snapshot(root)
            source, ref = str(root), snapshot.REF
        finished = _run_on_ray(to_run, options, lambda plan, cpus: StageTask(
            plan.name, plan.upstream, source, ref, remote, cpus, warm_idle=options.warm_idle))
    final = _dvc(root, dvc_env, "repro", "--pull", *options.targets)
    ran = [line for line in final.splitlines() if line.startswith("Running stage")]
    if ran:  # a run-cache miss: DVC ran it here, correctly but serially; say so, it should not happen
        log.warning("the final dvc repro ran %d stage(s) itself instead of restoring them: %s", len(ran), ran)
    return Outcome(finished, final)


def _shared_remote(root: Path, asked: str) -> tuple[str, dict]:
    """The remote workers push to and this repository pulls from, and the environment under which `dvc` here
    sees it as the default remote (through DVC's system-level config, so the project's own files stay as they
    are). A project with its own default remote shares that one."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        own = repo.config["core"].get("remote")
        own_url = repo.config["remote"][own]["url"] if own else ""
    if own:
        if asked and asked != own_url:
            raise PipelineError(f"this project's default DVC remote is {own!r} ({own_url}); workers share it, so "
                                f"--remote {asked} would not be seen here. Leave --remote out, or change the "
                                "default with `dvc remote default`")
        return own_url, dict(os.environ)
    url = asked or str(root / LOCAL_REMOTE)
    if "://" not in url:
        url = str(Path(url).resolve())
        Path(url).mkdir(parents=True, exist_ok=True)
    config_dir = root / ".dvc" / "tmp" / "parallel-config"  # DVC's own ignored scratch folder, rewritten each run
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config").write_text(f"[core]\n    remote = parallel\n['remote \"parallel\"']\n    url = {url}\n")
    return url, {**os.environ, "DVC_SYSTEM_CONFIG_DIR": str(config_dir),
                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _push_up_to_date(root: Path, env: dict, names: list[str]) -> None:
    """Stages already up to date here (and data DVC tracks) go to the remote with their run-cache entries, so
    workers restore them instead of running them again."""
    if names:
        _dvc(root, env, "push", "--run-cache", *names)


def _run_on_ray(to_run: list[stages.StagePlan], options: Options, make_task) -> list[StageResult]:
    import ray

    cpus = options.cpus_per_task or (2 if options.cluster else max(1, (os.cpu_count() or 1) // (options.jobs or 1)))
    _start_ray(options, cpus)
    try:
        gpus = _gpus_per_task(options)
        # on one machine a stage that nothing can run beside (collect at the start, evaluate and final at the end)
        # gets every core rather than its share; on a cluster a task never knows what else shares its node
        machine = None if options.cluster or options.cpus_per_task else cpus * (options.jobs or 1)
        log.info("each task: %d CPU core(s) (torch threads likewise%s), %.3g GPU for training stages", cpus,
                 f"; a stage that runs alone: all {machine}" if machine else "", gpus)
        task_fn = ray.remote(_run_stage_on_ray)
        names = {p.name for p in to_run}
        pending = {p.name: p for p in to_run}
        running, finished, failed, skipped, done = {}, [], {}, {}, set()
        started = time.perf_counter()
        while pending or running:
            ready = []
            for name, plan in list(pending.items()):
                inside = [u for u in plan.upstream if u in names]
                broken = next((u for u in inside if u in failed or u in skipped), None)
                if broken:
                    skipped[name] = broken
                    del pending[name]
                elif done.issuperset(inside):
                    ready.append(plan)
                    del pending[name]
            for plan in ready:
                # alone: every stage still pending waits for it (had one not, it would be ready too)
                alone = bool(machine) and not running and len(ready) == 1
                task_cpus = machine if alone else cpus
                ref = task_fn.options(num_cpus=task_cpus, num_gpus=gpus if plan.accelerated else 0,
                                      max_retries=options.retries, retry_exceptions=True,
                                      name=plan.name).remote(make_task(plan, task_cpus))
                running[ref] = plan
            if not running:
                break
            (ref,), _ = ray.wait(list(running), num_returns=1)
            plan = running.pop(ref)
            try:
                result, node = ray.get(ref)
            except (ray.exceptions.RayError, StageFailed) as err:
                failed[plan.name] = err
                log.error("%s failed after %d retr%s: %s", plan.name, options.retries,
                          "y" if options.retries == 1 else "ies", _cause(err))
                continue
            finished.append(result)
            done.add(result.stage)
            log.info("[%d/%d] %s %s on %s (Ray node %s) in %.0f s (%.1f s setup, %.1f s push) after %.0f s",
                     len(finished), len(to_run), result.stage, "ran" if result.ran else "restored from the run-cache",
                     result.host, node[:8], result.setup_s + result.repro_s + result.push_s, result.setup_s,
                     result.push_s, time.perf_counter() - started)
        if failed or skipped:
            raise PipelineError(_failure_report(failed, skipped, len(finished)))
        return finished
    finally:
        ray.shutdown()


def _run_stage_on_ray(task: StageTask) -> tuple[StageResult, str]:
    """The Ray task: the stage, and which Ray node ran it (several can share a host name)."""
    import ray

    return run_stage(task), ray.get_runtime_context().get_node_id()


def _start_ray(options: Options, cpus_per_task: int) -> None:
    import ray

    if options.cluster:
        ray.init(address=options.cluster, log_to_driver=False)
    else:
        ray.init(num_cpus=(options.jobs or 1) * cpus_per_task, include_dashboard=False, log_to_driver=False)


def _gpus_per_task(options: Options) -> float:
    import ray

    total_gpus = ray.cluster_resources().get("GPU", 0.0)
    if options.gpus_per_task >= 0:
        gpus = options.gpus_per_task
    elif options.cluster:
        gpus = 0.25 if total_gpus else 0.0
    else:
        gpus = min(1.0, total_gpus / (options.jobs or 1))
    if gpus > total_gpus:
        raise PipelineError(f"--gpus-per-task {gpus} asks for more GPUs than the Ray cluster has ({total_gpus:g})")
    return gpus


def _cause(err: Exception) -> str:
    cause = getattr(err, "cause", None)
    return str(cause if isinstance(cause, StageFailed) else err)


def _failure_report(failed: dict, skipped: dict, finished: int) -> str:
    lines = [f"{len(failed)} stage(s) failed and {len(skipped)} were not started because a stage they need "
             f"failed; the {finished} that finished are on the shared remote, so running the same command again "
             "restores them and carries on from there."]
    lines += [f"\n{name}: {_cause(err)}" for name, err in failed.items()]
    lines += [f"\n{name}: not started, needs {needs}" for name, needs in skipped.items()]
    return "\n".join(lines)


def _dvc(root: Path, env: dict, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise PipelineError(f"dvc {' '.join(args)} failed in {root}:\n{result.stdout}{result.stderr}")
    return result.stdout + result.stderr
