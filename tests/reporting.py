"""Predictions with known answers, and a whole evaluate run on them, for the evaluate and browser tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.collected import load_collected
from pipeline.stages import augment, collect, evaluate, scarcity, synthesize
from pipeline.stages.evaluate import EvaluateInputs, EvaluateOutputs

from conftest import make_params

# 10 labelled digits per class in 5 folds, repeated twice: enough folds for the corrected t-test to have power
CV = {"collect__images_per_class": 10, "collect__folds": [0, 1, 2, 3, 4], "collect__repeats": [0, 1],
      "scarcity__images_per_class": [5, 10, 1000], "scarcity__variants": ["probe"]}


def write_predictions(root: Path, collected_dir: Path, name: str, correct: tuple[float, float, float],
                      seed: int) -> None:
    """Fold predictions right for a share `correct[0]` of the validation images, `correct[1]` of the external
    images' development part and `correct[2]` of their final test (images chosen at random, seeded),
    confidently."""
    data = load_collected(collected_dir)
    rng = np.random.default_rng(seed)
    targets = data.manifest.target.to_numpy()
    external_share = np.where(data.manifest.part == "dev", correct[1], correct[2])

    def probs(index, share):
        share = share if np.isscalar(share) else share[index]
        predicted = np.where(rng.random(len(index)) < share, targets[index], (targets[index] + 1) % 10)
        out = np.full((len(index), 10), 0.01)
        out[np.arange(len(index)), predicted] = 0.91
        return out

    for repeat in data.repeats:
        for fold in data.folds:
            val = data.fold_split(fold, repeat)[1]["index"].to_numpy()
            test = data.external["index"].to_numpy()
            folder = root / f"r{repeat}-fold{fold}-{name}"
            folder.mkdir(parents=True)
            pool = data.unlabelled["index"].to_numpy()
            # the pool's guesses: unknown answers, varied certainty (a stream apart, so the others draw as before)
            logits = np.random.default_rng([seed, repeat, fold]).normal(0, 2, (len(pool), 10))
            pool_probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            np.savez(folder / "predictions.npz", val_index=val, val_probs=probs(val, correct[0]), test_index=test,
                     test_probs=probs(test, external_share), pool_index=pool, pool_probs=pool_probs)
            (folder / "history.json").write_text("[]")


@dataclass
class Evaluated:
    evaluation: dict
    outputs: EvaluateOutputs
    inputs: EvaluateInputs


def outputs_in(root: Path) -> EvaluateOutputs:
    reports = root / "reports"
    return EvaluateOutputs(reports / "metrics.json", reports / "test_metrics.json", reports / "evaluation.json",
                           reports / "report.md",
                           reports / "report.html", reports / "figures", reports / "plots", reports / "labelling")


def evaluate_known_answers(root: Path) -> Evaluated:
    """Real collect, augment, one GAN fold and a real scarcity curve (the linear probe); fold predictions made up
    with known accuracies: `coin` right half the time, `good` (coin's recipe + augmentation) 95%, `twin` (coin's
    recipe with other epochs) the very same predictions as coin, `overfit` 95% in CV but 30% on the development
    part and 60% on the final test."""
    params = make_params(**CV)
    collect.run(params.collect, root / "collected", root / "reports")
    augment.run(params.augment, root / "collected", root / "augment")
    synthesize.run(params.synthesize, 0, root / "collected", synthesize.SynthesizeOutputs(
        root / "synthetic", root / "reports" / "synthesize", "r0-fold0"), policy=root / "augment" / "policy.json")
    for n in params.scarcity.images_per_class:
        scarcity.run(params.scarcity, params.finetune, params.variants["probe"], n,
                     scarcity.ScarcityInputs(root / "collected", root / "augment" / "policy.json"),
                     scarcity.ScarcityOutputs(root / "scarcity" / f"n{n}-probe", None, root / "features"))
    preds = root / "finetune"
    for name, correct, seed in (("coin", (0.5, 0.5, 0.5), 1), ("good", (0.95, 0.95, 0.95), 2),
                                ("twin", (0.5, 0.5, 0.5), 1), ("overfit", (0.95, 0.3, 0.6), 3)):
        write_predictions(preds, root / "collected", name, correct, seed)
    base = dataclasses.replace(make_params("study").variants["augment"], augment=False)
    variants = {"coin": base, "good": base.__class__(**{**base.__dict__, "augment": True}),
                "twin": base.__class__(**{**base.__dict__, "epochs": base.epochs + 1}),
                "overfit": params.variants["cnn"]}
    inputs = EvaluateInputs(root / "collected", lambda r, k, v: preds / f"r{r}-fold{k}-{v}",
                            lambda n, v: root / "scarcity" / f"n{n}-{v}", root / "augment" / "preview.png",
                            root / "reports" / "data_card", root / "reports" / "synthesize")
    outputs = outputs_in(root)
    return Evaluated(evaluate.run(params.evaluate, variants, params.scarcity, inputs, outputs), outputs, inputs)
