"""Every path a stage reads or writes, declared once. `dvc.yaml` names the same paths (a test checks it)."""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
REPORTS = Path("reports")

COLLECTED = DATA / "collected"  # collect: images.npz + manifest.csv + summary.json
AUGMENT = DATA / "augment"  # augment: policy.json + preview.png
SYNTHETIC = DATA / "synthetic"  # synthesize: one folder per fold
FINETUNE = DATA / "finetune"  # finetune: one folder per fold and variant

IMAGES_FILE = "images.npz"
MANIFEST_FILE = "manifest.csv"
POLICY_FILE = "policy.json"
SAMPLES_FILE = "samples.npz"
PREDICTIONS_FILE = "predictions.npz"

METRICS = REPORTS / "metrics.json"
REPORT = REPORTS / "report.md"
FIGURES = REPORTS / "figures"  # evaluate: confusion matrices and other PNGs


def synthetic_dir(fold: int) -> Path:
    return SYNTHETIC / f"fold{fold}"


def finetune_dir(fold: int, variant: str) -> Path:
    return FINETUNE / f"fold{fold}-{variant}"
