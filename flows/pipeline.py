"""The mmpipe flows: the stage graph run in order, and an external evaluation (the ablation: ``flows/ablate.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow

from mmcore import export as export_mod
from mmcore import graph, runlock
from mmcore.config import PipelineConfig, load_config
from mmcore.export import ExportConfig
from mmcore.layout import RunLayout
from tasks import stages
from tasks.common import StageOutput, run_cached
from tasks.export import export
from tasks.external import external_evaluate


@flow(name="mmpipe", flow_run_name="mmpipe-{cfg.run_name}", log_prints=True, validate_parameters=False)
def pipeline(cfg: PipelineConfig, until: str = "report", exports: tuple[ExportConfig, ...] = ()) -> dict[str, StageOutput]:
    """Run every stage of the graph up to ``until`` (the report always last); unchanged ones come from cache;
    then each of ``exports`` (webdataset shards, open_clip CSV, retry manifest), under the run's lock.

    One run at a time per run folder (``runlock.hold``); stages beyond ``until`` left by an earlier
    run on other inputs are moved aside first, so the report never shows them as this run's.
    """
    plan = graph.plan(until)
    stages.fetch_inputs(cfg)  # remote inputs (URLs) mirrored to local disk first; nothing for local ones
    for spec in exports:  # a bad --out or stage fails now, not after the run
        export_mod.check(spec, cfg.run_dir, cfg.data.image_root, tuple(s.name for s in plan))
    with runlock.hold(cfg.run_dir, cfg.data.image_root, tuple(s.name for s in plan)) as run_id:
        runlock.retire_stale(cfg, tuple(s.name for s in plan), run_id)
        stages.save_config(cfg)
        out: dict[str, StageOutput] = {}
        for s in plan:
            out[s.name] = run_cached(stages.STAGE_TASKS[s.name], cfg, {r: out[r] for r in s.reads if r in out})
        for spec in exports:
            export(cfg.run_dir, spec, held=True)
    return out


@flow(name="mmpipe-evaluate-external", flow_run_name="mmpipe-evaluate-{name}", log_prints=True,
      validate_parameters=False)
def evaluate_external(run_dir: Path, other: PipelineConfig, name: str, model: Path | None = None) -> Path:
    """Evaluate a model on another dataset, curated by clean, probe and quality (cached like any run);
    writes ``RUN_DIR/evaluate/external/NAME/metrics.json``.

    Without ``model``: the run's own model, and the run's curation and evaluation settings. With
    ``model`` (a bare model folder): ``run_dir`` is a new folder for the results, and the other
    dataset's config gives the settings.
    """
    if model is None:
        own = load_config(RunLayout(run_dir).config)
    else:
        own = other.model_copy(update={"out": Path(run_dir).resolve()})
        stages.save_config(own)
    curated = own.model_copy(update={"data": other.data, "out": RunLayout(run_dir).curation(name).resolve()})
    quality = pipeline(curated, until="quality")["quality"]
    return external_evaluate(own, other.data, quality, name, model)


@flow(name="mmpipe-from-config", flow_run_name="mmpipe-from-config", log_prints=True)
def from_config(config: str, overrides: list[str] | None = None, until: str = "report",
                exports: list[ExportConfig] | None = None) -> dict[str, StageOutput]:
    """The pipeline for deployments: reads the config file at run time, so edits apply to the next run;
    ``exports`` end the run with exports (e.g. ``[{format: webdataset, out: /data/curated, split: train}]``)."""
    return pipeline(load_config(config, overrides or []), until=until, exports=tuple(exports or ()))


# A stage name, for typed parameters: the Prefect UI shows a choice.
StageName = Literal[graph.ORDER]  # type: ignore[valid-type]


@flow(name="mmpipe-curate", flow_run_name="mmpipe-curate-{cfg.run_name}", log_prints=True)
def curate(cfg: PipelineConfig, until: StageName = "report",
           exports: list[ExportConfig] | None = None) -> dict[str, StageOutput]:
    """The pipeline for deployments with its settings as typed parameters: the Prefect UI shows a
    form with every section and threshold (their descriptions, defaults and bounds) and Prefect
    validates a run's values before it starts. ``from_config`` takes a config file path instead."""
    return pipeline(cfg, until=until, exports=tuple(exports or ()))


def with_runner(runner: str = "local", address: str | None = None, workers: int | None = None):
    """The pipeline flow on a task runner: ``local`` (threads + process pools) or ``dask``.

    On Dask, each stage task runs on a worker and fans its image batches out over the whole cluster
    (``mmcore.parallel``): a ``LocalCluster`` of ``workers`` processes, or the scheduler at ``address``.
    """
    if runner == "local":
        return pipeline
    from prefect_dask import DaskTaskRunner

    if address:
        return pipeline.with_options(task_runner=DaskTaskRunner(address=address))
    kwargs = {"n_workers": workers or 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    return pipeline.with_options(task_runner=DaskTaskRunner(cluster_kwargs=kwargs))
