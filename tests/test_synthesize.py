"""The synthesize stage: each fold's GAN sees that fold's training images only, its samples are filtered by a
classifier of real images, measured, checkpointed, resumable after a kill, and data-parallel under torchrun."""

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from pipeline.augmentation.policy import load_policy
from pipeline.data.collected import load_collected
from pipeline.data.decode import pixel_sha256
from pipeline.gan import conditional as gan
from pipeline.gan import samples
from pipeline.gan.quality import (
    SeenClassesProbe,
    class_probability,
    classification_accuracy_score,
    fid_kid,
    inception_fid_kid,
    near_real,
    novelty,
    select_samples,
)
from pipeline.gan.samples import cas_ratio, fit_filter, real_acceptance
from pipeline.runtime.checkpoint import Checkpointing, load_checkpoint
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.params import gan_side
from pipeline.stages import collect, synthesize
from pipeline.stages.synthesize import SynthesizeOutputs
from pipeline.training.probe import ImageFeatures

from conftest import kill_once_checkpointed, make_params, stage_env, stage_workspace

CPU = torch.device("cpu")


def outputs(root, name="r0-fold0", checkpoints=True):
    return SynthesizeOutputs(root / "out", root / "reports", name, root / "checkpoints" if checkpoints else None)


def test_gan_sees_only_the_folds_training_images_and_writes_filtered_samples(tmp_path, collected_dir, policy_file):
    params = make_params()
    out = outputs(tmp_path, "r0-fold1")
    meta = synthesize.run(params.synthesize, 1, collected_dir, out, policy=policy_file)
    data = load_collected(collected_dir)
    train_rows, val_rows = data.fold_split(1)
    trained_on = set(json.loads((out.folder / "meta.json").read_text())["trained_on_sha256"])
    assert trained_on == set(train_rows.sha256)
    assert not trained_on & set(val_rows.sha256) and not trained_on & set(data.external.sha256)
    with np.load(out.folder / "candidates.npz") as c, np.load(out.folder / "samples.npz") as s:
        candidates, labels, scores = c["images"], c["labels"], c["scores"]
        kept_images, kept_labels, kept_scores = s["images"], s["labels"], s["scores"]
    assert candidates.shape == (6 * 10, 16, 16, 1) and np.bincount(labels).tolist() == [6] * 10
    assert candidates.std() > 0 and ((scores >= 0) & (scores <= 1)).all()
    # accepted = at or above the threshold, at most keep_per_class of each class, and really among the candidates
    assert (kept_scores >= params.synthesize.min_confidence).all()
    assert np.bincount(kept_labels, minlength=10).max() <= params.synthesize.keep_per_class
    expected = sum(min(3, int((scores[labels == c] >= 0.5).sum())) for c in range(10))
    assert len(kept_images) == expected == meta["accepted"]
    assert {pixel_sha256(i) for i in kept_images} <= {pixel_sha256(i) for i in candidates}
    metrics = json.loads((out.reports / "r0-fold1.json").read_text())
    assert set(metrics) >= {"fid_candidates", "kid_candidates", "cas_real", "cas_synthetic", "cas_candidates",
                            "cas_real_dev", "cas_candidates_dev", "acceptance", "acceptance_per_class",
                            "acceptance_real", "acceptance_real_dev", "augment_p"}
    assert 0 <= metrics["acceptance_real"] <= 1 and 0 <= metrics["acceptance_real_dev"] <= 1
    for suffix in ("", "_dev"):  # what the samples teach a classifier, over what the real images teach it
        if metrics["cas_synthetic" + suffix] is not None and metrics["cas_real" + suffix]:
            assert metrics["cas_ratio" + suffix] == pytest.approx(metrics["cas_synthetic" + suffix]
                                                                  / metrics["cas_real" + suffix])
        else:
            assert metrics["cas_ratio" + suffix] is None
    assert metrics["fid_candidates"] > 0 and 0 <= metrics["cas_real"] <= 1
    # the development part of the 300 external images (about 150): accuracies in steps of 1/150, not of the 20
    # validation images' 1/20; never measured on the final test, since GAN settings are chosen by it
    dev = len(data.part("dev"))
    assert 140 <= dev <= 160 and 0 <= metrics["cas_candidates_dev"] <= 1
    assert round(metrics["cas_real_dev"] * dev, 6) % 1 == 0
    assert metrics["acceptance"] == pytest.approx(np.mean(list(metrics["acceptance_per_class"].values())), abs=1e-3)
    history = pd.read_csv(out.reports / "r0-fold1-history.csv")
    assert history.step.iloc[-1] == params.synthesize.steps and np.isfinite(history.loss_d).all()
    assert Image.open(out.reports / "r0-fold1-curves.png").size[0] > 400
    assert Image.open(out.folder / "grid.png").size == Image.open(out.reports / "r0-fold1-grid.png").size
    assert not (out.checkpoints / gan.CHECKPOINT_FILE).exists()  # removed once training finished


def test_the_gan_trains_at_its_own_resolution_and_its_samples_come_back_at_the_stored_side(tmp_path, policy_file):
    """Images stored at 40 px (no power of two): the GAN trains at 32, the largest of its sides below; its
    candidates and accepted samples are resized to 40, so they mix with the real images."""
    params = make_params(collect__image_size=40)
    collect.run(params.collect, tmp_path / "collected", tmp_path / "collect-reports")
    meta = synthesize.run(params.synthesize, 0, tmp_path / "collected", outputs(tmp_path, checkpoints=False),
                          policy=policy_file)
    assert (meta["image_size"], meta["gan_image_size"]) == (40, 32)
    with np.load(tmp_path / "out" / "candidates.npz") as c, np.load(tmp_path / "out" / "samples.npz") as k:
        assert c["images"].shape[1:] == (40, 40, 1) and k["images"].shape[1:] == (40, 40, 1)
        assert c["images"].std() > 0


def test_resizing_for_the_gan_antialiases_when_shrinking_and_keeps_what_it_need_not_touch():
    from pipeline.gan.samples import resize

    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[None, :, :, None]  # finest stripes
    small = resize(checker, 16)
    assert small.shape == (1, 16, 16, 1) and np.abs(small.astype(int) - 128).max() <= 2  # averaged, not aliased
    flat = np.full((3, 20, 20, 3), 77, np.uint8)
    assert (resize(flat, 64) == 77).all() and resize(flat, 20) is flat
    assert gan_side(0, 32) == 32 and gan_side(0, 224) == 128 and gan_side(0, 40) == 32 and gan_side(64, 224) == 64


def test_same_seed_gives_the_same_samples(tmp_path, collected_dir, policy_file):
    params = make_params(synthesize__steps=5)
    for name in ("a", "b"):
        synthesize.run(params.synthesize, 0, collected_dir, outputs(tmp_path / name, checkpoints=False),
                       policy=policy_file)
    a, b = (np.load(tmp_path / name / "out" / "candidates.npz")["images"] for name in ("a", "b"))
    assert np.array_equal(a, b)


def planted(tmp_path, collected_dir, in_train_too=False):
    """A copy of the collected data with one validation image of fold 0 replaced by a unique checkerboard;
    with `in_train_too`, the same checkerboard also replaces a training image (a leak)."""
    root = tmp_path / "collected"
    shutil.copytree(collected_dir, root)
    data = load_collected(root)
    images, manifest = data.images.copy(), data.manifest.copy()
    checker = (np.indices(images.shape[1:3]).sum(0) % 2 * 255).astype(np.uint8)[..., None]
    train_rows, val_rows = data.fold_split(0)
    targets = [val_rows["index"].iloc[0]] + ([train_rows["index"].iloc[0]] if in_train_too else [])
    for i in targets:
        images[i] = checker
        manifest.loc[i, "sha256"] = pixel_sha256(checker)
    from pipeline.data.collected import save_collected

    save_collected(root, images, manifest, list(data.classes))
    return root, pixel_sha256(checker)


def test_a_planted_validation_image_is_never_seen_by_its_folds_gan(tmp_path, collected_dir, policy_file):
    root, sha = planted(tmp_path, collected_dir)
    params = make_params(synthesize__steps=4)
    fold0, fold1 = (synthesize.run(params.synthesize, fold, root, outputs(tmp_path / f"f{fold}", checkpoints=False),
                                   policy=policy_file) for fold in (0, 1))
    assert sha not in fold0["trained_on_sha256"]
    assert sha in fold1["trained_on_sha256"]  # the same image is fold 1's training data: the check can see it


def test_synthesize_refuses_data_that_contradicts_the_fold_assignment(tmp_path, collected_dir, policy_file):
    root, _ = planted(tmp_path, collected_dir, in_train_too=True)
    with pytest.raises(PipelineError, match=r"fold 0 \(repeat 0\): 1 picture\(s\) in its training part are also "
                                            r"held out for testing"):
        synthesize.run(make_params().synthesize, 0, root, outputs(tmp_path), policy=policy_file)
    assert not (tmp_path / "out").exists()


# --- adaptive augmentation --------------------------------------------------------------------------------------

def test_adaptive_p_rises_when_d_is_sure_of_reals_and_falls_when_not():
    augment = gan.AdaptiveAugment("translation", target=0.6, speed_images=100, interval=2)
    assert float(augment.p) == 0.0
    for step in range(1, 11):  # D scores every real image positive: r = 1 > 0.6
        augment.observe(torch.ones(10))
        augment.adjust(step, batch_images=10)
    assert float(augment.p) == pytest.approx(1.0)  # 5 adjustments of +0.2, clamped at 1
    for step in range(1, 5):
        augment.observe(-torch.ones(10))
        r = augment.adjust(step, batch_images=10)
        assert r in (None, -1.0)
    assert float(augment.p) == pytest.approx(0.6)
    assert "p" in augment.state_dict()  # saved with the checkpoint
    fixed = gan.AdaptiveAugment("translation", target=0.0, speed_images=100, interval=2)
    fixed.observe(torch.ones(10))
    assert fixed.adjust(2, 10) is None and float(fixed.p) == 1.0  # plain DiffAugment


def test_augmentation_probability_is_per_sample():
    torch.manual_seed(0)
    augment = gan.AdaptiveAugment("cutout", target=0.6, speed_images=100, interval=2)
    x = torch.ones(400, 1, 8, 8)
    assert torch.equal(augment(x), x)  # p = 0: untouched
    augment.p.fill_(0.25)
    changed = (augment(x) != x).flatten(1).any(1).float().mean()
    assert 0.17 < float(changed) < 0.33


# --- checkpoints --------------------------------------------------------------------------------------------------

def test_a_killed_run_resumes_exactly_where_its_checkpoint_left_off(tmp_path, monkeypatch):
    from test_gan import GanCfg, make_dark_bright_dataset

    images, labels = make_dark_bright_dataset(n_per_class=8)
    cfg = GanCfg(steps=10, ada_images=40, ada_target=0.05)  # a low target: p moves within a few steps
    straight = gan.train_gan(images, labels, 2, cfg, torch.device("cpu"))
    checkpoint = Checkpointing(tmp_path, every=4, fingerprint="data+settings")

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # killed after step 10, with the step-8 checkpoint on disk

    with monkeypatch.context() as patch:
        patch.setattr(gan, "_recalibrate_batch_norm", die)
        with pytest.raises(KeyboardInterrupt):
            gan.train_gan(images, labels, 2, cfg, torch.device("cpu"), checkpoint)
    saved = load_checkpoint(tmp_path / gan.CHECKPOINT_FILE, "data+settings")  # plain tensors and JSON
    assert saved.meta["step"] == 8 and float(saved.tensors["augment"]["p"]) > 0
    resumed = gan.train_gan(images, labels, 2, cfg, torch.device("cpu"), checkpoint)
    assert resumed.resumed_from == 8 and resumed.augment_p == straight.augment_p
    assert resumed.history == straight.history
    for a, b in zip(straight.generator.state_dict().values(), resumed.generator.state_dict().values()):
        assert torch.equal(a, b)
    assert not (tmp_path / gan.CHECKPOINT_FILE).exists()
    other = Checkpointing(tmp_path, every=4, fingerprint="other data")
    with monkeypatch.context() as patch:
        patch.setattr(gan, "_recalibrate_batch_norm", die)
        with pytest.raises(KeyboardInterrupt):
            gan.train_gan(images, labels, 2, cfg, torch.device("cpu"), checkpoint)
    assert gan.train_gan(images, labels, 2, cfg, torch.device("cpu"), other).resumed_from == 0  # not resumed


@pytest.mark.slow
def test_the_stage_command_resumes_after_sigkill(tmp_path, collected_dir, policy_file):
    work = stage_workspace(tmp_path, collected_dir, policy_file,
                           **{"synthesize.steps": 1500, "synthesize.checkpoint_every": 100})
    command = [sys.executable, "-m", "pipeline.stages.synthesize", "--fold", "0"]
    checkpoint = work / "data" / "checkpoints" / "synthesize" / "r0-fold0" / gan.CHECKPOINT_FILE
    kill_once_checkpointed(command, work, checkpoint)
    with safe_open(str(checkpoint), framework="pt") as handle:
        step = json.loads(handle.metadata()["meta"])["step"]
    assert 100 <= step < 1500
    done = subprocess.run(command, cwd=work, env=stage_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming GAN training from step {step}" in done.stderr
    meta = json.loads((work / "data" / "synthetic" / "r0-fold0" / "meta.json").read_text())
    metrics = json.loads((work / "reports" / "synthesize" / "r0-fold0.json").read_text())
    assert metrics["resumed_from_step"] == step and not checkpoint.exists()
    assert "resumed_from_step" not in meta and "train_seconds" not in meta  # the cached output: only what is the same


@pytest.mark.slow
def test_torchrun_runs_the_same_command_data_parallel_on_cpu(tmp_path, collected_dir, policy_file):
    work = stage_workspace(tmp_path, collected_dir, policy_file,
                           **{"synthesize.steps": 40, "synthesize.device": "cpu"})
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "pipeline.stages.synthesize", "--fold", "0"], cwd=work, env=stage_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((work / "data" / "synthetic" / "r0-fold0" / "meta.json").read_text())
    assert meta["processes"] == 2 and meta["steps"] == 40
    history = json.loads((work / "data" / "synthetic" / "r0-fold0" / "history.json").read_text())
    assert all(np.isfinite(h["loss_d"]) for h in history) and history[-1]["step"] == 40
    assert "x 2 processes" in done.stderr


# --- filtering and measuring samples --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digit_features(collected_dir):
    """Backbone features of real MNIST digits: the fold's training part, and held-out images."""
    data = load_collected(collected_dir)
    extract = ImageFeatures("efficientnet_lite0", 64, torch.device("cpu"))
    train_images, train_targets = data.select(data.labelled)
    test_images, test_targets = data.select(data.external)
    return extract, extract(train_images), train_targets, extract(test_images), test_targets, test_images


def test_the_filter_accepts_real_digits_under_their_own_label_more_than_under_a_wrong_one(digit_features):
    _, train_f, train_y, test_f, test_y, _ = digit_features
    probe = SeenClassesProbe.fit(train_f, train_y, CPU)
    right = class_probability(probe, test_f, test_y)
    wrong = class_probability(probe, test_f, (test_y + 1) % 10)
    assert right.mean() > 2 * wrong.mean()
    chosen = select_samples(np.concatenate([right, wrong]), np.concatenate([test_y, (test_y + 1) % 10]), 10,
                            min_confidence=0.3, keep_per_class=1000)
    kept_right = (chosen.keep < len(right)).mean()
    assert kept_right > 0.8  # most accepted samples are the correctly labelled ones


def test_the_filters_acceptance_of_real_images_is_the_share_per_class_that_passes(digit_features):
    """The reference a GAN's acceptance is read against: real held-out digits under their own labels pass far more
    often than under wrong ones, and the figure is the per-class mean of what class_probability passes."""
    _, train_f, train_y, test_f, test_y, _ = digit_features
    probe = SeenClassesProbe.fit(train_f, train_y, CPU)
    real = real_acceptance(probe, test_f, test_y, 0.5)
    passed = class_probability(probe, test_f, test_y) >= 0.5
    assert real == pytest.approx(np.mean([passed[test_y == c].mean() for c in range(10)]))
    assert 0.2 < real < 1 and real > 3 * real_acceptance(probe, test_f, (test_y + 1) % 10, 0.5)
    assert real_acceptance(probe, test_f, test_y, 0.99) < real  # a stricter threshold turns more down
    assert real_acceptance(probe, test_f[:0], test_y[:0], 0.5) is None


def test_a_probe_of_some_classes_never_predicts_the_others(digit_features):
    """CAS trains on the accepted samples, which may hold a few classes only."""
    _, train_f, train_y, test_f, test_y, _ = digit_features
    few, seen = train_y < 3, test_y < 3
    probe = SeenClassesProbe.fit(train_f[few], train_y[few], CPU)
    assert set(probe.predict(test_f)) <= {0, 1, 2}
    assert (probe.predict(test_f[seen]) == test_y[seen]).mean() > 0.5  # chance: 1/3; it scores 0.62
    assert (class_probability(probe, test_f, np.full(len(test_y), 7)) == 0).all()


def test_near_real_keeps_digits_near_their_class_and_refuses_noise_and_wrong_labels(digit_features):
    extract, train_f, train_y, test_f, test_y, test_images = digit_features
    noise = extract(np.random.default_rng(0).integers(0, 256, test_images.shape, dtype=np.uint8))
    near = near_real(train_f, train_y, test_f, test_y, quantile=1.0)
    assert near.mean() > 0.5  # unseen real digits lie mostly within their class's own spread
    assert near_real(train_f, train_y, noise, test_y, quantile=1.0).mean() < 0.05  # noise does not
    # under a wrong label less often than under their own (tiny 16 px digits: 0.48 against 0.80 here)
    assert near_real(train_f, train_y, test_f, (test_y + 1) % 10, quantile=1.0).mean() < 0.7 * near.mean()
    tighter = near_real(train_f, train_y, test_f, test_y, quantile=0.5)
    assert tighter.mean() < near.mean() and not (tighter & ~near).any()  # a lower quantile only removes
    # with it, select_samples accepts only what both the probe and the distance accept
    chosen = select_samples(np.ones(len(test_y)), test_y, 10, min_confidence=0.5, keep_per_class=1000,
                            eligible=near)
    assert set(chosen.keep) == set(np.flatnonzero(near))


def test_the_cas_ratio_is_what_samples_teach_over_what_real_images_teach():
    assert cas_ratio(0.6, 0.75) == pytest.approx(0.8)
    assert cas_ratio(None, 0.75) is None and cas_ratio(0.6, None) is None and cas_ratio(0.6, 0.0) is None


def test_select_samples_known_answer():
    scores = np.array([0.9, 0.2, 0.7, 0.95, 0.6, 0.1])
    labels = np.array([0, 0, 0, 1, 1, 1])
    chosen = select_samples(scores, labels, 3, min_confidence=0.5, keep_per_class=1)
    assert chosen.keep.tolist() == [0, 3] and chosen.acceptance == {0: 2 / 3, 1: 2 / 3, 2: 0.0}


def test_fid_kid_and_cas_order_real_against_noise(digit_features):
    extract, train_f, train_y, test_f, test_y, test_images = digit_features
    noise = np.random.default_rng(0).integers(0, 256, test_images.shape, dtype=np.uint8)
    same = fid_kid(test_f[0::2], test_f[1::2], seed=0)  # alternate images: the same mix of classes
    different = fid_kid(test_f[0::2], extract(noise[1::2]), seed=0)
    assert same["fid"] < different["fid"] and same["kid"] < different["kid"]
    assert abs(same["kid"]) < 3 * same["kid_std"] + 1e-3  # KID is unbiased: about 0 for one distribution
    real = classification_accuracy_score(train_f, train_y, test_f, test_y, CPU)
    shuffled = classification_accuracy_score(train_f, np.random.default_rng(0).permutation(train_y), test_f, test_y,
                                             CPU)
    assert real > 0.3 > shuffled  # 40 real digits teach the probe; shuffled labels teach it nothing
    assert classification_accuracy_score(train_f[:3], np.zeros(3, int), test_f, test_y, CPU) is None


def test_novelty_is_near_zero_for_copies_and_near_one_for_new_real_images(digit_features):
    _, train_f, _, test_f, _, _ = digit_features
    copies = train_f[np.random.default_rng(0).integers(0, len(train_f), 50)]
    assert novelty(train_f, copies) < 1e-6
    # unseen real digits lie from the training digits about as far as those lie from each other
    assert 0.6 < novelty(train_f, test_f) < 1.6
    assert novelty(train_f[:1], test_f) is None and novelty(train_f, test_f[:0]) is None


def test_inception_features_without_torch_fidelity_say_what_to_install():
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed here; the offline error path cannot be shown")
    images = np.zeros((4, 16, 16, 1), np.uint8)
    with pytest.raises(PipelineError, match=r"inception needs the torch-fidelity package .* `fid_features: backbone`"):
        inception_fid_kid(images, images, seed=0)


def test_the_filters_views_of_the_real_images_make_it_right_on_more_held_out_digits(digit_features, collected_dir,
                                                                                   policy_file):
    """With views (augmented copies of the few real images, drawn with the augment stage's policy) the filter is
    right on more held-out digits and passes more of them under their own label: at full size 0.70 -> 0.78 of
    development digits with 16 views. Without views it is the plain probe; the views are seeded."""
    extract, train_f, train_y, test_f, test_y, _ = digit_features
    data = load_collected(collected_dir)
    train_images, _ = data.select(data.labelled)
    params, policy = make_params().synthesize, load_policy(policy_file)
    judged = {}
    for views in (0, 8):
        cfg = dataclasses.replace(params, filter_views=views)
        probe = fit_filter(cfg, extract, train_images, train_y, train_f, policy, CPU)
        judged[views] = ((probe.predict(test_f) == test_y).mean(), real_acceptance(probe, test_f, test_y, 0.5), probe)
    plain = SeenClassesProbe.fit(train_f, train_y, CPU)
    assert np.allclose(judged[0][2].probe.predict_proba(test_f), plain.probe.predict_proba(test_f))
    assert judged[8][0] > judged[0][0] + 0.03 and judged[8][1] > judged[0][1] + 0.03
    again = fit_filter(dataclasses.replace(params, filter_views=8), extract, train_images, train_y, train_f, policy,
                       CPU)
    assert np.array_equal(again.probe.predict_proba(test_f), judged[8][2].probe.predict_proba(test_f))
    with pytest.raises(PipelineError, match="no augmentation policy"):
        fit_filter(dataclasses.replace(params, filter_views=8), extract, train_images, train_y, train_f, None, CPU)


def test_the_stage_says_to_run_augment_before_training_when_the_filters_policy_is_missing(tmp_path, collected_dir,
                                                                                          monkeypatch):
    def trained(*args, **kwargs):
        raise AssertionError("the GAN trained before the missing policy was noticed")

    monkeypatch.setattr(samples, "train_gan", trained)
    with pytest.raises(PipelineError, match=r"filter_views is 2: .* Run `dvc repro augment` first"):
        synthesize.run(make_params().synthesize, 0, collected_dir, outputs(tmp_path), policy=tmp_path / "none.json")
    without_views = dataclasses.replace(make_params().synthesize, filter_views=0)  # needs no policy, so it trains
    with pytest.raises(AssertionError, match="the GAN trained"):
        synthesize.run(without_views, 0, collected_dir, outputs(tmp_path), policy=None)
