"""Image degradations at graded severities, for the evaluate stage's robustness suite.

Each degradation is a small function ``(image, severity, rng) -> image`` registered by name in
``DEGRADATIONS`` with its default severities and valid range; the output has the input's size so
the encoder sees the same framing. Defaults (``DEFAULT_SEVERITIES``) go from mild to strong, in the
spirit of ImageNet-C's levels.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from mmcore.errors import ConfigError
from mmcore.registry import Registry

DegradeFn = Callable[[Image.Image, float, np.random.Generator], Image.Image]


@dataclass(frozen=True)
class Degradation:
    """A registered degradation: ``fn(image, severity, rng)``, its default severities and valid range."""

    fn: DegradeFn
    severities: tuple[float, ...]  # the defaults, mild to strong
    low: float | None = None  # a severity must lie in [low, high]; None = unbounded
    high: float | None = None


DEGRADATIONS: Registry[Degradation] = Registry("degradation")


def register(name: str, severities: tuple[float, ...], low: float | None = None, high: float | None = None) -> Callable[[DegradeFn], DegradeFn]:
    """Decorator: register ``fn`` as degradation ``name``; a name registered twice raises."""

    def deco(fn: DegradeFn) -> DegradeFn:
        DEGRADATIONS.register(name, Degradation(fn, severities, low, high))
        return fn

    return deco


# Mild to strong. Blur sigma is relative to the image so severities mean the same at any size.
@register("downscale", (2, 4, 8), low=1)
def downscale(img: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    """Shrink by ``factor`` (2 = half the side), then scale back up: lost detail, same size."""
    w, h = img.size
    small = img.resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.Resampling.BILINEAR)
    return small.resize((w, h), Image.Resampling.BILINEAR)


@register("brightness", (0.5, 1.5), low=0)
def brightness(img: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    """Multiply brightness: < 1 darker, > 1 brighter."""
    return ImageEnhance.Brightness(img).enhance(factor)


@register("blur", (0.01, 0.02, 0.04), low=0)
def blur(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur with ``sigma`` as a share of the shorter side (0.01 = 1%)."""
    return img.filter(ImageFilter.GaussianBlur(sigma * min(img.size)))


@register("noise", (0.05, 0.1, 0.2), low=0)
def noise(img: Image.Image, std: float, rng: np.random.Generator) -> Image.Image:
    """Additive Gaussian noise, ``std`` on a 0..1 intensity scale."""
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, std * 255.0, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


@register("jpeg", (50, 20, 8), low=1, high=95)
def jpeg(img: Image.Image, quality: float, rng: np.random.Generator) -> Image.Image:
    """Re-encode as JPEG at ``quality`` (1..95)."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


DEFAULT_SEVERITIES: dict[str, list[float]] = {name: list(d.severities) for name, d in DEGRADATIONS.items()}


def check(degradations: dict[str, list[float]]) -> dict[str, list[float]]:
    """Validate names and severities; one-line ``ConfigError`` naming the valid choices.

    The message carries no location: ``EvaluateConfig``'s validator calls this, and the config
    error already leads with ``evaluate.degradations``.
    """
    for name, sevs in degradations.items():
        d = DEGRADATIONS.get(name)
        for s in sevs:
            if (d.low is not None and s < d.low) or (d.high is not None and s > d.high):
                raise ConfigError(f"{name}: severity must be in [{d.low}, {'inf' if d.high is None else d.high}], got {s}")
    return degradations


def degrade(img: Image.Image, name: str, severity: float, seed: tuple[int, ...] = (0,)) -> Image.Image:
    """Apply one degradation; ``seed`` (e.g. run seed, image index) makes the noise reproducible."""
    return DEGRADATIONS.get(name, where="evaluate.degradations").fn(img, severity, np.random.default_rng(list(seed)))
