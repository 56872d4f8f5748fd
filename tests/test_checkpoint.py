"""The one checkpoint format (pipeline/runtime/checkpoint.py): tensors in safetensors, the rest as JSON, nothing
pickled; a damaged checkpoint or one that does not fit is ignored with a warning, and training starts over, for
the GAN and for fine-tuning alike."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save
from test_gan import GanCfg, make_dark_bright_dataset
from test_training import digits, setup_for, small_cnn, training_set  # noqa: F401  (digits is a fixture)

from pipeline.gan import conditional as gan
from pipeline.runtime import checkpoint as checkpoints
from pipeline.runtime.checkpoint import Checkpointing, load_checkpoint, save_checkpoint
from pipeline.training import loop as training
from pipeline.training.loop import fit

CPU = torch.device("cpu")
FINGERPRINT = "data+settings"
DAMAGE = {
    "truncated": lambda blob: blob[:len(blob) // 2],
    "garbage": lambda blob: b"\x8a\x00\xff not a checkpoint at all " * 40,
    "empty": lambda blob: b"",
    "flipped byte": lambda blob: blob[:-9] + bytes([blob[-9] ^ 0x40]) + blob[-8:],  # in the tensor data
    "broken header": lambda blob: blob[:8] + blob[8:40].replace(b"{", b"[", 1) + blob[40:],
}


def damage(path, how):
    path.write_bytes(DAMAGE[how](path.read_bytes()))


def warned_about(caplog, path) -> bool:
    return any(record.levelno == logging.WARNING and str(path) in record.getMessage() for record in caplog.records)


def example_parts():
    return {"model": {"conv.weight": torch.randn(3, 2), "n": torch.tensor(5),
                      "half": torch.ones(4, dtype=torch.bfloat16)},
            "rng.0": {"torch": torch.get_rng_state()}}


# --- the file ----------------------------------------------------------------------------------------------------

def test_a_checkpoint_holds_tensors_and_json_and_reads_back_exactly(tmp_path):
    parts, meta = example_parts(), {"step": 3, "history": [{"loss": 0.25, "r": None}], "best": float("inf")}
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, parts, meta, FINGERPRINT)
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert set(header["__metadata__"]) == {"format", "fingerprint", "meta", "digest"}  # no pickle anywhere
    saved = load_checkpoint(path, FINGERPRINT)
    assert saved.meta == meta
    assert saved.tensors.keys() == parts.keys()
    for part, tensors in parts.items():
        for key, tensor in tensors.items():
            assert saved.tensors[part][key].dtype == tensor.dtype and torch.equal(saved.tensors[part][key], tensor)


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_ignored_with_a_warning_naming_it(tmp_path, caplog, how):
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, example_parts(), {"step": 3}, FINGERPRINT)
    damage(path, how)
    assert load_checkpoint(path, FINGERPRINT) is None
    assert warned_about(caplog, path)


def test_json_that_does_not_parse_is_ignored(tmp_path, caplog):
    path = tmp_path / "checkpoint.safetensors"
    flat = checkpoints.flatten(example_parts())
    header = {"format": checkpoints.FORMAT, "fingerprint": FINGERPRINT, "meta": "{not json",
              "digest": checkpoints._digest(flat, FINGERPRINT, "{not json")}  # whole, but its JSON is not
    path.write_bytes(save(flat, metadata=header))
    assert load_checkpoint(path, FINGERPRINT) is None and warned_about(caplog, path)
    assert "JSON does not parse" in caplog.text


def test_a_checkpoint_for_another_fingerprint_or_without_a_part_is_ignored(tmp_path, caplog):
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, example_parts(), {"step": 3}, FINGERPRINT)
    assert load_checkpoint(path, "other data") is None
    assert "other data or settings" in caplog.text
    caplog.clear()
    assert load_checkpoint(path, FINGERPRINT, lambda saved: saved.tensors["ema"]) is None  # what read() needs
    assert warned_about(caplog, path) and "does not fit" in caplog.text
    assert load_checkpoint(tmp_path / "none.safetensors", FINGERPRINT) is None  # none at all: no warning needed


def test_module_and_optimizer_states_are_checked_before_anything_is_loaded():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    tensors, meta = checkpoints.optimizer_parts("opt", optimizer)
    saved = checkpoints.Saved(checkpoints.unflatten(checkpoints.flatten({"model": model.state_dict(), **tensors})),
                              {"opt": json.loads(json.dumps(meta))})
    other = torch.nn.Linear(4, 2)
    assert checkpoints.module_state(saved, "model", model).keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="shape"):
        checkpoints.module_state(saved, "model", other)
    with pytest.raises(ValueError, match="shape"):
        checkpoints.optimizer_state(saved, "opt", torch.optim.Adam(other.parameters()))
    restored = torch.optim.Adam(model.parameters())
    restored.load_state_dict(checkpoints.optimizer_state(saved, "opt", restored))
    assert torch.equal(restored.state[model.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])


# --- the GAN: a real short run, killed with its checkpoint on disk ------------------------------------------------

GAN_DATA = make_dark_bright_dataset(n_per_class=8)
GAN_CFG = GanCfg(steps=10, ada_images=40, ada_target=0.05)


@pytest.fixture(scope="module")
def straight_gan():
    return gan.train_gan(*GAN_DATA, 2, GAN_CFG, CPU)


def killed_gan(tmp_path, monkeypatch):
    """A 10-step run killed after its step-8 checkpoint; (images, labels, cfg, its checkpointing)."""
    (images, labels), cfg = GAN_DATA, GAN_CFG
    checkpoint = Checkpointing(tmp_path, every=4, fingerprint=FINGERPRINT)

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(gan, "_recalibrate_batch_norm", die)
        with pytest.raises(KeyboardInterrupt):
            gan.train_gan(images, labels, 2, cfg, CPU, checkpoint)
    assert (tmp_path / gan.CHECKPOINT_FILE).is_file()
    return images, labels, cfg, checkpoint


def drop_part(path, part):
    """Rewrite a checkpoint without one of its parts, whole and with the right fingerprint: only its contents
    show it lacks something."""
    saved = load_checkpoint(path, FINGERPRINT)
    save_checkpoint(path, {k: v for k, v in saved.tensors.items() if k != part}, saved.meta, FINGERPRINT)


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing ema"])
def test_a_damaged_gan_checkpoint_restarts_training_from_the_first_step(straight_gan, tmp_path, monkeypatch, caplog,
                                                                        how):
    images, labels, cfg, checkpoint = killed_gan(tmp_path, monkeypatch)
    path = tmp_path / gan.CHECKPOINT_FILE
    if how == "missing ema":
        drop_part(path, "ema")
    else:
        damage(path, how)
    restarted = gan.train_gan(images, labels, 2, cfg, CPU, checkpoint)
    assert restarted.resumed_from == 0 and warned_about(caplog, path)
    assert restarted.history == straight_gan.history  # a whole fresh run, nothing of the damaged one
    for a, b in zip(straight_gan.generator.state_dict().values(), restarted.generator.state_dict().values()):
        assert torch.equal(a, b)


# --- fine-tuning: a real short run, killed with its checkpoint on disk --------------------------------------------

@pytest.fixture(scope="module")
def straight_finetuning(digits):  # noqa: F811
    images, targets, external, _ = digits
    result = fit(small_cnn(), training_set(images, targets), setup_for(epochs=3))
    return result.history, training.predict(result.model, external, CPU, 10)


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing optimizer slots"])
def test_a_damaged_finetuning_checkpoint_restarts_from_the_first_epoch(digits, straight_finetuning,  # noqa: F811
                                                                     tmp_path, monkeypatch, caplog, how):
    images, targets, external, _ = digits
    checkpoint = Checkpointing(tmp_path, every=1, fingerprint=FINGERPRINT)
    real_epoch, calls = training._train_epoch, []

    def dies_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # with the epoch-2 checkpoint on disk
        return real_epoch(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(training, "_train_epoch", dies_in_epoch_3)
        with pytest.raises(KeyboardInterrupt):
            fit(small_cnn(), training_set(images, targets), setup_for(epochs=3, checkpoint=checkpoint))
    path = tmp_path / training.CHECKPOINT_FILE
    if how == "missing optimizer slots":
        drop_part(path, "optim.0")
    else:
        damage(path, how)
    restarted = fit(small_cnn(), training_set(images, targets), setup_for(epochs=3, checkpoint=checkpoint))
    assert restarted.resumed_from == 0 and warned_about(caplog, path)
    history, probs = straight_finetuning
    assert restarted.history == history  # a whole fresh run, nothing of the damaged one
    assert np.array_equal(training.predict(restarted.model, external, CPU, 10), probs)
