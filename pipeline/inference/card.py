"""The final model's card: which variant it is, how it was trained, on what data, and what cross-validation says
of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict

from pipeline.data.collected import DEV, TEST
from pipeline.data.decode import Normalise
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.params import FinalParams, FinetuneParams, Variant


def choose(params: FinalParams, variants: dict[str, Variant], evaluation: dict) -> str:
    """The variant the final model trains: the one params name, or with `best` the evaluation's winner, unless
    the winner's edge is GAN samples that did not earn it (see `unearned_gan`)."""
    name = params.variant
    if name == "best":
        name = unearned_gan(evaluation) or evaluation["best"]
    if name not in variants:
        raise PipelineError(f"final.variant: {name!r} is not in params `variants` ({', '.join(variants)})")
    return name


def unearned_gan(evaluation: dict) -> str | None:
    """When the CV winner trains on GAN samples and the evaluation compared it with the same recipe without them,
    that twin, unless the samples' gain was significant: a winner by noise should not bring a GAN into the model
    people use. None when the winner uses no GAN samples or has no such twin."""
    unearned = _unearned_gan_comparison(evaluation)
    return unearned["a"] if unearned else None


def _unearned_gan_comparison(evaluation: dict) -> dict | None:
    """The evaluation's comparison of the winner against its twin without GAN samples, if it found no significant
    gain."""
    best = evaluation["best"]
    return next((c for c in evaluation.get("comparisons", []) if c.get("setting") == "synthetic" and c["b"] == best
                 and not (c["significant"] and c["difference"] > 0)), None)


def manifest_hash(sha256: list[str]) -> str:
    """One hash of the training data: the sorted sha256 of every labelled image's stored pixels."""
    return hashlib.sha256("\n".join(sorted(sha256)).encode()).hexdigest()


def model_card(name: str, variant: Variant, model, finetune: FinetuneParams, image: Normalise, classes: list[str],
               evaluation: dict, data_hash: str, trained_on: int) -> dict:
    cv = evaluation["variants"][name]
    return {"variant": name, "recipe": cv["recipe"], "classes": classes, "backbone": variant.backbone,
            "weights": variant.weights, "input_size": model.input_size,
            "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
            # collect's limits travel with the model, so predict refuses exactly the files collect would have
            "image": {"size": image.size, "channels": image.channels, "fit": image.fit, "min_side": image.min_side,
                      "max_pixels": image.max_pixels},
            "trained_on_images": trained_on, "data_sha256": data_hash,
            "params": {"variant": asdict(variant), "finetune": asdict(finetune)},
            "cross_validation": {"oof": cv["oof"], "cv": cv["cv"], DEV: cv[DEV], TEST: cv[TEST]},
            "selection": selection_note(name, evaluation), "choice": choice_note(name, evaluation)}


def choice_note(name: str, evaluation: dict) -> str | None:
    """Why the model is not the CV winner, when `unearned_gan` passed the winner over."""
    c = _unearned_gan_comparison(evaluation)
    if c is None or c["a"] != name:
        return None
    best = evaluation["best"]
    return (f"{best} did best in cross-validation, but its GAN samples' difference against {name}, the same recipe "
            f"without them, was {c['difference']:+.3f} (Holm-corrected p {c['p_holm']:.3f}): not a significant gain, "
            f"so the model is {name}, which needs no GAN")


def selection_note(name: str, evaluation: dict) -> dict | None:
    """When this variant is the evaluation's winner among several, its CV figures were chosen on the same folds and
    are optimistic: the card says so and gives the selection-aware estimate of the choose-then-train procedure."""
    selection, variants = evaluation.get("selection"), evaluation["variants"]
    if name != evaluation["best"] or selection is None or len(variants) < 2:
        return None
    return {"chosen_among": len(variants), "method": selection["method"], "accuracy": selection["accuracy"],
            "note": f"chosen as the best of {len(variants)} variants on the same folds its cross-validated figures "
                    "come from, so they are optimistic; `accuracy` estimates the whole procedure (choose on the other "
                    "folds, score on the held-out one), per fold model"}


def card_markdown(card: dict) -> str:
    oof = card["cross_validation"]["oof"]["accuracy"]
    lines = [f"# Model card: {card['variant']}", "", f"{card['recipe']}.", "",
             f"- Classes ({len(card['classes'])}): {', '.join(card['classes'])}",
             f"- Input: {card['image']['size']} x {card['image']['size']} pixels, {card['image']['channels']} "
             f"channel(s), values in [0, 1], prepared as collect does (`fit: {card['image']['fit']}`); resized to "
             f"{card['input_size']} px and normalised inside the model (mean {card['mean']}, std {card['std']})",
             f"- Refused, as collect refused them: files of more than {card['image']['max_pixels']:,} pixels (checked "
             f"before decoding) or with a side below {card['image']['min_side']} px",
             f"- Trained on {card['trained_on_images']} labelled images (data sha256 {card['data_sha256'][:16]}…)"
             + (f" and {card['unlabelled_images']} unlabelled ones (semi-supervised)"
                if card.get("unlabelled_images") else ""),
             f"- Cross-validated accuracy of this recipe: {oof['value']:.3f} ({oof['low']:.3f} to {oof['high']:.3f})"]
    if card.get("selection"):
        aware = card["selection"]["accuracy"]
        lines.append(f"- Chosen as the best of {card['selection']['chosen_among']} variants on the same folds, so the "
                     f"figure above is optimistic; the choose-then-train procedure, estimated by "
                     f"{card['selection']['method']}: {aware['mean']:.3f} per fold model ({aware['low']:.3f} to "
                     f"{aware['high']:.3f})")
    if card.get("choice"):
        lines.append(f"- Why this variant: {card['choice']}")
    final = card.get("final_accuracy", {})
    if DEV in final:
        lines.append(f"- This model on the development part of the external images (settings may have been chosen "
                     f"on it): {final[DEV]:.3f}")
    if TEST in final:
        lines.append(f"- This model on the final test (external images that chose nothing): {final[TEST]:.3f}")
    lines += ["", "Files: `model.safetensors` (weights), `model.torchscript.pt` and `model.onnx` (logits from float "
              "images N x C x H x W), this card as `model_card.json`.", ""]
    return "\n".join(lines)
