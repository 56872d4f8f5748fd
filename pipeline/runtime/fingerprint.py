"""One fingerprint for every decision to reuse saved work: resuming a checkpoint (GAN, fine-tuning), keeping a
finished fold of the scarcity curve, reading cached backbone features.

Reused work must be what a fresh run would compute, so the fingerprint covers everything that changes a result:
the data (pixels, targets, which rows), the settings, the augmentation policy file's contents, the contents of the
starting weights, the device type and the precision it computes in, and the versions of the libraries whose
kernels and model definitions do the computing. What a caller leaves out on purpose (a GAN's `steps`, so a killed
run may resume with more) it leaves out of `params`, and says so where it builds them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.runtime.errors import PipelineError

LIBRARIES = ("torch", "timm")  # their kernels and model definitions shape every trained result
POLICY_LIBRARY = "albumentations"  # draws the augmentations a policy file describes
FILE_CHUNK = 1 << 20


def fingerprint(*, data: Sequence[np.ndarray] = (), params: Any = None, policy: Path | None = None,
                weights: Path | str | None = None, device: Any = None,
                versions: Mapping[str, str] | None = None) -> str:
    """A sha256 hex digest of everything that decides a result.

    data: arrays hashed by dtype, shape and bytes (images, targets, row indices: pass the exact selection).
    params: dataclasses, mappings, sequences and plain values, hashed as canonical JSON.
    policy: an augmentation policy file, hashed by its contents (None: the work does not augment).
    weights: a weights file, hashed by its contents; or the name of a source that is no file (`hub`, `none`).
    device: a torch.device; its type and the precision autocast computes in on it.
    versions: library -> version; by default the installed ones (LIBRARIES, plus albumentations with a policy).
    """
    if versions is None:
        versions = library_versions(with_policy=policy is not None)
    described = {
        "params": _canonical(params),
        "policy": None if policy is None else file_sha256(Path(policy), "augmentation policy"),
        "weights": _weights(weights),
        "compute": None if device is None else compute_mode(device),
        "versions": dict(versions),
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for array in data:
        _update(digest, np.asarray(array))
    return digest.hexdigest()


def library_versions(*, with_policy: bool = False) -> dict[str, str]:
    """The installed versions of the libraries that shape results; read from package metadata, no import."""
    names = (*LIBRARIES, POLICY_LIBRARY) if with_policy else LIBRARIES
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def compute_mode(device) -> dict[str, str]:
    """The device type, the dtype it computes in and the memory layout, read off pipeline.runtime.compute itself
    (autocast: bf16 on CUDA, fp32 elsewhere; LAYOUT), so the fingerprint follows those rules wherever they go."""
    from pipeline.runtime import compute

    mode = compute.autocast(device)
    enabled = getattr(mode, "_enabled", True)  # torch.autocast keeps `enabled` only as this attribute
    return {"device": device.type, "precision": str(mode.fast_dtype) if enabled else "torch.float32",
            "layout": compute.LAYOUT}


def file_sha256(path: Path, what: str) -> str:
    if not path.is_file():
        raise PipelineError(f"{what} {path}: no such file")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(FILE_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _weights(weights: Path | str | None) -> dict | str | None:
    if isinstance(weights, Path):  # the bytes, not the name: a file replaced in place is other weights
        return {"sha256": file_sha256(weights, "weights file")}
    return weights


def _canonical(value: Any) -> Any:
    """Plain JSON values, with dict keys as strings (json sorts them)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canonical(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(key): _canonical(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot fingerprint a {type(value).__name__}: pass plain values, dataclasses or arrays")


def _update(digest, array: np.ndarray) -> None:
    # dtype and shape first: the same bytes as uint8 or as int64, or split into other rows, are other data
    digest.update(json.dumps([str(array.dtype), list(array.shape)]).encode())
    if array.dtype == object:  # strings from a table (e.g. group names): no fixed-size bytes to hash
        digest.update(json.dumps([str(item) for item in array.ravel()]).encode())
    else:
        digest.update(np.ascontiguousarray(array).data)
