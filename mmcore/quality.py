"""Quality: score every image on a reduced-size decode and quarantine by the registered checks.

Each distinct image is decoded once as gray at reduced size (JPEG ``draft``: most pixels are never
computed), then resized to a fixed ``analysis_size`` square so that no score depends on the
resolution. From that one small array come brightness percentiles, entropy, sharpness and a
perceptual hash (pHash); a checksum of the reduced pixels finds exact duplicates. Per image only
the decode, the resize and two histograms run; the scores are computed for a whole batch at once
(``Scorer``). An image that looks blurry or uniform in gray is measured again in colour before it
is flagged: a yellow shape on beige has almost no luminance edge, yet it is sharp.

A YCbCr or gray JPEG is decoded by libjpeg-turbo directly (simplejpeg: Pillow's pixels, about 15%
faster), which also reports damaged compressed data that Pillow would hand back with gray blocks:
such a file is ``corrupt_image`` (``strict_jpeg``). Every other file, and any JPEG libjpeg has
another complaint about, is decoded by Pillow, which decides; OpenCV's decoder is not used, as it
returns pixels for garbled files both refuse.

Checks live in ``mmcore.checks`` (score in [0, 1], flagged below a threshold). Near-duplicates
(pHash within ``phash_radius`` bits) share a ``dup_cluster`` id, which split uses as a group so
that near-duplicates never straddle splits; a later file with the same pixels as an earlier one is
quarantined as ``duplicate_image``. An optional CLIP-score check (``low_alignment``) runs when
``alignment_model`` names a local model.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from mmcore import checks, faults, images, parallel, sources, tables
from mmcore.base import StageContext, StrictModel
from mmcore.errors import ConfigError, MMPipeError, row_detail
from mmcore.tables import IMAGE, ROW_ID, TEXT, StageResult, broadcast, distinct_paths

STAGE = "quality"

REASONS = {
    "corrupt_image": "the image failed to decode at reduced size, or libjpeg reports its compressed data damaged",
    **faults.REASONS,
    **images.REASONS,  # refused by the decoding policy (file_changed: not what the probe saw)
    **{name: c.reason for name, c in checks.CHECKS.items()},
}

ERROR, DETAIL = "quality_error", "quality_detail"
ORIENTATION = "orientation"  # the probe's EXIF orientation column, passed to measure when present
# What the probe recorded of each file, passed to measure when present: a file that differs now is
# file_changed, and nothing larger than the probe accepted is decoded (images.DecodePolicy).
PROBED = images.PROBED
MEASURES = ("brightness_mean", "brightness_p5", "brightness_p99", "sharpness", "entropy")


class QualityConfig(StrictModel):
    """Which checks run, threshold overrides, decode sizes, near-duplicates and the CLIP score."""

    checks: tuple[str, ...] = Field(checks.DEFAULT_CHECKS, description="Checks to run, in order.")
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="Per-check threshold overrides (score units, 0..1)."
    )
    decode_size: int = Field(96, ge=8, description="Reduced decode: short side at least this (JPEG draft).")
    strict_jpeg: bool = Field(
        True, description="A JPEG whose compressed data libjpeg reports damaged is corrupt_image (False: kept, lost blocks gray)."
    )
    analysis_size: int = Field(96, ge=16, description="Side of the fixed square every score is computed on.")
    phash_radius: int = Field(4, ge=0, le=16, description="pHash Hamming distance for near-duplicates.")
    batch_size: int = Field(128, ge=1, description="Images per batch sent to a worker process.")
    alignment_model: Path | None = Field(None, description="Local CLIP model folder; None turns the check off.")
    alignment_threshold: float | None = Field(
        None, ge=-1, le=1, description="Minimum image-text cosine; 0.2 when neither this nor the fraction is set."
    )
    alignment_keep_fraction: float | None = Field(None, gt=0, le=1, description="Keep this top fraction by cosine.")
    alignment_batch_size: int = Field(64, ge=1, description="Images and captions per CLIP forward pass.")
    alignment_score: Literal["cosine", "match"] = Field(
        "cosine", description="cosine: the CLIP score; match: P(match) of the alignment model's matching head "
        "(train.fusion), stored as 2 P - 1 in clip_score so the threshold reads on one scale (0 = P 0.5)."
    )

    @field_validator("checks")
    @classmethod
    def _known_checks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        checks.validate_names(v)  # the config error leads with the field
        if "low_alignment" in v:
            raise ValueError("low_alignment is enabled by quality.alignment_model, not listed in quality.checks")
        return v

    @field_validator("thresholds")
    @classmethod
    def _known_thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        checks.validate_names(v)
        if "low_alignment" in v:
            raise ValueError("set quality.alignment_threshold or alignment_keep_fraction, not thresholds.low_alignment")
        bad = {k: t for k, t in v.items() if not 0.0 <= t <= 1.0}
        if bad:
            raise ValueError(f"thresholds must be in [0, 1] (score units), got {bad}")
        return v

    @model_validator(mode="after")
    def _alignment(self) -> QualityConfig:
        if self.alignment_threshold is not None and self.alignment_keep_fraction is not None:
            raise ValueError("set alignment_threshold or alignment_keep_fraction, not both")
        return self

    def threshold(self, name: str) -> float:
        return self.thresholds.get(name, checks.CHECKS[name].threshold)


# --------------------------------------------------------------------------- per image


# Every score is computed for a whole batch at once from two 256-bin histograms per image (gray
# levels and gray-level steps between neighbours): per image only the OpenCV calls run, and the
# arithmetic runs once per batch, not once per image.
_LEVELS = np.arange(256, dtype=np.int64)
_LEVELS_DESC = _LEVELS[::-1].copy()


def _hist(a: np.ndarray) -> np.ndarray:
    """256-bin histogram of a uint8 array, as int64 (cv2.calcHist is several times np.bincount's speed)."""
    return cv2.calcHist([np.ascontiguousarray(a)], [0], None, [256], [0, 256]).ravel().astype(np.int64)


def _step_hist(a: np.ndarray) -> np.ndarray:
    """256-bin histogram of the absolute steps between vertical and horizontal neighbours."""
    return _hist(cv2.absdiff(a[1:], a[:-1])) + _hist(cv2.absdiff(a[:, 1:], a[:, :-1]))


def _value_range(hist: np.ndarray) -> np.ndarray:
    """max - min level of each row of a (m, 256) histogram stack (0 for an empty row)."""
    nz = hist > 0
    lo = nz.argmax(1)
    hi = 255 - nz[:, ::-1].argmax(1)
    return np.where(nz.any(1), hi - lo, 0).astype(np.float64)


def _top_step_mean(steps: np.ndarray) -> np.ndarray:
    """Mean of the strongest 0.2% steps of each row of a (m, 256) step histogram stack, in O(256)."""
    k = np.maximum(1, steps.sum(1) // 500)
    desc = steps[:, ::-1]
    before = np.cumsum(desc, 1) - desc  # steps stronger than each level
    take = np.clip(k[:, None] - before, 0, desc)
    return (take @ _LEVELS_DESC) / k


def _sharpness_of(steps: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Sharpness from step histograms and intensity ranges, summed over channels (last axis but one).

    ``steps`` is (m, c, 256), ``ranges`` (m, c): the strongest 0.2% steps over the intensity range
    (+16 so flat noise is blurry). A step edge scores ~0.3-1 at any contrast; a Gaussian blur of
    sigma s pixels (at the analysis size) scores about 0.4 / s. A flat channel adds nothing.
    """
    m, c = ranges.shape
    top = _top_step_mean(steps.reshape(m * c, 256)).reshape(m, c)
    return top.sum(1) / (ranges.sum(1) + 16.0)


def _entropy_of(hist: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each row of a (m, 256) histogram stack."""
    p = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = -np.where(hist > 0, p * np.log2(p), 0.0).sum(1)
    return e + 0.0  # + 0.0 turns -0.0 into 0.0


def _sharpness(channels: list[np.ndarray]) -> float:
    """Sharpness of one image given as its channels (see ``_sharpness_of``)."""
    steps = np.stack([_step_hist(a) for a in channels])[None]
    ranges = np.array([[float(a.max()) - float(a.min()) for a in channels]])
    return float(_sharpness_of(steps, ranges)[0])


def _entropy(hist: np.ndarray) -> float:
    """Shannon entropy (bits) of a 256-bin histogram."""
    return float(_entropy_of(hist[None])[0])


def _phash_small(a: np.ndarray) -> np.ndarray:
    """The 32x32 float32 reduction a pHash is computed from."""
    return cv2.resize(a, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)


def phash_of(small: np.ndarray) -> np.ndarray:
    """64-bit perceptual hashes of a (m, 32, 32) float32 stack: 8x8 lowest DCT frequencies above their median.

    ``cv2.dct`` per image: its exact zeros keep a flat image's hash at ``8000000000000000`` whatever
    its gray level (a matrix product leaves 1e-14 noise that would turn into hash bits).
    """
    low = np.array([cv2.dct(x)[:8, :8].ravel() for x in small]).reshape(len(small), 64)
    srt = np.sort(low, 1)
    bits = low > (srt[:, 31:32] + srt[:, 32:33]) / 2
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def phash(a: np.ndarray) -> int:
    """64-bit perceptual hash of one gray image (see ``phash_of``)."""
    return int(phash_of(_phash_small(a)[None])[0])


def _analysis(arr: np.ndarray, s: int) -> np.ndarray:
    """The fixed s x s analysis image. The reduced decode is already within 2x of s, so bilinear
    resampling loses little and costs a tenth of area averaging at a non-integer ratio."""
    if arr.shape[0] >= 2 * s and arr.shape[1] >= 2 * s:
        return cv2.resize(arr, (s, s), interpolation=cv2.INTER_AREA)
    return cv2.resize(arr, (s, s), interpolation=cv2.INTER_LINEAR)


class Scorer:
    """Collects gray images one by one, then scores them all at once (``scores``).

    Per image only the resize to the analysis size and its level histogram run; the neighbour
    steps, the pHash reduction and all the arithmetic run once over the whole stack.
    """

    def __init__(self, n: int, s: int):
        self.s = s
        self.stack = np.zeros((n, s, s), np.uint8)
        self.hist = np.zeros((n, 256), np.int64)

    def add(self, i: int, gray: np.ndarray) -> None:
        a = self.stack[i] = _analysis(gray, self.s)
        self.hist[i] = _hist(a)

    def _step_hists(self, stack: np.ndarray) -> np.ndarray:
        """(m, 256) histograms of |vertical| and |horizontal| neighbour steps, as ``_step_hist``."""
        m, s = len(stack), self.s
        flat, rows = stack.reshape(m, s * s), stack.reshape(m * s, s)
        steps = np.empty((m, 2, s * (s - 1)), np.uint8)  # one image's steps side by side: one calcHist
        steps[:, 0] = cv2.absdiff(flat[:, s:], flat[:, :-s])
        steps[:, 1] = cv2.absdiff(rows[:, 1:], rows[:, :-1]).reshape(m, s * (s - 1))
        return np.stack([_hist(x) for x in steps]) if m else np.zeros((0, 256), np.int64)

    def _phash_smalls(self, stack: np.ndarray) -> np.ndarray:
        m, s = len(stack), self.s
        if s % 32 == 0 and m:  # area reduction by a whole factor: one resize for the stack
            small = cv2.resize(stack.reshape(m * s, s), (32, m * 32), interpolation=cv2.INTER_AREA)
            return small.reshape(m, 32, 32).astype(np.float32)
        return np.stack([_phash_small(a) for a in stack]) if m else np.zeros((0, 32, 32), np.float32)

    def scores(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Brightness percentiles, entropy, sharpness and pHash of the images added at ``idx``."""
        stack = self.stack if len(idx) == len(self.stack) and (np.diff(idx) == 1).all() else self.stack[idx]
        hist = self.hist[idx]
        size = float(self.s * self.s)
        cdf = np.cumsum(hist, 1) / size
        return {
            "brightness_mean": (hist @ _LEVELS) / size / 255.0,
            "brightness_p5": (cdf < 0.05).sum(1) / 255.0,
            "brightness_p99": (cdf < 0.99).sum(1) / 255.0,
            "entropy": _entropy_of(hist),
            "sharpness": _sharpness_of(self._step_hists(stack)[:, None], _value_range(hist)[:, None]),
            "phash": phash_of(self._phash_smalls(stack)),
        }


def _colour_recheck(data: bytes, cfg: QualityConfig, orientation: int | None,
                    policy: images.DecodePolicy = images.DEFAULT_POLICY) -> tuple[float, float]:
    """Sharpness and the largest channel entropy of the colour decode (isoluminant shapes)."""
    rgb = images.decode_reduced(data, cfg.decode_size, True, orientation, cfg.strict_jpeg, policy)
    c = _analysis(rgb, cfg.analysis_size)
    chans = [np.ascontiguousarray(c[..., i]) for i in range(3)]
    return _sharpness(chans), max(_entropy(_hist(x)) for x in chans)


def _orientation_tag(value) -> int | None:
    """The probe's EXIF orientation (1-8); None (read it from the file) for anything else."""
    try:
        tag = int(value)
    except (TypeError, ValueError):
        return None
    return tag if 1 <= tag <= 8 else None


def _policies(rows: pd.DataFrame) -> list[images.DecodePolicy]:
    """Per row, the decoding policy the probe's record allows (the default one without it)."""
    return images.probed_policies(rows)


def measure(rows: pd.DataFrame, cfg: QualityConfig, root: sources.ImageSource | str) -> pd.DataFrame:
    """Scores of the images of ``rows`` (columns row_id, image_path, and the probe's EXIF
    ``orientation`` when known), one row each.

    Never raises on a bad file: ``quality_error`` is 'corrupt_image' and the scores are NaN.
    """
    cv2.setNumThreads(1)  # one process per core already; threads would oversubscribe
    source = sources.as_source(root)
    sharp_min = cfg.threshold("blurry") * checks.SHARPNESS_FULL
    entropy_min = cfg.threshold("low_information") * checks.ENTROPY_BITS
    paths = rows[IMAGE].tolist()
    n = len(paths)
    # Known orientations spare a JPEG Pillow's header parse (see images.decode_reduced).
    tags = [_orientation_tag(t) for t in rows[ORIENTATION]] if ORIENTATION in rows else [None] * n
    policies = _policies(rows)
    scorer = Scorer(n, cfg.analysis_size)
    sizes, sums, errors, details = [""] * n, [""] * n, [""] * n, [""] * n
    with images.pixel_limit(None):  # the probe refused oversized headers already
        for i, rel in enumerate(paths):
            try:
                data = sources.read_checked(source, rel, policies[i])  # transient errors retried; byte limit
                # libjpeg directly for plain JPEGs (damaged data refused), Pillow for the rest.
                gray = images.decode_reduced(data, cfg.decode_size, False, tags[i], cfg.strict_jpeg, policies[i])
                scorer.add(i, gray)
                # Exact-pixel key (built below): size, pHash, CRC-32 + Adler-32 of the reduced
                # pixels (64 bits of checksum, far cheaper than a cryptographic hash).
                buf = np.ascontiguousarray(gray)
                sizes[i], sums[i] = f"{gray.shape[1]}x{gray.shape[0]}", f"{zlib.crc32(buf):08x}{zlib.adler32(buf):08x}"
            except faults.ReadError as e:  # unreadable now (the probe read it): its own reason
                errors[i], details[i] = e.reason, str(e)
            except Exception as e:  # any failure to decode quarantines the row, never the batch
                # (MemoryError included: one file's cost is its row's, never the run's)
                errors[i], details[i] = images.refusal_reason(e) or "corrupt_image", row_detail(e)
    ok = np.flatnonzero(np.array([not e for e in errors], dtype=bool))
    out = pd.DataFrame({ROW_ID: rows[ROW_ID].to_numpy(np.int64)})
    cols = {c: np.full(n, np.nan) for c in MEASURES}
    hashes, keys = [""] * n, [""] * n
    if len(ok):
        sc = scorer.scores(ok)
        for c in MEASURES:
            cols[c][ok] = sc[c]
        # Luminance looks blurry or flat: look at colour before flagging (a yellow shape on beige).
        for j in np.flatnonzero((sc["sharpness"] < sharp_min) | (sc["entropy"] < entropy_min)):
            i = ok[j]
            try:  # read again: holding a batch of files in memory would cost more than these few reads
                sharp, ent = _colour_recheck(sources.read_checked(source, paths[i], policies[i]), cfg, tags[i], policies[i])
            except Exception:  # it decoded in gray a moment ago; if not now, the gray scores stand
                continue
            cols["sharpness"][i] = max(cols["sharpness"][i], sharp)
            cols["entropy"][i] = max(cols["entropy"][i], ent)
        for j, i in enumerate(ok):
            hashes[i] = f"{int(sc['phash'][j]):016x}"
            keys[i] = f"{sizes[i]}:{hashes[i]}:{sums[i]}"
    for c in MEASURES:
        out[c] = cols[c]
    for c, v in (("phash", hashes), ("pixel_hash", keys), (ERROR, errors), (DETAIL, details)):
        out[c] = pd.Series(v, dtype="str")
    return out


# --------------------------------------------------------------------------- near-duplicates


def _pairs_within(h: np.ndarray, members: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) of ``members`` whose hashes differ in at most ``radius`` bits."""
    src, dst = [], []
    step = max(1, 4_000_000 // max(len(members), 1))  # bound the distance block in memory
    for lo in range(0, len(members), step):
        block = members[lo : lo + step]
        d = np.bitwise_count(h[block][:, None] ^ h[members][None, :])
        i, j = np.nonzero(d <= radius)
        keep = block[i] < members[j]
        src.append(block[i][keep])
        dst.append(members[j][keep])
    return np.concatenate(src), np.concatenate(dst)


def near_duplicate_labels(hashes: np.ndarray, radius: int) -> np.ndarray:
    """A component label per hash (deterministic ids) for the graph 'within ``radius`` bits'.

    Multi-index hashing: split the 64 bits into ``radius + 1`` bands; two hashes within the radius
    agree exactly on at least one band (pigeonhole), so only hashes sharing a band value are
    compared. Cost grows with bucket sizes, not with n squared.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    uniq, inv = np.unique(h, return_inverse=True)
    m = len(uniq)
    bands = radius + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    src, dst = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for b in range(bands if radius > 0 else 0):
        width = edges[b + 1] - edges[b]
        key = (uniq >> np.uint64(edges[b])) & np.uint64((1 << width) - 1)
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        ends = np.r_[starts[1:], m]
        for s, e in zip(starts, ends):
            if e - s > 1:
                i, j = _pairs_within(uniq, order[s:e], radius)
                src.append(i)
                dst.append(j)
    i, j = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(m, m))
    _, comp = connected_components(graph, directed=False)
    return comp[inv].astype(np.int64)


# --------------------------------------------------------------------------- alignment (CLIP score)


def clip_scores(table: pd.DataFrame, model_dir: Path, root: sources.ImageSource | str, batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
    """Cosine similarity of each row's image and caption under a local CLIP model (no download).

    Returns the scores and, per row, '' or why its image could not be decoded (score NaN then).
    """
    import torch

    from mmcore.clip_model import Encoder  # the one model loader: the model's own tokenizer and preprocessing

    model_dir = Path(model_dir)
    try:
        enc = Encoder.load(model_dir, where="quality.alignment_model")
    except MMPipeError as e:  # not a CLIP folder, no tokenizer or processor: a config mistake, one line
        raise ConfigError(f"quality.alignment_model: cannot load a CLIP model from {model_dir}: "
                          f"{str(e).removeprefix('quality.alignment_model: ')}") from None
    source = sources.as_source(root)
    n = len(table)
    out = np.full(n, np.nan)
    texts = table[TEXT].tolist()
    # Each distinct image is decoded and embedded once, however many captions it has: rows are
    # taken in image order, and a batch reuses the embeddings of the batch before it.
    codes, uniq = pd.factorize(table[IMAGE].to_numpy(), use_na_sentinel=False)
    order = np.argsort(codes, kind="stable")
    image_error = [""] * len(uniq)

    def load(c: int):  # at most once per image: a failure is remembered in image_error
        try:
            return sources.load_rgb(source, uniq[c], max_side=448)
        except Exception as e:  # changed or broken since it was scored: its rows, never the batch
            image_error[c] = row_detail(e, "alignment decode: ")
            return None

    previous: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            rows = order[lo : lo + batch_size]
            todo = [(c, im) for c in dict.fromkeys(codes[rows].tolist())
                    if c not in previous and not image_error[c] and (im := load(c)) is not None]
            emb = {c: previous[c] for c in codes[rows].tolist() if c in previous}
            if todo:
                vecs = torch.from_numpy(enc.encode_images([im for _, im in todo], batch_size=batch_size))
                emb.update(zip((c for c, _ in todo), vecs))
            previous = emb
            rows = [i for i in rows.tolist() if codes[i] in emb]
            if not rows:
                continue
            txt = torch.from_numpy(enc.encode_texts([texts[i] for i in rows], batch_size=batch_size))
            out[rows] = (torch.stack([emb[codes[i]] for i in rows]) * txt).sum(-1).numpy()
    return out, [image_error[c] for c in codes]


def match_scores(table: pd.DataFrame, model_dir: Path, root: sources.ImageSource | str,
                 batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
    """2 P(match) - 1 of each row's image and caption by the model's matching head (``train.fusion``):
    on the cosine's scale, so ``alignment_threshold`` and the report read the same way.

    Returns the scores and, per row, '' or why its image could not be decoded (score NaN then).
    """
    from mmcore import clip_model, fusion

    try:
        model = clip_model.load(Path(model_dir), where="quality.alignment_model")
        fusion.require_head(model)
    except MMPipeError as e:  # no model, or one without a head: a config mistake, one line
        raise ConfigError(f"quality.alignment_score match: {str(e).removeprefix('quality.alignment_model: ')}") from None
    source = sources.as_source(root)
    n, texts, paths = len(table), table[TEXT].tolist(), table[IMAGE].tolist()
    out, errors = np.full(n, np.nan), [""] * n
    for lo in range(0, n, batch_size):
        rows, images = [], []
        for i in range(lo, min(n, lo + batch_size)):
            try:
                images.append(sources.load_rgb(source, paths[i], max_side=448))
                rows.append(i)
            except Exception as e:  # changed or broken since it was measured: its row, never the batch
                errors[i] = row_detail(e, "alignment decode: ")
        if rows:
            p = fusion.match_probability(model, images, [texts[i] for i in rows], batch_size=batch_size)
            out[rows] = 2 * p - 1
    return out, errors


# --------------------------------------------------------------------------- stage


def _quantiles(s: pd.Series) -> dict[str, float]:
    s = s.dropna()
    if s.empty:
        return {}
    q = s.quantile([0.0, 0.01, 0.05, 0.5, 0.95, 1.0]).to_numpy()
    return {k: round(float(v), 4) for k, v in zip(("min", "p1", "p5", "p50", "p95", "max"), q)}


def decide(table: pd.DataFrame, measurements: pd.DataFrame, cfg: QualityConfig) -> StageResult:
    """Score columns, dup_cluster and the quarantine, from ``measure``'s rows (one per distinct path).

    ``table`` may carry a ``clip_score`` column (see ``clip_scores``) for the alignment check.
    """
    m = broadcast(table, measurements)
    df = table.copy()
    for c in (*MEASURES, "phash", "pixel_hash"):
        df[c] = m[c]
    err = m[ERROR].fillna("corrupt_image")
    ok = err == ""
    names = list(cfg.checks)
    thresholds = {n: cfg.threshold(n) for n in names}
    alignment = "clip_score" in df.columns
    if alignment:
        names.append("low_alignment")
        cos = df["clip_score"].to_numpy(np.float64)
        if cfg.alignment_keep_fraction is not None:
            # Rows without a caption (clean.keep_uncaptioned) have no score: not in the fraction, never flagged.
            scored = ok.to_numpy() & np.isfinite(cos)
            cut = float(np.quantile(cos[scored], 1 - cfg.alignment_keep_fraction)) if scored.any() else -1.0
            # Rows at the cut stay: "< threshold" flags strictly below it.
            thresholds["low_alignment"] = (cut + 1) / 2
        else:
            thr = cfg.alignment_threshold if cfg.alignment_threshold is not None else 2 * checks.CHECKS["low_alignment"].threshold - 1
            thresholds["low_alignment"] = (thr + 1) / 2
    for name in names:
        cols = checks.evaluate(df[ok], checks.CHECKS[name], thresholds[name])
        for c in cols.columns:
            df[c] = cols[c].reindex(df.index)
        df[checks.issue_column(name)] = df[checks.issue_column(name)].fillna(False).astype(bool)
    # Near-duplicate clusters over decoded images, named by their lowest row_id.
    dup = df[ROW_ID].to_numpy(np.int64).copy()
    if ok.any():
        hashes = np.array([int(x, 16) for x in df.loc[ok, "phash"]], dtype=np.uint64)
        labels = near_duplicate_labels(hashes, cfg.phash_radius)
        dup[ok.to_numpy()] = pd.Series(df.loc[ok, ROW_ID].to_numpy()).groupby(labels).transform("min").to_numpy()
    df["dup_cluster"] = dup
    detail = {
        name: checks.score_column(name) + " " + df[checks.score_column(name)].round(3).astype(str) + f" < {thresholds[name]:.3f}"
        for name in names
    }
    partition = [(code, err == code, m[DETAIL]) for code in dict.fromkeys(("corrupt_image", *faults.REASONS, *images.REASONS))]
    partition += [(n, df[checks.issue_column(n)], detail[n]) for n in names]
    res = tables.partition(df.drop(columns=["pixel_hash"]), partition)
    kept = res.kept.copy()
    stats = {
        "n_images": int(len(measurements)),
        "checks": names,
        "thresholds": {n: round(t, 6) for n, t in thresholds.items()},
        "flagged": {n: int(df[checks.issue_column(n)].sum()) for n in names},
        "scores": {checks.score_column(n): _quantiles(df[checks.score_column(n)]) for n in names},
        "n_dup_clusters": int(pd.Series(dup[ok.to_numpy()]).nunique()),
        "n_rows_in_near_dup_clusters": int(pd.Series(dup).duplicated(keep=False)[ok.to_numpy()].sum()),
        "alignment": f"on ({cfg.alignment_score})" if alignment else "off: no quality.alignment_model configured",
    }
    return StageResult(kept, res.quarantined, stats)


def distinct_images(table: pd.DataFrame) -> pd.DataFrame:
    """``measure``'s input: the first row of each distinct path, with the probe's orientation if any."""
    return distinct_paths(table, extra=(ORIENTATION, *PROBED))


def run(table: pd.DataFrame, cfg: QualityConfig, ctx: StageContext) -> StageResult:
    """Measure each distinct image in worker processes, add the CLIP score if configured, ``decide``."""
    tables.require_columns(table, [ROW_ID, IMAGE, "width", "height"], STAGE)
    root = sources.of(ctx.data)
    todo = distinct_images(table)
    parts = parallel.map_batches(
        measure, todo, batch_size=cfg.batch_size, workers=ctx.workers, desc=STAGE, progress=ctx.progress,
        args=(cfg, root),
    )
    measurements = pd.concat(parts, ignore_index=True) if parts else measure(todo, cfg, root)
    if cfg.alignment_model is not None:
        table = table.copy()
        m = broadcast(table, measurements)
        # A row without a caption (text "", kept by clean.keep_uncaptioned for the pseudo stage) is not
        # scored: its NaN score never flags it as misaligned.
        ok = (m[ERROR] == "").to_numpy() & (table[TEXT].fillna("").astype("str").str.strip() != "").to_numpy()
        scores = np.full(len(table), np.nan)
        if ok.any():
            score = match_scores if cfg.alignment_score == "match" else clip_scores
            scores[ok], errors = score(table[ok], cfg.alignment_model, root, cfg.alignment_batch_size)
            # An image that no longer decodes is quarantined as corrupt, like any other.
            failed = {p: e for p, e in zip(table.loc[ok, IMAGE], errors) if e}
            if failed:
                measurements = measurements.copy()
                paths = table.set_index(ROW_ID)[IMAGE].reindex(measurements[ROW_ID]).to_numpy()
                hit = np.array([p in failed for p in paths], dtype=bool)
                measurements.loc[hit, ERROR] = "corrupt_image"
                measurements.loc[hit, DETAIL] = [failed[p] for p in paths[hit]]
        table["clip_score"] = scores
    return decide(table, measurements, cfg)


def describe(kept: pd.DataFrame, stats: dict) -> str:
    """A compact text summary for ``mmpipe inspect RUN_DIR quality``: quantiles, thresholds, counts."""
    lines = [f"quality: {stats.get('n_kept', len(kept))} kept / {stats.get('n_rows', '?')} rows, "
             f"{stats.get('n_images', '?')} distinct images; alignment {stats.get('alignment', 'off')}"]
    header = f"{'check':<16}{'threshold':>10}{'flagged':>9}{'quarantined':>12}   score quantiles (all rows) min p1 p5 p50 p95 max"
    lines.append(header)
    reasons = stats.get("reasons", {})
    for name in stats.get("checks", [c for c in checks.DEFAULT_CHECKS]):
        col = checks.score_column(name)
        q = stats.get("scores", {}).get(col) or (_quantiles(kept[col]) if col in kept else {})
        qs = " ".join(f"{v:.3f}" for v in q.values()) if q else "-"
        thr = stats.get("thresholds", {}).get(name, checks.CHECKS[name].threshold)
        lines.append(f"{name:<16}{thr:>10.3f}{stats.get('flagged', {}).get(name, 0):>9}{reasons.get(name, 0):>12}   {qs}")
    other = {k: v for k, v in reasons.items() if k not in stats.get("checks", ())}
    if other:
        lines.append("other reasons: " + ", ".join(f"{k}={v}" for k, v in sorted(other.items())))
    lines.append(f"near-duplicate clusters: {stats.get('n_dup_clusters', '?')} "
                 f"({stats.get('n_rows_in_near_dup_clusters', '?')} rows share a cluster)")
    return "\n".join(lines)
