"""The data card: what the collect stage kept, merged and refused, in a page a person can skim.

`reports/data_card.md` holds class counts per split and fold, the size histogram, duplicates, near-duplicate
groups and rejects; `reports/data_card/` holds its pictures (a thumbnail grid per class, the size histogram).
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from pipeline.data.collected import DEV, LABELLED, TEST, fold_column
from pipeline.data.pictures import grid, save_png
from pipeline.runtime import atomic, paths

THUMBNAILS = 24  # per class
LISTED = 15  # rows shown of long tables; the CSVs hold them all


def _table(frame: pd.DataFrame) -> list[str]:
    """A Markdown table; pipes in cells are escaped so a file name cannot break it."""
    cells = frame.astype(str).apply(lambda column: column.str.replace("|", "\\|"))
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return lines + ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]


def _size_histogram(manifest: pd.DataFrame) -> bytes:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    low, high = int(min(manifest.width.min(), manifest.height.min())), int(max(manifest.width.max(),
                                                                             manifest.height.max()))
    wide = high > 8 * low  # phone photos beside thumbnails: a log axis keeps both readable
    bins = np.unique(np.geomspace(low, high + 1, 30).round()) if wide else np.linspace(low - 0.5, high + 0.5,
                                                                                      min(30, high - low + 1) + 1)
    ax.hist([manifest.width, manifest.height], bins=bins, label=["width", "height"])
    if wide:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:.0f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("original side (pixels)")
    ax.set_ylabel("images")
    ax.set_title(f"{len(manifest)} images kept, sides {low} to {high} px", fontsize=10)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _class_section(manifest: pd.DataFrame, classes: list[str]) -> list[str]:
    labelled = manifest[manifest.split == LABELLED]
    counts = pd.DataFrame({
        "class": classes,
        "labelled": [int((labelled.label == c).sum()) for c in classes],
        "groups": [labelled.group[labelled.label == c].nunique() for c in classes],
        "external: development": [int(((manifest.part == DEV) & (manifest.label == c)).sum()) for c in classes],
        "external: final test": [int(((manifest.part == TEST) & (manifest.label == c)).sum()) for c in classes],
    })
    per_fold = pd.crosstab(labelled.label, labelled[fold_column(0)]).reindex(classes)
    per_fold.columns = [f"fold {f}" for f in per_fold.columns]
    return (["## Classes", ""] + _table(counts)
            + ["", "Validation images per fold (repeat 0); a group of near-duplicates stays in one fold:", ""]
            + _table(per_fold.reset_index().rename(columns={"label": "class"})))


def _settings_section(summary: dict) -> list[str]:
    """How the pictures are stored, what `auto` chose from them and why, and warnings about settings that do not
    fit them."""
    lines = [f"Stored as {summary['image_size']} x {summary['image_size']} px, {summary['channels']} channel(s)."]
    for key, chosen in summary.get("chosen_from_data", {}).items():
        lines.append(f"`collect.{key}: auto` chose **{chosen['value']}**: {chosen['why']}.")
    lines += [f"**Warning:** {w}." for w in summary.get("warnings", [])]
    return [" ".join(lines), ""]


def _duplicates_section(manifest: pd.DataFrame, duplicates: pd.DataFrame) -> list[str]:
    lines = ["## Duplicates", "", f"{len(duplicates)} exact copies (same decoded pixels) were collapsed into the copy "
             "kept; `data/collected/duplicates.csv` lists them all."]
    if len(duplicates):
        lines += [""] + _table(duplicates.head(LISTED))
    sizes = manifest.groupby("group").size()
    shared = manifest[manifest.group.map(sizes) > 1].sort_values(["group", "index"])
    lines += ["", f"{shared.group.nunique()} groups of near-duplicates (or of a CSV's own groups) hold "
              f"{len(shared)} images; each group stays in one fold."]
    if len(shared):
        listed = shared[shared.group.isin(shared.group.unique()[:LISTED])]
        lines += [""] + _table(listed[["group", "path", "label", "split"]])
    return lines


def _rejects_section(rejects: pd.DataFrame) -> list[str]:
    lines = ["## Rejected inputs", "", f"{len(rejects)} inputs were refused; `reports/rejects.csv` lists each "
             "with its reason."]
    if len(rejects):
        by_category = rejects.category.value_counts().rename_axis("reason").reset_index(name="inputs")
        lines += [""] + _table(by_category) + [""] + _table(rejects.head(LISTED))
    return lines


def write_data_card(reports, images: np.ndarray, manifest: pd.DataFrame, classes: list[str], summary: dict,
                    duplicates: pd.DataFrame, rejects: pd.DataFrame) -> None:
    """Write data_card.md and its pictures under `reports` (the pictures' folder replaced atomically)."""
    figures = paths.DATA_CARD_DIR
    s = summary
    lines = [
        "# Data card", "",
        f"Source `{s['source']}`: **{s['inputs']} inputs = {s['accepted']} accepted + {s['rejected']} rejected + "
        f"{s['duplicates_collapsed']} exact duplicates collapsed.** Of those accepted, {s['labelled']} are labelled "
        f"(cross-validated in {s['folds']} folds, {s['repeats']} repeat(s)) and {s['external']} form an external set no "
        f"variant, fold or final model trains on: {s['dev']} in the development part, on which settings are "
        f"chosen, and {s['test']} in the final test, which only reports (collect.dev_fraction). "
        f"{s['unlabelled']} are unlabelled: the pool that semi-supervised variants learn from and that \"what to "
        "label next\" ranks; a pool image near-duplicating an external image is rejected, one near-duplicating a "
        "labelled image is left out of the folds that validate on it."
        + (f" {s['not_kept']} more were not kept (collect.external_limit, collect.unlabelled_limit)."
           if s["not_kept"] else ""),
        "", *_settings_section(s), *_class_section(manifest, classes), "",
        "## Image sizes", "", f"![sizes]({figures}/sizes.png)", "",
        *_duplicates_section(manifest, duplicates), "", *_rejects_section(rejects), "",
        "## Labelled images per class", "",
    ]
    with atomic.atomic_dir(reports / figures) as tmp:
        atomic.write_bytes(tmp / "sizes.png", _size_histogram(manifest))
        for target, name in enumerate(classes):
            rows = manifest[(manifest.split == LABELLED) & (manifest.target == target)].head(THUMBNAILS)
            save_png(tmp / f"class_{target}.png", grid(images[rows["index"].to_numpy()], columns=12),
                     scale=max(1, 48 // images.shape[1]))
            lines += [f"**{name}** ({len(rows)} shown)", "", f"![{name}]({figures}/class_{target}.png)", ""]
    atomic.write_text(reports / paths.DATA_CARD_FILE, "\n".join(lines))
