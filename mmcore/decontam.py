"""Decontamination: keep the evaluation sets out of the training pool, and link the near-duplicates
pHash cannot see, so that split keeps them on one side.

Between quality and split. Two jobs:

1. **Reference sets** (``decontam.reference_sets``: name -> a data config, any input form mmpipe
   reads): every pool row whose image matches a reference image or whose normalised caption equals
   a reference caption is quarantined as ``eval_contamination``, the detail naming the set, the
   reference row and how it matched. Image matches, in order: the same bytes (content digest); a
   pHash within ``phash_radius`` bits of the reference image's, or of its *mirror image*'s (a
   horizontally flipped copy); with ``model``, an embedding cosine of at least
   ``contamination_cosine``. Each reference set is read, decoded and hashed once and cached under a
   key of its content (its manifest's bytes, its images' fingerprint, the model), in
   ``decontam/references/``.
2. **Near-duplicates within the pool**: ``mirror_cluster`` joins images whose mirror image is within
   ``mirror_radius`` pHash bits of another image; with ``model``, ``semantic_cluster`` joins images
   whose embeddings have a cosine of at least ``semantic_cosine`` (crops, overlays, re-renders),
   each distinct image embedded once in batches (on the GPU when there is one), neighbours found
   by exact chunked search below ``exact_search_below`` images and by faiss (IVF, inner product)
   above. Split joins both into its groups and its leakage check. Without a model the semantic part
   is off and the stats say so.

The pHash is computed here as quality computes it (a test checks they agree): the gray reduced decode
at 96 px, a 96 x 96 analysis square, its 32 x 32 area reduction, the 8 x 8 lowest DCT frequencies
above their median; the mirror's hash is that of the flipped 32 x 32 reduction.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from mmcore import graph, images, layout, parallel, sources, tables
from mmcore.base import DataConfig, StageContext, StrictModel
from mmcore.digests import dir_digest, file_digest, json_digest, text_digest
from mmcore.errors import ConfigError, InputError, MMPipeError, row_detail
from mmcore.tables import IMAGE, ROW_ID, TEXT, StageResult

STAGE = "decontam"

REASONS = {
    "eval_contamination": "the image or caption is in a reference (evaluation) set: same bytes, pHash within "
    "decontam.phash_radius of a reference image or of its mirror image, embedding cosine >= "
    "decontam.contamination_cosine (with decontam.model), or the same normalised caption",
}

# How a row matched a reference set, in the order they are tried (the first one names the row).
KINDS = ("exact", "phash", "mirrored", "cropped", "semantic", "caption")
# Columns the stage adds to the rows it keeps.
PHASH_MIRROR = "phash_mirror"  # pHash of the horizontally mirrored image (16 hex digits; '' if undecodable)
PHASH_CROPS = "phash_crops"  # a reference image's pHashes cropped by each of decontam.crop_margins (space-separated)
MIRROR_CLUSTER = "mirror_cluster"  # images linked by mirrored pHash; -1 alone
SEMANTIC_CLUSTER = "semantic_cluster"  # images linked by embedding cosine; -1 alone (or no model)
# Columns of quarantined rows naming what they matched.
MATCH_SET, MATCH_ROW, MATCH_KIND = "match_set", "match_row", "match_kind"
# Written by probe and quality.
CONTENT_DIGEST, PHASH, ORIENTATION = "content_digest", "phash", "orientation"

_DECODE = 96  # quality's defaults: the same hashes (tests/test_decontam.py checks it)
_ANALYSIS = 96
_HASH_VERSION = "phash-v1"  # bump when the hash or the reference table changes
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # no '.': it separates the name from the key in file names


class DecontamConfig(StrictModel):
    """Reference (evaluation) sets to keep out of the pool, and near-duplicate links for split."""

    reference_sets: dict[str, DataConfig] = Field(
        default_factory=dict,
        description="Name -> data config of an evaluation set (any input form); matching pool rows are eval_contamination.",
    )
    reference_splits: list[str] = Field(
        ["val", "test"], description="A reference set with a split of its own (Karpathy's given_split) counts only "
        "these splits: COCO's test images, not the train images you may train on; [] = every row.",
    )
    phash_radius: int = Field(4, ge=0, le=16, description="pHash bits within which an image matches a reference image or its mirror.")
    mirror_radius: int = Field(2, ge=0, le=16, description="pHash bits within which an image's mirror links it to another image (mirror_cluster).")
    crop_margins: tuple[float, ...] = Field(
        (0.025, 0.05, 0.075), description="Each reference image is also hashed cropped by these shares per side (cropped copies).",
    )
    captions: bool = Field(True, description="A row whose normalised caption equals a reference caption is contaminated.")
    caption_min_words: int = Field(4, ge=1, description="Shorter captions never match (generic ones repeat legitimately).")
    model: Path | None = Field(
        None, description="Embedding model (a run's train/model or a local CLIP folder); None turns the semantic part off.",
    )
    semantic_cosine: float = Field(0.95, gt=0, le=1, description="Cosine at or above which two pool images are near-duplicates (semantic_cluster).")
    contamination_cosine: float = Field(0.95, gt=0, le=1, description="Cosine at or above which a pool image matches a reference image.")
    neighbours: int = Field(10, ge=1, le=1000, description="Nearest neighbours per image searched for semantic links.")
    exact_search_below: int = Field(50_000, ge=0, description="Exact chunked search below this many images; faiss IVF at or above.")
    nprobe: int = Field(16, ge=1, description="faiss IVF lists searched per query (more: higher recall, slower).")
    batch_size: int = Field(64, ge=1, description="Images per embedding forward pass.")
    hash_batch_size: int = Field(256, ge=1, description="Images per batch sent to a worker process for hashing.")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("crop_margins")
    @classmethod
    def _margins(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < m < 0.25 for m in v):
            raise ValueError(f"decontam.crop_margins must each be in (0, 0.25), got {list(v)}")
        return tuple(sorted(set(v)))

    @field_validator("reference_sets")
    @classmethod
    def _names(cls, v: dict[str, DataConfig]) -> dict[str, DataConfig]:
        bad = [k for k in v if not _NAME.match(k)]
        if bad:
            raise ValueError(f"decontam.reference_sets: name {bad[0]!r} must be letters, digits, '_', '-'")
        return v


# --------------------------------------------------------------------------- hashes


def _phash_bits(small: np.ndarray) -> int:
    """quality's pHash of one 32 x 32 float32 reduction."""
    low = cv2.dct(np.ascontiguousarray(small))[:8, :8].ravel()
    srt = np.sort(low)
    bits = low > (srt[31] + srt[32]) / 2
    return int(np.packbits(bits).view(">u8")[0])


def _small(gray: np.ndarray) -> np.ndarray:
    s = _ANALYSIS
    big = gray.shape[0] >= 2 * s and gray.shape[1] >= 2 * s
    a = cv2.resize(gray, (s, s), interpolation=cv2.INTER_AREA if big else cv2.INTER_LINEAR)
    return cv2.resize(a, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)


def phash_pair(gray: np.ndarray) -> tuple[int, int]:
    """(pHash, pHash of the mirror image) of a gray reduced decode, as quality hashes it."""
    small = _small(gray)
    return _phash_bits(small), _phash_bits(small[:, ::-1])


def crop_hashes(gray: np.ndarray, margins: tuple[float, ...]) -> list[int]:
    """pHashes of the image cropped by each margin (a share of each side)."""
    h, w = gray.shape[:2]
    out = []
    for m in margins:
        dy, dx = round(h * m), round(w * m)
        out.append(_phash_bits(_small(np.ascontiguousarray(gray[dy : h - dy, dx : w - dx]))))
    return out


def image_hashes(data: bytes, margins: tuple[float, ...] = (), orientation: int | None = None,
                 policy: images.DecodePolicy = images.DEFAULT_POLICY) -> tuple[int, int, list[int]]:
    """(pHash, mirrored pHash, cropped pHashes) of an image's bytes, decoded gray at reduced size."""
    gray = images.decode_reduced(data, _DECODE, False, orientation, True, policy)
    h, m = phash_pair(gray)
    return h, m, crop_hashes(gray, margins)


def informative(h: np.ndarray) -> np.ndarray:
    """Hashes with structure to match by: a flat or isoluminant image hashes to 8000000000000000
    (one bit), and any image that close to flat matches every other one."""
    bits = np.bitwise_count(np.asarray(h, np.uint64))
    return (bits >= 8) & (bits <= 56)


def hash_batch(rows: pd.DataFrame, source: sources.ImageSource, margins: tuple[float, ...] = ()) -> pd.DataFrame:
    """pHash, mirrored pHash and cropped pHashes (hex) of each row's image (columns ``image_path``,
    optional ``orientation``); ``error`` is '' or why the image did not decode (hashes '' then)."""
    cv2.setNumThreads(1)  # one process per core already
    refs = rows[IMAGE].tolist()
    tags = rows[ORIENTATION].tolist() if ORIENTATION in rows else [None] * len(refs)
    out = {"phash": [""] * len(refs), PHASH_MIRROR: [""] * len(refs), PHASH_CROPS: [""] * len(refs), "error": [""] * len(refs)}
    policies = images.probed_policies(rows)  # only what the probe saw and allowed is decoded
    for i, ref in enumerate(refs):
        try:
            tag = int(tags[i]) if tags[i] is not None and 1 <= int(tags[i]) <= 8 else None
        except (TypeError, ValueError):
            tag = None
        policy = policies[i]
        try:
            data = policy.accept(source.read(ref, max_bytes=policy.max_bytes))
            h, m, crops = image_hashes(data, margins, tag, policy)
            out["phash"][i], out[PHASH_MIRROR][i] = f"{h:016x}", f"{m:016x}"
            out[PHASH_CROPS][i] = " ".join(f"{c:016x}" for c in crops)
        except Exception as e:  # a row's failure is its own (counted), never the batch's
            out["error"][i] = row_detail(e)
    return pd.DataFrame({k: pd.Series(v, dtype="str") for k, v in out.items()})


def hex_hashes(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(positions, uint64) of the values of ``s`` that are 16 hex digits and ``informative``."""
    v = s.astype("str").fillna("")
    ok = v.str.fullmatch(r"[0-9a-fA-F]{16}").fillna(False).to_numpy(bool)
    hexes = v[ok].tolist()  # parsed in one go: 8 big-endian bytes per hash
    pos, h = np.flatnonzero(ok), np.frombuffer(bytes.fromhex("".join(hexes)), dtype=">u8").astype(np.uint64)
    keep = informative(h)
    return pos[keep], h[keep]


def hamming_pairs(query: np.ndarray, base: np.ndarray, radius: int, budget: int = 4_000_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query index, base index, distance) with Hamming distance <= ``radius``, each pair once.

    Multi-index hashing: the 64 bits cut into ``radius + 1`` bands; two hashes within the radius
    agree on at least one band (pigeonhole), so only hashes sharing a band value are compared, in
    blocks of at most ``budget`` candidate pairs (memory bounded whatever the sizes).
    """
    query, base = np.asarray(query, np.uint64), np.asarray(base, np.uint64)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    if not query.size or not base.size:
        return empty
    edges = np.linspace(0, 64, radius + 2).astype(int)
    qs, bs, ds = [empty[0]], [empty[1]], [empty[2]]
    for b in range(radius + 1):
        shift, mask = np.uint64(edges[b]), np.uint64((1 << int(edges[b + 1] - edges[b])) - 1)
        bkey = (base >> shift) & mask
        order = np.argsort(bkey, kind="stable")
        sorted_keys = bkey[order]
        qkey = (query >> shift) & mask
        left = np.searchsorted(sorted_keys, qkey, "left")
        count = np.searchsorted(sorted_keys, qkey, "right") - left
        cum = np.cumsum(count)
        lo = 0
        while lo < query.size:  # a block of queries whose candidates fit the budget (at least one query)
            hi = max(lo + 1, int(np.searchsorted(cum, (cum[lo - 1] if lo else 0) + budget, "right")))
            c = count[lo:hi]
            if c.sum():
                qi = np.repeat(np.arange(lo, hi), c)
                offs = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
                bi = order[np.repeat(left[lo:hi], c) + offs]
                d = np.bitwise_count(query[qi] ^ base[bi]).astype(np.int64)
                keep = d <= radius
                qs.append(qi[keep])
                bs.append(bi[keep].astype(np.int64))
                ds.append(d[keep])
            lo = hi
    q, bb, d = np.concatenate(qs), np.concatenate(bs), np.concatenate(ds)
    _, first = np.unique(q * base.size + bb, return_index=True)  # a pair found in several bands, once
    return q[first], bb[first], d[first]


def best_match(n: int, q: np.ndarray, b: np.ndarray, score: np.ndarray, higher: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per query 0..n-1 the best base index (-1: none) and its score; ties go to the lowest base index."""
    best, val = np.full(n, -1, np.int64), np.full(n, np.nan)
    if q.size:
        order = np.lexsort((b, -score if higher else score, q))
        first = np.r_[True, q[order][1:] != q[order][:-1]]
        best[q[order][first]], val[q[order][first]] = b[order][first], score[order][first]
    return best, val


def components(n: int, i: np.ndarray, j: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """Cluster id per node for the undirected edges (i, j): the lowest ``row_ids`` of its component,
    -1 for a node with no edge."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    out = np.full(n, -1, np.int64)
    keep = i != j
    i, j = i[keep], j[keep]
    if not i.size:
        return out
    g = coo_matrix((np.ones(i.size, np.int8), (i, j)), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    linked = np.zeros(n, bool)
    linked[i] = linked[j] = True
    low = pd.Series(row_ids).groupby(comp).transform("min").to_numpy(np.int64)
    out[linked] = low[linked]
    return out


# --------------------------------------------------------------------------- embeddings and neighbours


def _device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_encoder(path: Path, device: str):
    """The embedding model through the one loader (a run's model or a local CLIP folder)."""
    from mmcore.clip_model import Encoder

    try:
        return Encoder.load(path, device=_device(device), where="decontam.model")
    except MMPipeError as e:
        raise ConfigError(f"decontam.model: cannot load a CLIP model from {path}: {str(e).removeprefix('decontam.model: ')}") from None


def embed_images(refs: list[str], source: sources.ImageSource, encoder, batch_size: int) -> tuple[np.ndarray, list[str]]:
    """L2-normalised embeddings of the images (rows of zeros where one did not decode) and per image
    '' or why; decoded and embedded ``batch_size`` at a time, so memory holds one batch of pixels."""
    dim = int(encoder.model.config.projection_dim)
    out = np.zeros((len(refs), dim), np.float32)
    errors = [""] * len(refs)
    side = max(64, 2 * int(getattr(encoder, "image_size", 224)))  # the encoder resizes anyway
    for lo in range(0, len(refs), batch_size):
        imgs, idx = [], []
        for k in range(lo, min(lo + batch_size, len(refs))):
            try:
                imgs.append(sources.load_rgb(source, refs[k], max_side=side))
                idx.append(k)
            except Exception as e:
                errors[k] = row_detail(e)
        if imgs:
            out[idx] = encoder.encode_images(imgs, batch_size=batch_size)
    return out, errors


def _torch_topk(x: np.ndarray, base: np.ndarray, k: int, device: str, budget: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products of each row of ``x`` against ``base``, in chunks of rows whose
    similarity block holds at most ``budget`` values (256 MiB of float32), whatever the sizes."""
    import torch

    k = min(k, len(base))
    chunk = int(np.clip(budget // max(1, len(base)), 1, 4096))
    b = torch.from_numpy(base).to(device)
    sims, idx = [], []
    for lo in range(0, len(x), chunk):
        s = torch.from_numpy(x[lo : lo + chunk]).to(device) @ b.T
        v, i = torch.topk(s, k, dim=1)
        sims.append(v.float().cpu().numpy())
        idx.append(i.cpu().numpy())
    if not sims:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(sims), np.concatenate(idx).astype(np.int64)


def faiss_topk(x: np.ndarray, k: int, nprobe: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k inner products of each row of ``x`` against ``x`` (faiss IVF, flat lists)."""
    import faiss

    n, d = x.shape
    nlist = int(max(1, min(4 * np.sqrt(n), n // 39)))  # faiss wants >= 39 training points per list
    quant = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = x[np.sort(rng.choice(n, min(n, 256 * nlist), replace=False))]
    index.cp.seed = seed
    index.train(train)
    index.add(x)
    index.nprobe = min(nprobe, nlist)
    sims, idx = index.search(x, min(k, n))
    return sims, idx.astype(np.int64)


def neighbour_pairs(x: np.ndarray, threshold: float, k: int, exact_below: int, nprobe: int, device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Pairs (i < j) among the rows of ``x`` with cosine >= ``threshold`` among each row's ``k``
    nearest neighbours (+ itself), and which search found them."""
    n = len(x)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), "none"
    if n < exact_below:
        sims, idx = _torch_topk(x, x, k + 1, _device(device))
        how = f"exact ({_device(device)})"
    else:
        sims, idx = faiss_topk(x, k + 1, nprobe)
        how = f"faiss IVF (nprobe {nprobe})"
    rows = np.repeat(np.arange(n), idx.shape[1])
    cols, s = idx.ravel(), sims.ravel()
    keep = (cols >= 0) & (cols != rows) & (s >= threshold)
    i, j = np.minimum(rows[keep], cols[keep]), np.maximum(rows[keep], cols[keep])
    key, first = np.unique(i * n + j, return_index=True)
    return key // n, key % n, s[keep][first], how


# --------------------------------------------------------------------------- reference sets


def caption_key(text: pd.Series) -> pd.Series:
    """Caption normalised for equality: lower case, every run of non-letters/digits one space, trimmed."""
    s = text.astype("str").fillna("").str.lower().str.replace(r"[^\w]+|_+", " ", regex=True).str.strip()
    return s


def _reader():
    """The module of the graph's first stage: it reads every input form mmpipe reads. Found through
    the graph, not imported (no stage imports another); its code digest is in the reference key."""
    first = next(s for s in graph.STAGES.values() if s.input is None)
    return importlib.import_module(first.module)


def read_reference(name: str, data: DataConfig, splits: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """A reference set's rows: row_id, image_path and text (normalised as clean does); with ``splits``,
    only its rows of those given splits (when it has a split of its own, e.g. Karpathy's)."""
    mod = _reader()
    try:
        df = mod.map_columns(mod.read_input(data), data)
        if splits and tables.GIVEN_SPLIT in df:
            df = df[df[tables.GIVEN_SPLIT].astype("str").isin(list(splits))].reset_index(drop=True)
        text, _ = mod.normalize_captions(df[TEXT]) if hasattr(mod, "normalize_captions") else (df[TEXT], None)
    except MMPipeError as e:
        raise InputError(f"decontam.reference_sets.{name}: {e}") from None
    return pd.DataFrame({ROW_ID: df[ROW_ID].to_numpy(np.int64), IMAGE: df[IMAGE].astype("str").to_numpy(),
                         TEXT: pd.Series(text).astype("str").to_numpy()})


def reference_key(data: DataConfig, refs: list[str], model_digest: str, splits: list[str] | tuple[str, ...] = ()) -> str:
    """Content key of a reference set's table: its manifest's bytes, its images' fingerprint, the
    data config (paths marked: where it sits is no setting), the splits taken, the reader's code, the
    model and the hash version."""
    from mmcore.provenance import code_digest, settings_json

    manifest = Path(data.manifest) if getattr(data, "manifest", None) is not None else None
    return text_digest(_HASH_VERSION, settings_json(data), json_digest(list(splits)),
                       file_digest(manifest) if manifest is not None and manifest.is_file() else f"missing:{manifest}",
                       sources.of(data).fingerprint(refs), code_digest(_reader().__name__), model_digest)


def extra_digest(cfg: DecontamConfig) -> str:
    """What the stage reads besides its input: each reference set's content and the model."""
    parts = [f"model={dir_digest(cfg.model) if cfg.model is not None else 'none'}"]
    for name, data in sorted(cfg.reference_sets.items()):
        try:
            refs = read_reference(name, data, cfg.reference_splits)[IMAGE].tolist()
        except MMPipeError as e:  # the stage itself will say it in one line
            parts.append(f"{name}=error:{e}")
            continue
        parts.append(f"{name}={reference_key(data, refs, '', cfg.reference_splits)}")
    return text_digest(*parts)


def _distinct(refs: pd.Series, digests: pd.Series | None) -> tuple[np.ndarray, np.ndarray]:
    """(code per row, first row of each code) by content digest, else by reference."""
    key = refs.astype("str")
    if digests is not None:
        d = digests.astype("str")
        key = d.where(d.str.len() > 0, "ref:" + key)
    codes, _ = pd.factorize(key.to_numpy())
    _, first = np.unique(codes, return_index=True)
    return codes, first


def reference_table(name: str, data: DataConfig, cfg: DecontamConfig, ctx: StageContext, encoder, model_digest: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A reference set's rows with digest, pHash, mirrored pHash, caption key (and embedding), from
    the cache when its content key is there; else computed and cached."""
    ref = read_reference(name, data, cfg.reference_splits)
    key = reference_key(data, ref[IMAGE].tolist(), text_digest(model_digest, repr(cfg.crop_margins)), cfg.reference_splits)
    folder = ctx.stage_dir(STAGE) / layout.REFERENCES_DIR
    path = folder / f"{name}.{key.removeprefix('sha256:')[:20]}.parquet"
    info = {"n_rows": len(ref), "key": key, "cached": path.is_file()}
    if path.is_file():
        table = tables.read_parquet(path)
    else:
        source = sources.of(data)
        digests = []
        for r in ref[IMAGE].tolist():
            try:
                data_bytes = source.read(r, max_bytes=images.DEFAULT_POLICY.max_bytes)
                digests.append("sha256:" + hashlib.sha256(data_bytes).hexdigest())
            except Exception:
                digests.append("")
        table = ref.copy()
        table[CONTENT_DIGEST] = pd.Series(digests, dtype="str")
        hashed = pd.concat(parallel.map_batches(hash_batch, ref[[IMAGE]], batch_size=cfg.hash_batch_size,
                                                workers=ctx.workers, args=(source, cfg.crop_margins))
                           or [hash_batch(ref[[IMAGE]], source, cfg.crop_margins)], ignore_index=True)
        for c in ("phash", PHASH_MIRROR, PHASH_CROPS, "error"):
            table[c] = hashed[c].to_numpy()
        table["caption_key"] = caption_key(table[TEXT]).to_numpy()
        if encoder is not None:
            emb, err = embed_images(ref[IMAGE].tolist(), source, encoder, cfg.batch_size)
            table["embedding"] = list(emb)
            table["error"] = [e or x for e, x in zip(table["error"], err)]
        for old in folder.glob(f"{name}.*.parquet") if folder.is_dir() else ():
            old.unlink(missing_ok=True)  # an earlier content of this set
        tables.write_parquet(table, path)
    info["n_images"] = int(table[IMAGE].nunique())
    info["n_undecoded"] = int((table["error"] != "").sum())
    return table, info


# --------------------------------------------------------------------------- the stage


def _contamination(df: pd.DataFrame, name: str, ref: pd.DataFrame, emb: np.ndarray | None, img_of_row: np.ndarray,
                   cfg: DecontamConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pool row: match kind ('' none), reference row_id, detail."""
    n = len(df)
    kind, ref_row, detail = np.full(n, "", object), np.full(n, -1, np.int64), np.full(n, "", object)
    ref_ids = ref[ROW_ID].to_numpy(np.int64)
    ref_paths = ref[IMAGE].to_numpy()

    def mark(hit: np.ndarray, which: np.ndarray, what: str, why: np.ndarray | str) -> None:
        new = hit & (kind == "")
        kind[new], ref_row[new] = what, ref_ids[which[new]]
        text = why[new] if isinstance(why, np.ndarray) else why
        detail[new] = [f"{what} match with reference set {name!r} row {r} ({p}): {w}"
                       for r, p, w in zip(ref_ids[which[new]], ref_paths[which[new]],
                                          text if isinstance(text, np.ndarray) else [text] * int(new.sum()))]

    if CONTENT_DIGEST in df.columns:  # 1. the same bytes
        d = ref[CONTENT_DIGEST].astype("str")
        first = pd.Series(np.arange(len(ref)), index=d).groupby(level=0).min()
        first = first[first.index != ""]
        pos = df[CONTENT_DIGEST].astype("str").map(first)
        mark(pos.notna().to_numpy(), pos.fillna(0).to_numpy(np.int64), "exact", "same content digest")
    pool_pos, pool_h = hex_hashes(df[PHASH])  # this stage's own pHash (quality's, recomputed)
    crops = ref[PHASH_CROPS].astype("str").str.split()
    crop_rows = pd.Series(np.repeat(np.arange(len(ref)), crops.str.len().fillna(0).astype(int)))
    crop_hex = pd.Series([h for hs in crops if isinstance(hs, list) for h in hs], dtype="str")
    for values, at, what, how in ((ref["phash"], None, "phash", "pHash"),
                                  (ref[PHASH_MIRROR], None, "mirrored", "pHash of the mirror image"),
                                  (crop_hex, crop_rows.to_numpy(np.int64), "cropped", "pHash of a crop of the reference image")):
        rpos, rh = hex_hashes(values)
        if at is not None:
            rpos = at[rpos]
        q, b, d = hamming_pairs(pool_h, rh, cfg.phash_radius)
        best, dist = best_match(len(pool_h), q, b, d.astype(float), higher=False)
        hit, which, why = np.zeros(n, bool), np.zeros(n, np.int64), np.full(n, "", object)
        ok = best >= 0
        hit[pool_pos[ok]], which[pool_pos[ok]] = True, rpos[best[ok]]
        why[pool_pos[ok]] = [f"{how} {int(x)} bits apart (radius {cfg.phash_radius})" for x in dist[ok]]
        mark(hit, which, what, why)
    if emb is not None and "embedding" in ref.columns and len(ref):
        remb = np.stack(ref["embedding"].to_numpy()).astype(np.float32)
        good = (ref["error"] == "").to_numpy()
        if good.any():
            sims, idx = _torch_topk(emb, remb[good], 1, _device(cfg.device))
            which_img = np.flatnonzero(good)[idx[:, 0]]
            s = sims[:, 0]
            row_hit = (s[img_of_row] >= cfg.contamination_cosine) & (np.linalg.norm(emb, axis=1)[img_of_row] > 0)
            mark(row_hit, which_img[img_of_row], "semantic",
                 np.array([f"embedding cosine {x:.3f} >= {cfg.contamination_cosine}" for x in s[img_of_row]], dtype=object))
    if cfg.captions:  # 5. the same normalised caption (long enough not to be generic)
        keys = ref["caption_key"].astype("str")
        long = keys.str.split().str.len().fillna(0) >= cfg.caption_min_words
        first = pd.Series(np.arange(len(ref))[long.to_numpy()], index=keys[long]).groupby(level=0).min()
        pos = caption_key(df[TEXT]).map(first)
        mark(pos.notna().to_numpy(), pos.fillna(0).to_numpy(np.int64), "caption", "same normalised caption")
    return kind, ref_row, detail


def run(table: pd.DataFrame, cfg: DecontamConfig, ctx: StageContext) -> StageResult:
    """Quarantine rows matching a reference set; add phash_mirror, mirror_cluster and semantic_cluster."""
    tables.require_columns(table, [ROW_ID, IMAGE, TEXT], STAGE)
    df = table.sort_values(ROW_ID, kind="stable").reset_index(drop=True)
    n = len(df)
    source = sources.of(ctx.data)

    # Each distinct image once: hashes (and embeddings) per image, broadcast to its rows.
    img_of_row, first = _distinct(df[IMAGE], df[CONTENT_DIGEST] if CONTENT_DIGEST in df.columns else None)
    todo = df.iloc[first][[IMAGE, *(c for c in (ORIENTATION, *images.PROBED) if c in df.columns)]].reset_index(drop=True)
    parts = parallel.map_batches(hash_batch, todo, batch_size=cfg.hash_batch_size, workers=ctx.workers,
                                 desc=STAGE, progress=ctx.progress, args=(source,))
    hashed = pd.concat(parts, ignore_index=True) if parts else hash_batch(todo, source)
    # The stage's own hashes (quality's pHash, recomputed: independent of quality's settings); the
    # pool's phash column is left as quality wrote it.
    own = hashed["phash"].to_numpy()[img_of_row] if n else np.zeros(0, object)
    mirror = hashed[PHASH_MIRROR].to_numpy()[img_of_row] if n else np.zeros(0, object)
    df[PHASH_MIRROR] = pd.Series(mirror, dtype="str")
    pool = df.assign(**{PHASH: pd.Series(own, dtype="str")})

    encoder, emb, model_digest = None, None, "none"
    stats: dict[str, Any] = {"n_images": int(len(first)), "n_undecoded": int((hashed["error"] != "").sum())}
    if cfg.model is not None:
        encoder = load_encoder(cfg.model, cfg.device)
        model_digest = dir_digest(cfg.model)
        emb, errors = embed_images(todo[IMAGE].tolist(), source, encoder, cfg.batch_size)
        stats["n_not_embedded"] = sum(1 for e in errors if e)

    # 1. Contamination: each reference set in name order; a row is named by the first set it matches.
    kind, ref_row, detail = np.full(n, "", object), np.full(n, -1, np.int64), np.full(n, "", object)
    which_set = np.full(n, "", object)
    per_set: dict[str, Any] = {}
    for name, data in sorted(cfg.reference_sets.items()):
        ref, info = reference_table(name, data, cfg, ctx, encoder, model_digest)
        k, r, d = _contamination(pool, name, ref, emb, img_of_row, cfg)
        new = (k != "") & (kind == "")
        kind[new], ref_row[new], detail[new], which_set[new] = k[new], r[new], d[new], name
        info["contaminated_rows"] = int((k != "").sum())
        info["by_kind"] = {w: int((k == w).sum()) for w in KINDS}
        info["matched_reference_rows"] = int(np.unique(r[k != ""]).size)
        per_set[name] = info
    stats["reference_sets"] = per_set
    hit = kind != ""

    # 2. Near-duplicates within the pool (rows kept): mirrored pHash, and semantic with a model.
    ids = df[ROW_ID].to_numpy(np.int64)
    keep_img = np.zeros(len(first), bool)
    keep_img[img_of_row[~hit]] = True
    img_ids = pd.Series(ids).groupby(img_of_row).min().reindex(range(len(first))).to_numpy(np.int64) if n else ids
    mpos, mh = hex_hashes(hashed[PHASH_MIRROR])
    ppos, ph = hex_hashes(hashed["phash"])
    mpos, mh = mpos[keep_img[mpos]], mh[keep_img[mpos]]
    ppos, ph = ppos[keep_img[ppos]], ph[keep_img[ppos]]
    q, b, _ = hamming_pairs(mh, ph, cfg.mirror_radius)
    mcl = components(len(first), mpos[q], ppos[b], img_ids)
    df[MIRROR_CLUSTER] = mcl[img_of_row] if n else np.zeros(0, np.int64)
    stats["mirror"] = _cluster_stats(mcl[img_of_row] if n else mcl, hit, cfg.mirror_radius, "radius")
    scl = np.full(len(first), -1, np.int64)
    if emb is not None:
        live = np.flatnonzero(keep_img & (np.linalg.norm(emb, axis=1) > 0))
        i, j, _, how = neighbour_pairs(emb[live], cfg.semantic_cosine, cfg.neighbours, cfg.exact_search_below,
                                       cfg.nprobe, cfg.device)
        scl = components(len(first), live[i], live[j], img_ids)
        stats["semantic"] = {**_cluster_stats(scl[img_of_row], hit, cfg.semantic_cosine, "cosine"), "search": how,
                             "device": _device(cfg.device), "model": str(cfg.model)}
    else:
        stats["semantic"] = "off: no decontam.model configured"
    df[SEMANTIC_CLUSTER] = scl[img_of_row] if n else np.zeros(0, np.int64)

    df[MATCH_SET] = pd.Series(which_set, dtype="str")
    df[MATCH_ROW] = ref_row
    df[MATCH_KIND] = pd.Series(kind, dtype="str")
    res = tables.partition(df, [("eval_contamination", pd.Series(hit), pd.Series(detail, dtype="str"))])
    kept = res.kept.drop(columns=[MATCH_SET, MATCH_ROW, MATCH_KIND])
    return StageResult(kept, res.quarantined, stats)


def _cluster_stats(cluster: np.ndarray, dropped: np.ndarray, threshold: float, name: str) -> dict[str, Any]:
    c = cluster[~dropped] if cluster.size else cluster
    linked = c[c >= 0]
    sizes = pd.Series(linked).value_counts()
    return {name: threshold, "n_clusters": int(sizes.size), "n_rows_in_clusters": int(linked.size),
            "largest_cluster": int(sizes.max()) if sizes.size else 0}
