"""Judging GAN samples without trusting them: filter them with a classifier that saw only the fold's real
training images, and measure them (FID, KID, CAS) in the feature space of a pretrained backbone.

- Features: the pooled penultimate layer of a packaged ImageNet backbone (EfficientNet-Lite0 by default), on
  images resized to `feature_size`. The standard Inception features cannot be downloaded here; where a user can,
  `fid_features: inception` switches FID and KID to them (torchmetrics + torch-fidelity).
- Filter: logistic regression on those features (the linear probe of pipeline/training/probe.py), fitted on the
  fold's real training images; a sample is kept when it gives the sample's conditioning class a probability of at
  least `min_confidence` and, with `near_real`, lies near the real images of its class.
- FID and KID (torchmetrics' implementations, fed our features through an identity extractor) between samples
  and the fold's real training images. With a few dozen images FID is strongly biased upwards (it estimates
  1280-dimensional covariances); compare it only between runs with the same numbers of images. KID is unbiased.
- CAS (Ravuri & Vinyals 2019): the same classifier trained on synthetic samples only, scored on the fold's real
  validation images, beside it trained on the real training images.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.runtime.errors import PipelineError
from pipeline.training.probe import LinearProbe, unit_rows

log = logging.getLogger(__name__)
KID_SUBSETS = 50
PROBE_C = 0.5  # inverse L2 strength of the filter's and CAS's probe: a few dozen images, ~1000 features


@dataclass(frozen=True)
class SeenClassesProbe:
    """A linear probe over the classes its training rows hold: CAS may train on samples of a few classes only, and
    a column for a class without rows would chase an unpenalised bias towards minus infinity. A class it never
    saw is never predicted and has probability 0."""

    probe: LinearProbe
    classes: np.ndarray  # the targets seen in training, sorted; probe column j is classes[j]

    @classmethod
    def fit(cls, features: np.ndarray, targets: np.ndarray, device: torch.device) -> "SeenClassesProbe":
        classes = np.unique(targets)
        probe = LinearProbe(PROBE_C, len(classes), device).fit(features, np.searchsorted(classes, targets))
        return cls(probe, classes)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.classes[self.probe.predict_proba(features).argmax(1)]


def class_probability(probe: SeenClassesProbe, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The probe's probability of each sample's own label (0 for a label the probe never saw)."""
    probs = probe.probe.predict_proba(features)
    known = {c: i for i, c in enumerate(probe.classes)}
    column = np.array([known.get(int(label), -1) for label in labels])
    return np.where(column >= 0, probs[np.arange(len(labels)), np.maximum(column, 0)], 0.0)


@dataclass(frozen=True)
class Selection:
    keep: np.ndarray  # indices into the candidates, class-major, best score first within a class
    scores: np.ndarray  # every candidate's score
    acceptance: dict[int, float]  # class -> share of its candidates at or above the threshold


def novelty(real: np.ndarray, fake: np.ndarray) -> float | None:
    """How far samples lie from the images they were trained on, against how far those lie from each other: the
    median cosine distance from a sample to its nearest real image, over the median distance from a real image to
    its nearest other one. About 1: samples are as new as another real image would be; near 0: copies (a low FID
    and a high CAS mean little then). None with under two real images or no samples."""
    if len(real) < 2 or len(fake) == 0:
        return None
    real, fake = unit_rows(real), unit_rows(fake)
    among = 1 - real @ real.T
    np.fill_diagonal(among, np.inf)
    spread = float(np.median(among.min(axis=1)))
    return float(np.median((1 - fake @ real.T).min(axis=1)) / max(spread, 1e-12))


def near_real(real: np.ndarray, real_targets: np.ndarray, fake: np.ndarray, fake_labels: np.ndarray,
              quantile: float) -> np.ndarray:
    """Which candidates lie near the real images of their class in feature space: the cosine distance to the
    nearest real image of the class at most the `quantile` of the class's own spread (each real image's distance to
    its nearest other real image of the class). A class with fewer than two real images accepts none."""
    real, fake = unit_rows(real), unit_rows(fake)
    near = np.zeros(len(fake), dtype=bool)
    for label in np.unique(fake_labels):
        mine, theirs = fake_labels == label, real[real_targets == label]
        if len(theirs) < 2:
            continue
        among = 1 - theirs @ theirs.T
        np.fill_diagonal(among, np.inf)
        limit = np.quantile(among.min(axis=1), quantile)
        near[mine] = (1 - fake[mine] @ theirs.T).min(axis=1) <= limit
    return near


def select_samples(scores: np.ndarray, labels: np.ndarray, num_classes: int, min_confidence: float,
                   keep_per_class: int, eligible: np.ndarray | None = None) -> Selection:
    """Accept candidates scoring at least `min_confidence` (and `eligible`, when given: e.g. `near_real`); keep the
    best `keep_per_class` of each class."""
    passed = scores >= min_confidence if eligible is None else (scores >= min_confidence) & eligible
    keep, acceptance = [], {}
    for label in range(num_classes):
        mine = np.flatnonzero(labels == label)
        accepted = mine[passed[mine]]
        acceptance[label] = len(accepted) / max(1, len(mine))
        keep.append(accepted[np.argsort(-scores[accepted], kind="stable")][:keep_per_class])
    return Selection(np.concatenate(keep).astype(np.int64), scores, acceptance)


class _GivenFeatures(nn.Module):
    """An 'extractor' for torchmetrics that passes precomputed features through, so they are computed once."""

    def __init__(self, dimensions: int):
        super().__init__()
        self.num_features = dimensions

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(real: np.ndarray, fake: np.ndarray, seed: int) -> dict[str, float | None]:
    """FID and KID (mean, std over subsets) between two feature sets; None where there are too few samples."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if min(len(real), len(fake)) < 2:
        return {"fid": None, "kid": None, "kid_std": None}
    extractor = _GivenFeatures(real.shape[1])
    real_t, fake_t = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    fid = FrechetInceptionDistance(feature=extractor)
    fid.update(real_t, real=True)
    fid.update(fake_t, real=False)
    torch.manual_seed(seed)  # KID draws its subsets from torch's global stream
    with warnings.catch_warnings():  # "will save all extracted features": a few hundred vectors here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=extractor, subsets=KID_SUBSETS, subset_size=_kid_subset(real, fake))
    kid.update(real_t, real=True)
    kid.update(fake_t, real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def _kid_subset(real, fake) -> int:
    """Half the smaller set: subsets of the whole set would all be the same, and KID's spread would read 0."""
    return max(2, min(len(real), len(fake)) // 2)


def inception_fid_kid(real_images: np.ndarray, fake_images: np.ndarray, seed: int) -> dict[str, float | None]:
    """FID and KID with the standard Inception-v3 features (torch-fidelity's weights, downloaded on first use)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        fid = FrechetInceptionDistance(feature=2048)
        kid = KernelInceptionDistance(feature=2048, subsets=KID_SUBSETS, subset_size=_kid_subset(real_images,
                                                                                                 fake_images))
    except (ModuleNotFoundError, RuntimeError, OSError) as err:
        raise PipelineError(f"synthesize.fid_features: inception needs the torch-fidelity package and internet "
                            f"for its weights (pip install torch-fidelity); {type(err).__name__}: {err}. "
                            "Use `fid_features: backbone` offline.") from None
    if min(len(real_images), len(fake_images)) < 2:
        return {"fid": None, "kid": None, "kid_std": None}

    def as_rgb(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    torch.manual_seed(seed)
    for metric in (fid, kid):
        metric.update(as_rgb(real_images), real=True)
        metric.update(as_rgb(fake_images), real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def classification_accuracy_score(train_features: np.ndarray, train_targets: np.ndarray, val_features: np.ndarray,
                                  val_targets: np.ndarray, device: torch.device) -> float | None:
    """Accuracy on real validation images of a probe trained on `train_*`; None when it has under two classes."""
    if len(np.unique(train_targets)) < 2 or len(val_targets) == 0:
        return None
    probe = SeenClassesProbe.fit(train_features, train_targets, device)
    return float((probe.predict(val_features) == val_targets).mean())
