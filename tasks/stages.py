"""One thin Prefect task per stage: read Parquet, call one mmcore function, write Parquet."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mmcore import clean as clean_stage
from mmcore import evaluate as evaluate_stage
from mmcore import probe as probe_stage
from mmcore import quality as quality_stage
from mmcore import report as report_stage
from mmcore import split as split_stage
from mmcore import tables
from mmcore import train as train_stage
from mmcore.config import PipelineConfig, dump_config
from tasks.common import (
    StageOutput,
    execute,
    is_transient,
    publish,
    publish_metrics,
    publish_run,
    read_input,
    stage_cache,
)

_IO = dict(retries=2, retry_delay_seconds=1, retry_condition_fn=is_transient, persist_result=True)


def _manifest(params: dict) -> str:
    return tables.file_digest(Path(params["cfg"].data.manifest))


def _upstream(params: dict) -> str:
    """Everything the report reads: every stage's stats, the training curves, and the evaluation's
    files (metrics, robustness, spot-check, an ablation table, external datasets' metrics)."""
    run_dir = params["cfg"].run_dir
    files = [tables.StagePaths.of(run_dir, s).stats for s in tables.STAGES[:-1]]
    files += [run_dir / "train" / "history.parquet", run_dir / "train" / "timing.json"]
    ev = run_dir / "evaluate"
    files += [ev / f for f in ("metrics.json", "robustness.parquet", "spotcheck.csv", "ablation.parquet")]
    files += sorted(ev.glob("external/*/metrics.json"))
    return tables.text_digest(*(f"{f.relative_to(run_dir)}={tables.file_digest(f) if f.is_file() else '-'}" for f in files))


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


@task(name="probe", cache_policy=stage_cache("probe", "src"), on_completion=[publish], **_IO)
def probe(src: StageOutput, cfg: PipelineConfig) -> StageOutput:
    table, digest = read_input(src)
    return execute("probe", cfg, table, digest, probe_stage.run)


@task(name="quality", cache_policy=stage_cache("quality", "src"), on_completion=[publish], **_IO)
def quality(src: StageOutput, cfg: PipelineConfig) -> StageOutput:
    table, digest = read_input(src)
    return execute("quality", cfg, table, digest, quality_stage.run)


@task(name="split", cache_policy=stage_cache("split", "src"), on_completion=[publish], **_IO)
def split(src: StageOutput, cfg: PipelineConfig) -> StageOutput:
    table, digest = read_input(src)
    return execute("split", cfg, table, digest, split_stage.run)


@task(name="train", cache_policy=stage_cache("train", "src"), on_completion=[publish], **_IO)
def train(src: StageOutput, cfg: PipelineConfig) -> StageOutput:
    """Trains on GPU when there is one, else on CPU (the stats and the artifact say which)."""
    table, digest = read_input(src)
    return execute("train", cfg, table, digest, train_stage.run)


@task(
    name="evaluate",
    cache_policy=stage_cache("evaluate", "src", "model"),
    on_completion=[publish, publish_metrics],
    **_IO,
)
def evaluate(src: StageOutput, model: StageOutput, cfg: PipelineConfig) -> StageOutput:
    table, digest = read_input(src)
    return execute("evaluate", cfg, table, digest, evaluate_stage.run)


@task(name="report", cache_policy=stage_cache("report", "src", extra=_upstream), on_completion=[publish, publish_run])
def report(src: StageOutput, cfg: PipelineConfig) -> StageOutput:
    """Rebuilds RUN_DIR/report/report.html from the run's artifacts (whatever stages ran)."""
    table, digest = read_input(src)
    return execute("report", cfg, table, digest, report_stage.run)


@task(name="ablation", persist_result=False)
def ablation(cfg: PipelineConfig, variants: dict[str, list[str]]) -> Path:
    """Per-query test metrics of every scheme and seed -> a table with CIs and paired differences."""
    import numpy as np
    import pandas as pd

    results = {}
    for scheme, run_dirs in variants.items():
        per_seed = [evaluate_stage.per_query(d, ks=cfg.evaluate.ks) for d in run_dirs]
        results[scheme] = {m: np.stack([q[m] for q in per_seed]) for m in per_seed[0]}
    baseline = "none" if "none" in results else next(iter(results))
    table: pd.DataFrame = evaluate_stage.ablation_table(
        results, baseline=baseline, n_boot=cfg.evaluate.bootstrap, seed=cfg.seed, ci=cfg.evaluate.ci
    )
    path = cfg.run_dir / "evaluate" / "ablation.parquet"
    tables.write_parquet(table, path)
    return path
