"""Human spot-check: a sheet of random test queries with their top 5, and its filled verdicts read back.

The sheet is a CSV (one row per query and rank, ``verdict`` left empty for a person to fill with
1/0, y/n) and an HTML page with thumbnails embedded as data URIs, so it opens offline.

Captions and paths are scraped text, and the CSV is opened in a spreadsheet: a cell that would start
a formula (``= + - @``, tab, carriage return) is written with a leading apostrophe (OWASP's CSV
injection advice), and the HTML shows the text as given (``cell_text``).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mmcore import metrics, tables
from mmcore.errors import InputError

COLUMNS = ["query_id", "query_kind", "query", "rank", "retrieved", "row_id", "verdict"]
TEXT_COLUMNS = ("query", "retrieved")  # scraped text: escaped for spreadsheets
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
TOP = 5
_YES = {"1", "y", "yes", "true", "t", "relevant", "correct"}
_NO = {"0", "n", "no", "false", "f", "irrelevant", "wrong"}


def build(
    img_emb: np.ndarray,
    txt_emb: np.ndarray,
    image_paths: Sequence[str],
    image_row_ids: Sequence[int],
    texts: Sequence[str],
    text_row_ids: Sequence[int],
    n: int,
    seed: int = 0,
) -> pd.DataFrame:
    """The sheet: ``n`` random queries (about half images, half captions) with their top 5 each."""
    rng = np.random.default_rng(seed)
    n_i = min(len(img_emb), (n + 1) // 2)
    n_t = min(len(txt_emb), n - n_i)
    rows = []
    qi = rng.choice(len(img_emb), n_i, replace=False) if n_i else []
    for q, i in enumerate(sorted(qi)):
        top = np.argsort(-(txt_emb @ img_emb[i]), kind="stable")[:TOP]
        for r, t in enumerate(top, 1):
            rows.append((f"i{q:03d}", "image", image_paths[i], r, texts[t], int(text_row_ids[t])))
    qt = rng.choice(len(txt_emb), n_t, replace=False) if n_t else []
    for q, t in enumerate(sorted(qt)):
        top = np.argsort(-(img_emb @ txt_emb[t]), kind="stable")[:TOP]
        for r, i in enumerate(top, 1):
            rows.append((f"t{q:03d}", "text", texts[t], r, image_paths[i], int(image_row_ids[i])))
    df = pd.DataFrame(rows, columns=COLUMNS[:-1])
    for c in TEXT_COLUMNS:
        df[c] = [spreadsheet_safe(v) for v in df[c].astype(str)] if len(df) else df[c]
    df["verdict"] = ""
    return df


def spreadsheet_safe(value: str) -> str:
    """``value`` as a spreadsheet shows it as text: a leading apostrophe before a formula start.

    A value already starting with an apostrophe gets one more, so ``cell_text`` inverts it exactly.
    """
    return "'" + value if value.startswith(_FORMULA_START) else value


def cell_text(value: str) -> str:
    """The text a ``spreadsheet_safe`` cell stands for."""
    return value[1:] if value.startswith("'") and value[1:].startswith(_FORMULA_START) else value


def _thumb(load: Callable[[str], Image.Image], path: str, side: int = 112) -> str:
    try:
        im = load(path)
    except Exception:  # a spot-check sheet shows what it can; a bad file is reported by probe
        return '<span class="missing">(unreadable)</span>'
    im = im.copy()
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=80)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return f'<img src="{uri}" alt="{html.escape(path)}" title="{html.escape(path)}">'


def to_html(sheet: pd.DataFrame, load: Callable[[str], Image.Image], title: str = "mmpipe spot-check") -> str:
    """One table row per query: the query (thumbnail or caption) and its top 5."""
    cache: dict[str, str] = {}

    def cell(kind: str, value: str) -> str:
        value = cell_text(value)
        if kind == "image":
            if value not in cache:
                cache[value] = _thumb(load, value)
            return cache[value]
        return f'<span class="cap">{html.escape(value)}</span>'

    body = []
    for qid, g in sheet.groupby("query_id", sort=True):
        kind = g["query_kind"].iloc[0]
        other = "text" if kind == "image" else "image"
        tops = "".join(
            f"<td><b>{r}</b> {cell(other, v)}<br><small>row {rid}</small></td>"
            for r, v, rid in zip(g["rank"], g["retrieved"], g["row_id"])
        )
        body.append(f"<tr><td><b>{html.escape(qid)}</b> {kind}<br>{cell(kind, g['query'].iloc[0])}</td>{tops}</tr>")
    style = (
        "body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
        "td{border:1px solid #ccc;padding:4px;vertical-align:top;max-width:180px}.cap{display:block}"
    )
    head = "<tr><th>query</th>" + "".join(f"<th>top {r}</th>" for r in range(1, TOP + 1)) + "</tr>"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
        f"<body><h1>{html.escape(title)}</h1><p>Mark each retrieved item relevant (1) or not (0) in the "
        f"<code>verdict</code> column of spotcheck.csv, then run <code>mmpipe verdicts RUN_DIR FILLED.csv</code>.</p>"
        f"<table>{head}{''.join(body)}</table></body></html>\n"
    )


def _parse(v: object) -> float:
    s = str(v).strip().lower()
    if s in _YES:
        return 1.0
    if s in _NO:
        return 0.0
    if s in ("", "nan", "none"):
        return np.nan
    raise ValueError(s)


def read_verdicts(filled_csv: str | os.PathLike, n_boot: int = 1000, seed: int = 0) -> dict:
    """Human-judged precision@1 and @5 (with 95% CIs) from a filled spot-check sheet.

    A query counts once all its ranks have a verdict; partly filled queries are skipped and counted.
    """
    path = Path(filled_csv)
    if not path.is_file():
        raise InputError(f"verdicts: file not found: {path}")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    tables.require_columns(df, ["query_id", "rank", "verdict"], f"verdicts ({path})")
    parsed = []
    for i, v in enumerate(df["verdict"]):
        try:
            parsed.append(_parse(v))
        except ValueError:
            raise InputError(
                f"verdicts: row {i + 2} of {path}: verdict {v!r} not understood; expected 1/0, y/n, yes/no or empty"
            ) from None
    df["v"] = parsed
    df["rank"] = pd.to_numeric(df["rank"], errors="coerce")
    complete = df.groupby("query_id")["v"].apply(lambda s: bool(s.notna().all()))
    done = df[df["query_id"].isin(complete[complete].index)].sort_values(["query_id", "rank"])
    if done.empty:
        raise InputError(f"verdicts: no query in {path} has all its verdicts filled; expected 1 or 0 in every 'verdict' cell")
    by_q = done.groupby("query_id")
    p1 = by_q.apply(lambda g: g.loc[g["rank"] == g["rank"].min(), "v"].iloc[0]).to_numpy(dtype=np.float64)
    p5 = by_q.apply(lambda g: g.loc[g["rank"] <= TOP, "v"].mean()).to_numpy(dtype=np.float64)
    return {
        "precision@1": metrics.bootstrap_ci(p1, n=n_boot, seed=seed),
        "precision@5": metrics.bootstrap_ci(p5, n=n_boot, seed=seed),
        "n_queries": int(len(p1)),
        "n_skipped": int((~complete).sum()),
    }
