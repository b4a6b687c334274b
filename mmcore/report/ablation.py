"""The curation ablation's chart: the headline test metric against rows kept, one point per variant.

Reads the table ``mmpipe ablate`` writes (``mmcore.ablation.table``: one row per variant and metric,
with ``value``/``low``/``high`` and ``kept_split``, the rows a variant's curation kept for train and val).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mmcore.report.plots import PALETTE, _figure, _styled, to_uri

# The metric the chart plots and ``mmpipe ablate`` leads with (declared here: mmcore.ablation imports it).
HEADLINE = "i2t_r5"
ROWS_KEPT = "kept_split"


@_styled
def headline_plot(t: pd.DataFrame, metric: str = HEADLINE) -> str | None:
    """``metric`` (with its CI as error bars) against rows kept, one labelled point per variant; None when
    the table has no such rows (an augmentation table from an older mmpipe has no ``kept_split``)."""
    if not {"scheme", "metric", "value", "low", "high", ROWS_KEPT} <= set(t.columns):
        return None
    rows = t[t["metric"] == metric].drop_duplicates("scheme")
    if rows.empty:
        return None
    base = rows["baseline"].iloc[0] if "baseline" in rows.columns else None
    fig, (ax,) = _figure(4.6, 3.2, left=0.65)
    x = rows[ROWS_KEPT].to_numpy(float)
    y, lo, hi = (rows[c].to_numpy(float) for c in ("value", "low", "high"))
    for i, (name, xi, yi, l, h) in enumerate(zip(rows["scheme"], x, y, lo, hi)):
        color = PALETTE[i % len(PALETTE)]
        ax.errorbar([xi], [yi], yerr=[[max(yi - l, 0)], [max(h - yi, 0)]], fmt="o", color=color, capsize=3, ms=5,
                    label=f"{name}{' (baseline)' if name == base else ''}")
    span = max(float(np.ptp(x)), 0.1 * float(np.abs(x).max()), 1.0)  # equal x (same rows kept): still a range
    ax.set_xlim(x.min() - 0.15 * span, x.max() + 0.15 * span)
    ax.set_title(f"test {metric} vs rows kept (95% CI)")
    ax.set_xlabel("rows kept by curation (train + val)")
    ax.set_ylabel(metric)
    ax.legend()
    return to_uri(fig)
