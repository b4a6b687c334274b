"""The stage tasks, built from the stage graph by one factory: read Parquet, call the stage, write Parquet.

``STAGE_TASKS[name]`` is the Prefect task of ``mmcore.graph.STAGES[name]``. It takes the config and
the ``StageOutput`` of every stage it reads (``upstream``); its cache key is built from their
content digests (``tasks.common.stage_cache``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from prefect import Task, task
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext

from mmcore import ablation as ablation_mod
from mmcore import execute, graph, ingest, storage, tables
from mmcore import split as split_stage
from mmcore.config import PipelineConfig, dump_config
from mmcore.graph import Stage
from mmcore.layout import RunLayout, StagePaths
from tasks import launch
from tasks.common import (
    StageOutput,
    StageOutputSerializer,
    is_transient,
    keyed_extra,
    localize,
    output_of,
    publish,
    publish_metrics,
    publish_run,
    push,
    stage_cache,
)
from tasks.events import publish_events

# Retries only for I/O that may pass (a flaky mount); bad data or bugs fail at once.
_IO = dict(retries=2, retry_delay_seconds=1, retry_condition_fn=is_transient, persist_result=True)
# Results persist as JSON and are read back only as JSON (tasks.common: never a pickle).
_RESULTS = dict(result_serializer=StageOutputSerializer())

# Artifacts a stage publishes for the UI besides its summary (hooks: a cached task runs no body).
_HOOKS: dict[str, list[Callable]] = {"evaluate": [publish_metrics, publish_events], "report": [publish_run]}
# Tags a Prefect tag concurrency limit can hold to the GPUs a worker has (`prefect concurrency-limit
# create gpu 1`: one GPU stage at a time across every run on the server; no limit, no effect).
GPU_TAG = "gpu"
_TAGS: dict[str, list[str]] = {"train": [GPU_TAG], "evaluate": [GPU_TAG]}


def stage_task(s: Stage) -> Task:
    """The Prefect task of one stage of the graph."""

    def run_stage(cfg: PipelineConfig, upstream: dict[str, StageOutput]) -> StageOutput:
        # Pulled by the cache key already (tasks.common._worker_inputs); again here only for a remote
        # upstream, in case no key was computed: a local run's tables are not hashed once more.
        upstream = {name: _local(out) if out.location else out for name, out in upstream.items()}
        out = _run(cfg, upstream)
        try:  # a remote run folder has the stage as soon as it is done, whichever worker ran it
            push(out)
        except Exception as e:  # not a reason to compute the stage again: run_cached pushes from the flow
            logging.getLogger("mmpipe").warning("%s: upload to %s failed on this worker (%s); the flow retries it",
                                                s.name, out.location, e)
        return out

    def _run(cfg: PipelineConfig, upstream: dict[str, StageOutput]) -> StageOutput:
        if s.name == "train" and cfg.train.gpus > 1:  # DDP: torchrun's rank 0 writes the stage (tasks/launch.py)
            StagePaths.of(cfg.run_dir, s.name).stats.unlink(missing_ok=True)  # only this launch's record counts
            launch.torchrun(cfg.run_dir, cfg.train.gpus)
            return output_of(s.name, cfg, tables.read_json(StagePaths.of(cfg.run_dir, s.name).stats))
        source = graph.input_of(s, list(upstream))
        if source is None:
            table, digest = execute.read_source(cfg, s.name)
        else:
            table, digest = tables.read_parquet(upstream[source].paths.kept), upstream[source].kept_digest
        stats = execute.run_stage(s.name, cfg, table, digest, keyed_extra(s.name, cfg))
        return output_of(s.name, cfg, stats)

    run_stage.__doc__ = f"{s.name}: {s.summary}."
    return task(
        run_stage,
        name=s.name,
        cache_policy=stage_cache(s.name),
        on_completion=[publish, *_HOOKS.get(s.name, [])],
        tags=_TAGS.get(s.name),
        **_IO,
        **_RESULTS,
    )


def _local(out: StageOutput) -> StageOutput:
    """An upstream stage's output with its files on this worker (pulled from its remote run folder)."""
    here = localize(out)
    if here is None:
        raise OSError(f"{out.stage}: its files are neither in {out.run_dir} nor in its remote run folder "
                      f"{out.location or '(none)'}; run again")
    return here


STAGE_TASKS: dict[str, Task] = {name: stage_task(s) for name, s in graph.STAGES.items()}


@task(name="save-config", persist_result=False)
def save_config(cfg: PipelineConfig) -> Path:
    """Write the resolved config into the run folder, so every output can be reproduced."""
    path = RunLayout(cfg.run_dir).config
    tables.write_bytes(dump_config(cfg).encode(), path)
    if (url := storage.url_of(cfg.run_dir)) is not None:
        storage.push_files(path.parent, url, [path.name])
    return path


@task(name="fetch-inputs", persist_result=False, retries=2, retry_delay_seconds=2, retry_condition_fn=is_transient)
def fetch_inputs(cfg: PipelineConfig) -> list[str]:
    """Mirror remote inputs (data.manifest, data.root as URLs) to local disk: changed objects only."""
    flow = FlowRunContext.get()
    done = storage.sync_inputs(cfg.data, token=str(flow.flow_run.id) if flow is not None and flow.flow_run else None)
    for line in (d.line() for d in done):
        print(f"mirror: {line}")
    return [d.line() for d in done]


@task(name="held-out-test", persist_result=False)
def held_out(cfg: PipelineConfig, test_split: StageOutput, test_cfg: PipelineConfig) -> Path:
    """The fixed test set of an ablation: the test rows of ``test_split`` by every key that could leak them."""
    path = RunLayout(cfg.run_dir).held_out
    rows = split_stage.held_out_rows(tables.read_parquet(test_split.paths.kept), ingest.input_key(test_cfg.data))
    tables.write_parquet(rows, path)
    return path


@task(name="ablation-compute", persist_result=False)
def ablation_compute(cfg: PipelineConfig, baseline_curated: StageOutput, steps: int | None = None) -> tuple[int, int]:
    """Training steps and batch size of every variant: the baseline's, on the train rows its train
    stage reads (the kept table of train's input stage: pseudo, after split)."""
    return ablation_mod.derive_compute(cfg, ablation_mod.n_train_rows(tables.read_json(baseline_curated.paths.stats)), steps)


@task(name="ablation", persist_result=False)
def ablation(cfg: PipelineConfig, variants: dict[str, list[str]], baseline: str) -> Path:
    """Per-query test metrics of every variant and seed -> one table with CIs, paired differences and
    each variant's curation; checks the fixed test set and equal compute first."""
    path = RunLayout(cfg.run_dir).ablation
    table = ablation_mod.table(variants, baseline, RunLayout(cfg.run_dir).held_out, cfg.evaluate, seed=cfg.seed)
    tables.write_parquet(table, path)
    view = ablation_mod.summary(table)
    create_table_artifact(key="ablation", table=view.astype(object).where(view.notna(), None).to_dict(orient="records"),
                          description=f"curation variants at equal steps on one fixed test set (baseline {baseline})")
    return path
