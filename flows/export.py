"""Export a finished run (``mmcore.export``) as a flow of its own: for a deployment that runs after the
pipeline's, or to re-export a run in another form. To end a pipeline run with an export, pass
``exports`` to ``flows.pipeline.pipeline`` (or ``from_config``) instead."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from mmcore.export import ExportConfig, ExportSummary
from tasks.export import export


@flow(name="mmpipe-export", flow_run_name="mmpipe-export-{run_dir.name}", log_prints=True)
def export_run(run_dir: Path, exports: list[ExportConfig]) -> list[ExportSummary]:
    """Each of ``exports`` of the run in ``run_dir``, in order; the run folder is read under a shared lock."""
    return [export(Path(run_dir), spec, held=False) for spec in exports]
