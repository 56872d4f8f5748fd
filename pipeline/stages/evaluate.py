"""Stage 5, evaluate: what the cross-validation says, with its uncertainty, and what each ingredient bought.

- Every variant: accuracy, balanced accuracy, macro-F1, macro one-vs-rest ROC AUC, log loss and expected
  calibration error on the pooled out-of-fold predictions (every labelled image predicted by the fold model that
  did not train on it; averaged over repeats), with bootstrap intervals over groups of images (a group of
  near-duplicates or a CSV's group is drawn whole); the mean over folds with the
  Nadeau-Bengio corrected t interval (which accounts for folds sharing training images); per-class precision and
  recall; on each part of the external images (the development part, for choosing settings, and the final test,
  which only reports), each fold model and the ensemble of fold models, and whether the CV interval contains the
  fold models' final-test accuracy.
- Comparisons on the same folds: every pair of variants that differs in one setting (what that ingredient bought)
  and the best variant against each other one, by the corrected resampled t-test and by a paired bootstrap over
  groups of images, Holm-corrected over the comparisons; `evaluate.test` picks the one the report's words follow.
- The label-scarcity curve from the scarcity stage.

Writes reports/metrics.json (flat DVC metrics to choose by: CV, the development part, the curve),
reports/test_metrics.json (the final test's, apart so that nobody chooses by them), reports/evaluation.json (everything), reports/plots/ and
reports/figures/ (DVC plots), and the report as reports/report.md and the self-contained reports/report.html.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.data.collected import load_collected
from pipeline.evaluation import labelling, report
from pipeline.evaluation.analysis import (
    Diagrams,
    FoldDir,
    PointDir,
    comparisons,
    final_test_metrics,
    flat_metrics,
    load_variant,
    make_figures,
    scarcity_curves,
    selection_aware,
    variant_statistics,
    write_plots,
)
from pipeline.runtime import atomic, paths
from pipeline.runtime.cli import cli, stage_args
from pipeline.runtime.compute import pick_device
from pipeline.runtime.params import EvaluateParams, ScarcityParams, Variant

log = logging.getLogger(__name__)
# The params sections this stage reads; dvc.yaml lists the same (a test checks both).
PARAMS = ("evaluate", "scarcity", "variants")


@dataclass(frozen=True)
class EvaluateInputs:
    collected: Path
    finetune: FoldDir
    scarcity: PointDir
    preview: Path  # augment's preview.png
    data_card: Path  # collect's data card figures
    synthesize_reports: Path  # each fold's GAN metrics and sample grid


@dataclass(frozen=True)
class EvaluateOutputs:
    metrics: Path
    test_metrics: Path
    evaluation: Path
    report_md: Path
    report_html: Path
    figures: Path
    plots: Path
    labelling: Path  # label_errors.csv, label_next.csv


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def run(params: EvaluateParams, variants: dict[str, Variant], scarcity: ScarcityParams, inputs: EvaluateInputs,
        outputs: EvaluateOutputs) -> dict:
    """Evaluate every variant's fold predictions and the scarcity curve; write metrics, plots, figures and the
    report; return the evaluation."""
    collected = load_collected(inputs.collected)
    results = {name: load_variant(name, collected, inputs.finetune) for name in variants}
    stats = {name: variant_statistics(r, params) for name, r in results.items()}
    best = max(stats, key=lambda v: stats[v]["cv"]["accuracy"]["mean"])  # chosen on CV, never on the final test
    compared = comparisons(results, variants, best, params)
    curves = scarcity_curves(collected, scarcity, inputs.scarcity, params)
    selection = selection_aware(results, len(collected.folds), params)
    labels = labelling.review(collected, results[best].oof_probs, results[best].pool_probs, params,
                              pick_device("auto"))
    evaluation = {"data": report.data_summary(collected), "params": asdict(params), "best": best,
                  "selection": selection,
                  "variants": {n: {"recipe": report.recipe(variants[n]), **s} for n, s in stats.items()},
                  "comparisons": compared, "scarcity": curves, "labelling": labels.summary()}
    diagrams = {name: Diagrams.of(r) for name, r in results.items()}
    pictures = make_figures(results, diagrams, stats, compared, curves, collected, params) | labels.figures
    with atomic.atomic_dir(outputs.figures) as tmp:
        for name, png in pictures.items():
            atomic.write_bytes(tmp / name, png)
    write_plots(outputs.plots, results, diagrams, collected.classes, curves)
    with atomic.atomic_dir(outputs.labelling) as tmp:
        atomic.write_text(tmp / labelling.ERRORS_FILE, labels.errors.to_csv(index=False))
        atomic.write_text(tmp / labelling.NEXT_FILE, labels.next.to_csv(index=False))
    assets = report.Assets.gather(inputs.data_card, inputs.preview, inputs.synthesize_reports)
    report.write(evaluation, outputs.figures, assets, outputs.report_md, outputs.report_html)
    atomic.write_json(outputs.evaluation, evaluation, indent=1)
    atomic.write_json(outputs.metrics, flat_metrics(stats, compared, curves, selection), indent=1)
    atomic.write_json(outputs.test_metrics, final_test_metrics(stats, compared), indent=1)
    log.info("evaluate: best variant %s (CV accuracy %.3f); report in %s", best,
             stats[best]["cv"]["accuracy"]["mean"], outputs.report_html)
    return evaluation


def main(argv: list[str] | None = None) -> None:
    _, params = stage_args(__doc__, argv, PARAMS)
    inputs = EvaluateInputs(paths.COLLECTED, paths.finetune_dir, paths.scarcity_dir, paths.AUGMENT / paths.PREVIEW_FILE,
                            paths.REPORTS / paths.DATA_CARD_DIR, paths.SYNTHESIZE_REPORTS)
    outputs = EvaluateOutputs(paths.METRICS, paths.TEST_METRICS, paths.EVALUATION, paths.REPORT, paths.REPORT_HTML,
                              paths.FIGURES, paths.PLOTS, paths.LABELLING)
    run(params.evaluate, params.variants, params.scarcity, inputs, outputs)


if __name__ == "__main__":
    cli(main)
