"""dvc.yaml and pipeline/runtime/paths.py name the same paths; each stage depends on every project module it
imports (worked out from the code) and on exactly the params sections it reads."""

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.runtime import paths

from conftest import ROOT
from imports import closure, covered, declared_sections, module_file, stage_module


def stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_stage_outputs_are_the_paths_the_code_writes():
    s = stages()
    assert s["collect"]["outs"] == [str(paths.COLLECTED)] + [str(paths.REPORTS / name) for name in (
        paths.REJECTS_FILE, paths.DATA_CARD_FILE, paths.DATA_CARD_DIR)]
    assert s["augment"]["outs"] == [str(paths.AUGMENT)]
    assert s["synthesize"]["outs"] == [str(paths.synthetic_dir("${item.repeat}", "${item.fold}"))]
    assert s["finetune"]["outs"] == [str(paths.finetune_dir("${item.repeat}", "${item.fold}", "${item.variant}"))]
    assert s["evaluate"]["metrics"] == [str(paths.METRICS), str(paths.TEST_METRICS)]
    assert set(s["evaluate"]["outs"]) == {str(paths.REPORT), str(paths.REPORT_HTML), str(paths.EVALUATION),
                                         str(paths.LABELLING)}
    declared = [p if isinstance(p, str) else next(iter(p)) for p in s["evaluate"]["plots"]]
    assert declared == [str(paths.FIGURES)] + [str(paths.PLOTS / k) for k in ("confusion", "roc", "calibration",
                                                                             "scarcity")]
    assert s["scarcity"]["outs"] == [str(paths.scarcity_dir("${item.n}", "${item.variant}"))]
    assert str(paths.SCARCITY) in s["evaluate"]["deps"]
    assert s["final"]["outs"] == [str(paths.MODEL)]
    assert s["final"]["metrics"] == [str(paths.FINAL_METRICS)]
    assert str(paths.EVALUATION) in s["final"]["deps"]
    name = paths.split_name("${item.repeat}", "${item.fold}")
    assert s["synthesize"]["metrics"] == [str(paths.SYNTHESIZE_REPORTS / f"{name}.json")]
    assert [p if isinstance(p, str) else next(iter(p)) for p in s["synthesize"]["plots"]] == [
        str(paths.SYNTHESIZE_REPORTS / f"{name}-{suffix}") for suffix in ("history.csv", "curves.png", "grid.png")]
    assert str(paths.AUGMENT / paths.POLICY_FILE) in s["finetune"]["deps"]
    assert str(paths.AUGMENT / paths.POLICY_FILE) in s["synthesize"]["deps"]  # the filter's views are drawn with it
    run = f"{paths.split_name('${item.repeat}', '${item.fold}')}-${{item.variant}}"
    assert s["finetune"]["metrics"] == [str(paths.FINETUNE_REPORTS / run / "metrics.json"),
                                        str(paths.run_facts(paths.FINETUNE_REPORTS, run))]
    point = "n${item.n}-${item.variant}"
    assert s["scarcity"]["metrics"] == [str(paths.run_facts(paths.SCARCITY_REPORTS, point))]
    assert s["finetune"]["plots"] == [{str(paths.FINETUNE_REPORTS / run / "plots" / "metrics"): {"x": "step"}}]
    assert str(paths.FINETUNE) in s["evaluate"]["deps"]


def test_every_output_is_cached_so_the_run_cache_records_every_stage():
    """DVC saves no run-cache entry for a stage with an uncached output, and parallel runs bring results back
    through the run-cache (pipeline/distributed): one `cache: false` would make the coordinator run that stage."""
    uncached = [f"{name}: {path}" for name, stage in stages().items()
                for kind in ("outs", "metrics", "plots") for entry in stage.get(kind, [])
                if isinstance(entry, dict) for path, options in entry.items() if options.get("cache") is False]
    assert not uncached, uncached


def uncovered_modules(name: str, stage: dict) -> list[str]:
    """The project files a stage's command imports that its deps do not cover, as messages naming both."""
    code_deps = [d for d in stage["deps"] if d.startswith("pipeline")]
    return [f"stage {name!r} imports {path} but its deps in dvc.yaml do not list it (or a folder above it)"
            for path in sorted(closure(stage_module(stage)))
            if not covered(path, code_deps) and not (path.name == "__init__.py" and holds_no_code(path))]


def holds_no_code(path: Path) -> bool:
    """pipeline/__init__.py and pipeline/stages/__init__.py run before every stage; empty (a docstring at most),
    they cannot change a result, so stages need not list them. Code added to one makes the check above fail."""
    body = ast.parse((ROOT / path).read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def test_each_stage_depends_on_every_module_it_imports():
    missing = [message for name, stage in stages().items() for message in uncovered_modules(name, stage)]
    assert not missing, "\n".join(missing)


def test_every_code_dependency_exists():
    for name, stage in stages().items():
        for dep in stage["deps"]:
            if dep.startswith("pipeline"):
                assert (ROOT / dep).exists(), f"stage {name!r} depends on {dep}, which does not exist"


def test_a_dependency_list_that_drifted_from_the_imports_is_caught():
    """The check above, on the finetune stage with one imported file taken out of its deps."""
    finetune = stages()["finetune"]
    assert uncovered_modules("finetune", finetune) == []
    imported = sorted(closure(stage_module(finetune)))
    assert Path("pipeline/runtime/compute.py") in imported
    drifted = {**finetune, "deps": [d for d in finetune["deps"] if d != "pipeline/runtime"] + [
        "pipeline/runtime/params.py"]}
    messages = uncovered_modules("finetune", drifted)
    assert "stage 'finetune' imports pipeline/runtime/compute.py but its deps" in " ".join(messages)
    assert not any("params.py" in m for m in messages)


def test_the_closure_follows_imports_inside_functions_and_package_inits():
    files = closure("pipeline.stages.predict")
    assert Path("pipeline/__init__.py") in files and Path("pipeline/inference/__init__.py") in files
    # runtime.cli imports params inside stage_args(), and params imports the augmentation transforms
    assert {Path("pipeline/runtime/params.py"), Path("pipeline/augmentation/policy.py")} <= closure(
        "pipeline.stages.collect")
    assert Path("pipeline/gan/conditional.py") not in closure("pipeline.stages.collect")
    assert module_file("pipeline.no_such_module") is None


@pytest.mark.parametrize("name", sorted(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_each_stage_lists_exactly_the_params_sections_its_code_reads(name):
    stage = stages()[name]
    listed = {entry.split(".")[0] for entry in stage["params"]}
    declared = declared_sections(module_file(stage_module(stage)))
    assert listed == set(declared), f"stage {name!r}: dvc.yaml lists params {sorted(listed)}, its code reads " \
                                    f"{sorted(declared)} (PARAMS in {module_file(stage_module(stage))})"


def test_a_stage_cannot_read_a_params_section_it_did_not_declare():
    from pipeline.runtime.cli import stage_args

    _, params = stage_args("Doc.", ["--fold", "0", "--params", str(ROOT / "params.yaml")], ("finetune",), fold=True)
    assert params.finetune.batch_size >= 1
    with pytest.raises(AttributeError, match="declared params sections \\('finetune',\\), not 'collect'"):
        params.collect


def test_each_stage_runs_its_module_and_the_narrow_params():
    for name, stage in stages().items():
        assert stage["cmd"].startswith(f"python -m pipeline.stages.{name}")
    assert stages()["finetune"]["params"] == ["finetune", "variants.${item.variant}"]
    # the scarcity stages do not re-run when points are added or removed: each depends on its own draw only
    assert stages()["scarcity"]["params"] == ["finetune", "scarcity.holdout", "scarcity.seed",
                                              "variants.${item.variant}"]
