"""The label-scarcity curve's draws: a fixed test set, then N images per class, nested (the 5 of a class are among
its 10), with folds over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.data.collected import Collected
from pipeline.data.folds import ImpossibleFolds, assign_folds
from pipeline.data.sources import BUNDLED
from pipeline.runtime.params import ScarcityParams


@dataclass(frozen=True)
class Draw:
    train: np.ndarray  # manifest indices of the drawn images, n per class
    folds: np.ndarray  # repeats x drawn images: each image's validation fold in that repeat
    test: np.ndarray  # manifest indices of the fixed test set


class NotEnoughImages(Exception):
    """A point asks for more images of a class than the data has."""


def test_and_pool(collected: Collected, params: ScarcityParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(test rows, drawable external rows): `holdout` external images (0 = all of them) drawn first; a bundled
    dataset's other external images may be drawn for training, unless they are near-duplicates of a test image."""
    external = collected.external
    rng = np.random.default_rng(params.seed)
    if params.holdout and params.holdout < len(external):
        test = external.iloc[np.sort(rng.choice(len(external), params.holdout, replace=False))]
    else:
        test = external
    rest = external.drop(test.index)
    pool = rest[rest.source.isin(set(BUNDLED)) & ~rest.group.isin(set(test.group))]
    return test, pool


def class_orders(collected: Collected, pool: pd.DataFrame, seed: int) -> dict[int, np.ndarray]:
    """Per class, the order in which images are drawn: labelled ones first, then the pool, each seeded-shuffled."""
    rng = np.random.default_rng(seed + 1)
    targets = collected.manifest.target.to_numpy()
    sources = [rows["index"].to_numpy() for rows in (collected.labelled, pool)]
    return {target: np.concatenate([rng.permutation(p[targets[p] == target]) for p in sources])
            for target in range(len(collected.classes))}


def draw_folds(collected: Collected, train: np.ndarray, seed: int) -> np.ndarray:
    """repeats x drawn images: collect's k and repeats, drawn as collect draws them (pipeline/data/folds.py)."""
    rows = collected.manifest.iloc[train]
    try:
        return assign_folds(rows.target, rows.group, len(collected.folds), seed, collected.repeats)
    except ImpossibleFolds as why:  # this point cannot be cross-validated; the curve records it as not run
        raise NotEnoughImages(str(why)) from None


def draw(collected: Collected, params: ScarcityParams, n: int) -> Draw:
    if n < len(collected.folds):
        raise NotEnoughImages(f"{n} images per class cannot give each of the {len(collected.folds)} folds one")
    test, pool = test_and_pool(collected, params)
    orders = class_orders(collected, pool, params.seed)
    short = {collected.classes[t]: len(order) for t, order in orders.items() if len(order) < n}
    if short:
        name, have = min(short.items(), key=lambda kv: kv[1])
        raise NotEnoughImages(f"class {name!r} has {have} images to draw from, fewer than {n}")
    train = np.sort(np.concatenate([order[:n] for order in orders.values()]))
    return Draw(train, draw_folds(collected, train, params.seed), test["index"].to_numpy())
