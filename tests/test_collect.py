"""The collect stage on real images: MNIST's scarce draw and external test set, and a folder of real digits
with the awkward files users bring."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import digit_images, make_params
from pipeline import collect
from pipeline.errors import PipelineError
from pipeline.images import load_collected, pixel_sha256


def test_mnist_draws_a_scarce_stratified_set_and_keeps_the_rest_external(collected_dir, tiny_params):
    data = load_collected(collected_dir)
    labelled, external = data.labelled, data.external
    assert data.classes == tuple(str(d) for d in range(10))
    assert labelled.label.value_counts().tolist() == [4] * 10
    assert len(external) == 300 and (external.fold == -1).all()
    # every fold holds 2 images of every class (4 per class, 2 folds)
    assert (labelled.groupby(["fold", "label"]).size() == 2).all()
    assert not set(labelled.path) & set(external.path)
    assert data.images.shape == (340, 16, 16, 1) and data.images.dtype == np.uint8
    # the manifest's hash is the hash of the stored pixels
    for row in data.manifest.sample(5, random_state=0).itertuples():
        assert row.sha256 == pixel_sha256(data.images[row.index])
    summary = json.loads((collected_dir / "summary.json").read_text())
    assert summary["inputs"] == 5000 and summary["accepted"] == 5000 and summary["external_not_kept"] == 4660


def test_same_seed_same_draw_other_seed_other_draw(tmp_path, collected_dir):
    again = collect.run(make_params().collect, tmp_path / "a")
    other = collect.run(make_params(collect__seed=1).collect, tmp_path / "b")
    first = load_collected(collected_dir).manifest
    assert again["labelled"] == 40
    assert load_collected(tmp_path / "a").manifest.equals(first)
    assert set(load_collected(tmp_path / "b").labelled.path) != set(first[first.split == "labelled"].path)
    assert other["labelled"] == 40


def write_folder(root, per_class=6):
    """Real digits as PNG/JPEG in class folders (one nested), plus the awkward files users bring."""
    for label, images in digit_images(per_class).items():
        folder = root / f"class {label}"  # spaces in names
        (folder / "nested").mkdir(parents=True)
        for i, pixels in enumerate(images):
            target = folder / ("nested" if i == 0 else "") / f"ü{i}.png"
            Image.fromarray(pixels).save(target)
    Image.fromarray(digit_images(2)[0][1]).save(root / "class 0" / "copy.png")  # ü1.png again, same class
    Image.fromarray(digit_images(1)[0][0]).save(root / "class 1" / "mislabelled.png")  # ü0.png under another label
    rgba = np.dstack([digit_images(7)[2][6]] * 3 + [np.full((24, 24), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "class 2" / "alpha.png")
    (root / "class 2" / "notes.png").write_text("this is not an image")
    (root / "class 2" / "empty.jpg").write_bytes(b"")
    png = (root / "class 0" / "ü1.png").read_bytes()
    (root / "class 1" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "stray.png").write_bytes(png)


def test_folder_source_accounts_for_every_file(tmp_path):
    raw = tmp_path / "raw"
    write_folder(raw)
    params = make_params(collect__source="folder", collect__folder=str(raw), collect__folds=[0, 1, 2])
    summary = collect.run(params.collect, tmp_path / "out")
    data = load_collected(tmp_path / "out")
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv")
    reasons = dict(zip(rejects.path.map(lambda p: p.split("/")[-1]), rejects.reason))
    # 18 digits + copy + mislabelled + alpha + 3 broken + stray = 25 files
    assert summary["inputs"] == 25
    assert summary["duplicates_collapsed"] == 1
    assert {"notes.png", "empty.jpg", "truncated.png", "stray.png", "mislabelled.png", "ü0.png"} == set(reasons)
    assert "label conflict" in reasons["mislabelled.png"] and "class 1" in reasons["ü0.png"]
    assert "not a readable image" in reasons["notes.png"] and "subfolder" in reasons["stray.png"]
    assert summary["inputs"] == summary["accepted"] + summary["rejected"] + summary["duplicates_collapsed"]
    assert data.classes == ("class 0", "class 1", "class 2")
    assert len(data.external) == 0 and len(data.labelled) == summary["accepted"] == 18
    assert data.images.shape[1:] == (16, 16, 1)
    assert data.labelled.sha256.is_unique


def test_class_with_fewer_images_than_folds_names_class_and_fix(tmp_path):
    raw = tmp_path / "raw"
    for label, images in digit_images(5).items():
        (raw / str(label)).mkdir(parents=True)
        for i, pixels in enumerate(images[: 2 if label == 1 else 5]):
            Image.fromarray(pixels).save(raw / str(label) / f"{i}.png")
    params = make_params(collect__source="folder", collect__folder=str(raw), collect__folds=[0, 1, 2])
    with pytest.raises(PipelineError, match=r"class '1' has 2 distinct images but collect.folds asks for 3 folds"):
        collect.run(params.collect, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_folder_is_a_clear_error(tmp_path):
    params = make_params(collect__source="folder", collect__folder=str(tmp_path / "nope"))
    with pytest.raises(PipelineError, match="is not a folder; put one subfolder per class"):
        collect.run(params.collect, tmp_path / "out")


def test_rgb_output_for_three_channels(tmp_path):
    raw = tmp_path / "raw"
    write_folder(raw)
    params = make_params(collect__source="folder", collect__folder=str(raw), collect__channels=3)
    collect.run(params.collect, tmp_path / "out")
    assert load_collected(tmp_path / "out").images.shape[1:] == (16, 16, 3)
