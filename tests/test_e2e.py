"""The whole pipeline through DVC, in a temporary git repository made from this one, at smoke-test size."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.workspace import ENV, dvc, make_repo, run
from conftest import TINY, raw_params, with_overrides
from imports import closure, stage_module


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A fresh git repo holding this project's files, with TINY params."""
    params = with_overrides(raw_params(), TINY)
    return make_repo(tmp_path_factory.mktemp("repo"), yaml.safe_dump(params, sort_keys=False))


def refuse(constant: str):
    raise AssertionError(f"{constant} is not JSON")


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_nothing(repo):
    # as ./dev.sh repro runs it, beside a warm stage server; the next test's plain `dvc repro` runs after each kill
    # must then give the same metrics, byte for byte
    log = repo.with_name(repo.name + "-warm-server.log")
    first = run(sys.executable, "-m", "pipeline.runtime.warm", "run", "--log", str(log), "--", sys.executable, "-m",
                "dvc", "repro", cwd=repo)
    assert first.count("Running stage") == log.read_text().count("exited with 0")  # every stage ran on the server
    variants = set(raw_params()["variants"])
    points = len(TINY["scarcity.images_per_class"]) * len(raw_params()["scarcity"]["variants"])
    # 1 collect + 1 augment + 2 synthesize + 2 folds x every variant + the scarcity points + evaluate + final
    assert first.count("Running stage") == 6 + 2 * len(variants) + points, first
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert {key.split(".")[0] for key in metrics} == variants | {"compare", "scarcity", "selection"}
    assert 0 <= metrics["selection.accuracy"] <= 1  # the choose-then-train procedure's estimate
    for name in variants:
        assert 0 <= metrics[f"{name}.cv_accuracy"] <= 1
        assert metrics[f"{name}.oof_accuracy_low"] <= metrics[f"{name}.oof_accuracy"] <= metrics[
            f"{name}.oof_accuracy_high"]
    # 10 classes: chance is 0.1 (standard deviation 0.024 on the 150 development images); frozen ImageNet features
    # must beat it (the CNNs, 3 epochs on 20 images, are too close to it to ask)
    assert metrics["probe.dev_accuracy"] > 0.18
    tested = json.loads((repo / "reports" / "test_metrics.json").read_text())  # the final test, kept apart
    assert {key.split(".")[0] for key in tested} == variants | {"compare"} and 0 <= tested["cnn_pool.test_accuracy"]
    assert len([key for key in metrics if key.startswith("scarcity.")]) == 2 * points  # CV and test accuracy
    report = (repo / "reports" / "report.md").read_text()
    assert "did best: out-of-fold accuracy" in report and "## What each ingredient bought" in report
    assert (repo / "reports" / "report.html").stat().st_size > 100_000  # figures embedded
    # the final model: the best variant on every labelled image, ready for `python -m pipeline.stages.predict`
    card = json.loads((repo / "data" / "model" / "model_card.json").read_text())
    assert card["variant"] == json.loads((repo / "reports" / "evaluation.json").read_text())["best"]
    assert card["trained_on_images"] == 40 and (repo / "data" / "model" / "model.onnx").exists()
    assert 0 <= json.loads((repo / "reports" / "final.json").read_text())["test_accuracy"] <= 1
    assert (repo / "data" / "augment" / "preview.png").exists()
    assert (repo / "data" / "synthetic" / "r0-fold1" / "grid.png").exists()
    assert "Source `mnist`" in (repo / "reports" / "data_card.md").read_text()
    shown = dvc(repo, "metrics", "show")
    assert "cnn_pool.cv_accuracy" in shown
    assert "reports/synthesize/r0-fold1.json" in shown and "cas_real" in shown and "fid_candidates" in shown
    plots = dvc(repo, "plots", "show", "-o", str(repo / "plots"))
    assert "index.html" in plots
    page = (repo / "plots" / "index.html").read_text()
    assert "GAN augmentation strength p, repeat 0 fold 0" in page and "r0-fold1-curves.png" in page
    # every finetune stage's dvclive curves, and evaluate's confusion, ROC, calibration and scarcity data and figures
    assert "reports/finetune/r0-fold1-cnn/plots/metrics/train/loss.tsv" in page
    for plot in ("confusion/cnn.csv", "roc/probe.csv", "calibration/cnn_pool.csv", "scarcity/probe.csv"):
        assert f"reports/plots/{plot}" in page, plot
    assert "reports/figures/scarcity.png" in page and "reports/figures/differences.png" in page
    assert "reports/finetune/r0-fold0-cnn_pool/metrics.json" in shown.replace("\\", "/") or "train.loss" in shown

    for written in [*(repo / "reports").rglob("*.json"), *(repo / "data").rglob("*.json")]:
        json.loads(written.read_text(), parse_constant=refuse)  # strict JSON: no NaN or Infinity anywhere

    second = dvc(repo, "repro")
    assert "Running stage" not in second, second
    assert "Data and pipelines are up to date" in second


STAGE_KINDS = ("collect", "augment", "synthesize", "finetune", "scarcity", "evaluate", "final")


def kill_inside(repo: Path, stage: str, cpu_seconds: float) -> None:
    """Force `stage` to run again under `dvc repro`, and SIGKILL the whole process group once the stage's own
    process has done `cpu_seconds` of work: inside the stage, not before or after it. A stage that ends sooner is
    tried again with half the work."""
    import psutil

    kind = stage.split("@")[0]
    for _ in range(4):
        dvc_run = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", stage], cwd=repo,
                                   env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        deadline = time.monotonic() + 300
        while dvc_run.poll() is None and time.monotonic() < deadline:
            workers = [p for p in psutil.Process(dvc_run.pid).children(recursive=True)
                       if f"pipeline.stages.{kind}" in " ".join(_cmdline(p))]
            if any(sum(_cpu(p)) >= cpu_seconds for p in workers):
                os.killpg(dvc_run.pid, signal.SIGKILL)
                dvc_run.wait()
                return
            time.sleep(0.05)
        dvc_run.wait()
        cpu_seconds /= 2
    raise AssertionError(f"{stage} always finished before it had done the work to be killed at")


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _cpu(process) -> tuple[float, float]:
    import psutil

    try:
        times = process.cpu_times()
        return times.user, times.system
    except psutil.Error:
        return 0.0, 0.0


@pytest.mark.slow
def test_a_run_killed_inside_any_stage_resumes_to_the_same_metrics(repo):
    """SIGKILL inside each kind of stage in turn (a seeded random moment of its work), then a plain `dvc repro`
    must finish unaided, leave `dvc status` clean and no half-written or temporary output, and give a
    reports/metrics.json byte-identical to the uninterrupted run's."""
    dvc(repo, "repro")  # no-op when the first test ran
    reference = (repo / "reports" / "metrics.json").read_bytes()
    names = dvc(repo, "stage", "list", "--name-only").split()
    draw = random.Random(0)
    for kind in STAGE_KINDS:
        stage = next(name for name in names if name.split("@")[0] == kind)
        kill_inside(repo, stage, cpu_seconds=draw.uniform(1.5, 3.0))
        dvc(repo, "repro")
        assert json.loads(dvc(repo, "status", "--json")) == {}, kind
        leftovers = [p for top in ("data", "reports") for p in (repo / top).rglob(".*") if p.suffix in (".tmp", ".old")]
        assert not leftovers, (kind, leftovers)
        assert (repo / "reports" / "metrics.json").read_bytes() == reference, kind


@pytest.mark.slow
@pytest.mark.parametrize("module", ["pipeline/gan/quality.py", "pipeline/evaluation/statistics.py"])
def test_editing_a_shared_module_stales_exactly_the_stages_that_import_it(repo, module):
    """The stages worked out from the code's imports are the ones DVC finds changed, every matrix entry of them."""
    dvc(repo, "repro")  # no-op when the first test ran
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    importers = {name for name, stage in spec.items() if Path(module) in closure(stage_module(stage))}
    assert importers and importers != set(spec)  # a shared module, imported by some stages only
    path = repo / module
    original = path.read_text()
    try:
        path.write_text(original + "\n# an edit\n")
        stale = json.loads(dvc(repo, "status", "--json"))
    finally:
        path.write_text(original)
    every = dvc(repo, "stage", "list", "--name-only").split()
    assert set(stale) == {name for name in every if name.split("@")[0] in importers}, stale
    assert json.loads(dvc(repo, "status", "--json")) == {}  # the same bytes again: nothing to run


@pytest.mark.slow
def test_changing_one_variant_reruns_only_its_stages(repo):
    dvc(repo, "repro")  # no-op when the test above ran first; makes this test stand alone otherwise
    out = dvc(repo, "exp", "run", "-S", "variants.cnn_synthetic.epochs=2")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"finetune@0-0-cnn_synthetic", "finetune@0-1-cnn_synthetic", "evaluate", "final"}, out
    # the experiment's metrics are listed beside the workspace's
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    experiments = [rev["data"] for commit in shown for exp in (commit.get("experiments") or [])
                   for rev in exp["revs"]]
    ours = [e for e in experiments
            if e["params"]["params.yaml"]["data"]["variants"]["cnn_synthetic"]["epochs"] == 2]
    assert ours and 0 <= ours[0]["metrics"]["reports/metrics.json"]["data"]["cnn_synthetic.oof_accuracy"] <= 1
    assert "cnn_synthetic.oof_accuracy" in dvc(repo, "metrics", "diff", "--all")


@pytest.mark.slow
def test_your_own_folder_of_images_through_dvc(tmp_path):
    """The README's recipe: images in data/raw/<class>/, then `dvc exp run -S collect.source=folder ...`."""
    from PIL import Image

    from conftest import digit_images

    baseline = {**raw_params("study")["variants"]["baseline"], "epochs": 2, "input_size": 32}
    params = with_overrides(raw_params(), {**TINY, "collect.folds": [0, 1, 2], "variants": {"baseline": baseline},
                                           "scarcity.variants": ["baseline"], "scarcity.images_per_class": [3, 12]})
    repo = make_repo(tmp_path, yaml.safe_dump(params, sort_keys=False))
    for label, images in digit_images(6).items():
        (repo / "data" / "raw" / f"digit{label}").mkdir(parents=True)
        for i, pixels in enumerate(images):
            Image.fromarray(pixels).convert("RGB").save(repo / "data" / "raw" / f"digit{label}" / f"{i}.jpg")
    out = dvc(repo, "exp", "run", "-S", "collect.source=folder", "-S", "collect.channels=3")
    assert "Running stage 'evaluate'" in out
    summary = json.loads((repo / "data" / "collected" / "summary.json").read_text())
    assert summary["source"] == "folder" and summary["accepted"] == 18 and summary["classes"] == [
        "digit0", "digit1", "digit2"]
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert "baseline.dev_accuracy" not in metrics  # a folder source without test/ has no external images
    assert json.loads((repo / "reports" / "test_metrics.json").read_text()) == {}
    assert 0 <= metrics["baseline.oof_accuracy"] <= 1
    # the scarcity curve draws only from the 6 labelled images per class: 3 runs, 12 is recorded as not run
    assert "scarcity.baseline.n3.oof_accuracy" in metrics and "scarcity.baseline.n12.oof_accuracy" not in metrics
    assert "not run: class 'digit0' has 6 images to draw from, fewer than 12" in (
        repo / "reports" / "report.md").read_text()
    # a new image in the folder is a changed dependency: collect runs again
    Image.fromarray(digit_images(7)[0][6]).save(repo / "data" / "raw" / "digit0" / "new.png")
    assert "Running stage 'collect'" in dvc(repo, "repro")
