"""One thin Prefect task per stage: read Parquet, call one mmcore function, write Parquet."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mmcore import clean as clean_stage
from mmcore import probe as probe_stage
from mmcore import quality as quality_stage
from mmcore import tables
from mmcore.config import PipelineConfig, dump_config
from tasks.common import StageOutput, execute, is_transient, publish, read_input, stage_cache

_IO = dict(retries=2, retry_delay_seconds=1, retry_condition_fn=is_transient, persist_result=True)


def _manifest(params: dict) -> str:
    return tables.file_digest(Path(params["cfg"].data.manifest))


def _images(params: dict) -> str:
    """(path, size, mtime) of every image clean kept: an edited image re-runs the probe."""
    cfg: PipelineConfig = params["cfg"]
    paths = tables.read_parquet(params["src"].paths.kept, columns=[tables.IMAGE])[tables.IMAGE]
    return tables.files_fingerprint(cfg.data.image_root, paths)


def _alignment_model(params: dict) -> str:
    model = params["cfg"].quality.alignment_model
    return tables.dir_digest(model) if model is not None else "none"


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


@task(name="probe", cache_policy=stage_cache("probe", "src", extra=_images), on_completion=[publish], **_IO)
def probe(src: StageOutput, cfg: PipelineConfig) -> StageOutput:
    table, digest = read_input(src)
    return execute("probe", cfg, table, digest, probe_stage.run)


@task(name="quality", cache_policy=stage_cache("quality", "src", extra=_alignment_model), on_completion=[publish], **_IO)
def quality(src: StageOutput, cfg: PipelineConfig) -> StageOutput:
    table, digest = read_input(src)
    return execute("quality", cfg, table, digest, quality_stage.run)
