"""The warm stage server (pipeline/runtime/warm.py): real stage commands handed over to a process that imported
torch once and forks for each, giving what a fresh process gives."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_finetune import inputs  # noqa: F401  (a fixture: real augment and GAN outputs for fold 0)

from pipeline.runtime import warm

from conftest import ROOT, stage_env, stage_workspace

STAGE = ["-m", "pipeline.stages.finetune", "--fold", "0", "--variant", "cnn"]


@pytest.fixture(scope="module")
def server():
    """A server on a socket in a short /tmp folder, its log beside it."""
    folder = Path(tempfile.mkdtemp(prefix="fewshot-warm-test-", dir="/tmp"))
    path, log = folder / "socket", folder / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.runtime.warm", "serve", str(path)], cwd=ROOT,
                                   stdout=out, stderr=out)
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), log.read_text()
    assert path.stat().st_mode & 0o077 == 0  # only its own user may connect: a command runs with its environment
    yield path, log
    process.terminate()
    assert process.wait(timeout=30) == 0
    assert not path.exists()  # a stopped server removes its socket
    shutil.rmtree(folder)


def served_env(path: Path) -> dict:
    return {**stage_env(), warm.ENV: str(path)}


def run(command: list[str], work: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=work, env=env, capture_output=True, text=True, timeout=300)


def test_a_stage_on_the_server_writes_byte_for_byte_what_a_fresh_process_writes(tmp_path, inputs, server):  # noqa: F811
    path, log = server
    works = {name: stage_workspace(tmp_path / name, inputs.collected, inputs.policy, **{"variants.cnn.epochs": 6})
             for name in ("fresh", "served")}
    fresh = run(STAGE, works["fresh"], stage_env())
    served = run(STAGE, works["served"], served_env(path))
    assert fresh.returncode == 0 and served.returncode == 0, fresh.stderr[-2000:] + served.stderr[-2000:]
    assert f"runs pipeline.stages.finetune --fold 0 --variant cnn in {works['served']}" in log.read_text()
    assert "validation accuracy" in served.stderr  # the stage's log reached the command's own stderr
    outputs = sorted(p.relative_to(works["fresh"]) for p in (works["fresh"] / "data" / "finetune").rglob("*")
                     if p.is_file())
    assert {"data/finetune/r0-fold0-cnn/predictions.npz", "data/finetune/r0-fold0-cnn/meta.json"} <= set(map(str,
                                                                                                            outputs))
    for relative in [*outputs, Path("reports/finetune/r0-fold0-cnn/metrics.json")]:
        assert (works["served"] / relative).read_bytes() == (works["fresh"] / relative).read_bytes(), relative


def test_a_failing_stage_fails_the_same_way_on_the_server(tmp_path, inputs, server):  # noqa: F811
    path, log = server
    work = stage_workspace(tmp_path, inputs.collected, inputs.policy)
    command = ["-m", "pipeline.stages.finetune", "--fold", "7", "--variant", "cnn"]
    fresh, served = run(command, work, stage_env()), run(command, work, served_env(path))
    assert fresh.returncode == served.returncode == 2
    message = "fold 7 of repeat 0 is not in the collected data"
    assert message in fresh.stderr and message in served.stderr
    assert re.search(r"pid (\d+) exited with 2", log.read_text())


def test_a_command_without_stdin_is_served_too(tmp_path, inputs, server):  # noqa: F811
    """A command started with its standard input closed (as some schedulers do) hands /dev/null over instead."""
    path, log = server
    work = stage_workspace(tmp_path, inputs.collected, inputs.policy)
    done = subprocess.run([sys.executable, "-m", "pipeline.stages.finetune", "--fold", "7", "--variant", "cnn"],
                          cwd=work, env=served_env(path), capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.close(0))
    assert done.returncode == 2 and "fold 7 of repeat 0 is not in the collected data" in done.stderr
    assert "not reachable" not in done.stderr
    assert f"runs pipeline.stages.finetune --fold 7 --variant cnn in {work}" in log.read_text()


def test_killing_the_command_kills_its_stage_and_the_server_serves_on(tmp_path, inputs, server):  # noqa: F811
    path, log = server
    work = stage_workspace(tmp_path, inputs.collected, inputs.policy, **{"variants.cnn.epochs": 4000})
    client = subprocess.Popen([sys.executable, *STAGE], cwd=work, env=served_env(path), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    pattern = re.compile(rf"pid (\d+) runs pipeline.stages.finetune --fold 0 --variant cnn in {re.escape(str(work))}")
    deadline = time.monotonic() + 60
    while not (found := pattern.search(log.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert found, log.read_text()
    stage = int(found.group(1))
    time.sleep(3)  # well into training
    assert client.poll() is None
    client.send_signal(signal.SIGKILL)
    client.wait()
    deadline = time.monotonic() + 10
    while alive(stage) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(stage)
    assert f"pid {stage} exited with -9" in log.read_text()
    assert warm.answers(path)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_without_a_reachable_server_the_stage_runs_in_its_own_process(tmp_path, inputs):  # noqa: F811
    work = stage_workspace(tmp_path, inputs.collected, inputs.policy)
    done = run(["-m", "pipeline.stages.finetune", "--fold", "7", "--variant", "cnn"], work,
               served_env(tmp_path / "no-server"))
    assert done.returncode == 2
    assert "not reachable" in done.stderr and "fold 7 of repeat 0 is not in the collected data" in done.stderr


def test_run_serves_the_command_then_stops_the_server(tmp_path, inputs):  # noqa: F811
    work = stage_workspace(tmp_path, inputs.collected, inputs.policy)
    log = tmp_path / "server.log"
    done = run(["-m", "pipeline.runtime.warm", "run", "--log", str(log), "--", sys.executable, "-m",
                "pipeline.stages.finetune", "--fold", "7", "--variant", "cnn"], work, stage_env())
    assert done.returncode == 2, done.stderr[-2000:]
    served = log.read_text()
    assert "runs pipeline.stages.finetune --fold 7 --variant cnn" in served and "exited with 2" in served
    socket = Path(re.search(r"listening on (\S+)", served).group(1))
    assert not socket.exists() and not socket.parent.exists()  # stopped, its folder removed


def test_only_plain_stage_commands_are_handed_over():
    python = sys.executable
    assert warm.stage_command([python, "-m", "pipeline.stages.finetune", "--fold", "0"]) == (
        "pipeline.stages.finetune", ["--fold", "0"])
    assert warm.stage_command([python, "-u", "-m", "pipeline.stages.finetune"]) is None  # torchrun's processes
    assert warm.stage_command([python, "-m", "pipeline.runtime.warm", "serve", "s"]) is None
    assert warm.stage_command([python, "benchmarks/parallel.py"]) is None
