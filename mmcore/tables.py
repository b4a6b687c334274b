"""Schemas, column names, digests and atomic Parquet I/O: the artifact contract, defined once.

Every stage reads the previous stage's ``kept.parquet`` and writes, under ``RUN_DIR/<stage>/``:

- ``kept.parquet``: the rows it kept (all input columns plus the ones it adds),
- ``quarantine.parquet``: the rows it dropped, with ``stage``, ``reason`` (snake_case code) and
  ``detail`` (for humans),
- ``stats.json``: counters (``n_rows``, ``n_kept``, ``n_quarantined``, ``reasons``), seconds and
  the digests of its inputs and outputs.

``row_id`` (int64, the 0-based position in the input manifest) is carried by every stage; a
stage's kept and quarantined ``row_id`` sets are disjoint and their union is its input's.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmcore.digests import dir_digest, file_digest, files_fingerprint, json_digest, text_digest  # noqa: F401 (re-exported)
from mmcore.errors import AccountingError, InputError
from mmcore.layout import KEPT_FILE, QUARANTINE_FILE, STATS_FILE, StagePaths  # noqa: F401 (re-exported)

# Canonical column names. Clean maps the user's configured columns onto these, so every later
# stage reads one name whatever the manifest called it.
ROW_ID = "row_id"
IMAGE = "image_path"
TEXT = "text"
TEXT_RAW = "text_raw"
GROUP = "group"
TIME = "time"
LABEL = "label"
DOMAIN = "domain"
GIVEN_SPLIT = "given_split"  # a split the dataset provides (Karpathy's train/val/test); split.mode "given" keeps it
PSEUDO_LABEL = "pseudo_label"  # True on a pair whose caption a model chose (issue 20): train only, never val or test
PSEUDO_WEIGHT = "pseudo_weight"  # its loss weight in training (1.0 on every real pair)
# What the pseudo stage records of a pseudo-pair besides those two (NaN / "" on every other row).
PSEUDO_MARGIN = "pseudo_margin"  # teacher cosine of the top caption minus the runner-up's
PSEUDO_SIMILARITY = "pseudo_similarity"  # teacher cosine of the image and its pseudo caption
PSEUDO_ORIGINAL = "pseudo_original"  # the caption the row had ("" when it had none)
PSEUDO_TEACHER = "pseudo_teacher"  # content digest of the teacher's model folder

# Quarantine columns.
STAGE = "stage"
REASON = "reason"
DETAIL = "detail"
QUARANTINE_COLUMNS = (STAGE, REASON, DETAIL)

# Parquet is written with fixed options so that equal tables give equal bytes.
_PARQUET_OPTIONS = dict(compression="zstd", compression_level=3, write_statistics=True, use_dictionary=True)


@dataclass(frozen=True)
class StageResult:
    """What a stage's ``run`` returns: kept rows, quarantined rows (with reason, detail) and stats.

    ``stats`` holds stage-specific counters and figures (JSON-serialisable); the writer adds the
    common ones (rows in and out, count per reason, digests, seconds).
    """

    kept: pd.DataFrame
    quarantined: pd.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- atomic writes


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _commit(tmp: Path, path: Path) -> None:
    # fsync before rename: a crash leaves either the old file or the complete new one, never a
    # file that looks complete but is not.
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes(data: bytes, path: str | os.PathLike) -> str:
    """Write bytes atomically; returns their digest."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        tmp.write_bytes(data)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically, keys sorted, so equal objects give equal files."""
    write_bytes((json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode(), path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def string_array(text: pd.Series) -> pa.StringArray:
    """A text column as one Arrow string array (pandas may hold it in several chunks)."""
    arr = pa.array(text, type=pa.string())
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def to_arrow(df: pd.DataFrame | pa.Table) -> pa.Table:
    if isinstance(df, pa.Table):
        return df
    return pa.Table.from_pandas(df, preserve_index=False)


def write_parquet(df: pd.DataFrame | pa.Table, path: str | os.PathLike) -> str:
    """Write a table to Parquet atomically and deterministically; returns the file's digest."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        pq.write_table(to_arrow(df), tmp, **_PARQUET_OPTIONS)
        digest = file_digest(tmp)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def write_arrow(table: pa.Table, path: str | os.PathLike) -> None:
    """Write an Arrow IPC file (uncompressed, so readers can memory-map it) atomically."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a Parquet artifact into pandas; a missing or unreadable file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"artifact not found: {path}")
    try:
        return pq.read_table(path, columns=columns).to_pandas()
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"cannot read Parquet {path}: {str(e).splitlines()[0]}") from None


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"not found: {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON in {path}: {e}") from None


# --------------------------------------------------------------------------- quarantine helpers


def quarantine(rows: pd.DataFrame, reason: str | pd.Series, detail: str | pd.Series = "") -> pd.DataFrame:
    """Rows tagged with a reason code and a human detail (the stage column is added on write)."""
    out = rows.copy()
    out[REASON] = reason
    out[DETAIL] = detail
    out[REASON] = out[REASON].astype("str")
    out[DETAIL] = out[DETAIL].astype("str")
    return out


def empty_quarantine(like: pd.DataFrame) -> pd.DataFrame:
    return quarantine(like.iloc[:0], "", "")


def partition(df: pd.DataFrame, checks: Iterable[tuple[str, pd.Series, str | pd.Series]]) -> StageResult:
    """Apply boolean checks in order; each row is quarantined for the first check it fails.

    Args:
        checks: ``(reason, failed_mask, detail)``; ``detail`` is a string or a per-row Series.
    """
    remaining = pd.Series(True, index=df.index)
    parts = []
    counts: dict[str, int] = {}
    for reason, failed, detail in checks:
        hit = remaining & failed.reindex(df.index, fill_value=False).astype(bool)
        n = int(hit.sum())
        if n:
            d = detail[hit] if isinstance(detail, pd.Series) else detail
            parts.append(quarantine(df[hit], reason, d))
            counts[reason] = counts.get(reason, 0) + n
        remaining &= ~hit
    q = pd.concat(parts) if parts else empty_quarantine(df)
    return StageResult(kept=df[remaining], quarantined=q)


def concat_quarantine(*frames: pd.DataFrame) -> pd.DataFrame:
    frames = tuple(f for f in frames if len(f)) or frames[:1]
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- one row per image file


def distinct_paths(table: pd.DataFrame, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """The first row (lowest row_id) of each distinct image path: what gets measured (row_id,
    image_path and those of the ``extra`` columns ``table`` has)."""
    first = table.sort_values(ROW_ID, kind="stable").drop_duplicates(IMAGE)
    return first[[ROW_ID, IMAGE, *(c for c in extra if c in table)]].reset_index(drop=True)


def broadcast(table: pd.DataFrame, measurements: pd.DataFrame) -> pd.DataFrame:
    """Measurements of one row per distinct path, copied to every row of ``table`` with that path."""
    key = table.set_index(ROW_ID)[IMAGE]
    m = measurements.drop(columns=[ROW_ID]).set_index(key.reindex(measurements[ROW_ID]).to_numpy())
    return m.reindex(table[IMAGE].to_numpy()).set_axis(table.index)


# --------------------------------------------------------------------------- stage writing


def check_accounting(stage: str, input_ids: np.ndarray, kept: pd.DataFrame, quarantined: pd.DataFrame) -> None:
    """Raise if kept and quarantined row ids are not a partition of the input's."""
    k = kept[ROW_ID].to_numpy()
    q = quarantined[ROW_ID].to_numpy()
    both = np.intersect1d(k, q)
    if both.size:
        raise AccountingError(f"{stage}: {both.size} row_id(s) both kept and quarantined, e.g. {both[:5].tolist()}")
    out = np.concatenate([k, q])
    inp = np.asarray(input_ids)
    if out.size != inp.size or not np.array_equal(np.sort(out), np.sort(inp)):
        lost = np.setdiff1d(inp, out)
        extra = np.setdiff1d(out, inp)
        dup = out.size - np.unique(out).size
        raise AccountingError(
            f"{stage}: rows not accounted for: {lost.size} lost (e.g. {lost[:5].tolist()}), "
            f"{extra.size} unknown, {dup} duplicated; kept {k.size} + quarantined {q.size} != input {inp.size}"
        )


def _canonical(df: pd.DataFrame) -> pd.DataFrame:
    # Row order is part of the artifact: sort by row_id so equal content gives equal bytes.
    return df.sort_values(ROW_ID, kind="stable").reset_index(drop=True)


def write_stage(
    run_dir: str | os.PathLike,
    stage: str,
    result: StageResult,
    *,
    input_ids: np.ndarray,
    input_digest: str,
    seconds: float,
    config_digest: str = "",
    code_digest: str = "",
) -> dict[str, Any]:
    """Check the row accounting, then write kept, quarantine and stats atomically; returns stats."""
    check_accounting(stage, input_ids, result.kept, result.quarantined)
    paths = StagePaths.of(run_dir, stage)
    kept = _canonical(result.kept)
    q = result.quarantined.drop(columns=[c for c in QUARANTINE_COLUMNS if c in result.quarantined], errors="ignore")
    q.insert(len(q.columns), STAGE, stage)
    q[STAGE] = q[STAGE].astype("str")
    q[REASON] = result.quarantined[REASON].astype("str").to_numpy()
    q[DETAIL] = result.quarantined[DETAIL].astype("str").to_numpy()
    q = _canonical(q)
    reasons = {str(k): int(v) for k, v in q[REASON].value_counts().sort_index().items()}
    stats = {
        "stage": stage,
        "n_rows": int(len(input_ids)),
        "n_kept": int(len(kept)),
        "n_quarantined": int(len(q)),
        "reasons": reasons,
        "seconds": round(float(seconds), 3),
        "input_digest": input_digest,
        "config_digest": config_digest,
        "code_digest": code_digest,
        **result.stats,
    }
    paths.dir.mkdir(parents=True, exist_ok=True)
    stats["kept_digest"] = write_parquet(kept, paths.kept)
    stats["quarantine_digest"] = write_parquet(q, paths.quarantine)
    write_json(stats, paths.stats)
    return stats


def load(run_dir: str | os.PathLike, stage: str, quarantine: bool = False) -> pd.DataFrame:
    """A stage's kept table (or its quarantine) from a run folder, for notebooks and tests."""
    paths = StagePaths.of(run_dir, stage)
    return read_parquet(paths.quarantine if quarantine else paths.kept)


def require_columns(df: pd.DataFrame, columns: Iterable[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(
            f"{where}: missing column(s) {', '.join(map(repr, missing))}; got {', '.join(map(repr, df.columns))}"
        )
