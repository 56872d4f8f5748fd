"""Where and how tensors are computed: seeds, the device, bf16 autocast, data-parallel processes (torchrun), and
batch-norm statistics re-estimated after training."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np

from pipeline.runtime.errors import PipelineError


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
