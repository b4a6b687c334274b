"""Image degradations at graded severities, for the evaluate stage's robustness suite.

Each degradation is a small function ``(image, severity, rng) -> image`` registered by name in
``DEGRADATIONS``; the output has the input's size so the encoder sees the same framing. Defaults
(``DEFAULT_SEVERITIES``) go from mild to strong, in the spirit of ImageNet-C's levels.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from mmcore.errors import ConfigError

Degradation = Callable[[Image.Image, float, np.random.Generator], Image.Image]
DEGRADATIONS: dict[str, Degradation] = {}


def register(name: str) -> Callable[[Degradation], Degradation]:
    def deco(fn: Degradation) -> Degradation:
        if name in DEGRADATIONS:
            raise ValueError(f"degradation {name!r} is already registered")
        DEGRADATIONS[name] = fn
        return fn

    return deco


@register("downscale")
def downscale(img: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    """Shrink by ``factor`` (2 = half the side), then scale back up: lost detail, same size."""
    w, h = img.size
    small = img.resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.Resampling.BILINEAR)
    return small.resize((w, h), Image.Resampling.BILINEAR)


@register("brightness")
def brightness(img: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    """Multiply brightness: < 1 darker, > 1 brighter."""
    return ImageEnhance.Brightness(img).enhance(factor)


@register("blur")
def blur(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur with ``sigma`` as a share of the shorter side (0.01 = 1%)."""
    return img.filter(ImageFilter.GaussianBlur(sigma * min(img.size)))


@register("noise")
def noise(img: Image.Image, std: float, rng: np.random.Generator) -> Image.Image:
    """Additive Gaussian noise, ``std`` on a 0..1 intensity scale."""
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, std * 255.0, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


@register("jpeg")
def jpeg(img: Image.Image, quality: float, rng: np.random.Generator) -> Image.Image:
    """Re-encode as JPEG at ``quality`` (1..95)."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


# Mild to strong. Blur sigma is relative to the image so severities mean the same at any size.
DEFAULT_SEVERITIES: dict[str, list[float]] = {
    "downscale": [2, 4, 8],
    "brightness": [0.5, 1.5],
    "blur": [0.01, 0.02, 0.04],
    "noise": [0.05, 0.1, 0.2],
    "jpeg": [50, 20, 8],
}
_BOUNDS = {"downscale": (1, None), "brightness": (0, None), "blur": (0, None), "noise": (0, None), "jpeg": (1, 95)}


def check(degradations: dict[str, list[float]]) -> dict[str, list[float]]:
    """Validate names and severities; one-line ``ConfigError`` naming the valid choices."""
    for name, sevs in degradations.items():
        if name not in DEGRADATIONS:
            raise ConfigError(f"evaluate.degradations: unknown degradation {name!r}; expected one of {', '.join(sorted(DEGRADATIONS))}")
        lo, hi = _BOUNDS.get(name, (None, None))
        for s in sevs:
            if (lo is not None and s < lo) or (hi is not None and s > hi):
                raise ConfigError(f"evaluate.degradations.{name}: severity must be in [{lo}, {hi or 'inf'}], got {s}")
    return degradations


def degrade(img: Image.Image, name: str, severity: float, seed: tuple[int, ...] = (0,)) -> Image.Image:
    """Apply one degradation; ``seed`` (e.g. run seed, image index) makes the noise reproducible."""
    return DEGRADATIONS[name](img, severity, np.random.default_rng(list(seed)))
