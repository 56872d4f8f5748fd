"""The label-scarcity stage: nested draws from real MNIST, a fixed test set, folds, records of points not run, and
resuming from finished folds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.data import draws
from pipeline.data.collected import LABELLED, load_collected
from pipeline.runtime.errors import PipelineError
from pipeline.stages import augment, scarcity
from pipeline.stages.scarcity import ScarcityInputs, ScarcityOutputs
from pipeline.training import curve_points

from conftest import make_params


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, collected_dir):
    root = tmp_path_factory.mktemp("scarcity")
    params = make_params()
    augment.run(params.augment, collected_dir, root / "augment")
    return ScarcityInputs(collected_dir, root / "augment" / "policy.json")


def test_draws_are_nested_start_with_the_labelled_images_and_never_touch_the_test_set(collected_dir):
    collected, params = load_collected(collected_dir), make_params().scarcity
    small, large = draws.draw(collected, params, 2), draws.draw(collected, params, 6)
    manifest = collected.manifest
    assert set(small.train) < set(large.train)
    assert np.array_equal(small.test, large.test) and len(small.test) == params.holdout
    for drawn, n in ((small, 2), (large, 6)):
        assert np.bincount(manifest.target[drawn.train], minlength=10).tolist() == [n] * 10
        assert not set(drawn.train) & set(drawn.test)
        assert not set(manifest.group[drawn.train]) & set(manifest.group[drawn.test])
    # collect labelled 4 per class: the first 4 of a class come from them, the rest from MNIST's unlabelled pool
    assert (manifest.split[small.train] == LABELLED).all()
    assert (manifest.split[large.train] == LABELLED).sum() == 40
    # every fold of every repeat validates each class once or more
    for folds in large.folds:
        for fold in range(2):
            assert len(set(manifest.target[large.train[folds == fold]])) == 10


def test_a_point_larger_than_the_data_is_recorded_as_not_run(tmp_path, inputs):
    params = make_params()
    out = ScarcityOutputs(tmp_path / "n1000")
    meta = scarcity.run(params.scarcity, params.finetune, params.variants["probe"], 1000, inputs, out)
    assert "fewer than 1000" in meta["not_run"]
    assert json.loads((out.folder / "meta.json").read_text())["not_run"] == meta["not_run"]
    assert not (out.folder / "predictions.npz").exists()


def test_fewer_images_per_class_than_folds_is_not_run(tmp_path, inputs):
    params = make_params(scarcity__images_per_class=[1, 4])  # collect made 2 folds
    meta = scarcity.run(params.scarcity, params.finetune, params.variants["probe"], 1, inputs,
                        ScarcityOutputs(tmp_path / "n1"))
    assert meta["not_run"] == "1 images per class cannot give each of the 2 folds one"


def test_user_data_draws_only_labelled_images(collected_dir):
    """A folder or CSV source has no unlabelled pool: its external images are a test set, never training data."""
    collected = load_collected(collected_dir)
    collected.manifest["source"] = "folder"
    with pytest.raises(draws.NotEnoughImages, match="has 4 images to draw from, fewer than 6"):
        draws.draw(collected, make_params().scarcity, 6)


def test_a_draw_whose_groups_cannot_make_folds_is_a_point_not_run(collected_dir):
    """The curve draws its folds with collect's function: a fold that would train on no picture of a class (groups
    mixing labels) makes the point impossible, not a model that never saw the class."""
    collected = load_collected(collected_dir)
    labelled = collected.manifest.split == LABELLED
    collected.manifest.loc[labelled & collected.manifest.target.isin([0, 1]), "group"] = -1
    with pytest.raises(draws.NotEnoughImages, match=r"would train on no picture of \[0, 1\]"):
        draws.draw(collected, make_params().scarcity, 2)


def test_out_of_fold_predictions_cover_every_drawn_image_and_finished_folds_are_reused(tmp_path, inputs):
    params = make_params()
    out = ScarcityOutputs(tmp_path / "n6", tmp_path / "checkpoints", tmp_path / "features")
    meta = scarcity.run(params.scarcity, params.finetune, params.variants["cnn"], 6, inputs, out)
    with np.load(out.folder / "predictions.npz") as p:
        assert p["oof_probs"].shape == (1, 60, 10) and np.isfinite(p["oof_probs"]).all()
        assert p["test_probs"].shape == (1, 2, params.scarcity.holdout, 10)
        assert np.allclose(p["oof_probs"].sum(-1), 1, atol=1e-4)
        first = p["oof_probs"].copy()
    assert meta["train_images"] == 60 and meta["from_pool"] == 20 and not out.checkpoints.exists()
    # a kept fold is reused only while it matches: plant fold 1's result with a wrong key, then the right one
    drawn = draws.draw(load_collected(inputs.collected), params.scarcity, 6)
    point = curve_points.Point(params.finetune, params.variants["cnn"], load_collected(inputs.collected), drawn,
                               inputs.policy, out.checkpoints, out.features, torch.device("cpu"))
    out.checkpoints.mkdir()
    planted = {"val_probs": np.full((30, 10), 0.1), "test_probs": np.full((params.scarcity.holdout, 10), 0.1),
               "seconds": 0.0}
    np.savez(out.checkpoints / "r0-fold1.npz", key="stale", **planted)
    assert not np.allclose(curve_points.train_fold(point, 0, 1)["val_probs"], 0.1)
    np.savez(out.checkpoints / "r0-fold1.npz", key=curve_points.fold_key(point, 0, 1), **planted)
    assert np.allclose(curve_points.train_fold(point, 0, 1)["val_probs"], 0.1)
    assert not np.allclose(first, 0.1)


def test_params_refuse_scarcity_variants_with_gan_samples_or_too_few_images():
    with pytest.raises(PipelineError, match="scarcity.variants \\(cnn_synthetic\\)"):
        make_params(scarcity__variants=["cnn_synthetic"])
    with pytest.raises(PipelineError, match="`scarcity.variants` must be names from `variants`"):
        make_params(scarcity__variants=["nope"])
    with pytest.raises(PipelineError, match="increasing positive numbers"):
        make_params(scarcity__images_per_class=[6, 4])
