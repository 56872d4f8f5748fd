"""The `partial` strategy, between the linear probe and full fine-tuning: the backbone's trunk stays frozen and only
its last `finetune.partial_blocks` stages and the head train, on the trunk's outputs computed once.

Full fine-tuning at a photo backbone's native 224 px runs at about 6 images/s on a 2-core CPU, because every step
runs the whole network forwards and backwards. Here the trunk (most of the compute) runs once per image: on the
training images, plus `finetune.probe_views` augmented views of each when the variant augments; on the held-out
images (the external ones cached on disk, like the probe's features, so every fold and variant shares them).
Training then runs only the top stages, at the trunk's small spatial size (7 or 14 px for a 224 px input), for
`epochs` passes over the cached views. The trained network is the whole Classifier, so the final model and its
exports are those of any other variant.

With `finetune.partial_head: probe` (the default) it is LP-FT (Kumar et al., ICLR 2022, "Fine-Tuning can Distort
Pretrained Features and Underperform Out-of-Distribution"): the head starts as the linear probe fitted on the
frozen top's pooled features (the `linear_probe` strategy's fit, with `probe_c`), and then the top stages and the
head train together at `lr_body`, batch norm keeping its pretrained statistics, so the first steps refine
features the head already reads instead of a random head's gradients reshaping them. `random` starts the head
from scratch at `lr_head`, batch norm following the cached views.

It needs an EfficientNet-style timm backbone (conv_stem, bn1, blocks, conv_head, bn2), as the packaged
EfficientNet-Lite0/1/2 are.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.runtime.compute import channels_last, seed_everything
from pipeline.runtime.errors import PipelineError
from pipeline.runtime.fingerprint import fingerprint
from pipeline.training.backbones import Classifier, create_backbone, weights_source
from pipeline.training.loop import lr_lambda
from pipeline.training.probe import FeatureCache, LinearProbe

BATCH = 64  # images per trunk pass
PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")


class Split:
    """A Classifier cut in two: `trunk` (preprocessing, stem and all but the last `blocks` stages; frozen) and
    `top` (the last stages, the head convolution and the classifier; trained)."""

    def __init__(self, model: Classifier, blocks: int):
        backbone = model.backbone
        missing = [p for p in PARTS if not hasattr(backbone, p)]
        if missing:
            raise PipelineError(f"strategy partial needs an EfficientNet-style backbone (timm's efficientnet and "
                                f"mobilenet families, such as efficientnet_lite0); this one has no {missing[0]}")
        if not 1 <= blocks < len(backbone.blocks):
            raise PipelineError(f"finetune.partial_blocks = {blocks}: this backbone has {len(backbone.blocks)} "
                                f"stages; train from 1 to {len(backbone.blocks) - 1} of them")
        self.model, self.backbone, self.blocks = model, backbone, blocks
        self.top_modules = nn.ModuleList([*backbone.blocks[-blocks:], backbone.conv_head, backbone.bn2,
                                          backbone.get_classifier()])

    @torch.inference_mode()
    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.bn1(b.conv_stem(self.model.preprocess(x)))
        for stage in b.blocks[:-self.blocks]:
            x = stage(x)
        return x

    def top(self, a: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        b = self.backbone
        for stage in b.blocks[-self.blocks:]:
            a = stage(a)
        return b.forward_head(b.bn2(b.conv_head(a)), pre_logits=pre_logits)

    def train_mode(self, batch_norm: bool) -> None:
        """The top's layers in training mode; with batch_norm False its batch norms keep their running statistics."""
        self.top_modules.train()
        if not batch_norm:
            for module in self.top_modules.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()


class TrunkOutputs:
    """uint8 NHWC images -> the trunk's float16 N x C x h x w outputs; `key` says what they depend on besides the
    pixels (for FeatureCache)."""

    def __init__(self, split: Split, device: torch.device, backbone: str, weights: str):
        self.split, self.device = split, device
        self.key = fingerprint(params=["partial-trunk", backbone, weights, split.model.input_size, split.blocks],
                               weights=weights_source(backbone, weights), device=device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.split.model.eval()
        out = []
        for start in range(0, len(images), BATCH):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + BATCH])).to(self.device)
            out.append(self.split.trunk(chunk.permute(0, 3, 1, 2).float().div_(255)).half().cpu().numpy())
        if not out:
            with torch.inference_mode():
                probe = self.split.trunk(torch.zeros(1, images.shape[3], *images.shape[1:3], device=self.device))
            return np.zeros((0, *probe.shape[1:]), np.float16)
        return np.concatenate(out)


@torch.no_grad()
def start_head_from_probe(split: Split, train_x: np.ndarray, train_y: np.ndarray, c: float, classes: int,
                          device: torch.device) -> float:
    """LP-FT's first step: fit the linear probe on the frozen top's pooled features of the training rows and write
    it into the classifier; returns the probe's training accuracy."""
    pooled = top_outputs(split, train_x, split.backbone.num_features, device, pre_logits=True)
    # one overall scale: per-feature standardisation folded into the head gives a near-constant feature a huge
    # weight, and the first steps on the stages below, moving that feature, then throw the logits off
    probe = LinearProbe(c, classes, device, per_feature=False).fit(pooled, train_y)
    probe.fold_into(split.backbone.get_classifier())
    return float((probe.predict_proba(pooled).argmax(1) == train_y).mean())


def train_top(split: Split, train_x: np.ndarray, train_y: np.ndarray, params, epochs: int, device: torch.device,
              seed: int) -> list[dict]:
    """AdamW on the top stages (lr_body) and the classifier (lr_head for a random head, lr_body for one started
    from the probe), warm-up then cosine decay, label smoothing, `epochs` passes over the cached views in seeded
    random order; returns one record per epoch."""
    seed_everything(seed)
    head = list(split.backbone.get_classifier().parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in split.top_modules.parameters() if id(p) not in head_ids]
    from_probe = params.partial_head == "probe"
    optimizer = torch.optim.AdamW([{"params": body, "lr": params.lr_body},
                                   {"params": head, "lr": params.lr_body if from_probe else params.lr_head}],
                                  weight_decay=params.weight_decay)
    per_epoch = max(1, math.ceil(len(train_x) / params.batch_size))
    total, warmup = epochs * per_epoch, min(params.warmup_epochs * per_epoch, epochs * per_epoch // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, warmup))  # full fine-tuning's own
    rng = np.random.default_rng(seed)
    targets = torch.from_numpy(train_y.astype(np.int64))
    history = []
    split.model.eval()
    split.train_mode(batch_norm=not from_probe)  # a probe's head reads features made with the running statistics
    for epoch in range(epochs):
        order = rng.permutation(len(train_x))
        losses, correct = [], 0
        for start in range(0, len(order), params.batch_size):
            batch = order[start:start + params.batch_size]
            x = torch.from_numpy(train_x[batch]).to(device).float()
            y = targets[batch].to(device)
            logits = split.top(x)
            loss = F.cross_entropy(logits, y, label_smoothing=params.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            correct += int((logits.argmax(1) == y).sum())
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "train_accuracy": correct / len(order)})
    split.top_modules.eval()
    return history


@torch.no_grad()
def top_outputs(split: Split, activations: np.ndarray, width: int, device: torch.device,
                pre_logits: bool = False) -> np.ndarray:
    """The top in evaluation mode on cached trunk outputs, in batches: N x width logits (or pooled features)."""
    split.model.eval()
    out = [np.zeros((0, width), np.float32)]
    for start in range(0, len(activations), 256):
        x = torch.from_numpy(activations[start:start + 256]).to(device).float()
        out.append(split.top(x, pre_logits=pre_logits).float().cpu().numpy())
    return np.concatenate(out)


def predict_top(split: Split, activations: np.ndarray, classes: int, device: torch.device) -> np.ndarray:
    return torch.from_numpy(top_outputs(split, activations, classes, device)).softmax(1).numpy()


def partial(job):
    """The strategy (see the module's docstring); the Job and Outcome of pipeline/training/learners.py."""
    from pipeline.training.learners import Outcome, frozen_training_rows

    if not job.world.is_main:
        return None  # the top trains in seconds on cached outputs: one process does it
    params, variant, device = job.params, job.variant, job.device
    start = time.perf_counter()
    seed_everything(params.seed)  # the new head's initial weights
    model = channels_last(Classifier(create_backbone(variant.backbone, variant.weights), num_classes=job.classes,
                                     input_size=variant.input_size).to(device))
    split = Split(model, params.partial_blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in split.top_modules.parameters():
        p.requires_grad_(True)
    outputs = TrunkOutputs(split, device, variant.backbone, variant.weights)
    cached = FeatureCache(outputs, job.workspace.features)
    train_x, train_y = frozen_training_rows(job, outputs)
    probe_accuracy = (start_head_from_probe(split, train_x, train_y, params.probe_c, job.classes, device)
                      if params.partial_head == "probe" else None)
    history = train_top(split, train_x, train_y, params, variant.epochs, device, params.seed)
    seconds = time.perf_counter() - start
    val, *fixed = job.held_out  # the external images (and the pool) are the same for every fold: cached
    probs = (predict_top(split, outputs(val), job.classes, device),
             *(predict_top(split, cached(images), job.classes, device) for images in fixed))
    for p in model.parameters():
        p.requires_grad_(True)
    meta = {"train_seconds": round(seconds, 2), "partial_blocks": params.partial_blocks,
            "partial_head": params.partial_head, "probe_train_accuracy": probe_accuracy,
            "partial_training_rows": len(train_x), "trunk_output_shape": list(train_x.shape[1:]),
            "feature_cache_hits": cached.hits, "feature_cache_misses": cached.misses}
    return Outcome(probs, history, meta, model.eval())
