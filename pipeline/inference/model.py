"""A trained model as a folder a user can take away, and what prediction needs from it.

The folder holds `model.safetensors` (the weights, nothing pickled), `model_card.json` and `model_card.md` (what
the model is, how images must be prepared, how well the recipe did in cross-validation), and two exports that
run without this project: `model.torchscript.pt` and `model.onnx`. The exports take float images in [0, 1],
N x channels x side x side with the side and channels the card gives (what collect stores), and return logits.
"""

from __future__ import annotations

import glob
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.decode import Normalise, Unusable, decode_file
from pipeline.runtime import atomic
from pipeline.runtime.errors import PipelineError
from pipeline.training.backbones import Classifier, create_backbone

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
CARD_MD_FILE = "model_card.md"
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def save_model(folder: Path, model: Classifier, card: dict) -> None:
    """Weights and card (JSON); the caller writes the exports and the Markdown card beside them."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"card": json.dumps(atomic.strict(card), allow_nan=False)})
    (folder / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it readable by its owner only
    atomic.write_json(folder / CARD_FILE, card)


def load_model(folder: Path, device: torch.device) -> tuple[Classifier, dict]:
    """The model of a folder written by save_model, in eval mode on `device`, and its card."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        card = json.loads((folder / CARD_FILE).read_text())
        state = load_file(str(folder / WEIGHTS_FILE))
    except FileNotFoundError as err:
        raise PipelineError(f"--model {folder}: {Path(err.filename).name} is missing; run `dvc repro final` or "
                            "point --model at a folder the final stage wrote") from None
    model = Classifier(create_backbone(card["backbone"], "none"), num_classes=len(card["classes"]),
                       input_size=card["input_size"])
    model.load_state_dict(state)
    return model.to(device).eval(), card


def example_input(card: dict, batch: int = 2) -> torch.Tensor:
    image = card["image"]
    shape = (batch, image["channels"], image["size"], image["size"])
    return torch.rand(shape, generator=torch.Generator().manual_seed(0))


def export(model: Classifier, card: dict, folder: Path) -> None:
    """TorchScript (traced) and ONNX (opset 17, dynamic batch) of the model on the CPU."""
    model = model.cpu().eval()
    x = example_input(card)
    with warnings.catch_warnings():
        # The tracer warns that the model's shape branches (alpha? resize? grey?) become constants: they are, for
        # the one image shape the card names. The TorchScript-based ONNX exporter is used because the newer one
        # needs onnxscript; it is deprecated, not gone, in torch 2.14.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, x)
        traced.save(str(folder / TORCHSCRIPT_FILE))
        torch.onnx.export(model, (x,), str(folder / ONNX_FILE), dynamo=False, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17)


# --------------------------------------------------------------------------------------------------
# Reading the user's images
# --------------------------------------------------------------------------------------------------


def expand(patterns: list[str]) -> list[tuple[str, Path | None]]:
    """(what the user named, a file) for every image the patterns name: files as given, folders searched
    recursively for image files, globs expanded; a pattern that names nothing is kept with None, so it is
    reported instead of skipped."""
    out: list[tuple[str, Path | None]] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        out += [(str(p), p) for p in found] or [(pattern, None)]
    return out


@dataclass
class Read:
    path: str
    image: np.ndarray | None  # as collect stores it: uint8 side x side x channels
    error: str = ""


def read_image(shown: str, path: Path | None, card: dict) -> Read:
    """Decode and normalise one file the way collect did for training; a file that cannot be used comes back
    with its error instead of stopping the run."""
    if path is None:
        return Read(shown, None, "no such file, folder or matching glob")
    how = Normalise(card["image"]["size"], card["image"]["channels"], card["image"]["fit"])
    try:
        return Read(shown, decode_file(path, how, hashed=False).pixels)
    except Unusable as err:
        return Read(shown, None, f"{err.category}: {err.detail}")
    except (OSError, ValueError, SyntaxError) as err:  # Pillow: unreadable, truncated or not an image
        return Read(shown, None, f"unreadable: {err}")
