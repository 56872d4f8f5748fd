"""The evaluate stage on predictions with known answers (see tests/reporting.py): the better variant is found
significant, an identical one is not, an optimistic CV estimate is flagged, and every output is written."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation import analysis, report
from pipeline.runtime.errors import PipelineError
from pipeline.stages import evaluate

from conftest import make_params
from reporting import outputs_in


def test_a_variant_better_by_construction_is_significant_and_an_identical_one_is_not(known_answers):
    ev = known_answers.evaluation
    by_pair = {(c["a"], c["b"]): c for c in ev["comparisons"]}
    better = by_pair[("coin", "good")]  # differ in augmentation alone: 50% against 95% right
    assert better["what"] == "augmentation: off → on" and better["setting"] == "augment" and better["significant"]
    assert by_pair[("coin", "twin")]["setting"] == "epochs"  # the final stage reads which setting a pair isolates
    assert all(c["setting"] is None for c in ev["comparisons"] if c["what"].startswith("best"))
    assert 0.35 < better["difference"] < 0.55 and better["low"] > 0 and better["p_holm"] < 0.001
    assert better["corrected_t"]["p_value"] < 0.001 and better["bootstrap"]["p_value"] < 0.01
    same = by_pair[("coin", "twin")]  # differ in epochs alone, same predictions
    assert same["difference"] == 0 and same["p_holm"] == 1 and not same["significant"]
    # every fold moved by exactly 0, so the t statistic is undefined and the paired bootstrap decides
    assert same["test"] == "bootstrap"
    assert ev["best"] == "good"
    # beside the CV verdict, the paired comparison of the fold ensembles on each part of the 300 external images
    for part in ("dev", "test"):
        assert 0.3 < better["external"][part]["difference"] < 0.6 and better["external"][part]["low"] > 0
        assert same["external"][part]["difference"] == 0 and same["external"][part]["p_value"] == 1
    report = known_answers.outputs.report_md.read_text()
    assert "2 of 4 differences are significant" in report  # good beats coin and its twin; not overfit (same CV)
    assert "On the development part the fold ensembles differ by +0.000 (+0.000 to +0.000, p 1.000)" in report
    assert "**Helped:** augmentation: off → on (coin → good) raised accuracy by" in report
    assert "**Not significant:** epochs: 3 → 4 (coin → twin) left accuracy by 0.000" in report
    # the winner was chosen on these folds: the procedure's estimate picks from good and overfit (both 95% in CV)
    selection = ev["selection"]
    assert {c["variant"] for c in selection["chosen"]} <= {"good", "overfit"} and len(selection["chosen"]) == 10
    assert 0.85 < selection["accuracy"]["mean"] < 1
    assert "(leave-one-fold-out selection) estimates the whole choose-then-train procedure" in report
    assert "test it on the folds that chose it, so they favour it" in report
    metrics = json.loads(known_answers.outputs.metrics.read_text())
    assert metrics["selection.accuracy"] == selection["accuracy"]["mean"]


def test_repeats_and_folds_give_intervals_that_hold_the_estimates(known_answers):
    ev = known_answers.evaluation
    assert ev["data"]["folds"] == 5 and ev["data"]["repeats"] == 2 and ev["data"]["labelled"] == 100
    coin = ev["variants"]["coin"]
    for metric, v in coin["oof"].items():
        assert v["low"] <= v["value"] <= v["high"], metric
    cv = coin["cv"]["accuracy"]
    assert cv["low"] < cv["mean"] < cv["high"] and 0.3 < cv["mean"] < 0.7 and cv["std"] > 0
    assert coin["oof"]["accuracy"]["high"] - coin["oof"]["accuracy"]["low"] > 0.1  # 100 images: a wide interval
    assert set(coin["oof_per_class"]) == {"precision", "recall", "f1", "support"}
    assert sum(coin["oof_per_class"]["support"]) == 100
    assert "5-fold cross-validation repeated 2 times" in known_answers.outputs.report_md.read_text()


def test_the_final_test_is_scored_apart_and_checked_against_the_cv_interval(known_answers):
    ev = known_answers.evaluation
    assert ev["data"]["dev"] + ev["data"]["test"] == ev["data"]["external"] == 300
    assert abs(ev["data"]["dev"] - ev["data"]["test"]) <= 10  # collect.dev_fraction 0.5, stratified by class
    assert ev["variants"]["coin"]["test_inside_cv_interval"]
    overfit = ev["variants"]["overfit"]  # 95% in cross-validation, 30% on the development part, 60% on the test
    assert overfit["dev"]["accuracy"]["fold_mean"] == pytest.approx(0.3, abs=0.07)
    assert overfit["test"]["accuracy"]["fold_mean"] == pytest.approx(0.6, abs=0.07)
    assert not overfit["test_inside_cv_interval"]
    assert sum(overfit["dev_per_class"]["support"]) == ev["data"]["dev"]
    report = known_answers.outputs.report_md.read_text()
    results, final = report.split("## The final test")[0], report.split("## The final test")[1].split("\n## ")[0]
    row = next(line for line in final.splitlines() if line.startswith("| overfit |"))
    assert row.endswith("| **no** |")
    # the results table to choose by shows the development part; the final test's figures only in their section
    dev_mean, test_mean = (f"{overfit[p]['accuracy']['fold_mean']:.3f} ± " for p in ("dev", "test"))
    assert dev_mean in results and test_mean not in results
    assert "chose nothing" in final and test_mean in row


def test_metrics_to_choose_by_and_final_test_metrics_are_in_separate_files(known_answers):
    metrics = json.loads(known_answers.outputs.metrics.read_text())
    tested = json.loads(known_answers.outputs.test_metrics.read_text())
    ev = json.loads(known_answers.outputs.evaluation.read_text())
    for flat in (metrics, tested):
        assert all(isinstance(v, (int, float)) or v is None for v in flat.values())
    assert metrics["good.oof_accuracy"] == ev["variants"]["good"]["oof"]["accuracy"]["value"]
    assert metrics["coin.cv_accuracy_low"] == ev["variants"]["coin"]["cv"]["accuracy"]["low"]
    assert metrics["overfit.dev_accuracy_fold_mean"] == pytest.approx(0.3, abs=0.07)
    assert metrics["compare.good-coin.p_holm"] < 0.001
    good_coin = next(c for c in ev["comparisons"] if (c["a"], c["b"]) == ("coin", "good"))
    assert metrics["compare.good-coin.dev_difference"] == good_coin["external"]["dev"]["difference"]
    assert {f"{v}.oof_{m}" for v in ("coin", "good") for m in ("roc_auc", "log_loss", "ece", "macro_f1")} <= set(metrics)
    # nothing measured on the final test sits among the numbers to choose by, and the other way round
    assert not [k for k in metrics if "test" in k and not k.startswith("scarcity.")]
    assert tested["overfit.test_accuracy_fold_mean"] == pytest.approx(0.6, abs=0.07)
    assert tested["good.test_accuracy"] == ev["variants"]["good"]["test"]["accuracy"]["ensemble"]
    assert set(tested) == {k.replace(".dev_", ".test_") for k in metrics if ".dev_" in k}


def test_the_scarcity_curve_reports_each_point_and_the_one_not_run(known_answers):
    curve = known_answers.evaluation["scarcity"]["probe"]
    assert [p["images_per_class"] for p in curve] == [5, 10, 1000]
    five, ten, too_many = curve
    assert five["train_images"] == 50 and ten["train_images"] == 100
    assert five["oof_accuracy_low"] <= five["oof_accuracy"] <= five["oof_accuracy_high"]
    assert 0.15 < ten["test_accuracy_fold_mean"] <= 1  # the probe beats chance (0.1) on the fixed test set
    assert "fewer than 1000" in too_many["not_run"]
    table = pd.read_csv(known_answers.outputs.plots / "scarcity" / "probe.csv")
    assert table.images_per_class.tolist() == [5, 10]
    assert "not run: class" in known_answers.outputs.report_md.read_text()


def test_dvc_plot_files_hold_every_out_of_fold_prediction(known_answers):
    plots = known_answers.outputs.plots
    confusion = pd.read_csv(plots / "confusion" / "good.csv", dtype=str)
    assert len(confusion) == 200  # 100 images x 2 repeats
    assert 0.85 < (confusion.actual == confusion.predicted).mean() <= 1
    roc = pd.read_csv(plots / "roc" / "good.csv")
    assert roc.iloc[0].tolist() == [0, 0] and roc.iloc[-1].tolist() == [1, 1]
    calibration = pd.read_csv(plots / "calibration" / "coin.csv")
    assert calibration["count"].sum() == 100
    for name in ("accuracy", "differences", "scarcity", "reliability", "roc", "confusion_good",
                 "confusion_good_dev"):
        assert (known_answers.outputs.figures / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name


def test_html_report_is_self_contained_and_says_what_the_markdown_says(known_answers):
    page = known_answers.outputs.report_html.read_text()
    markdown = known_answers.outputs.report_md.read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(sources) == markdown.count("![")
    assert not re.search(r'(src|href)="(https?:|//)', page) and "<script" not in page
    for section in ("What each ingredient bought", "How it scales with labelled data", "Where the errors are",
                    "The data", "Augmentation", "Synthetic samples"):
        assert f">{section}</h" in page and f"# {section}" in markdown
    assert "FID" in page and "CAS (samples)" in page and "novelty" in page  # the GAN fold's sample quality beside its grid
    # and its filter's acceptance of real images beside the samples' (a number, not a dash: the run measured it)
    assert re.search(r"acceptance of real images</th>.*?<tbody>\s*<tr>(<td>[^<]*</td>){3}<td>[01]\.\d{3}</td>", page, re.S)


def test_html_report_escapes_names_from_users_folders(tmp_path):
    # class names are folder names: a folder may be called "<script>..." or "cats & dogs"
    classes = ["<script>alert(1)</script>", "cats & dogs"]
    figure = tmp_path / "confusion.png"
    figure.write_bytes(b"\x89PNG not decoded here")
    scores = {"precision": [1.0, 0.5], "recall": [1.0, 0.5], "f1": [1.0, 0.5], "support": [3, 4]}
    blocks = [report.Heading("Where <the> errors are"), report.Text("**<b>best</b>** & co"),
              report.Details("<img src=x onerror=alert(1)> (best)",
                             [report.Figure(figure, 'a "quoted" <caption>'), report.per_class_table(classes, scores)])]
    page = report.to_html(blocks, "Results: <i>x</i> did best")
    assert "<script" not in page and "<img src=x" not in page and "<i>" not in page and "<b>" not in page
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in page and "<td>cats &amp; dogs</td>" in page
    assert "<h2>Where &lt;the&gt; errors are</h2>" in page
    assert "<title>Results: &lt;i&gt;x&lt;/i&gt; did best</title>" in page
    assert "<summary>&lt;img src=x onerror=alert(1)&gt; (best)</summary>" in page
    assert 'alt="a &#34;quoted&#34; &lt;caption&gt;"' in page  # an attribute value cannot be closed early
    assert "<p><strong>&lt;b&gt;best&lt;/b&gt;</strong> &amp; co</p>" in page  # **bold** stays markup


def test_missing_predictions_say_what_to_run(tmp_path, known_answers):
    params = make_params()
    inputs = known_answers.inputs.__class__(**{**known_answers.inputs.__dict__,
                                              "finetune": lambda r, f, n: tmp_path / f"{r}{f}{n}"})
    with pytest.raises(PipelineError, match=r"is missing: run `dvc repro` so it covers repeat 0, fold 0, variant x"):
        evaluate.run(params.evaluate, {"x": params.variants["cnn"]}, params.scarcity, inputs, outputs_in(tmp_path))


def test_single_changes_pair_variants_that_differ_in_one_setting():
    variants = make_params("study").variants
    pairs = analysis.single_changes(variants)
    assert ("weights", "scratch", "baseline") in pairs and ("augment", "baseline", "augment") in pairs
    assert ("synthetic", "augment", "synthetic") in pairs and ("synthetic", "cnn", "cnn_synthetic") in pairs
    assert all(a != b for _, a, b in pairs) and not any(s == "backbone" and a == "scratch" for s, a, _ in pairs)
    assert np.all([isinstance(s, str) for s, _, _ in pairs])


def fold_result(name: str, accuracies: list[float]):
    """A variant's cross-validation as evaluate loads it, with these validation accuracies on 4 folds."""
    empty = np.zeros((1, 0, 2))
    return analysis.VariantResult(name, [{"accuracy": a} for a in accuracies], 0.25, np.zeros(0, int), np.zeros(0, int),
                                  empty, None, None)


def test_selection_aware_estimate_sees_through_a_winner_chosen_by_noise():
    """A is right on folds 0-1 and B on folds 2-3; both average 0.5 like the steady C, and A wins the tie. Chosen on
    the other folds, the pick for every held-out fold is the variant that is wrong there: the procedure's estimate
    is 0, not the winner's 0.5. With a real difference the procedure finds the better variant every time."""
    params = make_params().evaluate
    results = {"a": fold_result("a", [1, 1, 0, 0]), "b": fold_result("b", [0, 0, 1, 1]),
               "c": fold_result("c", [0.5] * 4)}
    selection = analysis.selection_aware(results, 4, params)
    assert [c["variant"] for c in selection["chosen"]] == ["b", "b", "a", "a"]
    assert selection["accuracy"]["mean"] == 0.0
    steady = {"worse": fold_result("worse", [0.6, 0.5, 0.6, 0.5]), "better": fold_result("better", [0.8, 0.9, 0.8, 0.9])}
    found = analysis.selection_aware(steady, 4, params)
    assert {c["variant"] for c in found["chosen"]} == {"better"} and found["accuracy"]["mean"] == pytest.approx(0.85)
    near_perfect = analysis.selection_aware({"x": fold_result("x", [1, 1, 0.9, 1])}, 4, params)["accuracy"]
    assert near_perfect["high"] == 1.0 and near_perfect["low"] < 0.95  # the t interval clipped to what accuracy can be


def test_the_best_variants_doubtful_labels_and_the_pool_images_to_label_next_are_listed(known_answers):
    """Known answers: the best variant's wrong out-of-fold predictions say target + 1, so any label it doubts is
    an image it got wrong; five planted confident errors are all found, with the class they point to; the
    pool's guesses are random, so the images chosen to label next must be less certain than the pool's typical
    one."""
    import torch

    from pipeline.data.collected import load_collected
    from pipeline.evaluation import labelling
    from pipeline.evaluation.label_next import margin_uncertainty

    from reporting import CV

    ev, inputs, folder = known_answers.evaluation, known_answers.inputs, known_answers.outputs.labelling
    collected = load_collected(inputs.collected)
    best = analysis.load_variant(ev["best"], collected, inputs.finetune)
    oof = best.oof_probs.mean(0)
    given = oof[np.arange(len(oof)), best.oof_targets]
    doubted = set(collected.labelled["index"].to_numpy()[given < 0.5])  # wrong in at least one repeat
    errors = pd.read_csv(folder / "label_errors.csv", dtype={"given": str, "suggested": str})
    assert list(errors.columns) == ["index", "path", "given", "suggested", "given_probability",
                                    "suggested_probability"]
    assert set(errors["index"]) <= doubted
    # a split vote (right in one repeat, wrong in the other) is no confident error; plant five that are
    planted = best.oof_probs.copy()
    rows = np.random.default_rng(0).choice(len(oof), 5, replace=False)
    planted[:, rows] = 0.01
    planted[:, rows, (best.oof_targets[rows] + 3) % 10] = 0.91
    lists = labelling.review(collected, planted, best.pool_probs, make_params(**CV).evaluate, torch.device("cpu"))
    found = lists.errors[lists.errors["index"].isin(collected.labelled["index"].to_numpy()[rows])]
    assert len(found) == 5 and (found.suggested.astype(int) == (found.given.astype(int) + 3) % 10).all()
    assert lists.errors.given_probability.is_monotonic_increasing  # most doubtful first
    assert set(lists.errors["index"]) - set(found["index"]) <= doubted

    chosen = pd.read_csv(folder / "label_next.csv")
    pool = collected.unlabelled
    assert len(chosen) == 50 and chosen["index"].is_unique and set(chosen["index"]) <= set(pool["index"])
    assert ev["labelling"]["next_strategy"] == "uncertainty_diversity"  # 10 labelled per class >= cold_start 5
    margins = pd.Series(margin_uncertainty(best.pool_probs), index=pool["index"].to_numpy())
    assert margins[chosen["index"]].median() < margins.quantile(0.25)
    assert chosen["rank"].tolist() == list(range(1, 51))
    report_md = known_answers.outputs.report_md.read_text()
    assert "## Labels to check" in report_md and "## What to label next" in report_md
    assert ("doubt none of the 100 labels" in report_md) == errors.empty  # the report says so when none is doubted
    for png in ("label_errors.png", "label_next.png"):
        assert (known_answers.outputs.figures / png).stat().st_size > 1000
