"""The report's sections, one function each: ``(run, cfg, thumbs) -> Section``.

Each reads the artifacts of its stages only; a stage that has not run (a run stopped with
``--until``) gives ``not-run``, never an error. ``SECTIONS`` lists them in page order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from mmcore import graph, images, tables
from mmcore.base import StrictModel
from mmcore.metrics import NOT_SPLITS
from mmcore.provenance import versions
from mmcore.report import plots
from mmcore.report.ablation import headline_plot
from mmcore.report.markup import (
    Thumbs,
    badge,
    caption,
    cell,
    charts,
    details,
    esc,
    figure,
    fmt,
    is_ci,
    json_attr,
    kv_table,
    missing,
    not_run,
    num,
    ordered,
    short,
    stat_card,
    table,
)
from mmcore.report.stats import (
    STAGE,
    UPSTREAM,
    DecontamStats,
    PseudoStats,
    QualityStats,
    Run,
    SplitShare,
    SplitStats,
    TrainStats,
)
from mmcore.spotcheck import cell_text
from mmcore.tables import (
    DETAIL,
    IMAGE,
    PSEUDO_LABEL,
    PSEUDO_MARGIN,
    PSEUDO_ORIGINAL,
    PSEUDO_SIMILARITY,
    REASON,
    ROW_ID,
    TEXT,
    TEXT_RAW,
)

OK, NOT_RUN, ERROR = "ok", "not-run", "error"
_HEADLINE = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "acc1")
_ROBUST = ("i2t_r5", "t2i_r5", "acc1")  # few curves per panel, so the CI bands stay readable
_SPLIT_ORDER = ("train", "val", "test")
_SHARE_FIELDS = tuple(SplitShare.model_fields)
_TRAIN_HEAD = ("device", "steps", "final_loss", "samples_per_s")
_CURVES = {"loss": "training loss", "lr": "learning rate", "logit_scale": "logit scale", "val_i2t_r5": "val image→text R@5",
           "samples_per_s": "throughput (samples/s)"}
_HASH_LIMIT = 256 << 20  # artifacts above this are listed by size only: hashing GBs of embeddings is slow


class ReportConfig(StrictModel):
    """What the report shows; it never changes another stage's output."""

    thumbnails_per_reason: int = Field(4, ge=0, le=50, description="Quarantined images shown per reason.")
    max_points: int = Field(5000, ge=100, description="Points in a scatter plot (a seeded sample beyond that).")
    thumbnail_side: int = Field(96, ge=16, le=512, description="Longest side of a thumbnail, in pixels.")
    spotcheck_queries: int = Field(10, ge=0, description="Spot-check queries shown with their top 5.")
    max_thumbnail_pixels: int = Field(50_000_000, ge=1, description="Larger images get a note instead of a thumbnail.")
    clusters_per_kind: int = Field(3, ge=0, le=20, description="Largest duplicate clusters shown per kind (exact, pHash, mirrored, semantic).")
    images_per_cluster: int = Field(6, ge=1, le=24, description="Images shown per duplicate cluster.")


@dataclass(frozen=True)
class Section:
    status: str  # OK, NOT_RUN or ERROR
    body: str


# --------------------------------------------------------------------------- funnel


def _reason_meaning(stage: str, reason: str) -> str:
    try:
        return importlib.import_module(graph.stage(stage).module).REASONS.get(reason, "")
    except Exception:  # a stage module that does not import should not break its report
        return ""


# Rows whose image these stages found undecodable: a note with the reason, never a decode.
_UNDECODED = ("probe",)


def _thumb(thumbs: Thumbs, stage: str, row: Mapping[str, Any]) -> str:
    """A thumbnail only for a row whose image was decodable; else the stage's reason as the note."""
    reason = str(row.get(REASON, ""))
    if stage in _UNDECODED or reason in images.REASONS:
        return thumbs.refused(row.get(IMAGE), reason)
    return thumbs(row.get(IMAGE), caption(row))


def funnel(run: Run, cfg: ReportConfig, thumbs: Thumbs) -> Section:
    ran = run.ran(UPSTREAM)
    if not ran:
        return Section(NOT_RUN, not_run(*UPSTREAM))
    rows = []
    for s in UPSTREAM:
        st = run.stats(s)
        if st is None:
            rows.append([f"<td>{esc(s)}</td>", f"<td>{badge('not run', 'muted')}</td>", *["<td></td>"] * 5])
            continue
        state = badge("cached", "info") if run.status(s).cached else badge("ran", "good")
        share = st.n_kept / st.n_rows if st.n_rows else None
        rows.append([
            f"<td><b>{esc(s)}</b></td>", f"<td>{state}</td>", cell(f"{s}.n_rows", st.n_rows),
            cell(f"{s}.n_kept", st.n_kept), cell(f"{s}.n_quarantined", st.n_quarantined),
            cell(None, share, "–" if share is None else f"{100 * share:.1f}%"), cell(f"{s}.seconds", st.seconds),
        ])
    out = [table(["stage", "status", "rows in", "kept", "quarantined", "kept %", "seconds"], rows, "funnel")]
    flow = {"input": run.stats(ran[0]).n_rows, **{s: run.stats(s).n_kept for s in ran}}
    figs = [figure(plots.barh(flow, "Rows kept after each stage", "rows"), "rows kept after each stage")]

    reasons = {(s, r): n for s in ran for r, n in sorted(run.stats(s).reasons.items(), key=lambda kv: -kv[1])}
    if reasons:
        colors = [plots.PALETTE[UPSTREAM.index(s) % len(plots.PALETTE)] for s, _ in reasons]
        figs.append(figure(plots.barh({f"{s} · {r}": n for (s, r), n in reasons.items()}, "Quarantined rows per reason", "rows", colors),
                           "quarantine reasons per stage"))
    out.append(charts(*figs))
    if not reasons:
        out.append("<p>No row was quarantined.</p>")
        return Section(OK, "".join(out))

    out.append("<h3>Quarantine by reason</h3>")
    for s in ran:
        st = run.stats(s)
        if not st.reasons:
            continue
        q = run.table(s, quarantine=True, columns=[ROW_ID, IMAGE, TEXT, TEXT_RAW, REASON, DETAIL]) if cfg.thumbnails_per_reason else None
        out.append(f'<h4>{esc(s)}</h4><div class="reasons">')
        for r, n in sorted(st.reasons.items(), key=lambda kv: -kv[1]):
            cards = ""
            if q is not None and REASON in q.columns:
                for row in q[q[REASON] == r].head(cfg.thumbnails_per_reason).to_dict("records"):
                    cap = caption(row)
                    cards += (
                        f'<figure class="card">{_thumb(thumbs, s, row)}<figcaption>'
                        f'<span class="rowid">row {esc(str(row.get(ROW_ID, "?")))}</span> {esc(cap)}'
                        f'<span class="detail">{esc(str(row.get(DETAIL, "") or ""))}</span></figcaption></figure>'
                    )
            out.append(
                f'<div class="reason"><div class="rhead"><code>{esc(r)}</code> '
                f'<span class="count" data-key="{esc(s)}.reasons.{esc(r)}" data-value="{n}">{n:,}</span> '
                f'<div class="meaning">{esc(_reason_meaning(s, r))}</div></div><div class="cards">{cards}</div></div>'
            )
        out.append("</div>")
    return Section(OK, "".join(out))


# --------------------------------------------------------------------------- scores (probe, quality)


def _sample(df: pd.DataFrame, n: int) -> pd.DataFrame:
    return df if len(df) <= n else df.iloc[np.sort(np.random.default_rng(0).choice(len(df), n, replace=False))]


def _quality_scores(run: Run) -> str:
    qstats = run.stats("quality", QualityStats)
    out = []
    parts = [t for t in (run.table("quality", suffix="_score"), run.table("quality", True, suffix="_score")) if t is not None and len(t.columns)]
    scores = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    panels, rows = [], []
    for col in scores.columns:
        check = col.removesuffix("_score")
        thr = qstats.thresholds.get(check)  # quality records the threshold of every check it ran
        v = scores[col].to_numpy(dtype=float)
        panels.append((check, v, thr))
        rows.append([f"<td><code>{esc(check)}</code></td>", cell(None, thr),
                     *([cell(f"quality.flagged.{check}", qstats.flagged.get(check))] if qstats.flagged is not None else []),
                     cell(f"quality.reasons.{check}", qstats.reasons.get(check, 0)),
                     cell(None, float(np.nanmean(v)) if np.isfinite(v).any() else None)])
    if panels:
        flagged_col = ["flagged"] if qstats.flagged is not None else []
        out.append(table(["check", "threshold", *flagged_col, "quarantined (first failed check)", "mean score"], rows))
        hist = plots.histograms(panels, "score (lower = worse)")
        out.append(charts(figure(hist, "quality scores of every row the quality stage saw; dashed: threshold")))
    else:
        out.append("<p>The quality stage wrote no <code>*_score</code> columns.</p>")
    if qstats.figures():
        out.append(details("quality stats", kv_table(qstats.figures(), "quality")))
    return "".join(out)


def _probe_sizes(run: Run, cfg: ReportConfig) -> str:
    out = []
    probe = run.table("probe", columns=["width", "height", "res_bucket", "aspect_bucket", "format", ROW_ID])
    figs = []
    if probe is not None and {"width", "height"} <= set(probe.columns) and len(probe):
        pts = _sample(probe.dropna(subset=["width", "height"]), cfg.max_points)
        groups = None
        qkept = run.table("quality", columns=[ROW_ID])
        if qkept is not None:
            groups = np.where(pts[ROW_ID].isin(qkept[ROW_ID]), "kept by quality", "quarantined by quality")
        figs.append(figure(plots.scatter(pts["width"], pts["height"], "Resolution", "width (px)", "height (px)", log=True, groups=groups),
                           f"width vs height ({len(pts):,} of {len(probe):,} images)"))
        aspect = pts["width"].to_numpy(float) / np.maximum(pts["height"].to_numpy(float), 1)
        mp = pts["width"].to_numpy(float) * pts["height"].to_numpy(float) / 1e6
        figs.append(figure(plots.scatter(aspect, mp, "Aspect ratio vs megapixels", "width / height", "megapixels", log=True, groups=groups),
                           "aspect ratio vs size"))
    out.append(charts(*figs))
    tabs = []
    for col in ("res_bucket", "aspect_bucket", "format"):
        if probe is not None and col in probe.columns:
            counts = probe[col].astype(str).value_counts().sort_index()
            tabs.append(table([col, "images"], [[k, cell(f"probe.{col}.{k}", int(n))] for k, n in counts.items()]))
    if tabs:
        out.append(charts(*tabs))
    figures = run.stats("probe").figures()
    if figures:
        out.append(details("probe stats", kv_table(figures, "probe")))
    return "".join(out)


def scores(run: Run, cfg: ReportConfig, thumbs: Thumbs) -> Section:
    if run.stats("quality") is None and run.stats("probe") is None:
        return Section(NOT_RUN, not_run("probe", "quality"))
    quality = not_run("quality", what="no quality scores") if run.stats("quality") is None else _quality_scores(run)
    probe = not_run("probe", what="no image sizes") if run.stats("probe") is None else _probe_sizes(run, cfg)
    return Section(OK, quality + probe)


# --------------------------------------------------------------------------- split


def _counted_splits(run: Run) -> dict[str, SplitShare]:
    """Rows (and groups) per split counted from the kept table, for stats that lack them."""
    kept = run.table("split", columns=["split", "split_group"])
    if kept is None or "split" not in kept.columns:
        return {}
    return {str(s): SplitShare(rows=len(g), groups=int(g["split_group"].nunique()) if "split_group" in g else None)
            for s, g in kept.groupby("split", sort=True)}


def split(run: Run, cfg: ReportConfig, thumbs: Thumbs) -> Section:
    st = run.stats("split", SplitStats)
    if st is None:
        return Section(NOT_RUN, not_run("split"))
    out = []
    splits = st.splits or _counted_splits(run)
    if splits:
        fields = [f for f in _SHARE_FIELDS if any(getattr(v, f) is not None for v in splits.values())]
        rows = [[f"<td><b>{esc(s)}</b></td>", *(cell(f"split.splits.{s}.{f}", getattr(splits[s], f)) for f in fields)]
                for s in ordered(splits, _SPLIT_ORDER)]
        out.append(table(["split", *fields], rows))

    if st.leakage is not None:
        total = sum(st.leakage.values())
        verdict = badge("no leakage", "good") if total == 0 else badge(f"{total} shared between splits", "bad")
        out.append(f"<h3>Leakage check {verdict}</h3>")
        overlap = {"caption_overlap": st.caption_overlap} if st.caption_overlap is not None else {}
        out.append(kv_table({**st.leakage, **overlap}, "split.leakage"))
    else:
        out.append('<h3>Leakage check</h3><p class="notrun">No leakage counts in the split stats.</p>')

    if st.distributions:
        out.append("<h3>Distributions per split</h3>")
        panels, tabs = [], []
        for dim, per_split in st.distributions.items():
            if not per_split:
                continue
            per_split = {k: per_split[k] for k in ordered(per_split, _SPLIT_ORDER)}
            panels.append((dim, per_split))
            values = list(dict.fromkeys(v for c in per_split.values() for v in c))
            rows = [[f"<td>{esc(str(v))}</td>", *(cell(f"split.distributions.{dim}.{s}.{v}", per_split[s].get(v, 0)) for s in per_split)] for v in values]
            tabs.append(details(f"{esc(dim)} counts", table([dim, *per_split], rows)))
        if panels:
            out.append(charts(figure(plots.stacked_shares(panels), "share of rows per split")))
        out.append("".join(tabs))
    if st.warnings:
        out.append("<ul class='warn'>" + "".join(f"<li>{esc(w)}</li>" for w in st.warnings) + "</ul>")
    figures = st.figures(skip=("splits", "leakage", "distributions", "warnings", "caption_overlap"))
    if figures:
        out.append(details("split stats", kv_table(figures, "split")))
    return Section(OK, "".join(out))


# --------------------------------------------------------------------------- decontam

# Duplicate kinds in the gallery: the column whose shared value makes a cluster, and what it means.
_DUP_KINDS = {
    "exact": ("content_digest", "the same bytes under different names"),
    "pHash": ("dup_cluster", "pHash within quality.phash_radius"),
    "mirrored": ("mirror_cluster", "one image's mirror within decontam.mirror_radius of another's pHash"),
    "semantic": ("semantic_cluster", "embedding cosine >= decontam.semantic_cosine"),
}


def _card(thumbs: Thumbs, row: Mapping[str, Any], note: str = "") -> str:
    return (f'<figure class="card">{thumbs(row.get(IMAGE), caption(row))}<figcaption>'
            f'<span class="rowid">row {esc(str(row.get(ROW_ID, "?")))}</span> {esc(caption(row))}'
            f'<span class="detail">{esc(note)}</span></figcaption></figure>')


def _clusters(kept: pd.DataFrame, col: str, n: int) -> list[pd.DataFrame]:
    """The ``n`` largest clusters of ``col`` by distinct images (one row per image), largest first."""
    if col not in kept.columns or not n:
        return []
    df = kept[kept[col].notna()]
    if pd.api.types.is_numeric_dtype(df[col]):
        df = df[df[col] >= 0]
    else:
        df = df[df[col].astype("str") != ""]
    one = df.sort_values(ROW_ID, kind="stable").drop_duplicates(IMAGE)
    sizes = one.groupby(col, sort=False).size()
    sizes = sizes[sizes > 1]
    # Largest first; ties by the cluster's first row, so the page is the same every time.
    first = one.groupby(col, sort=False)[ROW_ID].min().reindex(sizes.index)
    order = sorted(sizes.index, key=lambda c: (-int(sizes[c]), int(first[c])))[:n]
    return [one[one[col] == c] for c in order]


def decontam(run: Run, cfg: ReportConfig, thumbs: Thumbs) -> Section:
    st = run.stats("decontam", DecontamStats)
    if st is None:
        return Section(NOT_RUN, not_run("decontam"))
    out = ["<h3>Contamination per reference set</h3>"]
    if st.reference_sets:
        kinds = list(dict.fromkeys(k for r in st.reference_sets.values() for k in r.by_kind))
        rows = []
        for name, r in st.reference_sets.items():
            key = f"decontam.reference_sets.{name}"
            rows.append([f"<td><b>{esc(name)}</b></td>", cell(f"{key}.n_rows", r.n_rows), cell(f"{key}.n_images", r.n_images),
                         cell(f"{key}.contaminated_rows", r.contaminated_rows), cell(f"{key}.matched_reference_rows", r.matched_reference_rows),
                         *(cell(f"{key}.by_kind.{k}", r.by_kind.get(k, 0)) for k in kinds),
                         f"<td>{badge('cached', 'info') if r.cached else badge('hashed', 'good')}</td>"])
        out.append(table(["reference set", "rows", "images", "pool rows contaminated", "reference rows found", *kinds, "hashes"], rows))
        q = run.table("decontam", quarantine=True) if cfg.thumbnails_per_reason else None
        if q is not None and len(q) and "match_set" in q.columns:
            for name in st.reference_sets:
                hits = q[q["match_set"] == name].head(cfg.thumbnails_per_reason * 3)
                if len(hits):
                    cards = "".join(_card(thumbs, row, str(row.get(DETAIL, ""))) for row in hits.to_dict("records"))
                    out.append(f'<h4>{esc(name)}: contaminated pool rows</h4><div class="cards">{cards}</div>')
    else:
        out.append('<p class="notrun">No reference set configured (decontam.reference_sets).</p>')

    out.append("<h3>Largest duplicate clusters</h3>")
    semantic = st.semantic if isinstance(st.semantic, str) else ""
    kept = run.table("decontam", columns=[ROW_ID, IMAGE, TEXT, TEXT_RAW, *(c for c, _ in _DUP_KINDS.values())])
    for kind, (col, meaning) in _DUP_KINDS.items():
        if kind == "semantic" and semantic:
            out.append(f"<h4>{esc(kind)}</h4><p class='notrun'>{esc(semantic)}</p>")
            continue
        clusters = _clusters(kept, col, cfg.clusters_per_kind) if kept is not None else []
        body = "".join(
            f'<div class="reason"><div class="rhead">{len(c):,} images</div><div class="cards">'
            + "".join(_card(thumbs, row) for row in c.head(cfg.images_per_cluster).to_dict("records")) + "</div></div>"
            for c in clusters)
        out.append(f"<h4>{esc(kind)} <span class='meaning'>({esc(meaning)})</span></h4>"
                   + (f'<div class="reasons">{body}</div>' if body else "<p>No cluster of two or more images.</p>"))
    figures = {k: v for k, v in (("mirror", st.mirror), ("semantic", st.semantic)) if v}
    if figures:
        out.append(details("decontam stats", kv_table(figures, "decontam")))
    return Section(OK, "".join(out))


# --------------------------------------------------------------------------- training


def _throughput(run: Run, n: int) -> np.ndarray | None:
    """Samples/s per logged step from the timing file (wall clock, kept out of the history Parquet)."""
    if not run.layout.timing.is_file():
        return None
    try:
        sps = np.asarray(tables.read_json(run.layout.timing)["samples_per_s"], dtype=float)
    except Exception:  # a damaged timing file costs the throughput panel, not the report
        return None
    return sps if sps.shape == (n,) else None


def training(run: Run, cfg: ReportConfig, thumbs: Thumbs) -> Section:
    st = run.stats("train", TrainStats)
    hist_path = run.layout.history
    if st is None and not hist_path.is_file():
        return Section(NOT_RUN, not_run("train"))
    out = []
    if st is not None:
        head = {k: getattr(st, k) for k in _TRAIN_HEAD if getattr(st, k) is not None}
        out.append(f'<div class="stats">{"".join(stat_card(k.replace("_", " "), fmt(v), f"train.{k}", v) for k, v in head.items())}</div>')
    if hist_path.is_file():
        h = tables.read_parquet(hist_path)
        sps = _throughput(run, len(h)) if "samples_per_s" not in h else None
        if sps is not None:
            h = h.assign(samples_per_s=sps)
        x = h["step"].to_numpy(float) if "step" in h else np.arange(len(h), dtype=float)
        panels = [(title, h[col].to_numpy(float)) for col, title in _CURVES.items() if col in h and np.isfinite(h[col].to_numpy(float)).any()]
        if panels:
            out.append(charts(figure(plots.line_panels(x, panels, "step"), f"{len(h)} logged steps")))
    else:
        out.append(missing(run.rel(hist_path)))
    if st is not None and st.figures():
        out.append(details("train stats", kv_table(st.figures(), "train")))
    return Section(OK, "".join(out))


# --------------------------------------------------------------------------- pseudo-labels

# The pseudo stage's columns (named in mmcore.tables, not mmcore.pseudo: the report's code digest stays its own).
_PSEUDO_COLUMNS = (PSEUDO_LABEL, PSEUDO_MARGIN, PSEUDO_SIMILARITY, PSEUDO_ORIGINAL)


def pseudo(run: Run, cfg: ReportConfig, thumbs: Thumbs) -> Section:
    """Counts, the margin histogram and a gallery of pseudo-pairs (the original caption beside the teacher's)."""
    st = run.stats("pseudo", PseudoStats)
    if st is None:
        return Section(NOT_RUN, not_run("pseudo"))
    if not st.enabled:
        dropped = st.reasons.get("no_caption", 0)
        return Section(OK, f"<p>Off (<code>pseudo.enabled: false</code>): rows passed through; {dropped:,} rows "
                           "without a usable caption quarantined as <code>no_caption</code>.</p>")
    cards = {"candidates": st.n_candidates, "pseudo-pairs": st.n_pseudo, "from empty captions": st.n_pseudo_uncaptioned,
             "relabelled (low alignment)": st.n_pseudo_relabelled, "train rows": st.n_train, "caption bank": st.n_bank}
    out = [f'<div class="stats">{"".join(stat_card(k, f"{v:,}", None, v) for k, v in cards.items())}</div>',
           f"<p>Teacher {short(st.teacher)}; bank: {esc(st.bank)}; a pseudo-pair needs a margin "
           f"(top cosine minus the runner-up's) of at least {fmt(st.min_margin)} and weighs {fmt(st.weight)} in the "
           "loss. Pseudo-pairs are train rows only; val and test rows without a caption are quarantined.</p>"]
    h = st.margin_hist
    if h.counts:
        bins = {f"{lo:.3f}–{hi:.3f}": c for lo, hi, c in zip(h.edges[:-1], h.edges[1:], h.counts)}
        out.append(charts(figure(plots.barh(bins, "Teacher margin of every candidate", "candidates"),
                                 f"margin (top-1 minus top-2 cosine); threshold {fmt(st.min_margin)}")))
    kept = run.table("pseudo", columns=[ROW_ID, IMAGE, TEXT, *_PSEUDO_COLUMNS])
    if kept is not None and PSEUDO_LABEL in kept.columns:
        rows = kept[kept[PSEUDO_LABEL].astype(bool)].sort_values(PSEUDO_MARGIN, ascending=False)
        n = max(cfg.thumbnails_per_reason, 1) * 3
        cards_html = []
        for r in rows.head(n).to_dict("records"):
            was = r.get(PSEUDO_ORIGINAL) or "(no caption)"
            cards_html.append(_card(thumbs, r, f"was: {was} · margin {r.get(PSEUDO_MARGIN, float('nan')):.3f}"))
        if cards_html:
            out.append(f"<h3>Pseudo-pairs <small>{len(cards_html)} of {len(rows):,}, highest margins</small></h3>"
                       f'<div class="cards">{"".join(cards_html)}</div>')
    out.append(details("pseudo stats", kv_table(st.figures(), "pseudo")))
    return Section(OK, "".join(out))


# --------------------------------------------------------------------------- metrics


def _metric_order(names: list[str]) -> list[str]:
    """Recall@k by k, then NDCG, then ranks, then the rest: the order people read them in."""
    def key(n: str) -> tuple:
        base = n.split("_", 1)[1] if n.split("_", 1)[0] in ("i2t", "t2i") and "_" in n else n
        if base[:1] == "r" and base[1:].isdigit():
            return (0, int(base[1:]), n)
        return (1 if base.startswith("ndcg") else 2 if "rank" in base else 3, 0, n)

    return sorted(names, key=key)


def _mapping(v: Any) -> Mapping[str, Any]:
    """A block of ``metrics.json``, or an empty one where the file has something else (it is open-ended)."""
    return v if isinstance(v, Mapping) else {}


def _metric_table(block: Mapping[str, Any], key: str, chance: Mapping[str, Any]) -> str:
    """CI leaves of a metrics block; i2t_/t2i_ metrics side by side."""
    leaves = {k: v for k, v in block.items() if is_ci(v)}
    if not leaves:
        return ""
    dirs = ("i2t", "t2i")
    if all(k.split("_", 1)[0] in dirs for k in leaves):
        names = list(dict.fromkeys(k.split("_", 1)[1] for k in _metric_order(list(leaves))))
        rows = []
        for n in names:
            row = [f"<td>{esc(n)}</td>"]
            for d in dirs:
                m = f"{d}_{n}"
                row.append(cell(f"{key}.{m}", leaves[m]) if m in leaves else "<td></td>")
                row.append(cell(None, chance.get(m), cls="chance"))
            rows.append(row)
        return table(["metric", "image → text", "chance", "text → image", "chance"], rows, "metrics")
    rows = [[f"<td>{esc(m)}</td>", cell(f"{key}.{m}", leaves[m]), cell(None, chance.get(m), cls="chance")] for m in _metric_order(list(leaves))]
    return table(["metric", "value [95% CI]", "chance"], rows, "metrics")


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
                out.append(f"<h4>{esc(group)}</h4>{t}")
    return "".join(out)


def headline_metrics(body: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The headline metrics (R@1, R@5 both ways, top-1 accuracy) of one split's block that it has."""
    found = {}
    for group in ("retrieval", "zeroshot"):
        for m in _HEADLINE:
            leaf = _mapping(body.get(group)).get(m)
            if is_ci(leaf):
                found[m] = leaf
    return found


def _per_domain(pd_block: Mapping[str, Any], key: str) -> str:
    domains = {d: v for d, v in pd_block.items() if not d.startswith("_") and isinstance(v, Mapping)}
    if not domains:
        return ""
    metrics_ = [m for m in _HEADLINE if any(m in headline_metrics(v) for v in domains.values())]
    group_of = {m: ("zeroshot" if m == "acc1" else "retrieval") for m in metrics_}
    rows = []
    for d, v in domains.items():
        hm = headline_metrics(v)
        cells = [cell(f"{key}.{d}.{group_of[m]}.{m}", hm[m]) if m in hm else "<td></td>" for m in metrics_]
        seen = v.get("in_training")
        rows.append([f"<td><b>{esc(d)}</b></td>", cell(None, v.get("n_texts")), *cells,
                     f"<td>{badge('in train', 'good') if seen else badge('held out', 'warn') if seen is False else ''}</td>"])
    out = [table(["domain", "captions", *metrics_, ""], rows, "metrics")]
    series = {m: [tuple(headline_metrics(v).get(m, {}).get(x) for x in ("value", "low", "high")) for v in domains.values()] for m in metrics_}
    if series:
        out.append(charts(figure(plots.grouped_bars(list(domains), series, "Per domain (95% CI)", "value"), "cross-domain metrics")))
    io_ = pd_block.get("_in_vs_out")
    if isinstance(io_, Mapping):
        rows = []
        for part in ("in_domain", "out_of_domain"):
            hm = headline_metrics(_mapping(io_.get(part)))
            rows.append([f"<td>{esc(part.replace('_', ' '))}</td>", *(cell(f"{key}._in_vs_out.{part}.{m}", hm[m]) if m in hm else "<td></td>" for m in metrics_)])
        out.append(f"<h4>In-domain vs out-of-domain</h4>{table(['', *metrics_], rows, 'metrics')}")
    return "".join(out)


def _robustness(run: Run) -> str:
    path = run.layout.robustness
    if not path.is_file():
        return missing(run.rel(path))
    rob = tables.read_parquet(path)
    if rob.empty:
        return "<p>The robustness suite was not run (no degradations configured).</p>"
    metrics_ = [m for m in _ROBUST if m in set(rob["metric"])] or list(dict.fromkeys(rob["metric"]))[:2]
    clean = rob[rob["degradation"] == "clean"].set_index("metric")["value"].to_dict()
    curves: dict[str, dict[str, tuple]] = {}
    deg = rob[(rob["degradation"] != "clean") & rob["metric"].isin(metrics_)]
    for (d, m), g in deg.groupby(["degradation", "metric"], sort=False):
        g = g.sort_values("severity")
        curves.setdefault(d, {})[m] = (g["severity"], g["value"], g["low"], g["high"])
    out = [charts(figure(plots.severity_curves(curves, clean), "metric vs severity per degradation (dotted: clean)"))]
    rows = []
    for (d, s), g in rob[rob["metric"].isin(metrics_)].groupby(["degradation", "severity"], sort=False):
        by = g.set_index("metric")
        cells = []
        for m in metrics_:
            if m in by.index:
                r = by.loc[m]
                leaf = {"value": r["value"], "low": r["low"], "high": r["high"]}
                drop = r["relative_drop"]
                cells.append(cell(f"evaluate.robustness.{d}@{s:g}.{m}", {k: None if pd.isna(v) else float(v) for k, v in leaf.items()}))
                cells.append(cell(None, drop, "–" if pd.isna(drop) or d == "clean" else f"{100 * drop:+.0f}%", cls="chance"))
            else:
                cells += ["<td></td>", "<td></td>"]
        rows.append([f"<td>{esc(str(d))}</td>", cell(None, float(s)), *cells])
    head = ["degradation", "severity"] + [h for m in metrics_ for h in (m, "drop")]
    out.append(details("robustness table", table(head, rows, "metrics")))
    return "".join(out)


def _ablation(a: pd.DataFrame) -> str:
    """Each scheme's metric with its CI, and its paired difference from the baseline with its CI."""
    def leaf(r: Mapping[str, Any], v: str, lo: str, hi: str) -> dict[str, Any]:
        return {"value": num(r.get(v)), "low": num(r.get(lo)), "high": num(r.get(hi))}

    groups = [("value", "low", "high"), ("diff", "diff_low", "diff_high")]
    shown = [g for g in groups if set(g) <= set(a.columns)]
    rest = [c for c in a.columns if c not in {"scheme", "metric"} and not any(c in g for g in shown)]
    rows = []
    for r in a.to_dict("records"):
        key = f"evaluate.ablation.{r.get('scheme', '')}.{r.get('metric', '')}"
        cells = [cell(None, r.get("scheme")), cell(None, r.get("metric"))]
        cells += [cell(key if g[0] == "value" else f"{key}.{g[0]}", leaf(r, *g)) for g in shown]
        cells += [cell(None, num(r.get(c)) if isinstance(r.get(c), (float, np.floating)) else r.get(c)) for c in rest]
        rows.append(cells)
    head = ["scheme", "metric", *("value [95% CI]" if g[0] == "value" else "difference from baseline [95% CI]" for g in shown), *rest]
    return table(head, rows, "metrics")


def _baseline(m: Mapping[str, Any], key: str) -> str:
    """``metrics.json["baseline"]``: the model training started from against this one on the same rows,
    per split (and per domain): both with CIs and the paired bootstrap difference, CI and p-value."""
    block = _mapping(m.get("baseline"))
    out = []
    for s in [s for s in ("test", "val", "train") if isinstance(block.get(s), Mapping)]:
        parts = {"": block[s], **{f" · {d}": v for d, v in _mapping(block[s].get("per_domain")).items()}}
        rows = []
        for where, body in parts.items():
            for group in ("retrieval", "zeroshot"):
                leaves = _mapping(_mapping(body).get(group))
                for metric in _metric_order([k for k, v in leaves.items() if isinstance(v, Mapping) and is_ci(v.get("diff"))]):
                    c = leaves[metric]
                    k = f"{key}.{s}{where.replace(' · ', '.per_domain.')}.{group}.{metric}"
                    p = c["diff"].get("p_value")
                    rows.append([f"<td>{esc(metric + where)}</td>", cell(f"{k}.baseline", c.get("baseline")),
                                 cell(f"{k}.model", c.get("model")), cell(f"{k}.diff", c["diff"]), cell(None, p)])
        if rows:
            out.append(f"<h4>Against the starting model ({esc(s)}) <small>{esc(str(block.get('model', '')))}</small></h4>"
                       + table(["metric", "starting model", "this model", "difference [95% CI]", "p"], rows, "metrics"))
    return "".join(out)


def _comparisons(run: Run) -> str:
    """The augmentation ablation table and other datasets' metrics, where the run has them."""
    out = []
    if run.layout.ablation.is_file():
        a = tables.read_parquet(run.layout.ablation)
        uri = headline_plot(a)  # curation variants (mmpipe ablate --variants): the metric against rows kept
        chart = figure(uri, "one point per variant, the same test rows and training steps") if uri else ""
        out.append(f"<h3>Ablation</h3>{chart}{_ablation(a)}")
    for p in run.layout.external_metrics():
        em = tables.read_json(p)
        name = p.parent.name
        for s in [s for s in ("test", "val", "train") if isinstance(em.get(s), Mapping)]:
            out.append(f"<h3>External: {esc(name)} ({esc(s)})</h3>")
            out.append(_split_metrics(em[s], f"evaluate.external.{name}.{s}", _mapping(_mapping(em.get("chance")).get(s))))
        out.append(_baseline(em, f"evaluate.external.{name}.baseline"))
    return "".join(out)


def _confusion(m: np.ndarray, classes: list[str], split: str, n_pairs: int = 20) -> str:
    """The zero-shot confusion heatmap; with more classes than it draws, also the most confused pairs as a table."""
    n, cap = len(classes), plots.HEATMAP_CLASSES
    note = "" if n <= cap else f" ({cap} of {n:,} classes: those with the most rows)"
    out = charts(figure(plots.heatmap(m, classes, f"Zero-shot confusion ({split})"), "zero-shot confusion matrix" + note))
    if n > cap and m.shape == (n, n):
        off = m.copy()
        np.fill_diagonal(off, 0)
        top = np.argsort(-off, axis=None, kind="stable")[:n_pairs]
        rows = [[classes[i], classes[j], int(off[i, j])] for i, j in zip(*np.unravel_index(top, off.shape)) if off[i, j] > 0]
        if rows:
            out += f"<h4>Most confused pairs ({esc(split)})</h4>" + table(["true", "predicted", "rows"], rows)
    return out


# Blocks of metrics.json that are not splits (both in metrics.NOT_SPLITS): the fusion head's matching and
# re-ranking (test split).
_MATCHING, _RERANK = "matching", "rerank"
_MATCH_ORDER = ("accuracy", "precision", "recall", "f1", "auroc")


def _matching(m: Mapping[str, Any]) -> str:
    """The fusion head's pair classification (CI leaves, pair counts, chance levels) and its re-ranking
    of the dual encoder's top k (R@k without, with, and the paired difference)."""
    out = []
    mt = _mapping(m.get(_MATCHING))
    if mt:
        chance = _mapping(mt.get("chance"))
        names = ordered([k for k, v in mt.items() if is_ci(v)], _MATCH_ORDER)
        rows = [[f"<td>{esc(n)}</td>", cell(f"evaluate.matching.{n}", mt[n]), cell(None, chance.get(n), cls="chance")]
                for n in names]
        counts = ", ".join(f"{fmt(mt.get(k))} {k.removeprefix('n_')}" for k in ("n_pairs", "n_positive", "n_negative")
                           if mt.get(k) is not None)
        out.append(f"<h3>Image-text matching (fusion head) <small>{esc(counts)} · 95% bootstrap CI</small></h3>"
                   + table(["metric", "value [95% CI]", "chance"], rows, "metrics"))
    rr = _mapping(m.get(_RERANK))
    if rr:
        rows = []
        for d, label in (("i2t", "image → text"), ("t2i", "text → image")):
            for k, leaf in _mapping(rr.get(d)).items():
                leaf = _mapping(leaf)
                rows.append([f"<td>{esc(label)}</td>", f"<td>{esc(k)}</td>",
                             *(cell(f"evaluate.rerank.{d}.{k}.{part}", leaf.get(part)) if is_ci(leaf.get(part))
                               else "<td>–</td>" for part in ("without", "with", "difference"))])
        out.append(f"<h3>Re-ranking the top {esc(fmt(rr.get('k')))} with the fusion head</h3>"
                   + table(["direction", "metric", "dual encoder", "re-ranked", "difference [95% CI]"], rows, "metrics"))
    return "".join(out)


def metrics(run: Run, cfg: ReportConfig, thumbs: Thumbs) -> Section:
    path = run.layout.metrics
    if not path.is_file():
        # An ablation (``mmpipe ablate``) evaluates its variants, not the run itself.
        extras = _comparisons(run)
        return Section(OK if extras else NOT_RUN, not_run("evaluate") + extras)
    m = tables.read_json(path)
    chance = _mapping(m.get("chance"))
    splits = [s for s in ("test", "val", "train") if isinstance(m.get(s), Mapping)]
    splits += [s for s, v in m.items()
               if s not in splits and s not in NOT_SPLITS and isinstance(v, Mapping)]
    out = []
    for s in splits:
        body = m[s]
        nq = _mapping(_mapping(m.get("n_queries")).get(s))
        counts = ", ".join(f"{fmt(v)} {k}" for k, v in nq.items())
        out.append(f"<h3>{esc(s)} split <small>{esc(counts)} · 95% bootstrap CI</small></h3>")
        out.append(_split_metrics(body, f"evaluate.{s}", _mapping(chance.get(s))))
        zs = _mapping(body.get("zeroshot"))
        if s == splits[0] and zs.get("confusion") and zs.get("classes"):
            out.append(_confusion(np.asarray(zs["confusion"], dtype=float), [str(c) for c in zs["classes"]], s))
    out.append(_matching(m))
    out.append(_baseline(m, "evaluate.baseline"))
    first = splits[0] if splits else None
    if first and isinstance(m[first].get("per_domain"), Mapping):
        out.append(f"<h3>Cross-domain ({esc(first)})</h3>{_per_domain(m[first]['per_domain'], f'evaluate.{first}.per_domain')}")
    out.append(f"<h3>Robustness</h3>{_robustness(run)}")
    out.append(_comparisons(run))
    return Section(OK, "".join(out))


# --------------------------------------------------------------------------- spot check


def spotcheck(run: Run, cfg: ReportConfig, thumbs: Thumbs) -> Section:
    path = run.layout.spotcheck_csv
    if not path.is_file():
        return Section(NOT_RUN, not_run("evaluate", what="no spot-check sheet"))
    sheet = pd.read_csv(path, dtype=str, keep_default_na=False)
    out = [f'<p>Random test queries with their top 5 retrievals. Judge them in <code>{esc(run.rel(path))}</code> '
           '(the <code>verdict</code> column), then run <code>mmpipe verdicts</code>.</p>']
    if run.layout.verdicts.is_file():
        out.append(kv_table(tables.read_json(run.layout.verdicts), "evaluate.verdicts"))
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
            value = cell_text(value)  # the sheet escapes formula starts for spreadsheets; show the text itself
            return thumbs(value, value) if is_image else f'<div class="qcap">{esc(value)}</div>'

        cells = "".join(f'<td><div class="rank">#{esc(str(r.rank))} <small>row {esc(str(r.row_id))}</small></div>{show(r.retrieved, kind != "image")}</td>'
                        for r in g.itertuples())
        rows.append(f'<tr><td class="query"><div class="rank">{esc(q)} · {esc(kind)}</div>{show(query, kind == "image")}</td>{cells}</tr>')
    head = "<tr><th>query</th>" + "".join(f"<th>top {i}</th>" for i in range(1, 6)) + "</tr>"
    out.append(f'<div class="tablewrap"><table class="gallery"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>')
    out.append(f"<p><small>{len(chosen)} of {len(ids)} queries shown; every query is in "
               f"<code>{esc(run.rel(run.layout.spotcheck_html))}</code>.</small></p>")
    return Section(OK, "".join(out))


# --------------------------------------------------------------------------- provenance


def _artifacts(run: Run) -> list[list[str]]:
    rows = []
    for stage in graph.ORDER:
        if stage == STAGE:
            continue  # the report's own files are being written
        d = run.layout.stage_dir(stage)
        if not d.is_dir():
            continue
        for p in sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith(".")):
            size = p.stat().st_size
            digest = tables.file_digest(p) if size <= _HASH_LIMIT else ""
            rows.append([f"<td><code>{esc(run.rel(p))}</code></td>", cell(None, size, f"{size / 1024:,.1f} KiB"),
                         f"<td>{short(digest) if digest else 'not hashed (large)'}</td>"])
    return rows


def provenance(run: Run, cfg: ReportConfig, thumbs: Thumbs) -> Section:
    """Cache hits, digests and files of every stage, the environment, and the run's config as saved."""
    out = []
    ran = run.ran(graph.ORDER)
    rows = []
    for s in ran:
        st, status = run.stats(s), run.status(s)
        rows.append([f"<td><b>{esc(s)}</b></td>", cell(f"{s}.cached", status.cached, badge("cache hit", "info") if status.cached else "–"),
                     cell(None, st.seconds), cell(None, status.finished),
                     *(f"<td>{short(d)}</td>" for d in (st.input_digest, st.config_digest, st.code_digest, st.kept_digest, st.quarantine_digest))])
    hits = sum(bool(run.status(s).cached) for s in ran)
    total = sum(run.stats(s).seconds for s in ran)
    out.append(f'<div class="stats"><div class="stat"><div class="label">cache hits</div><div class="value" data-key="run.cache_hits" data-value="{hits}">{hits} of {len(ran)}</div></div>'
               f'<div class="stat"><div class="label">stage seconds</div><div class="value" data-key="run.seconds" data-value="{json_attr(round(total, 3))}">{total:,.1f}</div></div></div>')
    if rows:
        out.append("<h3>Stages</h3>" + table(["stage", "cache", "seconds", "finished", "input", "config", "code", "kept", "quarantine"], rows, "prov"))
    arts = _artifacts(run)
    if arts:
        out.append(details(f"Artifacts ({len(arts)} files, sha256)", table(["file", "size", "sha256"], arts)))
    out.append("<h3>Versions</h3><p><small>of the environment that built this report</small></p>")
    out.append(table(["package", "version"], [[k, v] for k, v in versions().items()]))
    out.append("<h3>Resolved config</h3>")
    config = run.layout.config
    name = esc(config.name)
    if run.config_error:
        out.append(f'<p class="warn">{name} does not validate: {esc(run.config_error)}</p>')
    text = config.read_text(errors="replace") if config.is_file() else ""
    out.append(f"<pre>{esc(text)}</pre>" if text else f'<p class="notrun">No <code>{name}</code> in the run folder.</p>')
    return Section(OK if (ran or text) else NOT_RUN, "".join(out))


# --------------------------------------------------------------------------- the page's headline


def headline(run: Run) -> str:
    """Rows in, rows kept at the end, the test split's headline metrics and the training device."""
    cards = []
    ran = run.ran(UPSTREAM)
    if ran:
        cards.append(("rows in", f"{run.stats(ran[0]).n_rows:,}"))
        cards.append((f"kept after {ran[-1]}", f"{run.stats(ran[-1]).n_kept:,}"))
    if run.layout.metrics.is_file():
        test = _mapping(tables.read_json(run.layout.metrics).get("test"))
        for m, leaf in headline_metrics(test).items():
            if m in ("i2t_r5", "t2i_r5", "acc1") and leaf.get("value") is not None:
                cards.append((f"test {m}", f"{leaf['value']:.3f}"))
    tr = run.stats("train", TrainStats)
    if tr is not None and tr.device is not None:
        cards.append(("device", tr.device))
    return "".join(stat_card(k, v) for k, v in cards)


Builder = Callable[[Run, ReportConfig, Thumbs], Section]
# The page's sections in order: id -> (title, builder).
SECTIONS: dict[str, tuple[str, Builder]] = {
    "funnel": ("Funnel", funnel),
    "scores": ("Scores", scores),
    "decontam": ("Decontamination", decontam),
    "split": ("Split", split),
    "pseudo": ("Pseudo-labels", pseudo),
    "training": ("Training", training),
    "metrics": ("Metrics", metrics),
    "spotcheck": ("Spot check", spotcheck),
    "provenance": ("Provenance", provenance),
}
