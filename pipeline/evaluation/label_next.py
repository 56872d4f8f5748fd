"""What to label next: which images of an unlabelled pool would most help the classifier once a person labels them.

Two strategies, because the answer changes with the budget (Hacohen, Dekel & Weinshall, "Active Learning on a
Budget: Opposite Strategies Suit High and Low Budgets", ICML 2022):

- `typical_choice` (their TypiClust), for few labels: a model trained on a handful of images is too poor for its
  uncertainty to mean much, so label the images that best represent the data instead. Cluster pool and labelled
  features into (labelled + n) clusters, then repeatedly take the largest cluster that holds no labelled or
  already chosen image and choose its most typical image (1 / mean distance to its k nearest neighbours in the
  cluster). Large uncovered clusters are the common kinds of image nobody has labelled yet.
- `uncertain_diverse_choice`, once the model is decent: the images its fold ensemble is least sure about, spread
  over feature space (Zhdanov, "Diverse mini-batch Active Learning", 2019): take the `candidates * n` most
  uncertain, cluster them into n clusters, choose the most uncertain of each, so that a batch is not n near-copies
  of one confusing shape.

`choose_next` switches from the first to the second once the smallest class has `cold_start` labelled images.
Features are L2-normalised first: pooled CNN features differ in norm more than in direction.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.neighbors import NearestNeighbors

from pipeline.runtime.errors import PipelineError
from pipeline.training.probe import unit_rows

FULL_KMEANS_UP_TO = 50  # clusters; beyond, MiniBatchKMeans (as TypiClust's own code does), since KMeans gets slow


def _checked(name: str, values: np.ndarray, ndims: tuple[int, ...]) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in ndims:
        raise PipelineError(f"{name} must have {' or '.join(map(str, ndims))} dimensions; got shape {values.shape}")
    if not np.isfinite(values).all():
        raise PipelineError(f"{name} holds NaN or infinite values: recompute them before choosing images to label")
    return values


def _check_n(n: int) -> None:
    if n < 1:
        raise PipelineError(f"n is the number of images to choose and must be at least 1; got {n}")


def _clusters(features: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A cluster id per row. Seeded, and one k-means++ start: the clusters only need to be reasonable, not best."""
    kind = KMeans if count <= FULL_KMEANS_UP_TO else MiniBatchKMeans
    return kind(n_clusters=count, n_init=1, random_state=seed).fit_predict(features)


def _most_typical(features: np.ndarray, k: int) -> int:
    """Row of the densest point: smallest mean distance to its k nearest neighbours (itself excluded)."""
    k = min(k, len(features) - 1)
    if k < 1:
        return 0
    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    return int(np.argmin(distances[:, 1:].mean(1)))  # argmax of typicality 1 / mean distance


def typical_choice(features: np.ndarray, n: int, labelled_features: np.ndarray | None = None, k: int = 20,
                   seed: int = 0) -> np.ndarray:
    """n distinct pool indices, in choice order, by TypiClust (module docstring); all of them if n >= pool size."""
    pool = _checked("features", features, (2,))
    labelled = _checked("labelled_features", np.zeros((0, pool.shape[1])) if labelled_features is None
                        else labelled_features, (2,))
    _check_n(n)
    if labelled.shape[1] != pool.shape[1]:
        raise PipelineError(f"labelled_features have {labelled.shape[1]} dimensions, the pool's {pool.shape[1]}: "
                            "both must come from the same feature extractor")
    if n >= len(pool):
        return np.arange(len(pool))
    ids = _clusters(unit_rows(np.concatenate([labelled, pool])), len(labelled) + n, seed)
    covered, pool_ids = set(ids[:len(labelled)].tolist()), ids[len(labelled):]
    sizes = np.bincount(pool_ids, minlength=ids.max() + 1)
    chosen: list[int] = []
    while len(chosen) < n:
        # uncovered clusters first, largest first; if k-means left fewer than n (duplicate images), covered ones
        left = np.bincount(pool_ids, minlength=len(sizes)) - np.bincount(pool_ids[chosen], minlength=len(sizes))
        order = sorted(np.flatnonzero(left), key=lambda c: (c in covered, -sizes[c], c))
        members = np.flatnonzero(pool_ids == order[0])
        members = members[~np.isin(members, chosen)]
        chosen.append(int(members[_most_typical(unit_rows(pool[members]), k)]))
        covered.add(order[0])
    return np.array(chosen)


def margin_uncertainty(probs: np.ndarray) -> np.ndarray:
    """Per image, the top class's mean probability minus the runner-up's (smaller = less sure). The margin, not
    the entropy: with 10 classes entropy mostly measures the tail, the margin the decision between the two
    classes that matter. Averaging the fold models first makes their disagreement count too: models that
    disagree give a flatter mean, and so a smaller margin."""
    mean = probs.mean(0) if probs.ndim == 3 else probs
    top_two = np.sort(mean, axis=1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


def uncertain_diverse_choice(probs: np.ndarray, features: np.ndarray, n: int, candidates: int = 10,
                             seed: int = 0) -> np.ndarray:
    """n distinct pool indices, the most uncertain of each of n feature clusters among the candidates * n most
    uncertain, most uncertain first. probs: models x N x C (a fold ensemble), or N x C."""
    probs, pool = _checked("probs", probs, (2, 3)), _checked("features", features, (2,))
    _check_n(n)
    if probs.shape[-2] != len(pool):
        raise PipelineError(f"probs are for {probs.shape[-2]} images, features for {len(pool)}: both must be of the "
                            "same pool, in the same order")
    if candidates < 1:
        raise PipelineError(f"candidates is a multiple of n and must be at least 1; got {candidates}")
    by_uncertainty = np.argsort(margin_uncertainty(probs), kind="stable")
    if n >= len(pool):
        return by_uncertainty
    shortlist = by_uncertainty[:min(candidates * n, len(pool))]
    ids = _clusters(unit_rows(pool[shortlist]), n, seed)
    _, first = np.unique(ids, return_index=True)  # the shortlist is sorted, so a cluster's first is its most uncertain
    chosen = shortlist[np.sort(first)]
    if len(chosen) < n:  # fewer clusters than asked (duplicate images): fill with the next most uncertain
        chosen = np.concatenate([chosen, shortlist[~np.isin(shortlist, chosen)][:n - len(chosen)]])
    return chosen


def _random(probs, features, n, labelled_features, seed):
    return np.random.default_rng(seed).permutation(len(features))[:n]


def _typicality(probs, features, n, labelled_features, seed):
    return typical_choice(features, n, labelled_features, seed=seed)


def _uncertainty(probs, features, n, labelled_features, seed):
    if probs is None:
        raise PipelineError("uncertainty needs the fold models' probabilities on the pool; got none")
    return uncertain_diverse_choice(probs, features, n, seed=seed)


# name -> fn(probs, features, n, labelled_features, seed); random is the baseline that every strategy must beat
STRATEGIES = {"random": _random, "typicality": _typicality, "uncertainty_diversity": _uncertainty}


def choose_next(probs: np.ndarray | None, features: np.ndarray, n: int, labelled_features: np.ndarray | None,
                labelled_per_class: int, cold_start: int, seed: int) -> tuple[np.ndarray, str]:
    """(pool indices, strategy's name): typicality while the smallest class has fewer than `cold_start` labelled
    images (`labelled_per_class`), where a model's uncertainty is not yet worth trusting; uncertainty + diversity
    after."""
    name = "typicality" if labelled_per_class < cold_start else "uncertainty_diversity"
    return STRATEGIES[name](probs, features, n, labelled_features, seed), name
