"""Stage 1, collect: gather a small labelled image set, validate and deduplicate it, assign leak-free folds.

Sources (param `collect.source`, see pipeline/data/sources.py): your class folders, your CSV manifest (local paths or
URLs), or a dataset bundled in a PyPI package (mnist, digits, lfw), from which a scarce labelled subset is drawn
and the rest kept as an external set: a development part, on which settings are chosen, and a final test.

Every input ends up accepted, rejected (with a category and a detail, in reports/rejects.csv) or collapsed as an
exact duplicate, and the stage checks that these add up. Near-duplicates (perceptual hash) and a CSV's own
groups form groups that never span two folds (StratifiedGroupKFold, repeated with other shuffles), and a test
image that near-duplicates a training image is taken out of the test set.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.data.collected import save_collected
from pipeline.data.curation import (
    Outcome,
    decide,
)
from pipeline.data.datacard import write_data_card
from pipeline.data.sources import SOURCES
from pipeline.runtime import atomic, paths
from pipeline.runtime.cli import cli, stage_args
from pipeline.runtime.params import CollectParams

log = logging.getLogger(__name__)
# The params sections this stage reads; dvc.yaml lists the same (a test checks both).
PARAMS = ("collect",)


def write(outcome: Outcome, output: Path, reports: Path) -> None:
    with atomic.atomic_dir(output) as tmp:
        save_collected(tmp, outcome.images, outcome.manifest, outcome.classes)
        atomic.write_text(tmp / paths.DUPLICATES_FILE, outcome.duplicates.to_csv(index=False))
        atomic.write_json(tmp / "summary.json", outcome.summary)
    atomic.write_text(reports / paths.REJECTS_FILE, outcome.rejects.to_csv(index=False))
    write_data_card(reports, outcome.images, outcome.manifest, outcome.classes, outcome.summary,
                    outcome.duplicates, outcome.rejects)


def run(params: CollectParams, output: Path, reports: Path) -> dict:
    """Collect into `output` (images.npz, manifest.csv, duplicates.csv, summary.json) and `reports`
    (rejects.csv, data_card.md, data_card/); return the summary."""
    intake = SOURCES[params.source](params)
    outcome = decide(params, intake)
    write(outcome, Path(output), Path(reports))
    s = outcome.summary
    log.info("collect: %d inputs = %d accepted (%d labelled, %d external: %d development + %d final test, %d "
             "unlabelled, %d not kept) + %d rejected + %d duplicates collapsed; %d classes, %d groups", s["inputs"],
             s["accepted"], s["labelled"], s["external"], s["dev"], s["test"], s["unlabelled"], s["not_kept"],
             s["rejected"], s["duplicates_collapsed"], len(s["classes"]), s["groups"])
    for category, count in s["rejects_by_category"].items():
        log.warning("rejected %d: %s (see %s)", count, category, Path(reports) / paths.REJECTS_FILE)
    return s


def main(argv: list[str] | None = None) -> None:
    _, params = stage_args(__doc__, argv, PARAMS)
    run(params.collect, paths.COLLECTED, paths.REPORTS)


if __name__ == "__main__":
    cli(main)
