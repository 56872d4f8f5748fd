"""Photos: the photos preset applied to params.yaml, and a folder of real colour photos through the whole DVC
pipeline with it, at smoke size but at the photos' own side (256 px) and the backbones' native input."""

import json
import sys

import pandas as pd
import pytest
import yaml

from pipeline import presets
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.params import load_params

from benchmarks.workspace import dvc, make_repo, run
from conftest import photo_folder, raw_params, with_overrides

# smoke size on top of the preset: 2 folds, a short GAN, few views and epochs
SMOKE = {"collect.folds": [0, 1], "synthesize.steps": 20, "synthesize.batch_size": 8,
         "synthesize.base_channels": 8, "synthesize.candidates_per_class": 4, "synthesize.keep_per_class": 2,
         "synthesize.checkpoint_every": 10, "synthesize.log_every": 5, "synthesize.feature_size": 32,
         "finetune.probe_views": 2, "finetune.batch_size": 16, "finetune.warmup_epochs": 1,
         "variants.partial.epochs": 2, "variants.partial_synthetic.epochs": 2,
         "scarcity.images_per_class": [3], "evaluate.bootstrap": 200}


def test_the_photos_preset_replaces_the_digits_recipes_and_keeps_the_comments(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((presets.PRESETS.parent / "params.yaml").read_text())
    changed = presets.apply("photos", path)
    params = load_params(path)
    assert (params.collect.source, params.collect.channels, params.collect.image_size) == ("folder", "auto", "auto")
    assert set(params.variants) == {"probe", "probe_lite2", "partial", "partial_synthetic"}  # replaced, not joined
    assert all(v.input_size == 0 and v.augment for v in params.variants.values())  # the backbones' native size
    names = [t.name for t in params.augment.transforms]
    assert "hflip" in names and "colour" in names and "elastic" not in names
    assert params.finetune.seed == 0 and params.evaluate.confidence == 0.95  # merged: the rest is untouched
    assert "collect.source" in changed and "variants" in changed
    assert "# Every key is checked by pipeline/params.py" in path.read_text()  # params.yaml's own comments stay
    assert presets.apply("photos", path) == []  # applying it twice changes nothing more
    with pytest.raises(PipelineError, match="no preset 'foto'; the presets are: photos"):
        presets.apply("foto", path)


@pytest.mark.slow
def test_a_photo_folder_goes_through_dvc_repro_with_the_photos_preset(tmp_path):
    repo = make_repo(tmp_path / "repo", yaml.safe_dump(raw_params(), sort_keys=False))
    photo_folder(repo / "data" / "raw", classes=3, per_class=8)
    pool = repo / "data" / "raw" / "unlabelled"  # unlabelled photos beside the class folders: 6 of each class
    for folder in sorted(photo_folder(tmp_path / "more", classes=3, per_class=14).iterdir()):
        for photo in sorted(folder.iterdir())[8:]:
            pool.mkdir(exist_ok=True)
            photo.rename(pool / f"{folder.name}-{photo.name}")
    # what `./dev.sh preset photos` runs (tests/test_dev_sh.py checks that it does), in this environment
    assert "preset photos changed" in run(sys.executable, "-m", "pipeline.presets", "photos", cwd=repo)
    params = with_overrides(yaml.safe_load((repo / "params.yaml").read_text()), SMOKE)
    # the variant the README says to add with a pool: the probe, self-trained on it
    params["variants"]["probe_pool"] = {**params["variants"]["probe"], "unlabelled": True}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "commit", "-qam", "photos preset at smoke size", cwd=repo)
    out = dvc(repo, "repro")
    assert "Running stage 'final'" in out
    summary = json.loads((repo / "data" / "collected" / "summary.json").read_text())
    # colour photos of about 256 x 341: stored in colour at their shorter side, chosen from the data
    assert (summary["channels"], summary["image_size"], summary["accepted"]) == (3, 256, 24 + 18)
    assert summary["unlabelled"] == 18
    assert summary["warnings"] == []
    assert "HorizontalFlip" in (repo / "data" / "augment" / "policy.json").read_text()
    synthesized = json.loads((repo / "reports" / "synthesize" / "r0-fold0.json").read_text())
    assert synthesized["accepted"] >= 0
    meta = json.loads((repo / "data" / "synthetic" / "r0-fold0" / "meta.json").read_text())
    assert (meta["image_size"], meta["gan_image_size"]) == (256, 64)
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    for name in ("probe", "probe_lite2", "partial", "partial_synthetic", "probe_pool"):
        assert 0 <= metrics[f"{name}.oof_accuracy"] <= 1
    pooled = json.loads((repo / "data" / "finetune" / "r0-fold0-probe_pool" / "meta.json").read_text())
    assert 12 < pooled["train_unlabelled"] <= 18 and [r["round"] for r in pooled["self_training"]] == [1, 2, 3]
    assert 0 < pooled["self_training"][-1]["pseudo_labelled"] <= 9  # at most half the pool, 3 per class
    evaluation = json.loads((repo / "reports" / "evaluation.json").read_text())
    assert any((c["setting"], c["a"], c["b"]) == ("unlabelled", "probe", "probe_pool")
               for c in evaluation["comparisons"])  # the report says what the pool bought
    partial = json.loads((repo / "data" / "finetune" / "r0-fold0-partial" / "meta.json").read_text())
    assert partial["partial_training_rows"] == 12 * (1 + 2) and partial["trunk_output_shape"][1:] == [7, 7]
    card = json.loads((repo / "data" / "model" / "model_card.json").read_text())
    assert card["image"]["size"] == 256 and card["image"]["channels"] == 3 and card["input_size"] in (224, 260)
    # the final model predicts a photo it never saw, prepared as collect prepared the training photos
    photo = photo_folder(tmp_path / "unseen", classes=3, per_class=9)
    run(sys.executable, "-m", "pipeline.stages.predict", str(photo), "--out", str(tmp_path / "p.csv"), cwd=repo)
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert len(table) == 27 and (table.error == "").all()
    assert set(table.predicted) <= set(summary["classes"]) and table.probability.between(0, 1).all()
