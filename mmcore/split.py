"""Split stage (placeholder until its issue lands)."""

from __future__ import annotations

from mmcore.base import StrictModel

STAGE = "split"


class SplitConfig(StrictModel):
    """Settings of the split stage."""
