"""Images decoded once into pre-resized JPEG shards, so epochs never re-decode full-size files.

``build`` writes ``part-NNNNN.parquet`` files (row_id, split, text, jpeg) of square images at the
training resolution (short side resized, centre crop: the eval preprocessing, so val scores
during training match evaluation) and ``meta.json`` keyed on the input rows and resolution; a
second call with the same key reuses them. Bytes are deterministic (fixed JPEG settings, order
by row_id).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmcore import parallel, tables
from mmcore.errors import row_detail
from mmcore.images import load_rgb, resolve_path
from mmcore.tables import IMAGE, ROW_ID, TEXT

META_FILE = "meta.json"
ROWS_PER_FILE = 8192
BATCH_SIZE = 128  # images per worker batch
JPEG_QUALITY = 92
SPLIT = "split"


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` (bicubic), then crop the centre square (the eval preprocessing)."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _key(table: pd.DataFrame, image_root: Path, image_size: int) -> str:
    cols = [ROW_ID, IMAGE, TEXT] + ([SPLIT] if SPLIT in table else [])
    t = table[cols].sort_values(ROW_ID)
    return tables.text_digest(
        str(image_size), str(JPEG_QUALITY), str(Path(image_root).resolve()),
        pd.util.hash_pandas_object(t, index=False).to_numpy().tobytes(),
    )


def _decode_batch(rows: list[tuple[int, str]], image_root: str, image_size: int) -> list[tuple[int, bytes | None, str]]:
    out = []
    for row_id, rel in rows:
        try:
            img = load_rgb(resolve_path(image_root, rel), max_side=None if image_size > 512 else 4 * image_size)
            buf = io.BytesIO()
            resize_center_crop(img, image_size).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
            out.append((row_id, buf.getvalue(), ""))
        except Exception as e:  # any decoder failure is a quarantined row, not a crash
            out.append((row_id, None, row_detail(e)))
    return out


def build(
    table: pd.DataFrame,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    image_size: int,
    workers: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Decode ``table``'s images into shards under ``out_dir``; returns ``meta`` (with ``failed``).

    ``meta['failed']`` maps row_id -> error for images that could not be decoded.
    """
    tables.require_columns(table, [ROW_ID, IMAGE, TEXT], "shards")
    out = Path(out_dir)
    key = _key(table, Path(image_root), image_size)
    meta_path = out / META_FILE
    if meta_path.is_file():
        meta = tables.read_json(meta_path)
        if meta.get("key") == key and all((out / f).is_file() for f in meta["files"]):
            return meta
    df = table.sort_values(ROW_ID, kind="stable").reset_index(drop=True)
    items = list(zip(df[ROW_ID].astype(int).tolist(), df[IMAGE].astype(str).tolist()))
    split = df[SPLIT].astype(str) if SPLIT in df else pd.Series("train", index=df.index)
    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # until the new meta is written, the folder holds no valid shards
    for old in out.glob("part-*.parquet"):
        old.unlink()
    files: list[str] = []
    failed: dict[str, str] = {}
    ready: list[tuple[int, bytes]] = []  # (position in df, jpeg) decoded, not yet written: under a file's worth

    def write(rows: list[tuple[int, bytes]]) -> None:
        at = [i for i, _ in rows]
        t = pa.table({
            ROW_ID: pa.array(df[ROW_ID].iloc[at].astype("int64").to_numpy()),
            SPLIT: pa.array(split.iloc[at].tolist(), pa.string()),
            TEXT: pa.array(df[TEXT].iloc[at].astype(str).tolist(), pa.string()),
            "jpeg": pa.array([b for _, b in rows], pa.binary()),
        })
        name = f"part-{len(files):05d}.parquet"
        tables.write_parquet(t, out / name)
        files.append(name)

    # Batches come back in row_id order and go to disk a file at a time: memory holds one file's
    # images and the batches in flight, however many rows there are.
    parts = parallel.imap_batches(
        _decode_batch, items, batch_size=BATCH_SIZE, workers=workers, desc="shards", progress=progress,
        args=(str(image_root), int(image_size)),
        # A full decode, resize and JPEG encode per row (~2 ms): a pool pays off from ~500 rows.
        min_rows_per_worker=500,
    )
    for i, (rid, b, err) in enumerate(r for part in parts for r in part):
        if b is None:
            failed[str(rid)] = err
            continue
        ready.append((i, b))
        if len(ready) == ROWS_PER_FILE:
            write(ready)
            ready = []
    if ready or not files:  # an empty build still writes one (empty) file
        write(ready)
    n_rows = len(df) - len(failed)
    meta = {"key": key, "image_size": int(image_size), "n_rows": n_rows, "files": files, "failed": failed}
    tables.write_json(meta, meta_path)
    return meta


def read(out_dir: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """The shard rows (row_id, split, text, jpeg), optionally one split only, in row_id order."""
    out = Path(out_dir)
    meta = tables.read_json(out / META_FILE)
    t = pa.concat_tables([pq.read_table(out / f) for f in meta["files"]])
    df = t.to_pandas()
    if split is not None:
        df = df[df[SPLIT] == split]
    return df.sort_values(ROW_ID, kind="stable").reset_index(drop=True)


def decode(jpeg: bytes) -> Image.Image:
    with Image.open(io.BytesIO(jpeg)) as im:
        return im.convert("RGB")


def mean_std(jpegs: list[bytes], max_images: int = 5000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale) over up to ``max_images`` evenly spaced images."""
    step = max(1, len(jpegs) // max_images)
    s = np.zeros(3)
    s2 = np.zeros(3)
    n = 0
    for b in jpegs[::step]:
        a = np.asarray(decode(b), dtype=np.float64).reshape(-1, 3) / 255.0
        s += a.sum(0)
        s2 += (a * a).sum(0)
        n += a.shape[0]
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean * mean, 1e-12))
    return [round(float(x), 6) for x in mean], [round(float(x), 6) for x in std]
