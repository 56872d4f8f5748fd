"""The synthesize stage trains each fold's GAN on that fold's training images only, and says so in its metadata."""

import json

import numpy as np
from PIL import Image

from conftest import make_params
from pipeline import synthesize
from pipeline.images import load_collected


def test_gan_sees_only_the_folds_training_images_and_writes_samples(tmp_path, collected_dir):
    params = make_params()
    out = tmp_path / "fold1"
    meta = synthesize.run(params.synthesize, 1, collected_dir, out)
    data = load_collected(collected_dir)
    train_rows, val_rows = data.fold_split(1)
    trained_on = set(json.loads((out / "meta.json").read_text())["trained_on_sha256"])
    assert trained_on == set(train_rows.sha256)
    assert not trained_on & set(val_rows.sha256)
    assert not trained_on & set(data.external.sha256)
    with np.load(out / "samples.npz") as samples:
        images, labels = samples["images"], samples["labels"]
    assert images.shape == (3 * 10, 16, 16, 1) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [3] * 10
    assert images.std() > 0  # not a blank output
    assert meta["samples"] == 30
    assert Image.open(out / "grid.png").size[0] > 16 * 3
    assert (out / "generator.safetensors").stat().st_size > 1000
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history][-1] <= params.synthesize.steps
    assert all(np.isfinite(h["loss_d"]) and np.isfinite(h["loss_g"]) for h in history)


def test_same_seed_gives_the_same_samples(tmp_path, collected_dir):
    params = make_params(synthesize__steps=5)
    for name in ("a", "b"):
        synthesize.run(params.synthesize, 0, collected_dir, tmp_path / name)
    with np.load(tmp_path / "a" / "samples.npz") as a, np.load(tmp_path / "b" / "samples.npz") as b:
        assert np.array_equal(a["images"], b["images"])
