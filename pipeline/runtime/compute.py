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


LAYOUT = "channels_last"  # how image tensors and convolution weights lie in memory; fingerprints record it


def channels_last(x):
    """A model (in place) or an NCHW batch in channels-last layout, on every device. CUDA's convolution kernels
    prefer it, and so does the CPU's (oneDNN): on this project's 2-core CPU, EfficientNet-Lite0 trained 1.75x and
    predicted 1.9x as fast at 64 px, the compact CNN 1.3-2x (benchmarks/channels_last.py). The GAN's small
    networks gained nothing measurable and stay as they are."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.contiguous(memory_format=torch.channels_last)
    return x.to(memory_format=torch.channels_last)


def autocast(device):
    """bf16 autocast on CUDA (half the activation traffic, no loss scaling needed); plain fp32 elsewhere."""
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@contextlib.contextmanager
def _batch_norms(model, momentum: float | None, reset: bool):
    """Every batch norm of `model` in train mode with `momentum` (its running statistics reset first if asked),
    the rest in eval mode; afterwards eval mode throughout, each batch norm's momentum restored."""
    from torch.nn.modules.batchnorm import _BatchNorm

    model.eval()
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        if reset:
            m.reset_running_stats()
        m.train()
        m.momentum = momentum
    try:
        yield
    finally:
        for m, saved in zip(norms, momenta):
            m.momentum = saved
        model.eval()


def recalibrating_batch_norm(model):
    """Inside the block, every batch norm of `model` has forgotten its running statistics and averages all the
    batches it sees equally (momentum None); afterwards the model is in eval mode with each batch norm's momentum
    restored. Run forward passes inside, under torch.no_grad()."""
    return _batch_norms(model, None, reset=True)


def batch_statistics(model):
    """Inside the block, `model` is in eval mode (no dropout) but its batch norms normalise with each batch's
    own statistics and leave their running statistics as they are (momentum 0): how a teacher labels a batch of
    images unlike those its running averages were gathered on. Afterwards, eval mode throughout."""
    return _batch_norms(model, 0.0, reset=False)


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


# The collective backend for each device a stage resolves: NCCL reduces CUDA tensors only, gloo CPU ones
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def check_processes_fit(processes: int, gpus: int) -> None:
    """On CUDA every process of a machine needs a GPU of its own: more processes than GPUs would fail later, deep
    in NCCL, with an invalid device ordinal."""
    if processes > gpus:
        raise PipelineError(f"torchrun started {processes} processes on this machine but torch sees {gpus} CUDA "
                            f"GPU(s), and each process needs its own: run torchrun with --nproc_per_node at most "
                            f"{gpus}, or set the stage's `device: cpu` to run the processes on the CPU (gloo)")


def torchrun_world(device: str) -> World:
    """This process's place when started by torchrun (its environment variables); one process otherwise. The
    processes talk over the backend of the device the stage's `device` param (auto|cpu|cuda) resolves to, so
    `device: cpu` runs on gloo even on a machine with GPUs."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    import torch
    import torch.distributed as dist

    resolved = pick_device(device)
    if resolved.type == "cuda":
        # torchrun sets LOCAL_WORLD_SIZE (the processes on this machine); WORLD_SIZE alone means a single machine
        check_processes_fit(int(os.environ.get("LOCAL_WORLD_SIZE", size)), torch.cuda.device_count())
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(BACKENDS[resolved.type])
    return World(rank=dist.get_rank(), size=dist.get_world_size())


def leave_process_group() -> None:
    """After training, processes part: a collective call later (torchmetrics syncs when one is open) would wait
    for processes that have finished."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
