"""Report: one self-contained HTML page of a run, built from its artifacts only.

``build(RUN_DIR)`` reads what the stages wrote (stats, Parquet, the evaluation's metrics, the
training history, the spot-check sheet) and writes ``RUN_DIR/report/report.html``: charts as PNG
data URIs, thumbnails as JPEG data URIs, inline CSS, no network. Sections, in order: funnel,
scores, split, training, metrics, spotcheck, provenance. Each is a ``<section id=...
data-status="ok|not-run|error">``; a stage that has not run (a run stopped with ``--until``) shows
as "not run", never as an error. Numbers read from artifacts carry ``data-key="<stage>.<stat>"``
and ``data-value`` (the exact JSON value), so tests can check the page against the stats.

The report reads no config: its caller passes the run's name, image root and report section
(``run`` gets them from the stage context, ``mmpipe report`` from the run's config.yaml).

Modules: ``stats`` (the shape of each stage's stats, and the run reader), ``sections`` (one
function per section), ``page`` (the page, the stage's ``run``, the markdown summary), ``markup``
(HTML pieces) and ``plots`` (matplotlib charts).
"""

from mmcore.report.page import build, headline_plots, render, run, summary_markdown
from mmcore.report.sections import SECTIONS as _SECTIONS
from mmcore.report.sections import ReportConfig
from mmcore.report.stats import STAGE

REASONS: dict[str, str] = {}  # the report quarantines nothing
SECTIONS: tuple[str, ...] = tuple(_SECTIONS)  # section ids, in page order

__all__ = ["REASONS", "SECTIONS", "STAGE", "ReportConfig", "build", "headline_plots", "render", "run", "summary_markdown"]
