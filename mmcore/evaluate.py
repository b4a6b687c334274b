"""Evaluate stage (placeholder until its issue lands)."""

from __future__ import annotations

from mmcore.base import StrictModel

STAGE = "evaluate"


class EvaluateConfig(StrictModel):
    """Settings of the evaluate stage."""
