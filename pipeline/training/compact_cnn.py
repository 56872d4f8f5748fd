"""A compact CNN for small images, registered with timm so it is built, configured and loaded like any timm model.

Five 3x3 convolutions (batch norm, ReLU), two max-pools, global average pooling, dropout and a linear head:
about 0.14 M parameters at the default width. On small, simple images (digits, glyphs, icons) trained from
scratch with augmentation it often beats an ImageNet backbone fine-tuned on the same few images, because it
needs no up-scaling and has far fewer weights to fit; the `cnn` variants in params.yaml let the report say so
or not, with numbers.

Importing this module registers `compact_cnn` with timm: `timm.create_model("compact_cnn")` works afterwards,
`pretrained_cfg_overlay=dict(file=...)` loads our own checkpoints, and `resolve_model_data_config` reads its
normalisation (mean 0.5, std 0.5 per channel: there are no ImageNet statistics to match).
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

__all__ = ["CompactCNN"]

default_cfgs = {  # read by timm's register_model: preprocessing travels with the model
    "compact_cnn": {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "first_conv": "stem.0", "classifier": "head", "license": "apache-2.0",
    },
}


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CompactCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 32, drop_rate: float = 0.3,
                 global_pool: str = "avg"):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"compact_cnn supports global_pool='avg' only; got {global_pool!r}")
        self.num_classes, self.num_features, self.drop_rate = num_classes, 4 * width, drop_rate
        self.stem = nn.Sequential(*_conv(in_chans, width), *_conv(width, width), nn.MaxPool2d(2))
        self.stage = nn.Sequential(*_conv(width, 2 * width), *_conv(2 * width, 2 * width), nn.MaxPool2d(2),
                                   *_conv(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.pool(x).flatten(1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def compact_cnn(pretrained: bool = False, **kwargs) -> CompactCNN:
    """The compact CNN; `width` (default 32) sets the channels of the first layers (then 2x and 4x)."""
    return build_model_with_cfg(CompactCNN, "compact_cnn", pretrained, **kwargs)
