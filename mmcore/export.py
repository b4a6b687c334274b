"""Export a run's curated rows for training elsewhere, in the forms the field reads.

- ``webdataset``: img2dataset's output layout. ``NNNNN.tar`` shards of ``shard_size`` rows, each
  row a sample ``<key>.<ext>`` (the image's original bytes, the extension from their actual
  format; JPEG at a given size with ``reencode``), ``<key>.txt`` (the curated caption) and
  ``<key>.json`` (img2dataset's fields plus ``mmpipe``: the row's id, source reference, split,
  content digest and every score and measurement the stages recorded). Beside each shard, as
  img2dataset writes them, ``NNNNN.parquet`` (key, caption, status, width, height, sha256, ...)
  and ``NNNNN_stats.json``; and ``sizes.json``, which open_clip reads for the sample count.
- ``csv``: open_clip's CSV, tab-separated, ``filepath`` and ``title``. For images that are files
  (``data.format`` manifest, coco, karpathy) ``filepath`` is the original file's absolute path;
  images inside tar shards or Parquet cells (or re-encoded ones) are written under ``OUT/images/``
  and pointed at, since open_clip opens a path.
- ``retry``: the rows quarantined as ``download_failed`` (img2dataset could not fetch them): their
  ``url`` and caption as a Parquet manifest that img2dataset takes as input.

The same run gives the same bytes: rows in ``row_id`` order, keys from ``row_id``, tar members
with a fixed time, owner and mode in one format (ustar), JSON with sorted keys. Every file is
written to a temporary name, synced and renamed, so a half-written shard never looks complete;
``export.json`` (the summary) says ``"complete": false`` until the last file is in place. Image
bytes come only through ``mmcore.sources``, so every input form exports alike; a row whose image
cannot be read now, or whose bytes are no longer those the probe hashed, is skipped with a reason
(``file_changed``, ``missing_file``, ...) and listed in the summary, never exported unchecked.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shlex
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image
from pydantic import Field, ValidationError, field_validator, model_validator

from mmcore import faults, graph, images, layout, runlock, sources, tables
from mmcore.base import StrictModel
from mmcore.errors import InputError, row_detail
from mmcore.layout import ExportLayout, RunLayout, StagePaths
from mmcore.split import CONTENT_DIGEST, SPLIT
from mmcore.tables import DOMAIN, GROUP, IMAGE, LABEL, REASON, ROW_ID, TEXT, TEXT_RAW, TIME

FORMATS = {
    "webdataset": "img2dataset's layout: NNNNN.tar (key.<ext>, key.txt, key.json) + NNNNN.parquet + NNNNN_stats.json",
    "csv": "open_clip's CSV: tab-separated filepath and title",
    "retry": "the url and caption of every row quarantined as download_failed, for img2dataset",
}
# The stages whose kept table is a curated dataset; the default is the last of them that has run.
CURATION = graph.ORDER[: graph.ORDER.index("split") + 1]
DOWNLOAD_FAILED = "download_failed"  # the reason the webdataset reader gives a row img2dataset could not fetch
URL = "url"  # img2dataset's column, kept on the rows read from its output

# Why a row is not exported (it is listed in the summary with its detail).
SKIP_REASONS = {
    "outside_root": "the image reference resolves outside the dataset root",
    **faults.REASONS,
    "file_changed": "the image's bytes are no longer those the probe hashed (content_digest)",
    "not_an_image": "the bytes are not an image format Pillow recognises",
    **{k: v for k, v in images.REASONS.items() if k != "file_changed"},
    "corrupt_image": "the image did not decode for --reencode",
    "no_url": "retry: a download_failed row without a url to retry",
}

# Pillow's format -> the extension img2dataset and webdataset readers expect.
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
# What open_clip's webdataset loader reads (``filter_no_caption_or_no_image``); other members are skipped by it.
OPEN_CLIP_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

KEY_DIGITS = 9  # keys are the row_id, zero-padded: stable across exports and traceable to the run
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z for every member: the same run gives the same bytes
_CHUNK = 1 << 20

# img2dataset's per-shard Parquet, column by column (mmpipe's own fields are in each sample's .json).
SHARD_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
    ("original_width", pa.int64()), ("original_height", pa.int64()), ("exif", pa.string()), ("sha256", pa.string()),
])
# The row's own metadata, as img2dataset's ``save_additional_columns``: a later run on the export can
# group, split by time, classify and compare domains as this one did (data.group_column: group, ...).
ADDITIONAL = (GROUP, TIME, LABEL, DOMAIN)
RETRY_SCHEMA = pa.schema([(URL, pa.string()), ("caption", pa.string()), (ROW_ID, pa.int64()),
                          ("error_message", pa.string())])


class ExportConfig(StrictModel):
    """What to export, from which stage, where to."""

    format: str = Field("webdataset", description="webdataset, csv or retry (see mmcore.export.FORMATS).")
    out: Path = Field(description="Folder to write into: new, empty, or a previous export (replaced).")
    stage: str | None = Field(None, description="Stage whose kept rows are exported; default the last curation stage "
                                                "that ran (split, quality, probe, clean). Not for retry.")
    split: str | None = Field(None, description="Only rows of this split (train, val, test); needs a stage after split.")
    shard_size: int = Field(10_000, ge=1, le=1_000_000, description="webdataset: rows per shard (img2dataset: 10,000).")
    reencode: int | None = Field(None, ge=16, le=16384, description="Re-encode every image as JPEG with its shorter side "
                                 "at most this many pixels (never upscaled); default: the original bytes.")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality with reencode (img2dataset's default: 95).")

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"unknown export format {v!r}; expected one of {', '.join(FORMATS)}")
        return v

    @model_validator(mode="after")
    def _retry_takes_no_rows_options(self) -> ExportConfig:
        if self.format == "retry":
            bad = [n for n, v in (("stage", self.stage), ("split", self.split), ("reencode", self.reencode)) if v is not None]
            if bad:
                raise ValueError(f"--format retry lists every download_failed row of the run; --{bad[0]} does not "
                                 "apply to it")
        return self


def spec(**values: Any) -> ExportConfig:
    """An ``ExportConfig``; a bad value is a one-line ``InputError`` naming the option."""
    try:
        return ExportConfig(**values)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:] + ("" if "got " in msg or "; expected" in msg or not where
                                           else f", got {err.get('input')!r}")
        raise InputError(f"export --{where.replace('_', '-')}: {msg}" if where else f"export {msg}") from None


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote: counts, files, bytes (also ``OUT/export.json``, with the skipped rows)."""

    format: str
    out: str
    run_dir: str
    stage: str | None
    split: str | None
    n_rows: int  # rows selected for export
    n_exported: int
    n_skipped: int
    skipped: dict[str, int]  # reason -> rows
    n_shards: int
    bytes: int  # of every file written
    files: tuple[str, ...]  # every file of the export, relative to out, sorted
    reencode: int | None = None
    # webdataset: samples open_clip's loader would pass over (GIF, BMP, TIFF members): use reencode
    n_not_open_clip: int = 0
    open_clip_data: str = ""  # what open_clip takes as --train-data (a brace pattern, or the CSV's path)
    skipped_rows: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"], d["skipped_rows"] = list(self.files), list(self.skipped_rows)
        return d


# --------------------------------------------------------------------------- the run folder


def run_config(run_dir: str | os.PathLike):
    """The config a run was made with (``RUN_DIR/config.yaml``); a one-line error for a folder that is not a run."""
    from mmcore.config import load_config  # the config module imports every stage: only when exporting

    run = RunLayout(Path(run_dir))
    if not run.root.is_dir():
        raise InputError(f"run folder not found: {run_dir}")
    if not run.config.is_file():
        raise InputError(f"{run_dir} is not a run folder: no {run.config.name} (run `mmpipe run` first)")
    return load_config(run.config)


def default_stage(run_dir: str | os.PathLike) -> str:
    """The last curation stage with a kept table in the run folder."""
    for name in reversed(CURATION):
        if StagePaths.of(run_dir, name).kept.is_file():
            return name
    raise InputError(f"no curation stage has run in {run_dir} (no {layout.KEPT_FILE} for {', '.join(CURATION)})")


def select_rows(run_dir: str | os.PathLike, stage: str | None, split: str | None) -> tuple[str, pd.DataFrame]:
    """The stage's kept rows (of one split), sorted by row_id; one-line errors for a stage not run or a bad split."""
    name = default_stage(run_dir) if stage is None else graph.stage(stage).name
    kept_path = StagePaths.of(run_dir, name).kept
    if not kept_path.is_file():
        raise InputError(f"stage {name!r} has not run in {run_dir} (no {kept_path.relative_to(run_dir)})")
    rows = tables.read_parquet(kept_path)
    tables.require_columns(rows, [ROW_ID, IMAGE, TEXT], f"export: {name}/{layout.KEPT_FILE}")
    if split is not None:
        if SPLIT not in rows.columns:
            raise InputError(f"export --split {split}: stage {name!r} has no {SPLIT!r} column; expected a stage from "
                             f"split on ({', '.join(graph.ORDER[graph.ORDER.index('split'):-1])})")
        have = sorted(str(s) for s in rows[SPLIT].dropna().unique())
        if split not in have:
            raise InputError(f"export --split: no split {split!r} in {name}/{layout.KEPT_FILE}; expected one of "
                             f"{', '.join(have) or '(none)'}")
        rows = rows[rows[SPLIT] == split]
    return name, rows.sort_values(ROW_ID, kind="stable").reset_index(drop=True)


def retry_rows(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every row a stage quarantined as ``download_failed``: url, caption (as given), row_id, error_message."""
    parts = []
    for name in graph.ORDER:
        q = StagePaths.of(run_dir, name).quarantine
        if not q.is_file():
            continue
        t = tables.read_parquet(q)
        t = t[t[REASON] == DOWNLOAD_FAILED]
        if t.empty:
            continue
        tables.require_columns(t, [URL, ROW_ID], f"export --format retry: {name}/{layout.QUARANTINE_FILE}")
        caption = t[TEXT_RAW] if TEXT_RAW in t.columns else t[TEXT] if TEXT in t.columns else pd.Series("", index=t.index)
        if TEXT_RAW in t.columns and TEXT in t.columns:
            caption = caption.where(caption.notna(), t[TEXT])
        parts.append(pd.DataFrame({URL: t[URL].astype("string"), "caption": caption.astype("string"),
                                   ROW_ID: t[ROW_ID].astype(np.int64),
                                   "error_message": t[tables.DETAIL].astype("string")}))
    if not parts:
        return pd.DataFrame({c.name: pd.Series(dtype="string" if c.type == pa.string() else np.int64)
                             for c in RETRY_SCHEMA})
    return pd.concat(parts, ignore_index=True).sort_values(ROW_ID, kind="stable").reset_index(drop=True)


# Folders of a run folder that runs write, move aside or replace: an export inside one would be lost.
_RUN_OWNED = frozenset({*graph.ORDER, layout.ABLATE_DIR, layout.SUPERSEDED_DIR})


def check_out(out: str | os.PathLike, run_dir: str | os.PathLike, data_root: str | os.PathLike | None) -> None:
    """Refuse an --out that is a file, a run-owned folder or lies in the dataset folder; one line each."""
    out_p = Path(out)
    if out_p.exists() and not out_p.is_dir():
        raise InputError(f"export --out {out} is a file; expected a folder (new, empty, or an earlier export)")
    real = Path(os.path.realpath(out_p))
    run = Path(os.path.realpath(run_dir))
    if real == run:
        raise InputError(f"export --out {out} is the run folder; expected a folder of its own (e.g. {run_dir}/export)")
    if run in real.parents and real.relative_to(run).parts[0] in _RUN_OWNED:
        raise InputError(f"export --out {out} lies in {real.relative_to(run).parts[0]}/ of the run folder, which runs "
                         f"rewrite; expected a folder of its own (e.g. {run_dir}/export)")
    if data_root is not None:
        root = Path(os.path.realpath(data_root))
        if real == root or root in real.parents:
            raise InputError(f"export --out {out} lies in the dataset folder {data_root}; expected a folder outside it "
                             "(a later run would read the export as input)")


def check(spec_: ExportConfig, run_dir: str | os.PathLike, data_root: str | os.PathLike | None,
          planned: tuple[str, ...]) -> None:
    """What can be checked before a run that ends with this export: its --out, and that it exports a
    stage the run runs (``planned``)."""
    check_out(spec_.out, run_dir, data_root)
    if spec_.format != "retry" and spec_.stage is not None and graph.stage(spec_.stage).name not in planned:
        raise InputError(f"export --stage {spec_.stage}: this run runs {', '.join(planned)}; expected one of them")


def reading(run_dir: str | os.PathLike):
    """The run folder's shared lock while exporting (``runlock.reading``)."""
    return runlock.reading(run_dir, "export")


# --------------------------------------------------------------------------- the output folder


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[BinaryIO]:
    """A file written under a temporary name in its folder, synced and renamed into place on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _open_out(out: Path) -> None:
    """``out`` is new, empty or an earlier export: anything else is refused, never overwritten."""
    if out.is_dir() and any(out.iterdir()):
        marker = ExportLayout(out).summary
        try:
            ours = json.loads(marker.read_text()).get("mmpipe_export") is not None
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise InputError(f"export --out {out} is not empty and holds no mmpipe export ({marker.name}); expected a new "
                             "or empty folder, or an earlier export to replace")
    out.mkdir(parents=True, exist_ok=True)


def _sweep(out: Path, keep: set[str]) -> None:
    """Remove what an earlier export into ``out`` left that this one did not write (its shards beyond
    this one's count, images, temporary files of a crashed export); nothing else is touched."""
    lay = ExportLayout(out)
    for p in sorted(out.iterdir()):
        if p.is_file() and p.name not in keep and (lay.owns(p.name) or p.name.endswith(".tmp") and p.name.startswith(".")):
            p.unlink()
    images_dir = lay.images
    if images_dir.is_dir() and not images_dir.is_symlink():
        for p in sorted(images_dir.rglob("*"), reverse=True):
            rel = p.relative_to(out).as_posix()
            if p.is_file() and not p.is_symlink() and rel not in keep:
                p.unlink()
            elif p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                p.rmdir()
        if not any(images_dir.iterdir()):
            images_dir.rmdir()


def _write_summary(out: Path, summary: dict[str, Any], complete: bool) -> None:
    tables.write_json({"mmpipe_export": 1, "complete": complete, **summary}, ExportLayout(out).summary)


# --------------------------------------------------------------------------- rows -> bytes


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _original(source: sources.ImageSource, ref: str, digest: str | None, max_bytes: int) -> bytes:
    """The image's bytes as the probe hashed them; ``_Skip`` with a reason when they cannot be read or changed."""
    try:
        data = source.read(ref, max_bytes=max_bytes)
    except images.UnsafePath as e:
        raise _Skip("outside_root", str(e)) from None
    except faults.ReadError as e:
        raise _Skip(e.reason, e.detail) from None
    except OSError as e:
        raise _Skip("read_error", row_detail(e)) from None
    if digest and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise _Skip("file_changed", f"sha256 of {len(data)} bytes differs from the probe's {digest[:19]}...")
    return data


def _format(data: bytes) -> str:
    fmt = images.identify(data[: images.HEADER_BYTES])
    if not fmt:
        raise _Skip("not_an_image", "unrecognised bytes")
    return fmt


def _reencode(data: bytes, size: int, policy: images.DecodePolicy, quality: int) -> tuple[bytes, int, int]:
    """JPEG bytes of the image with its shorter side at most ``size`` (EXIF applied, alpha over white)."""
    try:
        im = images.load_rgb_bytes(data, None, policy)
    except images.RefusedImage as e:
        raise _Skip(e.reason, e.detail) from None
    except MemoryError:
        raise _Skip("file_too_large", "out of memory decoding the image") from None
    except Exception as e:  # any decoder failure: the row, never the export
        raise _Skip("corrupt_image", row_detail(e)) from None
    w, h = im.size
    if min(w, h) > size:  # img2dataset's keep_ratio: the shorter side becomes size
        scale = size / min(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), im.size[0], im.size[1]


def _json_value(v: Any) -> Any:
    """A table cell as JSON: numpy scalars as Python, NaN and NA as null, timestamps as ISO-8601."""
    if isinstance(v, (np.ndarray, list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (bytes, bytearray)):
        return None  # image bytes never go into the metadata
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, (pd.Timestamp, np.datetime64)):
        return pd.Timestamp(v).isoformat()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def key_of(row_id: int) -> str:
    return f"{int(row_id):0{KEY_DIGITS}d}"


def _int_or_none(v: Any) -> int | None:
    v = _json_value(v)
    return int(v) if isinstance(v, (int, float)) else None


@dataclass
class _Sample:
    """One exported row: its key, the bytes to store and their extension, and its metadata."""

    key: str
    ext: str
    data: bytes
    caption: str
    meta: dict[str, Any]  # the row's columns (JSON-safe)
    width: int | None
    height: int | None
    original_width: int | None
    original_height: int | None


class _Rows:
    """Turns kept rows into samples: bytes checked against the probe's digest, re-encoded if asked."""

    def __init__(self, cfg, spec_: ExportConfig, stage: str):
        self.source = sources.of(cfg.data)
        self.max_bytes = cfg.probe.max_file_bytes
        self.policy = images.DecodePolicy(formats=cfg.probe.formats, max_pixels=cfg.probe.max_pixels,
                                          max_bytes=cfg.probe.max_file_bytes)
        self.spec, self.stage, self.run_name = spec_, stage, cfg.run_name
        self.skipped: list[dict[str, Any]] = []

    def sample(self, row: dict[str, Any]) -> _Sample | None:
        meta = {str(k): _json_value(v) for k, v in row.items()}
        key = key_of(meta[ROW_ID])
        try:
            digest = meta.get(CONTENT_DIGEST) or None
            data = _original(self.source, str(meta[IMAGE]), digest, self.max_bytes)
            ow, oh = _int_or_none(meta.get("width")), _int_or_none(meta.get("height"))
            if self.spec.reencode is not None:
                data, w, h = _reencode(data, self.spec.reencode, self.policy, self.spec.jpeg_quality)
                ext = "jpg"
            else:
                ext = EXTENSIONS.get(_format(data), "")
                if not ext:
                    raise _Skip("unsupported_format", f"{_format(data)} is not an accepted image format")
                w, h = ow, oh
        except _Skip as e:
            self.skipped.append({ROW_ID: meta[ROW_ID], "reason": e.reason, "detail": e.detail})
            return None
        return _Sample(key, ext, data, str(meta[TEXT]), meta, w, h, ow, oh)

    def sample_json(self, s: _Sample) -> dict[str, Any]:
        """img2dataset's per-sample fields, and mmpipe's record of the row under ``mmpipe``."""
        return {
            "key": s.key, "url": s.meta.get(URL), "caption": s.caption, "status": "success", "error_message": None,
            "width": s.width, "height": s.height, "original_width": s.original_width,
            "original_height": s.original_height, "exif": None, "sha256": hashlib.sha256(s.data).hexdigest(),
            "mmpipe": {**s.meta, "stage": self.stage, "run_name": self.run_name, "source": s.meta[IMAGE]},
        }


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = len(data), TAR_MTIME, 0o644, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode()


# --------------------------------------------------------------------------- the three formats


def _webdataset(rows: pd.DataFrame, make: _Rows, out: Path, shard_size: int) -> tuple[list[str], int, int]:
    """Write the shards; returns (files, samples written, samples open_clip's loader would skip)."""
    lay = ExportLayout(out)
    files: list[str] = []
    sizes: dict[str, int] = {}
    n_out = n_not_open_clip = 0
    extra = [c for c in ADDITIONAL if c in rows.columns]
    schema = pa.schema([*SHARD_SCHEMA, *(pa.field(c, pa.string()) for c in extra)])
    n_shards = max(1, math.ceil(len(rows) / shard_size))
    for shard in range(n_shards):
        # One shard's rows as dicts at a time: a million rows of sixty columns would not fit as one list.
        chunk = rows.iloc[shard * shard_size:(shard + 1) * shard_size].to_dict(orient="records")
        meta_rows: list[dict[str, Any]] = []
        skipped_before = len(make.skipped)
        n_bytes = 0
        tar_path = lay.shard_tar(shard)
        with _atomic(tar_path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row in chunk:
                s = make.sample(row)
                if s is None:
                    continue
                rec = make.sample_json(s)
                # Members in name order within a sample: <key>.<ext>, <key>.json, <key>.txt sorted.
                members = sorted([(f"{s.key}.{s.ext}", s.data), (f"{s.key}.json", _dumps(rec)),
                                  (f"{s.key}.txt", s.caption.encode())])
                for name, data in members:
                    _tar_add(tar, name, data)
                n_bytes += len(s.data)
                n_not_open_clip += s.ext not in OPEN_CLIP_EXTENSIONS
                meta_rows.append({**{k: rec[k] for k in SHARD_SCHEMA.names},
                                  **{c: None if s.meta[c] is None else str(s.meta[c]) for c in extra}})
        n = len(meta_rows)
        tables.write_parquet(pa.Table.from_pylist(meta_rows, schema=schema), lay.shard_parquet(shard))
        skipped = Counter(r["reason"] for r in make.skipped[skipped_before:])
        tables.write_json({"count": len(chunk), "successes": n, "failed_to_read": len(chunk) - n,
                           "failed_to_resize": 0, "status_dict": {"success": n, **dict(sorted(skipped.items()))},
                           "bytes": n_bytes}, lay.shard_stats(shard))
        files += [tar_path.name, lay.shard_parquet(shard).name, lay.shard_stats(shard).name]
        sizes[tar_path.name] = n
        n_out += n
    tables.write_json(sizes, lay.sizes)  # open_clip's get_dataset_size reads it: no --train-num-samples needed
    files.append(lay.sizes.name)
    return files, n_out, n_not_open_clip


def _csv(rows: pd.DataFrame, make: _Rows, out: Path, shard_size: int) -> tuple[list[str], int]:
    """open_clip's CSV; images that are not files (or are re-encoded) written under OUT/images/."""
    lay = ExportLayout(out)
    files: list[str] = []
    in_place = isinstance(make.source, sources.FileSource) and make.spec.reencode is None
    lines: list[tuple[str, str, int]] = []
    for start in range(0, len(rows), shard_size):
        for i, row in enumerate(rows.iloc[start:start + shard_size].to_dict(orient="records"), start):
            s = make.sample(row)  # reads and checks the bytes even for files left in place: never an unchecked path
            if s is None:
                continue
            if in_place:
                path = make.source.path(str(row[IMAGE]))
            else:
                p = lay.image(i // shard_size, s.key, s.ext)
                tables.write_bytes(s.data, p)
                files.append(p.relative_to(out).as_posix())
                path = str(p.resolve())
            lines.append((path, s.caption, int(row[ROW_ID])))
    with _atomic(lay.csv) as f:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        w = csv.writer(text, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        w.writerow(["filepath", "title", ROW_ID])
        w.writerows(lines)
        text.flush()
        text.detach()
    files.append(lay.csv.name)
    return files, len(lines)


# --------------------------------------------------------------------------- the export


def export(run_dir: str | os.PathLike, spec_: ExportConfig, *, lock: bool = True) -> ExportSummary:
    """Export a run's curated rows as ``spec_`` asks; returns the summary also written to ``OUT/export.json``.

    Args:
        lock: take a shared lock on the run folder (false when the caller already holds the run's own).
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    out = Path(spec_.out)
    check_out(out, run_dir, cfg.data.image_root)
    with reading(run_dir) if lock else contextlib.nullcontext():
        if spec_.format == "retry":
            stage, rows = None, retry_rows(run_dir)
        else:
            stage, rows = select_rows(run_dir, spec_.stage, spec_.split)
        _open_out(out)
        head = {"format": spec_.format, "run_dir": str(run_dir.resolve()), "stage": stage, "split": spec_.split}
        _write_summary(out, head, complete=False)  # until the last file is in place
        lay = ExportLayout(out)
        n_not_open_clip, n_shards, open_clip_data = 0, 0, ""
        make = _Rows(cfg, spec_, stage or "")
        if spec_.format == "webdataset":
            files, n_out, n_not_open_clip = _webdataset(rows, make, out, spec_.shard_size)
            n_shards = sum(1 for f in files if f.endswith(".tar"))
            open_clip_data = str(ExportLayout(out.resolve()).brace(n_shards))
        elif spec_.format == "csv":
            files, n_out = _csv(rows, make, out, spec_.shard_size)
            open_clip_data = str(lay.csv.resolve())
        else:
            no_url = rows[URL].isna() | (rows[URL].fillna("").str.strip() == "")
            make.skipped += [{ROW_ID: int(r), "reason": "no_url", "detail": "a download_failed row without a url"}
                             for r in rows.loc[no_url, ROW_ID]]
            retry = rows[~no_url]
            tables.write_parquet(pa.Table.from_pandas(retry, schema=RETRY_SCHEMA, preserve_index=False), lay.retry)
            files, n_out = [lay.retry.name], len(retry)
        files = sorted(files)
        _sweep(out, {*files, lay.summary.name})
        skipped = Counter(r["reason"] for r in make.skipped)
        summary = ExportSummary(
            format=spec_.format, out=str(out.resolve()), run_dir=str(run_dir.resolve()), stage=stage,
            split=spec_.split, n_rows=len(rows), n_exported=n_out, n_skipped=len(make.skipped),
            skipped=dict(sorted(skipped.items())), n_shards=n_shards,
            bytes=sum((out / f).stat().st_size for f in files), files=tuple(files), reencode=spec_.reencode,
            n_not_open_clip=n_not_open_clip, open_clip_data=open_clip_data,
            skipped_rows=tuple(sorted(make.skipped, key=lambda r: r[ROW_ID])),
        )
        _write_summary(out, summary.to_json(), complete=True)
    return summary


def read_summary(out: str | os.PathLike) -> dict[str, Any]:
    """``OUT/export.json`` of an export."""
    return tables.read_json(ExportLayout(Path(out)).summary)


def open_clip_command(summary: ExportSummary) -> str:
    """An ``open_clip_train`` command line that trains a ViT-B/32 on the export (GPU settings, to edit)."""
    data = summary.open_clip_data
    quoted = shlex.quote(data)  # a brace pattern must reach open_clip unexpanded by the shell
    kind = "webdataset" if summary.format == "webdataset" else "csv"
    # open_clip asserts at least one shard per data-loader worker; sizes.json gives it the sample count.
    workers = max(1, min(4, summary.n_shards)) if kind == "webdataset" else 4
    return (f"python -m open_clip_train.main --dataset-type {kind} --train-data {quoted} "
            f"--model ViT-B-32 --batch-size 256 --epochs 32 --lr 5e-4 --wd 0.1 --warmup 500 --workers {workers} "
            "--precision amp --logs logs --name mmpipe-export")


def summary_markdown(summary: ExportSummary) -> str:
    """The export for a Prefect artifact or a terminal: counts, skipped rows per reason, where the files are."""
    lines = [f"### export: {summary.format}" + (f" of {summary.stage}" if summary.stage else "")
             + (f", split {summary.split}" if summary.split else ""),
             "",
             f"**{summary.n_exported}** of {summary.n_rows} rows exported, **{summary.n_skipped}** skipped; "
             f"{summary.n_shards} shard(s), {len(summary.files)} file(s), {summary.bytes:,} bytes in `{summary.out}`."]
    if summary.skipped:
        lines += ["", "| skipped because | rows |", "|---|---|", *(f"| `{r}` | {n} |" for r, n in summary.skipped.items())]
    if summary.n_not_open_clip:
        lines += ["", f"{summary.n_not_open_clip} sample(s) are GIF, BMP or TIFF, which open_clip's webdataset loader "
                  "passes over: export with reencode to train on them."]
    if summary.open_clip_data:
        lines += ["", "Train open_clip on it:", "", "```", open_clip_command(summary), "```"]
    return "\n".join(lines) + "\n"


__all__ = ["ExportConfig", "ExportSummary", "FORMATS", "SKIP_REASONS", "check", "check_out", "export", "open_clip_command",
           "read_summary", "retry_rows", "select_rows", "spec", "summary_markdown"]
