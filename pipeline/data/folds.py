"""Cross-validation folds: stratified by class and grouped, so near-duplicates and a CSV's groups never span two
folds. The one place folds are drawn: collect's folds over the labelled images and the label-scarcity curve's
folds over each draw both come from `assign_folds`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.runtime.errors import PipelineError

REPEAT_SEED_STRIDE = 1000  # repeat r shuffles with seed + 1000 r: repeats differ, and each is reproducible alone


class ImpossibleFolds(PipelineError):
    """The groups cannot be spread over k folds so that every fold validates on something and trains on every
    class."""


def check_group_counts(labelled: pd.DataFrame, k: int) -> None:
    """Each class needs at least k groups, or some fold would have no validation picture of it."""
    groups = labelled.groupby("label").group.nunique()
    for label, count in groups.items():
        if count < k:
            size = (labelled.label == label).sum()
            raise PipelineError(f"class {label!r} has {size} distinct images in {count} groups (near-duplicates and "
                                f"CSV groups count once) but collect.folds asks for {k} folds: add pictures to "
                                f"{label!r}, or use at most {count} folds "
                                f"(collect.folds: {list(range(max(count, 2)))})")


def assign_folds(labels: pd.Series, groups: pd.Series, k: int, seed: int, repeats: list[int]) -> np.ndarray:
    """repeats x images: each image's validation fold in each repeat, stratified by label and grouped by `groups`
    (a group never spans two folds). Raises ImpossibleFolds when a fold would be empty or train on no picture of
    some class."""
    if groups.nunique() < k:  # StratifiedGroupKFold's own ValueError would not say what to do
        raise ImpossibleFolds(f"the {len(labels)} images form {groups.nunique()} near-duplicate groups, too few for "
                              f"{k} folds; use fewer folds")
    folds = np.full((len(repeats), len(labels)), -1, dtype=np.int64)
    for row, repeat in enumerate(repeats):
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + REPEAT_SEED_STRIDE * repeat)
        for fold, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            folds[row, val] = fold
        _check_folds(np.asarray(labels), folds[row], k)
    return folds


def dev_part(labels: pd.Series, groups: pd.Series, fraction: float, seed: int) -> np.ndarray:
    """Which external images form the development part (True) rather than the final test (False): about
    `fraction` of them, stratified by label and grouped, so near-duplicates never sit on both sides. The share is
    the nearest 1/k (k folds of StratifiedGroupKFold, one or k-1 of them the development part), so 0.5 is exact."""
    chosen = np.zeros(len(labels), dtype=bool)
    if fraction <= 0 or groups.nunique() < 2:
        return chosen
    small = min(fraction, 1 - fraction)
    k = int(min(max(2, round(1 / small)), groups.nunique()))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    first = next(iter(splitter.split(np.zeros(len(labels)), labels, groups)))[1]
    chosen[first] = True
    return chosen if fraction <= 0.5 else ~chosen


def _check_folds(labels: np.ndarray, folds: np.ndarray, k: int) -> None:
    """Every fold validates on something and trains on every class, or ImpossibleFolds."""
    for fold in range(k):
        if not (folds == fold).any():  # a few large groups that cannot be spread evenly
            raise ImpossibleFolds(f"fold {fold} would validate on no image: the groups cannot be spread over {k} "
                                  "folds; use fewer folds")
        missing = set(labels.tolist()) - set(labels[folds != fold].tolist())  # plain ints and strs, for the message
        if missing:  # only possible with groups mixing labels; a model could not learn the class
            raise ImpossibleFolds(f"fold {fold} would train on no picture of {sorted(missing)}: its groups are too "
                                  "large; use fewer folds, or split the CSV groups")
