"""Shared fixtures: the real params.yaml shrunk to smoke-test size, and real images (MNIST, scikit-learn digits)."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import presets
from pipeline.runtime.params import Params, parse_params
from pipeline.stages import collect

ROOT = Path(__file__).resolve().parents[1]

# Smallest settings that still exercise every code path; used by unit tests and the end-to-end DVC run.
TINY = {
    "collect.images_per_class": 4,
    "collect.external_limit": 300,
    "collect.unlabelled_limit": 200,
    "collect.folds": [0, 1],
    "collect.image_size": 16,
    "synthesize.steps": 20,
    "synthesize.batch_size": 16,
    "synthesize.base_channels": 8,
    "synthesize.candidates_per_class": 6,
    "synthesize.keep_per_class": 3,
    "synthesize.filter_views": 2,
    "synthesize.feature_size": 32,
    "synthesize.checkpoint_every": 10,
    "synthesize.log_every": 5,
    "finetune.warmup_epochs": 1,
    "finetune.batch_size": 16,
    "scarcity.images_per_class": [2, 6],
    "scarcity.holdout": 100,
    "evaluate.bootstrap": 200,
}


def tiny_variants(raw: dict) -> dict:
    """Every variant of a params mapping at smoke size: 3 epochs at 32 px."""
    return {f"variants.{name}.{key}": value for name in raw["variants"] for key, value in (("epochs", 3),
                                                                                         ("input_size", 32))}


TINY.update(tiny_variants(yaml.safe_load((ROOT / "params.yaml").read_text())))


def raw_params(preset: str | None = None) -> dict:
    """params.yaml as a mapping, with a preset (presets/NAME.yaml) applied when named, e.g. "study"."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return presets.merged(raw, preset) if preset else raw


def with_overrides(raw: dict, overrides: dict) -> dict:
    """A copy of a params mapping with dotted keys replaced, e.g. {"collect.folds": [0, 1]}."""
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node[key]
        node[leaf] = value
    return raw


def make_params(preset: str | None = None, **overrides) -> Params:
    """params.yaml (with `preset` applied, if any) at TINY size, plus keyword overrides with `__` for dots
    (collect__folds=[0, 1, 2])."""
    raw = raw_params(preset)
    tiny = {**{k: v for k, v in TINY.items() if not k.startswith("variants.")}, **tiny_variants(raw)}
    return parse_params(with_overrides(raw, {**tiny, **{k.replace("__", "."): v for k, v in overrides.items()}}))


@pytest.fixture(scope="session")
def tiny_params() -> Params:
    return make_params()


@pytest.fixture(scope="session")
def collected_dir(tmp_path_factory, tiny_params) -> Path:
    """The collect stage's real output on MNIST at TINY size (read-only for tests)."""
    root = tmp_path_factory.mktemp("collected")
    out = root / "collected"
    collect.run(tiny_params.collect, out, root / "reports")
    return out


@pytest.fixture(scope="session")
def policy_file(tmp_path_factory, collected_dir, tiny_params) -> Path:
    """The augment stage's real policy.json at TINY size (read-only for tests): the filter's views are drawn with
    it."""
    from pipeline.stages import augment

    root = tmp_path_factory.mktemp("augment")
    augment.run(tiny_params.augment, collected_dir, root)
    return root / "policy.json"


# Real colour photos (CC0, 10 classes of clothing, about 256 x 341 px), laid beside the repository as
# ../shared/datasets/clothing-small; PHOTOS_DIR points elsewhere.
PHOTOS = Path(os.environ.get("PHOTOS_DIR", ROOT.parent / "shared" / "datasets" / "clothing-small"))


def photo_folder(dest: Path, classes: int = 3, per_class: int = 6) -> Path:
    """A folder source of real photos: the first `per_class` photos of the first `classes` classes, one
    subfolder per class (copied, so a test may add or break files)."""
    if not PHOTOS.is_dir():
        message = f"the photo tests need the clothing-small photos at {PHOTOS} (or PHOTOS_DIR)"
        if os.environ.get("REQUIRE_PHOTOS"):  # CI sets it: there missing photos are a failure, not a skip
            pytest.fail(message)
        pytest.skip(message)
    for label in sorted(p.name for p in PHOTOS.iterdir() if p.is_dir())[:classes]:
        (dest / label).mkdir(parents=True, exist_ok=True)
        for photo in sorted((PHOTOS / label).iterdir())[:per_class]:
            shutil.copy(photo, dest / label / photo.name)
    return dest


def digit_images(per_class: int, classes: int = 3, size: int = 24) -> dict[int, list[np.ndarray]]:
    """Real handwritten digits from scikit-learn, upscaled to `size` px, `per_class` distinct ones per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = {}
    for label in range(classes):
        picked = digits.images[digits.target == label][:per_class]
        out[label] = [np.asarray(Image.fromarray((d * 255 / 16).astype(np.uint8)).resize((size, size))) for d in picked]
    return out


def stage_workspace(tmp_path: Path, collected_dir: Path, policy: Path | None, **overrides) -> Path:
    """A folder laid out like the repository (params.yaml at TINY size plus `overrides`, data/collected, and the
    augment policy when given) for running a stage's command."""
    work = tmp_path / "work"
    shutil.copytree(collected_dir, work / "data" / "collected")
    if policy is not None:
        (work / "data" / "augment").mkdir(parents=True)
        shutil.copy(policy, work / "data" / "augment" / "policy.json")
    (work / "params.yaml").write_text(yaml.safe_dump(with_overrides(raw_params(), {**TINY, **overrides}),
                                                     sort_keys=False))
    return work


def stage_env() -> dict:
    """The environment for a stage command in such a workspace: this checkout importable, one thread per process."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def kill_once_checkpointed(command: list[str], work: Path, checkpoint: Path) -> None:
    """Start a stage command, SIGKILL it as soon as `checkpoint` exists (within 2 minutes), and check it does."""
    process = subprocess.Popen(command, cwd=work, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), process.stderr.read().decode()[-2000:]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skip them, saying so, on machines without it (CI never has one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def known_answers(tmp_path_factory):
    """A whole evaluate run on predictions with known accuracies (tests/reporting.py)."""
    from reporting import evaluate_known_answers

    return evaluate_known_answers(tmp_path_factory.mktemp("known_answers"))
