"""The mmpipe flows: the stage graph run in order, an ablation over it, and an external evaluation."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from mmcore import graph
from mmcore.config import PipelineConfig, load_config
from mmcore.layout import RunLayout
from tasks import stages
from tasks.common import StageOutput, run_cached
from tasks.external import external_evaluate


@flow(name="mmpipe", flow_run_name="mmpipe-{cfg.run_name}", log_prints=True, validate_parameters=False)
def pipeline(cfg: PipelineConfig, until: str = "report") -> dict[str, StageOutput]:
    """Run every stage of the graph up to ``until`` (the report always last); unchanged ones come from cache."""
    stages.save_config(cfg)
    out: dict[str, StageOutput] = {}
    for s in graph.plan(until):
        out[s.name] = run_cached(stages.STAGE_TASKS[s.name], cfg, {r: out[r] for r in s.reads if r in out})
    return out


@flow(name="mmpipe-ablate", flow_run_name="mmpipe-ablate-{cfg.run_name}", log_prints=True, validate_parameters=False)
def ablate(cfg: PipelineConfig, schemes: list[str], seeds: int = 1) -> Path:
    """Train and evaluate each augmentation scheme (x seeds) on the same cached split; one table."""
    split = pipeline(cfg, until="split")["split"]
    train, evaluate = stages.STAGE_TASKS["train"], stages.STAGE_TASKS["evaluate"]
    variants: dict[str, list[str]] = {}
    for scheme in schemes:
        for seed in range(seeds):
            run_dir = RunLayout(cfg.run_dir).variant(scheme, seed)
            train_cfg = cfg.train.model_copy(update={"augment": scheme})
            v = cfg.model_copy(update={"seed": cfg.seed + seed, "out": run_dir, "train": train_cfg})
            stages.save_config(v)
            model = run_cached(train, v, {"split": split})
            run_cached(evaluate, v, {"split": split, "train": model})
            variants.setdefault(scheme, []).append(str(run_dir))
    path = stages.ablation(cfg, variants)
    run_cached(stages.STAGE_TASKS["report"], cfg, {"split": split})
    return path


@flow(name="mmpipe-evaluate-external", flow_run_name="mmpipe-evaluate-{name}", log_prints=True,
      validate_parameters=False)
def evaluate_external(run_dir: Path, other: PipelineConfig, name: str) -> Path:
    """Evaluate a run's model on another dataset, curated with the run's own clean, probe and quality
    settings (cached like any run); writes ``RUN_DIR/evaluate/external/NAME/metrics.json``."""
    own = load_config(RunLayout(run_dir).config)
    curated = own.model_copy(update={"data": other.data, "out": RunLayout(run_dir).curation(name).resolve()})
    quality = pipeline(curated, until="quality")["quality"]
    return external_evaluate(own, other.data, quality, name)


@flow(name="mmpipe-from-config", flow_run_name="mmpipe-from-config", log_prints=True)
def from_config(config: str, overrides: list[str] | None = None, until: str = "report") -> dict[str, StageOutput]:
    """The pipeline for deployments: reads the config file at run time, so edits apply to the next run."""
    return pipeline(load_config(config, overrides or []), until=until)


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
