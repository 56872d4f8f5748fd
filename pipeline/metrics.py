"""Metrics by name (a dict, not branches), intervals across folds, and the confusion-matrix figure."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

from pipeline import atomic

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy_score,
    "balanced_accuracy": balanced_accuracy_score,
    "macro_f1": lambda y, p: f1_score(y, p, average="macro", zero_division=0),
}


def score(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    predicted = probs.argmax(1)
    return {name: float(fn(targets, predicted)) for name, fn in METRICS.items()}


BOOTSTRAP_RESAMPLES = 2000


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over folds. No interval: with a handful of validation images per
    fold the folds often tie (std 0), and a t-interval over them would claim a certainty the data lacks; the
    report's interval is the bootstrap over images instead."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def bootstrap_accuracy(targets: np.ndarray, probs: np.ndarray, confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy, resampling images with replacement (seeded, so the report
    is reproducible). `probs` is images x classes, or repeats x images x classes: an image drawn counts with
    its share of correct predictions over the repeats, so repeats narrow the interval only as far as they
    agree."""
    correct = (probs.argmax(-1) == targets).astype(np.float64)
    if correct.ndim == 2:
        correct = correct.mean(0)
    rng = np.random.default_rng(seed)
    draws = correct[rng.integers(0, len(correct), (BOOTSTRAP_RESAMPLES, len(correct)))].mean(1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def save_confusion(path: Path, targets: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], title: str) -> None:
    """A row-normalised confusion matrix with counts, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion_matrix(targets, probs.argmax(1), labels=range(len(classes)))
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = 2 + 0.45 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(counts):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic.write_bytes(path, buffer.getvalue())
