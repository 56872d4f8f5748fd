"""GAN samples for a set of training images: train the class-conditional GAN, generate candidates, filter them
with a classifier that saw only those images, and measure them (FID, KID, CAS). Shared by the synthesize stage
(one fold's training images) and the final stage (every labelled image)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.augmentation.policy import augmented_views
from pipeline.data.collected import DEV, Collected
from pipeline.gan.conditional import TrainedGan, generate, train_gan
from pipeline.gan.quality import (
    SeenClassesProbe,
    Selection,
    class_probability,
    classification_accuracy_score,
    fid_kid,
    inception_fid_kid,
    near_real,
    novelty,
    select_samples,
)
from pipeline.runtime.checkpoint import Checkpointing
from pipeline.runtime.compute import World, leave_process_group
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.params import SynthesizeParams, gan_side
from pipeline.training.probe import ImageFeatures

CAS_DEV_IMAGES = 1000  # development-part images CAS is also measured on, when the data has them


@dataclass
class Synthesis:
    trained: TrainedGan  # the EMA generator, its history, the final augmentation strength p
    fake: np.ndarray  # every candidate
    labels: np.ndarray
    kept: np.ndarray  # indices of the accepted candidates
    scores: np.ndarray
    quality: dict  # FID, KID, CAS, acceptance
    seconds: float  # GAN training time


def make_samples(params: SynthesizeParams, collected: Collected, rows: tuple[pd.DataFrame, pd.DataFrame], device,
                 checkpoint: Checkpointing | None, world: World = World(), policy: Any = None) -> Synthesis | None:
    """Train on rows[0], judge with rows[1] (validation images for CAS; may be empty); None on the non-main
    processes of a torchrun. `policy` (the augment stage's, built) draws the filter's views of the real images."""
    images, targets = collected.select(rows[0])
    stored, side = images.shape[1], gan_side(params.image_size, images.shape[1])
    start = time.perf_counter()
    trained = train_gan(resize(images, side), targets, len(collected.classes), params, device, checkpoint, world)
    seconds = time.perf_counter() - start
    leave_process_group()  # the rest is the main process's alone
    if not world.is_main:
        return None
    fake, labels = candidates(params, trained, stored, device)
    kept, scores, quality = judge(params, collected, fake, labels, rows, device, policy)
    return Synthesis(trained, fake, labels, kept, scores, quality, seconds)


def candidates(params: SynthesizeParams, trained: TrainedGan, side: int, device) -> tuple[np.ndarray, np.ndarray]:
    """`candidates_per_class` samples of every class at `side`, the stored side of the real images they are judged
    beside and mixed with; (uint8 NHWC images, labels)."""
    fake, labels = generate(trained.generator, per_class=params.candidates_per_class, z_dim=params.z_dim,
                            seed=params.seed, device=device, truncation=params.truncation)
    return resize(fake, side), labels


def fit_filter(params: SynthesizeParams, extract: ImageFeatures, images: np.ndarray, targets: np.ndarray,
               features: np.ndarray, policy: Any, device) -> SeenClassesProbe:
    """The filter's classifier: a probe of the real training images' `features` and of `filter_views` augmented
    views of each (drawn by `policy`, seeded by `params.seed`). A probe of 80 digits alone is right on about 7
    development digits in 10 and turns down a third of the real ones; with 16 views each, on about 8 in 10."""
    if params.filter_views == 0:
        return SeenClassesProbe.fit(features, targets, device)
    if policy is None:
        raise PipelineError(f"synthesize.filter_views is {params.filter_views}, but no augmentation policy was "
                            "given to draw the views with: run the augment stage first, or set filter_views: 0")
    views = augmented_views(images, policy, params.filter_views, params.seed)
    return SeenClassesProbe.fit(np.concatenate([features, extract(views)]),
                                np.concatenate([targets, np.tile(targets, params.filter_views)]), device)


def accept(params: SynthesizeParams, probe: SeenClassesProbe, real_features: np.ndarray, real_targets: np.ndarray,
           fake_features: np.ndarray, fake_labels: np.ndarray, classes: int) -> Selection:
    """The filter: `probe`, fitted on the real images' features, must give each candidate its class with at least
    `min_confidence` (and, with `near_real`, the candidate must lie near a real image of its class); the best
    `keep_per_class`."""
    scores = class_probability(probe, fake_features, fake_labels)
    eligible = (near_real(real_features, real_targets, fake_features, fake_labels, params.near_real)
                if params.near_real else None)
    return select_samples(scores, fake_labels, classes, params.min_confidence, params.keep_per_class, eligible)


def real_acceptance(probe: SeenClassesProbe, features: np.ndarray, targets: np.ndarray,
                    min_confidence: float) -> float | None:
    """The share of real images the filter accepts under their own label, averaged over their classes as the
    candidates' acceptance is (None without images). The filter is a probe of a few real images, so it also turns
    down real ones; this is the reference a GAN's acceptance is read against (samples more typical than real
    images can pass more often)."""
    if len(targets) == 0:
        return None
    passed = class_probability(probe, features, targets) >= min_confidence
    return float(np.mean([passed[targets == c].mean() for c in np.unique(targets)]))


def resize(images: np.ndarray, side: int, chunk: int = 256) -> np.ndarray:
    """uint8 N x H x W x C images as N x side x side x C: bilinear, antialiased when shrinking (so a 256 px photo
    becomes a clean 64 px one, not an aliased one); unchanged when already that side."""
    if images.shape[1] == side:
        return images
    out = np.empty((len(images), side, side, images.shape[3]), np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk])).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=side < x.shape[-1])
        out[start:start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def judge(params: SynthesizeParams, collected: Collected, fake: np.ndarray, fake_labels: np.ndarray,
          rows: tuple[pd.DataFrame, pd.DataFrame], device, policy: Any = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Filter the candidates and measure them: (kept indices, every candidate's score, metrics). FID, KID, novelty
    and CAS compare with the real training images themselves, not their views."""
    (train_images, train_targets), (val_images, val_targets) = (collected.select(r) for r in rows)
    extract = ImageFeatures(params.feature_backbone, params.feature_size, device)
    real_f, fake_f = extract(train_images), extract(fake)
    probe = fit_filter(params, extract, train_images, train_targets, real_f, policy, device)
    chosen = accept(params, probe, real_f, train_targets, fake_f, fake_labels, len(collected.classes))
    kept, scores = chosen.keep, chosen.scores
    if params.fid_features == "inception":
        before, after = (inception_fid_kid(train_images, fake[i], params.seed) for i in (slice(None), kept))
    else:
        before, after = (fid_kid(real_f, fake_f[i], params.seed) for i in (slice(None), kept))
    metrics = {
        **{f"{k}_candidates": v for k, v in before.items()}, **{f"{k}_accepted": v for k, v in after.items()},
        "acceptance": float(np.mean(list(chosen.acceptance.values()))),
        "accepted": int(len(kept)), "candidates": int(len(fake)),
        "novelty_candidates": novelty(real_f, fake_f), "novelty_accepted": novelty(real_f, fake_f[kept]),
        "acceptance_per_class": {collected.classes[c]: round(a, 4) for c, a in chosen.acceptance.items()},
    }
    tests = {"": (extract(val_images), val_targets)}
    dev = collected.part(DEV)  # a fold's validation part is a handful of images; the development part is not
    if len(dev):  # GAN settings are compared by these, so never on the final test
        images, targets = collected.select(dev.sample(min(CAS_DEV_IMAGES, len(dev)), random_state=0))
        tests["_dev"] = (extract(images), targets)
    trained_on = {"cas_synthetic": (fake_f[kept], fake_labels[kept]), "cas_candidates": (fake_f, fake_labels),
                  "cas_real": (real_f, train_targets)}
    for suffix, (test_f, test_y) in tests.items():
        for name, (train_f, train_y) in trained_on.items():
            metrics[name + suffix] = classification_accuracy_score(train_f, train_y, test_f, test_y, device)
        metrics["cas_ratio" + suffix] = cas_ratio(metrics["cas_synthetic" + suffix], metrics["cas_real" + suffix])
        # the same filter on real held-out images: the acceptance that samples as good as real ones would score
        metrics["acceptance_real" + suffix] = real_acceptance(probe, test_f, test_y, params.min_confidence)
    return kept, scores, metrics


def cas_ratio(synthetic: float | None, real: float | None) -> float | None:
    """What the accepted samples teach a classifier, as a share of what the real training images teach the same
    classifier (None where either is missing, or the real images taught nothing)."""
    if synthetic is None or not real:
        return None
    return synthetic / real


def check_no_leak(collected: Collected, fold: int, repeat: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fold's (training, validation) rows, refusing data whose training part holds a picture that is also
    in the validation part or the external test set (a manifest edited by hand, or a collect bug). No row can
    be in both parts: fold_split splits on one column."""
    train_rows, val_rows = collected.fold_split(fold, repeat)
    held_out = pd.concat([val_rows, collected.external])
    shared = set(train_rows.sha256) & set(held_out.sha256)
    if shared:
        example = held_out[held_out.sha256.isin(shared)].path.iloc[0]
        raise PipelineError(f"fold {fold} (repeat {repeat}): {len(shared)} picture(s) in its training part are also "
                            f"held out for testing (e.g. {example}); the GAN would see test images. Re-run "
                            "`dvc repro collect` and do not edit data/collected by hand")
    return train_rows, val_rows
