"""Stage 3, synthesize: per fold (and repeat), a class-conditional GAN trained only on that fold's training images;
its samples filtered by a classifier that saw only those images, and measured (FID, KID, CAS).

Writes into the stage folder `samples.npz` (the accepted samples, their conditioning labels and scores),
`candidates.npz` (every sample before filtering), `grid.png` (a row per class, best-scoring first, the
rejected ones dimmed),
`generator.safetensors` (the EMA generator), `history.json` and `meta.json` (with the sha256 of every image the
GAN trained on, so anyone can check it never saw the fold's validation images). DVC metrics and plots go to
`reports/synthesize/` (rR-foldK.json, -grid.png, -curves.png, -history.csv).

Runs data-parallel under torchrun with the same command: `torchrun --nproc_per_node N -m pipeline.stages.synthesize ...`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from pipeline.augmentation.policy import load_policy
from pipeline.data.collected import load_collected
from pipeline.data.pictures import save_png
from pipeline.gan.review import curves_png, review_grid
from pipeline.gan.samples import check_no_leak, make_samples
from pipeline.runtime import atomic, paths
from pipeline.runtime.checkpoint import Checkpointing
from pipeline.runtime.cli import cli, stage_args
from pipeline.runtime.compute import World, leave_process_group, pick_device, seed_everything, torchrun_world
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.fingerprint import fingerprint
from pipeline.runtime.params import SynthesizeParams, gan_side

log = logging.getLogger(__name__)
# The params sections this stage reads; dvc.yaml lists the same (a test checks both).
PARAMS = ("synthesize",)
METRIC_KEYS = (  # what goes into reports/synthesize/rR-foldK.json
    "fid_candidates", "kid_candidates", "kid_std_candidates", "fid_accepted", "kid_accepted",
    "kid_std_accepted", "cas_synthetic", "cas_candidates", "cas_real", "cas_synthetic_dev",
    "cas_candidates_dev", "cas_real_dev", "cas_ratio", "cas_ratio_dev", "acceptance", "accepted", "candidates",
    "novelty_candidates", "novelty_accepted", "acceptance_real", "acceptance_real_dev",
    "acceptance_per_class", "augment_p", "train_seconds", "steps_per_second", "resumed_from_step",
)


@dataclass(frozen=True)
class SynthesizeOutputs:
    folder: Path  # the stage's output folder
    reports: Path  # where the DVC metrics and plots go
    name: str  # rR-foldK: prefix of the report files
    checkpoints: Path | None = None  # where a killed run's state waits to be resumed


def outputs_for(repeat: int, fold: int) -> SynthesizeOutputs:
    name = paths.split_name(repeat, fold)
    return SynthesizeOutputs(paths.synthetic_dir(repeat, fold), paths.SYNTHESIZE_REPORTS, name,
                             paths.CHECKPOINTS / "synthesize" / name)


def checkpoint_fingerprint(params: SynthesizeParams, images: np.ndarray, targets: np.ndarray, world: World,
                           device: torch.device) -> str:
    """What a checkpoint must match to be resumed: the training data, the number of processes, every setting that
    shapes training, the device and its precision, and the library versions (pipeline/runtime/fingerprint.py). Not
    `steps`: a killed run may be resumed with more steps. The filter's backbone and side shape training only when the
    discriminator is built on them."""
    ignored = {"steps", "log_every", "checkpoint_every", "candidates_per_class", "keep_per_class", "min_confidence",
               "filter_views", "near_real", "fid_features", "device", "truncation"}
    if params.discriminator != "features":
        ignored |= {"feature_backbone", "feature_size"}
    shaping = {k: v for k, v in dataclasses.asdict(params).items() if k not in ignored}
    return fingerprint(data=(images, targets), params=[shaping, world.size], device=device)


def write_outputs(out: SynthesizeOutputs, trained, candidates: tuple[np.ndarray, np.ndarray], kept: np.ndarray,
                  scores: np.ndarray, meta: dict, classes: int) -> None:
    fake, labels = candidates
    scale = max(1, 64 // fake.shape[1])
    grid = review_grid(fake, labels, scores, kept, classes)
    with atomic.atomic_dir(out.folder) as tmp:
        np.savez_compressed(tmp / paths.SAMPLES_FILE, images=fake[kept], labels=labels[kept], scores=scores[kept])
        np.savez_compressed(tmp / "candidates.npz", images=fake, labels=labels, scores=scores)
        save_png(tmp / "grid.png", grid, scale=scale)
        state = {k: v.detach().cpu().contiguous() for k, v in trained.generator.state_dict().items()}
        save_file(state, str(tmp / "generator.safetensors"))
        atomic.write_json(tmp / "history.json", trained.history, indent=1)
        atomic.write_json(tmp / "meta.json", atomic.split_run_facts(meta)[0], indent=1)
    reports = out.reports
    metrics = {k: v for k, v in meta.items() if k in METRIC_KEYS}
    atomic.write_json(reports / f"{out.name}.json", metrics)
    save_png(reports / f"{out.name}-grid.png", grid, scale=scale)
    atomic.write_bytes(reports / f"{out.name}-curves.png", curves_png(trained.history))
    atomic.write_text(reports / f"{out.name}-history.csv", pd.DataFrame(trained.history).to_csv(index=False))


def filter_policy(params: SynthesizeParams, policy: Path | None):
    """The augment stage's policy, built, when the filter draws views of the real images with it (checked before the
    GAN trains, not after); None when it does not."""
    if params.filter_views == 0:
        return None
    if policy is None or not Path(policy).is_file():
        raise PipelineError(f"synthesize.filter_views is {params.filter_views}: the filter learns from augmented views "
                            f"of the real images, drawn with the augment stage's policy ({policy}), which is "
                            "missing. Run `dvc repro augment` first, or set synthesize.filter_views: 0")
    return load_policy(policy)


def run(params: SynthesizeParams, fold: int, collected_dir: Path, output: Path | SynthesizeOutputs,
        repeat: int = 0, world: World = World(), policy: Path | None = None) -> dict:
    """Train, sample, filter, measure and write one fold's GAN; returns meta.json's content (empty on the
    non-main processes of a torchrun). `policy` is the augment stage's policy.json, from which the filter's views
    of the real images are drawn (needed when `filter_views` is above 0)."""
    out = output if isinstance(output, SynthesizeOutputs) else SynthesizeOutputs(
        Path(output), Path(output).parent / "reports", paths.split_name(repeat, fold))
    collected = load_collected(collected_dir)
    rows = check_no_leak(collected, fold, repeat)
    images, targets = collected.select(rows[0])
    params = dataclasses.replace(params, seed=params.seed + fold + 1000 * repeat)  # each fold its own stream
    seed_everything(params.seed)
    device = pick_device(params.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # torchrun: this process's own GPU
    checkpoint = None
    if out.checkpoints is not None:
        checkpoint = Checkpointing(out.checkpoints, params.checkpoint_every,
                                   checkpoint_fingerprint(params, images, targets, world, device))
    made = make_samples(params, collected, rows, device, checkpoint, world, filter_policy(params, policy))
    if made is None:
        return {}
    trained, quality = made.trained, made.quality
    meta = {"repeat": repeat, "fold": fold, "device": str(device), "processes": world.size, "steps": params.steps,
            "gan_image_size": gan_side(params.image_size, images.shape[1]), "image_size": int(images.shape[1]),
            "resumed_from_step": trained.resumed_from, "train_seconds": round(made.seconds, 2),
            "steps_per_second": round((params.steps - trained.resumed_from) / max(made.seconds, 1e-9), 2),
            "augment_p": round(trained.augment_p, 4), **quality, "classes": list(collected.classes),
            "trained_on_sha256": sorted(rows[0].sha256)}
    write_outputs(out, trained, (made.fake, made.labels), made.kept, made.scores, meta, len(collected.classes))
    log.info("synthesize repeat %d fold %d: GAN trained on %d images in %.1fs (p = %.2f); kept %d of %d samples "
             "(acceptance %.2f); FID %s, KID %s, CAS %s vs %s on real images", repeat, fold, len(images),
             made.seconds, trained.augment_p, len(made.kept), len(made.fake), quality["acceptance"],
             _fmt(quality["fid_accepted"]), _fmt(quality["kid_accepted"]), _fmt(quality["cas_synthetic"]),
             _fmt(quality["cas_real"]))
    return meta


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    args, params = stage_args(__doc__, argv, PARAMS, fold=True)
    world = torchrun_world(params.synthesize.device)
    try:
        run(params.synthesize, args.fold, paths.COLLECTED, outputs_for(args.repeat, args.fold), args.repeat, world,
            paths.AUGMENT / paths.POLICY_FILE)
    finally:
        leave_process_group()  # when run() failed before parting


if __name__ == "__main__":
    cli(main)
