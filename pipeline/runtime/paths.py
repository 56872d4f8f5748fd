"""Every path a stage reads or writes, declared once. `dvc.yaml` names the same paths (a test checks it)."""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
REPORTS = Path("reports")

COLLECTED = DATA / "collected"  # collect: images.npz + manifest.csv + duplicates.csv + summary.json
AUGMENT = DATA / "augment"  # augment: policy.json + preview.png
SYNTHETIC = DATA / "synthetic"  # synthesize: one folder per fold
FINETUNE = DATA / "finetune"  # finetune: one folder per fold and variant
CHECKPOINTS = DATA / "checkpoints"  # training state of killed runs, outside DVC's outputs so it survives
SYNTHESIZE_REPORTS = REPORTS / "synthesize"  # synthesize: per-fold DVC metrics and plots
FINETUNE_REPORTS = REPORTS / "finetune"  # finetune: per fold x variant dvclive curves (DVC plots) and metrics
SCARCITY = DATA / "scarcity"  # scarcity: one folder per point of the curve and variant
SCARCITY_REPORTS = REPORTS / "scarcity"  # scarcity: per point x variant DVC metrics (how long it took)
MODEL = DATA / "model"  # final: the model trained on every labelled image, its card and exports
FEATURE_CACHE = DATA / "cache" / "features"  # frozen-backbone features, shared by every fold and variant

IMAGES_FILE = "images.npz"
MANIFEST_FILE = "manifest.csv"
DUPLICATES_FILE = "duplicates.csv"
REJECTS_FILE = "rejects.csv"  # collect writes these three under REPORTS
DATA_CARD_FILE = "data_card.md"
DATA_CARD_DIR = "data_card"
POLICY_FILE = "policy.json"
SAMPLES_FILE = "samples.npz"
PREDICTIONS_FILE = "predictions.npz"
PREVIEW_FILE = "preview.png"


METRICS = REPORTS / "metrics.json"  # evaluate: flat DVC metrics to choose by (CV, development part, curve)
TEST_METRICS = REPORTS / "test_metrics.json"  # evaluate: the final test's flat metrics, which only report
EVALUATION = REPORTS / "evaluation.json"  # evaluate: every number of the report
REPORT = REPORTS / "report.md"
REPORT_HTML = REPORTS / "report.html"  # the same report, one self-contained file
FIGURES = REPORTS / "figures"  # evaluate: the report's PNGs (DVC image plots)
LABELLING = REPORTS / "labelling"  # evaluate: likely label errors, and pool images to label next (CSV)
FINAL_METRICS = REPORTS / "final.json"  # final: the final model's external accuracy
PLOTS = REPORTS / "plots"  # evaluate: data for DVC plots (confusion, roc, calibration, scarcity)


def split_name(repeat: int, fold: int) -> str:
    return f"r{repeat}-fold{fold}"


def synthetic_dir(repeat: int, fold: int) -> Path:
    return SYNTHETIC / split_name(repeat, fold)


def finetune_dir(repeat: int, fold: int, variant: str) -> Path:
    return FINETUNE / f"{split_name(repeat, fold)}-{variant}"


def scarcity_dir(images_per_class: int, variant: str) -> Path:
    return SCARCITY / f"n{images_per_class}-{variant}"


def run_facts(reports: Path, name: str) -> Path:
    """How one run went (seconds, speed, where it resumed): DVC metrics beside the stage's reports, kept out
    of the outputs that carry its results, which must be the same bytes whenever the same inputs are trained
    again."""
    return reports / f"{name}-run.json"
