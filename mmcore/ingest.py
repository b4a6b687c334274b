"""Ingest: the input forms other than a manifest, read into one table of rows with image references.

``read(data)`` gives, for ``data.format``:

- ``webdataset``: one row per image member of each tar shard (``data.shards`` under ``data.root``),
  read from the tar headers in place (``sources.read_tar_index``; nothing is extracted), paired by
  key with its ``.txt`` (or ``.json``'s ``data.caption_field``) caption, and img2dataset's per-shard
  ``.parquet`` joined by key when it is there (``url``, ``status``, ``error_message``, ``sha256``,
  ``caption``, its ``width``/``height`` as ``src_width``/``src_height``). The image column holds
  ``<shard>::<member>`` (``sources.TarSource``). Members that cannot become a clean sample are rows
  with a reason (``REASONS``) that clean quarantines: failed downloads, unsafe names, links and
  devices, the earlier copies of a repeated member, images without a caption and captions without an
  image, oversized members, and members lost to a truncated shard. A shard that is not a tar at all,
  or holds more than ``sources.MAX_TAR_MEMBERS`` members, is a one-line ``InputError``; a shard
  damaged part-way gives the rows before the damage, the cut member as ``truncated_shard`` and, when
  the per-shard Parquet lists what should have followed, those rows as ``truncated_shard`` too.
- ``parquet``: one row per row of each file, its non-image columns read batch by batch
  (``iter_batches``: the image bytes are never read here); the image column holds ``<file>::<row>``
  (``sources.ParquetSource``).
- ``coco``: one row per caption of ``captions_*.json``, ``group`` = the image id.
- ``karpathy``: one row per sentence of ``dataset_coco.json`` / ``dataset_flickr30k.json``,
  ``group`` = the image id, ``given_split`` = Karpathy's split (``restval`` counts as train).

Rows come in a fixed order (files sorted, then archive / file order), so ``row_id`` is stable.
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmcore import images, sources, tables
from mmcore.base import DataConfig
from mmcore.digests import file_digest, files_fingerprint, text_digest
from mmcore.errors import InputError
from mmcore.tables import GIVEN_SPLIT, GROUP, IMAGE, TEXT

# Reason codes of rows an input form gives but clean cannot keep (clean quarantines them first).
REASONS = {
    "download_failed": "img2dataset could not download the image (status not success); detail: its error_message, "
                       "the row keeps its url for a retry manifest",
    "unsafe_member_name": "a tar member's name is absolute or climbs out with '..': never read",
    "special_member": "a tar member is a symlink, hard link, device, FIFO or sparse file, not a regular file: never read",
    "duplicate_member": "a tar member whose name (or key and extension) a later member repeats, or a key the per-shard "
                        "Parquet lists again: the last copy is the sample, as tar extracts",
    "member_too_large": "a tar member (image or caption) is larger than data.max_member_bytes: never read",
    "missing_caption": "an image member has no caption (.txt, or data.caption_field in its .json)",
    "missing_image": "a caption (or a successful download in the per-shard Parquet) without an image member",
    "truncated_shard": "the member was cut off, or lost, because its tar shard is truncated or damaged",
    "invalid_encoding": "the caption member is not valid UTF-8 (read as U+FFFD)",
}
# Columns ingest adds for clean: a row's reason code from REASONS ('' for none) and its detail.
REASON = "_mmpipe_ingest_reason"
DETAIL = "_mmpipe_ingest_detail"

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})
# img2dataset's per-shard Parquet columns, always on a webdataset row (null without one). Every other
# column of it (img2dataset's save_additional_columns) is joined too; a name mmpipe uses itself gets
# the prefix ``src_`` (its width and height are the resized image's, never the probe's measurements).
JOINED = ("url", "status", "error_message", "sha256", "caption", "src_width", "src_height")
KEY, SHARD = "key", "shard"
_WEBDATASET_COLUMNS = (IMAGE, TEXT, KEY, SHARD, *JOINED)
_RENAMED = {"width": "src_width", "height": "src_height"}
# Names a joined column may not take: the row's own, and those later stages add.
_TAKEN = frozenset({IMAGE, TEXT, KEY, SHARD, tables.ROW_ID, tables.TEXT_RAW, REASON, DETAIL, "width", "height",
                    "format", "mode", "orientation", "n_frames", "file_size", "content_digest", "split"})
_SUCCESS = "success"
# A caption file is read whole by json: a bigger one is surely not a caption file.
MAX_CAPTION_FILE_BYTES = 4 << 30
_BATCH_ROWS = 65536


def read(data: DataConfig) -> pd.DataFrame | pa.Table:
    """The input rows of a non-manifest ``data.format`` (without ``row_id``); for ``parquet`` an Arrow
    table, whose text clean decodes as it does a Parquet manifest's."""
    reader = {"webdataset": _webdataset, "parquet": _parquet, "coco": _coco, "karpathy": _karpathy}.get(data.format)
    if reader is None:
        raise InputError(f"data.format: {data.format!r} is not read by mmcore.ingest")
    return reader(data)


def columns(data: DataConfig) -> list[str]:
    """The columns ``read`` gives (the first file's schema for parquet), for checks before a run."""
    if data.format == "webdataset":
        side = Path(data.image_root) / Path(match(data)[0]).with_suffix(".parquet")
        extra = [_joined_name(n) for n in pq.read_schema(side).names if n != KEY] if side.is_file() else []
        return list(dict.fromkeys([*_WEBDATASET_COLUMNS, *extra]))
    if data.format == "parquet":
        files = match(data)
        schema = _parquet_schema(data, files[0])
        return [IMAGE, *(TEXT if n == data.text_column else n for n in schema.names if n != data.image_column)]
    if data.format == "coco":
        return [IMAGE, TEXT, GROUP, "image_id", "caption_id"]
    return [IMAGE, TEXT, GROUP, GIVEN_SPLIT, "image_id", "sentence_id"]


def input_key(data: DataConfig) -> str:
    """A cheap digest of the input files for cache keys and for telling inputs apart, unread where it
    can be: the manifest's or caption file's bytes (as for a manifest); for shards and Parquet files,
    what they are (relative path, size, mtime, inode: ``digests.files_fingerprint``), with the per-shard
    Parquet files. Never an absolute path."""
    if data.format in ("manifest", "coco", "karpathy"):
        return file_digest(data.manifest)
    files = match(data)
    if data.format == "webdataset":
        files += [str(Path(f).with_suffix(".parquet")) for f in files]
    return text_digest("ingest-files-1", data.format, files_fingerprint(data.image_root, files))


def input_digest(data: DataConfig, table: pd.DataFrame | None = None) -> str:
    """Clean's input digest: the manifest's bytes, or for the other forms the content of what ingest
    read (every column, so captions, member names and joined columns; no absolute path)."""
    if data.format == "manifest":
        return file_digest(data.manifest)
    if table is None:
        table = read(data)
    if isinstance(table, pa.Table):
        table = table.to_pandas()
    t = table.drop(columns=[tables.ROW_ID], errors="ignore")
    for c in t.columns:  # a joined list or struct column (img2dataset's save_additional_columns): hashed as JSON
        if t[c].dtype == object and t[c].map(lambda v: isinstance(v, (list, dict, np.ndarray))).any():
            t[c] = t[c].map(_json_cell)
    schema = ",".join(f"{c}:{t[c].dtype}" for c in t.columns)
    rows = pd.util.hash_pandas_object(t, index=False).to_numpy().tobytes() if len(t) else b""
    return text_digest("ingest-1", data.format, schema, rows)


def _json_cell(value: Any) -> Any:
    """A list, dict or array as JSON text (hashable); any other value as it is."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, (list, dict)) else value


# --------------------------------------------------------------------------- files under the root


def match(data: DataConfig) -> list[str]:
    """The files ``data.shards`` names under ``data.root`` (brace and glob patterns), relative and sorted.

    One that resolves outside the root (a symlink, ``..``) is a one-line error: it is never read.
    """
    root = os.path.realpath(data.image_root)
    pattern = str(data.shards)
    if os.path.isabs(pattern) or ".." in Path(pattern).parts:
        raise InputError(f"data.shards: pattern {pattern!r} must be relative to data.root and stay under it")
    found: set[str] = set()
    for p in braceexpand.braceexpand(pattern):
        for hit in glob.glob(os.path.join(glob.escape(root), p), recursive=True):
            if os.path.isfile(hit):
                found.add(os.path.relpath(hit, root))
    if not found:
        raise InputError(f"data.shards: no file matches {pattern!r} under data.root {data.image_root}")
    for rel in sorted(found):
        try:
            sources.FileSource(root).path(rel)
        except images.UnsafePath:
            raise InputError(f"data.shards: {rel} resolves outside data.root {data.image_root}; expected files "
                             "under it") from None
    return sorted(found, key=lambda r: tuple(Path(r).parts))


# --------------------------------------------------------------------------- webdataset


def _split_name(name: str) -> tuple[str | None, str]:
    """A member name's sample key and extension, as webdataset splits them (``dir/key.ext`` -> ``dir/key``, ``ext``)."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)  # webdataset.tariterators.base_plus_ext
    return (m.group(1), m.group(2).lower()) if m else (None, "")


def _shard_table(path: str) -> tuple[dict[str, dict[str, Any]], list[tuple[str, dict[str, Any], int]]] | None:
    """img2dataset's per-shard Parquet (``NNNNN.parquet`` beside ``NNNNN.tar``) by key, or None; with
    the listings of a key it lists again, all but the last (key, columns, row number): rows of their own.

    Read a row group at a time, so Arrow holds one, never the file; one larger than
    ``sources.MAX_ROW_GROUP_BYTES`` is refused by its size in the footer, unread, and so is a file of
    more rows than a shard may hold members (``sources.MAX_TAR_MEMBERS``): the rows kept by key are
    bounded by that count.
    """
    side = Path(path).with_suffix(".parquet")
    if not side.is_file():
        return None
    where = f"{side.name} beside {Path(path).name}"
    by_key: dict[str, dict[str, Any]] = {}
    row_of: dict[str, int] = {}
    repeats: list[tuple[str, dict[str, Any], int]] = []
    n = 0
    try:
        with pq.ParquetFile(side) as pf:
            names = pf.schema_arrow.names
            if KEY not in names:
                raise InputError(f"data.shards: {where} has no 'key' column; got {', '.join(map(repr, names[:10]))}")
            if pf.metadata.num_rows > sources.MAX_TAR_MEMBERS:
                raise InputError(f"data.shards: {where} lists {pf.metadata.num_rows} rows > {sources.MAX_TAR_MEMBERS}, "
                                 "more than a shard may hold members; expected img2dataset's per-shard Parquet")
            for g in range(pf.num_row_groups):
                nbytes = pf.metadata.row_group(g).total_byte_size
                if nbytes > sources.MAX_ROW_GROUP_BYTES:
                    raise InputError(f"data.shards: {where}: row group {g} holds {nbytes} bytes > "
                                     f"{sources.MAX_ROW_GROUP_BYTES}; expected img2dataset's per-shard Parquet in "
                                     "smaller row groups")
                for rec in pf.read_row_group(g).to_pylist():
                    key = str(rec.pop(KEY))
                    if key in by_key:
                        repeats.append((key, by_key[key], row_of[key]))
                    by_key[key], row_of[key] = {_joined_name(k): v for k, v in rec.items()}, n  # the last is joined
                    n += 1
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"data.shards: cannot read {side.name}: {str(e).strip().splitlines()[0]}") from None
    return by_key, repeats


def _joined_name(column: str) -> str:
    """A per-shard Parquet column's name on the row."""
    column = _RENAMED.get(column, column)
    return f"src_{column}" if column in _TAKEN else column


def _text(raw: bytes) -> tuple[str, str]:
    """A caption member's text and '' (or the U+FFFD reading and why, for invalid UTF-8)."""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), "invalid UTF-8 in the caption member"


def _webdataset(data: DataConfig) -> pd.DataFrame:
    root = os.path.realpath(data.image_root)
    rows: list[dict[str, Any]] = []
    for rel in match(data):
        rows += _shard_rows(data, root, rel)
    extra = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in (*_WEBDATASET_COLUMNS, REASON, DETAIL)]
    df = pd.DataFrame(rows, columns=[*_WEBDATASET_COLUMNS, *extra, REASON, DETAIL])
    for c in (IMAGE, TEXT, KEY, SHARD, REASON, DETAIL):
        df[c] = df[c].fillna("").astype("str")
    for c in ("url", "status", "error_message", "sha256", "caption"):
        df[c] = df[c].astype("object").where(df[c].notna(), None).astype("str")
    for c in ("src_width", "src_height"):
        df[c] = pd.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else int(v) for v in df[c]],
                         dtype="Int64")
    return df


def _shard_rows(data: DataConfig, root: str, rel: str) -> list[dict[str, Any]]:
    path = os.path.join(root, rel)
    try:
        index = sources.read_tar_index(path)
    except InputError as e:
        raise InputError(str(e).replace(sources._short(path), rel)) from None
    except OSError as e:
        raise InputError(f"data.shards: cannot read {rel}: {getattr(e, 'detail', None) or e}") from None
    side, repeats = _shard_table(path) or ({}, [])
    limit = data.max_member_bytes
    rows: list[dict[str, Any]] = []

    def row(ref: str, key: str, reason: str = "", detail: str = "", text: str = "", rec: dict | None = None) -> dict[str, Any]:
        return {IMAGE: ref, TEXT: text, KEY: key, SHARD: rel, REASON: reason, DETAIL: detail,
                **(side.get(key, {}) if rec is None else rec)}

    # Members by sample key and extension, in archive order. Tar extracts a repeated name's last copy (and
    # TarSource reads it); webdataset refuses a second member of a key and extension. Here the last is the
    # sample's, every earlier one that ingest would read (an image, the caption) a duplicate_member row.
    last = index.by_name()
    reads = IMAGE_EXTENSIONS | {"json" if data.caption_field is not None else "txt"}
    samples: dict[str, dict[str, sources.Member]] = {}
    for m in index.members:
        ref = f"{rel}{sources.SEP}{m.name}"
        key, ext = _split_name(m.name)
        if m.kind == "dir":
            continue
        if why := sources.unsafe_member(m.name):
            rows.append(row(ref, key or m.name, "unsafe_member_name", why))
        elif m.kind != "file":
            rows.append(row(ref, key or m.name, "special_member", f"member {m.name!r} is a {m.kind}"))
        elif key is not None:
            parts = samples.setdefault(key, {})  # a key's place: its first member
            if ext not in reads:
                continue
            if last[m.name] is not m:
                rows.append(row(ref, key, "duplicate_member", f"member {m.name!r} is repeated later in the shard "
                                                              f"(at byte {last[m.name].offset}); the last copy is read"))
                continue
            if (earlier := parts.get(ext)) is not None:
                rows.append(row(f"{rel}{sources.SEP}{earlier.name}", key, "duplicate_member",
                                f"member {earlier.name!r} has the key and extension of {m.name!r}, a later member; "
                                "the last is read"))
            parts[ext] = m
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        for key, parts in samples.items():
            rows += _sample_rows(data, rel, key, parts, index, fd, limit, row)
    finally:
        os.close(fd)
    # Keys the per-shard Parquet lists that the tar does not hold: failed downloads, or lost.
    for key, rec in side.items():
        if samples.get(key):  # a key of only members ingest does not read (.cls) has no image either
            continue
        ref = ""
        if rec.get("status") not in (None, _SUCCESS):
            rows.append(row(ref, key, "download_failed", str(rec.get("error_message") or rec.get("status")),
                            str(rec.get("caption") or "")))
        elif index.damage:
            rows.append(row(ref, key, "truncated_shard", f"not in the shard: {index.damage}", str(rec.get("caption") or "")))
        else:
            rows.append(row(ref, key, "missing_image", "listed as downloaded in the shard's Parquet, no image member",
                            str(rec.get("caption") or "")))
    side_name = Path(path).with_suffix(".parquet").name
    for key, rec, at in repeats:
        rows.append(row("", key, "duplicate_member", f"row {at} of {side_name} lists key {key!r}, which a later row lists "
                                                     "again; the last listing is joined", str(rec.get("caption") or ""), rec))
    return rows


def _sample_rows(data: DataConfig, rel: str, key: str, parts: dict[str, sources.Member], index: sources.TarIndex,
                 fd: int, limit: int, row) -> list[dict[str, Any]]:
    """The rows of one sample key: one per image member, or one for a caption without an image."""
    cut = {index.cut} if index.cut else set()

    def whole(m: sources.Member) -> bool:
        return m.name not in cut and m.offset + m.size <= index.size

    # The caption: .txt, or a field of .json. Read only within the member limit.
    text, cap_reason, cap_detail, sha = "", "", "", None
    cap = parts.get("json") if data.caption_field is not None else parts.get("txt")
    if cap is None:
        cap_reason = "missing_caption"
        cap_detail = (f"no {key}.json for data.caption_field {data.caption_field!r}" if data.caption_field
                      else f"no {key}.txt member")
    elif cap.size > limit:
        cap_reason, cap_detail = "member_too_large", f"caption member {cap.name!r}: {cap.size} bytes > {limit}"
    elif not whole(cap):
        cap_reason, cap_detail = "truncated_shard", f"caption member {cap.name!r} cut off: {index.damage}"
    else:
        text, bad = _text(os.pread(fd, cap.size, cap.offset))
        if data.caption_field is not None:
            try:
                doc = json.loads(text)
            except (ValueError, RecursionError) as e:  # "[[[[..." nests past the parser's recursion limit
                doc, bad = None, ""
                cap_reason, cap_detail = "missing_caption", f"{cap.name!r} is not JSON: {str(e)[:80]}"
            text = ""
            if isinstance(doc, dict):
                value = doc.get(data.caption_field)
                if value is None:
                    cap_reason, cap_detail = "missing_caption", f"no field {data.caption_field!r} in {cap.name!r}"
                else:
                    text = value if isinstance(value, str) else json.dumps(value)
                sha = doc.get("sha256") if isinstance(doc.get("sha256"), str) else None
            elif doc is not None:
                cap_reason, cap_detail = "missing_caption", f"{cap.name!r} is not a JSON object"
        if bad and not cap_reason:
            cap_reason, cap_detail = "invalid_encoding", bad
    imgs = [m for ext, m in parts.items() if ext in IMAGE_EXTENSIONS]
    if not imgs:
        if cap is None:  # neither image nor caption (say, only a .cls): not a sample
            return []
        reason = cap_reason if cap_reason in ("member_too_large", "truncated_shard") else "missing_image"
        return [row("", key, reason, cap_detail if reason != "missing_image" else f"caption {cap.name!r} has no image "
                                                                                  "member", text)]
    out = []
    for m in sorted(imgs, key=lambda m: m.offset):
        ref = f"{rel}{sources.SEP}{m.name}"
        if m.size > limit:
            r = row(ref, key, "member_too_large", f"{m.name!r}: {m.size} bytes > data.max_member_bytes {limit}", text)
        elif not whole(m):
            r = row(ref, key, "truncated_shard", f"{m.name!r} cut off: {index.damage}", text)
        else:
            r = row(ref, key, cap_reason, cap_detail, text)
        if sha is not None and r.get("sha256") is None:
            r["sha256"] = sha
        out.append(r)
    return out


# --------------------------------------------------------------------------- parquet with bytes


def _parquet_schema(data: DataConfig, rel: str) -> pa.Schema:
    path = Path(data.image_root) / rel
    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise InputError(f"data.shards: cannot read {rel} as Parquet: {str(e).strip().splitlines()[0]}") from None
    names = schema.names
    if data.image_column not in names:
        raise InputError(f"data.image_column: column {data.image_column!r} not in {rel}; got {', '.join(map(repr, names))}")
    t = schema.field(data.image_column).type
    binary = (pa.types.is_binary(t) or pa.types.is_large_binary(t))
    if pa.types.is_struct(t):
        binary = t.get_field_index("bytes") >= 0 and (pa.types.is_binary(t.field("bytes").type)
                                                      or pa.types.is_large_binary(t.field("bytes").type))
    if not binary:
        raise InputError(f"data.image_column: column {data.image_column!r} of {rel} is {t}; expected binary or a "
                         "struct with a binary 'bytes' field")
    if data.text_column not in names:
        raise InputError(f"data.text_column: column {data.text_column!r} not in {rel}; got {', '.join(map(repr, names))}")
    for taken in (IMAGE, TEXT):
        if taken in names and taken not in (data.image_column, data.text_column):
            raise InputError(f"data.shards: {rel} has a column {taken!r}, mmpipe's name for the image reference or "
                             "caption; rename it")
    return schema


def _parquet(data: DataConfig) -> pa.Table:
    """An Arrow table: clean decodes its text columns as it does a Parquet manifest's (invalid UTF-8 is
    a row's ``invalid_encoding``, never an error)."""
    parts = []
    for rel in match(data):
        schema = _parquet_schema(data, rel)
        other = [n for n in schema.names if n != data.image_column]
        pf = pq.ParquetFile(Path(data.image_root) / rel)
        n = pf.metadata.num_rows
        # Only the other columns, a batch at a time: the image bytes stay on disk.
        batches = list(pf.iter_batches(batch_size=_BATCH_ROWS, columns=other))
        want = pf.schema_arrow.remove(pf.schema_arrow.get_field_index(data.image_column))
        t = pa.Table.from_batches(batches, schema=want) if batches else want.empty_table()
        if other and t.num_rows != n:
            raise InputError(f"data.shards: {rel} gave {t.num_rows} of its {n} rows")
        t = t.rename_columns([TEXT if c == data.text_column else c for c in t.column_names])
        parts.append(t.add_column(0, IMAGE, pa.array([f"{rel}{sources.SEP}{i}" for i in range(t.num_rows)], pa.string())))
    try:
        return pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"data.shards: the Parquet files' columns do not agree: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------- COCO and Karpathy captions


def _caption_file(data: DataConfig) -> Any:
    path = Path(data.manifest)
    if not path.is_file():
        raise InputError(f"data.manifest: file not found: {path}")
    if path.stat().st_size > MAX_CAPTION_FILE_BYTES:
        raise InputError(f"data.manifest: {path} is {path.stat().st_size} bytes; a caption file is at most "
                         f"{MAX_CAPTION_FILE_BYTES}")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:
        raise InputError(f"data.manifest: cannot parse {path} as JSON: {str(e).splitlines()[0][:200]}") from None


def _shape_error(data: DataConfig, what: str) -> InputError:
    return InputError(f"data.manifest: {data.manifest} is not a {data.format} caption file: {what}")


def _coco(data: DataConfig) -> pd.DataFrame:
    doc = _caption_file(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(doc.get("annotations"), list):
        raise _shape_error(data, "expected an object with 'images' and 'annotations' lists")
    files = {}
    for im in doc["images"]:
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise _shape_error(data, f"an image entry without id and file_name: {str(im)[:80]}")
        files[im["id"]] = im["file_name"]
    recs = []
    for a in doc["annotations"]:
        if not isinstance(a, dict) or "image_id" not in a:
            raise _shape_error(data, f"an annotation without image_id: {str(a)[:80]}")
        cap = a.get("caption")
        recs.append((files.get(a["image_id"], ""), cap if isinstance(cap, str) else "", str(a["image_id"]),
                     str(a["image_id"]), str(a.get("id", ""))))
    return _caption_table(recs, ["image_id", "caption_id"])


def _karpathy(data: DataConfig) -> pd.DataFrame:
    doc = _caption_file(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise _shape_error(data, "expected an object with an 'images' list")
    recs, splits = [], []
    for im in doc["images"]:
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str) or not isinstance(im.get("sentences"), list):
            raise _shape_error(data, f"an image entry without filename and sentences: {str(im)[:80]}")
        split = {"restval": "train"}.get(im.get("split"), im.get("split"))
        if split not in ("train", "val", "test"):
            raise _shape_error(data, f"split {im.get('split')!r} of {im['filename']!r}; expected train, val, test or restval")
        path = "/".join(p for p in (im.get("filepath"), im["filename"]) if p)
        image_id = str(im.get("imgid", im.get("cocoid", im["filename"])))
        for s in im["sentences"]:
            raw = s.get("raw") if isinstance(s, dict) else None
            recs.append((path, raw if isinstance(raw, str) else "", image_id, image_id,
                         str(s.get("sentid", "")) if isinstance(s, dict) else ""))
            splits.append(split)
    df = _caption_table(recs, ["image_id", "sentence_id"])
    df.insert(3, GIVEN_SPLIT, pd.array(splits, dtype="str"))
    return df


def _caption_table(recs: list[tuple], extra: list[str]) -> pd.DataFrame:
    cols = [IMAGE, TEXT, GROUP, *extra]
    return pd.DataFrame({c: pd.array([r[i] for r in recs], dtype="str") for i, c in enumerate(cols)})
