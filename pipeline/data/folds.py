"""Cross-validation folds: stratified by class and grouped, so near-duplicates and a CSV's groups never span two
folds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.runtime.errors import PipelineError


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


def assign_folds(labelled: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    """Stratified by label, grouped by `group`: a group never spans two folds."""
    folds = np.empty(len(labelled), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, val) in enumerate(splitter.split(np.zeros(len(labelled)), labelled.label, labelled.group)):
        folds[val] = fold
    for fold in range(k):
        missing = set(labelled.label) - set(labelled.label[folds != fold])
        if missing:  # only possible with groups mixing labels; a model could not learn the class
            raise PipelineError(f"fold {fold} would train on no picture of {sorted(missing)}: its groups are too "
                                "large; use fewer folds, or split the CSV groups")
    return folds
