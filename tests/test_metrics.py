"""The statistics module against independent references: scikit-learn for the metrics, formulas written out
here for the corrected t, hand-worked examples for ECE and Holm, and constructions whose answer is known for
the significance tests and the bootstrap's coverage."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from pipeline.evaluation import statistics as metrics
from pipeline.evaluation.statistics import (
    HIGHER_IS_BETTER,
    LABELS,
    METRICS,
    Comparison,
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
from pipeline.runtime.errors import PipelineError


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def make_case(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded predictions that are better than chance but far from perfect, in the shapes that trip metrics up."""
    rng = np.random.default_rng(seed)
    n, classes = {"binary": (60, 2), "multiclass": (120, 4), "absent": (90, 5), "ties": (80, 3),
                  "never_predicted": (70, 4)}[kind]
    present = classes - 1 if kind == "absent" else classes  # the last class never occurs in the targets
    targets = rng.integers(0, present, n)
    if kind == "ties":
        logits = rng.integers(0, 3, (n, classes)).astype(float)  # few distinct rows: tied scores and tied argmax
    else:
        logits = rng.normal(size=(n, classes))
    logits[np.arange(n), targets] += 1.0
    if kind == "never_predicted":
        logits[:, 0] -= 10  # class 0 is in the targets but never predicted: precision 0/0
    return targets, softmax(logits)


def reference_ece(targets: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE as Guo et al. write it: bins (lower, upper], share of images x |accuracy - mean confidence|."""
    confidence, right = probs.max(1), probs.argmax(1) == targets
    total = 0.0
    for lower, upper in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        inside = (confidence > lower) & (confidence <= upper)
        if inside.any():
            total += inside.mean() * abs(right[inside].mean() - confidence[inside].mean())
    return total


def reference_auc(targets: np.ndarray, probs: np.ndarray) -> float:
    """Mean over classes with both positives and negatives of sklearn's binary AUC of that class's column."""
    qualifying = [c for c in range(probs.shape[1]) if 0 < (targets == c).sum() < len(targets)]
    aucs = [roc_auc_score(targets == c, probs[:, c]) for c in qualifying]
    return float(np.mean(aucs))


CASES = [(kind, seed) for kind in ("binary", "multiclass", "absent", "ties", "never_predicted") for seed in (0, 1, 2)]


@pytest.mark.parametrize("kind,seed", CASES)
def test_metrics_match_sklearn(kind, seed):
    targets, probs = make_case(kind, seed)
    predicted, classes = probs.argmax(1), probs.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about classes predicted but absent from y_true
        expected = {
            "accuracy": accuracy_score(targets, predicted),
            "balanced_accuracy": balanced_accuracy_score(targets, predicted),
            "macro_f1": f1_score(targets, predicted, average="macro", zero_division=0),
            "roc_auc": reference_auc(targets, probs),
            "log_loss": log_loss(targets, probs, labels=range(classes)),
            "ece": reference_ece(targets, probs),
        }
    assert list(METRICS) == list(expected) == list(HIGHER_IS_BETTER) == list(LABELS)
    for name, fn in METRICS.items():
        assert fn(targets, probs) == pytest.approx(expected[name], abs=1e-12), name
    assert score(targets, probs) == pytest.approx(expected, abs=1e-12)
    if classes == 2:
        assert METRICS["roc_auc"](targets, probs) == pytest.approx(roc_auc_score(targets, probs[:, 1]), abs=1e-12)
    elif len(np.unique(targets)) == classes:
        assert METRICS["roc_auc"](targets, probs) == pytest.approx(
            roc_auc_score(targets, probs, multi_class="ovr", average="macro"), abs=1e-12)


def test_metric_edges():
    targets = np.array([0, 0, 1])
    # a single class in the targets: no class has both positives and negatives, so no AUC
    assert np.isnan(METRICS["roc_auc"](np.zeros(3, dtype=int), np.full((3, 2), 0.5)))
    # a zero probability on the target is clipped at 1e-15, not infinite
    assert METRICS["log_loss"](targets, np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])) == pytest.approx(
        -np.log(1e-15) / 3)
    assert HIGHER_IS_BETTER == {"accuracy": True, "balanced_accuracy": True, "macro_f1": True, "roc_auc": True,
                                "log_loss": False, "ece": False}
    with pytest.raises(PipelineError, match="probs"):
        score(np.zeros(4, dtype=int), np.full((3, 2), 0.5))
    with pytest.raises(PipelineError, match="class ids"):
        score(np.array([0, 2]), np.full((2, 2), 0.5))


def test_ece_on_a_case_worked_by_hand():
    """Two images at confidence 0.95 (one right): gap |0.5 - 0.95| = 0.45; two at 0.65 (both right): gap
    |1 - 0.65| = 0.35. Each bin holds half the images: ECE = 0.5 * 0.45 + 0.5 * 0.35 = 0.4."""
    targets = np.array([0, 1, 0, 1])
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.65, 0.35], [0.35, 0.65]])
    assert METRICS["ece"](targets, probs) == pytest.approx(0.4)
    # bins are (lower, upper] as in Guo et al.: a confidence of exactly 0.5 belongs to the lower of two bins
    edge = reliability(np.array([0, 0]), np.array([[0.5, 0.5], [1.0, 0.0]]), bins=2)
    np.testing.assert_array_equal(edge["count"], [1, 1])
    np.testing.assert_array_equal(edge["confidence"], [0.5, 1.0])


@pytest.mark.parametrize("kind", ["absent", "never_predicted", "ties"])
def test_per_class_matches_sklearn(kind):
    targets, probs = make_case(kind, 3)
    classes = probs.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision, recall, f1, support = precision_recall_fscore_support(
            targets, probs.argmax(1), labels=range(classes), zero_division=0)
    got = per_class(targets, probs)
    np.testing.assert_allclose(got["precision"], precision, atol=1e-12)
    np.testing.assert_allclose(got["recall"], recall, atol=1e-12)
    np.testing.assert_allclose(got["f1"], f1, atol=1e-12)
    np.testing.assert_array_equal(got["support"], support)


# ---- bootstrap -------------------------------------------------------------------------------------------------

def test_batched_resamples_equal_the_metric_on_the_drawn_images(monkeypatch):
    """The weighted shortcut must give, for every resample, exactly what the plain metric gives on the images
    drawn (averaged over repeats), NaN where ROC AUC has only one class: 12 images with one positive make that
    common. Chunks of 50 resamples check that the chunks join up."""
    monkeypatch.setattr(metrics, "RESAMPLE_CHUNK", 50 * 12)
    rng = np.random.default_rng(5)
    targets = np.r_[1, np.zeros(11, dtype=int)]
    probs = softmax(rng.normal(size=(2, 12, 2)))  # two repeats that disagree
    indices = metrics._draw_indices(12, 300, seed=7)
    draws = metrics._bootstrap_draws(metrics._as_repeats(targets, probs), list(METRICS), indices, np.arange(12))
    for name, fn in METRICS.items():
        expected = [np.mean([fn(targets[i], repeat[i]) for repeat in probs]) for i in indices]
        np.testing.assert_allclose(draws[name], expected, atol=1e-12, err_msg=name)
    assert np.isnan(draws["roc_auc"]).any() and not np.isnan(draws["roc_auc"]).all()
    low, high = bootstrap_intervals(targets, probs, resamples=300, seed=7)["roc_auc"]
    assert (low, high) == pytest.approx(tuple(np.nanpercentile(draws["roc_auc"], [2.5, 97.5])))


def test_bootstrap_covers_a_known_accuracy():
    """200 datasets of 100 images whose every prediction is right with probability 0.8: the 95% interval of
    the accuracy should contain 0.8 in roughly 95% of them."""
    rng = np.random.default_rng(11)
    covered = 0
    for dataset in range(200):
        targets = rng.integers(0, 2, 100)
        right = rng.random(100) < 0.8
        predicted = np.where(right, targets, 1 - targets)
        probs = np.where(predicted[:, None] == np.arange(2), 0.7, 0.3)
        low, high = bootstrap_intervals(targets, probs, seed=dataset)["accuracy"]
        covered += low <= 0.8 <= high
    assert 0.88 <= covered / 200 <= 0.99


def grouped_dataset(rng, groups: int, size: int, p: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`groups` groups of `size` pictures of one object each: the model is right or wrong about a whole group at
    once (probability p), as with several photos of one patient. (targets, probs, group of each image)"""
    group = np.repeat(np.arange(groups), size)
    targets = rng.integers(0, 2, groups)[group]
    right = (rng.random(groups) < p)[group]
    predicted = np.where(right, targets, 1 - targets)
    return targets, np.where(predicted[:, None] == np.arange(2), 0.7, 0.3), group


def test_with_groups_image_resampling_is_too_narrow_and_the_cluster_bootstrap_is_not():
    """A known answer: 150 datasets of 25 groups x 8 images, each group right with probability 0.8. Treating the
    200 images as independent, the 95% interval of the accuracy holds 0.8 far less often than 95%; resampling
    whole groups brings it back near 95% (a percentile bootstrap on 25 units runs a little under)."""
    rng = np.random.default_rng(3)
    by_image = by_group = 0
    widths = {"image": [], "group": []}
    for dataset in range(150):
        targets, probs, group = grouped_dataset(rng, 25, 8, 0.8)
        low, high = bootstrap_intervals(targets, probs, resamples=400, seed=dataset)["accuracy"]
        by_image += low <= 0.8 <= high
        widths["image"].append(high - low)
        low, high = bootstrap_intervals(targets, probs, resamples=400, seed=dataset, groups=group)["accuracy"]
        by_group += low <= 0.8 <= high
        widths["group"].append(high - low)
    assert by_image / 150 < 0.7  # about 0.5: the intervals are sqrt(8) times too narrow
    assert 0.88 <= by_group / 150 <= 0.99
    assert np.mean(widths["group"]) > 2.3 * np.mean(widths["image"])


def test_groups_of_one_image_are_the_image_bootstrap_and_the_paired_test_resamples_groups():
    rng = np.random.default_rng(8)
    targets, probs = make_case("multiclass", 4)
    singletons = rng.permutation(len(targets)) * 7  # any labels, each used once
    assert bootstrap_intervals(targets, probs, seed=2, groups=singletons) == bootstrap_intervals(targets, probs, seed=2)
    # B is right on 3 more groups of 8 than A out of 25: by images the difference looks firmer than it is
    targets, probs_a, group = grouped_dataset(rng, 25, 8, 0.6)
    probs_b = probs_a.copy()
    flipped = np.isin(group, np.flatnonzero([probs_a[group == g][0].argmax() != targets[group == g][0]
                                            for g in range(25)])[:3])
    probs_b[flipped] = probs_b[flipped][:, ::-1]
    by_image = paired_bootstrap(targets, probs_a, probs_b, seed=1)
    by_group = paired_bootstrap(targets, probs_a, probs_b, seed=1, groups=group)
    assert by_image.difference == by_group.difference == pytest.approx(24 / 200)
    assert by_group.high - by_group.low > 2 * (by_image.high - by_image.low)
    assert by_group.p_value > by_image.p_value
    with pytest.raises(PipelineError, match="one group per image"):
        bootstrap_intervals(targets, probs_a, groups=group[:-1])


def test_bootstrap_is_reproducible_and_repeats_average():
    targets, probs = make_case("multiclass", 4)
    first = bootstrap_intervals(targets, probs, seed=3)
    assert bootstrap_intervals(targets, probs, seed=3) == first
    assert bootstrap_intervals(targets, probs, seed=4) != first
    for name, (low, high) in first.items():
        assert low <= METRICS[name](targets, probs) <= high or name == "ece", name  # ECE is biased upward
    # identical repeats are one repeat
    tripled = bootstrap_intervals(targets, np.stack([probs] * 3), seed=3)
    for name in METRICS:
        assert tripled[name] == pytest.approx(first[name], abs=1e-12), name
    # each image right in one repeat and wrong in the other scores 0.5 in every resample
    targets = np.zeros(100, dtype=int)
    odd = (np.arange(100) % 2)[:, None]
    right, wrong = np.array([[0.9, 0.1]]), np.array([[0.1, 0.9]])
    halves = np.stack([np.where(odd, right, wrong), np.where(odd, wrong, right)])
    assert bootstrap_intervals(targets, halves)["accuracy"] == pytest.approx((0.5, 0.5))
    with pytest.raises(PipelineError, match="confidence"):
        bootstrap_intervals(targets, halves, confidence=95)


# ---- corrected resampled t ---------------------------------------------------------------------------------------

DIFFS = np.array([0.02, 0.05, -0.01, 0.04, 0.03, 0.06, 0.00, 0.05, 0.02, 0.04])  # 10 folds


def test_corrected_t_matches_the_formula():
    """Nadeau & Bengio: variance (1/J + n_test/n_train) s^2, t on J - 1 degrees of freedom."""
    ratio = 1 / 9  # 10-fold CV: each fold tests on a tenth and trains on nine
    j, mean, s = len(DIFFS), DIFFS.sum() / len(DIFFS), np.sqrt(((DIFFS - DIFFS.mean()) ** 2).sum() / (len(DIFFS) - 1))
    error = np.sqrt((1 / j + ratio) * s**2)
    half = stats.t.ppf(0.975, j - 1) * error
    assert corrected_t_interval(DIFFS, ratio) == pytest.approx((mean, mean - half, mean + half))
    half90 = stats.t.ppf(0.95, j - 1) * error
    assert corrected_t_interval(DIFFS, ratio, confidence=0.9) == pytest.approx((mean, mean - half90, mean + half90))
    result = corrected_t_test(DIFFS, ratio)
    assert isinstance(result, Comparison)
    assert result.difference == pytest.approx(mean)
    assert (result.low, result.high) == pytest.approx((mean - half, mean + half))
    assert result.p_value == pytest.approx(2 * stats.t.sf(mean / error, j - 1))
    # the correction is what makes it honest: the naive paired t-test is more confident
    assert result.p_value > stats.ttest_1samp(DIFFS, 0).pvalue


def test_corrected_t_edges():
    value, low, high = corrected_t_interval([0.8], 0.25)
    assert value == 0.8 and np.isnan(low) and np.isnan(high)
    assert np.isnan(corrected_t_test([0.1], 0.25).p_value)
    assert corrected_t_test(np.zeros(6), 0.25) == Comparison(0.0, 0.0, 0.0, 1.0)
    assert corrected_t_test(np.full(6, 0.05), 0.25).p_value == 0.0
    with pytest.raises(PipelineError, match="test_train_ratio"):
        corrected_t_interval(DIFFS, -1)


# ---- known-answer significance -------------------------------------------------------------------------------------

def predictions_right_on(targets: np.ndarray, right: np.ndarray, classes: int) -> np.ndarray:
    """0.7 on the target where right, else 0.7 on the next class; the rest spread evenly."""
    predicted = np.where(right, targets, (targets + 1) % classes)
    probs = np.full((len(targets), classes), 0.3 / (classes - 1))
    probs[np.arange(len(targets)), predicted] = 0.7
    return probs


def fold_accuracy_differences(targets, probs_a, probs_b, folds: int, seed: int) -> np.ndarray:
    """B's accuracy minus A's on each fold of a seeded partition of the images."""
    parts = np.array_split(np.random.default_rng(seed).permutation(len(targets)), folds)
    return np.array([METRICS["accuracy"](targets[i], probs_b[i]) - METRICS["accuracy"](targets[i], probs_a[i])
                     for i in parts])


def exactly(share: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """A mask that is True on exactly share x n randomly placed images."""
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[:round(share * n)]] = True
    return mask


def test_a_better_variant_is_found_significant():
    rng = np.random.default_rng(21)
    targets = rng.integers(0, 4, 200)
    probs_a = predictions_right_on(targets, exactly(0.6, 200, rng), 4)
    probs_b = predictions_right_on(targets, exactly(0.9, 200, rng), 4)
    boot = paired_bootstrap(targets, probs_a, probs_b)
    assert boot.difference == pytest.approx(0.3)
    assert boot.p_value < 0.05 and 0 < boot.low < boot.difference < boot.high
    diffs = fold_accuracy_differences(targets, probs_a, probs_b, folds=10, seed=0)
    assert (diffs > 0).all()  # B is higher on every fold
    t_test = corrected_t_test(diffs, test_train_ratio=20 / 180)
    assert t_test.difference == pytest.approx(0.3)
    assert t_test.p_value < 0.05 and 0 < t_test.low
    # the same holds with a repeats axis, and for a metric where lower is better the difference is negative
    repeated = paired_bootstrap(targets, np.stack([probs_a] * 2), np.stack([probs_b] * 2), metric="log_loss")
    assert repeated.difference < 0 and repeated.high < 0 and repeated.p_value < 0.05


def test_identical_variants_differ_by_nothing():
    targets, probs = make_case("multiclass", 6)
    for metric in METRICS:
        assert paired_bootstrap(targets, probs, probs, metric=metric) == Comparison(0.0, 0.0, 0.0, 1.0), metric
    assert corrected_t_test(fold_accuracy_differences(targets, probs, probs, 10, 0), 1 / 9).p_value == 1.0


def test_equal_accuracy_with_different_errors_is_not_significant():
    """A is right on images 0-119, B on images 80-199: both 60%, each right on 80 images the other gets wrong."""
    rng = np.random.default_rng(8)
    targets = rng.integers(0, 3, 200)
    probs_a = predictions_right_on(targets, np.arange(200) < 120, 3)
    probs_b = predictions_right_on(targets, np.arange(200) >= 80, 3)
    boot = paired_bootstrap(targets, probs_a, probs_b)
    assert boot.difference == 0 and boot.p_value > 0.05 and boot.low < 0 < boot.high
    t_test = corrected_t_test(fold_accuracy_differences(targets, probs_a, probs_b, 10, 1), 1 / 9)
    assert t_test.p_value > 0.05 and t_test.low < 0 < t_test.high


def test_bootstrap_p_value_is_never_zero():
    """B always right, A always wrong: no resample has a difference <= 0, so p = 2 x (0 + 1) / (1000 + 1)."""
    targets = np.zeros(50, dtype=int)
    wrong, right = np.tile([[0.2, 0.8]], (50, 1)), np.tile([[0.8, 0.2]], (50, 1))
    result = paired_bootstrap(targets, wrong, right)
    assert result.difference == 1.0 and result.p_value == pytest.approx(2 / 1001)
    assert paired_bootstrap(targets, wrong, right, seed=1, resamples=500) == paired_bootstrap(
        targets, wrong, right, seed=1, resamples=500)
    with pytest.raises(PipelineError, match="accuracy, balanced_accuracy"):
        paired_bootstrap(targets, wrong, right, metric="top5")


# ---- Holm ------------------------------------------------------------------------------------------------------------

def test_holm_on_a_hand_worked_example():
    """Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; made monotone the last becomes
    0.06. Back in input order, with the NaN left where it was and not counted."""
    adjusted = holm([0.01, np.nan, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, np.nan, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.6, 0.7]), [1.0, 1.0])  # 1.2 and 0.7 -> monotone 1.2 -> capped
    assert holm([]).shape == (0,)


# ---- reliability diagram and ROC curve ---------------------------------------------------------------------------

def test_reliability_and_a_calibrated_model():
    """At each confidence level q of 0.55 ... 0.95, exactly q x 200 of the 200 images are right: calibrated."""
    levels = np.array([0.55, 0.65, 0.75, 0.85, 0.95])
    confidence = np.repeat(levels, 200)
    right = np.concatenate([np.arange(200) < round(q * 200) for q in levels])
    targets = np.zeros(1000, dtype=int)
    predicted = np.where(right, 0, 1)
    probs = np.where(predicted[:, None] == np.arange(2), confidence[:, None], 1 - confidence[:, None])
    assert METRICS["ece"](targets, probs) == pytest.approx(0, abs=1e-12)
    diagram = reliability(targets, probs)
    assert diagram["count"].sum() == 1000 and len(diagram["count"]) == 5
    np.testing.assert_allclose(diagram["accuracy"], diagram["confidence"])
    np.testing.assert_allclose(diagram["confidence"], levels)
    # a random model that is calibrated in expectation is close, an overconfident one is not
    rng = np.random.default_rng(2)
    confidence = rng.uniform(0.5, 1, 5000)
    right = rng.random(5000) < confidence
    probs = np.where(np.where(right, 0, 1)[:, None] == np.arange(2), confidence[:, None], 1 - confidence[:, None])
    targets = np.zeros(5000, dtype=int)
    assert METRICS["ece"](targets, probs) < 0.03
    assert reliability(targets, probs, bins=7)["count"].sum() == 5000
    overconfident = np.where(probs > 0.5, np.minimum(probs + 0.2, 1), np.maximum(probs - 0.2, 0))
    assert METRICS["ece"](targets, overconfident) > 0.15


def test_roc_points():
    targets, probs = make_case("multiclass", 9)
    fpr, tpr = roc_points(targets, probs)
    onehot = targets[:, None] == np.arange(probs.shape[1])
    expected_fpr, expected_tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(tpr, expected_tpr)
    # thinned: at most max_points, still from (0, 0) to (1, 1), monotone, and points of the full curve
    thin_fpr, thin_tpr = roc_points(targets, probs, max_points=20)
    assert len(thin_fpr) <= 20 < len(fpr)
    for x, y in ((fpr, tpr), (thin_fpr, thin_tpr)):
        assert (x[0], y[0]) == (0, 0) and (x[-1], y[-1]) == (1, 1)
        assert (np.diff(x) >= 0).all() and (np.diff(y) >= 0).all()
    full = set(zip(fpr, tpr))
    assert all(point in full for point in zip(thin_fpr, thin_tpr))
    # a perfect classifier reaches the top-left corner
    perfect = np.where(onehot, 0.9, 0.1 / (probs.shape[1] - 1))
    assert (0, 1) in set(zip(*roc_points(targets, perfect)))
