"""A trained model as a folder a user can take away, and what prediction needs from it.

The folder holds `model.safetensors` (the weights, nothing pickled), `model_card.json` and `model_card.md` (what
the model is, how images must be prepared, how well the recipe did in cross-validation), and two exports that
run without this project: `model.torchscript.pt` and `model.onnx`. The exports take float images in [0, 1],
N x channels x side x side with the side and channels the card gives (what collect stores), and return logits.
"""

from __future__ import annotations

import glob
import json
import os
import stat
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


@dataclass(frozen=True)
class Named:
    """One file a row of the output stands for: what to call it, the file to read, or why there is none."""

    shown: str
    path: Path | None
    error: str = ""


def expand(patterns: list[str]) -> list[Named]:
    """Every file the patterns name, in order: files as given, folders searched recursively for image files, globs
    expanded. What cannot be used (a pattern that names nothing, a folder that cannot be listed) is kept with its
    error, so it is reported instead of skipped."""
    return [named for pattern in patterns for named in _named_by(pattern)]


def _named_by(pattern: str) -> list[Named]:
    path = Path(pattern)
    if os.path.isdir(path):  # os.path, not Path.is_dir: a stat error (no permission on a parent) is "not a folder"
        return _search(path) or [Named(pattern, None, "no image files in this folder")]
    try:
        os.lstat(path)  # the entry itself: a dangling link or a FIFO is a row that says what is wrong with it
        return [Named(pattern, path)]
    except FileNotFoundError:
        pass
    except OSError as err:  # e.g. a path through a file ("a.png/b.png") or through a folder without permission
        return [Named(pattern, None, f"unreadable: {err.strerror}")]
    found = sorted(Path(p) for p in glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else []
    return [Named(str(p), p) for p in found if not os.path.isdir(p)] or [
        Named(pattern, None, "no such file, folder or matching glob")]


def _search(folder: Path) -> list[Named]:
    """The image files under a folder, sorted as paths, and every folder below it that could not be listed, with
    its error. os.walk rather than Path.rglob, which skips a folder without permission silently. Links to folders
    are not followed (as rglob), so a link loop cannot make the search endless."""
    found: list[Named] = []

    def unlisted(err: OSError) -> None:
        found.append(Named(str(err.filename), None, f"unreadable folder: {err.strerror}"))

    for root, _, files in os.walk(folder, onerror=unlisted):
        found += [Named(str(p), p) for p in map(Path(root).joinpath, files) if p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda named: Path(named.shown))


# Model folders written before the card carried collect's limits get collect's default bomb guard (params.yaml's
# collect.max_pixels, 100,000,000 pixels): refusing decompression bombs must not depend on a folder's age. Their
# min_side stays 1, as predict had it, since which one collect used is not known.
DEFAULT_MAX_PIXELS = 100_000_000


def preparation(card: dict, max_pixels: int | None = None) -> Normalise:
    """How a file must be prepared for the model: as collect prepared its training images, refused by the same
    limits (the card's, or `max_pixels` when given; 0 means no cap)."""
    image = card["image"]
    limit = image.get("max_pixels", DEFAULT_MAX_PIXELS) if max_pixels is None else max_pixels
    return Normalise(image["size"], image["channels"], image["fit"], image.get("min_side", 1), limit)


@dataclass
class Read:
    path: str
    image: np.ndarray | None  # as collect stores it: uint8 side x side x channels
    error: str = ""


def read_image(named: Named, how: Normalise) -> Read:
    """Decode and normalise one file the way collect did for training; a file that cannot be used comes back
    with its error instead of stopping the run. A picture over the limits is refused from its header, before
    decoding, with collect's own category ("too large", "too small")."""
    if named.path is None:
        return Read(named.shown, None, named.error)
    try:
        if not stat.S_ISREG(named.path.stat().st_mode):  # opening a FIFO would wait for a writer, for ever
            return Read(named.shown, None, "unreadable: not a regular file (a FIFO, socket or device)")
        return Read(named.shown, decode_file(named.path, how, hashed=False).pixels)
    except Unusable as err:
        return Read(named.shown, None, f"{err.category}: {err.detail}")
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # Pillow: unreadable, truncated or not an image
        return Read(named.shown, None, f"unreadable: {err}")
