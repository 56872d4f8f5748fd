"""Training state saved so that a killed run resumes as if it had never stopped.

One format for every trainer (the GAN, fine-tuning): a safetensors file with the tensors by name (`part/key`,
e.g. `model/conv.weight`) and everything else as JSON in the file's metadata. Nothing is pickled, so loading a
checkpoint cannot run code. A checkpoint is resumed only when it is whole (a digest over its contents), in this
format, made for the same data and settings (its fingerprint, pipeline/runtime/fingerprint.py) and fits the
models it is loaded into; anything else is logged as a warning and training starts from the beginning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

from pipeline.runtime import atomic

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
FORMAT = "pipeline-checkpoint/1"
SEPARATOR = "/"  # between a part and a tensor's key: state-dict keys use dots, never this
RANDOM_PART = "rng."  # rng.RANK: one process's random streams
T = TypeVar("T")
Parts = Mapping[str, Mapping[str, "torch.Tensor"]]  # part -> key -> tensor, e.g. "model" -> a state dict


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often to save training state, and what it must match to be resumed."""

    folder: Path
    every: int  # steps (GAN) or epochs (fine-tuning) between checkpoints
    fingerprint: str  # of the data and the settings that shape training; a checkpoint with another is ignored


@dataclass(frozen=True)
class Saved:
    """A checkpoint as read back: its tensors (on the CPU) by part, and its JSON."""

    tensors: dict[str, dict[str, torch.Tensor]]
    meta: dict


# --- the file ---------------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, tensors: Parts, meta: dict, fingerprint: str) -> None:
    """Write `tensors` and the JSON-able `meta` as one file, atomically: a kill mid-write leaves the previous
    checkpoint intact."""
    from safetensors.torch import save

    flat = flatten(tensors)
    text = json.dumps(meta)
    header = {"format": FORMAT, "fingerprint": fingerprint, "meta": text, "digest": _digest(flat, fingerprint, text)}
    atomic.write_bytes(path, save(flat, metadata=header))


def load_checkpoint(path: Path, fingerprint: str, read: Callable[[Saved], T] = lambda saved: saved) -> T | None:
    """`read` applied to the checkpoint at `path`; None, after a warning naming the file, when there is none, it
    is damaged (bad header, truncated, contents that fail their digest, JSON that does not parse), it was made
    for another fingerprint, or `read` finds it lacks something (KeyError, IndexError, TypeError, ValueError).

    `read` must only check and gather what the caller will load, and change nothing: until it has returned, a
    checkpoint that does not fit must leave the models as they were built."""
    if not path.is_file():
        return None
    try:
        header, flat = _open(path)
    except (OSError, ValueError) as err:  # safetensors' and json's errors are ValueErrors here (see _open)
        return _ignored(path, f"it is damaged ({str(err)[:200]})")
    if header.get("format") != FORMAT:
        return _ignored(path, "it was written in another format (by another version of this code?)")
    if header.get("fingerprint") != fingerprint:
        return _ignored(path, "it was made for other data or settings")
    if header.get("digest") != _digest(flat, fingerprint, header.get("meta", "")):
        return _ignored(path, "it is damaged (its contents do not match their digest)")
    try:
        meta = json.loads(header.get("meta", ""))
    except ValueError as err:
        return _ignored(path, f"it is damaged (its JSON does not parse: {err})")
    try:
        return read(Saved(unflatten(flat), meta))
    except (KeyError, IndexError, TypeError, ValueError) as err:
        return _ignored(path, f"it does not fit what is being trained ({type(err).__name__}: {str(err)[:200]})")


def _ignored(path: Path, why: str) -> None:
    log.warning("ignoring %s: %s; training from scratch", path, why)
    return None


def _open(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and the tensors of a safetensors file; ValueError when it is not a whole one."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    blob = path.read_bytes()
    try:
        flat = load(blob)  # checks the header and that the tensors cover the file exactly (catches truncation)
    except SafetensorError as err:
        raise ValueError(str(err)) from None
    size = int.from_bytes(blob[:8], "little")  # the format: an 8-byte header length, then the JSON header
    return json.loads(blob[8:8 + size]).get("__metadata__") or {}, flat


def _digest(flat: Mapping[str, torch.Tensor], fingerprint: str, meta: str) -> str:
    """Over every byte that matters: safetensors checks the file's layout, not its contents."""
    import torch

    digest = hashlib.sha256(json.dumps([FORMAT, fingerprint, meta]).encode())
    for key in sorted(flat):
        tensor = flat[key]
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def flatten(parts: Parts) -> dict[str, torch.Tensor]:
    """{part: {key: tensor}} -> {"part/key": tensor}, detached, contiguous and on the CPU."""
    flat = {}
    for part, tensors in parts.items():
        if SEPARATOR in part:
            raise ValueError(f"checkpoint part {part!r} must not contain {SEPARATOR!r}")
        for key, tensor in tensors.items():
            flat[f"{part}{SEPARATOR}{key}"] = tensor.detach().cpu().contiguous()
    return flat


def unflatten(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        part, _, key = name.partition(SEPARATOR)
        parts.setdefault(part, {})[key] = tensor
    return parts


# --- what trainers save: modules, optimizers, random streams ----------------------------------------------------

def module_state(saved: Saved, part: str, module) -> dict[str, torch.Tensor]:
    """The state dict saved as `part`, checked to have exactly `module`'s keys and shapes."""
    loaded, expected = saved.tensors[part], module.state_dict()
    if set(loaded) != set(expected):
        missing, unexpected = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
        raise KeyError(f"{part}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, tensor in expected.items():
        if loaded[key].shape != tensor.shape:
            raise ValueError(f"{part}.{key} has shape {tuple(loaded[key].shape)}, not {tuple(tensor.shape)}")
    return loaded


def optimizer_parts(part: str, optimizer) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """An optimizer's state split for a checkpoint: each parameter's slots (moments, step count; tensors, as
    Adam's are) as the tensor part `part.INDEX`, the parameter groups (learning rates, betas) as JSON."""
    state = optimizer.state_dict()
    tensors = {f"{part}.{index}": slots for index, slots in state["state"].items()}
    return tensors, {"param_groups": state["param_groups"], "slots": sorted(state["state"])}


def optimizer_state(saved: Saved, part: str, optimizer) -> dict[str, Any]:
    """The optimizer state dict saved as `part` (its JSON under meta[part]), checked to fit `optimizer`: the same
    groups of as many parameters, and slots shaped like their parameters."""
    meta = saved.meta[part]
    groups = meta["param_groups"]
    if [len(group["params"]) for group in groups] != [len(group["params"]) for group in optimizer.param_groups]:
        raise ValueError(f"{part}: its parameter groups differ from the optimizer's")
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state = {}
    for index in meta["slots"]:
        slots = saved.tensors[f"{part}.{index}"]
        for name, tensor in slots.items():
            if tensor.dim() and tensor.shape != params[index].shape:  # 0-dim slots are step counts
                raise ValueError(f"{part}.{index}.{name} has shape {tuple(tensor.shape)}, not "
                                 f"{tuple(params[index].shape)}")
        state[index] = slots
    return {"state": state, "param_groups": groups}


def random_parts(streams: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Every process's random streams (pipeline.runtime.compute.random_states), one part per rank."""
    return {f"{RANDOM_PART}{rank}": mine for rank, mine in enumerate(streams)}


def random_state(saved: Saved, world, *generators: str) -> dict[str, torch.Tensor] | None:
    """This process's saved streams (torch's and the named generators'), checked; None when the checkpoint was
    made by another number of processes, whose streams cannot be shared out: they stay as seeded."""
    import torch

    processes = sum(part.startswith(RANDOM_PART) for part in saved.tensors)
    if processes != world.size:
        return None
    mine = saved.tensors[f"{RANDOM_PART}{world.rank}"]
    like = torch.get_rng_state()  # every CPU generator's state has this size and dtype
    for name in ("torch", *generators):
        if mine[name].dtype != like.dtype or mine[name].shape != like.shape:
            raise ValueError(f"random stream {name} is not a CPU generator's state")
    return mine


def restore_random(mine: dict[str, torch.Tensor], device, **generators) -> None:
    """Put back the streams `random_state` returned: torch's global ones, CUDA's, and the named generators."""
    import torch

    torch.set_rng_state(mine["torch"])
    for name, generator in generators.items():
        generator.set_state(mine[name])
    if "cuda" in mine and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)
