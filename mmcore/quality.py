"""Quality stage (placeholder until its issue lands)."""

from __future__ import annotations

from mmcore.base import StrictModel

STAGE = "quality"


class QualityConfig(StrictModel):
    """Settings of the quality stage."""
