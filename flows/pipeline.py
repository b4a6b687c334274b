"""The mmpipe flow: clean -> probe -> quality -> split -> train -> evaluate -> report."""

from __future__ import annotations

from prefect import flow

from mmcore.config import PipelineConfig
from mmcore.tables import STAGES
from tasks import stages
from tasks.common import StageOutput, run_cached

# Stages this flow runs, in order (the rest of STAGES land with their issues).
PIPELINE = ("clean",)


@flow(name="mmpipe", flow_run_name="mmpipe-{cfg.run_name}", log_prints=True, validate_parameters=False)
def pipeline(cfg: PipelineConfig, until: str = "report") -> dict[str, StageOutput]:
    """Run every stage up to and including ``until``; unchanged stages come from cache."""
    last = min(STAGES.index(until), STAGES.index(PIPELINE[-1]))
    stages.save_config(cfg)
    out: dict[str, StageOutput] = {}
    out["clean"] = run_cached(stages.clean, cfg)
    if last == STAGES.index("clean"):
        return out
    return out
