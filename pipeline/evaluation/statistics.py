"""The project's statistics: metrics by name (a dict, not branches), bootstrap intervals over images, the
corrected resampled t interval and test across folds, paired comparisons (bootstraps resample groups of images
when pictures come in groups) of two variants, Holm's correction,
and the numbers behind the reliability diagram and ROC curve (pipeline/evaluation/figures.py draws them).

`probs` is always images x classes of class probabilities (rows sum to 1), `targets` the integer class ids
0..C-1 with C = probs.shape[-1]; predictions are probs.argmax(1).

Every metric is written once, as a weighted sum over images computed for a whole batch of weight vectors at a
time. A bootstrap resample that draws image i k times is the same as giving image i weight k, so the point
metric (weights all 1) and every resample share one implementation, and 1000 resamples cost a few passes over
a resamples x images array instead of 1000 Python-level metric calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats

from pipeline.runtime.errors import PipelineError

LOG_LOSS_FLOOR = 1e-15  # sklearn's historical clip: one confidently wrong image costs 34.5, not infinity
ECE_BINS = 15  # the usual choice since Guo et al. (2017), so our ECE compares with published figures
RESAMPLE_CHUNK = 500_000  # resamples x images weighed at once: 4 MB arrays stay in cache (~3x faster than 40 MB)


@dataclass(frozen=True)
class _Predictions:
    """One set of predictions, converted once and shared by every metric."""

    targets: np.ndarray  # images, int
    probs: np.ndarray  # images x classes, float64
    predicted: np.ndarray  # images, int: probs.argmax(1)

    @property
    def classes(self) -> int:
        return self.probs.shape[1]


def _predictions(targets: np.ndarray, probs: np.ndarray) -> _Predictions:
    targets = np.asarray(targets).astype(np.int64, copy=False)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or targets.shape != probs.shape[:1]:
        raise PipelineError(f"expected targets (images,) and probs (images, classes); got {targets.shape} and "
                            f"{probs.shape}: the predictions do not belong to these images")
    if len(targets) and (targets.min() < 0 or targets.max() >= probs.shape[1]):
        raise PipelineError(f"targets must be class ids 0..{probs.shape[1] - 1} for {probs.shape[1]} columns of "
                            f"probabilities; got {targets.min()}..{targets.max()}")
    return _Predictions(targets, probs, probs.argmax(1))


# ---- metrics, each for a batch of weight vectors (batch x images) -> batch -------------------------------------

def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (sklearn's zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros(np.broadcast(numerator, denominator).shape),
                     where=denominator != 0)


def _group_sums(weights: np.ndarray, groups: np.ndarray, count: int, values: np.ndarray | None = None) -> np.ndarray:
    """batch x count: per row of weights, the weighted sum of values (1 by default) over each group's images.
    Summing runs of sorted columns rather than multiplying by a one-hot matrix keeps BLAS out of it: its threads
    made that product 50x slower on a machine busy with other work."""
    order = np.argsort(groups, kind="stable")
    ordered = groups[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(order) else order
    terms = weights[:, order] if values is None else weights[:, order] * values[order]
    sums = np.zeros((len(weights), count))
    if len(order):
        sums[:, ordered[starts]] = np.add.reduceat(terms, starts, axis=1)
    return sums


def _confusion(p: _Predictions, weights: np.ndarray) -> np.ndarray:
    """Weighted confusion matrices, batch x true x predicted."""
    cells = _group_sums(weights, p.targets * p.classes + p.predicted, p.classes**2)
    return cells.reshape(-1, p.classes, p.classes)


def _accuracy(p: _Predictions, weights: np.ndarray) -> np.ndarray:
    return weights @ (p.predicted == p.targets) / weights.sum(1)


def _balanced_accuracy(p: _Predictions, weights: np.ndarray) -> np.ndarray:
    confusion = _confusion(p, weights)
    support = confusion.sum(2)
    recall = _safe_divide(np.diagonal(confusion, axis1=1, axis2=2), support)
    # like sklearn, a class absent from the targets has no recall and is left out of the mean
    return (recall * (support > 0)).sum(1) / (support > 0).sum(1)


def _macro_f1(p: _Predictions, weights: np.ndarray) -> np.ndarray:
    confusion = _confusion(p, weights)
    true, predicted = confusion.sum(2), confusion.sum(1)
    f1 = _safe_divide(2 * np.diagonal(confusion, axis1=1, axis2=2), true + predicted)
    # sklearn's labels: every class that occurs in the targets or the predictions
    labels = (true > 0) | (predicted > 0)
    return (f1 * labels).sum(1) / labels.sum(1)


def _binary_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC: the share of (positive, negative) pairs where the positive scores higher, ties
    counted half, on the sample where image i appears weights[i] times. Each positive's rank among the sorted
    negatives says which negatives lie below it and which tie with it, so one running sum of the negatives'
    weights serves every row of weights at once. NaN where a row lacks either class."""
    negative_images = np.flatnonzero(~positive)
    negative_images = negative_images[np.argsort(scores[negative_images], kind="stable")]
    positive_images = np.flatnonzero(positive)
    negative_scores = scores[negative_images]
    below = np.searchsorted(negative_scores, scores[positive_images], side="left")
    not_above = np.searchsorted(negative_scores, scores[positive_images], side="right")
    negatives_up_to = np.zeros((len(weights), len(negative_images) + 1))
    np.cumsum(weights[:, negative_images], axis=1, out=negatives_up_to[:, 1:])
    positive_weights = weights[:, positive_images]
    # below + half the ties = (negatives below + negatives not above) / 2
    wins = (positive_weights * (negatives_up_to[:, below] + negatives_up_to[:, not_above])).sum(1) / 2
    pairs = positive_weights.sum(1) * negatives_up_to[:, -1]
    return np.where(pairs > 0, _safe_divide(wins, pairs), np.nan)


def _roc_auc(p: _Predictions, weights: np.ndarray) -> np.ndarray:
    per_class = np.stack([_binary_auc(p.probs[:, c], p.targets == c, weights) for c in range(p.classes)])
    counted = ~np.isnan(per_class)
    # macro one-vs-rest over the classes that have both positives and negatives; NaN when none has
    total = np.where(counted, per_class, 0).sum(0)
    return np.where(counted.any(0), total / np.maximum(counted.sum(0), 1), np.nan)


def _log_loss(p: _Predictions, weights: np.ndarray) -> np.ndarray:
    target_prob = p.probs[np.arange(len(p.targets)), p.targets]
    return weights @ -np.log(np.maximum(target_prob, LOG_LOSS_FLOOR)) / weights.sum(1)


def _bin_of(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins (lower, upper] on [0, 1], as in Guo et al.; a confidence of exactly 0 joins the first."""
    edges = np.linspace(0, 1, bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)


def _ece(p: _Predictions, weights: np.ndarray) -> np.ndarray:
    confidence = p.probs.max(1)
    # share x |accuracy - confidence| of a bin is |sum of (right - confidence)| over the bin / all images
    gaps = _group_sums(weights, _bin_of(confidence, ECE_BINS), ECE_BINS, (p.predicted == p.targets) - confidence)
    return np.abs(gaps).sum(1) / weights.sum(1)


_BATCHED: dict[str, Callable[[_Predictions, np.ndarray], np.ndarray]] = {
    "accuracy": _accuracy,
    "balanced_accuracy": _balanced_accuracy,
    "macro_f1": _macro_f1,
    "roc_auc": _roc_auc,
    "log_loss": _log_loss,
    "ece": _ece,
}


def _unweighted(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def metric(targets: np.ndarray, probs: np.ndarray) -> float:
        p = _predictions(targets, probs)
        return float(_BATCHED[name](p, np.ones((1, len(p.targets))))[0])

    metric.__name__ = metric.__qualname__ = name
    return metric


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {name: _unweighted(name) for name in _BATCHED}
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True, "balanced_accuracy": True, "macro_f1": True, "roc_auc": True, "log_loss": False, "ece": False,
}
LABELS: dict[str, str] = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro-F1",
    "roc_auc": "ROC AUC (macro, one-vs-rest)",
    "log_loss": "log loss",
    "ece": "expected calibration error",
}


def score(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Every metric in METRICS on one set of predictions (images x classes)."""
    p = _predictions(targets, probs)
    ones = np.ones((1, len(p.targets)))
    return {name: float(batched(p, ones)[0]) for name, batched in _BATCHED.items()}


def per_class(targets: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support of every class 0..C-1 (0 where undefined, as sklearn's zero_division=0)."""
    p = _predictions(targets, probs)
    confusion = _confusion(p, np.ones((1, len(p.targets))))[0]
    right, true, predicted = np.diagonal(confusion), confusion.sum(1), confusion.sum(0)
    return {"precision": _safe_divide(right, predicted), "recall": _safe_divide(right, true),
            "f1": _safe_divide(2 * right, true + predicted), "support": true.astype(np.int64)}


# ---- bootstrap over images ----------------------------------------------------------------------------------------

def _as_repeats(targets: np.ndarray, probs: np.ndarray) -> list[_Predictions]:
    """images x C -> one set of predictions; repeats x images x C -> one per repeat, all of the same images."""
    probs = np.asarray(probs)
    return [_predictions(targets, r) for r in (probs if probs.ndim == 3 else probs[None])]


def _draw_indices(units: int, resamples: int, seed: int) -> np.ndarray:
    """resamples x units indices drawn with replacement; one draw per call, so a seed fixes every resample."""
    return np.random.default_rng(seed).integers(0, units, (resamples, units))


def _counts(indices: np.ndarray, units: int) -> np.ndarray:
    """How often each unit was drawn in each resample (rows of indices -> rows of weights)."""
    offsets = np.arange(len(indices))[:, None] * units
    return np.bincount((indices + offsets).ravel(), minlength=indices.size).reshape(len(indices), units)


def _units(groups: np.ndarray | None, images: int) -> np.ndarray:
    """The resampled unit of each image: its group's number (in order of first appearance), or the image itself.

    Pictures of one patient, one object or one session are not independent: resampling them one by one treats
    them as if they were and gives intervals that are too narrow. Drawing whole groups keeps what a group shares
    inside every resample (the cluster bootstrap). When every group holds one image, the units are 0..n-1 in
    order and the draws are exactly those of the image bootstrap."""
    if groups is None:
        return np.arange(images)
    groups = np.asarray(groups)
    if groups.shape != (images,):
        raise PipelineError(f"groups must give one group per image ({images}); got shape {groups.shape}")
    _, first, codes = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # renumber groups by first appearance
    return order[codes.reshape(-1)]


def _over_repeats(repeats: list[_Predictions], name: str, weights: np.ndarray) -> np.ndarray:
    """The metric for each row of weights, averaged over the repeats."""
    return np.mean([_BATCHED[name](p, weights) for p in repeats], axis=0)


def _bootstrap_draws(repeats: list[_Predictions], names: list[str], indices: np.ndarray,
                     units: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric on each resample: the mean over repeats of the metric on the drawn units' images (an image
    weighs as often as its unit was drawn)."""
    count = int(units.max()) + 1 if len(units) else 0
    one_per_image = np.array_equal(units, np.arange(len(units)))  # the image bootstrap: weights need no gathering
    draws = {name: np.empty(len(indices)) for name in names}
    chunk = max(1, RESAMPLE_CHUNK // max(len(units), 1))
    for start in range(0, len(indices), chunk):
        counts = _counts(indices[start:start + chunk], count)
        weights = (counts if one_per_image else counts[:, units]).astype(np.float64)
        for name in names:
            draws[name][start:start + chunk] = _over_repeats(repeats, name, weights)
    return draws


def _percentile_interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of the draws, leaving out NaN ones (a resample where ROC AUC has no class to score)."""
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise PipelineError(f"confidence must lie strictly between 0 and 1 (e.g. 0.95); got {confidence}")


def bootstrap_intervals(targets: np.ndarray, probs: np.ndarray, confidence: float = 0.95, resamples: int = 1000,
                        seed: int = 0, groups: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric, resampling groups of images (or images, without `groups`)
    with replacement (seeded, so a report is reproducible). `probs` is images x C, or repeats x images x C for the
    same images predicted in several CV repeats: a resample draws the groups once and scores each repeat on their
    images, so repeats narrow the interval only as far as they agree."""
    _check_confidence(confidence)
    repeats = _as_repeats(targets, probs)
    units = _units(groups, len(repeats[0].targets))
    indices = _draw_indices(int(units.max()) + 1 if len(units) else 0, resamples, seed)
    draws = _bootstrap_draws(repeats, list(METRICS), indices, units)
    return {name: _percentile_interval(values, confidence) for name, values in draws.items()}


# ---- across folds: Nadeau & Bengio's corrected resampled t --------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """B against A: difference (B - A) of a metric, its interval and the two-sided p-value of 'no difference'."""

    difference: float
    low: float
    high: float
    p_value: float


def _corrected_standard_error(values: np.ndarray, test_train_ratio: float) -> float:
    """Fold scores share most of their training images, so they are positively correlated and the plain s^2/J
    underestimates the variance of their mean; Nadeau & Bengio (2003) add n_test/n_train to 1/J to make up for it."""
    if test_train_ratio < 0:
        raise PipelineError(f"test_train_ratio is n_test / n_train and cannot be negative; got {test_train_ratio}")
    if np.ptp(values) == 0:
        return 0.0  # tied folds: the rounded mean of equal floats can leave a variance of 1e-35 instead of 0
    return float(np.sqrt((1 / len(values) + test_train_ratio) * values.var(ddof=1)))


def corrected_t_interval(values: list[float] | np.ndarray, test_train_ratio: float,
                         confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of J per-fold scores (J = repeats x folds) with the corrected resampled t interval, t on
    J - 1 degrees of freedom. One fold has no spread to estimate: (score, nan, nan). Folds that tie exactly (few
    validation images per fold) give a zero-width interval; the bootstrap over images does not have that flaw."""
    _check_confidence(confidence)
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * _corrected_standard_error(values, test_train_ratio)
    return mean, float(mean - half), float(mean + half)


def corrected_t_test(diffs: list[float] | np.ndarray, test_train_ratio: float, confidence: float = 0.95) -> Comparison:
    """Paired test across folds: diffs are B's score minus A's on the same folds (J of them); the corrected
    resampled t statistic, two-sided, with the matching interval of the mean difference."""
    diffs = np.asarray(diffs, dtype=np.float64)
    mean, low, high = corrected_t_interval(diffs, test_train_ratio, confidence)
    if len(diffs) < 2:
        return Comparison(mean, low, high, float("nan"))
    error = _corrected_standard_error(diffs, test_train_ratio)
    if error == 0:
        # Every fold gave the same difference, so t is 0/0 or +-inf. Take the limits: no difference in any fold
        # is no evidence against 'no difference' (p = 1); the same nonzero difference in every fold is the
        # strongest evidence the folds can give (p = 0). This mostly happens with few images per fold, where
        # scores move in coarse steps: read p = 0 next to the bootstrap, which sees the images.
        return Comparison(mean, low, high, 1.0 if mean == 0 else 0.0)
    p_value = 2 * stats.t.sf(abs(mean / error), len(diffs) - 1)
    return Comparison(mean, low, high, float(p_value))


# ---- paired bootstrap over images ---------------------------------------------------------------------------------

def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise PipelineError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def _bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p of 'no difference' from the resampled differences: twice the smaller tail share, each with
    the +1 of Davison & Hinkley so that a finite number of resamples never claims p = 0."""
    differences = differences[~np.isnan(differences)]
    if not len(differences):
        return float("nan")
    if not differences.any():
        return 1.0  # identical predictions on every resample: nothing to tell the variants apart
    tails = [(np.sum(differences <= 0) + 1) / (len(differences) + 1),
             (np.sum(differences >= 0) + 1) / (len(differences) + 1)]
    return float(min(1.0, 2 * min(tails)))


def paired_bootstrap(targets: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, metric: str = "accuracy",
                     confidence: float = 0.95, resamples: int = 1000, seed: int = 0,
                     groups: np.ndarray | None = None) -> Comparison:
    """metric(B) - metric(A) on the same images, with its percentile bootstrap interval and two-sided p-value.
    Both variants are scored on the same resampled groups of images (or images, without `groups`), so what the
    images have in common (easy and hard ones) cancels and only their disagreements count. probs may carry a
    leading repeats axis."""
    _check_metric(metric)
    _check_confidence(confidence)
    a, b = _as_repeats(targets, probs_a), _as_repeats(targets, probs_b)
    if a[0].probs.shape != b[0].probs.shape:
        raise PipelineError(f"variants A and B must predict the same images and classes; got {a[0].probs.shape} "
                            f"and {b[0].probs.shape}")
    ones = np.ones((1, len(a[0].targets)))
    difference = float(_over_repeats(b, metric, ones)[0] - _over_repeats(a, metric, ones)[0])
    units = _units(groups, len(a[0].targets))
    indices = _draw_indices(int(units.max()) + 1 if len(units) else 0, resamples, seed)
    draws = (_bootstrap_draws(b, [metric], indices, units)[metric]
             - _bootstrap_draws(a, [metric], indices, units)[metric])
    low, high = _percentile_interval(draws, confidence)
    return Comparison(difference, low, high, _bootstrap_p_value(draws))


def holm(p_values: list[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values in the input order: the k-th smallest of m is multiplied by m - k + 1,
    then made monotone and capped at 1. NaN stays NaN and does not count towards m."""
    p_values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p_values.shape, np.nan)
    present = np.flatnonzero(~np.isnan(p_values))
    order = present[np.argsort(p_values[present], kind="stable")]
    scaled = p_values[order] * (len(order) - np.arange(len(order)))
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled)) if len(order) else scaled
    return adjusted


# ---- figures' numbers ---------------------------------------------------------------------------------------------

def reliability(targets: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Per non-empty equal-width bin of the top probability: mean confidence, accuracy and image count, the
    points of a reliability diagram (a calibrated model lies on the diagonal)."""
    p = _predictions(targets, probs)
    confidence = p.probs.max(1)
    which = _bin_of(confidence, bins)
    count = np.bincount(which, minlength=bins)
    filled = count > 0
    return {"confidence": np.bincount(which, confidence, bins)[filled] / count[filled],
            "accuracy": np.bincount(which, p.predicted == p.targets, bins)[filled] / count[filled],
            "count": count[filled]}


def _drop_straight_runs(fps: np.ndarray, tps: np.ndarray) -> np.ndarray:
    """Which points to keep: those not in the middle of a run of equal steps, which adds nothing to the drawn
    line (sklearn's drop_intermediate, so our curve matches roc_curve's)."""
    if len(fps) <= 2:
        return np.ones(len(fps), dtype=bool)
    return np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]


def _evenly(count: int, max_points: int) -> np.ndarray:
    """At most max_points indices spread evenly over 0..count-1, always the first and the last."""
    if count <= max_points:
        return np.arange(count)
    return np.unique(np.round(np.linspace(0, count - 1, max(max_points, 2))).astype(int))


def roc_points(targets: np.ndarray, probs: np.ndarray, max_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Micro-averaged one-vs-rest ROC curve (fpr, tpr) from (0, 0) to (1, 1): every (image, class) pair is one
    binary decision scored by that class's probability. Thinned to at most max_points points for plotting."""
    p = _predictions(targets, probs)
    truth = (p.targets[:, None] == np.arange(p.classes)).ravel()
    scores = p.probs.ravel()
    order = np.argsort(-scores, kind="stable")
    scores, truth = scores[order], truth[order]
    # one point per distinct threshold: the last position of each run of equal scores
    ends = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]
    tps = np.cumsum(truth)[ends]
    fps = (ends + 1) - tps
    keep = _drop_straight_runs(fps, tps)
    fpr = np.r_[0, fps[keep]] / max(fps[-1], 1)
    tpr = np.r_[0, tps[keep]] / max(tps[-1], 1)
    chosen = _evenly(len(fpr), max_points)
    return fpr[chosen], tpr[chosen]
