"""Augmentation schemes applied to an image and its caption together, from an explicit RNG.

Every random draw comes from the ``np.random.Generator`` passed in (seeded per sample and epoch by
the loader), so a sample's augmentation is the same across workers, DDP ranks and resumes. A scheme
is a function registered in ``SCHEMES`` by name; ``train.augment`` names one.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from mmcore.errors import ConfigError
from mmcore.registry import Registry
from mmcore.resources import DEFAULT_SYNONYMS

# (image, caption, rng, size, synonyms) -> (size x size image, caption)
Scheme = Callable[[Image.Image, str, np.random.Generator, int, dict[str, list[str]] | None], tuple[Image.Image, str]]
# Registration order is the ablation's order: "none", the baseline, first.
SCHEMES: Registry[Scheme] = Registry("augmentation")
# A horizontal flip turns left into right: these words swap so the caption stays true.
FLIP_WORDS = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_WORD = re.compile(r"[A-Za-z]+")


def load_synonyms(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """The synonym table: lower-case word -> replacement words; a malformed file is a one-line error."""
    import yaml

    p = Path(path) if path is not None else DEFAULT_SYNONYMS
    if not p.is_file():
        raise ConfigError(f"train.synonyms: file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and v and all(isinstance(w, str) for w in v) for k, v in data.items()
    ):
        raise ConfigError(f"train.synonyms: {p} must map words to non-empty lists of words")
    return {k.lower(): [w.lower() for w in v] for k, v in data.items()}


def _match_case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word


def _replace_words(text: str, fn) -> str:
    return _WORD.sub(lambda m: fn(m.group(0)), text)


def flip_caption(text: str) -> str:
    """Swap left and right words (case kept), as a horizontal flip does to the scene."""
    return _replace_words(text, lambda w: _match_case(FLIP_WORDS[w.lower()], w) if w.lower() in FLIP_WORDS else w)


def synonym_caption(text: str, table: dict[str, list[str]], rng: np.random.Generator, p: float = 0.5) -> str:
    """Replace words found in ``table`` with probability ``p``; words not in the table are never touched."""

    def sub(w: str) -> str:
        alts = table.get(w.lower())
        if not alts or rng.random() >= p:
            return w
        return _match_case(alts[int(rng.integers(len(alts)))], w)

    return _replace_words(text, sub)


def drop_words(text: str, rng: np.random.Generator, fraction: float = 0.15) -> str:
    """Delete about ``fraction`` of the words (at least one word stays)."""
    words = text.split()
    if len(words) < 2:
        return text
    keep = rng.random(len(words)) >= fraction
    if not keep.any():
        keep[int(rng.integers(len(words)))] = True
    return " ".join(w for w, k in zip(words, keep) if k)


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop, drawing from ``rng``; scale as open_clip's train transform.

    Light by default: a small crop keeps the scene's positions, and mild jitter its colours, both of
    which captions name.
    """
    w, h = img.size
    area = w * h
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(a * r))), int(round(np.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.resize((size, size), Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch))
    return img.resize((size, size), Image.Resampling.BILINEAR)


def color_jitter(img: Image.Image, rng: np.random.Generator, strength: float = 0.1) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor in [1 - strength, 1 + strength]."""
    for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enh(img).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return img


def random_erase(img: Image.Image, rng: np.random.Generator, area=(0.02, 0.15)) -> Image.Image:
    """Replace one random rectangle with noise (random erasing)."""
    a = np.array(img)
    h, w = a.shape[:2]
    s = rng.uniform(*area) * h * w
    r = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    eh, ew = min(h, max(1, int(np.sqrt(s / r)))), min(w, max(1, int(np.sqrt(s * r))))
    y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
    a[y : y + eh, x : x + ew] = rng.integers(0, 256, size=(eh, ew, 3), dtype=np.uint8)
    return Image.fromarray(a)


@SCHEMES.register("none")
def _none(img: Image.Image, text: str, rng: np.random.Generator, size: int, synonyms=None) -> tuple[Image.Image, str]:
    """Resize only."""
    return (img if img.size == (size, size) else img.resize((size, size), Image.Resampling.BICUBIC)), text


def _crop_jitter(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    return color_jitter(random_resized_crop(img, size, rng), rng)


@SCHEMES.register("light")
def _light(img: Image.Image, text: str, rng: np.random.Generator, size: int, synonyms=None) -> tuple[Image.Image, str]:
    """Light crop and colour jitter; the caption untouched."""
    return _crop_jitter(img, rng, size), text


@SCHEMES.register("aligned")
def _aligned(img: Image.Image, text: str, rng: np.random.Generator, size: int, synonyms=None) -> tuple[Image.Image, str]:
    """Flip with left/right swapped in the caption, jitter, small rotation and crop: the caption stays true."""
    if rng.random() < 0.5:
        img, text = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flip_caption(text)
    img = color_jitter(img, rng)
    # Small rotation: left/right/top/bottom stay true; corners filled with the image's mean.
    fill = tuple(int(c) for c in np.asarray(img).reshape(-1, 3).mean(0))
    img = img.rotate(float(rng.uniform(-10, 10)), Image.Resampling.BILINEAR, fillcolor=fill)
    return random_resized_crop(img, size, rng, scale=(0.85, 1.0)), text


@SCHEMES.register("cross_modal")
def _cross_modal(img: Image.Image, text: str, rng: np.random.Generator, size: int, synonyms=None) -> tuple[Image.Image, str]:
    """Light, plus random erasing in the image and word dropout in the caption."""
    img = _crop_jitter(img, rng, size)
    return random_erase(img, rng), drop_words(text, rng)


@SCHEMES.register("synonym")
def _synonym(img: Image.Image, text: str, rng: np.random.Generator, size: int, synonyms=None) -> tuple[Image.Image, str]:
    """Light, plus synonym replacement from ``synonyms`` (default: the packaged table)."""
    img = _crop_jitter(img, rng, size)
    return img, synonym_caption(text, synonyms if synonyms is not None else load_synonyms(), rng)


# Degradations and how CLIP's ImageNet prompt templates name them ("a blurry photo of a {}.").
DEGRADATIONS = {
    "blur": "a blurry photo of",
    "noise": "a noisy photo of",
    "dark": "a dark photo of",
    "low_resolution": "a low resolution photo of",
    "jpeg": "a jpeg corrupted photo of",
}
DEGRADE_P = 0.5  # share of samples degraded; the rest are as "light" leaves them
_PHOTO_OF = re.compile(r"^(a|an) (photo|picture|image) of ", re.IGNORECASE)


def degrade_image(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """One degradation of ``DEGRADATIONS`` at a random strength (a ``size`` x ``size`` image stays that size)."""
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.0, 2.5)) * img.width / 64))
    if kind == "noise":
        a = np.asarray(img, dtype=np.float32)
        a = a + rng.normal(0.0, float(rng.uniform(20, 40)), size=a.shape)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if kind == "dark":
        return ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.25, 0.5)))
    if kind == "low_resolution":
        f = int(rng.integers(3, 6))
        small = img.resize((max(1, img.width // f), max(1, img.height // f)), Image.Resampling.BILINEAR)
        return small.resize(img.size, Image.Resampling.NEAREST)
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(5, 16)))
        buf.seek(0)
        with Image.open(buf) as im:
            return im.convert("RGB")
    raise ValueError(f"unknown degradation {kind!r}; expected one of {', '.join(DEGRADATIONS)}")


def degrade_caption(text: str, kind: str) -> str:
    """The caption as CLIP's templates name the degraded image: "a blurry photo of <caption>"
    ("a photo of X" becomes "a blurry photo of X", not "a blurry photo of a photo of X")."""
    return f"{DEGRADATIONS[kind]} {_PHOTO_OF.sub('', text, count=1)}"


@SCHEMES.register("degrade")
def _degrade(img: Image.Image, text: str, rng: np.random.Generator, size: int, synonyms=None) -> tuple[Image.Image, str]:
    """Light, then with probability 1/2 one degradation (blur, noise, dark, low resolution, jpeg),
    which the caption names as CLIP's prompt templates do ("a blurry photo of ...")."""
    img = _crop_jitter(img, rng, size)
    if rng.random() >= DEGRADE_P:
        return img, text
    kind = tuple(DEGRADATIONS)[int(rng.integers(len(DEGRADATIONS)))]
    return degrade_image(img, kind, rng), degrade_caption(text, kind)


def apply(
    scheme: str,
    img: Image.Image,
    text: str,
    rng: np.random.Generator,
    size: int,
    synonyms: dict[str, list[str]] | None = None,
) -> tuple[Image.Image, str]:
    """Augment one (image, caption) pair with the registered ``scheme``; the image comes back ``size`` x ``size``."""
    return SCHEMES.get(scheme, where="train.augment")(img, text, rng, size, synonyms)
