"""Parallel runs on Ray (pipeline/distributed): the plan DVC gives, the snapshot workers check out, one stage on a
worker, and the whole smoke pipeline on a real two-node Ray cluster on this machine against a serial `dvc repro`."""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.distributed import snapshot, stages
from pipeline.distributed.runner import Options, reproduce
from pipeline.distributed.worker import StageFailed, StageTask, run_stage
from pipeline.runtime.atomic import split_run_facts
from pipeline.runtime.errors import PipelineError

from benchmarks.workspace import ENV, dvc, make_repo, run
from conftest import TINY, raw_params, with_overrides

# Two stages, each writing a seeded random number: a result that a rerun instead of a restore would change.
TOY = {"stages": {
    "draw": {"cmd": "python -c \"import random; random.seed(open('seed.txt').read()); "
                    "open('a.txt', 'w').write(str(random.random()) + str(random.random()))\"",
             "deps": ["seed.txt"], "outs": ["a.txt"]},
    "double": {"cmd": "python -c \"import os; open('b.txt', 'w').write(open('a.txt').read() * 2 + "
                      "os.environ.get('OMP_NUM_THREADS', '-'))\"",
               "deps": ["a.txt"], "outs": ["b.txt"]},
}}


def toy_repo(path: Path) -> Path:
    path.mkdir()
    (path / "dvc.yaml").write_text(yaml.safe_dump(TOY, sort_keys=False))
    (path / "seed.txt").write_text("7")
    run("git", "init", "-q", cwd=path)
    dvc(path, "init", "-q")
    run("git", "add", "-A", cwd=path)
    run("git", "commit", "-qm", "toy", cwd=path)
    return path


def task(repo: Path, remote: Path, stage: str, upstream: tuple[str, ...] = (), cpus: int = 1) -> StageTask:
    snapshot.snapshot(repo)
    return StageTask(stage, upstream, str(repo), snapshot.REF, str(remote), cpus, scratch=str(repo.parent))


def test_the_snapshot_holds_uncommitted_and_untracked_work_and_leaves_the_branch_alone(tmp_path):
    repo = toy_repo(tmp_path / "repo")
    head = run("git", "rev-parse", "HEAD", cwd=repo).strip()
    (repo / "seed.txt").write_text("8")                        # an uncommitted edit
    (repo / "notes.txt").write_text("untracked, not ignored")  # an untracked file
    commit = snapshot.snapshot(repo)
    assert run("git", "show", f"{commit}:seed.txt", cwd=repo) == "8"
    assert run("git", "show", f"{commit}:notes.txt", cwd=repo) == "untracked, not ignored"
    assert run("git", "rev-parse", snapshot.REF, cwd=repo).strip() == commit
    assert run("git", "rev-parse", "HEAD", cwd=repo).strip() == head  # branch, index and files untouched
    assert "?? notes.txt" in run("git", "status", "--porcelain", cwd=repo)
    with pytest.raises(PipelineError, match="uncommitted changes"):
        snapshot.clean_head(repo)


def test_the_plan_is_dvcs_graph_and_what_it_finds_stale(tmp_path):
    repo = toy_repo(tmp_path / "repo")
    plans = {p.name: p for p in stages.plan(repo)}
    assert list(plans) == ["draw", "double"] and plans["double"].upstream == ("draw",)
    assert all(p.to_run for p in plans.values())
    dvc(repo, "repro")
    assert not any(p.to_run for p in stages.plan(repo))
    (repo / "b.txt").unlink()  # a missing output makes only its stage stale
    assert [p.name for p in stages.plan(repo) if p.to_run] == ["double"]
    (repo / "seed.txt").write_text("9")  # a changed input makes its stage and everything downstream stale
    assert [p.name for p in stages.plan(repo) if p.to_run] == ["draw", "double"]


def test_an_input_workers_cannot_see_is_refused_before_any_work(tmp_path):
    repo = toy_repo(tmp_path / "repo")
    (repo / ".gitignore").write_text("seed.txt\n")  # ignored by git and not tracked by DVC: workers would lack it
    run("git", "rm", "-q", "--cached", "seed.txt", cwd=repo)
    with pytest.raises(PipelineError, match=r"depends on seed.txt, but git ignores .* `dvc add seed.txt`"):
        stages.plan(repo)


def test_a_worker_runs_its_stage_and_the_next_restores_it_from_the_shared_remote(tmp_path):
    repo, remote = toy_repo(tmp_path / "repo"), tmp_path / "remote"
    first = run_stage(task(repo, remote, "draw", cpus=3))
    assert first.ran and first.host == socket.gethostname()
    assert (remote / "runs").is_dir() and (remote / "files" / "md5").is_dir()  # outputs and run-cache entry
    second = run_stage(task(repo, remote, "double", upstream=("draw",), cpus=3))
    assert second.ran  # `draw` came back from the remote, so only `double` ran
    again = run_stage(task(repo, remote, "draw"))
    assert not again.ran  # the same stage again: DVC found it in the run-cache
    # here, as on the coordinator, `dvc repro --pull` restores both from the remote and runs neither
    (repo / ".dvc" / "config.local").write_text(f"[core]\n    remote = r\n['remote \"r\"']\n    url = {remote}\n")
    out = dvc(repo, "repro", "--pull")
    assert "Running stage" not in out and out.count("is cached - skipping run") == 2, out
    a = (repo / "a.txt").read_text()
    assert (repo / "b.txt").read_text() == a * 2 + "3"  # and the stage ran with the task's 3 threads
    left = [p.name for p in (tmp_path / "fewshot-parallel").iterdir()]
    assert left == ["warm-server.log"]  # each task's clone is gone afterwards; the machine's warm server logs here


def test_a_failing_stage_reports_its_log_and_survives_the_trip_back_to_the_coordinator(tmp_path):
    repo = toy_repo(tmp_path / "repo")
    (repo / "seed.txt").unlink()
    with pytest.raises(StageFailed) as caught:
        run_stage(task(repo, tmp_path / "remote", "draw"))
    assert "stage draw failed" in str(caught.value) and "seed.txt" in str(caught.value)
    back = pickle.loads(pickle.dumps(caught.value))  # Ray pickles it
    assert str(back) == str(caught.value) and back.stage == "draw"


@pytest.mark.slow
def test_a_rerun_after_the_coordinator_died_restores_what_finished(tmp_path):
    """A worker finished `draw` and pushed it, then the coordinator died before restoring it: the next run
    restores `draw` from the shared remote instead of running it, and runs only `double`."""
    repo, remote = toy_repo(tmp_path / "repo"), tmp_path / "remote"
    run_stage(task(repo, remote, "draw"))
    outcome = reproduce(repo, Options(jobs=1, remote=str(remote)))
    assert {r.stage: r.ran for r in outcome.finished} == {"draw": False, "double": True}
    assert "Running stage" not in outcome.final_log
    assert "Data and pipelines are up to date" in dvc(repo, "repro")


def threads_stage(out: str, *deps: str) -> dict:
    """A stage that writes the torch/BLAS thread count its task was given."""
    return {"cmd": f"python -c \"import os; open('{out}', 'w').write(os.environ.get('OMP_NUM_THREADS', '-'))\"",
            "deps": list(deps), "outs": [out]}


@pytest.mark.slow
def test_side_by_side_stages_share_the_cores_and_a_stage_alone_gets_them_all(tmp_path):
    """--jobs 2: `left` and `right` are ready together and get half the cores each; `join` can run beside
    nothing, so it gets them all (the last stages of the pipeline, evaluate and final, are such stages)."""
    repo = toy_repo(tmp_path / "repo")
    pipeline = {"stages": {**TOY["stages"], "left": threads_stage("left.txt", "a.txt"),
                           "right": threads_stage("right.txt", "a.txt"),
                           "join": threads_stage("join.txt", "b.txt", "left.txt", "right.txt")}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    run("git", "commit", "-qam", "a fork and a join", cwd=repo)
    outcome = reproduce(repo, Options(jobs=2, remote=str(tmp_path / "remote")))
    assert sorted(r.stage for r in outcome.finished if r.ran) == ["double", "draw", "join", "left", "right"]
    share = max(1, (os.cpu_count() or 1) // 2)
    assert (repo / "left.txt").read_text() == (repo / "right.txt").read_text() == str(share)
    assert (repo / "join.txt").read_text() == str(2 * share)
    # threads fixed by --cpus-per-task (what a byte-for-byte comparison with a serial run needs): alone or not
    (repo / "seed.txt").write_text("8")
    run("git", "commit", "-qam", "another seed: every stage runs again", cwd=repo)
    reproduce(repo, Options(jobs=2, cpus_per_task=1, remote=str(tmp_path / "remote")))
    assert [(repo / f).read_text() for f in ("left.txt", "right.txt", "join.txt")] == ["1", "1", "1"]


@pytest.mark.slow
def test_data_dvc_tracks_reaches_the_workers_through_the_shared_remote(tmp_path):
    repo, remote = toy_repo(tmp_path / "repo"), tmp_path / "remote"
    run("git", "rm", "-q", "--cached", "seed.txt", cwd=repo)
    dvc(repo, "add", "-q", "seed.txt")  # now in DVC's cache and git-ignored: a worker's clone lacks the file
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "seed tracked by DVC", cwd=repo)
    outcome = reproduce(repo, Options(jobs=1, remote=str(remote)))
    assert sorted(r.stage for r in outcome.finished if r.ran) == ["double", "draw"]
    assert "Running stage" not in outcome.final_log
    assert (repo / "b.txt").read_text().startswith((repo / "a.txt").read_text())  # restored here, consistent


@pytest.mark.slow
def test_a_stage_that_keeps_failing_is_reported_with_its_log_and_the_rest_still_runs(tmp_path):
    repo, remote = toy_repo(tmp_path / "repo"), tmp_path / "remote"
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    attempts = tmp_path / "attempts"  # outside the clones, so every attempt leaves a mark
    spec["stages"]["draw"]["cmd"] = (f"python -c \"import sys; open('{attempts}', 'a').write('x'); "
                                     "print('the disk is full'); sys.exit(3)\"")
    spec["stages"]["apart"] = {"cmd": "python -c \"open('c.txt', 'w').write('independent')\"",
                               "deps": ["seed.txt"], "outs": ["c.txt"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(PipelineError) as caught:
        reproduce(repo, Options(jobs=1, remote=str(remote)))
    message = str(caught.value)
    assert "1 stage(s) failed and 1 were not started" in message
    assert "stage draw failed" in message and "the disk is full" in message  # its log's last lines
    assert "double: not started, needs draw" in message
    assert attempts.read_text() == "xx"  # run, then retried once
    assert (remote / "runs").is_dir()  # `apart` finished and is on the remote: a rerun restores it


# --- the smoke pipeline on a two-node Ray cluster -----------------------------------------------------------------

STAGE_RUN = re.compile(r"Running stage '([^']+)'")
SMOKE = {**TINY, "scarcity.images_per_class": [2], "scarcity.variants": ["probe"]}
SMOKE_VARIANTS = ("probe", "cnn", "cnn_synthetic")  # a pretrained backbone, the compact CNN, and GAN samples


def smoke_repo(path: Path) -> Path:
    params = with_overrides(raw_params(), SMOKE)
    params["variants"] = {name: params["variants"][name] for name in SMOKE_VARIANTS}
    path.mkdir()
    return make_repo(path, yaml.safe_dump(params, sort_keys=False))


def results(repo: Path) -> dict[str, str]:
    """Every JSON file under reports/ as its bytes, less how the run went: the `-run.json` files (seconds, speed)
    and the same facts inside the GAN's metrics, which are written again without them."""
    out = {}
    for path in sorted((repo / "reports").rglob("*.json")):
        text = path.read_text()
        value = json.loads(text)
        if path.name.endswith("-run.json"):
            continue
        if isinstance(value, dict):
            results_only, facts = split_run_facts(value)
            if facts:
                text = json.dumps(results_only)
        out[str(path.relative_to(repo))] = text
    assert len(out) > 10
    return out


class TwoNodeCluster:
    """`ray start --head` and a second `ray start --address`, each with its own temporary folder and one CPU,
    started with --block so stopping them stops exactly their processes. Ray rewrites 127.0.0.1 to this machine's
    own address for a multi-node cluster; nothing leaves the machine. Token authentication stays on, as Ray 2.60
    starts clusters by default, with a token of the test's own in `env` (not ~/.ray/auth_token)."""

    def __init__(self, tmp: Path):
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.env = {**ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.logs = tmp
        # Ray's socket paths must stay under 107 bytes, which pytest's tmp_path folders exceed
        self.temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        ray = str(Path(sys.executable).parent / "ray")
        common = ["--num-cpus", "1", "--disable-usage-stats", "--block", "--node-ip-address", "127.0.0.1"]
        self.nodes = [subprocess.Popen([ray, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                                        "--temp-dir", str(self.temp / "head"), *common], **self._quiet(tmp, "head"))]
        self.wait_for(1)
        self.nodes.append(subprocess.Popen([ray, "start", "--address", self.address, "--temp-dir",
                                            str(self.temp / "worker"), *common], **self._quiet(tmp, "worker")))
        self.wait_for(2)

    def wait_for(self, nodes: int, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while self._alive_nodes() < nodes:
            for name, node in zip(("head", "worker"), self.nodes):
                if node.poll() is not None:
                    self.stop()
                    raise AssertionError(f"ray start ({name}) ended:\n{(self.logs / f'{name}.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{nodes} Ray node(s) did not come up within {seconds:.0f} s")
            time.sleep(1)

    def _quiet(self, tmp: Path, name: str) -> dict:
        return {"stdout": open(tmp / f"{name}.log", "w"), "stderr": subprocess.STDOUT, "env": self.env,
                "start_new_session": True}

    def _alive_nodes(self) -> int:
        code = ("import ray; ray.init(address=%r, log_to_driver=False); "
                "print(sum(n['Alive'] for n in ray.nodes()))" % self.address)
        try:
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env,
                                    timeout=60)
        except subprocess.TimeoutExpired:
            return 0
        return int(result.stdout.strip() or 0) if result.returncode == 0 else 0

    def stop(self):
        for node in reversed(self.nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
                node.wait(timeout=60)
        shutil.rmtree(self.temp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_a_worker_mid_stage(kind: str, killed: list) -> None:
    """Once a `kind` stage's command has run for two seconds, SIGKILL the Ray worker running it with every process
    under it, as if its machine had died. (The command has handed its work to the machine's warm stage server,
    whose child for it must then die too: pipeline/runtime/warm.py.)"""
    import psutil

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not killed:
        for proc in psutil.process_iter(["cmdline"]):
            if f"pipeline.stages.{kind}" in " ".join(proc.info["cmdline"] or []):
                try:
                    if time.time() - proc.create_time() < 2.0:
                        continue
                    worker = next(p for p in proc.parents() if "ray::" in " ".join(p.cmdline())
                                  or "default_worker.py" in " ".join(p.cmdline()))
                    for p in [*worker.children(recursive=True), worker]:
                        p.kill()
                    killed.append(" ".join(proc.info["cmdline"]))
                    return
                except (psutil.Error, StopIteration):
                    continue
        time.sleep(0.2)


@pytest.mark.slow
def test_two_ray_nodes_give_the_serial_runs_metrics_and_the_final_repro_runs_nothing(tmp_path):
    serial, parallel = smoke_repo(tmp_path / "serial"), smoke_repo(tmp_path / "parallel")
    # the same threads per stage as each Ray task gets (one core): torch's CPU kernels sum in another order with
    # another thread count, which moves the last digits of a loss
    out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=serial, env={**ENV, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True).stdout
    stage_count = len(STAGE_RUN.findall(out))
    cluster = TwoNodeCluster(tmp_path)
    killed: list[str] = []
    killer = threading.Thread(target=kill_a_worker_mid_stage, args=("finetune", killed), daemon=True)
    try:
        killer.start()
        result = subprocess.run([sys.executable, "-m", "pipeline.distributed", "--cluster", cluster.address,
                                 "--cpus-per-task", "1"], cwd=parallel, env=cluster.env, capture_output=True,
                                text=True)
    finally:
        cluster.stop()
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert killed, "no finetune stage was killed: the retry went untested"
    nodes = re.findall(r"\] (\S+) ran on .* \(Ray node (\w+)\)", log)
    assert sorted(stage for stage, _ in nodes) == sorted(STAGE_RUN.findall(out)), log[-5000:]  # each once, on Ray
    assert len({node for _, node in nodes}) == 2  # and both nodes took stages
    assert "will be retried" in log  # Ray saw the killed worker and ran its stage again
    final = log.split("the final dvc repro here:")[1]
    assert "Running stage" not in final and final.count("is cached - skipping run") == stage_count, final
    assert results(parallel) == results(serial)  # every metric, byte for byte once parsed
    assert "Data and pipelines are up to date" in dvc(parallel, "repro")
