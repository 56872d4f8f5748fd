"""Frozen-backbone features and the linear probe on top of them, shared by synthesize (filtering and measuring
GAN samples) and finetune's `linear_probe` strategy.

Features are the pooled penultimate layer (timm's `num_classes=0` head) of a backbone on images preprocessed by
`Classifier`. They depend only on the model, its weights, the input size and the pixels, so `FeatureCache`
keeps them on disk under that key: every fold and variant that needs the external test set's features
computes them once.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.runtime import atomic
from pipeline.runtime.compute import autocast, channels_last
from pipeline.runtime.fingerprint import fingerprint
from pipeline.training.backbones import Classifier, create_backbone, weights_source

log = logging.getLogger(__name__)
FEATURE_BATCH = 256


def unit_rows(features: np.ndarray) -> np.ndarray:
    """float64 rows scaled to length 1, where cosine geometry is wanted (pooled CNN features differ in norm more
    than in direction); an all-zero row stays zero."""
    features = np.asarray(features, dtype=np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


class ImageFeatures:
    """uint8 NHWC images -> float32 N x d features of a frozen backbone (grayscale repeated, resized,
    normalised with the backbone's own mean and std)."""

    def __init__(self, backbone: str, input_size: int, device: torch.device, weights: str = "packaged"):
        self.model = Classifier(create_backbone(backbone, weights), num_classes=0, input_size=input_size)
        channels_last(self.model.eval().to(device))
        self.device = device
        self.dimensions = self.model.backbone.num_features
        # what, besides the pixels, the features depend on: the weights' contents, and bf16 on CUDA is not fp32
        self.key = fingerprint(params=[backbone, weights, input_size], weights=weights_source(backbone, weights),
                               device=device)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = [np.zeros((0, self.dimensions), np.float32)]
        for start in range(0, len(images), FEATURE_BATCH):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + FEATURE_BATCH]))
            x = chunk.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
            with autocast(self.device):
                out.append(self.model(x).float().cpu().numpy())
        return np.concatenate(out)


class FeatureCache:
    """Features on disk, one .npy file per (model, weights, input size, device and precision, library versions,
    exact pixels); a miss computes them."""

    def __init__(self, extract: ImageFeatures, folder: Path | None):
        self.extract, self.folder = extract, folder
        self.hits = self.misses = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.folder is None:
            return self.extract(images)
        path = self.folder / f"{fingerprint(data=[images], params=self.extract.key)[:32]}.npy"
        if path.is_file():
            self.hits += 1
            return np.load(path)
        self.misses += 1
        features = self.extract(images)
        buffer = io.BytesIO()
        np.save(buffer, features)
        atomic.write_bytes(path, buffer.getvalue())  # concurrent stages may race: each rename is whole
        return features


class LinearProbe:
    """Multinomial logistic regression on standardised features, fitted by full-batch L-BFGS in torch on the
    features' device. Same objective as scikit-learn's (C x summed log-loss + |W|^2 / 2, intercept free), but
    a few milliseconds instead of tenths of a second per fit, which is what keeps the `linear_probe` strategy
    an order of magnitude faster than fine-tuning also on a GPU (where sklearn's fit was the probe's slowest part)."""

    def __init__(self, c: float, num_classes: int, device: torch.device, max_iter: int = 200,
                 per_feature: bool = True):
        self.c, self.num_classes, self.device, self.max_iter = c, num_classes, device, max_iter
        self.per_feature = per_feature  # False: centre nothing, divide every feature by one overall scale
        if not per_feature:  # worse conditioned: on digit features 200 iterations stopped 0.013 short, 1,000 reach it
            self.max_iter = 5 * max_iter

    def _standardised(self, features: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)
        return (x - self.mean) / self.scale

    def fit(self, features: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None) -> "LinearProbe":
        """Fit on the rows. A row of weight w (`weights`, one per row, default 1) counts as w copies of itself,
        in the standardisation and in the log-loss, the penalty staying 1 / (2 C) against the weights' sum: with
        weights of 1 this is scikit-learn's objective exactly."""
        raw = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)
        w = torch.ones(len(raw), device=self.device) if weights is None else torch.from_numpy(
            np.array(weights, dtype=np.float32)).to(self.device)
        total = w.sum()
        mean = (w[:, None] * raw).sum(0) / total  # a row of weight w counts as w rows here too
        if self.per_feature:
            variance = (w[:, None] * (raw - mean).square()).sum(0) / total
            self.mean, self.scale = mean, variance.sqrt().clamp_min(1e-6)
        else:  # weaker features keep smaller weights (and a head trained on stays stable)
            overall = mean.mean()  # torch.std() over every entry, weighted
            variance = (w[:, None] * (raw - overall).square()).sum() / (total * raw.shape[1] - 1)
            self.mean = raw.new_zeros(raw.shape[1])
            self.scale = variance.sqrt().clamp_min(1e-6).expand(raw.shape[1])
        x = self._standardised(features)
        y = torch.from_numpy(np.array(targets, dtype=np.int64)).to(self.device)  # a writable copy
        self.weight = torch.zeros(x.shape[1], self.num_classes, device=self.device, requires_grad=True)
        self.bias = torch.zeros(self.num_classes, device=self.device, requires_grad=True)
        penalty = 1.0 / (2 * self.c * float(total))  # sklearn's objective divided by C x n (n: the summed weights)
        optimizer = torch.optim.LBFGS([self.weight, self.bias], max_iter=self.max_iter, tolerance_grad=1e-6,
                                      tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            per_row = F.cross_entropy(x @ self.weight + self.bias, y, reduction="none")
            loss = (per_row * w).sum() / total + penalty * self.weight.square().sum()
            loss.backward()
            return loss
        with torch.enable_grad():
            optimizer.step(objective)
        self.weight, self.bias = self.weight.detach(), self.bias.detach()
        return self

    @torch.no_grad()
    def fold_into(self, head: torch.nn.Linear) -> None:
        """Write the probe into a linear layer that takes the raw features, folding the standardisation in:
        ((f - mean) / scale) W + b = f (W / scale) + (b - (mean / scale) W)."""
        weight, scale, mean = self.weight.float().cpu(), self.scale.float().cpu(), self.mean.float().cpu()
        head.weight.copy_((weight / scale[:, None]).T.to(head.weight))
        head.bias.copy_((self.bias.float().cpu() - (mean / scale) @ weight).to(head.bias))

    @torch.inference_mode()
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """N x num_classes probabilities (float32)."""
        if not len(features):
            return np.zeros((0, self.num_classes), np.float32)
        logits = self._standardised(features) @ self.weight + self.bias
        return logits.softmax(1).float().cpu().numpy()


def balanced_pseudo_labels(probs: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, labels): for each class, the `per_class` rows predicted as it with the highest confidence (fewer if
    fewer are predicted as it). Balanced so that a class the model already favours cannot take over the pool,
    the usual failure of thresholded self-training with few labels."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    chosen = [np.zeros(0, np.int64)]
    for label in range(probs.shape[1]):
        rows = np.flatnonzero(predicted == label)
        chosen.append(rows[np.argsort(-confidence[rows], kind="stable")][:per_class])
    rows = np.sort(np.concatenate(chosen))
    return rows, predicted[rows]


def self_train(fit: Callable[[np.ndarray, np.ndarray, np.ndarray], LinearProbe], rows: np.ndarray,
               targets: np.ndarray, pool: np.ndarray, rounds: int, share: float,
               weight: float) -> tuple[LinearProbe, list[dict]]:
    """Class-balanced self-training of a probe on frozen features (pseudo-labelling, Lee 2013, with the
    curriculum of Cascante-Bonilla et al., AAAI 2021): fit on the labelled rows; then in each of `rounds` rounds
    label the pool with the last probe and refit on the labelled rows plus, per class, the most confident pool
    rows, their number growing evenly to `share` of the pool (over the classes) in the last round. Every
    round restarts from the labelled rows, so a wrong pseudo-label of one round is not carried into the next
    unless the new probe makes it again. `fit(rows, targets, weights)` fits one probe; pool rows weigh
    `weight`. Returns the last probe and one record per round."""
    probe = fit(rows, targets, np.ones(len(rows)))
    classes, history = probe.num_classes, []
    for round_ in range(1, rounds + 1):
        per_class = round(share * round_ / rounds * len(pool) / classes)
        chosen, labels = balanced_pseudo_labels(probe.predict_proba(pool), per_class)
        probe = fit(np.concatenate([rows, pool[chosen]]), np.concatenate([targets, labels]),
                    np.concatenate([np.ones(len(rows)), np.full(len(chosen), weight)]))
        history.append({"round": round_, "pseudo_labelled": len(chosen),
                        "pseudo_label_share": len(chosen) / max(len(pool), 1)})
    return probe, history
