"""The mmpipe flow: clean -> probe -> quality -> split -> train -> evaluate -> report."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from mmcore.config import PipelineConfig, load_config
from mmcore.tables import STAGES
from tasks import stages
from tasks.common import StageOutput, run_cached

# Stages this flow runs, in order.
PIPELINE = ("clean", "probe", "quality", "split", "train", "evaluate", "report")


@flow(name="mmpipe", flow_run_name="mmpipe-{cfg.run_name}", log_prints=True, validate_parameters=False)
def pipeline(cfg: PipelineConfig, until: str = "report") -> dict[str, StageOutput]:
    """Run every stage up to and including ``until``; unchanged stages come from cache."""
    wanted = set(STAGES[: STAGES.index(until) + 1])
    stages.save_config(cfg)
    out: dict[str, StageOutput] = {}
    out["clean"] = run_cached(stages.clean, cfg)
    if "probe" in wanted:
        out["probe"] = run_cached(stages.probe, out["clean"], cfg)
    if "quality" in wanted:
        out["quality"] = run_cached(stages.quality, out["probe"], cfg)
    if "split" in wanted:
        out["split"] = run_cached(stages.split, out["quality"], cfg)
    if "train" in wanted:
        out["train"] = run_cached(stages.train, out["split"], cfg)
    if "evaluate" in wanted:
        out["evaluate"] = run_cached(stages.evaluate, out["split"], out["train"], cfg)
    # The report always runs last: stages after `until` show as "not run" in it.
    last = list(out.values())[-1]
    out["report"] = run_cached(stages.report, last, cfg)
    return out


@flow(name="mmpipe-ablate", flow_run_name="mmpipe-ablate-{cfg.run_name}", log_prints=True, validate_parameters=False)
def ablate(cfg: PipelineConfig, schemes: list[str], seeds: int = 1) -> Path:
    """Train and evaluate each augmentation scheme (x seeds) on the same cached split; one table."""
    split = pipeline(cfg, until="split")["split"]
    variants: dict[str, list[str]] = {}
    for scheme in schemes:
        for seed in range(seeds):
            run_dir = cfg.run_dir / "ablate" / f"{scheme}-s{seed}"
            train_cfg = cfg.train.model_copy(update={"augment": scheme})
            v = cfg.model_copy(update={"seed": cfg.seed + seed, "out": run_dir, "train": train_cfg})
            stages.save_config(v)
            model = run_cached(stages.train, split, v)
            run_cached(stages.evaluate, split, model, v)
            variants.setdefault(scheme, []).append(str(run_dir))
    path = stages.ablation(cfg, variants)
    run_cached(stages.report, split, cfg)
    return path


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
