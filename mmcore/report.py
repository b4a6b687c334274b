"""Report: one self-contained HTML page of a run, built from its artifacts only.

``build(RUN_DIR)`` reads what the stages wrote (stats, Parquet, ``metrics.json``, history, the
spot-check sheet) and writes ``RUN_DIR/report/report.html``: charts as PNG data URIs, thumbnails as
JPEG data URIs, inline CSS, no network. Sections, in order: funnel, scores, split, training,
metrics, spotcheck, provenance. Each is a ``<section id=... data-status="ok|not-run">``; a stage
that has not run (a run stopped with ``--until``) shows as "not run", never as an error. Numbers
read from artifacts carry ``data-key="<stage>.<stat>"`` and ``data-value`` (the exact JSON value),
so tests can check the page against the stats.
"""

from __future__ import annotations

import base64
import html
import importlib
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pydantic import Field

from mmcore import faults, plots, tables
from mmcore.base import StageContext, StrictModel
from mmcore.errors import InputError
from mmcore.images import load_rgb, pixel_limit, resolve_path
from mmcore.graph import ORDER as STAGES
from mmcore.tables import DETAIL, IMAGE, REASON, ROW_ID, TEXT, TEXT_RAW, StagePaths, StageResult

STAGE = "report"
REASONS: dict[str, str] = {}  # the report quarantines nothing

REPORT_FILE = "report.html"
SECTIONS = ("funnel", "scores", "split", "training", "metrics", "spotcheck", "provenance")
OK, NOT_RUN, ERROR = "ok", "not-run", "error"
# Keys every stage's stats have; the rest are the stage's own figures.
_COMMON = {"stage", "n_rows", "n_kept", "n_quarantined", "reasons", "seconds", "input_digest", "config_digest",
           "code_digest", "kept_digest", "quarantine_digest"}
_HEADLINE = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "acc1")
_ROBUST = ("i2t_r5", "t2i_r5", "acc1")  # few curves per panel, so the CI bands stay readable
_HASH_LIMIT = 256 << 20  # artifacts above this are listed by size only: hashing GBs of embeddings is slow


class ReportConfig(StrictModel):
    """What the report shows; it never changes another stage's output."""

    thumbnails_per_reason: int = Field(4, ge=0, le=50, description="Quarantined images shown per reason.")
    max_points: int = Field(5000, ge=100, description="Points in a scatter plot (a seeded sample beyond that).")
    thumbnail_side: int = Field(96, ge=16, le=512, description="Longest side of a thumbnail, in pixels.")
    spotcheck_queries: int = Field(10, ge=0, description="Spot-check queries shown with their top 5.")
    max_thumbnail_pixels: int = Field(50_000_000, ge=1, description="Larger images get a note instead of a thumbnail.")


# --------------------------------------------------------------------------- reading the run


@dataclass
class _Run:
    """A run folder's artifacts, read lazily and at most once."""

    dir: Path
    image_root: Path | None
    config: Any = None  # PipelineConfig, or None when config.yaml is missing or unreadable
    config_text: str = ""
    config_error: str = ""
    _stats: dict[str, dict | None] = field(default_factory=dict)

    def stats(self, stage: str) -> dict[str, Any] | None:
        if stage not in self._stats:
            p = StagePaths.of(self.dir, stage).stats
            self._stats[stage] = tables.read_json(p) if p.is_file() else None
        return self._stats[stage]

    def status(self, stage: str) -> dict[str, Any]:
        p = StagePaths.of(self.dir, stage).dir / "status.json"
        return tables.read_json(p) if p.is_file() else {}

    def file(self, stage: str, *parts: str) -> Path:
        return StagePaths.of(self.dir, stage).dir.joinpath(*parts)

    def table(self, stage: str, quarantine: bool = False, columns: Iterable[str] | None = None, suffix: str | None = None) -> pd.DataFrame | None:
        """A stage's kept (or quarantine) table, only the named columns (and those ending in ``suffix``)."""
        paths = StagePaths.of(self.dir, stage)
        path = paths.quarantine if quarantine else paths.kept
        if not path.is_file():
            return None
        names = pq.read_schema(path).names
        want = [c for c in names if (columns is not None and c in columns) or (suffix is not None and c.endswith(suffix))]
        return tables.read_parquet(path, columns=want if columns is not None or suffix is not None else None)


def _open_run(run_dir: Path, image_root: Path | None) -> _Run:
    from mmcore.config import load_config  # config imports every stage module; only needed here
    from mmcore.errors import MMPipeError

    run = _Run(run_dir, image_root)
    path = run_dir / "config.yaml"
    if path.is_file():
        run.config_text = path.read_text(errors="replace")
        try:
            run.config = load_config(path)
        except MMPipeError as e:
            run.config_error = str(e)
    if run.image_root is None and run.config is not None:
        run.image_root = run.config.data.image_root
    return run


# --------------------------------------------------------------------------- HTML helpers

_esc = html.escape


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)):
        s = ", ".join(map(str, v))
        return s if len(s) <= 120 else s[:117] + "…"
    return str(v)


def _is_ci(v: Any) -> bool:
    return isinstance(v, Mapping) and "value" in v and "low" in v and "high" in v


def _ci_text(leaf: Mapping[str, Any]) -> str:
    """A metric with its interval: ``value [low, high]``."""
    v, lo, hi = leaf.get("value"), leaf.get("low"), leaf.get("high")
    if v is None:
        return "–"
    d = 1 if abs(v) >= 10 else 3  # ranks in one decimal, rates in three
    f = lambda x: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
    return f"{f(v)} [{f(lo)}, {f(hi)}]"


def _json_attr(v: Any) -> str:
    return _esc(json.dumps(v, default=str), quote=True)


def _cell(key: str | None, value: Any, text: str | None = None, cls: str = "") -> str:
    """A table cell; with ``key`` it carries ``data-key`` and the exact value for tests."""
    num = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) or _is_ci(value)
    classes = " ".join(c for c in (cls, "num" if num else "") if c)
    attrs = f' class="{classes}"' if classes else ""
    if key is not None:
        raw = value["value"] if _is_ci(value) else value
        attrs += f' data-key="{_esc(key, quote=True)}" data-value="{_json_attr(raw)}"'
    shown = text if text is not None else (_ci_text(value) if _is_ci(value) else _esc(_fmt(value)))
    return f"<td{attrs}>{shown}</td>"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    """Rows are lists of ready cells (``<td>...``) or plain values."""
    head = "".join(f"<th>{_esc(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if str(c).startswith("<td") else f"<td>{_esc(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="tablewrap"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _ordered(keys: Iterable[str], first: Iterable[str]) -> list[str]:
    """``keys`` with those in ``first`` leading, in that order (JSON artifacts come with sorted keys)."""
    keys, first = list(keys), list(first)
    return [k for k in first if k in keys] + [k for k in keys if k not in first]


def _metric_order(names: Iterable[str]) -> list[str]:
    """Recall@k by k, then NDCG, then ranks, then the rest: the order people read them in."""
    def key(n: str) -> tuple:
        base = n.split("_", 1)[1] if n.split("_", 1)[0] in ("i2t", "t2i") and "_" in n else n
        if base[:1] == "r" and base[1:].isdigit():
            return (0, int(base[1:]), n)
        return (1 if base.startswith("ndcg") else 2 if "rank" in base else 3, 0, n)

    return sorted(names, key=key)


_SPLIT_ORDER = ("train", "val", "test")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and not _is_ci(v):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _kv_table(d: Mapping[str, Any], key_prefix: str, skip: Iterable[str] = ()) -> str:
    """Any dict as a key | value table (nested keys dotted), every value keyed."""
    skip = set(skip)
    rows = [[_esc(k), _cell(f"{key_prefix}.{k}", v)] for k, v in _flatten({k: v for k, v in d.items() if k not in skip})]
    return _table(["key", "value"], rows, "kv") if rows else ""


def _img(uri: str, alt: str, cls: str = "chart") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{_esc(alt, quote=True)}">'


def _figure(uri: str, caption: str) -> str:
    return f'<figure class="chart">{_img(uri, caption)}<figcaption>{_esc(caption)}</figcaption></figure>'


def _not_run(*stages: str, what: str = "") -> str:
    names = ", ".join(f"<code>{_esc(s)}</code>" for s in stages)
    what = f" ({_esc(what)})" if what else ""
    return f'<p class="notrun">Not run: {names} has no artifacts in this run{what}.</p>'


def _badge(text: str, kind: str) -> str:
    return f'<span class="badge {kind}">{_esc(text)}</span>'


class _Thumbs:
    """JPEG data-URI thumbnails of dataset images; a file that cannot be shown gets a note instead."""

    def __init__(self, root: Path | None, side: int, max_pixels: int) -> None:
        self.root, self.side, self.max_pixels = root, side, max_pixels
        self._cache: dict[str, str] = {}

    def __call__(self, rel: Any, alt: str = "") -> str:
        rel = "" if rel is None or (isinstance(rel, float) and math.isnan(rel)) else str(rel)
        if rel not in self._cache:
            self._cache[rel] = self._make(rel)
        out = self._cache[rel]
        return out if out.startswith('<div') else out.replace('alt=""', f'alt="{_esc(alt or rel, quote=True)}"', 1)

    def _make(self, rel: str) -> str:
        def note(why: str) -> str:
            return f'<div class="noimg" title="{_esc(rel, quote=True)}">no preview:<br>{_esc(why)}</div>'

        if not rel:
            return note("no image path")
        if self.root is None:
            return note("image root unknown")
        try:
            path = resolve_path(self.root, rel)
            with pixel_limit(self.max_pixels):
                im = load_rgb(path, max_side=self.side)
        except faults.ReadError as e:  # the retrying reader's reason code
            return note("file not found" if e.reason == "missing_file" else "not a readable file")
        except Exception as e:  # the very images quarantined for being unreadable are shown as notes
            name = type(e).__name__
            if name == "UnsafePath":
                return note("outside the dataset root")
            return note("too many pixels" if "DecompressionBomb" in name else f"cannot decode ({name})")
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=82)
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        return f'<img class="thumb" src="{uri}" width="{im.width}" height="{im.height}" alt="">'


def _reason_meaning(stage: str, reason: str) -> str:
    try:
        return importlib.import_module(f"mmcore.{stage}").REASONS.get(reason, "")
    except Exception:  # a stage module that does not import should not break its report
        return ""


def _caption(row: Mapping[str, Any]) -> str:
    for col in (TEXT, TEXT_RAW):
        v = row.get(col)
        if isinstance(v, str) and v.strip():
            return v if len(v) <= 140 else v[:137] + "…"
    return "(empty caption)"


# --------------------------------------------------------------------------- sections


@dataclass
class _Section:
    id: str
    title: str
    status: str
    body: str


def _funnel(run: _Run, cfg: ReportConfig, thumbs: _Thumbs) -> _Section:
    stages = [s for s in STAGES if s != STAGE]
    ran = [s for s in stages if run.stats(s) is not None]
    if not ran:
        return _Section("funnel", "Funnel", NOT_RUN, _not_run(*stages))
    rows = []
    for s in stages:
        st = run.stats(s)
        if st is None:
            rows.append([f"<td>{_esc(s)}</td>", f"<td>{_badge('not run', 'muted')}</td>", *["<td></td>"] * 5])
            continue
        cached = run.status(s).get("cached")
        state = _badge("cached", "info") if cached else _badge("ran", "good")
        share = st["n_kept"] / st["n_rows"] if st.get("n_rows") else None
        rows.append([
            f"<td><b>{_esc(s)}</b></td>", f"<td>{state}</td>", _cell(f"{s}.n_rows", st.get("n_rows")),
            _cell(f"{s}.n_kept", st.get("n_kept")), _cell(f"{s}.n_quarantined", st.get("n_quarantined")),
            _cell(None, share, "–" if share is None else f"{100 * share:.1f}%"), _cell(f"{s}.seconds", st.get("seconds")),
        ])
    out = [_table(["stage", "status", "rows in", "kept", "quarantined", "kept %", "seconds"], rows, "funnel")]
    first = run.stats(ran[0])
    flow = {"input": first.get("n_rows", 0), **{s: run.stats(s).get("n_kept", 0) for s in ran}}
    charts = [_figure(plots.barh(flow, "Rows kept after each stage", "rows"), "rows kept after each stage")]

    reasons = {(s, r): n for s in ran for r, n in sorted(run.stats(s).get("reasons", {}).items(), key=lambda kv: -kv[1])}
    if reasons:
        colors = [plots.PALETTE[stages.index(s) % len(plots.PALETTE)] for s, _ in reasons]
        charts.append(_figure(plots.barh({f"{s} · {r}": n for (s, r), n in reasons.items()}, "Quarantined rows per reason", "rows", colors),
                              "quarantine reasons per stage"))
    out.append(f'<div class="charts">{"".join(charts)}</div>')
    if not reasons:
        out.append("<p>No row was quarantined.</p>")
        return _Section("funnel", "Funnel", OK, "".join(out))

    out.append("<h3>Quarantine by reason</h3>")
    for s in ran:
        st = run.stats(s)
        if not st.get("reasons"):
            continue
        q = run.table(s, quarantine=True, columns=[ROW_ID, IMAGE, TEXT, TEXT_RAW, REASON, DETAIL]) if cfg.thumbnails_per_reason else None
        out.append(f'<h4>{_esc(s)}</h4><div class="reasons">')
        for r, n in sorted(st["reasons"].items(), key=lambda kv: -kv[1]):
            meaning = _reason_meaning(s, r)
            cards = ""
            if q is not None and REASON in q.columns:
                for row in q[q[REASON] == r].head(cfg.thumbnails_per_reason).to_dict("records"):
                    cap = _caption(row)
                    cards += (
                        f'<figure class="card">{thumbs(row.get(IMAGE), cap)}<figcaption>'
                        f'<span class="rowid">row {_esc(str(row.get(ROW_ID, "?")))}</span> {_esc(cap)}'
                        f'<span class="detail">{_esc(str(row.get(DETAIL, "") or ""))}</span></figcaption></figure>'
                    )
            out.append(
                f'<div class="reason"><div class="rhead"><code>{_esc(r)}</code> '
                f'<span class="count" data-key="{_esc(s)}.reasons.{_esc(r)}" data-value="{n}">{n:,}</span> '
                f'<div class="meaning">{_esc(meaning)}</div></div><div class="cards">{cards}</div></div>'
            )
        out.append("</div>")
    return _Section("funnel", "Funnel", OK, "".join(out))


def _sample(df: pd.DataFrame, n: int) -> pd.DataFrame:
    return df if len(df) <= n else df.iloc[np.sort(np.random.default_rng(0).choice(len(df), n, replace=False))]


def _scores(run: _Run, cfg: ReportConfig, thumbs: _Thumbs) -> _Section:
    qstats, pstats = run.stats("quality"), run.stats("probe")
    if qstats is None and pstats is None:
        return _Section("scores", "Scores", NOT_RUN, _not_run("probe", "quality"))
    out = []
    if qstats is None:
        out.append(_not_run("quality", what="no quality scores"))
    else:
        parts = [t for t in (run.table("quality", suffix="_score"), run.table("quality", True, suffix="_score")) if t is not None and len(t.columns)]
        scores = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        thresholds = qstats.get("thresholds") if isinstance(qstats.get("thresholds"), Mapping) else {}
        panels, rows = [], []
        for col in scores.columns:
            check = col.removesuffix("_score")
            thr = thresholds.get(check)  # quality records the threshold of every check it ran
            v = scores[col].to_numpy(dtype=float)
            n_fail = qstats.get("reasons", {}).get(check, 0)
            panels.append((check, v, thr))
            flagged = qstats.get("flagged") if isinstance(qstats.get("flagged"), Mapping) else None
            rows.append([f"<td><code>{_esc(check)}</code></td>", _cell(None, thr),
                         *([_cell(f"quality.flagged.{check}", flagged.get(check))] if flagged is not None else []),
                         _cell(f"quality.reasons.{check}", n_fail), _cell(None, float(np.nanmean(v)) if np.isfinite(v).any() else None)])
        if panels:
            flagged_col = ["flagged"] if isinstance(qstats.get("flagged"), Mapping) else []
            out.append(_table(["check", "threshold", *flagged_col, "quarantined (first failed check)", "mean score"], rows))
            hist = plots.histograms(panels, "score (lower = worse)")
            out.append(f'<div class="charts">{_figure(hist, "quality scores of every row the quality stage saw; dashed: threshold")}</div>')
        else:
            out.append("<p>The quality stage wrote no <code>*_score</code> columns.</p>")
        extra = {k: v for k, v in qstats.items() if k not in _COMMON}
        if extra:
            out.append(f"<details><summary>quality stats</summary>{_kv_table(extra, 'quality')}</details>")
    if pstats is None:
        out.append(_not_run("probe", what="no image sizes"))
    else:
        probe = run.table("probe", columns=["width", "height", "res_bucket", "aspect_bucket", "format", ROW_ID])
        charts = []
        if probe is not None and {"width", "height"} <= set(probe.columns) and len(probe):
            pts = _sample(probe.dropna(subset=["width", "height"]), cfg.max_points)
            groups = None
            qkept = run.table("quality", columns=[ROW_ID])
            if qkept is not None:
                groups = np.where(pts[ROW_ID].isin(qkept[ROW_ID]), "kept by quality", "quarantined by quality")
            charts.append(_figure(plots.scatter(pts["width"], pts["height"], "Resolution", "width (px)", "height (px)", log=True, groups=groups),
                                  f"width vs height ({len(pts):,} of {len(probe):,} images)"))
            aspect = pts["width"].to_numpy(float) / np.maximum(pts["height"].to_numpy(float), 1)
            mp = pts["width"].to_numpy(float) * pts["height"].to_numpy(float) / 1e6
            charts.append(_figure(plots.scatter(aspect, mp, "Aspect ratio vs megapixels", "width / height", "megapixels", log=True, groups=groups),
                                  "aspect ratio vs size"))
        out.append(f'<div class="charts">{"".join(charts)}</div>')
        tabs = []
        for col in ("res_bucket", "aspect_bucket", "format"):
            if probe is not None and col in probe.columns:
                counts = probe[col].astype(str).value_counts().sort_index()
                tabs.append(_table([col, "images"], [[k, _cell(f"probe.{col}.{k}", int(n))] for k, n in counts.items()]))
        if tabs:
            out.append(f'<div class="charts">{"".join(tabs)}</div>')
        extra = {k: v for k, v in pstats.items() if k not in _COMMON}
        if extra:
            out.append(f"<details><summary>probe stats</summary>{_kv_table(extra, 'probe')}</details>")
    return _Section("scores", "Scores", OK, "".join(out))


def _split(run: _Run, cfg: ReportConfig, thumbs: _Thumbs) -> _Section:
    st = run.stats("split")
    if st is None:
        return _Section("split", "Split", NOT_RUN, _not_run("split"))
    out = []
    splits = st.get("splits")
    if not isinstance(splits, Mapping) or not splits:  # fall back to counting the kept table
        kept = run.table("split", columns=["split", "split_group"])
        splits = {}
        if kept is not None and "split" in kept.columns:
            for s, g in kept.groupby("split", sort=True):
                splits[str(s)] = {"rows": len(g), **({"groups": int(g["split_group"].nunique())} if "split_group" in g else {})}
    if splits:
        fields = _ordered(dict.fromkeys(k for v in splits.values() if isinstance(v, Mapping) for k in v), ("rows", "groups", "ratio", "target", "deviation"))
        rows = [[f"<td><b>{_esc(s)}</b></td>", *(_cell(f"split.splits.{s}.{f}", splits[s].get(f)) for f in fields)]
                for s in _ordered(splits, _SPLIT_ORDER) if isinstance(splits[s], Mapping)]
        out.append(_table(["split", *fields], rows))

    leak = st.get("leakage")
    if isinstance(leak, Mapping):
        total = sum(v for v in leak.values() if isinstance(v, (int, float)) and not isinstance(v, bool))
        verdict = _badge("no leakage", "good") if total == 0 else _badge(f"{total} shared between splits", "bad")
        out.append(f"<h3>Leakage check {verdict}</h3>")
        out.append(_kv_table({**leak, **({"caption_overlap": st["caption_overlap"]} if "caption_overlap" in st else {})}, "split.leakage"))
    else:
        out.append('<h3>Leakage check</h3><p class="notrun">No leakage counts in the split stats.</p>')

    dists = st.get("distributions")
    if isinstance(dists, Mapping) and dists:
        out.append("<h3>Distributions per split</h3>")
        panels, tabs = [], []
        for dim, per_split in dists.items():
            if not isinstance(per_split, Mapping) or not per_split:
                continue
            per_split = {k: per_split[k] for k in _ordered(per_split, _SPLIT_ORDER)}
            panels.append((dim, per_split))
            values = list(dict.fromkeys(v for c in per_split.values() for v in c))
            rows = [[f"<td>{_esc(str(v))}</td>", *(_cell(f"split.distributions.{dim}.{s}.{v}", per_split[s].get(v, 0)) for s in per_split)] for v in values]
            tabs.append(f"<details><summary>{_esc(dim)} counts</summary>{_table([dim, *per_split], rows)}</details>")
        if panels:
            out.append(f'<div class="charts">{_figure(plots.stacked_shares(panels), "share of rows per split")}</div>')
        out.append("".join(tabs))
    warnings = st.get("warnings") or []
    if warnings:
        out.append("<ul class='warn'>" + "".join(f"<li>{_esc(str(w))}</li>" for w in warnings) + "</ul>")
    extra = {k: v for k, v in st.items() if k not in _COMMON | {"splits", "leakage", "distributions", "warnings", "caption_overlap"}}
    if extra:
        out.append(f"<details><summary>split stats</summary>{_kv_table(extra, 'split')}</details>")
    return _Section("split", "Split", OK, "".join(out))


_CURVES = {"loss": "training loss", "lr": "learning rate", "logit_scale": "logit scale", "val_i2t_r5": "val image→text R@5",
           "samples_per_s": "throughput (samples/s)"}


def _training(run: _Run, cfg: ReportConfig, thumbs: _Thumbs) -> _Section:
    st = run.stats("train")
    hist_path = run.file("train", "history.parquet")
    if st is None and not hist_path.is_file():
        return _Section("training", "Training", NOT_RUN, _not_run("train"))
    out = []
    if st is not None:
        head = {k: st[k] for k in ("device", "steps", "final_loss", "samples_per_s") if k in st}
        cards = "".join(f'<div class="stat"><div class="label">{_esc(k.replace("_", " "))}</div>'
                        f'<div class="value" data-key="train.{k}" data-value="{_json_attr(v)}">{_esc(_fmt(v))}</div></div>' for k, v in head.items())
        out.append(f'<div class="stats">{cards}</div>')
    if hist_path.is_file():
        h = tables.read_parquet(hist_path)
        timing = run.file("train", "timing.json")  # wall-clock throughput, kept out of the Parquet
        if timing.is_file() and "samples_per_s" not in h:
            try:
                sps = np.asarray(tables.read_json(timing)["samples_per_s"], dtype=float)
            except Exception:  # a damaged timing file costs the throughput panel, not the report
                sps = np.zeros(0)
            if sps.shape == (len(h),):
                h = h.assign(samples_per_s=sps)
        x = h["step"].to_numpy(float) if "step" in h else np.arange(len(h), dtype=float)
        panels = [(title, h[col].to_numpy(float)) for col, title in _CURVES.items() if col in h and np.isfinite(h[col].to_numpy(float)).any()]
        if panels:
            out.append(f'<div class="charts">{_figure(plots.line_panels(x, panels, "step"), f"{len(h)} logged steps")}</div>')
    else:
        out.append('<p class="notrun">No <code>train/history.parquet</code>.</p>')
    if st is not None:
        extra = {k: v for k, v in st.items() if k not in _COMMON}
        if extra:
            out.append(f"<details><summary>train stats</summary>{_kv_table(extra, 'train')}</details>")
    return _Section("training", "Training", OK, "".join(out))


def _metric_table(block: Mapping[str, Any], key: str, chance: Mapping[str, Any]) -> str:
    """CI leaves of a metrics block; i2t_/t2i_ metrics side by side."""
    leaves = {k: v for k, v in block.items() if _is_ci(v)}
    if not leaves:
        return ""
    dirs = ("i2t", "t2i")
    if all(k.split("_", 1)[0] in dirs for k in leaves):
        names = list(dict.fromkeys(k.split("_", 1)[1] for k in _metric_order(leaves)))
        rows = []
        for n in names:
            row = [f"<td>{_esc(n)}</td>"]
            for d in dirs:
                m = f"{d}_{n}"
                row.append(_cell(f"{key}.{m}", leaves[m]) if m in leaves else "<td></td>")
                row.append(_cell(None, chance.get(m), cls="chance"))
            rows.append(row)
        return _table(["metric", "image → text", "chance", "text → image", "chance"], rows, "metrics")
    rows = [[f"<td>{_esc(m)}</td>", _cell(f"{key}.{m}", leaves[m]), _cell(None, chance.get(m), cls="chance")] for m in _metric_order(leaves)]
    return _table(["metric", "value [95% CI]", "chance"], rows, "metrics")


def _split_metrics(body: Mapping[str, Any], key: str, chance: Mapping[str, Any]) -> str:
    out = []
    for group in ("retrieval", "zeroshot"):
        if isinstance(body.get(group), Mapping):
            t = _metric_table(body[group], f"{key}.{group}", chance)
            if t:
                out.append(f"<h4>{'Retrieval' if group == 'retrieval' else 'Zero-shot classification'}</h4>{t}")
    for group, block in body.items():  # any other block of CI leaves
        if group not in ("retrieval", "zeroshot", "per_domain", "robustness") and isinstance(block, Mapping):
            t = _metric_table(block, f"{key}.{group}", chance)
            if t:
                out.append(f"<h4>{_esc(group)}</h4>{t}")
    return "".join(out)


def _headline_metrics(body: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    found = {}
    for group in ("retrieval", "zeroshot"):
        for m in _HEADLINE:
            leaf = body.get(group, {}).get(m) if isinstance(body.get(group), Mapping) else None
            if _is_ci(leaf):
                found[m] = leaf
    return found


def _per_domain(pd_block: Mapping[str, Any], key: str) -> str:
    domains = {d: v for d, v in pd_block.items() if not d.startswith("_") and isinstance(v, Mapping)}
    if not domains:
        return ""
    metrics = [m for m in _HEADLINE if any(m in _headline_metrics(v) for v in domains.values())]
    rows = []
    for d, v in domains.items():
        hm = _headline_metrics(v)
        group_of = {m: ("zeroshot" if m == "acc1" else "retrieval") for m in metrics}
        cells = [_cell(f"{key}.{d}.{group_of[m]}.{m}", hm[m]) if m in hm else "<td></td>" for m in metrics]
        seen = v.get("in_training")
        rows.append([f"<td><b>{_esc(d)}</b></td>", _cell(None, v.get("n_texts")), *cells,
                     f"<td>{_badge('in train', 'good') if seen else _badge('held out', 'warn') if seen is False else ''}</td>"])
    out = [_table(["domain", "captions", *metrics, ""], rows, "metrics")]
    series = {m: [tuple(_headline_metrics(v).get(m, {}).get(x) for x in ("value", "low", "high")) for v in domains.values()] for m in metrics}
    if series:
        out.append(f'<div class="charts">{_figure(plots.grouped_bars(list(domains), series, "Per domain (95% CI)", "value"), "cross-domain metrics")}</div>')
    io_ = pd_block.get("_in_vs_out")
    if isinstance(io_, Mapping):
        rows = []
        for part in ("in_domain", "out_of_domain"):
            hm = _headline_metrics(io_.get(part, {}))
            rows.append([f"<td>{_esc(part.replace('_', ' '))}</td>", *(_cell(f"{key}._in_vs_out.{part}.{m}", hm[m]) if m in hm else "<td></td>" for m in metrics)])
        out.append(f"<h4>In-domain vs out-of-domain</h4>{_table(['', *metrics], rows, 'metrics')}")
    return "".join(out)


def _robustness(run: _Run) -> str:
    path = run.file("evaluate", "robustness.parquet")
    if not path.is_file():
        return '<p class="notrun">No <code>evaluate/robustness.parquet</code>.</p>'
    rob = tables.read_parquet(path)
    if rob.empty:
        return "<p>The robustness suite was not run (no degradations configured).</p>"
    metrics = [m for m in _ROBUST if m in set(rob["metric"])] or list(dict.fromkeys(rob["metric"]))[:2]
    clean = rob[rob["degradation"] == "clean"].set_index("metric")["value"].to_dict()
    curves: dict[str, dict[str, tuple]] = {}
    deg = rob[(rob["degradation"] != "clean") & rob["metric"].isin(metrics)]
    for (d, m), g in deg.groupby(["degradation", "metric"], sort=False):
        g = g.sort_values("severity")
        curves.setdefault(d, {})[m] = (g["severity"], g["value"], g["low"], g["high"])
    out = [f'<div class="charts">{_figure(plots.severity_curves(curves, clean), "metric vs severity per degradation (dotted: clean)")}</div>']
    rows = []
    for (d, s), g in rob[rob["metric"].isin(metrics)].groupby(["degradation", "severity"], sort=False):
        by = g.set_index("metric")
        cells = []
        for m in metrics:
            if m in by.index:
                r = by.loc[m]
                leaf = {"value": r["value"], "low": r["low"], "high": r["high"]}
                drop = r["relative_drop"]
                cells.append(_cell(f"evaluate.robustness.{d}@{s:g}.{m}", {k: None if pd.isna(v) else float(v) for k, v in leaf.items()}))
                cells.append(_cell(None, drop, "–" if pd.isna(drop) or d == "clean" else f"{100 * drop:+.0f}%", cls="chance"))
            else:
                cells += ["<td></td>", "<td></td>"]
        rows.append([f"<td>{_esc(str(d))}</td>", _cell(None, float(s)), *cells])
    head = ["degradation", "severity"] + [h for m in metrics for h in (m, "drop")]
    out.append(f"<details><summary>robustness table</summary>{_table(head, rows, 'metrics')}</details>")
    return "".join(out)


def _ablation(a: pd.DataFrame) -> str:
    """Each scheme's metric with its CI, and its paired difference from the baseline with its CI."""
    def leaf(r: Mapping[str, Any], v: str, lo: str, hi: str) -> dict[str, Any]:
        return {"value": _num(r.get(v)), "low": _num(r.get(lo)), "high": _num(r.get(hi))}

    groups = [("value", "low", "high"), ("diff", "diff_low", "diff_high")]
    shown = [g for g in groups if set(g) <= set(a.columns)]
    rest = [c for c in a.columns if c not in {"scheme", "metric"} and not any(c in g for g in shown)]
    rows = []
    for r in a.to_dict("records"):
        key = f"evaluate.ablation.{r.get('scheme', '')}.{r.get('metric', '')}"
        cells = [_cell(None, r.get("scheme")), _cell(None, r.get("metric"))]
        cells += [_cell(key if g[0] == "value" else f"{key}.{g[0]}", leaf(r, *g)) for g in shown]
        cells += [_cell(None, _num(r.get(c)) if isinstance(r.get(c), (float, np.floating)) else r.get(c)) for c in rest]
        rows.append(cells)
    head = ["scheme", "metric", *("value [95% CI]" if g[0] == "value" else "difference from baseline [95% CI]" for g in shown), *rest]
    return _table(head, rows, "metrics")


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, (float, np.floating)) and not math.isfinite(v)) else float(v) if isinstance(v, (float, np.floating, int, np.integer)) and not isinstance(v, bool) else v


def _metrics(run: _Run, cfg: ReportConfig, thumbs: _Thumbs) -> _Section:
    path = run.file("evaluate", "metrics.json")
    if not path.is_file():
        # An ablation (``mmpipe ablate``) evaluates its variants, not the run itself.
        extras = _comparisons(run)
        return _Section("metrics", "Metrics", OK if extras else NOT_RUN, _not_run("evaluate") + extras)
    m = tables.read_json(path)
    chance = m.get("chance", {}) if isinstance(m.get("chance"), Mapping) else {}
    splits = [s for s in ("test", "val", "train") if isinstance(m.get(s), Mapping)]
    splits += [s for s, v in m.items() if s not in splits and s not in ("chance", "n_queries") and isinstance(v, Mapping)]
    out = []
    for s in splits:
        body = m[s]
        nq = m.get("n_queries", {}).get(s, {}) if isinstance(m.get("n_queries"), Mapping) else {}
        counts = ", ".join(f"{_fmt(v)} {k}" for k, v in nq.items()) if isinstance(nq, Mapping) else ""
        out.append(f"<h3>{_esc(s)} split <small>{_esc(counts)} · 95% bootstrap CI</small></h3>")
        out.append(_split_metrics(body, f"evaluate.{s}", chance.get(s, {}) if isinstance(chance.get(s), Mapping) else {}))
        zs = body.get("zeroshot", {})
        if s == splits[0] and isinstance(zs, Mapping) and zs.get("confusion") and zs.get("classes"):
            out.append(f'<div class="charts">{_figure(plots.heatmap(np.asarray(zs["confusion"]), zs["classes"], f"Zero-shot confusion ({s})"), "zero-shot confusion matrix")}</div>')
    first = splits[0] if splits else None
    if first and isinstance(m[first].get("per_domain"), Mapping):
        out.append(f"<h3>Cross-domain ({_esc(first)})</h3>{_per_domain(m[first]['per_domain'], f'evaluate.{first}.per_domain')}")
    out.append(f"<h3>Robustness</h3>{_robustness(run)}")
    out.append(_comparisons(run))
    return _Section("metrics", "Metrics", OK, "".join(out))


def _comparisons(run: _Run) -> str:
    """The augmentation ablation table and other datasets' metrics, where the run has them."""
    out = []
    abl = run.file("evaluate", "ablation.parquet")
    if abl.is_file():
        out.append(f"<h3>Augmentation ablation</h3>{_ablation(tables.read_parquet(abl))}")
    ext_dir = run.file("evaluate", "external")
    for p in sorted(ext_dir.glob("*/metrics.json")) if ext_dir.is_dir() else []:
        em = tables.read_json(p)
        name = p.parent.name
        for s in [s for s in ("test", "val", "train") if isinstance(em.get(s), Mapping)]:
            out.append(f"<h3>External: {_esc(name)} ({_esc(s)})</h3>")
            out.append(_split_metrics(em[s], f"evaluate.external.{name}.{s}", em.get("chance", {}).get(s, {})))
    return "".join(out)


def _spotcheck(run: _Run, cfg: ReportConfig, thumbs: _Thumbs) -> _Section:
    path = run.file("evaluate", "spotcheck.csv")
    if not path.is_file():
        return _Section("spotcheck", "Spot check", NOT_RUN, _not_run("evaluate", what="no spot-check sheet"))
    sheet = pd.read_csv(path, dtype=str, keep_default_na=False)
    out = ['<p>Random test queries with their top 5 retrievals. Judge them in '
           '<code>evaluate/spotcheck.csv</code> (the <code>verdict</code> column), then run <code>mmpipe verdicts</code>.</p>']
    verdicts = run.file("evaluate", "verdicts.json")
    if verdicts.is_file():
        v = tables.read_json(verdicts)
        out.append(_kv_table(v, "evaluate.verdicts"))
    ids = list(dict.fromkeys(sheet["query_id"]))
    kinds = sheet.drop_duplicates("query_id").set_index("query_id")["query_kind"]
    img_q = [q for q in ids if kinds[q] == "image"]
    txt_q = [q for q in ids if kinds[q] != "image"]
    n_img = min(len(img_q), (cfg.spotcheck_queries + 1) // 2)
    chosen = img_q[:n_img] + txt_q[: cfg.spotcheck_queries - n_img]
    rows = []
    for q in chosen:
        g = sheet[sheet["query_id"] == q].assign(r=lambda d: pd.to_numeric(d["rank"], errors="coerce")).sort_values("r")
        kind = kinds[q]
        query = g["query"].iloc[0]

        def show(value: str, is_image: bool) -> str:
            return thumbs(value, value) if is_image else f'<div class="qcap">{_esc(value)}</div>'

        cells = "".join(f'<td><div class="rank">#{_esc(str(r.rank))} <small>row {_esc(str(r.row_id))}</small></div>{show(r.retrieved, kind != "image")}</td>'
                        for r in g.itertuples())
        rows.append(f'<tr><td class="query"><div class="rank">{_esc(q)} · {_esc(kind)}</div>{show(query, kind == "image")}</td>{cells}</tr>')
    head = "<tr><th>query</th>" + "".join(f"<th>top {i}</th>" for i in range(1, 6)) + "</tr>"
    out.append(f'<div class="tablewrap"><table class="gallery"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>')
    out.append(f"<p><small>{len(chosen)} of {len(ids)} queries shown; every query is in <code>evaluate/spotcheck.html</code>.</small></p>")
    return _Section("spotcheck", "Spot check", OK, "".join(out))


def _short(d: Any) -> str:
    s = str(d or "")
    return f'<code title="{_esc(s, quote=True)}">{_esc(s.removeprefix("sha256:")[:12])}</code>' if s else ""


def _artifacts(run: _Run) -> list[list[str]]:
    rows = []
    for stage in STAGES:
        if stage == STAGE:
            continue  # the report's own files are being written
        d = StagePaths.of(run.dir, stage).dir
        if not d.is_dir():
            continue
        for p in sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith(".")):
            size = p.stat().st_size
            digest = tables.file_digest(p) if size <= _HASH_LIMIT else ""
            rows.append([f"<td><code>{_esc(str(p.relative_to(run.dir)))}</code></td>", _cell(None, size, f"{size / 1024:,.1f} KiB"),
                         f"<td>{_short(digest) if digest else 'not hashed (large)'}</td>"])
    return rows


def _provenance(run: _Run, cfg: ReportConfig, thumbs: _Thumbs) -> _Section:
    from mmcore.provenance import versions

    out = []
    ran = [s for s in STAGES if run.stats(s) is not None]
    rows = []
    for s in ran:
        st, status = run.stats(s), run.status(s)
        cached = status.get("cached")
        rows.append([f"<td><b>{_esc(s)}</b></td>", _cell(f"{s}.cached", cached, _badge("cache hit", "info") if cached else "–"),
                     _cell(None, st.get("seconds")), _cell(None, status.get("finished", "")),
                     *(f"<td>{_short(st.get(k))}</td>" for k in ("input_digest", "config_digest", "code_digest", "kept_digest", "quarantine_digest"))])
    hits = sum(bool(run.status(s).get("cached")) for s in ran)
    total = sum(float(run.stats(s).get("seconds") or 0) for s in ran)
    out.append(f'<div class="stats"><div class="stat"><div class="label">cache hits</div><div class="value" data-key="run.cache_hits" data-value="{hits}">{hits} of {len(ran)}</div></div>'
               f'<div class="stat"><div class="label">stage seconds</div><div class="value" data-key="run.seconds" data-value="{_json_attr(round(total, 3))}">{total:,.1f}</div></div></div>')
    if rows:
        out.append("<h3>Stages</h3>" + _table(["stage", "cache", "seconds", "finished", "input", "config", "code", "kept", "quarantine"], rows, "prov"))
    arts = _artifacts(run)
    if arts:
        out.append(f"<details><summary>Artifacts ({len(arts)} files, sha256)</summary>{_table(['file', 'size', 'sha256'], arts)}</details>")
    out.append("<h3>Versions</h3><p><small>of the environment that built this report</small></p>")
    out.append(_table(["package", "version"], [[k, v] for k, v in versions().items()]))
    out.append("<h3>Resolved config</h3>")
    if run.config_error:
        out.append(f'<p class="warn">config.yaml does not validate: {_esc(run.config_error)}</p>')
    out.append(f"<pre>{_esc(run.config_text)}</pre>" if run.config_text else '<p class="notrun">No <code>config.yaml</code> in the run folder.</p>')
    return _Section("provenance", "Provenance", OK if (ran or run.config_text) else NOT_RUN, "".join(out))


_BUILDERS: dict[str, Callable[[_Run, ReportConfig, _Thumbs], _Section]] = {
    "funnel": _funnel, "scores": _scores, "split": _split, "training": _training,
    "metrics": _metrics, "spotcheck": _spotcheck, "provenance": _provenance,
}
_TITLES = {"funnel": "Funnel", "scores": "Scores", "split": "Split", "training": "Training", "metrics": "Metrics",
           "spotcheck": "Spot check", "provenance": "Provenance"}


# --------------------------------------------------------------------------- page

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


def _headline(run: _Run) -> str:
    cards = []
    first = next((s for s in STAGES if run.stats(s) is not None), None)
    last = next((s for s in reversed(STAGES) if s != STAGE and run.stats(s) is not None), None)
    if first:
        cards.append(("rows in", f"{run.stats(first)['n_rows']:,}"))
    if last:
        cards.append((f"kept after {last}", f"{run.stats(last)['n_kept']:,}"))
    mpath = run.file("evaluate", "metrics.json")
    if mpath.is_file():
        test = tables.read_json(mpath).get("test", {})
        for m, leaf in _headline_metrics(test if isinstance(test, Mapping) else {}).items():
            if m in ("i2t_r5", "t2i_r5", "acc1") and leaf.get("value") is not None:
                cards.append((f"test {m}", f"{leaf['value']:.3f}"))
    tr = run.stats("train")
    if tr and "device" in tr:
        cards.append(("device", str(tr["device"])))
    return "".join(f'<div class="stat"><div class="label">{_esc(k)}</div><div class="value">{_esc(v)}</div></div>' for k, v in cards)


def render(run_dir: str | os.PathLike, cfg: ReportConfig | None = None, image_root: str | os.PathLike | None = None) -> tuple[str, dict[str, str]]:
    """The report page and each section's status (``ok``, ``not-run``, or ``error`` with why)."""
    run = _open_run(Path(run_dir), Path(image_root) if image_root is not None else None)
    if cfg is None:
        cfg = run.config.report if run.config is not None else ReportConfig()
    thumbs = _Thumbs(run.image_root, cfg.thumbnail_side, cfg.max_thumbnail_pixels)
    sections, statuses = [], {}
    for sid in SECTIONS:
        try:
            sec = _BUILDERS[sid](run, cfg, thumbs)
        except Exception as e:  # one unexpected artifact must not cost the whole report
            sec = _Section(sid, _TITLES[sid], ERROR, f'<p class="warn">Could not render this section: {_esc(type(e).__name__)}: {_esc(str(e))}</p>')
        sections.append(sec)
        statuses[sid] = sec.status if sec.status != ERROR else f"error: {sec.body}"
    name = run.config.run_name if run.config is not None else run.dir.name
    nav = "".join(f'<a href="#{s.id}">{_esc(s.title)}<span class="dot {s.status}"></span></a>' for s in sections)
    body = "".join(
        f'<section id="{s.id}" data-status="{s.status}"><h2>{_esc(s.title)}'
        f'{_badge("not run", "muted") if s.status == NOT_RUN else _badge("error", "bad") if s.status == ERROR else ""}</h2>{s.body}</section>'
        for s in sections
    )
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>mmpipe report: {_esc(name)}</title><style>{_CSS}</style></head><body>"
        f'<nav><span class="brand">mmpipe · {_esc(name)}</span>{nav}</nav>'
        f'<header><h1>Run report: {_esc(name)}</h1><div class="sub"><code>{_esc(str(run.dir.resolve()))}</code> · built from the run\'s artifacts; '
        f"rebuild with <code>mmpipe report RUN_DIR</code></div></header>"
        f'<div class="headline stats">{_headline(run)}</div><main>{body}</main><script>{_SCRIPT}</script></body></html>\n'
    )
    return page, {k: (v if not v.startswith("error") else "error") for k, v in statuses.items()}


def build(run_dir: str | os.PathLike, cfg: ReportConfig | None = None, image_root: str | os.PathLike | None = None) -> Path:
    """Write ``RUN_DIR/report/report.html`` from the run's artifacts; safe to call any time.

    Args:
        cfg: default: the ``report`` section of the run's config.yaml (else the defaults).
        image_root: where row image paths are relative to; default: the run config's data root.
    """
    if not Path(run_dir).is_dir():
        raise InputError(f"report: run folder not found: {run_dir}")
    page, _ = render(run_dir, cfg, image_root)
    path = StagePaths.of(run_dir, STAGE).dir / REPORT_FILE
    tables.write_bytes(page.encode(), path)
    return path


def run(table: pd.DataFrame, cfg: ReportConfig, ctx: StageContext) -> StageResult:
    """Build the report; every row passes through (the report quarantines nothing)."""
    page, statuses = render(ctx.run_dir, cfg, ctx.data.image_root)
    path = ctx.stage_dir(STAGE) / REPORT_FILE
    tables.write_bytes(page.encode(), path)
    return StageResult(table, tables.empty_quarantine(table), {"report_path": str(path), "report_bytes": len(page.encode()), "sections": statuses})


# --------------------------------------------------------------------------- Prefect summary


def summary_markdown(run_dir: str | os.PathLike) -> str:
    """A markdown summary of the run (funnel and headline test metrics), for a Prefect artifact."""
    run_dir = Path(run_dir)
    lines = [f"### mmpipe run `{run_dir.name}`", "", "| stage | rows in | kept | quarantined | top reasons | seconds | cache |", "|---|---:|---:|---:|---|---:|---|"]
    for s in STAGES:
        p = StagePaths.of(run_dir, s)
        if not p.stats.is_file():
            lines.append(f"| {s} | | | | *not run* | | |")
            continue
        st = tables.read_json(p.stats)
        status = tables.read_json(p.dir / "status.json") if (p.dir / "status.json").is_file() else {}
        top = ", ".join(f"`{r}` {n}" for r, n in sorted(st.get("reasons", {}).items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"| {s} | {st.get('n_rows', 0):,} | {st.get('n_kept', 0):,} | {st.get('n_quarantined', 0):,} | {top} | "
                     f"{st.get('seconds', 0)} | {'hit' if status.get('cached') else ''} |")
    mpath = StagePaths.of(run_dir, "evaluate").dir / "metrics.json"
    if mpath.is_file():
        m = tables.read_json(mpath)
        for split in ("test", "val"):
            hm = _headline_metrics(m.get(split, {})) if isinstance(m.get(split), Mapping) else {}
            if hm:
                chance = m.get("chance", {}).get(split, {})
                lines += ["", f"**Headline metrics ({split}, 95% CI)**", "", "| metric | value [95% CI] | chance |", "|---|---|---|"]
                lines += [f"| {k} | {_ci_text(v)} | {_fmt(chance.get(k), 3)} |" for k, v in hm.items()]
                break
    else:
        lines += ["", "*No metrics: evaluate has not run.*"]
    tr = StagePaths.of(run_dir, "train").stats
    if tr.is_file():
        t = tables.read_json(tr)
        lines += ["", f"Trained {t.get('steps', '?')} steps on `{t.get('device', '?')}`, final loss {_fmt(t.get('final_loss'))}, "
                      f"{_fmt(t.get('samples_per_s'))} samples/s."]
    report = StagePaths.of(run_dir, STAGE).dir / REPORT_FILE
    if report.is_file():
        lines += ["", f"Report: `{report.resolve()}`"]
    return "\n".join(lines) + "\n"
