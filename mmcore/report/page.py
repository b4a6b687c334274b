"""The report page: its sections assembled into one self-contained HTML file, and a markdown summary.

``render`` builds every section (``sections.SECTIONS``) from the run's artifacts; a section that
fails shows its error and costs only itself. The page has no timestamp, and the charts no
metadata, so the same run gives the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import yaml

from mmcore import graph, images, sources, tables
from mmcore.base import StageContext
from mmcore.errors import InputError
from mmcore.layout import RunLayout
from mmcore.report import plots
from mmcore.report.markup import Thumbs, badge, ci_text, esc, fmt
from mmcore.report.sections import ERROR, NOT_RUN, SECTIONS, ReportConfig, Section, headline, headline_metrics
from mmcore.report.stats import Run, TrainStats
from mmcore.tables import StageResult

_CSS = """
:root{--fg:#1d2330;--muted:#6b7280;--line:#e5e7eb;--bg:#f6f7f9;--card:#fff;--accent:#0072B2;--good:#047857;--bad:#b91c1c;--warn:#b45309}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif}
nav{position:sticky;top:0;z-index:10;display:flex;gap:4px;align-items:center;padding:8px 24px;background:#1d2330;color:#fff;flex-wrap:wrap}
nav .brand{font-weight:700;margin-right:16px;letter-spacing:.02em}
nav a{color:#d1d5db;text-decoration:none;padding:4px 10px;border-radius:6px;font-size:13px}
nav a:hover{background:#374151;color:#fff}
nav a .dot{display:inline-block;width:7px;height:7px;border-radius:50%;margin-left:6px;vertical-align:middle}
.dot.ok{background:#34d399}.dot.not-run{background:#6b7280}.dot.error{background:#f87171}
header{padding:20px 24px 4px}
header h1{margin:0 0 4px;font-size:22px}
header .sub{color:var(--muted);font-size:13px}
main{padding:8px 24px 40px;max-width:1400px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 20px;margin:16px 0;scroll-margin-top:56px}
section h2{margin:0 0 10px;font-size:18px;display:flex;align-items:center;gap:10px}
section h3{font-size:15px;margin:18px 0 8px}
section h4{font-size:13px;margin:14px 0 6px;color:#374151;text-transform:uppercase;letter-spacing:.04em}
h3 small{color:var(--muted);font-weight:400;margin-left:6px}
.tablewrap{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;margin:4px 0 8px}
th{background:#f3f4f6;text-align:left;font-weight:600;padding:5px 10px;border-bottom:1px solid var(--line);white-space:nowrap}
td{padding:4px 10px;border-bottom:1px solid var(--line);vertical-align:top}
tbody tr:nth-child(even){background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.chance{color:var(--muted)}
table.kv td:first-child{color:#374151;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;margin:8px 0}
.charts.grid3 figure.chart{flex:0 1 calc(33% - 8px)}
figure{margin:0}
figure.chart{background:#fff;border:1px solid var(--line);border-radius:8px;padding:6px}
figure.chart img{display:block;max-width:100%;height:auto}
figure.chart figcaption{font-size:11px;color:var(--muted);padding:2px 4px}
.badge{display:inline-block;padding:1px 8px;border-radius:999px;font-size:11px;font-weight:600;background:#e5e7eb;color:#374151}
.badge.good{background:#d1fae5;color:var(--good)}.badge.bad{background:#fee2e2;color:var(--bad)}
.badge.warn{background:#fef3c7;color:var(--warn)}.badge.info{background:#dbeafe;color:#1d4ed8}.badge.muted{background:#f3f4f6;color:var(--muted)}
.notrun{color:var(--muted);font-style:italic}
.warn{color:var(--warn)}
.stats{display:flex;gap:12px;flex-wrap:wrap;margin:6px 0 10px}
.stat{border:1px solid var(--line);border-radius:8px;padding:8px 14px;min-width:130px;background:#fbfbfc}
.stat .label{font-size:11px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.stat .value{font-size:20px;font-weight:600;font-variant-numeric:tabular-nums}
.reasons{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.reason{border:1px solid var(--line);border-radius:8px;padding:8px 10px;background:#fbfbfc;max-width:100%}
.rhead{margin-bottom:6px;max-width:560px}.rhead code{font-weight:600}.rhead .count{font-weight:700;margin:0 6px}
.rhead .meaning{color:var(--muted);font-size:12px}
.cards{display:flex;gap:10px;flex-wrap:wrap}
figure.card{width:170px;border:1px solid var(--line);border-radius:8px;padding:6px;background:#fff;font-size:11px}
figure.card img,.noimg{display:block;margin:0 auto 4px;border-radius:4px}
.noimg{width:96px;height:72px;background:repeating-linear-gradient(45deg,#f3f4f6,#f3f4f6 6px,#e5e7eb 6px,#e5e7eb 12px);color:var(--muted);font-size:10px;text-align:center;padding-top:18px;line-height:1.2}
.rowid{color:var(--muted);font-family:ui-monospace,Menlo,monospace}
.detail{display:block;color:var(--warn);margin-top:2px;word-break:break-word}
table.gallery td{width:150px;font-size:11px}
table.gallery td.query{background:#eff6ff}
.rank{font-weight:600;font-size:11px;margin-bottom:3px}.rank small{color:var(--muted);font-weight:400}
.qcap{max-width:150px}
pre{background:#0f172a;color:#e2e8f0;padding:12px;border-radius:8px;overflow:auto;font-size:12px;max-height:480px}
details{margin:8px 0}summary{cursor:pointer;color:var(--accent);font-weight:600;font-size:13px}
.headline{display:flex;gap:12px;flex-wrap:wrap;padding:0 24px}
"""

# Counts images that failed to decode, after load; the browser test reads it with --dump-dom.
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, broken = 0;
  for (var i = 0; i < imgs.length; i++) { if (!imgs[i].complete || imgs[i].naturalWidth === 0) broken++; }
  document.body.dataset.images = String(imgs.length);
  document.body.dataset.brokenImages = String(broken);
});
"""


_CONFIG_BYTES = 1 << 20  # a resolved config is a few KB; a larger file is not read for the probe section


def decode_policy(probe: Mapping | None) -> images.DecodePolicy:
    """The decoding policy of a run's ``probe`` section (``formats``, ``max_pixels``, ``max_file_bytes``).

    Missing or malformed values keep the defaults: the report never decodes more than they allow.
    """
    probe = probe if isinstance(probe, Mapping) else {}
    d = images.DEFAULT_POLICY
    formats = probe.get("formats")
    formats = tuple(formats) if isinstance(formats, list) and formats and all(isinstance(f, str) for f in formats) else d.formats

    def positive(key: str, default: int) -> int:
        v = probe.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else default

    return images.DecodePolicy(formats, positive("max_pixels", d.max_pixels), positive("max_file_bytes", d.max_bytes))


def _run_policy(layout: RunLayout) -> images.DecodePolicy:
    """The policy of the run's saved config.yaml (its ``probe`` mapping), defaults without one."""
    try:
        if layout.config.stat().st_size > _CONFIG_BYTES:
            return images.DEFAULT_POLICY
        doc = yaml.safe_load(layout.config.read_text(errors="replace"))
    except (OSError, yaml.YAMLError, RecursionError):
        return images.DEFAULT_POLICY
    return decode_policy(doc.get("probe") if isinstance(doc, Mapping) else None)


def _section(sid: str, run: Run, cfg: ReportConfig, thumbs: Thumbs) -> Section:
    try:
        return SECTIONS[sid][1](run, cfg, thumbs)
    except Exception as e:  # one unexpected artifact must not cost the whole report
        return Section(ERROR, f'<p class="warn">Could not render this section: {esc(type(e).__name__)}: {esc(str(e))}</p>')


def render(
    run_dir: str | os.PathLike,
    cfg: ReportConfig | None = None,
    image_root: sources.ImageSource | str | os.PathLike | None = None,
    run_name: str | None = None,
    config_error: str = "",
    decode: images.DecodePolicy | None = None,
) -> tuple[str, dict[str, str]]:
    """The report page and each section's status (``ok``, ``not-run`` or ``error``).

    Args:
        cfg: default: ``ReportConfig()``.
        image_root: the run's image source (``sources.of(data)``: files, tar shards or Parquet), or the
            folder image paths are relative to; without it images show as a note.
        run_name: the page's title; default: the run folder's name.
        config_error: why the run's config.yaml does not validate, shown with it.
        decode: how thumbnails may decode images; default: the probe section of the run's config.yaml.
    """
    run = Run(RunLayout(Path(run_dir)), config_error=config_error)
    cfg = cfg if cfg is not None else ReportConfig()
    policy = decode if decode is not None else _run_policy(run.layout)
    source = None if image_root is None else sources.as_source(image_root)
    thumbs = Thumbs(source, cfg.thumbnail_side, cfg.max_thumbnail_pixels, policy)
    sections = {sid: _section(sid, run, cfg, thumbs) for sid in SECTIONS}
    try:
        head = headline(run)
    except Exception:  # the same damaged artifact already shows as its section's error
        head = ""
    name = run_name or run.dir.name
    nav = "".join(f'<a href="#{sid}">{esc(SECTIONS[sid][0])}<span class="dot {s.status}"></span></a>' for sid, s in sections.items())
    body = "".join(
        f'<section id="{sid}" data-status="{s.status}"><h2>{esc(SECTIONS[sid][0])}'
        f'{badge("not run", "muted") if s.status == NOT_RUN else badge("error", "bad") if s.status == ERROR else ""}</h2>{s.body}</section>'
        for sid, s in sections.items()
    )
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>mmpipe report: {esc(name)}</title><style>{_CSS}</style></head><body>"
        f'<nav><span class="brand">mmpipe · {esc(name)}</span>{nav}</nav>'
        f'<header><h1>Run report: {esc(name)}</h1><div class="sub"><code>{esc(str(run.dir.resolve()))}</code> · built from the run\'s artifacts; '
        f"rebuild with <code>mmpipe report RUN_DIR</code></div></header>"
        f'<div class="headline stats">{head}</div><main>{body}</main><script>{_SCRIPT}</script></body></html>\n'
    )
    return page, {sid: s.status for sid, s in sections.items()}


def build(
    run_dir: str | os.PathLike,
    cfg: ReportConfig | None = None,
    image_root: sources.ImageSource | str | os.PathLike | None = None,
    run_name: str | None = None,
    config_error: str = "",
    decode: images.DecodePolicy | None = None,
) -> Path:
    """Write ``RUN_DIR/report/report.html`` from the run's artifacts; safe to call any time.

    The caller says what the run's config says (``mmpipe report`` loads it): the report reads no
    config itself. Arguments as for ``render``.
    """
    if not Path(run_dir).is_dir():
        raise InputError(f"report: run folder not found: {run_dir}")
    page, _ = render(run_dir, cfg, image_root, run_name, config_error, decode)
    path = RunLayout(Path(run_dir)).report
    tables.write_bytes(page.encode(), path)
    return path


def run(table: pd.DataFrame, cfg: ReportConfig, ctx: StageContext) -> StageResult:
    """Build the report; every row passes through (the report quarantines nothing)."""
    page, statuses = render(ctx.run_dir, cfg, sources.of(ctx.data), ctx.run_name)
    path = RunLayout(ctx.run_dir).report
    tables.write_bytes(page.encode(), path)
    return StageResult(table, tables.empty_quarantine(table), {"report_path": str(path), "report_bytes": len(page.encode()), "sections": statuses})


# --------------------------------------------------------------------------- Prefect summary


def summary_markdown(run_dir: str | os.PathLike) -> str:
    """A markdown summary of the run (funnel and headline test metrics), for a Prefect artifact."""
    run = Run(RunLayout(Path(run_dir)))
    lines = [f"### mmpipe run `{run.dir.name}`", "", "| stage | rows in | kept | quarantined | top reasons | seconds | cache |",
             "|---|---:|---:|---:|---|---:|---|"]
    for s in graph.ORDER:
        st = run.stats(s)
        if st is None:
            lines.append(f"| {s} | | | | *not run* | | |")
            continue
        top = ", ".join(f"`{r}` {n}" for r, n in sorted(st.reasons.items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"| {s} | {st.n_rows:,} | {st.n_kept:,} | {st.n_quarantined:,} | {top} | "
                     f"{st.seconds} | {'hit' if run.status(s).cached else ''} |")
    if run.layout.metrics.is_file():
        m = tables.read_json(run.layout.metrics)
        for split in ("test", "val"):
            hm = headline_metrics(m[split]) if isinstance(m.get(split), dict) else {}
            if hm:
                chance = m.get("chance", {}).get(split, {})
                lines += ["", f"**Headline metrics ({split}, 95% CI)**", "", "| metric | value [95% CI] | chance |", "|---|---|---|"]
                lines += [f"| {k} | {ci_text(v)} | {fmt(chance.get(k), 3)} |" for k, v in hm.items()]
                break
    else:
        lines += ["", "*No metrics: evaluate has not run.*"]
    t = run.stats("train", TrainStats)
    if t is not None:
        lines += ["", f"Trained {'?' if t.steps is None else t.steps} steps on `{t.device or '?'}`, final loss {fmt(t.final_loss)}, "
                      f"{fmt(t.samples_per_s)} samples/s."]
    if run.layout.report.is_file():
        lines += ["", f"Report: `{run.layout.report.resolve()}`"]
    return "\n".join(lines) + "\n"


def headline_plots(run_dir: str | os.PathLike) -> str:
    """Markdown with the run's headline plots inline (PNG data URIs): the headline test metrics (point
    estimates; ``summary_markdown``'s table has their CIs) and the training loss, so the Prefect UI
    shows them without the report file."""
    layout, parts = RunLayout(Path(run_dir)), []
    try:
        if layout.metrics.is_file():
            test = tables.read_json(layout.metrics).get("test")
            head = headline_metrics(test) if isinstance(test, dict) else {}
            bars = {k: 100 * float(v["value"]) for k, v in head.items()}
            if bars:
                parts.append(f"![test headline metrics]({plots.barh(bars, title='test headline metrics (%)')})")
        if layout.history.is_file():
            h = tables.read_parquet(layout.history)
            if {"step", "loss"} <= set(h.columns) and len(h):
                parts.append(f"![training loss]({plots.line_panels(h['step'].to_numpy(), [('loss', h['loss'].to_numpy())], xlabel='step')})")
    except Exception as e:  # a plot is no reason to fail the run's summary
        return f"\n*Plots unavailable: {type(e).__name__}: {str(e)[:200]}*\n"
    return "\n\n" + "\n\n".join(parts) + "\n" if parts else ""
