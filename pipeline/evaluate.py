"""Stage 5, evaluate: out-of-fold metrics per variant (mean and std across folds, and a bootstrap interval of
the pooled out-of-fold accuracy), external test accuracy per fold and for the ensemble of folds, confusion
matrices, `reports/metrics.json` and a report that says in words which variant did best."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import atomic, paths
from pipeline.errors import PipelineError
from pipeline.images import Collected, load_collected
from pipeline.metrics import METRICS, bootstrap_accuracy, mean_std, save_confusion, score
from pipeline.params import EvaluateParams, Variant
from pipeline.runtime import cli, stage_args

log = logging.getLogger(__name__)
FoldDir = Callable[[int, int, str], Path]  # (repeat, fold, variant) -> that finetune run's output folder


@dataclass(frozen=True)
class EvaluateOutputs:
    metrics: Path
    report: Path
    figures: Path


@dataclass
class VariantResult:
    name: str
    fold_scores: list[dict[str, float]]  # validation metrics, one dict per fold of every repeat
    oof_targets: np.ndarray  # every labelled image once, in manifest order
    oof_probs: np.ndarray  # repeats x images x classes: each image predicted by the fold that did not train on it
    external_fold_accuracy: list[float]
    external_probs: np.ndarray | None  # mean of all fold models' probabilities (the ensemble); None without a test set


def load_predictions(path: Path, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run `dvc repro` so finetune covers {what}") from None


def load_variant(name: str, collected: Collected, finetune_dir: FoldDir) -> VariantResult:
    fold_scores, ext_acc, ext_probs = [], [], []
    targets = collected.manifest.target.to_numpy()
    labelled = collected.labelled["index"].to_numpy()  # labelled rows come first, so index == position here
    oof = np.full((len(collected.repeats), len(labelled), len(collected.classes)), np.nan, dtype=np.float32)
    for repeat in collected.repeats:
        for fold in collected.folds:
            path = finetune_dir(repeat, fold, name) / paths.PREDICTIONS_FILE
            pred = load_predictions(path, f"repeat {repeat}, fold {fold}, variant {name}")
            expected = collected.fold_split(fold, repeat)[1]["index"].to_numpy()
            if not np.array_equal(np.sort(pred["val_index"]), np.sort(expected)):
                raise PipelineError(f"{path} was made for other folds than the collected data; re-run `dvc repro`")
            fold_scores.append(score(targets[pred["val_index"]], pred["val_probs"]))
            oof[repeat, pred["val_index"]] = pred["val_probs"]
            if len(pred["test_index"]):
                ext_acc.append(score(targets[pred["test_index"]], pred["test_probs"])["accuracy"])
                ext_probs.append(pred["test_probs"])
    ensemble = np.mean(ext_probs, axis=0) if ext_probs else None
    return VariantResult(name, fold_scores, targets[labelled], oof, ext_acc, ensemble)


def summarise(result: VariantResult, external_targets: np.ndarray, confidence: float) -> dict:
    """Numbers for metrics.json: cv_<metric>{,_std} over folds (of every repeat); oof_<metric> on the pooled
    out-of-fold predictions (averaged over repeats), with oof_accuracy_{low,high} bootstrapped over images;
    external_* on the external test set."""
    out = {}
    for metric in METRICS:
        out[f"cv_{metric}"], out[f"cv_{metric}_std"] = mean_std([s[metric] for s in result.fold_scores])
    per_repeat = [score(result.oof_targets, probs) for probs in result.oof_probs]
    out.update({f"oof_{k}": float(np.mean([s[k] for s in per_repeat])) for k in METRICS})
    out["oof_accuracy_low"], out["oof_accuracy_high"] = bootstrap_accuracy(result.oof_targets, result.oof_probs,
                                                                           confidence)
    if result.external_probs is not None:
        out["external_accuracy_fold_mean"] = float(np.mean(result.external_fold_accuracy))
        out["external_accuracy_fold_std"] = float(np.std(result.external_fold_accuracy, ddof=1))
        out.update({f"external_ensemble_{k}": v for k, v in score(external_targets, result.external_probs).items()})
    return out


def recipe(variant: Variant) -> str:
    """A variant in a few words, for the report's table."""
    parts = [variant.backbone, f"{variant.weights} weights", variant.strategy.replace("_", " "),
             f"{variant.input_size} px" if variant.input_size else "its own input size"]
    if variant.strategy == "full":
        parts.append(f"{variant.epochs} epochs")
    parts += [name for name, on in (("+augment", variant.augment), ("+GAN samples", variant.synthetic)) if on]
    return ", ".join(parts)


def single_changes(variants: dict[str, Variant]) -> list[tuple[str, str, str]]:
    """(setting, from variant, to variant) for every pair of variants that differ in exactly one setting: what
    that one setting bought, read in params order (scratch -> baseline -> augment -> synthetic)."""
    settings = {name: asdict(variant) for name, variant in variants.items()}
    names, pairs = list(settings), []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            changed = [k for k, v in settings[a].items() if settings[b][k] != v]
            if len(changed) == 1:
                pairs.append((changed[0], a, b))
    return pairs


def _effects(summary: dict[str, dict], variants: dict[str, Variant], has_external: bool) -> list[str]:
    pairs = single_changes(variants)
    if not pairs:
        return []
    lines = ["## What each ingredient bought", "",
             "Pairs of variants that differ in one setting only; the change in accuracy is what that setting bought "
             "(or cost) here.", "",
             "| setting | from → to | out-of-fold accuracy | change |" + (" external accuracy, ensemble | change |"
                                                                      if has_external else ""),
             "|---|---|---|---|" + ("---|---|" if has_external else "")]
    for setting, a, b in pairs:
        before, after = asdict(variants[a])[setting], asdict(variants[b])[setting]
        row = (f"| {setting}: {before} → {after} | {a} → {b} | {summary[a]['oof_accuracy']:.3f} → "
               f"{summary[b]['oof_accuracy']:.3f} | {summary[b]['oof_accuracy'] - summary[a]['oof_accuracy']:+.3f} |")
        if has_external:
            ext_a, ext_b = summary[a]["external_ensemble_accuracy"], summary[b]["external_ensemble_accuracy"]
            row += f" {ext_a:.3f} → {ext_b:.3f} | {ext_b - ext_a:+.3f} |"
        lines.append(row)
    return lines + [""]


def write_report(path: Path, summary: dict[str, dict], collected: Collected, params: EvaluateParams,
                 variants: dict[str, Variant]) -> str:
    """The Markdown report; returns the name of the best variant (highest mean accuracy over folds)."""
    best = max(summary, key=lambda v: summary[v]["cv_accuracy"])
    level = f"{params.confidence:.0%}"
    has_external = "external_ensemble_accuracy" in summary[best]
    lines = [
        "# Results", "",
        f"{len(collected.labelled)} labelled images in {len(collected.classes)} classes, "
        f"{len(collected.folds)}-fold cross-validation"
        + (f" repeated {len(collected.repeats)} times" if len(collected.repeats) > 1 else "")
        + (f"; {len(collected.external)} external test images that no stage trained on." if has_external else "."),
        "",
        f"| variant | recipe | out-of-fold accuracy [{level} interval] | CV accuracy per fold (mean ± std) | "
        "CV balanced accuracy | CV macro-F1 |"
        + (" external accuracy, folds (mean ± std) | external accuracy, ensemble |" if has_external else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if has_external else ""),
    ]
    for name, m in sorted(summary.items(), key=lambda kv: -kv[1]["cv_accuracy"]):
        row = (f"| {'**' + name + '**' if name == best else name} | {recipe(variants[name])} | {m['oof_accuracy']:.3f} "
               f"[{m['oof_accuracy_low']:.3f}, {m['oof_accuracy_high']:.3f}] | "
               f"{m['cv_accuracy']:.3f} ± {m['cv_accuracy_std']:.3f} | {m['cv_balanced_accuracy']:.3f} | "
               f"{m['cv_macro_f1']:.3f} |")
        if has_external:
            row += (f" {m['external_accuracy_fold_mean']:.3f} ± {m['external_accuracy_fold_std']:.3f} | "
                    f"{m['external_ensemble_accuracy']:.3f} |")
        lines.append(row)
    lines += ["", _verdict(summary, best, has_external), "",
              "Intervals are percentile bootstrap intervals over the out-of-fold images (every labelled image is "
              "predicted once, by the fold model that did not train on it). They do not include the variation "
              "from retraining on other data, so they are a lower bound on the uncertainty; a difference between "
              "overlapping intervals is not evidence that one variant is better.", ""]
    lines += _effects(summary, variants, has_external)
    lines += [f"![confusion matrix of {name}](figures/confusion_{name}.png)" for name in summary]
    atomic.write_text(path, "\n".join(lines) + "\n")
    return best


def _verdict(summary: dict[str, dict], best: str, has_external: bool) -> str:
    m = summary[best]
    text = (f"**{best}** did best in cross-validation with an accuracy of {m['oof_accuracy']:.3f} "
            f"({m['oof_accuracy_low']:.3f} to {m['oof_accuracy_high']:.3f}).")
    overlapping = [v for v in summary if v != best and summary[v]["oof_accuracy_high"] >= m["oof_accuracy_low"]]
    if overlapping:
        text += f" Its interval overlaps that of {', '.join(overlapping)}, so that lead is not clear-cut."
    if has_external:
        ext_best = max(summary, key=lambda v: summary[v]["external_ensemble_accuracy"])
        text += (f" On the external test set the ensemble of its fold models scores {m['external_ensemble_accuracy']:.3f}"
                 + (", also the best there." if ext_best == best else
                    f"; there {ext_best} scores higher ({summary[ext_best]['external_ensemble_accuracy']:.3f})."))
    return text


def run(params: EvaluateParams, variants: dict[str, Variant], collected_dir: Path, finetune_dir: FoldDir,
        outputs: EvaluateOutputs) -> dict:
    """Evaluate every variant's fold predictions; write metrics, report and figures; return the metrics."""
    collected = load_collected(collected_dir)
    ext_targets = collected.external.target.to_numpy()
    results = [load_variant(name, collected, finetune_dir) for name in variants]
    summary = {r.name: summarise(r, ext_targets, params.confidence) for r in results}
    with atomic.atomic_dir(outputs.figures) as figures:
        for r in results:
            has_ext = r.external_probs is not None
            targets, probs = (ext_targets, r.external_probs) if has_ext else (r.oof_targets, r.oof_probs[0])
            where = "external test, ensemble of folds" if has_ext else "out-of-fold"
            save_confusion(figures / f"confusion_{r.name}.png", targets, probs, collected.classes,
                           f"{r.name} ({where})")
    best = write_report(outputs.report, summary, collected, params, variants)
    atomic.write_text(outputs.metrics, json.dumps(summary, indent=2) + "\n")
    log.info("evaluate: best variant %s (CV accuracy %.3f)", best, summary[best]["cv_accuracy"])
    return summary


def main(argv: list[str] | None = None) -> None:
    _, params = stage_args(__doc__, argv)
    outputs = EvaluateOutputs(paths.METRICS, paths.REPORT, paths.FIGURES)
    run(params.evaluate, params.variants, paths.COLLECTED, paths.finetune_dir, outputs)


if __name__ == "__main__":
    cli(main)
