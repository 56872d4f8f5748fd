"""Stage 6, final: train the chosen variant on every labelled image and save it for use.

`final.variant` names a variant, or `best` for the one the evaluation ranked first (unless that one's lead is GAN
samples that did not earn it: a significant gain over the same recipe without them; then that recipe, and the
model card says why). The model is trained exactly
as in cross-validation (same recipe, same number of epochs), only on all the labelled images instead of k-1
folds of them, so the CV figures describe it (slightly pessimistically: it saw 1/k more data). A variant with
GAN samples gets a GAN trained on every labelled image, filtered as in synthesize. Writes
data/model/ (weights, model card, TorchScript and ONNX exports; see pipeline/inference/model.py) and, where there are
external images, the final model's accuracy on their development part and final test in reports/final.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.augmentation.policy import load_policy
from pipeline.data.collected import EXTERNAL_PARTS, Collected, load_collected
from pipeline.data.decode import Normalise
from pipeline.gan.samples import make_samples
from pipeline.inference import model as inference
from pipeline.inference.card import card_markdown, choose, manifest_hash, model_card
from pipeline.runtime import atomic, paths
from pipeline.runtime.cli import cli, stage_args
from pipeline.runtime.compute import World, pick_device, seed_everything
from pipeline.runtime.params import FinalParams, FinetuneParams, SynthesizeParams, Variant
from pipeline.training.learners import Job, Workspace, real_training_set, train, with_pool

log = logging.getLogger(__name__)
# The params sections this stage reads; dvc.yaml lists the same (a test checks both).
PARAMS = ("collect", "final", "finetune", "synthesize", "variants")


@dataclass(frozen=True)
class FinalInputs:
    collected: Path
    policy: Path
    evaluation: Path  # evaluate's evaluation.json: the ranking and the CV figures for the card


@dataclass(frozen=True)
class FinalSettings:
    final: FinalParams
    finetune: FinetuneParams
    synthesize: SynthesizeParams  # for a variant with GAN samples: its GAN, trained on every labelled image
    variants: dict[str, Variant]
    image: Normalise  # how collect prepared and refused images: predictions must prepare theirs the same way


@dataclass(frozen=True)
class FinalOutputs:
    folder: Path  # the model folder
    metrics: Path  # the final model's accuracy on each part of the external images (DVC metrics)
    checkpoints: Path | None = None


def gan_samples(settings: FinalSettings, collected: Collected, policy: Path,
                device) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The accepted samples of a GAN trained on every labelled image (no validation images are left to measure
    CAS on, so only the external set's CAS is recorded, where there is one); `policy` draws the filter's views."""
    seed_everything(settings.synthesize.seed)
    labelled = collected.labelled
    made = make_samples(settings.synthesize, collected, (labelled, labelled.iloc[:0]), device, None,
                        policy=load_policy(policy))
    quality = {k: v for k, v in made.quality.items() if v is not None and k != "acceptance_per_class"}
    return made.fake[made.kept], made.labels[made.kept].astype(np.int64), made.scores[made.kept], quality


def run(settings: FinalSettings, inputs: FinalInputs, outputs: FinalOutputs) -> dict:
    """Train, save, export; return the model card."""
    finetune = settings.finetune
    evaluation = json.loads(inputs.evaluation.read_text())
    name = choose(settings.final, settings.variants, evaluation)
    variant = settings.variants[name]
    collected = load_collected(inputs.collected)
    # the pictures as stored (`auto` settings resolved by collect), which predictions must match
    image = dataclasses.replace(settings.image, size=int(collected.images.shape[1]),
                                channels=int(collected.images.shape[3]))
    device = pick_device(finetune.device)
    rows = collected.labelled
    images, targets = collected.select(rows)
    data = real_training_set(images, targets, rows["group"].to_numpy(), finetune, variant, finetune.seed)
    gan = {}
    if variant.synthetic:
        fake, fake_targets, confidence, gan = gan_samples(settings, collected, inputs.policy, device)
        data = dataclasses.replace(data, synthetic=fake, synthetic_targets=fake_targets,
                                   synthetic_confidence=confidence.astype(np.float32))
    if variant.unlabelled:
        data = with_pool(data, collected, None)
    seed_everything(finetune.seed)
    external_images, external_targets = collected.select(collected.external)
    job = Job(finetune, variant, data, (external_images, images[:0]), len(collected.classes), inputs.policy,
              Workspace(None, outputs.checkpoints, None), device, World())
    outcome = train(job)
    card = model_card(name, variant, outcome.model, finetune, image, list(collected.classes), evaluation,
                      manifest_hash(list(rows.sha256)), len(images))
    if variant.synthetic:
        card["gan"] = {"samples": len(data.synthetic), **gan, "params": asdict(settings.synthesize)}
    if data.semi_supervised:
        card["unlabelled_images"] = len(data.unlabelled)
    correct = outcome.probs[0].argmax(1) == external_targets
    parts = collected.external.part.to_numpy()
    card["final_accuracy"] = {part: float(correct[parts == part].mean()) for part in EXTERNAL_PARTS
                              if (parts == part).any()}
    metrics = {f"{part}_accuracy": value for part, value in card["final_accuracy"].items()}
    with atomic.atomic_dir(outputs.folder) as tmp:
        inference.save_model(tmp, outcome.model, card)
        inference.export(outcome.model, card, tmp)
        atomic.write_text(tmp / inference.CARD_MD_FILE, card_markdown(card))
    atomic.write_json(outputs.metrics, metrics)
    log.info("final: %s trained on %d images%s", name, len(images),
             "".join(f"; {part} accuracy {value:.3f}" for part, value in card["final_accuracy"].items()))
    return card


def main(argv: list[str] | None = None) -> None:
    _, params = stage_args(__doc__, argv, PARAMS)
    collect = params.collect  # size and channels may be `auto`: run() takes them from the collected pictures
    image = Normalise(0, 0, collect.fit, collect.min_side, collect.max_pixels)
    settings = FinalSettings(params.final, params.finetune, params.synthesize, params.variants, image)
    inputs = FinalInputs(paths.COLLECTED, paths.AUGMENT / paths.POLICY_FILE, paths.EVALUATION)
    outputs = FinalOutputs(paths.MODEL, paths.FINAL_METRICS, paths.CHECKPOINTS / "final")
    run(settings, inputs, outputs)


if __name__ == "__main__":
    cli(main)
