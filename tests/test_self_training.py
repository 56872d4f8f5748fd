"""Self-training of the linear probe on the unlabelled pool (probe.self_train), on real scikit-learn digits."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from pipeline.training.probe import LinearProbe, balanced_pseudo_labels, self_train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y


def fit(rows, targets, weights):
    return LinearProbe(0.5, 10, CPU).fit(rows, targets, weights)


def draw(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labelled: 3 per class, pool: 900, held out: the rest) positions."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    labelled = np.concatenate([order[y[order] == k][:3] for k in range(10)])
    rest = rng.permutation(np.setdiff1d(order, labelled))
    return labelled, rest[:900], rest[900:]


def test_a_row_of_weight_two_counts_as_that_row_twice(digits):
    x, y = digits
    rows = np.arange(60)
    doubled = LinearProbe(0.5, 10, CPU).fit(np.concatenate([x[rows], x[rows[:20]]]),
                                            np.concatenate([y[rows], y[rows[:20]]]))
    weighted = LinearProbe(0.5, 10, CPU).fit(x[rows], y[rows], np.r_[np.full(20, 2.0), np.ones(40)])
    # the same standardisation and the same objective: the same probe
    assert np.allclose(doubled.predict_proba(x[200:]), weighted.predict_proba(x[200:]), atol=2e-3)
    assert torch.allclose(doubled.scale, weighted.scale) and torch.allclose(doubled.mean, weighted.mean, atol=1e-5)
    plain = LinearProbe(0.5, 10, CPU).fit(x[rows], y[rows])
    ones = LinearProbe(0.5, 10, CPU).fit(x[rows], y[rows], np.ones(60))
    assert np.allclose(plain.predict_proba(x[200:]), ones.predict_proba(x[200:]), atol=1e-6)


def test_pseudo_labels_take_the_most_confident_rows_of_each_predicted_class():
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.8, 0.2, 0.0], [0.2, 0.7, 0.1],
                      [0.1, 0.3, 0.6], [0.7, 0.3, 0.0]])
    rows, labels = balanced_pseudo_labels(probs, per_class=2)
    # class 0 is predicted for rows 0, 1, 2, 5: only its two surest (0 and 2) are taken, so it cannot crowd out
    # classes 1 and 2, which keep the one row each predicts
    assert rows.tolist() == [0, 2, 3, 4] and labels.tolist() == [0, 0, 1, 2]
    assert balanced_pseudo_labels(probs, per_class=0)[0].size == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_training_on_the_pool_beats_the_labels_alone(digits, seed):
    x, y = digits
    labelled, pool, held = draw(y, seed)
    alone = fit(x[labelled], y[labelled], None)
    trained, history = self_train(fit, x[labelled], y[labelled], x[pool], rounds=3, share=0.5, weight=1.0)
    before = (alone.predict_proba(x[held]).argmax(1) == y[held]).mean()
    after = (trained.predict_proba(x[held]).argmax(1) == y[held]).mean()
    assert after > before + 0.02  # measured: +0.04 to +0.10 on these three draws of 3 labels per class
    # the pool's pseudo-labelled share grows evenly to `share` in the last round, the same number for each class
    assert [h["pseudo_labelled"] for h in history] == [150, 300, 450]
    assert history[-1]["pseudo_label_share"] == pytest.approx(0.5)


def test_one_round_over_the_whole_pool_with_a_tiny_weight_is_nearly_the_labels_alone(digits):
    x, y = digits
    labelled, pool, held = draw(y, 0)
    alone = fit(x[labelled], y[labelled], None).predict_proba(x[held])
    trained, _ = self_train(fit, x[labelled], y[labelled], x[pool], rounds=1, share=1.0, weight=1e-6)
    assert (trained.predict_proba(x[held]).argmax(1) == alone.argmax(1)).mean() > 0.98
