"""Report stage (placeholder until its issue lands)."""

from __future__ import annotations

from mmcore.base import StrictModel

STAGE = "report"


class ReportConfig(StrictModel):
    """Settings of the report stage."""
