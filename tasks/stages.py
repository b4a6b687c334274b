"""One thin Prefect task per stage: read Parquet, call one mmcore function, write Parquet."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mmcore import clean as clean_stage
from mmcore import tables
from mmcore.config import PipelineConfig, dump_config
from tasks.common import StageOutput, execute, is_transient, publish, stage_cache

_IO = dict(retries=2, retry_delay_seconds=1, retry_condition_fn=is_transient, persist_result=True)


def _manifest(params: dict) -> str:
    return tables.file_digest(Path(params["cfg"].data.manifest))


@task(name="save-config", persist_result=False)
def save_config(cfg: PipelineConfig) -> Path:
    """Write the resolved config into the run folder, so every output can be reproduced."""
    path = cfg.run_dir / "config.yaml"
    tables.write_bytes(dump_config(cfg).encode(), path)
    return path


@task(name="clean", cache_policy=stage_cache("clean", extra=_manifest), on_completion=[publish], **_IO)
def clean(cfg: PipelineConfig) -> StageOutput:
    table = clean_stage.read_manifest(cfg.data)
    return execute("clean", cfg, table, tables.file_digest(cfg.data.manifest), clean_stage.run)
