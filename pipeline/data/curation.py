"""From what a source offered to the dataset: label conflicts, exact copies collapsed, near-duplicate groups, the
labelled draw of a bundled dataset, test images that leak (and pool images that would), folds, and the count
that proves nothing was lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.data.collected import CV, DEV, EXTERNAL, LABELLED, TEST, UNLABELLED, fold_column, natural_key
from pipeline.data.decode import hamming_pairs, pixel_sha256
from pipeline.data.folds import assign_folds, check_group_counts, dev_part
from pipeline.data.sources import BUNDLED, POOL, Intake
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.params import CollectParams

# of exact copies, keep a training copy over a test copy, and either over an unlabelled one
KEEP_FIRST = {LABELLED: 0, POOL: 1, EXTERNAL: 2, UNLABELLED: 3}


REJECT_COLUMNS = ["path", "category", "detail"]


@dataclass(frozen=True)
class Outcome:
    """Everything the stage decided, before it is written."""

    manifest: pd.DataFrame
    classes: list[str]
    images: np.ndarray
    duplicates: pd.DataFrame  # path, kept_path, label: exact copies collapsed into the kept one
    rejects: pd.DataFrame  # path, category, detail
    summary: dict


def candidate_table(intake: Intake) -> pd.DataFrame:
    """One row per decoded picture, `picture` indexing intake.pictures."""
    pictures = intake.pictures
    return pd.DataFrame({
        "picture": range(len(pictures)), "path": [p.path for p in pictures], "label": [p.label for p in pictures],
        "source": [p.source for p in pictures], "split": [p.split for p in pictures],
        "user_group": [p.group for p in pictures], "sha256": [pixel_sha256(p.decoded.pixels) for p in pictures],
        "width": [p.decoded.width for p in pictures], "height": [p.decoded.height for p in pictures],
    })


def resolve_conflicts(table: pd.DataFrame, intake: Intake, policy: str) -> pd.DataFrame:
    """The same picture under two labels: reject every copy (`drop`) or stop (`error`). An unlabelled copy
    names no label, so it conflicts with nothing (it collapses into a labelled copy as an exact duplicate)."""
    labels = table[table.label != ""].groupby("sha256").label.unique()
    conflicted = table.sha256.map(labels.map(len)).fillna(0) > 1
    if not conflicted.any():
        return table
    if policy == "error":
        first = table[conflicted].iloc[0]
        copies = table[table.sha256 == first.sha256]
        listing = "; ".join(f"{r.path} as {r.label!r}" for r in copies.itertuples())
        raise PipelineError(f"label conflict: the same picture appears under two labels ({listing}); fix the labels, "
                            f"or set collect.label_conflicts: drop to reject every copy "
                            f"({int(conflicted.sum())} files are affected)")
    for row in table[conflicted].itertuples():
        others = table[(table.sha256 == row.sha256) & (table.label != row.label)]
        intake.reject(row.path, "label conflict", f"the same picture is also labelled {others.label.iloc[0]!r} "
                                                  f"({others.path.iloc[0]})")
    return table[~conflicted]


def collapse_exact(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep one copy of each picture (a training copy over a test copy, then the first); list the others."""
    order = table.assign(rank=table.split.map(KEEP_FIRST)).sort_values(["rank", "picture"], kind="stable")
    keep = ~order.duplicated("sha256")
    kept_path = order[keep].set_index("sha256").path
    dropped = order[~keep]
    duplicates = pd.DataFrame({"path": dropped.path, "kept_path": dropped.sha256.map(kept_path),
                               "label": dropped.label})
    return order[keep].drop(columns="rank").sort_values("picture"), duplicates.reset_index(drop=True)


def near_duplicate_groups(table: pd.DataFrame, intake: Intake, max_bits: int) -> np.ndarray:
    """Group ids joining pictures whose perceptual hashes are within `max_bits`, and rows sharing a user group."""
    hashes = np.stack([intake.pictures[i].decoded.phash for i in table.picture])
    left, right = hamming_pairs(hashes, max_bits)
    named = table.reset_index(drop=True)
    named = named[named.user_group != ""]
    for _, members in named.groupby("user_group").groups.items():  # chain each user group's members
        left = np.concatenate([left, members[:-1]])
        right = np.concatenate([right, members[1:]])
    n = len(table)
    graph = coo_matrix((np.ones(len(left)), (left, right)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def draw_labelled(table: pd.DataFrame, params: CollectParams) -> pd.Series:
    """For a bundled dataset: which pictures are labelled (drawn per class, seeded); the rest are external."""
    rng = np.random.default_rng(params.seed)
    split = pd.Series(EXTERNAL, index=table.index)
    for label, rows in table.groupby("label"):
        if len(rows) < params.images_per_class:
            raise PipelineError(f"collect.images_per_class: class {label!r} has only {len(rows)} images; "
                                f"use at most {len(rows)}")
        split[rng.choice(rows.index.to_numpy(), params.images_per_class, replace=False)] = LABELLED
    return split


def remove_test_leaks(table: pd.DataFrame, intake: Intake) -> pd.DataFrame:
    """Test pictures in a training picture's group, or of a class with no training pictures, leave the test set."""
    labelled = table[table.split == LABELLED]
    first_in_group = labelled.drop_duplicates("group").set_index("group").path
    leaks = (table.split == EXTERNAL) & table.group.isin(first_in_group.index)
    for row in table[leaks].itertuples():
        twin = first_in_group[row.group]
        intake.reject(row.path, "leak into test set",
                      f"a near-duplicate of training image {twin}; kept out of the test set so it cannot inflate "
                      "the score")
    unknown = (table.split == EXTERNAL) & ~table.label.isin(set(labelled.label))
    for row in table[unknown].itertuples():
        intake.reject(row.path, "class missing from training", f"no training image is labelled {row.label!r}")
    return table[~leaks & ~unknown]


def _over_limit(table: pd.DataFrame, split: str, limit: int, seed: int) -> np.ndarray:
    """Index labels of the `split` rows beyond `limit` (0 = no limit), drawn seeded."""
    rows = table.index[table.split == split]
    if not limit or len(rows) <= limit:
        return rows[:0].to_numpy()
    return np.random.default_rng(seed).choice(rows.to_numpy(), len(rows) - limit, replace=False)


def limit_external(table: pd.DataFrame, params: CollectParams) -> tuple[pd.DataFrame, int]:
    """(the table, external rows not kept): external rows beyond collect.external_limit leave the external set;
    a bundled dataset's become its unlabelled pool, anyone else's are not kept."""
    over = _over_limit(table, EXTERNAL, params.external_limit, params.seed + 1)
    if params.source in BUNDLED:
        return table.assign(split=table.split.where(~table.index.isin(over), UNLABELLED)), 0
    return table.drop(over), len(over)


def remove_pool_leaks(table: pd.DataFrame, intake: Intake) -> pd.DataFrame:
    """Unlabelled pictures near-duplicating an external (development or test) picture are rejected: a
    semi-supervised variant would otherwise learn the test image's pseudo-label from its twin."""
    external = table[table.split == EXTERNAL].drop_duplicates("group").set_index("group").path
    leaks = (table.split == UNLABELLED) & table.group.isin(external.index)
    for row in table[leaks].itertuples():
        intake.reject(row.path, "pool leak into test set",
                      f"an unlabelled near-duplicate of external image {external[row.group]}; kept out of the pool "
                      "so no variant learns from a twin of an image it is scored on")
    return table[~leaks]


def build_manifest(table: pd.DataFrame, params: CollectParams) -> tuple[pd.DataFrame, list[str]]:
    """Labelled rows first, then external ones; targets in natural class order; one fold column per repeat."""
    labelled = table[table.split == LABELLED].copy()
    classes = sorted(labelled.label.unique(), key=natural_key)
    if len(classes) < 2:
        raise PipelineError(f"collect: found {len(classes)} class(es) with usable training images; a classifier "
                            "needs at least two (see reports/rejects.csv for what was refused)")
    check_group_counts(labelled, len(params.folds))
    folds = assign_folds(labelled.label, labelled.group, len(params.folds), params.seed, params.repeats)
    for repeat, repeat_folds in zip(params.repeats, folds):
        labelled[fold_column(repeat)] = repeat_folds
    labelled["part"] = CV
    external = table[table.split == EXTERNAL].assign(**{fold_column(r): -1 for r in params.repeats})
    # seeded apart from the folds (seed + 2; + 1 limits the external set), so changing one never moves the other
    external["part"] = np.where(dev_part(external.label, external.group, params.dev_fraction, params.seed + 2),
                                DEV, TEST)
    unlabelled = table[table.split == UNLABELLED].assign(part=UNLABELLED, label="",
                                                         **{fold_column(r): -1 for r in params.repeats})
    manifest = pd.concat([labelled, external, unlabelled], ignore_index=True)
    manifest["target"] = manifest.label.map({c: i for i, c in enumerate(classes)}).fillna(-1).astype(int)
    manifest["index"] = range(len(manifest))
    return manifest, classes


def decide(params: CollectParams, intake: Intake) -> Outcome:
    """Turn what the source offered into the dataset: conflicts, duplicates, groups, the draw, leaks, folds."""
    table = resolve_conflicts(candidate_table(intake), intake, params.label_conflicts)
    table, duplicates = collapse_exact(table)
    table = table.assign(group=near_duplicate_groups(table, intake, params.near_duplicate_bits))
    if (table.split == POOL).any():
        table["split"] = draw_labelled(table, params)
    table = remove_test_leaks(table, intake)
    table, external_not_kept = limit_external(table, params)
    table = remove_pool_leaks(table, intake)
    accepted = len(table) + external_not_kept
    table = table.drop(_over_limit(table, UNLABELLED, params.unlabelled_limit, params.seed + 3))
    manifest, classes = build_manifest(table, params)
    rejects = pd.DataFrame(intake.rejects, columns=REJECT_COLUMNS)
    images = np.stack([intake.pictures[i].decoded.pixels for i in manifest.picture])
    summary = summarise(params, intake, manifest, duplicates, accepted=accepted, classes=classes,
                        stored=images.shape[1:])
    return Outcome(manifest, classes, images, duplicates, rejects, summary)


def summarise(params: CollectParams, intake: Intake, manifest: pd.DataFrame, duplicates: pd.DataFrame,
              accepted: int, classes: list[str], stored: tuple[int, int, int]) -> dict:
    labelled = manifest[manifest.split == LABELLED]
    not_kept = accepted - len(manifest)  # pictures beyond collect.external_limit and collect.unlabelled_limit
    summary = {
        "source": params.source, "inputs": intake.inputs, "accepted": accepted, "rejected": len(intake.rejects),
        "duplicates_collapsed": len(duplicates), "labelled": len(labelled),
        "external": int((manifest.split == EXTERNAL).sum()), "not_kept": not_kept,
        "unlabelled": int((manifest.split == UNLABELLED).sum()),
        "dev": int((manifest.part == DEV).sum()), "test": int((manifest.part == TEST).sum()),
        "groups": int(labelled.group.nunique()), "classes": classes,
        "labelled_per_class": {c: int((labelled.label == c).sum()) for c in classes},
        "folds": len(params.folds), "repeats": len(params.repeats),
        "rejects_by_category": pd.Series([r[1] for r in intake.rejects], dtype=str).value_counts().to_dict(),
        "image_size": int(stored[0]), "channels": int(stored[2]),  # as stored (after `auto`)
        "chosen_from_data": {k: v for k, v in intake.chosen.items() if k != "warnings"},
        "warnings": intake.chosen.get("warnings", []),
    }
    if intake.inputs != accepted + len(intake.rejects) + len(duplicates):
        raise AssertionError(f"collect lost inputs: {summary}")  # a bug, never a user's mistake
    return summary
