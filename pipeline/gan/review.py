"""What a person looks at to judge a fold's GAN: its loss and augmentation-strength curves, and its samples by
class with the rejected ones dimmed.
"""

from __future__ import annotations

import io

import numpy as np

from pipeline.gan.conditional import sample_grid

GRID_COLUMNS = 10  # samples shown per class


def curves_png(history: list[dict]) -> bytes:
    """Losses and augmentation strength against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (losses, strength) = plt.subplots(1, 2, figsize=(9, 3), dpi=100)
    for key in ("loss_d", "loss_g"):
        losses.plot(steps, [h[key] for h in history], label=key)
    losses.set(xlabel="step", title="hinge losses")
    losses.legend()
    strength.plot(steps, [h["p"] for h in history], label="p (augmentation probability)")
    strength.plot(steps, [np.nan if h["r"] is None else h["r"] for h in history], label="r = E[sign D(real)]")
    strength.set(xlabel="step", ylim=(-1.05, 1.05), title="adaptive augmentation")
    strength.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def review_grid(fake: np.ndarray, labels: np.ndarray, scores: np.ndarray, kept: np.ndarray, classes: int) -> np.ndarray:
    """A row per class, its best-scoring candidates first; the ones the filter rejected are dimmed."""
    shown = fake.copy()
    rejected = np.ones(len(fake), bool)
    rejected[kept] = False
    shown[rejected] = (shown[rejected] * 0.3).astype(np.uint8)
    order = np.lexsort((-scores, labels))
    return sample_grid(shown[order], labels[order], classes, GRID_COLUMNS)
