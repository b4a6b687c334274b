"""Caching, retries and artifact publishing shared by the stage tasks.

Prefect's ``INPUTS`` policy would hash a path as a string, not the file's bytes, and
``TASK_SOURCE`` sees only the task body, not the mmcore code it calls. So a stage's cache key is
built here from content digests of its inputs, its config section, the data section, the seed,
the run folder, ``provenance.code_digest`` of its mmcore module and, for the stages with an
``extra`` in ``mmcore.graph``, the digest of what the stage reads besides its input table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext

from mmcore import faults, graph, tables
from mmcore.config import PipelineConfig
from mmcore.layout import RunLayout, StagePaths
from mmcore.provenance import code_digest
from mmcore.stale import extra_digest

# Bump to invalidate every cached stage at once (e.g. after a change to this caching scheme).
CACHE_SCHEME = "1"

# The extra digest a task run's cache key was built from, for its body to record in the stats.
# Prefect calls the key function and then the body in the same context, but passes the body nothing
# from the key; computing the digest again would lstat every image (probe) or hash a model folder
# (quality, train, evaluate) a second time, and could record a value other than the key's.
_KEYED_EXTRA: ContextVar[tuple[UUID, str | None] | None] = ContextVar("mmpipe_keyed_extra", default=None)


@dataclass(frozen=True)
class StageOutput:
    """What a stage task returns (and Prefect caches): where its artifacts are and their digests.

    Never a DataFrame: a cache check unpickles the whole result.
    """

    stage: str
    run_dir: str
    kept_digest: str
    quarantine_digest: str
    n_kept: int
    n_quarantined: int

    @property
    def paths(self) -> StagePaths:
        return StagePaths.of(self.run_dir, self.stage)

    def intact(self) -> bool:
        """Artifacts still on disk with the bytes this output recorded (not deleted or overwritten)."""
        p = self.paths
        return (
            p.kept.is_file()
            and p.quarantine.is_file()
            and tables.file_digest(p.kept) == self.kept_digest
            and tables.file_digest(p.quarantine) == self.quarantine_digest
        )


def digest_of(value: Any) -> str:
    """Content digest of a task input: a stage output's kept table, a file, or a plain value."""
    if isinstance(value, StageOutput):
        return value.kept_digest  # checked against the file's bytes by run_cached (intact)
    if isinstance(value, Path):
        return tables.file_digest(value) if value.is_file() else f"missing:{value}"
    return tables.json_digest(value)


def stage_cache(stage: str) -> CachePolicy:
    """Cache policy of a stage task: the content of what it reads (the manifest, or each upstream
    stage's kept table) + its config section, the data section, the seed and the run folder + its
    code + the digest of its graph ``extra``."""
    graph.stage(stage)  # an unknown name fails when the task is built

    def key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
        s = graph.stage(stage)
        cfg: PipelineConfig = params["cfg"]
        upstream: dict[str, StageOutput] = params["upstream"]
        parts = [
            CACHE_SCHEME,
            stage,
            code_digest(s.module),
            cfg.section(stage).model_dump_json(),
            cfg.data.model_dump_json(),
            str(cfg.seed),
            str(cfg.run_dir),
            *(f"{name}={digest_of(out)}" for name, out in sorted(upstream.items())),
        ]
        if s.input is None:
            parts.append(tables.file_digest(cfg.data.manifest))
        if s.extra is not None:
            parts.append(_key_extra(ctx, stage, cfg))
        return tables.text_digest(*parts)

    return CachePolicy.from_cache_key_fn(key) + TASK_SOURCE


def is_transient(task, task_run, state) -> bool:
    """Retry only I/O errors that may pass (a flaky mount); bad data or bugs fail at once."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, faults.ReadError):  # mmcore's reader already retried; its reason code says
        return exc.reason == "read_error"
    return isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError))


def _key_extra(ctx: TaskRunContext, stage: str, cfg: PipelineConfig) -> str:
    """The stage's ``extra`` digest for its cache key, kept for the task body (``keyed_extra``).

    Module-level, not inside the key closure: Dask pickles the closure by value, and a ContextVar
    does not pickle.
    """
    digest = extra_digest(stage, cfg)
    _KEYED_EXTRA.set((ctx.task_run.id, digest))
    return digest or "none"


def keyed_extra(stage: str, cfg: PipelineConfig) -> str | None:
    """The ``extra`` digest this task run's cache key was built from (computed now outside one)."""
    ctx, keyed = TaskRunContext.get(), _KEYED_EXTRA.get()
    if ctx is not None and keyed is not None and keyed[0] == ctx.task_run.id:
        return keyed[1]
    return extra_digest(stage, cfg)


def output_of(stage: str, cfg: PipelineConfig, stats: dict[str, Any]) -> StageOutput:
    """What a stage task returns, from the stats ``execute.run_stage`` wrote."""
    return StageOutput(
        stage=stage,
        run_dir=str(cfg.run_dir),
        kept_digest=stats["kept_digest"],
        quarantine_digest=stats["quarantine_digest"],
        n_kept=stats["n_kept"],
        n_quarantined=stats["n_quarantined"],
    )


def summary_rows(stats: dict[str, Any], cached: bool) -> list[dict[str, Any]]:
    rows = [
        {"metric": "n_rows", "value": stats["n_rows"]},
        {"metric": "n_kept", "value": stats["n_kept"]},
        {"metric": "n_quarantined", "value": stats["n_quarantined"]},
        *({"metric": f"dropped_{r}", "value": n} for r, n in stats.get("reasons", {}).items()),
        {"metric": "seconds", "value": stats["seconds"]},
        {"metric": "cached", "value": cached},
    ]
    return rows


def publish(task, task_run, state) -> None:
    """on_completion hook (fires on Completed and on Cached): stats table + markdown summary.

    Also records in ``RUN_DIR/<stage>/status.json`` whether this run took the stage from cache.
    """
    out = state.result(raise_on_failure=False)
    if not isinstance(out, StageOutput):
        return
    stats = tables.read_json(out.paths.stats)
    cached = state.name == "Cached"
    tables.write_json(
        {"cached": cached, "task_run_id": str(task_run.id), "flow_run_id": str(task_run.flow_run_id),
         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        out.paths.status,
    )
    create_table_artifact(
        key=f"{out.stage}-summary",
        table=summary_rows(stats, cached),
        description=f"{out.stage}: rows in, kept, quarantined per reason",
    )
    reasons = "\n".join(f"| `{r}` | {n} |" for r, n in stats.get("reasons", {}).items()) or "| (none) | 0 |"
    create_markdown_artifact(
        key=f"{out.stage}-report",
        markdown=(
            f"### {out.stage}{' (from cache)' if cached else ''}\n\n"
            f"**{stats['n_rows']}** rows in, **{stats['n_kept']}** kept, **{stats['n_quarantined']}** "
            f"quarantined in {stats['seconds']} s.\n\n| reason | rows |\n|---|---|\n{reasons}\n\n"
            f"Artifacts: `{out.paths.dir}`\n"
        ),
        description=f"{out.stage} summary",
    )


def publish_metrics(task, task_run, state) -> None:
    """on_completion hook of evaluate: the metrics with their CIs as a table artifact."""
    from mmcore import evaluate

    out = state.result(raise_on_failure=False)
    metrics = RunLayout(out.run_dir).metrics if isinstance(out, StageOutput) else None
    if metrics is None or not metrics.is_file():
        return
    table = evaluate.metrics_table(tables.read_json(metrics))
    table = table.astype(object).where(table.notna(), None)  # NaN is not JSON
    create_table_artifact(key="evaluate-metrics", table=table.to_dict(orient="records"),
                          description="test/val metrics with 95% bootstrap CIs")


def publish_run(task, task_run, state) -> None:
    """on_completion hook of the report: the whole run's summary and a link to the report."""
    from prefect.artifacts import create_link_artifact

    from mmcore import report

    out = state.result(raise_on_failure=False)
    if not isinstance(out, StageOutput):
        return
    create_markdown_artifact(key="mmpipe-run-summary", markdown=report.summary_markdown(out.run_dir),
                             description="mmpipe run: funnel and headline metrics")
    html = RunLayout(out.run_dir).report
    create_link_artifact(key="mmpipe-report", link=html.resolve().as_uri(), link_text=str(html),
                         description="the run's self-contained HTML report")


def run_cached(task, *args: Any, **kwargs: Any) -> StageOutput:
    """Call a stage task; if the cached result's files were deleted or overwritten, run it again."""
    # submit(): the flow's task runner decides where it runs (a thread here, a worker on Dask).
    out = task.submit(*args, **kwargs).result()
    if not out.intact():
        out = task.with_options(refresh_cache=True).submit(*args, **kwargs).result()
    return out
