"""The evaluate stage on predictions with known answers."""

import json

import numpy as np
import pytest

from conftest import make_params
from pipeline import evaluate
from pipeline.errors import PipelineError
from pipeline.evaluate import EvaluateOutputs
from pipeline.images import load_collected
from pipeline.metrics import bootstrap_accuracy, mean_std, score


def write_predictions(root, collected_dir, name, correct_share, seed):
    """Predictions that are right for `correct_share` of the images (chosen at random), confidently."""
    data = load_collected(collected_dir)
    rng = np.random.default_rng(seed)
    targets = data.manifest.target.to_numpy()

    def probs(index):
        predicted = np.where(rng.random(len(index)) < correct_share, targets[index], (targets[index] + 1) % 10)
        out = np.full((len(index), 10), 0.01)
        out[np.arange(len(index)), predicted] = 0.91
        return out

    for repeat in data.repeats:
        for fold in data.folds:
            val = data.fold_split(fold, repeat)[1]["index"].to_numpy()
            test = data.external["index"].to_numpy()
            folder = root / f"r{repeat}-fold{fold}-{name}"
            folder.mkdir(parents=True)
            np.savez(folder / "predictions.npz", val_index=val, val_probs=probs(val), test_index=test,
                     test_probs=probs(test))


def outputs(tmp_path):
    return EvaluateOutputs(tmp_path / "reports" / "metrics.json", tmp_path / "reports" / "report.md",
                           tmp_path / "reports" / "figures")


def test_metrics_and_report_name_the_better_variant(tmp_path, collected_dir):
    preds = tmp_path / "finetune"
    write_predictions(preds, collected_dir, "perfect", 1.0, 0)
    write_predictions(preds, collected_dir, "coin", 0.5, 1)
    out = outputs(tmp_path)
    variants = make_params().variants
    summary = evaluate.run(make_params().evaluate, {"coin": variants["baseline"], "perfect": variants["augment"]},
                           collected_dir,
                           lambda repeat, fold, name: preds / f"r{repeat}-fold{fold}-{name}", out)
    assert json.loads(out.metrics.read_text()) == summary
    perfect, coin = summary["perfect"], summary["coin"]
    assert perfect["cv_accuracy"] == perfect["oof_accuracy"] == perfect["external_ensemble_accuracy"] == 1.0
    assert perfect["cv_accuracy_std"] == 0.0 and perfect["cv_macro_f1"] == 1.0
    assert 0.3 < coin["cv_accuracy"] < 0.7 and 0.35 < coin["external_accuracy_fold_mean"] < 0.65
    # averaging the folds' probabilities: wrong answers disagree less often than right ones, so the ensemble is
    # at least as good as the folds
    assert coin["external_ensemble_accuracy"] >= coin["external_accuracy_fold_mean"] - 0.05
    report = out.report.read_text()
    assert "**perfect** did best in cross-validation" in report
    assert "| **perfect** | efficientnet_lite0, packaged weights, full, 32 px, 3 epochs, +augment | 1.000 [1.000, 1.000] " \
           "| 1.000 ± 0.000" in report
    # the two differ in augmentation alone, so the report says what it bought
    change = perfect["oof_accuracy"] - coin["oof_accuracy"]
    assert f"| augment: False → True | coin → perfect | {coin['oof_accuracy']:.3f} → 1.000 | {change:+.3f} |" in report
    assert "Its interval overlaps" not in report  # 40 coin flips cannot reach 1.0
    # the bootstrap interval of the coin-flip variant is wide and holds its point estimate
    assert coin["oof_accuracy_low"] < coin["oof_accuracy"] < coin["oof_accuracy_high"]
    assert coin["oof_accuracy_high"] - coin["oof_accuracy_low"] > 0.2
    assert (out.figures / "confusion_perfect.png").stat().st_size > 1000
    assert (out.figures / "confusion_coin.png").exists()


def test_missing_predictions_say_what_to_run(tmp_path, collected_dir):
    with pytest.raises(PipelineError, match=r"is missing: run `dvc repro` so finetune covers repeat 0, fold 0, "
                                            r"variant x"):
        evaluate.run(make_params().evaluate, {"x": make_params().variants["cnn"]}, collected_dir,
                     lambda r, f, n: tmp_path / f"{r}{f}{n}",
                     outputs(tmp_path))


def test_score_and_interval_known_answers():
    targets = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]])
    result = score(targets, probs)
    assert result["accuracy"] == 0.75 and result["balanced_accuracy"] == 0.75
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert mean_std([0.5, 0.7, 0.6]) == (pytest.approx(0.6), pytest.approx(0.1))
    assert mean_std([0.9]) == (0.9, 0.0)


def test_bootstrap_interval_matches_the_binomial_spread():
    """200 images, 150 right: the 95% interval of the accuracy is about 0.75 +- 1.96 * sqrt(.75 * .25 / 200)."""
    targets = np.zeros(200, dtype=int)
    probs = np.tile([[0.2, 0.8]], (200, 1))
    probs[:150] = [0.8, 0.2]
    low, high = bootstrap_accuracy(targets, probs, 0.95)
    half = 1.96 * (0.75 * 0.25 / 200) ** 0.5
    assert low == pytest.approx(0.75 - half, abs=0.015) and high == pytest.approx(0.75 + half, abs=0.015)
    assert bootstrap_accuracy(targets, probs, 0.95) == (low, high)  # seeded: reproducible


def test_repeats_are_evaluated_together(tmp_path):
    """Two repeats of 2-fold CV: four fold scores, out-of-fold metrics averaged over the repeats, and an interval
    where an image counts with its share of right answers across repeats."""
    from pipeline import collect

    params = make_params(collect__repeats=[0, 1])
    collect.run(params.collect, tmp_path / "collected", tmp_path / "collect-reports")
    preds = tmp_path / "finetune"
    write_predictions(preds, tmp_path / "collected", "coin", 0.5, 3)
    summary = evaluate.run(params.evaluate, {"coin": params.variants["cnn"]}, tmp_path / "collected",
                           lambda repeat, fold, name: preds / f"r{repeat}-fold{fold}-{name}", outputs(tmp_path))
    coin = summary["coin"]
    assert 0.3 < coin["oof_accuracy"] < 0.7
    assert coin["oof_accuracy_low"] < coin["oof_accuracy"] < coin["oof_accuracy_high"]
    assert "2-fold cross-validation repeated 2 times" in outputs(tmp_path).report.read_text()
    # an image right in one repeat and wrong in the other counts half: the interval is narrower than one repeat's
    targets = np.zeros(100, dtype=int)
    right, wrong = np.tile([[0.9, 0.1]], (100, 1)), np.tile([[0.1, 0.9]], (100, 1))
    one_repeat = bootstrap_accuracy(targets, np.where(np.arange(100)[:, None] < 50, right, wrong), 0.95)
    halves = bootstrap_accuracy(targets, np.stack([np.where(np.arange(100)[:, None] % 2 == 0, right, wrong),
                                                   np.where(np.arange(100)[:, None] % 2 == 1, right, wrong)]), 0.95)
    assert halves == (0.5, 0.5) and one_repeat[1] - one_repeat[0] > 0.15
