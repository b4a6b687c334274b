"""Split: assign every kept row to train, val or test so that test measures generalization.

Rows are joined into groups (same image bytes, same near-duplicate cluster, same mirrored or
semantic cluster from decontam, same user group and, optionally, same normalised caption) with one
vectorised connected-components pass, and groups are placed whole. Stratified mode walks the strata and fills each with its groups (shuffled by
seed) up to the target ratios, carrying any rounding error over to the next stratum, so both the
global ratios and each stratum's proportions land close to the targets. Time mode orders groups
by their newest row. Given mode keeps the split the dataset provides (``given_split``). A leakage
check runs always and fails loudly (for a given split it reports, as the split is not ours to fix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from mmcore import ingest, tables
from mmcore.base import StageContext, StrictModel
from mmcore.errors import InputError, LeakageError
from mmcore.tables import DOMAIN, GIVEN_SPLIT, GROUP, LABEL, ROW_ID, TEXT, TIME, StageResult

STAGE = "split"

REASONS = {
    "missing_time": "split.mode is time and the row's time is null or not a timestamp",
    "held_out_test": "the row, its group, its image bytes or a near-duplicate image (pHash) is in split.fixed_test",
    "unknown_given_split": "split.mode is given and the row's provided split is missing or not one of split.given_values",
}

SPLITS = ("train", "val", "test")
# Columns the stage adds.
SPLIT = "split"
SPLIT_GROUP = "split_group"
STRATUM = "stratum"
SAMPLE_WEIGHT = "sample_weight"
# Columns written by probe and quality.
CONTENT_DIGEST = "content_digest"
DUP_CLUSTER = "dup_cluster"
PHASH = "phash"
# Columns written by decontam: images linked by mirrored pHash and by embedding cosine (-1: none).
MIRROR_CLUSTER = "mirror_cluster"
SEMANTIC_CLUSTER = "semantic_cluster"
# Every column whose shared value puts rows in one group (and must never straddle splits).
GROUP_KEYS = (CONTENT_DIGEST, DUP_CLUSTER, MIRROR_CLUSTER, SEMANTIC_CLUSTER, GROUP)
_CLUSTERS = (DUP_CLUSTER, MIRROR_CLUSTER, SEMANTIC_CLUSTER)  # integer ids; negative = no cluster
# The fixed test set file (split.fixed_test): the test rows of one split, by every key that could
# leak them (split_group is kept for the record; its ids mean nothing in another split).
MANIFEST_DIGEST = "manifest_digest"  # row_ids match only within the manifest they number
HELD_OUT_COLUMNS = (ROW_ID, GROUP, SPLIT_GROUP, CONTENT_DIGEST, PHASH, MANIFEST_DIGEST)
RES_BUCKET = "res_bucket"
ASPECT_BUCKET = "aspect_bucket"

# Stratum name -> the column it reads (caption_length is derived from the text).
STRATA = {
    "caption_length": TEXT, "res_bucket": RES_BUCKET, "aspect_bucket": ASPECT_BUCKET, "label": LABEL, "domain": DOMAIN,
}
# Keys that must never be shared between splits (checked after every assignment).
LEAK_KEYS = (*GROUP_KEYS, SPLIT_GROUP)
OTHER = "other"  # the stratum rare strata are merged into
NA = "na"  # how a null label, domain or bucket reads in a stratum name
_TOP = 20  # categories listed per split in stats; the rest are summed as "(rest)"
# A group of fewer rows never fails a split for its size: so few rows cannot meet ratios anyway.
_COLLAPSE_ROWS = 10


class SplitConfig(StrictModel):
    """Ratios, strata, grouping and weighting of the split; seeded by the run's seed."""

    ratios: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.6, "val": 0.2, "test": 0.2},
        description="Share of rows per split (train, val, test; a missing one is 0); must sum to 1.",
    )
    mode: Literal["stratified", "time", "given"] = Field(
        "stratified", description="stratified: by strata, groups whole; time: train oldest, test newest; "
        "given: the dataset's own split column (given_split, e.g. Karpathy's), leakage reported, not fixed.",
    )
    given_values: dict[str, str] = Field(
        default_factory=lambda: {"train": "train", "restval": "train", "val": "val", "test": "test"},
        description="mode given: provided value -> train, val or test; any other value is unknown_given_split.",
    )
    strata: list[str] = Field(
        default_factory=lambda: ["caption_length", "res_bucket"],
        description=f"Columns crossed into strata; any of {', '.join(STRATA)}.",
    )
    caption_bins: list[int] = Field(
        default_factory=lambda: [50, 100, 200], description="Caption length bin edges in characters."
    )
    min_stratum_size: int = Field(10, ge=1, description="Strata with fewer rows are merged into 'other'.")
    holdout_domains: list[str] = Field(default_factory=list, description="Every row of these domains goes to test.")
    group_by_caption: bool = Field(False, description="Also keep rows with equal normalised captions together.")
    weight_by: Literal["stratum", "label"] = Field("stratum", description="Frequency that sample_weight inverts.")
    weight_exponent: float = Field(0.5, ge=0, description="sample_weight = frequency ** -exponent; 0 = uniform.")
    ratio_tolerance: float = Field(0.02, ge=0, le=1, description="Warn when a split's share is further off.")
    fixed_test: Path | None = Field(
        None, description="A fixed test set (held_out_test.parquet, written by mmpipe ablate): rows matching it are "
        "quarantined as held_out_test, whole groups; the rest go to train and val in their ratio."
    )
    fixed_test_radius: int = Field(
        4, ge=0, le=16, description="pHash Hamming distance within which an image counts as a held-out test image."
    )
    max_ratio_deviation: float = Field(
        0.25, ge=0, le=1,
        description="Fail when a split's share is further off because one group is too large (a collapsed split).",
    )
    allow_imbalance: bool = Field(False, description="Accept a split further off than max_ratio_deviation (warn only).")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(SPLITS))
        if unknown:
            raise ValueError(f"split.ratios has unknown split(s) {', '.join(unknown)}; expected train, val, test")
        if any(not np.isfinite(r) or r < 0 for r in v.values()):
            raise ValueError(f"split.ratios must be non-negative, got {v}")
        if abs(sum(v.values()) - 1) > 1e-6:
            raise ValueError(f"split.ratios must sum to 1, got {sum(v.values()):.6g} ({v})")
        return {s: float(v.get(s, 0.0)) for s in SPLITS}

    @field_validator("given_values")
    @classmethod
    def _given(cls, v: dict[str, str]) -> dict[str, str]:
        bad = {k: t for k, t in v.items() if t not in SPLITS}
        if bad:
            raise ValueError(f"split.given_values must map to train, val or test, got {bad}")
        return v

    @model_validator(mode="after")
    def _given_alone(self) -> SplitConfig:
        if self.mode == "given" and (self.fixed_test is not None or self.holdout_domains):
            raise ValueError("split.mode given keeps the dataset's split: fixed_test and holdout_domains cannot move rows")
        return self

    @field_validator("strata")
    @classmethod
    def _strata(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in STRATA]
        if bad:
            raise ValueError(f"split.strata: unknown stratum {bad[0]!r}; expected any of {', '.join(STRATA)}")
        if len(set(v)) != len(v):
            raise ValueError(f"split.strata lists a stratum twice: {v}")
        return v

    @field_validator("caption_bins")
    @classmethod
    def _bins(cls, v: list[int]) -> list[int]:
        if any(b <= 0 for b in v) or any(a >= b for a, b in zip(v, v[1:])):
            raise ValueError(f"split.caption_bins must be positive and strictly increasing, got {v}")
        return v


# --------------------------------------------------------------------------- keys and groups


def _key_codes(s: pd.Series, col: str) -> np.ndarray:
    """Integer code per row for a grouping key; -1 where the row has no key (null, blank, or cluster < 0)."""
    if col in _CLUSTERS and pd.api.types.is_numeric_dtype(s):
        # Quality may mark "no cluster" with a negative id: such rows join nothing.
        s = s.where((s >= 0).fillna(False).astype(bool))
    elif not pd.api.types.is_numeric_dtype(s):
        # An empty digest (probe.digest: false) or a blank group cell is "no key": as one key they
        # would join every such row into one giant group.
        s = s.where(s.astype("str").str.strip().fillna("") != "")
    return pd.factorize(s, use_na_sentinel=True)[0].astype(np.int64)


def caption_key(text: pd.Series) -> pd.Series:
    """Caption normalised for overlap checks: lower case, punctuation and spacing dropped."""
    arr = pc.utf8_lower(tables.string_array(text))
    arr = pc.utf8_trim_whitespace(pc.replace_substring_regex(arr, r"[^\p{L}\p{N}]+", " "))
    return pd.Series(arr.to_pandas(), index=text.index, dtype="str")


def _caption_codes(text: pd.Series) -> np.ndarray:
    """Code per row of its normalised caption (distinct captions normalised once: they repeat); -1 (no
    key) for an empty one (clean's ``keep_uncaptioned`` rows have ""), so that uncaptioned rows are not
    all one group: each is grouped by its other keys only."""
    enc = pc.dictionary_encode(tables.string_array(text))
    norm = caption_key(pd.Series(enc.dictionary.to_pandas(), dtype="str"))
    codes = pd.factorize(norm)[0].astype(np.int64)
    codes[(norm == "").to_numpy(bool)] = -1
    # A trailing -1 so that null captions (index -1) get no key.
    remap = np.append(codes, -1)
    return remap[enc.indices.fill_null(-1).to_numpy(zero_copy_only=False)]


def connected_groups(codes: list[np.ndarray]) -> np.ndarray:
    """Union-find over rows: rows sharing any key share a group; ids numbered by first row."""
    n = len(codes[0]) if codes else 0
    rows, cols, offset = [], [], n
    for c in codes:
        has = c >= 0
        rows.append(np.flatnonzero(has))
        cols.append(c[has] + offset)
        offset += int(c.max()) + 1 if c.size else 0
    if not rows or not sum(r.size for r in rows):
        return np.arange(n, dtype=np.int64)
    r, c = np.concatenate(rows), np.concatenate(cols)
    # Bipartite graph row -> key node; its components are the groups.
    graph = coo_matrix((np.ones(r.size, np.int8), (r, c)), shape=(offset, offset)).tocsr()
    _, labels = connected_components(graph, directed=False)
    labels = labels[:n]
    # Renumber by first row so ids do not depend on scipy's traversal order.
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse]


# --------------------------------------------------------------------------- strata


def caption_length_bins(text: pd.Series, bins: list[int]) -> pd.Series:
    """Caption length category, e.g. 0-50, 50-100, 100-200, 200+ characters."""
    n = pc.utf8_length(tables.string_array(text)).fill_null(0).to_numpy(zero_copy_only=False)
    edges = [0, *bins]
    names = np.array([f"{a}-{b}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+"], dtype=object)
    return pd.Series(names[np.searchsorted(np.asarray(bins), n, side="right")], index=text.index, dtype="str")


def _strata(df: pd.DataFrame, cfg: SplitConfig) -> tuple[np.ndarray, list[str], dict[str, int]]:
    """Stratum code per row, stratum names (sorted, 'other' last) and merge counts."""
    n = len(df)
    if not cfg.strata:
        return np.zeros(n, np.int64), ["all"], {"n_strata_merged": 0, "n_rows_merged": 0}
    combined = np.zeros(n, np.int64)
    parts: list[tuple[str, ...]] = [()]  # combined code -> the values it stands for
    for name in cfg.strata:
        col = caption_length_bins(df[TEXT], cfg.caption_bins) if name == "caption_length" else df[STRATA[name]]
        codes, uniques = pd.factorize(col.astype("str").fillna(NA), sort=True)
        k = max(len(uniques), 1)
        # Renumber after each column so the crossed code stays small whatever the number of values.
        seen, combined = np.unique(combined * k + codes, return_inverse=True)
        parts = [(*parts[u // k], str(uniques[u % k])) for u in seen.tolist()]
    names = ["|".join(p) for p in parts]
    counts = np.bincount(combined, minlength=len(names))
    rare = counts < cfg.min_stratum_size
    # Rare strata are merged rather than failing (a stratum of one row cannot be in three splits).
    keep = [nm for nm, r in zip(names, rare) if not r]
    final = sorted(keep) + ([OTHER] if rare.any() and OTHER not in keep else [])
    pos = {nm: i for i, nm in enumerate(final)}
    remap = np.array([pos[OTHER] if r else pos[nm] for nm, r in zip(names, rare)], dtype=np.int64)
    merged = {"n_strata_merged": int(rare.sum()), "n_rows_merged": int(counts[rare].sum())}
    return remap[combined], final, merged


def _group_mode(labels: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Most common code per group (ties: the smallest code)."""
    if not codes.size:
        return np.zeros(n_groups, np.int64)
    k = int(codes.max()) + 1
    pairs, counts = np.unique(labels * k + codes, return_counts=True)
    g, c = pairs // k, pairs % k
    order = np.lexsort((c, -counts, g))
    first = np.r_[True, g[order][1:] != g[order][:-1]]
    out = np.zeros(n_groups, np.int64)
    out[g[order][first]] = c[order][first]
    return out


# --------------------------------------------------------------------------- assignment


def _fill(sizes: np.ndarray, segments: list[tuple[int, int]], bounds: np.ndarray) -> np.ndarray:
    """Split code per group (in the given order), filling each segment up to the cumulative targets.

    A group goes where its middle row falls. The targets of a segment include what earlier
    segments over- or under-filled, so rounding errors do not add up across strata.
    """
    out = np.empty(sizes.size, np.int8)
    done, filled = 0.0, np.zeros(2)  # rows so far; rows in train, in train + val
    for a, b in segments:
        g = sizes[a:b]
        n_s = float(g.sum())
        t = np.clip(bounds * (done + n_s) - filled, 0, n_s)
        t[1] = max(t[1], t[0])
        mid = np.cumsum(g) - g / 2
        sp = (mid >= t[0]).astype(np.int8) + (mid >= t[1])
        out[a:b] = sp
        filled += (g[sp == 0].sum(), g[sp <= 1].sum())
        done += n_s
    return out


def _segments(keys: np.ndarray) -> list[tuple[int, int]]:
    if not keys.size:
        return []
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return list(zip(starts.tolist(), np.r_[starts[1:], keys.size].tolist()))


# --------------------------------------------------------------------------- leakage


def _shared(codes: np.ndarray, split: np.ndarray) -> tuple[int, int]:
    """Number of keys found in more than one split, and one row holding such a key (or -1)."""
    ok = (codes >= 0) & (split >= 0)
    if not ok.any():
        return 0, -1
    mask = np.zeros(int(codes.max()) + 1, np.uint8)
    np.bitwise_or.at(mask, codes[ok], (1 << split[ok]).astype(np.uint8))
    bad = (mask & (mask - 1)) != 0  # more than one bit set
    n = int(bad.sum())
    if not n:
        return 0, -1
    return n, int(np.flatnonzero(ok & bad[np.maximum(codes, 0)])[0])


def check_leakage(df: pd.DataFrame, raise_on_leak: bool = True) -> dict[str, int]:
    """Count keys shared between splits; raise LeakageError if any digest, cluster or group is.

    Returns counts for each of ``LEAK_KEYS`` present in ``df`` and ``caption_overlap`` (distinct
    normalised captions found in more than one split: reported, not an error, since templated
    captions repeat legitimately across different images).
    """
    tables.require_columns(df, [SPLIT], "split leakage check")
    split = pd.Categorical(df[SPLIT], categories=SPLITS).codes.astype(np.int64)
    counts: dict[str, int] = {}
    leaks = []
    for col in LEAK_KEYS:
        if col not in df.columns:
            continue
        counts[col], row = _shared(_key_codes(df[col], col), split)
        if counts[col]:
            leaks.append(f"{counts[col]} {col} value(s) (e.g. {df[col].iloc[row]!r})")
    if TEXT in df.columns:
        counts["caption_overlap"] = _shared(_caption_codes(df[TEXT]), split)[0]
    if leaks and raise_on_leak:
        raise LeakageError(f"split: leakage between train, val and test: {'; '.join(leaks)} in more than one split")
    return counts


# --------------------------------------------------------------------------- weights and report


def _weights(split: np.ndarray, codes: np.ndarray, exponent: float) -> np.ndarray:
    """Inverse frequency (among train rows) tempered by ``exponent``, mean 1 over train."""
    if exponent == 0 or not codes.size:
        return np.ones(codes.size)
    train = split == 0
    k = int(codes.max()) + 1
    freq = np.bincount(codes[train], minlength=k).astype(float)
    freq = np.where(freq > 0, freq, np.bincount(codes, minlength=k))  # categories absent from train
    w = freq[codes] ** -exponent
    return w / (w[train].mean() if train.any() else w.mean())


def _distribution(split: np.ndarray, values: pd.Series) -> tuple[dict[str, dict[str, int]], float]:
    """Counts per split of the most common values (rest summed) and the max share deviation."""
    codes, uniques = pd.factorize(values.astype("str").fillna(NA), sort=True)
    k = max(len(uniques), 1)
    table = np.bincount(split * k + codes, minlength=3 * k).reshape(3, k)
    total = table.sum(0)
    dev = 0.0
    if total.sum():
        share_all = total / total.sum()
        for row in table:
            if row.sum():
                dev = max(dev, float(np.abs(row / row.sum() - share_all).max()))
    top = np.argsort(-total, kind="stable")[:_TOP]
    rest = np.setdiff1d(np.arange(k), top)
    out = {}
    for s, row in zip(SPLITS, table):
        d = {str(uniques[i]): int(row[i]) for i in top if total[i]}
        if rest.size and row[rest].sum():
            d["(rest)"] = int(row[rest].sum())
        out[s] = d
    return out, round(dev, 4)


def report_table(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per split (rows, groups, achieved and target share, top strata), for a table artifact."""
    rows = []
    dist = stats.get("distributions", {})
    for s in SPLITS:
        info = stats["splits"][s]
        row = {"split": s, **{k: info[k] for k in ("rows", "groups", "ratio", "target", "deviation")}}
        for dim in ("stratum", "label", "domain"):
            counts = dist.get(dim, {}).get(s)
            if counts is not None:
                n = sum(counts.values()) or 1
                top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
                row[dim] = ", ".join(f"{k} {100 * v / n:.0f}%" for k, v in top)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- a fixed test set


def train_val_ratios(ratios: dict[str, float]) -> dict[str, float]:
    """The split ratios with test's share given to train and val in their proportion."""
    rest = ratios["train"] + ratios["val"]
    if rest <= 0:
        raise InputError(f"split.fixed_test: split.ratios leave nothing for train and val: {ratios}")
    return {"train": ratios["train"] / rest, "val": ratios["val"] / rest, "test": 0.0}


def held_out_rows(split_table: pd.DataFrame, manifest_digest: str) -> pd.DataFrame:
    """The test rows of a split's kept table, as a fixed test set file (``HELD_OUT_COLUMNS``)."""
    test = split_table[split_table[SPLIT] == "test"] if SPLIT in split_table.columns else split_table
    out = pd.DataFrame({ROW_ID: test[ROW_ID].to_numpy(np.int64)})
    for col in (GROUP, CONTENT_DIGEST, PHASH):
        values = test[col].reset_index(drop=True) if col in test.columns else pd.Series([None] * len(test))
        out[col] = values.astype("str")
    out[SPLIT_GROUP] = test[SPLIT_GROUP].to_numpy(np.int64) if SPLIT_GROUP in test.columns else -1
    out[MANIFEST_DIGEST] = manifest_digest
    return out[list(HELD_OUT_COLUMNS)]


def read_held_out(path: str | Path) -> pd.DataFrame:
    """A fixed test set file; a missing column is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"split.fixed_test: file not found: {path}")
    df = tables.read_parquet(path)
    tables.require_columns(df, list(HELD_OUT_COLUMNS), f"split.fixed_test ({path})")
    return df


def _phash_ints(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(positions, uint64 hashes) of the rows with a 16-hex-digit pHash."""
    v = s.astype("str").fillna("")
    ok = v.str.fullmatch(r"[0-9a-fA-F]{16}").fillna(False).to_numpy(bool)
    return np.flatnonzero(ok), np.array([int(x, 16) for x in v[ok]], dtype=np.uint64)


def _near(hashes: np.ndarray, held: np.ndarray, radius: int, chunk: int = 2048) -> np.ndarray:
    """For each hash, whether some held hash is within ``radius`` bits (blocks of ``chunk`` rows)."""
    out = np.zeros(hashes.size, bool)
    if not held.size:
        return out
    for a in range(0, hashes.size, chunk):
        x = hashes[a : a + chunk, None] ^ held[None, :]
        out[a : a + chunk] = (np.bitwise_count(x) <= radius).any(axis=1)
    return out


def held_out_mask(df: pd.DataFrame, held: pd.DataFrame, cfg: SplitConfig, ctx: StageContext) -> tuple[pd.Series, pd.Series]:
    """Rows to keep off train and val: those matching a held-out row (row_id and group, within the same
    manifest, whose ids they are; content digest; pHash within ``fixed_test_radius``) or in
    ``holdout_domains``, and every row grouped with one (same keys as the split's groups), so that
    nothing near the test set is trained on."""
    same_manifest = held[MANIFEST_DIGEST].eq(ingest.input_key(ctx.data)).to_numpy(bool)
    hit = np.zeros(len(df), bool)
    why = np.full(len(df), "", dtype=object)

    def mark(mask: np.ndarray, text: str) -> None:
        why[mask & ~hit] = text
        hit[:] |= mask

    mark(df[ROW_ID].isin(held.loc[same_manifest, ROW_ID]).to_numpy(bool), "row_id in the fixed test set")
    for col, rows in ((GROUP, same_manifest), (CONTENT_DIGEST, slice(None))):
        if col in df.columns:
            values = set(held.loc[rows, col].dropna().astype("str")) - {"", "None", "nan", "<NA>"}
            mark(df[col].astype("str").isin(values).to_numpy(bool), f"{col} in the fixed test set")
    if PHASH in df.columns:
        pos, hashes = _phash_ints(df[PHASH])
        _, held_hashes = _phash_ints(held[PHASH])
        near = np.zeros(len(df), bool)
        near[pos] = _near(hashes, held_hashes, cfg.fixed_test_radius)
        mark(near, f"pHash within {cfg.fixed_test_radius} bits of a fixed test image")
    if cfg.holdout_domains and DOMAIN in df.columns:
        mark(df[DOMAIN].isin(cfg.holdout_domains).to_numpy(dtype=bool, na_value=False), "held-out domain")
    # Whole groups: a row sharing a digest, near-duplicate cluster or group with a held-out row goes too.
    keys = [_key_codes(df[c], c) for c in GROUP_KEYS if c in df.columns]
    if cfg.group_by_caption:
        keys.append(_caption_codes(df[TEXT]))
    if len(df) and keys:
        labels = connected_groups(keys)
        grouped = np.isin(labels, labels[hit])
        mark(grouped, "grouped with a fixed test row")
    return pd.Series(hit, index=df.index), pd.Series(why, index=df.index, dtype="str")


# --------------------------------------------------------------------------- the stage


def _require(df: pd.DataFrame, cfg: SplitConfig) -> None:
    cols = [ROW_ID, TEXT, CONTENT_DIGEST] + [STRATA[s] for s in cfg.strata]
    if cfg.mode == "time":
        cols.append(TIME)
    if cfg.mode == "given":
        cols.append(GIVEN_SPLIT)
    if cfg.holdout_domains:
        cols.append(DOMAIN)
    if cfg.weight_by == "label" and cfg.weight_exponent > 0:
        cols.append(LABEL)
    tables.require_columns(df, dict.fromkeys(cols), "split input")
    if cfg.holdout_domains:
        present = set(df[DOMAIN].dropna().astype("str"))
        missing = [d for d in cfg.holdout_domains if d not in present]
        if missing and len(df):
            raise InputError(
                f"split.holdout_domains: domain(s) {', '.join(map(repr, missing))} not in column {DOMAIN!r}; "
                f"got {', '.join(map(repr, sorted(present)[:10]))}"
            )


def run(table: pd.DataFrame, cfg: SplitConfig, ctx: StageContext) -> StageResult:
    """Add split, split_group, stratum and sample_weight; quarantine rows a time split cannot place."""
    _require(table, cfg)
    if cfg.fixed_test is not None:  # the test split is given: the rest is shared by train and val
        cfg = cfg.model_copy(update={"ratios": train_val_ratios(cfg.ratios)})
    df = table if table[ROW_ID].is_monotonic_increasing else table.sort_values(ROW_ID, kind="stable")
    df = df.reset_index(drop=True)

    quarantined = tables.empty_quarantine(df)
    if cfg.mode == "time":
        t = df[TIME]
        if not isinstance(t.dtype, pd.DatetimeTZDtype) and not pd.api.types.is_datetime64_dtype(t):
            t = pd.to_datetime(t, utc=True, errors="coerce", format="ISO8601")
        res = tables.partition(df, [("missing_time", t.isna(), "time is null or not a timestamp")])
        df, quarantined = res.kept.reset_index(drop=True), res.quarantined
        t = t[t.notna()].reset_index(drop=True)
    if cfg.mode == "given":
        raw = df[GIVEN_SPLIT].astype("str")
        given = raw.map(cfg.given_values)
        detail = "given split " + raw.fillna("<null>").map(repr) + f" not in split.given_values ({', '.join(cfg.given_values)})"
        res = tables.partition(df, [("unknown_given_split", given.isna(), detail)])
        df, quarantined = res.kept.reset_index(drop=True), res.quarantined
        given = given[given.notna()].reset_index(drop=True)
    if cfg.fixed_test is not None:
        held, detail = held_out_mask(df, read_held_out(cfg.fixed_test), cfg, ctx)
        res = tables.partition(df, [("held_out_test", held, detail)])
        df, quarantined = res.kept.reset_index(drop=True), tables.concat_quarantine(quarantined, res.quarantined)
        if cfg.mode == "time":
            t = t[~held.to_numpy()].reset_index(drop=True)

    n = len(df)
    keys = [_key_codes(df[c], c) for c in GROUP_KEYS if c in df.columns]
    if cfg.group_by_caption:
        keys.append(_caption_codes(df[TEXT]))
    labels = connected_groups(keys) if n else np.zeros(0, np.int64)
    n_groups = int(labels.max()) + 1 if n else 0
    sizes = np.bincount(labels, minlength=n_groups)

    strat, strat_names, merged = _strata(df, cfg)
    # Groups of a held-out domain go to test whole, so no row of them can leak into train.
    forced = np.zeros(n_groups, bool)
    if cfg.holdout_domains:
        forced[labels[df[DOMAIN].isin(cfg.holdout_domains).to_numpy(dtype=bool, na_value=False)]] = True
    free = np.flatnonzero(~forced)
    bounds = np.cumsum([cfg.ratios[s] for s in SPLITS])[:2]
    gsplit = np.full(n_groups, 2, np.int8)
    rng = np.random.default_rng(ctx.seed)
    if cfg.mode == "time":
        newest = np.full(n_groups, np.iinfo(np.int64).min)
        np.maximum.at(newest, labels, t.to_numpy(dtype="datetime64[ns]").astype(np.int64))
        order = free[np.argsort(newest[free], kind="stable")]
        segs = [(0, order.size)] if order.size else []
    else:
        gstrat = _group_mode(labels, strat, n_groups)
        order = free[np.lexsort((rng.random(free.size), gstrat[free]))]
        segs = _segments(gstrat[order])
    gsplit[order] = _fill(sizes[order].astype(float), segs, bounds)
    split = gsplit[labels].astype(np.int64)
    if cfg.mode == "given":  # the dataset's own split, row by row; the groups are only checked
        split = pd.Categorical(given, categories=SPLITS).codes.astype(np.int64)
        gsplit = np.array([np.unique(labels[split == k]).size for k in range(3)])

    weight_codes = strat if cfg.weight_by == "stratum" else pd.factorize(df[LABEL].astype("str").fillna(NA))[0]
    kept = df.copy(deep=False)  # copy-on-write: the input is left as it was
    kept[SPLIT] = pd.Series(np.array(SPLITS, dtype=object)[split], dtype="str")
    kept[SPLIT_GROUP] = labels.astype(np.int64)
    kept[STRATUM] = pd.Series(np.array(strat_names, dtype=object)[strat], dtype="str")
    kept[SAMPLE_WEIGHT] = _weights(split, np.asarray(weight_codes, np.int64), cfg.weight_exponent).astype(np.float64)

    # Raises on any shared digest, cluster or group; a given split is reported, not changed.
    leakage = check_leakage(kept, raise_on_leak=cfg.mode != "given")
    if cfg.mode == "given":
        groups_per_split = gsplit
    else:
        _check_collapse(kept, split, labels, forced, sizes, cfg)
        groups_per_split = np.bincount(gsplit, minlength=3)
    stats = _stats(kept, split, groups_per_split, labels, forced, cfg, merged, strat_names, leakage)
    return StageResult(kept, quarantined, stats)


def _check_collapse(df: pd.DataFrame, split: np.ndarray, labels: np.ndarray, forced: np.ndarray,
                    sizes: np.ndarray, cfg: SplitConfig) -> None:
    """Raise when the achieved ratios are far off the targets because one group is too large."""
    free = ~forced[labels] if labels.size else np.zeros(0, bool)
    n_free = int(free.sum())
    if not n_free or cfg.allow_imbalance:
        return
    got = {s: float((split[free] == k).sum() / n_free) for k, s in enumerate(SPLITS)}
    dev = max(abs(got[s] - cfg.ratios[s]) for s in SPLITS)
    big = int(np.argmax(np.where(forced, 0, sizes)))
    if dev <= cfg.max_ratio_deviation or sizes[big] / n_free <= cfg.max_ratio_deviation or sizes[big] < _COLLAPSE_ROWS:
        return  # close enough, off by rounding whole small groups, or a toy dataset
    rows = df[labels == big]
    why = []
    for col in GROUP_KEYS:
        if col in rows.columns and len(rows):
            top = rows[col].astype("str").value_counts(dropna=False)
            why.append(f"{col} {str(top.index[0])[:40]!r} on {int(top.iloc[0])} rows")
    raise InputError(
        f"split: achieved ratios {', '.join(f'{s} {got[s]:.2f}' for s in SPLITS)} are {dev:.2f} off the targets "
        f"(split.max_ratio_deviation {cfg.max_ratio_deviation}): group {big} holds {int(sizes[big])} of {n_free} rows "
        f"(from row_id {int(rows[ROW_ID].iloc[0])}; {'; '.join(why) or 'no shared key'}); "
        "fix the grouping keys or set split.allow_imbalance: true"
    )


def _stats(kept, split, groups_per_split, labels, forced, cfg, merged, strat_names, leakage) -> dict[str, Any]:
    free_rows = ~forced[labels] if labels.size else np.zeros(0, bool)
    n_free = int(free_rows.sum())
    splits, dev = {}, 0.0
    for k, s in enumerate(SPLITS):
        ratio = float((split[free_rows] == k).sum() / n_free) if n_free else 0.0
        d = abs(ratio - cfg.ratios[s]) if n_free else 0.0
        dev = max(dev, d)
        splits[s] = {
            "rows": int((split == k).sum()),
            "groups": int(groups_per_split[k]),
            "ratio": round(ratio, 4),
            "target": cfg.ratios[s],
            "deviation": round(d, 4),
        }
    dists, devs = {}, {}
    for dim, col in ((STRATUM, STRATUM), ("label", LABEL), ("domain", DOMAIN)):
        if col in kept.columns:
            dists[dim], devs[dim] = _distribution(split, kept[col])
    warnings = []
    if dev > cfg.ratio_tolerance and cfg.mode != "given":
        warnings.append(f"split ratios are {dev:.3f} off target (ratio_tolerance {cfg.ratio_tolerance}): large groups")
    if cfg.mode == "given" and any(v for k, v in leakage.items() if k not in ("caption_overlap", SPLIT_GROUP)):
        shared = ", ".join(f"{v} {k}" for k, v in leakage.items() if v and k not in ("caption_overlap", SPLIT_GROUP))
        warnings.append(f"the given split leaks: {shared} value(s) in more than one split (kept as given)")
    if merged["n_strata_merged"]:
        warnings.append(f"{merged['n_strata_merged']} strata under {cfg.min_stratum_size} rows merged into '{OTHER}'")
    sizes = np.bincount(labels) if labels.size else np.zeros(1, np.int64)
    return {
        "mode": cfg.mode,
        "n_groups": int(sizes.size if labels.size else 0),
        "n_multi_row_groups": int((sizes > 1).sum()),
        "largest_group": int(sizes.max()),
        "splits": splits,
        "max_ratio_deviation": round(dev, 4),
        "ratio_within_tolerance": dev <= cfg.ratio_tolerance,
        "max_stratum_deviation": devs.get(STRATUM, 0.0),
        "n_strata": len(strat_names),
        **merged,
        "n_holdout_rows": int(labels.size - n_free),
        "leakage": {k: v for k, v in leakage.items() if k != "caption_overlap"},
        "caption_overlap": leakage.get("caption_overlap", 0),
        "distributions": dists,
        "distribution_deviation": devs,
        "warnings": warnings,
    }
