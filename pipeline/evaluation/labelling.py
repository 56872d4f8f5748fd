"""What the evaluation says about the labels: which labelled images look mislabelled, and which unlabelled pool
images a person should label next.

Both come from the best variant (by CV), whose predictions deserve the most trust:
- likely label errors from its out-of-fold probabilities (pipeline/evaluation/label_quality.py, confident
  learning), averaged over repeats;
- what to label next from its fold ensemble's probabilities on the pool and from frozen pretrained features of
  the pool and the labelled images (pipeline/evaluation/label_next.py): typicality while the smallest class has
  fewer than `evaluate.cold_start` labelled images, then the ensemble's uncertainty made diverse.

Each list is a CSV a person can work through (reports/labelling/) and a grid of thumbnails in the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline.data.collected import Collected
from pipeline.evaluation.figures import thumbnails_png
from pipeline.evaluation.label_next import choose_next, margin_uncertainty
from pipeline.evaluation.label_quality import captions, likely_label_errors
from pipeline.runtime.params import EvaluateParams
from pipeline.training.probe import ImageFeatures

log = logging.getLogger(__name__)
ERRORS_FILE, NEXT_FILE = "label_errors.csv", "label_next.csv"
ERRORS_PNG, NEXT_PNG = "label_errors.png", "label_next.png"
NEXT_COLUMNS = ["rank", "index", "path", "predicted", "probability", "margin"]


@dataclass(frozen=True)
class Labelling:
    errors: pd.DataFrame  # index, path, given, suggested, given_probability, suggested_probability
    next: pd.DataFrame  # rank, index, path, predicted, probability, margin
    strategy: str  # how the next images were chosen ("" without a pool)
    figures: dict[str, bytes]  # file name -> PNG

    def summary(self) -> dict:
        """What evaluation.json and the report carry."""
        return {"label_errors": self.errors.to_dict("records"), "label_next": self.next.to_dict("records"),
                "next_strategy": self.strategy}


def label_errors(collected: Collected, oof_probs: np.ndarray) -> pd.DataFrame:
    """The labelled images whose label the out-of-fold predictions (repeats x images x classes) doubt."""
    labelled = collected.labelled
    table = likely_label_errors(labelled.target.to_numpy(), oof_probs.mean(0), collected.classes)
    rows = labelled.iloc[table.position.to_numpy()]
    return pd.concat([rows[["index", "path"]].reset_index(drop=True), table.drop(columns="position")], axis=1)


def next_to_label(collected: Collected, pool_probs: np.ndarray, params: EvaluateParams,
                  device: torch.device) -> tuple[pd.DataFrame, str]:
    """The `params.label_next` pool images most worth labelling, in order, and the strategy that chose them."""
    pool, labelled = collected.unlabelled, collected.labelled
    features = ImageFeatures(params.feature_backbone, params.feature_size, device)
    pool_features = features(collected.select(pool)[0])
    labelled_features = features(collected.select(labelled)[0])
    fewest = int(labelled.target.value_counts().min())
    n = min(params.label_next, len(pool))
    chosen, strategy = choose_next(pool_probs, pool_features, n, labelled_features, fewest, params.cold_start,
                                   params.seed)
    mean = pool_probs.mean(0)[chosen]
    rows = pool.iloc[chosen]
    columns = (np.arange(1, len(chosen) + 1), rows["index"].to_numpy(), rows.path.to_numpy(),
               [collected.classes[c] for c in mean.argmax(1)], mean.max(1).round(4),
               margin_uncertainty(pool_probs)[chosen].round(4))
    table = pd.DataFrame(dict(zip(NEXT_COLUMNS, columns)))
    return table, strategy


def review(collected: Collected, oof_probs: np.ndarray, pool_probs: np.ndarray | None, params: EvaluateParams,
           device: torch.device) -> Labelling:
    """Both lists and their thumbnail grids. `pool_probs`: fold models x pool images x classes, or None."""
    errors = label_errors(collected, oof_probs)
    shown = errors.head(params.errors_shown)
    figures = {ERRORS_PNG: thumbnails_png(collected.images[shown["index"].to_numpy()], captions(shown))}
    next_table, strategy = pd.DataFrame(columns=NEXT_COLUMNS), ""
    if pool_probs is not None and len(collected.unlabelled) and params.label_next:
        next_table, strategy = next_to_label(collected, pool_probs, params, device)
        figures[NEXT_PNG] = thumbnails_png(collected.images[next_table["index"].to_numpy()],
                                           [f"#{r.rank} {r.predicted}? ({r.probability:.2f})"
                                            for r in next_table.itertuples()])
    log.info("labelling: %d likely label errors; %d pool images to label next (%s)", len(errors), len(next_table),
             strategy or "no pool")
    return Labelling(errors, next_table, strategy, figures)
