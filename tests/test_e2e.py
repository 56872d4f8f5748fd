"""The whole pipeline through DVC, in a temporary git repository made from this one, at smoke-test size."""

import json

import pytest
import yaml

from benchmarks.workspace import dvc, make_repo
from conftest import TINY, raw_params, with_overrides


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A fresh git repo holding this project's files, with TINY params."""
    params = with_overrides(raw_params(), {**TINY, "finetune.epochs": 12})
    return make_repo(tmp_path_factory.mktemp("repo"), yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_nothing(repo):
    first = dvc(repo, "repro")
    # 1 collect + 1 augment + 2 synthesize + 2 folds x 3 variants + 1 evaluate
    assert first.count("Running stage") == 11, first
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert set(metrics) == {"baseline", "augment", "synthetic"}
    for values in metrics.values():
        assert 0 <= values["cv_accuracy"] <= 1
        assert values["oof_accuracy_low"] <= values["oof_accuracy"] <= values["oof_accuracy_high"]
    # 10 classes: chance is 0.1 (standard deviation 0.017 on 300 images); the pretrained baseline must beat it
    assert metrics["baseline"]["external_ensemble_accuracy"] > 0.18
    report = (repo / "reports" / "report.md").read_text()
    assert "did best in cross-validation" in report
    assert (repo / "data" / "augment" / "preview.png").exists()
    assert (repo / "data" / "synthetic" / "fold1" / "grid.png").exists()
    shown = dvc(repo, "metrics", "show")
    assert "baseline.cv_accuracy" in shown.replace("\n", " ") or "cv_accuracy" in shown

    second = dvc(repo, "repro")
    assert "Running stage" not in second, second
    assert "Data and pipelines are up to date" in second


@pytest.mark.slow
def test_changing_one_variant_reruns_only_its_stages(repo):
    dvc(repo, "repro")  # no-op when the test above ran first; makes this test stand alone otherwise
    out = dvc(repo, "exp", "run", "-S", "variants.augment.weights=none")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"finetune@0-augment", "finetune@1-augment", "evaluate"}, out
