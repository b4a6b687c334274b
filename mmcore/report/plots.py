"""Small matplotlib charts for the report, rendered with Agg to PNG data URIs (no pyplot, no display).

Each helper takes plain arrays or dicts and returns a ``data:image/png;base64,...`` string, so the
report embeds every chart and opens with no network. Margins are set by hand instead of
``tight_layout`` (which draws every figure twice), and related charts share one figure as panels:
a report has a dozen figures, not dozens. PNGs carry no metadata: same data, same bytes.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# One palette for every chart (colour-blind safe, Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
_RC = {"axes.spines.top": False, "axes.spines.right": False, "font.size": 8, "axes.titlesize": 9, "axes.titlelocation": "left",
       "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7, "legend.frameon": False,
       "axes.grid": True, "grid.alpha": 0.25, "grid.linewidth": 0.6, "axes.axisbelow": True,
       # Labels, titles and legends come from data (class names, captions, variants): "$x$" is text,
       # never mathtext (a stray "$" made the whole chart, and its section, fail to render).
       "text.parse_math": False}
HEATMAP_CLASSES = 50  # a confusion matrix shows at most this many classes (by support): its figure grows with classes²
_CHAR_IN = 0.055  # width of one tick-label character at 7 pt, in inches


def _styled(fn: Callable[..., str]) -> Callable[..., str]:
    """Run a chart helper under the report's rc settings (titles, legends and ticks read them when made)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, left: float = 0.55, bottom: float = 0.45,
            top: float = 0.3, right: float = 0.15, wspace: float = 0.55, hspace: float = 0.75) -> tuple[Figure, np.ndarray]:
    """A figure whose margins are given in inches, so small and large figures look alike."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wspace, hspace=hspace)
    return fig, axes


def to_uri(fig: Figure) -> str:
    """The figure as a PNG data URI; ``Software`` metadata dropped so the bytes are reproducible."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _label_margin(labels: Sequence[str]) -> float:
    return 0.25 + _CHAR_IN * max((len(str(s)) for s in labels), default=4)


@_styled
def barh(values: Mapping[str, float], title: str = "", xlabel: str = "", colors: Sequence[str] | None = None) -> str:
    """Horizontal bars, one per key, top to bottom in the mapping's order, value written at the end."""
    labels = list(values)
    v = np.asarray([values[k] for k in labels], dtype=float)
    fig, (ax,) = _figure(6.0, 0.85 + 0.22 * max(len(labels), 1), left=_label_margin(labels), right=0.5, top=0.3)
    y = np.arange(len(labels))[::-1]
    ax.barh(y, v, color=list(colors) if colors else PALETTE[0], height=0.7)
    ax.set_yticks(y, labels)
    for yi, vi in zip(y, v):
        ax.text(vi, yi, f" {vi:,.0f}", va="center", fontsize=7)
    ax.set_xlim(0, max(float(v.max()) if v.size else 1.0, 1.0) * 1.12)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.grid(False)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return to_uri(fig)


@_styled
def histograms(panels: Sequence[tuple[str, np.ndarray, float | None]], xlabel: str = "", ncols: int = 4) -> str:
    """One histogram per (title, values, threshold) panel; the threshold as a dashed line."""
    n = max(len(panels), 1)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = _figure(2.6 * ncols, 1.95 * nrows, ncols, nrows, left=0.5, bottom=0.45, wspace=0.35, hspace=0.85)
    for ax, (title, values, thr) in zip(axes, panels):
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        if v.size:
            in_unit = v.min() >= 0 and v.max() <= 1
            ax.hist(v, bins=40, range=(0, 1) if in_unit else None, color=PALETTE[0], alpha=0.85, histtype="stepfilled")
        if thr is not None:
            ax.axvline(thr, color=PALETTE[3], linestyle="--", linewidth=1.2)
        ax.set_title(title if thr is None else f"{title}  (< {thr:g})")
        ax.set_xlabel(xlabel)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return to_uri(fig)


@_styled
def scatter(x: np.ndarray, y: np.ndarray, title: str = "", xlabel: str = "", ylabel: str = "", log: bool = False,
            groups: np.ndarray | None = None) -> str:
    """Scatter plot, one colour per group value (e.g. kept / quarantined)."""
    fig, (ax,) = _figure(4.2, 3.1, left=0.6)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if groups is None:
        ax.scatter(x, y, s=6, alpha=0.5, color=PALETTE[0], linewidths=0)
    else:
        groups = np.asarray(groups)
        for i, g in enumerate(dict.fromkeys(groups.tolist())):
            m = groups == g
            ax.scatter(x[m], y[m], s=7, alpha=0.6, color=PALETTE[i % len(PALETTE)], linewidths=0, label=f"{g} ({int(m.sum())})")
        ax.legend(markerscale=2)
    if log and x.size and (x > 0).all() and (y > 0).all():
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return to_uri(fig)


@_styled
def line_panels(x: np.ndarray, panels: Sequence[tuple[str, np.ndarray]], xlabel: str = "", ncols: int = 3) -> str:
    """One small line chart per (title, y) panel over a shared x; NaN points skipped."""
    n = max(len(panels), 1)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = _figure(3.2 * ncols, 2.2 * nrows, ncols, nrows, left=0.6, wspace=0.4, hspace=0.8)
    x = np.asarray(x, dtype=float)
    for i, (ax, (title, y)) in enumerate(zip(axes, panels)):
        y = np.asarray(y, dtype=float)
        m = np.isfinite(y)
        ax.plot(x[m], y[m], color=PALETTE[i % len(PALETTE)], linewidth=1.3, marker="o" if m.sum() < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return to_uri(fig)


@_styled
def grouped_bars(categories: Sequence[str], series: Mapping[str, Sequence[tuple[float | None, float | None, float | None]]],
                 title: str = "", ylabel: str = "") -> str:
    """Bars per category, one per series, with (value, low, high) error bars."""
    n = max(len(series), 1)
    fig, (ax,) = _figure(max(4.0, 0.35 * len(categories) * n + 1.5) + 0.9, 2.7, right=1.0)
    width = 0.8 / n
    xs = np.arange(len(categories))
    for i, (name, vals) in enumerate(series.items()):
        v = np.array([[np.nan if a is None else a for a in t] for t in vals], dtype=float).reshape(-1, 3)
        err = np.nan_to_num(np.abs(np.vstack([v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]])))
        ax.bar(xs + (i - (n - 1) / 2) * width, v[:, 0], width, yerr=err, capsize=2, color=PALETTE[i % len(PALETTE)], label=name,
               error_kw={"linewidth": 0.8})
    ax.set_xticks(xs, list(categories))
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return to_uri(fig)


@_styled
def stacked_shares(panels: Sequence[tuple[str, Mapping[str, Mapping[str, int]]]], top: int = 8) -> str:
    """Per panel, 100%-stacked bars: one bar per row key (a split), segments per value (the top ones)."""
    heights = [max(0.95 + 0.25 * len(t), 0.6 + 0.2 * min(top + 1, len({c for r in t.values() for c in r}))) for _, t in panels]
    fig, axes = _figure(6.4, sum(heights) + 0.4, 1, max(len(panels), 1), left=0.6, right=1.9, bottom=0.35, hspace=0.9)
    for ax, (title, table) in zip(axes, panels):
        rows = list(table)
        totals: dict[str, int] = {}
        for r in rows:
            for c, n in table[r].items():
                totals[c] = totals.get(c, 0) + n
        cols = sorted(totals, key=lambda c: -totals[c])[:top]
        rest = [c for c in totals if c not in cols]
        m = np.array([[table[r].get(c, 0) for c in cols] + ([sum(table[r].get(c, 0) for c in rest)] if rest else []) for r in rows], dtype=float)
        names = cols + (["(other)"] if rest else [])
        share = m / np.maximum(m.sum(1, keepdims=True), 1)
        left = np.zeros(len(rows))
        y = np.arange(len(rows))[::-1]
        for j, c in enumerate(names):
            color = "#9ca3af" if c == "(other)" else PALETTE[j % len(PALETTE)]
            ax.barh(y, share[:, j], left=left, color=color, height=0.65, label=str(c))
            left += share[:, j]
        ax.set_yticks(y, rows)
        ax.set_xlim(0, 1)
        ax.grid(False)
        ax.set_title(title)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return to_uri(fig)


@_styled
def severity_curves(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]],
                    clean: Mapping[str, float]) -> str:
    """One panel per degradation: metric vs severity with its CI band, the clean value dotted.

    Args:
        curves: degradation -> metric -> (severity, value, low, high).
        clean: metric -> value on undegraded images.
    """
    names = list(curves)
    ncols = min(3, max(len(names), 1))
    nrows = -(-max(len(names), 1) // ncols)
    fig, axes = _figure(3.2 * ncols + 0.9, 2.3 * nrows, ncols, nrows, left=0.5, right=1.1, wspace=0.3, hspace=0.8)
    metrics = list(dict.fromkeys(m for d in names for m in curves[d]))
    for ax, d in zip(axes, names):
        for i, metric in enumerate(metrics):
            if metric not in curves[d]:
                continue
            s, v, lo, hi = (np.asarray(a, dtype=float) for a in curves[d][metric])
            color = PALETTE[i % len(PALETTE)]
            ax.plot(s, v, marker="o", markersize=3, color=color, linewidth=1.3, label=metric)
            ax.fill_between(s, lo, hi, color=color, alpha=0.15, linewidth=0)
            if clean.get(metric) is not None:
                ax.axhline(clean[metric], color=color, linestyle=":", linewidth=1)
        ax.set_title(d)
        ax.set_xlabel("severity")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if names:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    return to_uri(fig)


def top_classes(matrix: np.ndarray, n: int = HEATMAP_CLASSES) -> np.ndarray:
    """The indices of the ``n`` classes with the most support (true rows), most first; ties by index."""
    support = np.asarray(matrix, dtype=float).sum(1)
    return np.argsort(-support, kind="stable")[:n]


@_styled
def heatmap(matrix: np.ndarray, labels: Sequence[str], title: str = "", xlabel: str = "predicted", ylabel: str = "true",
            max_classes: int = HEATMAP_CLASSES) -> str:
    """A confusion matrix, row-normalised colours, counts written in the cells.

    Above ``max_classes`` only the classes with the most support are drawn (rows and columns), so
    the figure's size stays bounded (1,000 classes drawn whole took 24 GB); shares stay of the full row.
    """
    m = np.asarray(matrix, dtype=float)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    if len(labels) > max_classes:
        keep = np.sort(top_classes(m, max_classes))
        m, share, labels = m[np.ix_(keep, keep)], share[np.ix_(keep, keep)], [labels[i] for i in keep]
    margin = _label_margin(labels) + 0.2
    side = 0.3 * len(labels) + 0.4
    fig, (ax,) = _figure(side + margin + 0.2, side + margin + 0.3, left=margin, bottom=margin, right=0.2, top=0.3)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    if len(labels) <= 15:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=6, color="white" if share[i, j] > 0.6 else "black")
    ax.grid(False)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return to_uri(fig)
