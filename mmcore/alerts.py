"""Headline metrics of an evaluation, their change from the previous run, and when that is a regression.

The task layer sends these as Prefect events after every evaluation (``tasks/events.py``):
``mmpipe.evaluate.completed`` always, and ``mmpipe.evaluate.regressed`` when the watched metric
fell by more than ``alert.max_drop`` (a run-level setting, in no stage's cache key); a Prefect automation on the second one alerts the
team. The logic is here, without Prefect, so it is tested on plain values.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, field_validator

from mmcore.base import StrictModel

COMPLETED = "mmpipe.evaluate.completed"
REGRESSED = "mmpipe.evaluate.regressed"

# What the event carries for each evaluated split: retrieval recall both ways (and zero-shot accuracy).
HEADLINE = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
ZEROSHOT = ("acc1", "balanced_acc")
WATCHABLE = (*HEADLINE, *(f"zeroshot_{z}" for z in ZEROSHOT))
SPLITS = ("test", "val", "train")


class AlertConfig(StrictModel):
    """When an evaluation counts as a regression (the ``mmpipe.evaluate.regressed`` event)."""

    metric: str = Field("test/i2t_r5", pattern=r"^[a-z]+/[A-Za-z0-9_@]+$",
                        description="SPLIT/METRIC watched, e.g. test/i2t_r5, test/t2i_r1, test/zeroshot_acc1.")
    max_drop: float = Field(0.05, ge=0, le=1,
                            description="A fall of the metric by more than this (absolute, 0.05 = 5 points of R@5) "
                                        "from the previous run of the same deployment is a regression.")

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        split, _, name = v.partition("/")
        if split not in SPLITS or name not in WATCHABLE:
            raise ValueError(f"unknown metric {v!r}; expected SPLIT/METRIC with SPLIT one of {', '.join(SPLITS)} "
                             f"and METRIC one of {', '.join(WATCHABLE)}")
        return v


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"SPLIT/METRIC": value}`` for the headline metrics of every evaluated split in ``metrics.json``."""
    out: dict[str, float] = {}
    for split, block in sorted(metrics.items()):
        if not isinstance(block, dict) or "retrieval" not in block:
            continue
        retrieval = block.get("retrieval") or {}
        for name in HEADLINE:
            value = _value(retrieval.get(name))
            if value is not None:
                out[f"{split}/{name}"] = value
        zeroshot = block.get("zeroshot") or {}
        for name in ZEROSHOT:
            value = _value(zeroshot.get(name)) if isinstance(zeroshot, dict) else None
            if value is not None:
                out[f"{split}/zeroshot_{name}"] = value
    return out


def _value(entry: Any) -> float | None:
    value = entry.get("value") if isinstance(entry, dict) else entry
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def change(current: dict[str, float], previous: dict[str, float] | None) -> dict[str, float]:
    """Current minus previous, for the metrics both have (empty without a previous run)."""
    if not previous:
        return {}
    return {k: current[k] - previous[k] for k in sorted(current) if k in previous}


def regressed(delta: dict[str, float], cfg: AlertConfig) -> bool:
    """True when the watched metric fell by more than ``cfg.max_drop`` (never without a previous run)."""
    d = delta.get(cfg.metric)
    return d is not None and -d > cfg.max_drop + 1e-12


def payload(current: dict[str, float], previous: dict[str, float] | None, cfg: AlertConfig) -> dict[str, Any]:
    """The event's payload: the metrics, the previous run's, the change, and the verdict."""
    delta = change(current, previous)
    return {
        "metrics": current,
        "previous": previous or {},
        "change": delta,
        "watched": cfg.metric,
        "max_drop": cfg.max_drop,
        "regressed": regressed(delta, cfg),
    }
