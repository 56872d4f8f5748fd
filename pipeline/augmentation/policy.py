"""Our own thin layer over albumentations (no longer actively maintained), so it can be swapped out in one place.

A policy is an ordered mapping of our transform names to their options, as written in `params.yaml`. Each
name maps to a small frozen dataclass that checks its options and builds the albumentations transform;
albumentations itself is imported only when a policy is built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from pipeline.runtime.errors import PipelineError


def _probability(key: str, p: float) -> None:
    if not 0 <= p <= 1:
        raise PipelineError(f"params: `{key}.p` must be a probability in [0, 1]; got {p!r}")


@dataclass(frozen=True)
class Affine:
    p: float  # chance the transform is applied to an image
    rotate: float  # maximum rotation, degrees either way
    scale: tuple[float, float]  # zoom range (1 = unchanged)
    translate: float  # maximum shift, as a fraction of the side
    shear: float  # maximum shear, degrees either way

    def build(self, A: Any) -> Any:
        return A.Affine(rotate=(-self.rotate, self.rotate), scale=self.scale, shear=(-self.shear, self.shear),
                        translate_percent=(-self.translate, self.translate), border_mode=0, fill=0, p=self.p)


@dataclass(frozen=True)
class Elastic:
    p: float
    alpha: float  # displacement strength, pixels
    sigma: float  # smoothness of the displacement field, pixels

    def build(self, A: Any) -> Any:
        return A.ElasticTransform(alpha=self.alpha, sigma=self.sigma, border_mode=0, fill=0, p=self.p)


@dataclass(frozen=True)
class BrightnessContrast:
    p: float
    brightness: float  # maximum brightness change, fraction of the range
    contrast: float  # maximum contrast change, fraction

    def build(self, A: Any) -> Any:
        return A.RandomBrightnessContrast(brightness_limit=self.brightness, contrast_limit=self.contrast, p=self.p)


@dataclass(frozen=True)
class CoarseDropout:
    p: float
    holes: int  # at most this many rectangles are blanked
    size: float  # maximum hole side, as a fraction of the image side

    def build(self, A: Any) -> Any:
        return A.CoarseDropout(num_holes_range=(1, self.holes), hole_height_range=(self.size / 2, self.size),
                               hole_width_range=(self.size / 2, self.size), fill=0, p=self.p)


@dataclass(frozen=True)
class HorizontalFlip:
    p: float  # never use it for digits or text: a mirrored 2 is not a 2

    def build(self, A: Any) -> Any:
        return A.HorizontalFlip(p=self.p)


@dataclass(frozen=True)
class GaussNoise:
    p: float
    std: tuple[float, float]  # noise standard deviation range, fraction of the pixel range

    def build(self, A: Any) -> Any:
        return A.GaussNoise(std_range=self.std, p=self.p)


@dataclass(frozen=True)
class Colour:
    p: float  # colour pictures only: grayscale has no hue or saturation to change
    saturation: float  # maximum saturation change, fraction
    hue: float  # maximum hue shift, fraction of the colour wheel (at most 0.5)

    def build(self, A: Any) -> Any:
        return A.ColorJitter(brightness=0, contrast=0, saturation=self.saturation, hue=self.hue, p=self.p)


TRANSFORMS: dict[str, type] = {
    "affine": Affine,
    "elastic": Elastic,
    "brightness_contrast": BrightnessContrast,
    "coarse_dropout": CoarseDropout,
    "hflip": HorizontalFlip,
    "gauss_noise": GaussNoise,
    "colour": Colour,
}


@dataclass(frozen=True)
class TransformSpec:
    name: str
    options: Any  # one of the dataclasses in TRANSFORMS


def _option(value: Any, hint: Any, key: str) -> Any:
    if hint in ("float", float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        if not ok:
            raise PipelineError(f"params: `{key}` must be a number >= 0; got {value!r}")
        return float(value)
    if hint in ("int", int):
        if type(value) is not int or value < 1:
            raise PipelineError(f"params: `{key}` must be an integer >= 1; got {value!r}")
        return value
    pair_ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    if not pair_ok or value[0] > value[1]:
        raise PipelineError(f"params: `{key}` must be a [low, high] pair of numbers; got {value!r}")
    return (float(value[0]), float(value[1]))


def parse_transforms(raw: Mapping[str, Any], key: str) -> tuple[TransformSpec, ...]:
    """Check a `{name: {option: value}}` mapping and return it as specs, in order."""
    specs = []
    for name, options in raw.items():
        cls = TRANSFORMS.get(name)
        if cls is None:
            raise PipelineError(f"params: unknown transform `{key}.{name}`; allowed: {', '.join(TRANSFORMS)}")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        options = options or {}
        if not isinstance(options, Mapping) or set(options) != set(fields):
            raise PipelineError(f"params: `{key}.{name}` must set exactly these options: {', '.join(fields)}; "
                                f"got {options!r}")
        values = {k: _option(options[k], hint, f"{key}.{name}.{k}") for k, hint in fields.items()}
        _probability(f"{key}.{name}", values["p"])
        specs.append(TransformSpec(name, cls(**values)))
    return tuple(specs)


def _albumentations() -> Any:
    """albumentations, imported without its import-time update check: that check calls a web server (slow or
    failing offline, and no business of a reproducible pipeline)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def build_policy(specs: tuple[TransformSpec, ...], seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """An albumentations Compose over the specs, seeded with albumentations' own seed."""
    A = _albumentations()
    return A.Compose([spec.options.build(A) for spec in specs], seed=seed)


def augment_image(policy: Any, image: np.ndarray) -> np.ndarray:
    """Apply a built policy to one HxWxC uint8 image, keeping its shape and dtype."""
    out = policy(image=image)["image"]
    return out.reshape(image.shape)


def reseed(policy: Any, seed: int) -> None:
    """Re-seed a built policy's own random streams: one numpy and one python stream, made from `seed`, serve the
    transforms in turn. albumentations' `set_random_seed` gives every transform streams of its own, all from the
    same seed, so each transform's coin (does it apply?) came up the same: with p 0.9, 0.3, 0.5 and 0.2 an image
    was elastically distorted only if also affine-warped, dropped out only if all three others applied. It also
    costs five times as much (0.23 against 0.04 ms an image, a quarter of a 32 px image's augmentation)."""
    seed %= 2**32
    policy.set_random_state(np.random.default_rng(seed), random.Random(seed))


def augment_seeded(policy: Any, image: np.ndarray, seed: int) -> np.ndarray:
    """`augment_image` with the policy re-seeded first: the draw depends on `seed` alone, not on which process or
    how many images came before."""
    reseed(policy, seed)
    return augment_image(policy, image)


def augmented_views(images: np.ndarray, policy: Any, views: int, seed: int) -> np.ndarray:
    """`views` augmented copies of every image, each drawn with its own seed (view-major: all images' first view,
    then all images' second, so `np.tile(targets, views)` labels them)."""
    out = [augment_seeded(policy, image, seed * 7919 + view * len(images) + i)
           for view in range(views) for i, image in enumerate(images)]
    return np.stack(out) if out else images[:0]


def save_policy(policy: Any, path: Path) -> None:
    _albumentations().save(policy, str(path), data_format="json")


def load_policy(path: Path) -> Any:
    return _albumentations().load(str(path), data_format="json")


def describe(specs: tuple[TransformSpec, ...]) -> str:
    """One line per transform, for logs and reports."""
    return json.dumps({s.name: dataclasses.asdict(s.options) for s in specs})
