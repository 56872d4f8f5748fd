"""What the cross-validation says: each variant's predictions loaded and scored with intervals, the comparisons
between variants, the scarcity curve, and the flat metrics, plot data and figures made from them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.data.collected import DEV, EXTERNAL_PARTS, TEST, Collected
from pipeline.evaluation import figures
from pipeline.evaluation.statistics import (
    METRICS,
    bootstrap_intervals,
    corrected_t_interval,
    corrected_t_test,
    holm,
    paired_bootstrap,
    per_class,
    reliability,
    roc_points,
    score,
)
from pipeline.runtime import atomic, paths
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.params import EvaluateParams, ScarcityParams, Variant

FoldDir = Callable[[int, int, str], Path]  # (repeat, fold, variant) -> that finetune run's output folder
PointDir = Callable[[int, str], Path]  # (images per class, variant) -> that scarcity run's output folder


@dataclass
class VariantResult:
    name: str
    fold_scores: list[dict[str, float]]  # validation metrics per fold of every repeat, in (repeat, fold) order
    test_train_ratio: float  # validation images / training images, averaged over folds (the t-test's correction)
    oof_targets: np.ndarray  # every labelled image once, in manifest order
    oof_groups: np.ndarray  # their groups (near-duplicates, a CSV's groups): what the bootstrap resamples
    oof_probs: np.ndarray  # repeats x images x classes: each image predicted by the fold that did not train on it
    external: HeldOut | None  # every fold model's predictions of the external images; None without an external set
    loss_curve: np.ndarray | None  # training loss per epoch, mean over folds (full fine-tuning only)
    pool_probs: np.ndarray | None = None  # fold models x unlabelled pool images x classes; None without a pool


@dataclass
class HeldOut:
    """Fold models' predictions of external images that no model trained on, with each image's part: the
    development part (for choosing settings) or the final test (which only reports)."""

    targets: np.ndarray
    groups: np.ndarray
    parts: np.ndarray  # DEV or TEST per image
    fold_probs: np.ndarray  # fold models x images x classes

    @property
    def ensemble(self) -> np.ndarray:
        return self.fold_probs.mean(0)

    def part(self, name: str) -> HeldOut | None:
        """The images of one part, or None when there are none."""
        keep = self.parts == name
        if not keep.any():
            return None
        return HeldOut(self.targets[keep], self.groups[keep], self.parts[keep], self.fold_probs[:, keep])


def load_predictions(path: Path, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run `dvc repro` so it covers {what}") from None


def _loss_curve(folders: list[Path]) -> np.ndarray | None:
    curves = []
    for folder in folders:
        history = json.loads((folder / "history.json").read_text())
        if history and "loss" in history[0]:
            curves.append([h["loss"] for h in history])
    if not curves:
        return None
    length = min(len(c) for c in curves)  # early stopping may end folds at different epochs
    return np.mean([c[:length] for c in curves], axis=0)


def load_variant(name: str, collected: Collected, finetune_dir: FoldDir) -> VariantResult:
    fold_scores, ext_probs, pool_probs, ratios, folders = [], [], [], [], []
    targets = collected.manifest.target.to_numpy()
    labelled = collected.labelled["index"].to_numpy()  # labelled rows come first, so index == position here
    external = collected.external["index"].to_numpy()
    oof = np.full((len(collected.repeats), len(labelled), len(collected.classes)), np.nan, dtype=np.float32)
    for repeat in collected.repeats:
        for fold in collected.folds:
            folder = finetune_dir(repeat, fold, name)
            pred = load_predictions(folder / paths.PREDICTIONS_FILE, f"repeat {repeat}, fold {fold}, variant {name}")
            train_rows, val_rows = collected.fold_split(fold, repeat)
            if (not np.array_equal(np.sort(pred["val_index"]), np.sort(val_rows["index"].to_numpy()))
                    or not np.array_equal(pred["test_index"], external)):
                raise PipelineError(f"{folder} was made for other folds than the collected data; re-run `dvc repro`")
            fold_scores.append(score(targets[pred["val_index"]], pred["val_probs"]))
            ratios.append(len(val_rows) / len(train_rows))
            oof[repeat, pred["val_index"]] = pred["val_probs"]
            folders.append(folder)
            ext_probs.append(pred["test_probs"])
            if len(collected.unlabelled):
                if not np.array_equal(pred.get("pool_index", []), collected.unlabelled["index"].to_numpy()):
                    raise PipelineError(f"{folder} predicted another unlabelled pool than the collected data's; "
                                        "re-run `dvc repro`")
                pool_probs.append(pred["pool_probs"])
    held_out = None
    if len(external):
        manifest = collected.manifest.iloc[external]
        held_out = HeldOut(targets[external], manifest.group.to_numpy(), manifest.part.to_numpy(),
                           np.stack(ext_probs))
    groups = collected.manifest.group.to_numpy()[labelled]
    return VariantResult(name, fold_scores, float(np.mean(ratios)), targets[labelled], groups, oof, held_out,
                         _loss_curve(folders), np.stack(pool_probs) if pool_probs else None)


def _interval(value: float, bounds: tuple[float, float]) -> dict[str, float]:
    return {"value": float(value), "low": float(bounds[0]), "high": float(bounds[1])}


def _sample_std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _per_class_table(targets: np.ndarray, probs: np.ndarray) -> dict[str, list[float]]:
    return {k: [float(x) for x in v] for k, v in per_class(targets, probs).items()}


METRIC_RANGE = {"log_loss": (0.0, np.inf)}  # every other metric lies in [0, 1]


def _clip(metric: str, low: float, high: float) -> tuple[float, float]:
    """A t interval can reach past what a metric can be (accuracy above 1): cut it at the metric's range."""
    floor, ceiling = METRIC_RANGE.get(metric, (0.0, 1.0))
    return float(np.clip(low, floor, ceiling)), float(np.clip(high, floor, ceiling))


def variant_statistics(result: VariantResult, params: EvaluateParams) -> dict:
    """Everything the report says about one variant (JSON-ready)."""
    out: dict = {"cv": {}, "oof": {}}
    for metric in METRICS:
        mean, low, high = corrected_t_interval([s[metric] for s in result.fold_scores], result.test_train_ratio,
                                               params.confidence)
        low, high = _clip(metric, low, high)
        out["cv"][metric] = {"mean": float(mean), "std": _sample_std([s[metric] for s in result.fold_scores]),
                             "low": low, "high": high}
    bounds = bootstrap_intervals(result.oof_targets, result.oof_probs, params.confidence, params.bootstrap,
                                 groups=result.oof_groups)
    per_repeat = [score(result.oof_targets, probs) for probs in result.oof_probs]
    for metric in METRICS:
        out["oof"][metric] = _interval(np.mean([s[metric] for s in per_repeat]), bounds[metric])
    out["oof_per_class"] = _per_class_table(result.oof_targets, result.oof_probs.mean(0))
    for part in EXTERNAL_PARTS:
        held = result.external.part(part) if result.external is not None else None
        out[part] = None
        if held is None:
            continue
        folds = [score(held.targets, probs) for probs in held.fold_probs]
        ensemble = score(held.targets, held.ensemble)
        out[part] = {m: {"fold_mean": float(np.mean([f[m] for f in folds])),
                         "fold_std": _sample_std([f[m] for f in folds]), "ensemble": ensemble[m]} for m in METRICS}
        out[f"{part}_per_class"] = _per_class_table(held.targets, held.ensemble)
    if out[TEST]:  # did cross-validation's estimate hold on images that chose nothing?
        cv = out["cv"]["accuracy"]
        out["test_inside_cv_interval"] = bool(cv["low"] <= out[TEST]["accuracy"]["fold_mean"] <= cv["high"])
    return out


def _setting(value) -> str:
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


SETTING_WORDS = {"weights": "pretrained weights", "augment": "augmentation", "synthetic": "GAN samples",
                 "strategy": "training strategy", "backbone": "backbone", "epochs": "epochs",
                 "input_size": "input size", "unlabelled": "unlabelled pool"}


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


def comparisons(results: dict[str, VariantResult], variants: dict[str, Variant], best: str,
                params: EvaluateParams) -> list[dict]:
    """Paired comparisons of accuracy on the same folds and images: every single-setting change, then the best
    variant against each other one. p-values are Holm-corrected over all of them. Where there are external images,
    the fold ensembles are also compared on each part (paired bootstrap over its groups of images): the development
    part's difference is for choosing, the final test's only reports."""
    pairs = [(f"{SETTING_WORDS.get(s, s)}: {_setting(asdict(variants[a])[s])} → {_setting(asdict(variants[b])[s])}",
              a, b, s)
             for s, a, b in single_changes(variants)]
    seen = {frozenset((a, b)) for _, a, b, _ in pairs}
    pairs += [(f"best ({best}) against {other}", other, best, None) for other in results
              if other != best and frozenset((other, best)) not in seen]
    out = []
    for what, a, b, setting in pairs:
        ra, rb = results[a], results[b]
        diffs = [sb["accuracy"] - sa["accuracy"] for sa, sb in zip(ra.fold_scores, rb.fold_scores)]
        t_test = corrected_t_test(diffs, ra.test_train_ratio, params.confidence)
        boot = paired_bootstrap(ra.oof_targets, ra.oof_probs, rb.oof_probs, "accuracy", params.confidence,
                                params.bootstrap, groups=ra.oof_groups)
        record = {"what": what, "setting": setting, "a": a, "b": b, "corrected_t": asdict(t_test),
                  "bootstrap": asdict(boot)}
        if ra.external is not None and rb.external is not None:
            # beside the CV test, not instead of it: the external images say whether the verdict held on new data
            record["external"] = {}
            for part in EXTERNAL_PARTS:
                pa, pb = ra.external.part(part), rb.external.part(part)
                if pa is not None:
                    record["external"][part] = asdict(paired_bootstrap(
                        pa.targets, pa.ensemble, pb.ensemble, "accuracy", params.confidence, params.bootstrap,
                        groups=pa.groups))
        out.append(record)
    for c in out:
        c["test"] = params.test
        if params.test == "corrected_t" and c["corrected_t"]["low"] == c["corrected_t"]["high"]:
            # Every fold moved by exactly the same amount (common with a few validation images per fold): the t
            # statistic divides by zero, so the paired bootstrap over images decides instead of a p of 0.
            c["test"] = "bootstrap"
    adjusted = holm([c[c["test"]]["p_value"] for c in out])
    for c, p in zip(out, adjusted):
        chosen = c[c["test"]]
        c.update({"difference": chosen["difference"], "low": chosen["low"], "high": chosen["high"],
                  "p_value": chosen["p_value"], "p_holm": float(p),
                  "significant": bool(np.isfinite(p) and p < params.alpha)})
    return out


def scarcity_curves(collected: Collected, scarcity: ScarcityParams, point_dir: PointDir,
                    params: EvaluateParams) -> dict[str, list[dict]]:
    """Per scarcity variant, one record per point: out-of-fold accuracy with its bootstrap interval, the fold
    models' accuracy on the fixed test set, or why the point was not run."""
    targets = collected.manifest.target.to_numpy()
    curves: dict[str, list[dict]] = {}
    for name in scarcity.variants:
        curves[name] = []
        for n in scarcity.images_per_class:
            folder = point_dir(n, name)
            try:
                meta = json.loads((folder / "meta.json").read_text())
            except FileNotFoundError:
                raise PipelineError(f"{folder} is missing: run `dvc repro` so the scarcity curve covers {name} at "
                                    f"{n} images per class") from None
            record: dict = {"images_per_class": n}
            if "not_run" in meta:
                curves[name].append({**record, "not_run": meta["not_run"]})
                continue
            pred = load_predictions(folder / paths.PREDICTIONS_FILE, f"{name} at {n} images per class")
            train_targets = targets[pred["train_index"]]
            acc = float(np.mean(pred["oof_probs"].argmax(-1) == train_targets))
            low_high = bootstrap_intervals(train_targets, pred["oof_probs"], params.confidence, params.bootstrap,
                                           groups=collected.manifest.group.to_numpy()[pred["train_index"]])
            record.update({"oof_accuracy": acc, "oof_accuracy_low": low_high["accuracy"][0],
                           "oof_accuracy_high": low_high["accuracy"][1], "train_images": int(meta["train_images"])})
            if len(pred["test_index"]):
                test_targets = targets[pred["test_index"]]
                per_model = pred["test_probs"].reshape(-1, *pred["test_probs"].shape[2:])
                record["test_accuracy_fold_mean"] = float(np.mean([(p.argmax(1) == test_targets).mean()
                                                                   for p in per_model]))
                record["test_images"] = len(test_targets)
            curves[name].append(record)
    return curves


def selection_aware(results: dict[str, VariantResult], folds: int, params: EvaluateParams) -> dict:
    """The best variant was chosen on the same folds its CV figure comes from, so that figure is optimistic (the
    maximum of several noisy estimates). This estimates the whole procedure instead, choose-then-train, without
    training anything again: for each fold of each repeat, choose the variant with the best mean validation
    accuracy on the *other* folds, and score the choice on the held-out fold (leave-one-fold-out selection). It
    removes the optimism of choosing and scoring on the same images; the fold models themselves still trained on
    the held-out fold's neighbours' images, as in any CV."""
    names = list(results)
    accuracy = {n: np.array([s["accuracy"] for s in results[n].fold_scores]).reshape(-1, folds) for n in names}
    chosen, scores = [], []
    for repeat in range(accuracy[names[0]].shape[0]):
        for fold in range(folds):
            others = [j for j in range(folds) if j != fold]
            inner = {n: accuracy[n][repeat, others].mean() for n in names}
            pick = max(inner, key=inner.get)  # ties go to the earlier variant, as for the overall winner
            chosen.append({"repeat": repeat, "fold": fold, "variant": pick})
            scores.append(float(accuracy[pick][repeat, fold]))
    ratio = float(np.mean([r.test_train_ratio for r in results.values()]))
    mean, low, high = corrected_t_interval(scores, ratio, params.confidence)
    low, high = _clip("accuracy", low, high)  # an accuracy's t interval can reach past 1, as the CV one's
    return {"accuracy": {"mean": mean, "low": low, "high": high}, "chosen": chosen,
            "method": "leave-one-fold-out selection"}


def flat_metrics(stats: dict[str, dict], compared: list[dict], curves: dict[str, list[dict]],
                 selection: dict | None = None) -> dict[str, float]:
    """The numbers to choose settings by, for `dvc metrics show/diff` and `dvc exp show`: cross-validation, the
    development part of the external images and the scarcity curve; one level of keys, numbers only. The final
    test's numbers are apart, in `final_test_metrics`."""
    out: dict[str, float] = {}
    if selection is not None:  # the procedure's estimate, beside the winner's optimistic CV figure
        out["selection.accuracy"] = selection["accuracy"]["mean"]
        out["selection.accuracy_low"], out["selection.accuracy_high"] = (selection["accuracy"]["low"],
                                                                         selection["accuracy"]["high"])
    for name, s in stats.items():
        for metric, v in s["oof"].items():
            out[f"{name}.oof_{metric}"] = v["value"]
        out[f"{name}.oof_accuracy_low"], out[f"{name}.oof_accuracy_high"] = (s["oof"]["accuracy"]["low"],
                                                                           s["oof"]["accuracy"]["high"])
        cv = s["cv"]["accuracy"]
        out.update({f"{name}.cv_accuracy": cv["mean"], f"{name}.cv_accuracy_std": cv["std"],
                    f"{name}.cv_accuracy_low": cv["low"], f"{name}.cv_accuracy_high": cv["high"]})
        out.update(_part_metrics(name, s, DEV))
    for c in compared:
        out[f"compare.{c['b']}-{c['a']}.difference"] = c["difference"]
        out[f"compare.{c['b']}-{c['a']}.p_holm"] = c["p_holm"]
        if DEV in c.get("external", {}):
            out[f"compare.{c['b']}-{c['a']}.dev_difference"] = c["external"][DEV]["difference"]
    for name, points in curves.items():
        for p in points:
            if "oof_accuracy" in p:
                out[f"scarcity.{name}.n{p['images_per_class']}.oof_accuracy"] = p["oof_accuracy"]
            if "test_accuracy_fold_mean" in p:
                out[f"scarcity.{name}.n{p['images_per_class']}.test_accuracy"] = p["test_accuracy_fold_mean"]
    return atomic.strict(out)  # JSON has no NaN: an undefined figure is null


def _part_metrics(name: str, stats: dict, part: str) -> dict[str, float]:
    if not stats[part]:
        return {}
    out = {f"{name}.{part}_accuracy_fold_mean": stats[part]["accuracy"]["fold_mean"]}
    out.update({f"{name}.{part}_{m}": v["ensemble"] for m, v in stats[part].items()})
    return out


def final_test_metrics(stats: dict[str, dict], compared: list[dict]) -> dict[str, float]:
    """The final test's numbers, in their own metrics file so that `dvc exp show` sets them apart: they report,
    and choosing anything by them would make them optimistic."""
    out: dict[str, float] = {}
    for name, s in stats.items():
        out.update(_part_metrics(name, s, TEST))
    for c in compared:
        if TEST in c.get("external", {}):
            out[f"compare.{c['b']}-{c['a']}.test_difference"] = c["external"][TEST]["difference"]
    return atomic.strict(out)  # JSON has no NaN: an undefined figure is null


@dataclass(frozen=True)
class Diagrams:
    """One variant's out-of-fold ROC curve and reliability bins: drawn in the report, written for DVC's plots."""

    roc: tuple[np.ndarray, np.ndarray]  # fpr, tpr (micro-averaged one-vs-rest, every repeat's predictions)
    reliability: dict[str, np.ndarray]  # confidence, accuracy, count per bin (predictions averaged over repeats)

    @staticmethod
    def of(result: VariantResult) -> "Diagrams":
        repeats, classes = len(result.oof_probs), result.oof_probs.shape[-1]
        roc = roc_points(np.tile(result.oof_targets, repeats), result.oof_probs.reshape(-1, classes))
        return Diagrams(roc, reliability(result.oof_targets, result.oof_probs.mean(0)))


def write_plots(folder: Path, results: dict[str, VariantResult], diagrams: dict[str, Diagrams],
                classes: tuple[str, ...], curves: dict[str, list[dict]]) -> None:
    """Data files for `dvc plots show`: confusion (actual, predicted), ROC, reliability and scarcity, one file per
    variant in each folder."""
    with atomic.atomic_dir(folder) as tmp:
        for name, r in results.items():
            predicted = r.oof_probs.argmax(-1)
            pd.DataFrame({"actual": np.array(classes)[np.tile(r.oof_targets, len(predicted))],
                          "predicted": np.array(classes)[predicted.ravel()]}).to_csv(
                _mkdir(tmp / "confusion") / f"{name}.csv", index=False)
            fpr, tpr = diagrams[name].roc
            pd.DataFrame({"fpr": fpr, "tpr": tpr}).to_csv(_mkdir(tmp / "roc") / f"{name}.csv", index=False)
            pd.DataFrame(diagrams[name].reliability).to_csv(_mkdir(tmp / "calibration") / f"{name}.csv", index=False)
        for name, points in curves.items():
            rows = [p for p in points if "oof_accuracy" in p]
            pd.DataFrame(rows, columns=["images_per_class", "oof_accuracy", "oof_accuracy_low", "oof_accuracy_high",
                                        "test_accuracy_fold_mean"]).to_csv(
                _mkdir(tmp / "scarcity") / f"{name}.csv", index=False)


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def make_figures(results: dict[str, VariantResult], diagrams: dict[str, Diagrams], stats: dict[str, dict],
                 compared: list[dict], curves: dict[str, list[dict]], collected: Collected,
                 params: EvaluateParams) -> dict[str, bytes]:
    """Every figure of the report, by file name."""
    from sklearn.metrics import confusion_matrix

    names = list(results) + [n for n in curves if n not in results]  # a variant keeps its colour in every figure
    level = f"{params.confidence:.0%}"
    labels = range(len(collected.classes))
    out = {}
    marks = {f"{what}, fold models": {n: s[part]["accuracy"]["fold_mean"] for n, s in stats.items() if s[part]}
             for part, what in ((DEV, "development part"), (TEST, "final test"))}
    out["accuracy.png"] = figures.intervals_png(
        [(n, s["oof"]["accuracy"]["value"], s["oof"]["accuracy"]["low"], s["oof"]["accuracy"]["high"])
         for n, s in stats.items()], names, f"out-of-fold accuracy ({level} bootstrap interval)",
        {k: v for k, v in marks.items() if v})
    if compared:
        out["differences.png"] = figures.differences_png(
            [(f"{c['b']} − {c['a']}", c["difference"], c["low"], c["high"], c["significant"]) for c in compared],
            f"difference in accuracy ({level} interval; filled = significant after Holm)")
    if any("oof_accuracy" in p for points in curves.values() for p in points):
        out["scarcity.png"] = figures.scarcity_png(curves, names, level)
    out["reliability.png"] = figures.reliability_png({n: d.reliability for n, d in diagrams.items()}, names)
    out["roc.png"] = figures.roc_png({n: d.roc for n, d in diagrams.items()}, names)
    losses = {n: r.loss_curve for n, r in results.items() if r.loss_curve is not None}
    if losses:
        out["training.png"] = figures.training_png(losses, names)
    for n, r in results.items():
        counts = sum(confusion_matrix(r.oof_targets, p.argmax(1), labels=labels) for p in r.oof_probs)
        out[f"confusion_{n}.png"] = figures.confusion_png(counts, collected.classes, f"{n} (out-of-fold)")
        held = r.external.part(DEV) if r.external is not None else None
        if held is not None:  # the errors to learn from are on the images meant for choosing, not on the final test
            counts = confusion_matrix(held.targets, held.ensemble.argmax(1), labels=labels)
            out[f"confusion_{n}_dev.png"] = figures.confusion_png(
                counts, collected.classes, f"{n} (development part, ensemble of folds)")
    return out
