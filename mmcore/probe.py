"""Probe stage (placeholder until its issue lands)."""

from __future__ import annotations

from mmcore.base import StrictModel

STAGE = "probe"


class ProbeConfig(StrictModel):
    """Settings of the probe stage."""
