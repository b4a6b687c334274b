"""Train stage (placeholder until its issue lands). Keep torch imports out of this module's top level."""

from __future__ import annotations

from mmcore.base import StrictModel

STAGE = "train"


class TrainConfig(StrictModel):
    """Settings of the train stage."""
