"""The export task: a run's curated rows written for training elsewhere (``mmcore.export``), with its
summary published as a markdown artifact. Never cached: what it writes lies outside the run folder."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mmcore import export as export_mod
from mmcore.export import ExportConfig, ExportSummary
from tasks.common import is_transient


@task(name="export", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=1,
      retry_condition_fn=is_transient)
def export(run_dir: Path, spec: ExportConfig, held: bool = True) -> ExportSummary:
    """Export the run's kept rows as ``spec`` asks (webdataset shards, open_clip CSV or a retry manifest).

    Args:
        held: the caller holds the run folder's lock (the pipeline flow), so the export takes none.
    """
    summary = export_mod.export(run_dir, spec, lock=not held)
    create_markdown_artifact(key=f"export-{spec.format}", markdown=export_mod.summary_markdown(summary),
                             description=f"mmpipe export ({spec.format}) to {summary.out}")
    return summary
