"""Retrieval and zero-shot metrics on embeddings, per query, and bootstrap confidence intervals.

Retrieval follows CLIP_benchmark's ``zeroshot_retrieval``: scores are cosine similarities, a
text query (text-to-image) has one correct image, and an image query (image-to-text) is a hit at
k if *any* of its captions is in the top k. Every function returns per-query values (hit, rank,
NDCG@10) so that a bootstrap resamples queries without recomputing similarities. Similarities
are computed one block of queries at a time, so memory is ``chunk x gallery`` floats whatever
the number of queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# metrics.json's top-level keys that are not split names (evaluate writes it, the report reads it).
NOT_SPLITS = ("chance", "n_queries", "baseline", "n_decode_failed", "matching", "rerank")

NDCG_K = 10


@dataclass(frozen=True)
class RetrievalPerQuery:
    """Per-query ranks and NDCG@10 in both directions.

    ``i2t_rank[i]`` is the 1-based rank of image i's best-ranked caption; ``t2i_rank[t]`` the rank
    of caption t's image. R@k per query is ``rank <= k``.
    """

    i2t_rank: np.ndarray
    t2i_rank: np.ndarray
    i2t_ndcg: np.ndarray
    t2i_ndcg: np.ndarray

    def values(self, ks: Sequence[int] = (1, 5, 10)) -> dict[str, tuple[np.ndarray, str]]:
        """Metric name -> (per-query values, statistic: "mean" or "median")."""
        out: dict[str, tuple[np.ndarray, str]] = {}
        for d in ("i2t", "t2i"):
            rank = getattr(self, f"{d}_rank")
            for k in ks:
                out[f"{d}_r{k}"] = ((rank <= k).astype(np.float64), "mean")
            out[f"{d}_mean_rank"] = (rank.astype(np.float64), "mean")
            out[f"{d}_median_rank"] = (rank.astype(np.float64), "median")
            out[f"{d}_ndcg{NDCG_K}"] = (getattr(self, f"{d}_ndcg"), "mean")
        return out


def _device(device: str | None):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _discounts(n: int, device):
    import torch

    return 1.0 / torch.log2(torch.arange(2, n + 2, dtype=torch.float64, device=device))


def retrieval(
    img_emb: np.ndarray,
    txt_emb: np.ndarray,
    txt_to_img: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
    device: str | None = "cpu",
) -> RetrievalPerQuery:
    """Per-query retrieval results for L2-normalised embeddings.

    Args:
        txt_to_img: for each caption, the index of its image in ``img_emb``.
        ks: kept for symmetry with the summary; ranks answer every k.
        chunk: queries per block; peak extra memory is about 3 x ``chunk x gallery`` float32
            (1.1 GiB at chunk 1024 against 100,000 captions; see bench/results/evaluate.md).
    """
    import torch  # here, not at the top: importing the config must not pay for torch

    n_img, n_txt = len(img_emb), len(txt_emb)
    txt_to_img = np.asarray(txt_to_img, dtype=np.int64)
    if txt_to_img.shape != (n_txt,) or (n_txt and (txt_to_img.min() < 0 or txt_to_img.max() >= n_img)):
        raise ValueError(f"txt_to_img must hold {n_txt} image indices in [0, {n_img}), got shape {txt_to_img.shape}")
    if n_txt and np.bincount(txt_to_img, minlength=n_img).min() == 0:
        raise ValueError("every image needs at least one caption (an image without one cannot be retrieved)")
    dev = _device(device)
    img = torch.as_tensor(np.ascontiguousarray(img_emb, dtype=np.float32), device=dev)
    txt = torch.as_tensor(np.ascontiguousarray(txt_emb, dtype=np.float32), device=dev)
    t2i = torch.as_tensor(txt_to_img, device=dev)
    n_pos = torch.bincount(t2i, minlength=n_img)
    disc = _discounts(NDCG_K, dev)
    ideal = torch.cumsum(disc, 0)  # IDCG for 1..10 positives

    t2i_rank = np.empty(n_txt, dtype=np.int64)
    t2i_ndcg = np.empty(n_txt, dtype=np.float64)
    for a in range(0, n_txt, chunk):
        s = txt[a : a + chunk] @ img.T  # (chunk, n_img)
        rows = torch.arange(len(s), device=dev)
        pos = s[rows, t2i[a : a + chunk]]
        # The positive's score comes from the same matrix, so ranks agree with topk exactly
        # (barring ties, where topk's order is arbitrary).
        rank = (s > pos[:, None]).sum(1) + 1
        t2i_rank[a : a + chunk] = rank.cpu().numpy()
        hit = rank <= NDCG_K
        t2i_ndcg[a : a + chunk] = torch.where(hit, 1.0 / torch.log2(rank.double() + 1), 0.0).cpu().numpy()

    i2t_rank = np.empty(n_img, dtype=np.int64)
    i2t_ndcg = np.empty(n_img, dtype=np.float64)
    kk = min(NDCG_K, n_txt)
    for a in range(0, n_img, chunk):
        s = img[a : a + chunk] @ txt.T  # (chunk, n_txt)
        b = a + len(s)
        mine = (t2i >= a) & (t2i < b)
        cols = torch.nonzero(mine).squeeze(1)
        best = torch.full((len(s),), -torch.inf, device=dev, dtype=s.dtype)
        best.scatter_reduce_(0, t2i[cols] - a, s[t2i[cols] - a, cols], reduce="amax")
        # A caption scoring above the image's best caption is necessarily a wrong one.
        rank = (s > best[:, None]).sum(1) + 1
        i2t_rank[a:b] = rank.cpu().numpy()
        top = torch.topk(s, kk, dim=1).indices
        rel = (t2i[top] == torch.arange(a, b, device=dev)[:, None]).double()
        dcg = (rel * disc[:kk]).sum(1)
        idcg = ideal[torch.clamp(n_pos[a:b], max=NDCG_K) - 1]
        i2t_ndcg[a:b] = (dcg / idcg).cpu().numpy()
    return RetrievalPerQuery(i2t_rank, t2i_rank, i2t_ndcg, t2i_ndcg)


def retrieval_chance(txt_to_img: np.ndarray, n_img: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Expected R@k and mean rank of a random ranking, for the same images and captions."""
    n_txt = len(txt_to_img)
    c = np.bincount(np.asarray(txt_to_img, dtype=np.int64), minlength=n_img).astype(np.float64)
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_r{k}"] = min(k, n_img) / n_img
        # P(none of an image's c captions in a random top k of n_txt): hypergeometric.
        miss = np.ones_like(c)
        for j in range(min(k, n_txt)):
            miss *= np.clip((n_txt - c - j) / (n_txt - j), 0, None)
        out[f"i2t_r{k}"] = float(np.mean(1 - miss))
    out["t2i_mean_rank"] = (n_img + 1) / 2
    # Rank of the best of c positives among n_txt random: (n_txt + 1) / (c + 1).
    out["i2t_mean_rank"] = float(np.mean((n_txt + 1) / (c + 1)))
    return out


# --------------------------------------------------------------------------- zero-shot


def class_embeddings(encode_texts: Callable[[list[str]], np.ndarray], classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """CLIP_benchmark's classifier: per class, the normalised mean of its normalised prompt embeddings.

    Templates use ``{}`` or ``{c}`` for the class name.
    """
    prompts = [t.format(name, c=name) for name in classnames for t in templates]
    e = np.asarray(encode_texts(prompts), dtype=np.float32).reshape(len(classnames), len(templates), -1)
    e = e / np.linalg.norm(e, axis=2, keepdims=True).clip(1e-12)
    w = e.mean(axis=1)
    return (w / np.linalg.norm(w, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


@dataclass(frozen=True)
class ZeroShotPerQuery:
    """Per-image predictions: true class index, predicted index, and the rank of the true class."""

    target: np.ndarray
    pred: np.ndarray
    true_rank: np.ndarray
    n_classes: int

    def values(self) -> dict[str, tuple[np.ndarray, str | Callable]]:
        out: dict[str, tuple[np.ndarray, str | Callable]] = {"acc1": ((self.true_rank <= 1).astype(np.float64), "mean")}
        if self.n_classes >= 5:  # as CLIP_benchmark: acc@5 only with at least 5 classes
            out["acc5"] = ((self.true_rank <= 5).astype(np.float64), "mean")
        pairs = np.stack([self.target, self.pred], axis=1)
        out["balanced_acc"] = (pairs, lambda p: balanced_accuracy(p[..., 0], p[..., 1], self.n_classes))
        out["macro_f1"] = (pairs, lambda p: macro_f1(p[..., 0], p[..., 1], self.n_classes))
        return out

    def confusion(self) -> np.ndarray:
        return _confusion(self.target[None], self.pred[None], self.n_classes)[0]


def zeroshot(img_emb: np.ndarray, class_emb: np.ndarray, target: np.ndarray, chunk: int = 4096) -> ZeroShotPerQuery:
    """Classify each image by its most similar class embedding."""
    target = np.asarray(target, dtype=np.int64)
    c = len(class_emb)
    pred = np.empty(len(img_emb), dtype=np.int64)
    rank = np.empty(len(img_emb), dtype=np.int64)
    for a in range(0, len(img_emb), chunk):
        logits = img_emb[a : a + chunk] @ class_emb.T
        t = target[a : a + chunk]
        pred[a : a + chunk] = logits.argmax(1)
        rank[a : a + chunk] = (logits > logits[np.arange(len(t)), t][:, None]).sum(1) + 1
    return ZeroShotPerQuery(target, pred, rank, c)


def _confusion(target: np.ndarray, pred: np.ndarray, c: int) -> np.ndarray:
    """Batched confusion matrices: (B, n) labels -> (B, c, c), rows true, columns predicted."""
    b = target.shape[0]
    flat = (np.arange(b)[:, None] * c * c + target * c + pred).ravel()
    return np.bincount(flat, minlength=b * c * c).reshape(b, c, c)


def balanced_accuracy(target: np.ndarray, pred: np.ndarray, c: int) -> np.ndarray | float:
    """Mean recall over the classes present (scikit-learn's ``balanced_accuracy_score``), batched."""
    t, p = np.atleast_2d(target), np.atleast_2d(pred)
    cm = _confusion(t, p, c)
    support = cm.sum(2)
    recall = np.diagonal(cm, axis1=1, axis2=2) / np.maximum(support, 1)
    out = (recall * (support > 0)).sum(1) / np.maximum((support > 0).sum(1), 1)
    return out if np.ndim(target) == 2 else float(out[0])


def macro_f1(target: np.ndarray, pred: np.ndarray, c: int) -> np.ndarray | float:
    """F1 averaged over classes present in target or prediction (scikit-learn's macro F1), batched."""
    t, p = np.atleast_2d(target), np.atleast_2d(pred)
    cm = _confusion(t, p, c)
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    support, predicted = cm.sum(2), cm.sum(1)
    f1 = 2 * tp / np.maximum(support + predicted, 1)
    present = (support + predicted) > 0
    out = (f1 * present).sum(1) / np.maximum(present.sum(1), 1)
    return out if np.ndim(target) == 2 else float(out[0])


# --------------------------------------------------------------------------- image-text matching

MATCH_THRESHOLD = 0.5  # P(match) at or above which a pair is called a match


def _counts(x: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    """(tp, fp, fn, n) per resample of (B, n, 2) [probability, label] pairs."""
    pred, y = x[..., 0] >= threshold, x[..., 1] > 0.5
    return (pred & y).sum(-1), (pred & ~y).sum(-1), (~pred & y).sum(-1), x.shape[-2]


def _safe_div(a: np.ndarray, b: np.ndarray, empty: float = np.nan) -> np.ndarray:
    """a / b, ``empty`` where b is 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.full(np.broadcast(a, b).shape, empty), where=b > 0)


def auroc(x: np.ndarray) -> np.ndarray:
    """Area under the ROC curve of (..., n, 2) [score, label] pairs, batched (Mann-Whitney; ties count half)."""
    from scipy.stats import rankdata

    x = np.asarray(x, np.float64)
    flat = x.reshape(-1, *x.shape[-2:])
    y = flat[..., 1] > 0.5
    r = rankdata(flat[..., 0], axis=-1)
    n_pos, n_neg = y.sum(-1), (~y).sum(-1)
    u = (r * y).sum(-1) - n_pos * (n_pos + 1) / 2
    out = _safe_div(u, n_pos * n_neg)
    return out.reshape(x.shape[:-2])


def matching_values(prob: np.ndarray, label: np.ndarray, threshold: float = MATCH_THRESHOLD) -> dict[str, tuple[np.ndarray, Stat]]:
    """Matching accuracy, precision, recall, F1 and AUROC as (per-pair values, statistic), for ``bootstrap_ci``.

    Args:
        prob: P(match) per pair; ``label``: 1 for a matched pair, 0 for a mismatched one.
    """
    prob, label = np.asarray(prob, np.float64), np.asarray(label, np.float64)
    pairs = np.stack([prob, label], axis=1)

    def precision(x):
        tp, fp, _, _ = _counts(x, threshold)
        return _safe_div(tp, tp + fp, 0.0)  # nothing called a match: 0, as scikit-learn's zero_division

    def recall(x):
        tp, _, fn, _ = _counts(x, threshold)
        return _safe_div(tp, tp + fn)

    def f1(x):
        tp, fp, fn, _ = _counts(x, threshold)
        return _safe_div(2 * tp, 2 * tp + fp + fn, 0.0)

    return {
        "accuracy": (((prob >= threshold) == (label > 0.5)).astype(np.float64), "mean"),
        "precision": (pairs, precision),
        "recall": (pairs, recall),
        "f1": (pairs, f1),
        "auroc": (pairs, auroc),
    }


def matching_chance(n_positive: int, n_negative: int) -> dict[str, float]:
    """What guessing gets: accuracy of always answering the larger class, F1 of always answering "match", AUROC 0.5."""
    n = n_positive + n_negative
    p = n_positive / n if n else float("nan")
    return {"accuracy": max(p, 1 - p), "auroc": 0.5, "f1": 2 * p / (1 + p) if n else float("nan")}


# --------------------------------------------------------------------------- bootstrap


Stat = str | Callable[[np.ndarray], np.ndarray]


def _apply(values: np.ndarray, idx: np.ndarray, stat: Stat) -> np.ndarray:
    """The statistic of each resample: ``idx`` is (B, n) query indices; returns (B,)."""
    x = values[idx]
    if stat == "mean":
        return x.mean(1)
    if stat == "median":
        return np.median(x, 1)
    return np.asarray(stat(x))


def _resamples(n: int, n_boot: int, seed: int, width: int = 1):
    """Blocks of bootstrap index rows, about 2M values at a time (bounded memory)."""
    rng = np.random.default_rng(seed)
    block = max(1, 2_000_000 // max(n * width, 1))
    done = 0
    while done < n_boot:
        m = min(block, n_boot - done)
        yield rng.integers(0, n, size=(m, n))
        done += m


def bootstrap_ci(values: np.ndarray, n: int = 1000, seed: int = 0, alpha: float = 0.05, stat: Stat = "mean") -> dict[str, float]:
    """Value and percentile bootstrap interval of a statistic, resampling queries.

    Args:
        values: per-query values (first axis = queries).
        stat: "mean", "median" or a function of a (B, n, ...) batch of resamples returning (B,).
    """
    values = np.asarray(values)
    if len(values) == 0:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    value = float(_apply(values, np.arange(len(values))[None], stat)[0])
    if n <= 0:
        return {"value": value, "low": value, "high": value}
    b = np.concatenate([_apply(values, idx, stat) for idx in _resamples(len(values), n, seed, values[0].size)])
    low, high = np.quantile(b, [alpha / 2, 1 - alpha / 2])
    return {"value": value, "low": float(low), "high": float(high)}


def paired_bootstrap_diff(
    a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0, alpha: float = 0.05, stat: Stat = "mean"
) -> dict[str, float]:
    """``stat(a) - stat(b)`` over the same queries, resampled together, with a two-sided p-value.

    The p-value is twice the share of resampled differences on the far side of zero (capped at 1).
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired bootstrap needs the same non-empty queries in both, got {a.shape} and {b.shape}")
    full = np.arange(len(a))[None]
    value = float(_apply(a, full, stat)[0] - _apply(b, full, stat)[0])
    diffs = np.concatenate([_apply(a, i, stat) - _apply(b, i, stat) for i in _resamples(len(a), n, seed, a[0].size)])
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    return {"value": value, "low": float(low), "high": float(high), "p_value": float(p)}
