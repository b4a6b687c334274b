"""Probe: open each image safely through its source, read its header and check the file is whole.

Each distinct path is read once, in bounded chunks: its bytes are hashed (``content_digest``, unless
``digest=False``) and the header is parsed with only the accepted formats' parsers
(``images.open_image``), so no pixels are decoded. A file over ``max_file_bytes`` is refused by
its size before any byte is read. With ``verify="structure"`` (the default) a file
counts as whole when its format's end marker is present (JPEG EOI after the last scan, PNG IEND,
GIF trailer, WebP RIFF length); other formats, and every file with ``verify="decode"``, are
decoded (JPEG at 1/8 scale). The quality stage decodes every kept image anyway and quarantines
any that still fail as ``corrupt_image``.

``measure`` is a pure per-batch function (picklable, never raises on a bad file) and ``decide``
turns measurements into kept and quarantined rows, so a Dask or process pool can run ``measure``.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Literal

import numpy as np
import pandas as pd
from PIL import UnidentifiedImageError
from pydantic import Field, field_validator

from mmcore import faults, images, parallel, sources, tables
from mmcore.base import StageContext, StrictModel
from mmcore.errors import row_detail
from mmcore.tables import IMAGE, ROW_ID, StageResult, broadcast, distinct_paths

STAGE = "probe"

# Reason codes, in the order they are tested (a row gets the first it fails).
REASONS = {
    "outside_root": "the path resolves outside the dataset root (../ traversal, absolute path, escaping symlink)",
    "missing_file": "no file at the path",
    "permission_denied": faults.REASONS["permission_denied"],
    "read_error": faults.REASONS["read_error"],
    "file_too_large": images.REASONS["file_too_large"],
    "empty_file": "the file has zero bytes",
    "not_an_image": "Pillow does not recognise the bytes as an image",
    "too_many_pixels": images.REASONS["too_many_pixels"],
    "unsupported_format": images.REASONS["unsupported_format"],
    "corrupt_image": "truncated or corrupt: the header or the data does not decode, or the end marker is missing",
}

# Columns probe adds, in order: what it measures per file, then the strata buckets made from them.
MEASURED = ("width", "height", "orientation", "format", "mode", "n_frames", "file_size", "content_digest")
COLUMNS = (*MEASURED, "res_bucket", "aspect_bucket")
_INT_COLUMNS = ("width", "height", "orientation", "n_frames", "file_size")
_STR_COLUMNS = ("format", "mode", "content_digest")
ERROR, DETAIL = "probe_error", "probe_detail"
SHA256 = "sha256"  # a digest the dataset provides (img2dataset), used with data.trust_sha256
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ProbeConfig(StrictModel):
    """Probe settings; a decompression-bomb limit, accepted formats and the strata buckets."""

    max_pixels: int = Field(
        images.DEFAULT_MAX_PIXELS, ge=1, description="Images declaring more pixels are too_many_pixels (Pillow's own limit)."
    )
    max_file_bytes: int = Field(
        images.DEFAULT_MAX_BYTES, ge=1, description="Larger files are file_too_large, refused before reading."
    )
    formats: tuple[str, ...] = Field(
        images.DEFAULT_FORMATS,
        min_length=1,
        description="Pillow format names accepted; others are unsupported_format (never decoded: probe, quality and the report keep to them).",
    )
    verify: Literal["structure", "decode"] = Field(
        "structure", description="structure: end markers, no decoding; decode: also a reduced-size decode."
    )
    res_bucket_edges: tuple[int, ...] = Field(
        (256, 512, 1024), min_length=1, description="Short-side edges (px) of res_bucket."
    )
    aspect_bucket_edges: tuple[float, float, float] = Field(
        (0.8, 1.25, 2.0), description="width/height edges between portrait, square, landscape and wide."
    )
    digest: bool = Field(
        True, description="Hash every file (sha256) into content_digest; off = header-only probe, digest ''."
    )
    batch_size: int = Field(256, ge=1, description="Files per batch sent to a worker process.")

    @field_validator("formats")
    @classmethod
    def _upper(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(f.upper() for f in v)

    @field_validator("res_bucket_edges", "aspect_bucket_edges")
    @classmethod
    def _increasing(cls, v: tuple) -> tuple:
        if any(b <= a for a, b in zip(v, v[1:])) or v[0] <= 0:
            raise ValueError(f"bucket edges must be positive and increasing, got {list(v)}")
        return v


# --------------------------------------------------------------------------- per file


_TAIL = 4096
_CHUNK = 1 << 20


def _jpeg_whole(f) -> bool:
    """Whether an EOI marker follows the last SOS, scanning the file in chunks (never all of it)."""
    # Junk after EOI is allowed. 0xFFD9 (EOI) cannot occur inside entropy-coded data (0xFF is
    # always stuffed), so a file cut inside its last scan has no EOI after its last SOS.
    f.seek(0)
    carry, sos_seen, eoi_after = b"", False, False
    while block := f.read(_CHUNK):
        data = carry + block
        sos = data.rfind(b"\xff\xda")
        if sos != -1:
            sos_seen, eoi_after = True, data.find(b"\xff\xd9", sos + 2) != -1
        elif sos_seen and not eoi_after:
            eoi_after = data.find(b"\xff\xd9") != -1
        carry = data[-1:]
    return sos_seen and eoi_after


def _is_whole(head: bytes, tail: bytes, size: int, fmt: str, f, info: dict) -> bool | None:
    """Whether the format's end marker is present; None when the format has no cheap test.

    ``head``/``tail`` are the file's first and last bytes; ``f`` the open file (only scanned for a
    JPEG that does not end with EOI).
    """
    if fmt in ("JPEG", "MPO"):
        return tail.endswith(b"\xff\xd9") or _jpeg_whole(f)
    if fmt == "PNG":
        return b"IEND" in tail  # tolerates a little junk after IEND
    if fmt == "GIF":
        return tail.rstrip(b"\x00").endswith(b";")
    if fmt == "WEBP":
        return len(head) >= 12 and int.from_bytes(head[4:8], "little") + 8 <= size
    if fmt == "BMP" and info.get("compression") in (1, 2):
        # RLE: an end-of-bitmap escape (00 01) ends the data; without it Pillow's Python decoder
        # would pad a huge canvas from a tiny file, for seconds of CPU.
        return tail.rstrip(b"\x00").endswith(b"\x01") and b"\x00\x01" in tail[-4:]
    return None


def _decodes(fp, policy: images.DecodePolicy) -> str:
    """'' if the image decodes (JPEG at 1/8 scale), else the error."""
    try:
        fp.seek(0)
        with images.open_image(fp, policy) as im:
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
        return ""
    except MemoryError:
        raise
    except Exception as e:  # any decoder failure means the file is unusable
        return row_detail(e)


def _probe_one(source: sources.ImageSource, ref: str, cfg: ProbeConfig, trusted: str | None = None) -> dict:
    out: dict = {ERROR: "", DETAIL: ""}

    def fail(code: str, detail: str) -> dict:
        out[ERROR], out[DETAIL] = code, detail
        return out

    # The root check comes first (in the source): nothing outside the root is ever opened, not even
    # to stat it; a source retries transient I/O errors, and a folder or FIFO is a read_error at once.
    try:
        f, size = source.open(ref)
    except images.UnsafePath as e:
        return fail("outside_root", str(e))
    except faults.ReadError as e:
        return fail(e.reason, f"{ref!r}: {e.detail}")
    except ValueError as e:  # e.g. an embedded NUL byte
        return fail("missing_file", f"invalid path {ref!r}: {e}")
    with f:
        try:
            return _probe_open(f, size, out, fail, cfg, trusted)
        except MemoryError:  # one file's decode must not end the run
            return fail("file_too_large", "out of memory while checking the file")
        except images.RefusedImage as e:
            return fail(e.reason, e.detail)
        except OSError as e:  # a read error half-way (I/O error, file shrank)
            return fail("read_error", row_detail(e, f"cannot read {ref!r}: "))


def _policy(cfg: ProbeConfig) -> images.DecodePolicy:
    return images.DecodePolicy(formats=cfg.formats, max_pixels=cfg.max_pixels, max_bytes=cfg.max_file_bytes)


def _probe_open(f, size: int, out: dict, fail, cfg: ProbeConfig, trusted: str | None = None) -> dict:
    out["file_size"] = size
    if size > cfg.max_file_bytes:  # by its size alone: a sparse 8 GB file is never read
        return fail("file_too_large", f"{size} bytes > max_file_bytes {cfg.max_file_bytes}")
    if cfg.digest and trusted:  # data.trust_sha256: the dataset's own sha256 of these bytes, not re-hashed
        out["content_digest"] = trusted
    elif cfg.digest:  # hashed in chunks: memory stays at one chunk whatever the file's size
        h, n = hashlib.sha256(), 0
        while block := f.read(_CHUNK):
            h.update(block)
            n += len(block)
            if n > cfg.max_file_bytes:  # grew since the stat
                return fail("file_too_large", f"more than max_file_bytes {cfg.max_file_bytes} bytes")
        out["file_size"] = size = n
        out["content_digest"] = "sha256:" + h.hexdigest()
    if size == 0:
        return fail("empty_file", "zero bytes")
    f.seek(0)
    head = f.read(images.HEADER_BYTES)
    policy = _policy(cfg)
    try:
        im = images.open_image(io.BytesIO(head) if size <= len(head) else f, policy)  # header only
    except images.RefusedImage as e:
        return fail(e.reason, e.detail)
    except UnidentifiedImageError:
        # The file's bytes are never echoed: a data.root of / must not copy any file into the details.
        return fail("not_an_image", "unrecognised bytes")
    except Exception as e:  # a recognised format whose header is broken
        return fail("corrupt_image", row_detail(e, "header: "))
    with im:
        try:
            orientation = images.orientation(im)
            w, h = im.size[::-1] if orientation >= 5 else im.size  # as displayed
            fmt, mode = str(im.format or ""), im.mode
            out.update(width=w, height=h, orientation=orientation, format=fmt, mode=mode)
            out["n_frames"] = images.frame_count(im)
            info = dict(im.info)
        except Exception as e:
            return fail("corrupt_image", row_detail(e, "header: "))
    whole = None
    if cfg.verify == "structure":
        f.seek(max(0, size - _TAIL))
        tail = f.read()
        whole = _is_whole(head[:16], tail, size, fmt, f, info)
        if whole is False:
            return fail("corrupt_image", f"truncated: {fmt} end marker missing ({size} bytes)")
    if whole is None and (err := _decodes(f, policy)):
        return fail("corrupt_image", err)
    return out


def _trusted(value) -> str | None:
    """``sha256:<hex>`` of a provided sha256 (img2dataset's hex digest), or None if it is not one."""
    v = str(value or "").strip().lower().removeprefix("sha256:")
    return "sha256:" + v if _SHA256.fullmatch(v) else None


def measure(rows: pd.DataFrame, cfg: ProbeConfig, source: sources.ImageSource | str, trust_sha256: bool = False) -> pd.DataFrame:
    """Probe the images of ``rows`` (columns row_id, image_path; ``sha256`` taken as the content digest
    with ``trust_sha256``); one row of measurements each. ``source``: an image source or a root folder.

    Never raises on a bad file: ``probe_error`` holds a reason code ('' when the file is fine).
    """
    source = sources.as_source(source)
    given = rows[SHA256].tolist() if trust_sha256 and SHA256 in rows else [None] * len(rows)
    # Headers only: Pillow's own bomb check is off, the header size is compared to max_pixels.
    with images.pixel_limit(None):
        recs = [_probe_one(source, ref, cfg, _trusted(sha)) for ref, sha in zip(rows[IMAGE].tolist(), given)]
    cols: dict = {ROW_ID: rows[ROW_ID].to_numpy(np.int64)}
    for c in _INT_COLUMNS:  # nullable: a file that failed early has no size
        v = [r.get(c) for r in recs]
        cols[c] = pd.arrays.IntegerArray(np.array([0 if x is None else x for x in v], dtype=np.int64),
                                         np.array([x is None for x in v], dtype=bool))
    for c in (*_STR_COLUMNS, ERROR, DETAIL):
        cols[c] = pd.array([r.get(c, "") for r in recs], dtype="str")
    return pd.DataFrame(cols)


# --------------------------------------------------------------------------- buckets


def res_bucket(short_side: pd.Series, edges: tuple[int, ...]) -> pd.Series:
    """'<256', '256-512', '512-1024', '>=1024' for edges (256, 512, 1024)."""
    labels = [f"<{edges[0]}", *(f"{a}-{b}" for a, b in zip(edges, edges[1:])), f">={edges[-1]}"]
    idx = np.searchsorted(np.asarray(edges), short_side.to_numpy(np.float64), side="right")
    return pd.Series(np.asarray(labels, dtype=object)[idx], index=short_side.index, dtype="str")


def aspect_bucket(aspect: pd.Series, edges: tuple[float, float, float]) -> pd.Series:
    """portrait (w/h < edges[0]), square, landscape, wide (w/h > edges[2])."""
    labels = np.asarray(["portrait", "square", "landscape", "wide"], dtype=object)
    a = aspect.to_numpy(np.float64)
    idx = (a >= edges[0]).astype(int) + (a > edges[1]) + (a > edges[2])
    return pd.Series(labels[idx], index=aspect.index, dtype="str")


# --------------------------------------------------------------------------- stage


def decide(table: pd.DataFrame, measurements: pd.DataFrame, cfg: ProbeConfig) -> StageResult:
    """Add the probe columns to ``table`` and quarantine rows whose file failed a check."""
    m = broadcast(table, measurements)
    df = table.copy()
    for c in MEASURED:
        df[c] = m[c]
    short = np.minimum(df["width"].astype("Float64"), df["height"].astype("Float64")).fillna(0)
    df["res_bucket"] = res_bucket(short, cfg.res_bucket_edges).where(df["width"].notna(), "")
    aspect = (df["width"].astype("Float64") / df["height"].astype("Float64")).fillna(1.0)
    df["aspect_bucket"] = aspect_bucket(aspect, cfg.aspect_bucket_edges).where(df["width"].notna(), "")
    err = m[ERROR].fillna("missing_file")
    checks = [(code, err == code, m[DETAIL]) for code in REASONS]
    res = tables.partition(df, checks)
    kept = res.kept.copy()
    for c in _INT_COLUMNS:
        kept[c] = kept[c].astype(np.int64)
    fmt_counts = {str(k): int(v) for k, v in kept["format"].value_counts().sort_index().items()}
    stats = {
        "n_files": int(len(measurements)),
        "formats": fmt_counts,
        "res_buckets": {str(k): int(v) for k, v in kept["res_bucket"].value_counts().sort_index().items()},
        "aspect_buckets": {str(k): int(v) for k, v in kept["aspect_bucket"].value_counts().sort_index().items()},
        "bytes": int(kept.drop_duplicates(IMAGE)["file_size"].sum()),
    }
    return StageResult(kept, res.quarantined, stats)


def run(table: pd.DataFrame, cfg: ProbeConfig, ctx: StageContext) -> StageResult:
    """Probe every distinct image path of ``table`` in worker processes, then ``decide``."""
    tables.require_columns(table, [ROW_ID, IMAGE], STAGE)
    trust = bool(ctx.data.trust_sha256) and SHA256 in table
    todo = distinct_paths(table, extra=(SHA256,) if trust else ())
    source = sources.of(ctx.data)
    parts = parallel.map_batches(
        measure, todo, batch_size=cfg.batch_size, workers=ctx.workers, desc=STAGE, progress=ctx.progress,
        args=(cfg, source, trust),
        # A header read alone takes ~0.05 ms: a pool's ~1 s start pays off from ~10,000 files. With
        # the digest the whole file is read and hashed (2-3 ms for a 4 MB photo): the usual threshold.
        min_rows_per_worker=parallel.MIN_ROWS_PER_WORKER * (1 if cfg.digest else 10),
    )
    measurements = pd.concat(parts, ignore_index=True) if parts else measure(todo, cfg, source, trust)
    return decide(table, measurements, cfg)
