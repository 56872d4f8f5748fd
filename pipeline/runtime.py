"""What every stage does before its work: logging, seeds, the device, and turning user mistakes into messages."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import PipelineError


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; components with their own seed (albumentations, sklearn) get it too."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str):
    """`auto` is CUDA when there is one, else the CPU; asking for `cuda` without one is a user error."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device: cuda was asked for but torch sees no CUDA GPU; use `device: auto` or `cpu`")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA (half the activation traffic, no loss scaling needed); plain fp32 elsewhere."""
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@contextlib.contextmanager
def recalibrating_batch_norm(model):
    """Inside the block, every batch norm of `model` has forgotten its running statistics and averages all the
    batches it sees equally (train mode, momentum None); afterwards the model is in eval mode with each batch
    norm's momentum restored. Run forward passes inside, under torch.no_grad()."""
    from torch.nn.modules.batchnorm import _BatchNorm

    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (torchrun); one process by default."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often to save training state, and what it must match to be resumed."""

    folder: Path
    every: int  # steps (GAN) or epochs (fine-tuning) between checkpoints
    fingerprint: str  # of the data and the settings that shape training; a checkpoint with another is ignored


def random_states(device, world: World, **generators) -> list[dict]:
    """Every process's random streams, in rank order: torch's global ones (dropout, DiffAugment), CUDA's, and
    any named local generators."""
    import torch

    state = {"torch": torch.get_rng_state(), **{name: g.get_state() for name, g in generators.items()}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if world.size == 1:
        return [state]
    gathered: list = [None] * world.size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def torchrun_world() -> World:
    """This process's place when started by torchrun (its environment variables); one process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return World(rank=dist.get_rank(), size=dist.get_world_size())


def leave_process_group() -> None:
    """After training, processes part: a collective call later (torchmetrics syncs when one is open) would wait
    for processes that have finished."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def cli(main: Callable[[list[str] | None], None]) -> None:
    """Run a stage's main(); a PipelineError ends the run with its message and exit status 2, no traceback."""
    try:
        main(None)
    except PipelineError as err:
        logging.getLogger("pipeline").error("%s", err)
        sys.exit(2)


def stage_args(doc: str, argv: list[str] | None, *, fold: bool = False, variant: bool = False,
               images_per_class: bool = False):
    """Parse a stage's command line, set up logging and load the params: (args, Params)."""
    from pipeline.params import load_params

    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    if fold:
        parser.add_argument("--fold", type=int, required=True, help="cross-validation fold id")
        parser.add_argument("--repeat", type=int, default=0, help="repeat of the k-fold split (default 0)")
    if variant:
        parser.add_argument("--variant", required=True, help="a name from params `variants`")
    if images_per_class:
        parser.add_argument("--images-per-class", type=int, required=True,
                            help="a point of the label-scarcity curve (from params `scarcity.images_per_class`)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    setup_logging()
    return args, load_params(args.params)
