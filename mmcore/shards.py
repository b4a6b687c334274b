"""Images decoded once into pre-resized JPEG shards, so epochs never re-decode full-size files.

``build`` writes ``<split>-NNNNN.arrow`` files (row_id, split, text, jpeg) of square images at the
training resolution (short side resized, centre crop: the eval preprocessing, so val scores
during training match evaluation) and ``meta.json`` keyed on the input rows and resolution; a
second call with the same key reuses them. Bytes are deterministic (fixed JPEG settings, order
by row_id).

The files are uncompressed Arrow IPC, not Parquet: ``read`` memory-maps them, so the JPEG bytes
stay in the page cache (shared by DataLoader workers and by every rank on a machine) instead of
being copied into each process. One split's rows are whole files, so reading a split copies nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from mmcore import parallel, sources, tables
from mmcore.errors import InputError, row_detail
from mmcore.layout import SHARDS_META
from mmcore.tables import IMAGE, ROW_ID, TEXT

META_FILE = SHARDS_META
FORMAT = "arrow-ipc-1"  # in the key: shards of an older layout are rebuilt, not misread
ROWS_PER_FILE = 8192
BATCH_SIZE = 128  # images per worker batch
JPEG_QUALITY = 92
SPLIT = "split"
_SCHEMA = pa.schema([(ROW_ID, pa.int64()), (SPLIT, pa.string()), (TEXT, pa.string()), ("jpeg", pa.binary())])


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` (bicubic), then crop the centre square (the eval preprocessing)."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _key(table: pd.DataFrame, source: sources.ImageSource, image_size: int) -> str:
    cols = [ROW_ID, IMAGE, TEXT] + ([SPLIT] if SPLIT in table else [])
    t = table[cols].sort_values(ROW_ID)
    return tables.text_digest(
        FORMAT, str(image_size), str(JPEG_QUALITY), source.key(),
        pd.util.hash_pandas_object(t, index=False).to_numpy().tobytes(),
    )


def _decode_batch(rows: list[tuple[int, str]], source: sources.ImageSource, image_size: int) -> list[tuple[int, bytes | None, str]]:
    out = []
    for row_id, rel in rows:
        try:
            img = sources.load_rgb(source, rel, max_side=None if image_size > 512 else 4 * image_size)
            buf = io.BytesIO()
            resize_center_crop(img, image_size).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
            out.append((row_id, buf.getvalue(), ""))
        except Exception as e:  # any decoder failure is a quarantined row, not a crash
            out.append((row_id, None, row_detail(e)))
    return out


def build(
    table: pd.DataFrame,
    image_root: sources.ImageSource | str | os.PathLike,
    out_dir: str | os.PathLike,
    image_size: int,
    workers: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Decode ``table``'s images into shards under ``out_dir``; returns ``meta`` (with ``failed``).

    ``meta['failed']`` maps row_id -> error for images that could not be decoded. ``image_root``: the
    image source (``sources.of(data)``), or a root folder of image files.
    """
    tables.require_columns(table, [ROW_ID, IMAGE, TEXT], "shards")
    out = Path(out_dir)
    source = sources.as_source(image_root)
    key = _key(table, source, image_size)
    meta_path = out / META_FILE
    if meta_path.is_file():
        meta = tables.read_json(meta_path)
        if meta.get("key") == key and all((out / f).is_file() for f in meta["files"]):
            return meta
    df = table.sort_values(ROW_ID, kind="stable").reset_index(drop=True)
    items = list(zip(df[ROW_ID].astype(int).tolist(), df[IMAGE].astype(str).tolist()))
    split = df[SPLIT].astype(str) if SPLIT in df else pd.Series("train", index=df.index)
    odd = sorted({str(v) for v in split.unique() if not (isinstance(v, str) and v.isidentifier())})
    if odd:  # split names become file names
        raise InputError(f"shards: split values must be simple names (train, val, test), got {odd[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # until the new meta is written, the folder holds no valid shards
    for old in [*out.glob("*.arrow"), *out.glob("part-*.parquet")]:
        old.unlink()
    parts: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    ready: dict[str, list[tuple[int, bytes]]] = {}  # per split: (position in df, jpeg) not yet written

    def write(name: str, rows: list[tuple[int, bytes]]) -> None:
        at = [i for i, _ in rows]
        t = pa.table({
            ROW_ID: pa.array(df[ROW_ID].iloc[at].astype("int64").to_numpy()),
            SPLIT: pa.array(split.iloc[at].tolist(), pa.string()),
            TEXT: pa.array(df[TEXT].iloc[at].astype(str).tolist(), pa.string()),
            "jpeg": pa.array([b for _, b in rows], pa.binary()),
        }, schema=_SCHEMA)
        files = parts.setdefault(name, [])
        files.append(f"{name}-{len(files):05d}.arrow")
        tables.write_arrow(t, out / files[-1])

    # Batches come back in row_id order and go to disk a file at a time: memory holds at most a
    # file's images per split and the batches in flight, however many rows there are.
    results = parallel.imap_batches(
        _decode_batch, items, batch_size=BATCH_SIZE, workers=workers, desc="shards", progress=progress,
        args=(source, int(image_size)),
        # A full decode, resize and JPEG encode per row (~2 ms): a pool pays off from ~500 rows.
        min_rows_per_worker=500,
    )
    with contextlib.closing(results):  # a failed write stops the pool now, not when the traceback is freed
        for i, (rid, b, err) in enumerate(r for batch in results for r in batch):
            if b is None:
                failed[str(rid)] = err
                continue
            name = split.iloc[i]
            ready.setdefault(name, []).append((i, b))
            if len(ready[name]) == ROWS_PER_FILE:
                write(name, ready.pop(name))
    for name, rows in sorted(ready.items()):
        write(name, rows)
    files = [f for name in sorted(parts) for f in parts[name]]
    meta = {"key": key, "image_size": int(image_size), "n_rows": len(df) - len(failed), "files": files,
            "parts": {name: parts[name] for name in sorted(parts)}, "failed": failed}
    tables.write_json(meta, meta_path)
    return meta


def read(out_dir: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """The shard rows (row_id, split, text, jpeg) in row_id order, one split or all.

    The files are memory-mapped and the ``jpeg`` column stays Arrow-backed (``pd.ArrowDtype``):
    ``df["jpeg"].array[i]`` reads one image's bytes from the mapping. One split is read without a
    copy; all splits are sorted by row_id, which copies.
    """
    out = Path(out_dir)
    meta = tables.read_json(out / META_FILE)
    names = meta["files"] if split is None else meta.get("parts", {}).get(split, [])
    t = pa.concat_tables([pa.ipc.open_file(pa.memory_map(str(out / n))).read_all() for n in names]) if names else _SCHEMA.empty_table()
    df = t.to_pandas(types_mapper={pa.binary(): pd.ArrowDtype(pa.binary())}.get)
    if not df[ROW_ID].is_monotonic_increasing:
        df = df.sort_values(ROW_ID, kind="stable").reset_index(drop=True)
    return df


def decode(jpeg: bytes) -> Image.Image:
    with Image.open(io.BytesIO(jpeg)) as im:
        return im.convert("RGB")


def mean_std(jpegs: Sequence[bytes], max_images: int = 5000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale) over up to ``max_images`` evenly spaced images
    (``jpegs`` indexed by position: a list, or a shard column's ``.array``)."""
    step = max(1, len(jpegs) // max_images)
    s = np.zeros(3)
    s2 = np.zeros(3)
    n = 0
    for i in range(0, len(jpegs), step):
        a = np.asarray(decode(jpegs[i]), dtype=np.float64).reshape(-1, 3) / 255.0
        s += a.sum(0)
        s2 += (a * a).sum(0)
        n += a.shape[0]
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean * mean, 1e-12))
    return [round(float(x), 6) for x in mean], [round(float(x), 6) for x in std]
