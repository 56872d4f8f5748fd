"""dvc.yaml and pipeline/paths.py name the same paths, and each stage lists its own module and params."""

import yaml

from conftest import ROOT
from pipeline import paths


def stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_stage_outputs_are_the_paths_the_code_writes():
    s = stages()
    assert s["collect"]["outs"] == [str(paths.COLLECTED)] + [str(paths.REPORTS / name) for name in (
        paths.REJECTS_FILE, paths.DATA_CARD_FILE, paths.DATA_CARD_DIR)]
    assert s["augment"]["outs"] == [str(paths.AUGMENT)]
    assert s["synthesize"]["outs"] == [str(paths.synthetic_dir("${item.repeat}", "${item.fold}"))]
    assert s["finetune"]["outs"] == [str(paths.finetune_dir("${item.repeat}", "${item.fold}", "${item.variant}"))]
    assert s["evaluate"]["metrics"] == [{str(paths.METRICS): {"cache": False}}]
    assert set(s["evaluate"]["outs"]) == {str(paths.REPORT), str(paths.REPORT_HTML), str(paths.EVALUATION)}
    declared = [p if isinstance(p, str) else next(iter(p)) for p in s["evaluate"]["plots"]]
    assert declared == [str(paths.FIGURES)] + [str(paths.PLOTS / k) for k in ("confusion", "roc", "calibration",
                                                                             "scarcity")]
    assert s["scarcity"]["outs"] == [str(paths.scarcity_dir("${item.n}", "${item.variant}"))]
    assert str(paths.SCARCITY) in s["evaluate"]["deps"]
    assert s["final"]["outs"] == [str(paths.MODEL)]
    assert s["final"]["metrics"] == [{str(paths.FINAL_METRICS): {"cache": False}}]
    assert str(paths.EVALUATION) in s["final"]["deps"]
    name = paths.split_name("${item.repeat}", "${item.fold}")
    assert s["synthesize"]["metrics"] == [{str(paths.SYNTHESIZE_REPORTS / f"{name}.json"): {"cache": False}}]
    assert [next(iter(p)) for p in s["synthesize"]["plots"]] == [
        str(paths.SYNTHESIZE_REPORTS / f"{name}-{suffix}") for suffix in ("history.csv", "curves.png", "grid.png")]
    assert str(paths.AUGMENT / paths.POLICY_FILE) in s["finetune"]["deps"]
    run = f"{paths.split_name('${item.repeat}', '${item.fold}')}-${{item.variant}}"
    assert s["finetune"]["metrics"] == [{str(paths.FINETUNE_REPORTS / run / "metrics.json"): {"cache": False}}]
    assert s["finetune"]["plots"] == [{str(paths.FINETUNE_REPORTS / run / "plots" / "metrics"): {"cache": False,
                                                                                                  "x": "step"}}]
    assert str(paths.FINETUNE) in s["evaluate"]["deps"]


def test_each_stage_runs_its_module_lists_it_and_only_its_params():
    for name, stage in stages().items():
        assert stage["cmd"].startswith(f"python -m pipeline.{name}")
        assert f"pipeline/{name}.py" in stage["deps"]
        assert stage["params"][0].split(".")[0] in (name, "finetune")
    assert stages()["finetune"]["params"] == ["finetune", "variants.${item.variant}"]
    # the scarcity stages do not re-run when points are added or removed: each depends on its own draw only
    assert stages()["scarcity"]["params"] == ["finetune", "scarcity.holdout", "scarcity.seed",
                                              "variants.${item.variant}"]
    assert set(stages()["collect"]["deps"]) >= {"pipeline/sources.py", "pipeline/download.py", "pipeline/datacard.py"}
