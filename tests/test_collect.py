"""The collect stage on real images: the bundled datasets' scarce draw and external test set, a corpus of the
awkward files users bring, hold-out folders, CSV manifests with local paths and URLs, groups and repeated folds."""

import functools
import http.server
import json
import os
import threading

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.data import folds
from pipeline.data.collected import fold_column, load_collected, natural_key
from pipeline.data.decode import Normalise, decode_file, pixel_sha256
from pipeline.runtime.errors import PipelineError
from pipeline.stages import collect

from conftest import digit_images, make_params, photo_folder
from corpus import ACCEPTED, DUPLICATE, ZERO, mnist_digits, sideways_jpeg, write_corpus


def run_collect(tmp_path, name="out", **overrides):
    params = make_params(**overrides).collect
    summary = collect.run(params, tmp_path / name, tmp_path / f"{name}-reports")
    rejects = pd.read_csv(tmp_path / f"{name}-reports" / "rejects.csv", keep_default_na=False)
    return summary, load_collected(tmp_path / name), rejects


def assert_accounted(summary):
    assert summary["inputs"] == summary["accepted"] + summary["rejected"] + summary["duplicates_collapsed"]


def test_mnist_draws_a_scarce_stratified_set_and_keeps_the_rest_external(collected_dir):
    data = load_collected(collected_dir)
    labelled, external = data.labelled, data.external
    assert data.classes == tuple(str(d) for d in range(10))
    assert labelled.label.value_counts().tolist() == [4] * 10
    assert len(external) == 300 and (external[fold_column(0)] == -1).all()
    # every fold holds 2 images of every class (4 per class, 2 folds)
    assert (labelled.groupby([fold_column(0), "label"]).size() == 2).all()
    assert not set(labelled.path) & set(external.path)
    assert data.images.shape == (540, 16, 16, 1) and data.images.dtype == np.uint8
    assert set(data.manifest.source) == {"mnist"}
    # the manifest's hash is the hash of the stored pixels
    for row in data.manifest.sample(5, random_state=0).itertuples():
        assert row.sha256 == pixel_sha256(data.images[row.index])
    summary = json.loads((collected_dir / "summary.json").read_text())
    # the rest of MNIST: 200 form the unlabelled pool (collect.unlabelled_limit), the others are not kept
    assert summary["inputs"] == 5000 and summary["accepted"] == 5000 and summary["unlabelled"] == 200
    assert summary["not_kept"] == 5000 - 40 - 300 - 200
    pool = data.unlabelled
    assert len(pool) == 200 and (pool.label == "").all() and (pool.target == -1).all()
    assert not set(pool.path) & (set(labelled.path) | set(external.path))
    card = (collected_dir.parent / "reports" / "data_card.md").read_text()
    assert "5000 inputs = 5000 accepted + 0 rejected + 0 exact duplicates collapsed" in card
    assert (collected_dir.parent / "reports" / "data_card" / "class_9.png").exists()


def test_the_external_images_split_into_a_development_part_and_a_final_test(tmp_path, collected_dir):
    data = load_collected(collected_dir)
    assert set(data.labelled.part) == {"cv"}
    dev, test = data.part("dev"), data.part("test")
    assert len(dev) + len(test) == len(data.external) == 300 and not set(dev.path) & set(test.path)
    # collect.dev_fraction 0.5, stratified: every class splits (nearly) evenly
    halves = pd.crosstab(data.external.label, data.external.part)
    assert (abs(halves["dev"] - halves["test"]) <= 2).all()
    summary = json.loads((collected_dir / "summary.json").read_text())
    assert (summary["dev"], summary["test"]) == (len(dev), len(test))
    assert f"{len(dev)} in the development part" in (collected_dir.parent / "reports" / "data_card.md").read_text()
    # the part is seeded apart from the labelled draw and the folds: another share moves neither of them
    _, all_test, _ = run_collect(tmp_path, "all-test", collect__dev_fraction=0)
    assert set(all_test.external.part) == {"test"}
    _, fifth, _ = run_collect(tmp_path, "fifth", collect__dev_fraction=0.2)
    assert len(fifth.part("dev")) == pytest.approx(60, abs=3)
    for other in (all_test, fifth):
        assert other.labelled[["path", fold_column(0)]].equals(data.labelled[["path", fold_column(0)]])


def test_a_group_of_near_duplicates_never_sits_on_both_sides_of_the_development_split():
    rng = np.random.default_rng(0)
    labels = pd.Series(rng.integers(0, 3, 400))
    groups = pd.Series(rng.integers(0, 60, 400))  # 60 groups of about 7 images each
    for fraction in (0.5, 0.25, 0.8):
        dev = folds.dev_part(labels, groups, fraction, seed=3)
        assert not set(groups[dev]) & set(groups[~dev])
        assert dev.mean() == pytest.approx(fraction, abs=0.12)
        assert np.array_equal(dev, folds.dev_part(labels, groups, fraction, seed=3))
    assert not folds.dev_part(labels, groups, 0.0, seed=3).any()
    assert not folds.dev_part(labels, pd.Series([1] * 400), 0.5, seed=3).any()  # one group: it all stays test


def test_auto_settings_look_at_the_photos_and_the_digits_settings_on_photos_get_warnings(tmp_path):
    folder = photo_folder(tmp_path / "photos")
    summary, data, _ = run_collect(tmp_path, "auto", collect__source="folder", collect__folder=str(folder),
                                   collect__channels="auto", collect__image_size="auto", collect__min_side=16)
    # colour photos of about 256 x 341: 3 channels, stored at their median shorter side (under the 260 px cap)
    assert data.images.shape[1:] == (256, 256, 3) and (summary["image_size"], summary["channels"]) == (256, 3)
    assert summary["chosen_from_data"]["channels"] == {"value": 3, "why": "18 of 18 pictures are in colour"}
    assert "median shorter side is 256 px" in summary["chosen_from_data"]["image_size"]["why"]
    assert summary["warnings"] == []
    assert data.images[..., 0].astype(int).std() > 0 and (data.images[..., 0] != data.images[..., 2]).any()
    card = (tmp_path / "auto-reports" / "data_card.md").read_text()
    assert "`collect.channels: auto` chose **3**" in card and "`collect.image_size: auto` chose **256**" in card
    # the bundled digits' settings on the same photos: stored as asked, with a warning for each
    summary, data, _ = run_collect(tmp_path, "digits", collect__source="folder", collect__folder=str(folder),
                                   collect__channels=1, collect__image_size=32)
    assert data.images.shape[1:] == (32, 32, 1) and len(summary["warnings"]) == 2
    assert "18 of 18 pictures are in colour" in summary["warnings"][0]
    assert "median shorter side is 256 px" in summary["warnings"][1]
    assert "**Warning:** collect.channels is 1" in (tmp_path / "digits-reports" / "data_card.md").read_text()


def test_auto_settings_are_for_a_users_own_pictures():
    with pytest.raises(PipelineError, match="`collect.image_size` must be a number for a bundled dataset"):
        make_params(collect__image_size="auto")
    with pytest.raises(PipelineError, match="`collect.channels` must be one of 1, 3, 'auto'"):
        make_params(collect__source="folder", collect__channels="rgb")


def test_same_seed_same_draw_other_seed_other_draw(tmp_path, collected_dir):
    again, data, _ = run_collect(tmp_path, "a")
    other, other_data, _ = run_collect(tmp_path, "b", collect__seed=1)
    assert again["labelled"] == other["labelled"] == 40
    assert data.manifest.equals(load_collected(collected_dir).manifest)
    assert set(other_data.labelled.path) != set(data.labelled.path)


@pytest.mark.parametrize("source, classes, labelled, external", [
    ("digits", tuple(str(d) for d in range(10)), 40, 1757),
    ("lfw", ("face", "non-face"), 8, 192),
])
def test_other_bundled_datasets(tmp_path, source, classes, labelled, external):
    summary, data, _ = run_collect(tmp_path, collect__source=source, collect__external_limit=0)
    assert data.classes == classes
    assert len(data.labelled) == labelled and len(data.external) == external
    assert_accounted(summary)
    assert data.images.std() > 20  # real pictures, not blank arrays


def test_natural_key_orders_class_names_and_report_files():
    # class names: numbers by value, before words; their order gives the targets 0..n-1
    assert sorted(["10", "cat", "2", "1", "Ant"], key=natural_key) == ["1", "2", "10", "Ant", "cat"]
    # the report's files: fold 2 before fold 10, repeat 0 before repeat 1, class_2 before class_10
    stems = ["r1-fold0", "r0-fold10", "r0-fold2", "class_10", "class_2"]
    assert sorted(stems, key=natural_key) == ["class_2", "class_10", "r0-fold2", "r0-fold10", "r1-fold0"]


def test_natural_key_keeps_the_class_order_of_all_numbers_or_no_digits():
    """Classes named by numbers only, or without digits (every bundled source, most folders), keep the order the
    old class-only key gave them, so their targets are unchanged."""
    def old_key(label):
        return (0, int(label), "") if label.isdigit() else (1, 0, label)
    rng = np.random.default_rng(0)
    for _ in range(200):
        labels = [str(n) for n in rng.integers(0, 200, 5)] + ["".join(rng.choice(list("aB_- é"), 4)) for _ in range(5)]
        labels = list(dict.fromkeys(labels))
        assert sorted(labels, key=natural_key) == sorted(labels, key=old_key)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The awkward corpus, collected once with 3 folds and 2 repeats (read-only for tests)."""
    tmp_path = tmp_path_factory.mktemp("corpus")
    expect = write_corpus(tmp_path / "raw")
    summary, data, rejects = run_collect(tmp_path, collect__source="folder", collect__folder=str(tmp_path / "raw"),
                                         collect__folds=[0, 1, 2], collect__repeats=[0, 1], collect__image_size=32)
    duplicates = pd.read_csv(tmp_path / "out" / "duplicates.csv")
    return expect, summary, data, rejects, duplicates, tmp_path


def relative(path, root):
    return os.path.relpath(path, root / "raw")


def test_corpus_every_file_lands_where_it_should(corpus):
    expect, summary, data, rejects, duplicates, tmp_path = corpus
    assert len(expect) >= 30
    landed = {relative(p, tmp_path): c for p, c in zip(rejects.path, rejects.category)}
    landed.update({relative(p, tmp_path): ACCEPTED for p in data.manifest.path})
    landed.update({relative(p, tmp_path): DUPLICATE for p in duplicates.path})
    kept_copies = {relative(p, tmp_path) for p in duplicates.kept_path}
    for name in kept_copies:  # of each exact-copy pair, the kept one sits in the manifest
        assert landed[name] == ACCEPTED
        landed[name] = DUPLICATE
    assert landed == expect
    assert_accounted(summary)
    assert summary["inputs"] == len(expect) and summary["duplicates_collapsed"] == 2
    assert rejects.path.is_unique and (rejects.detail != "").all()


def test_corpus_conversions_keep_the_picture(corpus):
    """Every mode ends as the digit it holds: compare each stored image with the plain PNG of the same digit."""
    expect, _, data, _, _, tmp_path = corpus
    how = Normalise(32, 1, "crop")
    by_name = {relative(p, tmp_path): data.images[i] for p, i in zip(data.manifest.path, data.manifest["index"])}
    reference = [decode_file(tmp_path / "raw" / ZERO / "i.tif", how).pixels]  # digit 8 saved plainly
    assert np.abs(by_name[f"{ZERO}/i.tif"].astype(int) - reference[0]).max() == 0
    digits = mnist_digits(0, 16)
    plain = {name: Image.fromarray(digits[k]).resize((32, 32), Image.Resampling.LANCZOS)
             for k, name in enumerate(["a.png", "b.jpg", "c palette.gif", "d alpha.png", "e 16bit.png", "f cmyk.jpg",
                                       "g onebit.bmp", "h la.png", "i.tif", "j.webp", "nested/deeper/k.png",
                                       "rotated phone photo.jpg"])}
    for name, picture in plain.items():
        key = f"{ZERO}/{name}"
        if expect[key] != ACCEPTED:
            continue
        stored = by_name[key][..., 0].astype(float)
        truth = np.asarray(picture, dtype=float)
        if name == "d alpha.png":
            truth = truth * 180 / 255  # composited at 70% opacity onto black
        correlation = np.corrcoef(stored.ravel(), truth.ravel())[0, 1]
        assert correlation > 0.9, (name, correlation)  # a sideways, clipped or inverted picture fails this
        assert abs(stored.mean() - truth.mean()) < 25, name  # 16-bit clipped to white would be far off


def test_exif_rotation_is_applied(tmp_path):
    """A phone stores a 56 x 40 picture sideways (40 x 56) with EXIF orientation 6: it comes out upright, and its
    size is reported as shown."""
    digit = mnist_digits(7, 1)[0][8:48]  # 40 rows, 56 columns
    (tmp_path / "photo.jpg").write_bytes(sideways_jpeg(digit))
    Image.fromarray(digit).save(tmp_path / "upright.png")
    Image.fromarray(np.rot90(digit)).save(tmp_path / "sideways.png")
    how = Normalise(32, 1, "pad")
    decoded = decode_file(tmp_path / "photo.jpg", how)
    assert (decoded.width, decoded.height) == (56, 40)

    def similarity(name):
        other = decode_file(tmp_path / name, how).pixels.astype(float).ravel()
        return np.corrcoef(decoded.pixels.astype(float).ravel(), other)[0, 1]
    assert similarity("upright.png") > 0.95 and similarity("sideways.png") < 0.5


def test_corpus_near_duplicates_share_a_group_and_a_fold_in_every_repeat(corpus):
    _, summary, data, _, _, tmp_path = corpus
    rows = data.manifest.assign(name=[relative(p, tmp_path) for p in data.manifest.path]).set_index("name")
    family = [n for n in rows.index if n.startswith((f"{ZERO}/a.", f"{ZERO}/a "))]  # a.png or its copy, as jpeg, bigger
    assert len(family) == 3 and rows.loc[family, "group"].nunique() == 1
    others = rows.drop(family)
    assert not set(others.group) & set(rows.loc[family, "group"])
    for repeat in (0, 1):
        assert rows.loc[family, fold_column(repeat)].nunique() == 1
        # every group sits in exactly one fold
        assert (data.labelled.groupby("group")[fold_column(repeat)].nunique() == 1).all()
    assert not data.labelled[fold_column(0)].equals(data.labelled[fold_column(1)])  # repeats reshuffle
    assert summary["groups"] == len(data.labelled) - 2


def test_corpus_data_card_tells_the_story(corpus):
    _, summary, data, _, _, tmp_path = corpus
    card = (tmp_path / "out-reports" / "data_card.md").read_text()
    s = summary
    assert f"**{s['inputs']} inputs = {s['accepted']} accepted + {s['rejected']} rejected + 2 exact" in card
    assert "| label conflict | 2 |" in card and "| too large | 1 |" in card
    assert f"| {ZERO} | {(data.labelled.label == ZERO).sum()} |" in card
    assert "1 groups of near-duplicates" in card
    figures = tmp_path / "out-reports" / "data_card"
    assert {p.name for p in figures.iterdir()} == {"sizes.png", "class_0.png", "class_1.png"}
    thumbnails = np.asarray(Image.open(figures / "class_1.png"))
    assert thumbnails.std() > 20  # the digits are there


def test_parallel_decoding_gives_the_same_dataset(tmp_path):
    raw = tmp_path / "raw"
    for label, images in digit_images(40, classes=2).items():
        (raw / str(label)).mkdir(parents=True)
        for i, pixels in enumerate(images):
            Image.fromarray(pixels).save(raw / str(label) / f"{i}.png")
    settings = dict(collect__source="folder", collect__folder=str(raw), collect__near_duplicate_bits=0)
    _, serial, _ = run_collect(tmp_path, "serial", collect__workers=1, **settings)
    _, parallel, _ = run_collect(tmp_path, "parallel", collect__workers=2, **settings)
    assert len(serial.images) == 80
    assert np.array_equal(serial.images, parallel.images) and serial.manifest.equals(parallel.manifest)


def write_split_folder(root):
    """train/<class>/ and test/<class>/, with a test image copied from train, one re-encoded from train, a class
    only in test and a folder that belongs in neither."""
    digits = {label: mnist_digits(label, 8) for label in range(3)}
    for label, images in digits.items():
        for i, pixels in enumerate(images):
            split = "train" if i < 5 else "test"
            (root / split / f"d{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / split / f"d{label}" / f"{i}.png")
    (root / "test" / "d0" / "copied.png").write_bytes((root / "train" / "d0" / "0.png").read_bytes())
    Image.open(root / "train" / "d1" / "0.png").convert("RGB").save(root / "test" / "d1" / "reencoded.jpg", quality=85)
    (root / "test" / "d9").mkdir()
    Image.fromarray(mnist_digits(9, 1)[0]).save(root / "test" / "d9" / "0.png")
    (root / "extra").mkdir()
    Image.fromarray(digits[2][0]).save(root / "extra" / "lost.png")


def test_train_and_test_folders_make_a_leak_free_hold_out_set(tmp_path):
    write_split_folder(tmp_path / "raw")
    summary, data, rejects = run_collect(tmp_path, collect__source="folder", collect__folder=str(tmp_path / "raw"),
                                         collect__folds=[0, 1, 2])
    assert_accounted(summary)
    assert len(data.labelled) == 15 and data.classes == ("d0", "d1", "d2")
    # 12 test images: the exact copy collapses into its training twin, the re-encoded one is a leak, d9 has no
    # training images; 9 stay
    assert summary["duplicates_collapsed"] == 1
    category = dict(zip(rejects.path.map(os.path.basename), rejects.category))
    assert category == {"reencoded.jpg": "leak into test set", "0.png": "class missing from training",
                        "lost.png": "misplaced file"}
    assert len(data.external) == 9 and (data.external[fold_column(0)] == -1).all()
    assert not set(data.external.sha256) & set(data.labelled.sha256)
    assert not set(data.external.group) & set(data.labelled.group)


def test_unlabelled_pool_is_checked_like_the_rest_and_kept_apart_from_what_it_is_scored_on(tmp_path):
    """Planted leaks: a pool image copied from a training image collapses into it; one re-encoded from a test
    image is rejected; one re-encoded from a training image stays in the pool but leaves the fold that validates
    on its twin; a broken file is rejected as in a class folder."""
    root = tmp_path / "raw"
    write_split_folder(root)
    pool = root / "unlabelled" / "batch 1"
    pool.mkdir(parents=True)
    for i, pixels in enumerate(mnist_digits(4, 4) + mnist_digits(5, 4)):  # classes the labels never name
        Image.fromarray(pixels).save(pool / f"fresh{i}.png")
    (pool / "copy.png").write_bytes((root / "train" / "d2" / "1.png").read_bytes())
    Image.open(root / "test" / "d0" / "6.png").convert("RGB").save(pool / "test-twin.jpg", quality=85)
    Image.open(root / "train" / "d2" / "3.png").convert("RGB").save(pool / "train-twin.jpg", quality=85)
    (pool / "broken.png").write_bytes(b"not a picture")
    summary, data, rejects = run_collect(tmp_path, collect__source="folder", collect__folder=str(root),
                                         collect__folds=[0, 1, 2])
    assert_accounted(summary)
    category = dict(zip(rejects.path.map(os.path.basename), rejects.category))
    assert category["test-twin.jpg"] == "pool leak into test set" and "6.png" in rejects.detail[
        rejects.path.str.endswith("test-twin.jpg")].item()
    assert category["broken.png"] == "not an image"
    duplicates = pd.read_csv(tmp_path / "out" / "duplicates.csv")
    assert duplicates.path.map(os.path.basename).tolist()[-1] == "copy.png"  # collapsed into the labelled copy
    names = data.unlabelled.path.map(os.path.basename)
    assert sorted(names) == sorted([f"fresh{i}.png" for i in range(8)] + ["train-twin.jpg"])
    assert summary["unlabelled"] == 9 and len(data.labelled) == 15 and data.classes == ("d0", "d1", "d2")
    assert (data.unlabelled.target == -1).all() and (data.unlabelled[fold_column(0)] == -1).all()
    twin = data.unlabelled[names == "train-twin.jpg"].iloc[0]
    original = data.labelled[data.labelled.group == twin.group]
    assert len(original) == 1 and original.path.item().endswith("d2/3.png")  # the pool twin joined its group
    validating = int(original[fold_column(0)].item())
    for fold in data.folds:
        used = set(data.pool_for(fold).path.map(os.path.basename))
        assert ("train-twin.jpg" in used) == (fold != validating) and len(used) == 9 - (fold == validating)
    assert len(data.pool_for(None)) == 9  # the final model validates on nothing
    card = (tmp_path / "out-reports" / "data_card.md").read_text()
    assert "9 are unlabelled" in card


def test_csv_rows_without_a_label_form_the_unlabelled_pool_and_the_limit_is_seeded(tmp_path):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    rows = []
    for label, images in digit_images(10).items():
        for i, pixels in enumerate(images):
            Image.fromarray(pixels).save(root / "img" / f"{label}_{i}.png")
            rows.append((f"img/{label}_{i}.png", f"c{label}" if i < 5 else ""))
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(root / "manifest.csv", index=False)
    settings = dict(collect__source="csv", collect__folder=str(root), collect__folds=[0, 1])
    summary, data, _ = run_collect(tmp_path, **settings, collect__unlabelled_limit=0)
    assert_accounted(summary)
    assert len(data.labelled) == 15 and summary["unlabelled"] == 15 and summary["not_kept"] == 0
    assert set(data.unlabelled.path) == {p for p, label in rows if not label}
    summary, limited, _ = run_collect(tmp_path, "limited", **settings, collect__unlabelled_limit=6)
    _, again, _ = run_collect(tmp_path, "again", **settings, collect__unlabelled_limit=6)
    assert len(limited.unlabelled) == 6 and summary["not_kept"] == 9 and summary["rejected"] == 0
    assert limited.unlabelled.path.tolist() == again.unlabelled.path.tolist()  # the same seeded draw


def test_class_with_fewer_groups_than_folds_names_class_and_fix(tmp_path):
    raw = tmp_path / "raw"
    for label, images in digit_images(5).items():
        (raw / str(label)).mkdir(parents=True)
        for i, pixels in enumerate(images[: 2 if label == 1 else 5]):
            Image.fromarray(pixels).save(raw / str(label) / f"{i}.png")
    with pytest.raises(PipelineError, match=r"class '1' has 2 distinct images in 2 groups .* asks for 3 folds: add "
                                            r"pictures to '1', or use at most 2 folds"):
        run_collect(tmp_path, collect__source="folder", collect__folder=str(raw), collect__folds=[0, 1, 2])
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_label_conflicts_can_stop_the_run(tmp_path):
    write_corpus(tmp_path / "raw")
    with pytest.raises(PipelineError, match=r"label conflict: the same picture appears under two labels .*b\.jpg"):
        run_collect(tmp_path, collect__source="folder", collect__folder=str(tmp_path / "raw"),
                    collect__label_conflicts="error", collect__folds=[0, 1, 2])


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="is not a folder; put one subfolder per class"):
        run_collect(tmp_path, collect__source="folder", collect__folder=str(tmp_path / "nope"))


def test_rgb_and_padding(tmp_path):
    raw = tmp_path / "raw"
    for label, images in digit_images(4, size=24).items():
        (raw / str(label)).mkdir(parents=True)
        for i, pixels in enumerate(images):
            wide = np.zeros((24, 48, 3), np.uint8)
            wide[:, :24] = pixels[..., None]
            wide[:, 24:, 0] = 255  # a red right half: cropping to the centre would cut half of both
            Image.fromarray(wide).save(raw / str(label) / f"{i}.png")
    _, data, _ = run_collect(tmp_path, collect__source="folder", collect__folder=str(raw), collect__channels=3,
                             collect__fit="pad", collect__folds=[0, 1])
    assert data.images.shape[1:] == (16, 16, 3)
    image = data.images[0].astype(int)
    assert image[:3].max() < 30 and image[-3:].max() < 30  # padded above and below with black (resampling rings)
    assert image[6:10, 12:, 0].min() > 200 and image[6:10, 12:, 1].max() < 40  # the red half is all there


# --- CSV manifests --------------------------------------------------------------------------------------------

@pytest.fixture
def image_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/served; yields its base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


def test_csv_manifest_with_paths_urls_and_groups(tmp_path, image_server):
    base, served = image_server
    root = tmp_path / "root"
    rows = []
    for label, images in digit_images(6).items():
        for i, pixels in enumerate(images):
            name = f"img/{label}_{i}.png"
            if i == 5:  # the last of each class comes over HTTP
                Image.fromarray(pixels).save(served / f"{label}.png")
                rows.append((f"{base}/{label}.png", f"c{label}", ""))
                continue
            (root / "img").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / name)
            rows.append((name, f"c{label}", "patient-a" if (label, i) in [(0, 0), (0, 1)] else ""))
    outside = tmp_path / "secret.png"
    Image.fromarray(digit_images(1)[0][0]).save(outside)
    os.symlink(outside, root / "img" / "link out.png")
    rows += [("../secret.png", "c0", ""), (str(outside), "c0", ""), ("img/link out.png", "c0", ""),
             ("img/absent.png", "c1", ""), ("img/2_0.png", "", ""), (f"{base}/absent.png", "c2", ""),
             ("ftp://example.com/x.png", "c2", "")]
    pd.DataFrame(rows, columns=["path", "label", "group"]).to_csv(root / "manifest.csv", index=False)
    summary, data, rejects = run_collect(tmp_path, collect__source="csv", collect__folder=str(root),
                                         collect__folds=[0, 1, 2], collect__download__cache=str(tmp_path / "cache"),
                                         collect__download__retries=0)
    assert_accounted(summary)
    assert summary["inputs"] == len(rows) == 25 and len(data.labelled) == 18
    # the row without a label names a labelled picture: it joins the pool as an exact copy, which collapses
    assert data.unlabelled.empty and summary["duplicates_collapsed"] == 1
    assert (data.manifest.source == "url").sum() == 3 and (data.manifest.source == "csv").sum() == 15
    category = dict(zip(rejects.path, rejects.category))
    assert category == {"../secret.png": "outside data root", str(outside): "outside data root",
                        "img/link out.png": "outside data root", "img/absent.png": "missing file",
                        f"{base}/absent.png": "download failed",
                        "ftp://example.com/x.png": "download failed"}
    assert "404" in rejects.detail[rejects.path == f"{base}/absent.png"].item()
    pair = data.manifest[data.manifest.path.isin(["img/0_0.png", "img/0_1.png"])]
    assert pair.group.nunique() == 1 and pair[fold_column(0)].nunique() == 1  # the user's group stays together
    assert len(list((tmp_path / "cache").iterdir())) == 3  # the three served images, cached for the next run


def test_csv_without_the_needed_columns_names_them(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "manifest.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(PipelineError, match=r"needs a `path` \(or `url`\) column and a `label` column; found "
                                            r"columns: file, class"):
        run_collect(tmp_path, collect__source="csv", collect__folder=str(root))


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", [0, 257, 65535], [0, 1, 255]),  # 16-bit keeps its top byte, not clipped to white
    ("I", [0, 4096, 65535], [0, 16, 255]),  # 32-bit holding 16-bit data (how some TIFFs and PNGs open)
    ("I", [0, 100, 255], [0, 100, 255]),  # 32-bit holding 8-bit data is left as it is
    ("F", [-5.0, 100.4, 300.0], [0, 100, 255]),
])
def test_wide_modes_become_8_bit(mode, values, expected):
    from pipeline.data.decode import to_8bit

    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(np.array([values], dtype=dtype))
    assert image.mode == mode
    assert np.asarray(to_8bit(image)).ravel().tolist() == expected
