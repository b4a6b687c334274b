"""Quality checks as small registered objects, the cleanvision way.

A check reads measurement columns and returns a score in [0, 1] where lower is worse; a row is
flagged when ``score < threshold``. Every check writes the columns ``<name>_score`` and
``is_<name>`` (named by ``score_column`` / ``issue_column``), and its default threshold sits
here, next to the score; ``quality.thresholds`` overrides it by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mmcore.registry import Registry
from mmcore.tables import IMAGE, ROW_ID


@dataclass(frozen=True)
class Check:
    """One quality check: ``score(table)`` in [0, 1] (lower = worse), flagged below ``threshold``."""

    name: str  # also the quarantine reason code
    score: Callable[[pd.DataFrame], np.ndarray]
    threshold: float
    reason: str  # what a flagged row means, for REASONS and the README
    needs: tuple[str, ...] = ()  # columns ``score`` reads


CHECKS: Registry[Check] = Registry("check")


def register(check: Check) -> Check:
    """Add a check to ``CHECKS`` under its name; a name registered twice is a programming error."""
    if not 0.0 <= check.threshold <= 1.0:
        raise ValueError(f"check {check.name!r}: threshold must be in [0, 1], got {check.threshold}")
    return CHECKS.register(check.name, check)


def validate_names(names: Iterable[str], where: str | None = None) -> None:
    """Raise a one-line ConfigError for names that are not registered checks.

    A config validator leaves ``where`` out: the config error already starts with the field.
    """
    CHECKS.check(list(names), where)


def get(names: Iterable[str], where: str = "quality.checks") -> list[Check]:
    """The registered checks named, in the order given."""
    names = list(names)
    validate_names(names, where)
    return [CHECKS[n] for n in names]


def score_column(name: str) -> str:
    return f"{name}_score"


def issue_column(name: str) -> str:
    return f"is_{name}"


def evaluate(df: pd.DataFrame, check: Check, threshold: float | None = None) -> pd.DataFrame:
    """The check's ``<name>_score`` and ``is_<name>`` columns for ``df`` (same index)."""
    thr = check.threshold if threshold is None else threshold
    score = np.clip(np.asarray(check.score(df), dtype=np.float64), 0.0, 1.0)
    return pd.DataFrame(
        {score_column(check.name): score, issue_column(check.name): score < thr}, index=df.index
    )


# --------------------------------------------------------------------------- scores

# Scale of the too_small score: a short side of SMALL_REF_PX or more scores 1.
SMALL_REF_PX = 256


def _short_side(df: pd.DataFrame) -> np.ndarray:
    return np.minimum(df["width"].to_numpy(np.float64), df["height"].to_numpy(np.float64))


def _small_score(df: pd.DataFrame) -> np.ndarray:
    return _short_side(df) / SMALL_REF_PX


def _aspect_score(df: pd.DataFrame) -> np.ndarray:
    w, h = df["width"].to_numpy(np.float64), df["height"].to_numpy(np.float64)
    return np.minimum(w, h) / np.maximum(np.maximum(w, h), 1.0)


def _dark_score(df: pd.DataFrame) -> np.ndarray:
    # 99th percentile of brightness: dark only if nearly every pixel is dark.
    return df["brightness_p99"].to_numpy(np.float64)


def _bright_score(df: pd.DataFrame) -> np.ndarray:
    return 1.0 - df["brightness_p5"].to_numpy(np.float64)


# A sharp edge changes by about a third of the image's range per pixel at the analysis size; a
# sharpness of 0.5 or more scores 1.
SHARPNESS_FULL = 0.5
ENTROPY_BITS = 8.0


def _blur_score(df: pd.DataFrame) -> np.ndarray:
    return df["sharpness"].to_numpy(np.float64) / SHARPNESS_FULL


def _information_score(df: pd.DataFrame) -> np.ndarray:
    return df["entropy"].to_numpy(np.float64) / ENTROPY_BITS


def _duplicate_score(df: pd.DataFrame) -> np.ndarray:
    """0 for a file whose pixels equal an earlier (lower row_id) different file's, else 1.

    Rows sharing one image path (one image, several captions) are the same file, not duplicates.
    """
    order = df.sort_values(ROW_ID, kind="stable")
    first_path = order.groupby("pixel_hash", sort=False)[IMAGE].transform("first")
    dup = (order[IMAGE] != first_path) & order["pixel_hash"].ne("")
    return np.where(dup.reindex(df.index).to_numpy(), 0.0, 1.0)


def _alignment_score(df: pd.DataFrame) -> np.ndarray:
    # Cosine similarity in [-1, 1] mapped to [0, 1].
    return (df["clip_score"].to_numpy(np.float64) + 1.0) / 2.0


register(Check("too_small", _small_score, 64 / SMALL_REF_PX,
               f"short side below threshold x {SMALL_REF_PX} px (default 64 px)", ("width", "height")))
register(Check("extreme_aspect", _aspect_score, 0.25,
               "short side / long side below threshold (default 1:4)", ("width", "height")))
register(Check("too_dark", _dark_score, 0.15,
               "99th percentile of brightness below threshold (nearly every pixel dark)", ("brightness_p99",)))
register(Check("too_bright", _bright_score, 0.10,
               "5th percentile of brightness above 1 - threshold (nearly every pixel bright)", ("brightness_p5",)))
register(Check("blurry", _blur_score, 0.30,
               f"sharpness (strongest edges / range on a fixed-size image) below threshold x {SHARPNESS_FULL}",
               ("sharpness",)))
register(Check("low_information", _information_score, 0.005,
               f"gray-level entropy below threshold x {ENTROPY_BITS:g} bits (nearly uniform image)", ("entropy",)))
register(Check("duplicate_image", _duplicate_score, 0.5,
               "same decoded pixels as an earlier, different file (the first is kept)", ("pixel_hash", IMAGE, ROW_ID)))
register(Check("low_alignment", _alignment_score, 0.6,
               "image-text cosine similarity (CLIP score) below the configured threshold or top fraction",
               ("clip_score",)))

# Checks that run by default, in order (a row gets the first reason it fails).
DEFAULT_CHECKS = ("too_small", "extreme_aspect", "too_dark", "too_bright", "low_information", "blurry", "duplicate_image")
