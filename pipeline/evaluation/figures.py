"""The evaluate stage's figures, each returned as PNG bytes (the report embeds them; DVC shows them as plots).

Colours follow one rule everywhere: a variant keeps its colour in every figure, in params order."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def colour(names: Sequence[str], name: str) -> str:
    return PALETTE[list(names).index(name) % len(PALETTE)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return buffer.getvalue()


def confusion_png(counts: np.ndarray, classes: Sequence[str], title: str) -> bytes:
    """A row-normalised confusion matrix with the counts written in."""
    plt = _pyplot()
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
    return _png(fig)


MARKERS = ("x", "+", "1")


def intervals_png(rows: Sequence[tuple[str, float, float, float]], names: Sequence[str], xlabel: str,
                  marks: dict[str, dict[str, float]] | None = None) -> bytes:
    """Each variant's estimate (name, value, low, high) as a dot with its interval, best at the top; `marks` adds,
    per label, a marker at each variant's score elsewhere (the external images' parts)."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r[1])
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.45 * len(rows)))
    for y, (name, value, low, high) in enumerate(rows):
        ax.errorbar(value, y, xerr=[[value - low], [high - value]], fmt="o", color=colour(names, name), capsize=4)
    for marker, (label, values) in zip(MARKERS, (marks or {}).items()):
        ys = [y for y, row in enumerate(rows) if row[0] in values]
        ax.plot([values[rows[y][0]] for y in ys], ys, marker, color="black", markersize=8, linestyle="none",
                label=label)
    ax.set(yticks=range(len(rows)), yticklabels=[r[0] for r in rows], xlabel=xlabel)
    ax.grid(axis="x", alpha=0.3)
    if marks:
        ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def differences_png(rows: Sequence[tuple[str, float, float, float, bool]], xlabel: str) -> bytes:
    """Paired differences (label, difference, low, high, significant): filled when significant, hollow when not,
    around a line at zero."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.45 * len(rows)))
    for y, (label, diff, low, high, significant) in enumerate(reversed(rows)):
        tint = ("#2ca02c" if diff > 0 else "#d62728") if significant else "#7f7f7f"
        ax.errorbar(diff, y, xerr=[[diff - low], [high - diff]], fmt="o", color=tint, capsize=4,
                    markerfacecolor=tint if significant else "white")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(yticks=range(len(rows)), yticklabels=[r[0] for r in reversed(rows)], xlabel=xlabel)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def scarcity_png(curves: dict[str, list[dict]], names: Sequence[str], level: str) -> bytes:
    """Accuracy against labelled images per class: out-of-fold with its interval (solid) and the fold models on
    the fixed test set (dashed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        points = [p for p in points if "oof_accuracy" in p]
        if not points:
            continue
        n = np.array([p["images_per_class"] for p in points])
        acc = np.array([p["oof_accuracy"] for p in points])
        err = np.array([[p["oof_accuracy"] - p["oof_accuracy_low"], p["oof_accuracy_high"] - p["oof_accuracy"]]
                        for p in points]).T
        tint = colour(names, name)
        ax.errorbar(n, acc, yerr=err, fmt="o-", color=tint, capsize=4, label=f"{name}: cross-validation ({level})")
        test = [p.get("test_accuracy_fold_mean") for p in points]
        if all(t is not None for t in test):
            ax.plot(n, test, "s--", color=tint, alpha=0.6, label=f"{name}: fixed test set")
    sizes = sorted({p["images_per_class"] for points in curves.values() for p in points})
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.xaxis.set_minor_locator(plt.matplotlib.ticker.NullLocator())
    ax.set(xlabel="labelled images per class", ylabel="accuracy", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def reliability_png(bins: dict[str, dict[str, np.ndarray]], names: Sequence[str]) -> bytes:
    """Reliability diagram: accuracy against confidence per bin, one line per variant; the diagonal is perfect
    calibration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ":", color="black", linewidth=1, label="calibrated")
    for name, b in bins.items():
        ax.plot(b["confidence"], b["accuracy"], "o-", color=colour(names, name), label=name, markersize=4)
    ax.set(xlabel="confidence (top class probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8)
    return _png(fig)


def roc_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], names: Sequence[str]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ":", color="black", linewidth=1)
    for name, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, color=colour(names, name), label=name)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def training_png(curves: dict[str, np.ndarray], names: Sequence[str]) -> bytes:
    """Training loss per epoch (mean over the folds) for every fully fine-tuned variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, loss in curves.items():
        ax.plot(np.arange(1, len(loss) + 1), loss, color=colour(names, name), label=name)
    ax.set(xlabel="epoch", ylabel="training loss (mean over folds)", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def thumbnails_png(images: np.ndarray, captions: Sequence[str], columns: int = 8) -> bytes:
    """A grid of uint8 N x H x W x C images, each under a short caption (a label check, a pool image to label);
    an empty list gives a one-line "none" picture, so a report's section is never a broken image."""
    plt = _pyplot()
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.55 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
                  vmin=0, vmax=255)
        ax.set_title(caption, fontsize=6.5)
    if not len(images):
        axes.flat[0].text(0, 0.5, "none", fontsize=9)
    return _png(fig)
