"""The one fingerprint (pipeline/runtime/fingerprint.py) that decides whether saved work is reused: it changes with
everything that changes a result (data, settings, policy contents, weights contents, device and precision, library
versions) and with nothing else."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_training import digits, training_set  # noqa: F401  (digits is a fixture)

from pipeline.augmentation.policy import build_policy, save_policy
from pipeline.data import draws
from pipeline.data.collected import load_collected
from pipeline.runtime import compute
from pipeline.runtime import fingerprint as fingerprints
from pipeline.runtime.compute import World
from pipeline.runtime.fingerprint import fingerprint
from pipeline.stages import synthesize
from pipeline.training import curve_points, learners
from pipeline.training import loop as training
from pipeline.training.backbones import create_backbone
from pipeline.training.probe import ImageFeatures

from conftest import make_params

# A torch.device("cuda") is fingerprinted on machines without one too; autocast warns that it would be disabled.
pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
CPU = torch.device("cpu")
VERSIONS = {"torch": "2.5.0", "timm": "1.0.0"}


@dataclasses.dataclass(frozen=True)
class Settings:
    lr: float = 0.1
    steps: int = 10


def write_weights(path, seed):
    torch.manual_seed(seed)
    save_file(create_backbone("compact_cnn", "none").state_dict(), str(path))


def write_policy(path, transforms):
    save_policy(build_policy(transforms, 0), path)


@pytest.fixture
def inputs(tmp_path):
    """Keyword arguments for fingerprint(), with a real policy file and a real weights file."""
    rng = np.random.default_rng(0)
    write_policy(tmp_path / "policy.json", make_params().augment.transforms)
    write_weights(tmp_path / "weights.safetensors", seed=0)
    return {"data": [rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8), np.arange(6) % 2, np.arange(6)],
            "params": [Settings(), {"variant": "cnn"}], "policy": tmp_path / "policy.json",
            "weights": tmp_path / "weights.safetensors", "device": CPU, "versions": VERSIONS}


def changed_pixel(inputs):
    images = inputs["data"][0].copy()
    images[0, 0, 0, 0] ^= 1
    return {**inputs, "data": [images, *inputs["data"][1:]]}


def changed_targets(inputs):
    images, targets, rows = inputs["data"]
    return {**inputs, "data": [images, 1 - targets, rows]}


def changed_rows(inputs):
    images, targets, rows = inputs["data"]
    return {**inputs, "data": [images, targets, rows[::-1].copy()]}


def changed_dtype(inputs):
    images, targets, rows = inputs["data"]
    return {**inputs, "data": [images, targets.astype(np.int32), rows]}


def changed_params(inputs):
    return {**inputs, "params": [Settings(lr=0.2), {"variant": "cnn"}]}


def changed_policy_contents(inputs):  # the same file, other contents
    write_policy(inputs["policy"], make_params().augment.transforms[:-1])
    return inputs


def changed_weights_contents(inputs):
    write_weights(inputs["weights"], seed=1)
    return inputs


def changed_device(inputs):
    return {**inputs, "device": torch.device("cuda")}


def changed_precision(inputs, monkeypatch):
    """The device stays, but autocast would compute in bf16 on it: another result."""
    monkeypatch.setattr(compute, "autocast", lambda device: torch.autocast(device.type, dtype=torch.bfloat16))
    return inputs


def changed_torch_version(inputs):
    return {**inputs, "versions": {**VERSIONS, "torch": "2.6.0"}}


def changed_timm_version(inputs):
    return {**inputs, "versions": {**VERSIONS, "timm": "1.0.1"}}


CHANGES = [changed_pixel, changed_targets, changed_rows, changed_dtype, changed_params, changed_policy_contents,
           changed_weights_contents, changed_device, changed_precision, changed_torch_version, changed_timm_version]


def test_identical_inputs_give_the_same_fingerprint(inputs):
    first = fingerprint(**inputs)
    assert fingerprint(**inputs) == first
    copied = {**inputs, "data": [array.copy() for array in inputs["data"]], "params": [Settings(), {"variant": "cnn"}]}
    assert fingerprint(**copied) == first and len(first) == 64


@pytest.mark.parametrize("change", CHANGES, ids=lambda change: change.__name__)
def test_the_fingerprint_changes_with_everything_that_changes_a_result(inputs, monkeypatch, change):
    before = fingerprint(**inputs)
    after = change(inputs, monkeypatch) if change is changed_precision else change(inputs)
    assert fingerprint(**after) != before


def test_installed_library_versions_are_the_default(inputs, monkeypatch):
    installed = {**inputs, "versions": None}
    assert fingerprint(**installed) == fingerprint(**{**inputs, "versions": fingerprints.library_versions(
        with_policy=True)})
    before = fingerprint(**installed)
    real = fingerprints.metadata.version
    monkeypatch.setattr(fingerprints.metadata, "version", lambda name: "9.9" if name == "torch" else real(name))
    assert fingerprint(**installed) != before  # an upgraded torch
    assert set(fingerprints.library_versions(with_policy=True)) == {"torch", "timm", "albumentations"}


def test_precision_follows_autocast_and_the_layout_is_recorded(monkeypatch):
    layout = {"layout": "channels_last"}
    assert fingerprints.compute_mode(CPU) == {"device": "cpu", "precision": "torch.float32"} | layout
    if torch.cuda.is_available():
        assert fingerprints.compute_mode(torch.device("cuda")) == {"device": "cuda", "precision": "torch.bfloat16"} | layout
    before = fingerprint(params=[1], device=CPU)
    monkeypatch.setattr(compute, "LAYOUT", "contiguous")  # cached features computed in another layout differ
    assert fingerprint(params=[1], device=CPU) != before


# --- the callers: what each includes, and what each leaves out on purpose ----------------------------------------

def test_the_gan_fingerprint_ignores_steps_but_not_the_data_the_processes_or_the_device(digits):  # noqa: F811
    images, targets, _, _ = digits
    params = make_params().synthesize
    base = synthesize.checkpoint_fingerprint(params, images, targets, World(), CPU)
    more_steps = dataclasses.replace(params, steps=params.steps * 10, log_every=1, checkpoint_every=1)
    assert synthesize.checkpoint_fingerprint(more_steps, images, targets, World(), CPU) == base
    assert synthesize.checkpoint_fingerprint(dataclasses.replace(params, lr_g=params.lr_g / 2), images, targets,
                                             World(), CPU) != base
    assert synthesize.checkpoint_fingerprint(params, images[1:], targets[1:], World(), CPU) != base
    assert synthesize.checkpoint_fingerprint(params, images, targets, World(0, 2), CPU) != base
    assert synthesize.checkpoint_fingerprint(params, images, targets, World(), torch.device("cuda")) != base
    # the filter's feature side shapes nothing the pixel discriminator trains, but everything the feature one does
    smaller = dataclasses.replace(params, feature_size=params.feature_size // 2)
    assert synthesize.checkpoint_fingerprint(smaller, images, targets, World(), CPU) == base
    features = dataclasses.replace(params, condition="label", discriminator="features")
    assert synthesize.checkpoint_fingerprint(features, images, targets, World(), CPU) != synthesize.checkpoint_fingerprint(
        dataclasses.replace(smaller, condition="label", discriminator="features"), images, targets, World(), CPU)
    # the filter's views judge samples after training: a checkpoint made with other views still resumes
    views = dataclasses.replace(params, filter_views=params.filter_views + 8)
    assert synthesize.checkpoint_fingerprint(views, images, targets, World(), CPU) == base
    # the generator's kind shapes training; the sampling temperature does not
    label = dataclasses.replace(params, condition="label")
    assert synthesize.checkpoint_fingerprint(label, images, targets, World(), CPU) != base
    assert synthesize.checkpoint_fingerprint(dataclasses.replace(params, truncation=0.5), images, targets, World(),
                                             CPU) == base


def test_the_finetuning_fingerprint_covers_the_policy_only_when_the_variant_augments(digits, tmp_path):  # noqa: F811
    images, targets, _, _ = digits
    params, data, policy = make_params().finetune, training_set(images, targets), tmp_path / "policy.json"
    augments = make_params().variants["cnn"]
    plain = dataclasses.replace(augments, augment=False)
    write_policy(policy, make_params().augment.transforms)
    before = {v: learners.checkpoint_fingerprint(params, v, data, policy, World(), CPU) for v in (augments, plain)}
    write_policy(policy, make_params().augment.transforms[:-1])
    after = {v: learners.checkpoint_fingerprint(params, v, data, policy, World(), CPU) for v in (augments, plain)}
    assert after[augments] != before[augments] and after[plain] == before[plain]
    other_workers = dataclasses.replace(params, workers=2, checkpoint_every=7)  # change nothing that is trained
    assert learners.checkpoint_fingerprint(other_workers, plain, data, policy, World(), CPU) == after[plain]


def test_the_finetuning_fingerprint_hashes_a_weights_files_contents(digits, tmp_path):  # noqa: F811
    images, targets, _, _ = digits
    params, data = make_params().finetune, training_set(images, targets)
    weights = tmp_path / "w.safetensors"
    variant = dataclasses.replace(make_params().variants["cnn"], weights=f"file:{weights}", augment=False)
    write_weights(weights, seed=0)
    before = learners.checkpoint_fingerprint(params, variant, data, tmp_path / "policy.json", World(), CPU)
    assert learners.checkpoint_fingerprint(params, variant, data, tmp_path / "policy.json", World(), CPU) == before
    write_weights(weights, seed=1)  # the same name, other weights
    assert learners.checkpoint_fingerprint(params, variant, data, tmp_path / "policy.json", World(), CPU) != before


def test_a_scarcity_fold_key_covers_the_policy_contents_and_the_device(collected_dir, tmp_path):
    params = make_params()
    collected = load_collected(collected_dir)
    drawn = draws.draw(collected, params.scarcity, 6)
    write_policy(tmp_path / "policy.json", params.augment.transforms)
    point = curve_points.Point(params.finetune, params.variants["cnn"], collected, drawn, tmp_path / "policy.json",
                               None, None, CPU)
    before = curve_points.fold_key(point, 0, 1)
    assert curve_points.fold_key(point, 0, 1) == before and curve_points.fold_key(point, 0, 0) != before
    assert curve_points.fold_key(dataclasses.replace(point, device=torch.device("cuda")), 0, 1) != before
    write_policy(tmp_path / "policy.json", params.augment.transforms[:-1])
    assert curve_points.fold_key(point, 0, 1) != before
    changed = dataclasses.replace(collected, images=collected.images.copy())
    changed.images[drawn.train[0]] ^= 1  # one drawn image's pixels, same rows
    assert curve_points.fold_key(dataclasses.replace(point, collected=changed), 0, 1) != curve_points.fold_key(
        point, 0, 1)


def test_the_feature_cache_key_hashes_a_weights_files_contents(tmp_path):
    write_weights(tmp_path / "w.safetensors", seed=0)
    before = ImageFeatures("compact_cnn", 16, CPU, f"file:{tmp_path / 'w.safetensors'}").key
    assert ImageFeatures("compact_cnn", 16, CPU, f"file:{tmp_path / 'w.safetensors'}").key == before
    write_weights(tmp_path / "w.safetensors", seed=1)
    assert ImageFeatures("compact_cnn", 16, CPU, f"file:{tmp_path / 'w.safetensors'}").key != before


# --- a fine-tuning checkpoint is not resumed after the augmentation policy changed ----------------------------------

def killed_job(job, monkeypatch):
    """Run the job's training until it dies in epoch 3, with the epoch-2 checkpoint on disk."""
    real_epoch, calls = training._train_epoch, []

    def dies_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(training, "_train_epoch", dies_in_epoch_3)
        with pytest.raises(KeyboardInterrupt):
            learners.full(job)
    assert (job.workspace.checkpoints / training.CHECKPOINT_FILE).is_file()


def test_a_checkpoint_made_under_another_augmentation_policy_is_not_resumed(digits, tmp_path,  # noqa: F811
                                                                           monkeypatch, caplog):
    images, targets, external, _ = digits
    params = make_params(finetune__checkpoint_every=1, variants__cnn__epochs=3)
    policy = tmp_path / "policy.json"
    write_policy(policy, params.augment.transforms)
    workspace = learners.Workspace(checkpoints=tmp_path / "checkpoints")
    job = learners.Job(params.finetune, params.variants["cnn"], training_set(images, targets),
                       (external, external[:0]), 10, policy, workspace, CPU, World())
    assert job.variant.augment
    killed_job(job, monkeypatch)
    assert learners.full(job).meta["resumed_from_epoch"] == 2  # the same policy: resumed
    killed_job(job, monkeypatch)
    write_policy(policy, params.augment.transforms[:-1])  # the policy file changes between the runs
    with caplog.at_level(logging.WARNING):
        outcome = learners.full(job)
    assert outcome.meta["resumed_from_epoch"] == 0 and outcome.meta["epochs_run"] == 3
    assert "other data or settings" in caplog.text
    assert str(workspace.checkpoints / training.CHECKPOINT_FILE) in caplog.text
