"""HTML pieces of the report: formatted numbers, keyed cells, tables, figures and image thumbnails.

A cell with a ``key`` carries ``data-key="<stage>.<stat>"`` and ``data-value`` (the exact JSON
value), so tests can check the page against the artifacts.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mmcore import faults, sources
from mmcore.images import DEFAULT_POLICY, DecodePolicy, RefusedImage, pixel_limit, refusal_reason
from mmcore.tables import TEXT, TEXT_RAW

esc = html.escape


def fmt(v: Any, digits: int = 4) -> str:
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


def is_ci(v: Any) -> bool:
    """A metric leaf with its interval: ``{"value", "low", "high"}``."""
    return isinstance(v, Mapping) and "value" in v and "low" in v and "high" in v


def ci_text(leaf: Mapping[str, Any]) -> str:
    """A metric with its interval: ``value [low, high]``."""
    v, lo, hi = leaf.get("value"), leaf.get("low"), leaf.get("high")
    if v is None:
        return "–"
    d = 1 if abs(v) >= 10 else 3  # ranks in one decimal, rates in three
    f = lambda x: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
    return f"{f(v)} [{f(lo)}, {f(hi)}]"


def json_attr(v: Any) -> str:
    return esc(json.dumps(v, default=str), quote=True)


def num(v: Any) -> Any:
    """A float from a table cell (``None`` for NaN or inf); anything else as it is."""
    if v is None or (isinstance(v, (float, np.floating)) and not math.isfinite(v)):
        return None
    if isinstance(v, (float, np.floating, int, np.integer)) and not isinstance(v, bool):
        return float(v)
    return v


def cell(key: str | None, value: Any, text: str | None = None, cls: str = "") -> str:
    """A table cell; with ``key`` it carries ``data-key`` and the exact value for tests."""
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) or is_ci(value)
    classes = " ".join(c for c in (cls, "num" if numeric else "") if c)
    attrs = f' class="{classes}"' if classes else ""
    if key is not None:
        raw = value["value"] if is_ci(value) else value
        attrs += f' data-key="{esc(key, quote=True)}" data-value="{json_attr(raw)}"'
    shown = text if text is not None else (ci_text(value) if is_ci(value) else esc(fmt(value)))
    return f"<td{attrs}>{shown}</td>"


def table(header: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    """Rows are lists of ready cells (``<td>...``) or plain values."""
    head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if str(c).startswith("<td") else f"<td>{esc(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="tablewrap"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def ordered(keys: Iterable[str], first: Iterable[str]) -> list[str]:
    """``keys`` with those in ``first`` leading, in that order (JSON artifacts come with sorted keys)."""
    keys, first = list(keys), list(first)
    return [k for k in first if k in keys] + [k for k in keys if k not in first]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and not is_ci(v):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def kv_table(d: Mapping[str, Any], key_prefix: str) -> str:
    """Any dict as a key | value table (nested keys dotted), every value keyed."""
    rows = [[esc(k), cell(f"{key_prefix}.{k}", v)] for k, v in _flatten(d)]
    return table(["key", "value"], rows, "kv") if rows else ""


def details(summary: str, body: str) -> str:
    return f"<details><summary>{summary}</summary>{body}</details>"


def charts(*items: str, cls: str = "charts") -> str:
    return f'<div class="{cls}">{"".join(items)}</div>'


def figure(uri: str, caption: str) -> str:
    return (f'<figure class="chart"><img class="chart" src="{uri}" alt="{esc(caption, quote=True)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def not_run(*stages: str, what: str = "") -> str:
    names = ", ".join(f"<code>{esc(s)}</code>" for s in stages)
    what = f" ({esc(what)})" if what else ""
    return f'<p class="notrun">Not run: {names} has no artifacts in this run{what}.</p>'


def missing(rel: str) -> str:
    """A note for a file the run does not have."""
    return f'<p class="notrun">No <code>{esc(rel)}</code>.</p>'


def badge(text: str, kind: str) -> str:
    return f'<span class="badge {kind}">{esc(text)}</span>'


def stat_card(label: str, value: str, key: str | None = None, raw: Any = None) -> str:
    """A headline figure; with ``key``, keyed like a cell."""
    attrs = f' data-key="{esc(key, quote=True)}" data-value="{json_attr(raw)}"' if key is not None else ""
    return f'<div class="stat"><div class="label">{esc(label)}</div><div class="value"{attrs}>{esc(value)}</div></div>'


def short(d: Any) -> str:
    """A digest, shortened, the whole of it on hover."""
    s = str(d or "")
    return f'<code title="{esc(s, quote=True)}">{esc(s.removeprefix("sha256:")[:12])}</code>' if s else ""


def caption(row: Mapping[str, Any]) -> str:
    for col in (TEXT, TEXT_RAW):
        v = row.get(col)
        if isinstance(v, str) and v.strip():
            return v if len(v) <= 140 else v[:137] + "…"
    return "(empty caption)"


# Notes for reasons a person reads better in words; any other reason is shown as its code.
_NOTES = {"missing_file": "file not found", "outside_root": "outside the dataset root"}


def _note(rel: str, why: str) -> str:
    return f'<div class="noimg" title="{esc(rel, quote=True)}">no preview:<br>{esc(_NOTES.get(why, why))}</div>'


class Thumbs:
    """JPEG data-URI thumbnails of dataset images; a file that cannot be shown gets a note instead.

    Images are decoded only as ``policy`` allows (the run's probe formats, byte limit and pixel
    limit, the latter no higher than ``max_pixels``); a refused one shows its reason code.
    """

    def __init__(self, root: sources.ImageSource | Path | None, side: int, max_pixels: int,
                 policy: DecodePolicy = DEFAULT_POLICY) -> None:
        # ``root``: the run's image source (``sources.of(data)``), or a folder of image files.
        self.root = None if root is None else sources.as_source(root)
        self.side, self.max_pixels = side, max_pixels
        self.policy = dataclasses.replace(policy, max_pixels=min(policy.max_pixels, max_pixels))
        self._cache: dict[str, str] = {}

    def refused(self, rel: Any, reason: str) -> str:
        """The note for an image a stage found undecodable: never opened here."""
        return _note("" if rel is None else str(rel), str(reason))

    def __call__(self, rel: Any, alt: str = "") -> str:
        rel = "" if rel is None or (isinstance(rel, float) and math.isnan(rel)) else str(rel)
        if rel not in self._cache:
            self._cache[rel] = self._make(rel)
        out = self._cache[rel]
        return out if out.startswith("<div") else out.replace('alt=""', f'alt="{esc(alt or rel, quote=True)}"', 1)

    def _make(self, rel: str) -> str:
        def note(why: str) -> str:
            return _note(rel, why)

        if not rel:
            return note("no image path")
        if self.root is None:
            return note("image root unknown")
        try:
            with pixel_limit(self.policy.max_pixels):
                im = sources.load_rgb(self.root, rel, max_side=self.side, policy=self.policy)
        except RefusedImage as e:  # a format, size or byte count the run's probe policy refuses
            return note(e.reason)
        except faults.ReadError as e:  # the retrying reader's reason code
            if e.reason in ("missing_file", "file_too_large"):
                return note(e.reason)
            return note("not a readable file")
        except Exception as e:  # the very images quarantined for being unreadable are shown as notes
            name = type(e).__name__
            if name == "UnsafePath":
                return note("outside the dataset root")
            return note(refusal_reason(e) or f"cannot decode ({name})")  # a bomb or MemoryError: its reason code
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=82)
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        return f'<img class="thumb" src="{uri}" width="{im.width}" height="{im.height}" alt="">'
