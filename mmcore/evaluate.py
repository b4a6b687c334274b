"""Evaluate: embed the held-out splits and measure retrieval, zero-shot, robustness and domains, with CIs.

The recipe, top-down (``run``):

1. embed each unique image of the evaluated splits once (and, for the test split, each of its
   degraded versions), and every caption; rows whose image fails to decode are quarantined;
2. per split: image-to-text and text-to-image R@k, mean and median rank, NDCG@10 (CLIP_benchmark
   semantics, see ``mmcore.metrics``), and zero-shot classification when there is a label;
3. per domain, and in-domain vs out-of-domain when the training split lacked a test domain;
4. the robustness suite on the test images, with the relative drop from clean;
5. with a model that has an image-text matching head (``train.fusion``): matching metrics on the
   test pairs, and retrieval with the head re-ranking the contrastive top k against without it;
6. a human spot-check sheet (HTML + CSV).

Every metric has a seeded bootstrap interval over queries. All rows pass through as kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from mmcore import metrics, sources, spotcheck, tables
from mmcore.base import DataConfig, StageContext, StrictModel
from mmcore.errors import InputError, row_detail
from mmcore.layout import (
    EMBEDDINGS_FILE,
    METRICS_FILE,
    PER_QUERY_FILE,
    ROBUSTNESS_FILE,
    SPOTCHECK_CSV,
    SPOTCHECK_HTML,
    TRAIN_CONFIG_FILE,
    RunLayout,
)
from mmcore.robustness import DEFAULT_SEVERITIES, degrade
from mmcore.robustness import check as check_degradations
from mmcore.tables import DOMAIN, IMAGE, LABEL, ROW_ID, TEXT, StageResult

STAGE = "evaluate"
SPLIT = "split"
DIGEST = "content_digest"

REASONS = {"decode_failed": "the image could not be read or decoded when embedding it for evaluation"}

DEFAULT_TEMPLATES = ["a photo of a {}.", "a {}.", "an image of a {}.", "a picture of a {}."]
# Lower is better for these; every other metric is higher-is-better.
LOWER_IS_BETTER = ("mean_rank", "median_rank")
NOT_SPLITS = metrics.NOT_SPLITS



class EvaluateConfig(StrictModel):
    """Settings of the evaluate stage."""

    splits: list[Literal["train", "val", "test"]] = Field(["test", "val"], min_length=1, description="Splits to evaluate.")
    ks: list[int] = Field([1, 5, 10], min_length=1, description="Recall@k cut-offs.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples over queries for every CI; 0 = none.")
    ci: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    templates: list[str] = Field(DEFAULT_TEMPLATES, min_length=1, description="Zero-shot prompts; {} is the class.")
    robustness: bool = Field(True, description="Run the degradation suite on the test images.")
    degradations: dict[str, list[float]] = Field(
        DEFAULT_SEVERITIES, description="Degradation name -> severities (see mmcore.robustness)."
    )
    spotcheck_n: int = Field(20, ge=0, description="Random test queries in the human spot-check sheet.")
    batch_size: int = Field(256, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    chunk_size: int = Field(1024, ge=1, description="Queries per similarity block; memory ~ 12 x chunk x gallery bytes.")
    baseline: bool = Field(True, description="Also score baseline_model on the same rows, with paired differences.")
    baseline_model: Path | None = Field(
        None, description="Model folder to compare with; default: the one train started from (train.model_path), "
        "none after training from a preset."
    )
    rerank_k: int = Field(
        16, ge=1, description="With a matching head (train.fusion): contrastive top k it re-ranks per query (BLIP's k_test)."
    )
    rerank_blend: bool = Field(
        True, description="Re-rank by the head's match log-odds plus the contrastive logit (logit scale x cosine), as "
        "BLIP adds its ITM score to the similarity; false: by the head's score alone."
    )

    @field_validator("ks")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if min(v) < 1:
            raise ValueError(f"every k must be >= 1, got {v}")
        return sorted(set(v))

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if "{}" not in t and "{c}" not in t]
        if bad:
            raise ValueError(f"every template needs '{{}}' for the class name, got {bad[0]!r}")
        return v

    @field_validator("degradations")
    @classmethod
    def _degradations(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        return check_degradations(v)


# --------------------------------------------------------------------------- embedding


@dataclass(frozen=True)
class Embedded:
    """Embeddings of the evaluated rows: one per unique image, one per caption row."""

    rows: pd.DataFrame  # evaluated rows whose image decoded, by row_id, with column "img" (image index)
    images: pd.DataFrame  # one row per image: key, image_path, row_id (first), split, label, domain
    img_emb: np.ndarray
    txt_emb: np.ndarray  # aligned with rows
    degraded: dict[tuple[str, float], np.ndarray]  # (name, severity) -> image embeddings (robust images only)
    failed: pd.DataFrame  # rows whose image did not decode, with "detail"


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _image_key(df: pd.DataFrame) -> pd.Series:
    if DIGEST in df.columns:
        return df[DIGEST].astype("str").where(df[DIGEST].notna(), "path:" + df[IMAGE].astype("str"))
    return "path:" + df[IMAGE].astype("str")


def _load(data: DataConfig, ref: str, max_side: int):
    """An image of the input, through its source (a file, a tar member, a Parquet cell)."""
    return sources.load_rgb(sources.of(data), ref, max_side=max_side)


def embed(
    df: pd.DataFrame, encoder: Any, cfg: EvaluateConfig, ctx: StageContext, robust_split: str | None
) -> Embedded:
    """Embed the unique images (clean and degraded) and the captions of ``df``, in batches."""
    df = df.sort_values(ROW_ID, kind="stable").reset_index(drop=True)
    df["key"] = _image_key(df)
    first = df.drop_duplicates("key").reset_index(drop=True)
    # An image is degraded if any of its captions is in the robustness split.
    first["robust"] = first["key"].isin(set(df.loc[df[SPLIT] == robust_split, "key"])) if robust_split else False
    size = int(getattr(encoder, "image_size", 224))
    max_side = max(64, 2 * size)  # decode small: the encoder resizes to image_size anyway
    specs = [(n, float(s)) for n, sevs in cfg.degradations.items() for s in sevs] if robust_split else []
    keep_keys, failed_detail = [], {}
    clean, deg = [], {sp: [] for sp in specs}
    bar = tqdm(total=len(first), desc="evaluate: images", unit="img", disable=not ctx.progress)
    for a in range(0, len(first), cfg.batch_size):
        part = first.iloc[a : a + cfg.batch_size]
        imgs, idx = [], []
        for i, (key, rel) in enumerate(zip(part["key"], part[IMAGE])):
            try:
                imgs.append(_load(ctx.data, rel, max_side))
                idx.append(a + i)
                keep_keys.append(key)
            except Exception as e:  # any decode failure is quarantined with its message, not raised
                failed_detail[key] = row_detail(e)
        if imgs:
            clean.append(np.asarray(encoder.encode_images(imgs, batch_size=cfg.batch_size), dtype=np.float32))
            robust = [j for j, g in enumerate(idx) if first["robust"].iat[g]]
            for d, (name, sev) in enumerate(specs):
                if robust:
                    out = [degrade(imgs[j], name, sev, (ctx.seed, idx[j], d)) for j in robust]
                    deg[(name, sev)].append(np.asarray(encoder.encode_images(out, batch_size=cfg.batch_size), dtype=np.float32))
        bar.update(len(part))
    bar.close()
    dim = clean[0].shape[1] if clean else 0
    img_emb = np.concatenate(clean) if clean else np.zeros((0, dim), np.float32)
    images = first[first["key"].isin(set(keep_keys))].reset_index(drop=True)
    ok = df["key"].isin(set(keep_keys))
    rows = df[ok].reset_index(drop=True)
    rows["img"] = rows["key"].map(pd.Series(np.arange(len(images)), index=images["key"])).astype(np.int64)
    failed = df[~ok].copy()
    failed["detail"] = failed["key"].map(failed_detail)
    texts = rows[TEXT].astype("str").tolist()
    txt_emb = (
        np.asarray(encoder.encode_texts(texts, batch_size=cfg.batch_size), dtype=np.float32)
        if texts
        else np.zeros((0, dim), np.float32)
    )
    degraded = {sp: np.concatenate(v) for sp, v in deg.items() if v}
    return Embedded(rows, images, img_emb, txt_emb, degraded, failed.drop(columns=["key"]))


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Scored:
    """One evaluation: metric CIs, chance levels, and the per-query values behind them."""

    summary: dict[str, Any]
    chance: dict[str, float]
    retrieval: metrics.RetrievalPerQuery
    zeroshot: metrics.ZeroShotPerQuery | None


class _Scorer:
    """Scores a subset of embedded rows; holds what every subset shares (classes, config, seed)."""

    def __init__(self, emb: Embedded, cfg: EvaluateConfig, seed: int, classes: list[str], class_emb: np.ndarray | None, device: str):
        self.emb, self.cfg, self.seed, self.classes, self.class_emb, self.device = emb, cfg, seed, classes, class_emb, device

    def ci(self, values: np.ndarray, stat) -> dict[str, float]:
        return metrics.bootstrap_ci(values, n=self.cfg.bootstrap, seed=self.seed, alpha=1 - self.cfg.ci, stat=stat)

    def score(self, rows: pd.DataFrame, img_emb: np.ndarray | None = None, img_index: np.ndarray | None = None) -> Scored:
        """Metrics over ``rows`` (and their images); ``img_emb`` replaces the clean image embeddings.

        Args:
            img_emb: embeddings indexed like ``img_index`` (default: the clean ones, all images).
        """
        imgs = np.unique(rows["img"].to_numpy())
        local = np.searchsorted(imgs, rows["img"].to_numpy())
        if img_emb is None:
            ie = self.emb.img_emb[imgs]
        else:
            ie = img_emb[np.searchsorted(img_index, imgs)]
        te = self.emb.txt_emb[rows.index.to_numpy()]
        r = metrics.retrieval(ie, te, local, self.cfg.ks, chunk=self.cfg.chunk_size, device=self.device)
        summary: dict[str, Any] = {
            "retrieval": {k: self.ci(v, s) for k, (v, s) in r.values(self.cfg.ks).items()},
            "n_images": int(len(imgs)),
            "n_texts": int(len(rows)),
        }
        chance = metrics.retrieval_chance(local, len(imgs), self.cfg.ks)
        zs = None
        if self.class_emb is not None:
            labels = self.emb.images[LABEL].iloc[imgs]
            has = labels.notna().to_numpy()
            if has.any():
                target = pd.Categorical(labels[has].astype(str), categories=self.classes).codes
                zs = metrics.zeroshot(ie[has], self.class_emb, target)
                summary["zeroshot"] = {k: self.ci(v, s) for k, (v, s) in zs.values().items()}
                summary["zeroshot"]["classes"] = self.classes
                summary["zeroshot"]["confusion"] = zs.confusion().tolist()
                summary["zeroshot"]["n_images"] = int(has.sum())
                c = len(self.classes)
                chance.update({"acc1": 1 / c, "balanced_acc": 1 / c, **({"acc5": 5 / c} if c >= 5 else {})})
        return Scored(summary, chance, r, zs)


def _metric_values(scored: Scored) -> dict[str, float]:
    out = {k: v["value"] for k, v in scored.summary["retrieval"].items()}
    out.update({k: v["value"] for k, v in scored.summary.get("zeroshot", {}).items() if isinstance(v, dict)})
    return out


def _relative_drop(metric: str, clean: float, value: float) -> float:
    """Share lost from clean; positive = worse, whichever direction the metric runs."""
    if not np.isfinite(clean) or clean == 0:
        return float("nan")
    worse = value - clean if metric.endswith(LOWER_IS_BETTER) else clean - value
    return float(worse / abs(clean))


def _robustness(scorer: _Scorer, rows: pd.DataFrame, clean: Scored) -> pd.DataFrame:
    """Metrics per degradation and severity on the test images, plus the clean reference."""
    emb = scorer.emb
    robust_idx = np.flatnonzero(emb.images["robust"].to_numpy())
    out = []
    base = _metric_values(clean)
    variants = [("clean", 0.0, clean)]
    for (name, sev), e in emb.degraded.items():
        variants.append((name, sev, scorer.score(rows, e, robust_idx)))
    for name, sev, sc in variants:
        blocks = [sc.summary["retrieval"], {k: v for k, v in sc.summary.get("zeroshot", {}).items() if isinstance(v, dict)}]
        for block in blocks:
            for metric, v in block.items():
                out.append({
                    "degradation": name, "severity": float(sev), "metric": metric, "value": v["value"],
                    "low": v["low"], "high": v["high"], "relative_drop": _relative_drop(metric, base[metric], v["value"]),
                })
    return pd.DataFrame(out)


def _per_domain(scorer: _Scorer, rows: pd.DataFrame, train_domains: set[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dom = rows[DOMAIN]
    for value in sorted(dom.dropna().unique()):
        sub = rows[dom == value]
        entry = scorer.score(sub).summary
        if train_domains is not None:
            entry["in_training"] = value in train_domains
        out[str(value)] = entry
    if train_domains is not None:
        seen = dom.isin(train_domains) & dom.notna()
        unseen = ~dom.isin(train_domains) & dom.notna()
        if seen.any() and unseen.any():
            out["_in_vs_out"] = {
                "in_domain": scorer.score(rows[seen]).summary,
                "out_of_domain": scorer.score(rows[unseen]).summary,
                "out_of_domain_values": sorted(map(str, dom[unseen].unique())),
            }
    return out


# --------------------------------------------------------------------------- baseline vs this model


def _per_query_values(sc: Scored, ks: list[int]) -> dict[str, dict[str, tuple[np.ndarray, Any]]]:
    out = {"retrieval": sc.retrieval.values(ks)}
    if sc.zeroshot is not None:
        out["zeroshot"] = sc.zeroshot.values()
    return out


def _compare(model: Scored, base: Scored, cfg: EvaluateConfig, seed: int) -> dict[str, Any]:
    """Per metric: the baseline's value and CI, this model's, and the paired bootstrap difference
    (model - baseline, same queries resampled together) with its CI and p-value."""
    out: dict[str, Any] = {}
    a, b = _per_query_values(model, cfg.ks), _per_query_values(base, cfg.ks)
    for group, metrics_a in a.items():
        for metric, (va, stat) in metrics_a.items():
            if metric not in b.get(group, {}):
                continue
            vb = b[group][metric][0]
            if cfg.bootstrap > 0:
                d = metrics.paired_bootstrap_diff(va, vb, n=cfg.bootstrap, seed=seed, alpha=1 - cfg.ci, stat=stat)
            else:
                v = metrics.bootstrap_ci(va, n=0, stat=stat)["value"] - metrics.bootstrap_ci(vb, n=0, stat=stat)["value"]
                d = {"value": v, "low": v, "high": v, "p_value": float("nan")}
            out.setdefault(group, {})[metric] = {
                "baseline": base.summary[group][metric], "model": model.summary[group][metric], "diff": d,
            }
    return out


def _baseline_block(
    scorer: _Scorer, base_scorer: _Scorer, splits: list[str], cfg: EvaluateConfig, seed: int
) -> dict[str, Any]:
    """``metrics.json["baseline"][split]``: the comparison on the split, and per domain."""
    out: dict[str, Any] = {}
    for split in splits:
        rows = scorer.emb.rows[scorer.emb.rows[SPLIT] == split]
        brows = base_scorer.emb.rows[base_scorer.emb.rows[SPLIT] == split]
        if rows.empty or brows.empty:
            continue
        if rows[ROW_ID].tolist() != brows[ROW_ID].tolist():
            raise InputError(f"evaluate.baseline_model: the baseline embedded other {split} rows than the model "
                             f"({len(brows)} vs {len(rows)}); both must read the same images")
        body = _compare(scorer.score(rows), base_scorer.score(brows), cfg, seed)
        if DOMAIN in rows.columns and rows[DOMAIN].notna().any():
            body["per_domain"] = {
                str(v): _compare(scorer.score(rows[rows[DOMAIN] == v]), base_scorer.score(brows[brows[DOMAIN] == v]), cfg, seed)
                for v in sorted(rows[DOMAIN].dropna().unique())
            }
        out[split] = body
    return out


def train_source(run_dir: str | Path) -> Path | None:
    """The model folder the run's train stage started from (``train.model_path``), if any."""
    f = RunLayout.of(run_dir).stage_dir("train") / TRAIN_CONFIG_FILE
    if not f.is_file():
        return None
    src = tables.read_json(f).get("model_path")
    return Path(src) if src else None


def _baseline_encoder(cfg: EvaluateConfig, ctx: StageContext, device: str) -> tuple[Any, Path | None]:
    if not cfg.baseline:
        return None, None
    path = cfg.baseline_model if cfg.baseline_model is not None else train_source(ctx.run_dir)
    if path is None:
        return None, None
    from mmcore.clip_model import Encoder  # torch-heavy; imported only when there is a model to load

    where = "evaluate.baseline_model" if cfg.baseline_model is not None else "evaluate.baseline_model (train.model_path)"
    return Encoder.load(path, device=device, where=where), Path(path)


# --------------------------------------------------------------------------- outputs


def _embeddings_table(emb: Embedded) -> pa.Table:
    def vectors(x: np.ndarray) -> pa.Array:
        flat = pa.array(x.astype(np.float32).ravel(), type=pa.float32())
        offsets = pa.array(np.arange(0, x.size + 1, max(x.shape[1], 1), dtype=np.int32)[: len(x) + 1])
        return pa.ListArray.from_arrays(offsets, flat)

    n_i, n_t = len(emb.images), len(emb.rows)
    ids = np.concatenate([emb.images[ROW_ID].to_numpy(np.int64), emb.rows[ROW_ID].to_numpy(np.int64)])
    return pa.table({
        ROW_ID: pa.array(ids, pa.int64()),
        "kind": pa.array(["image"] * n_i + ["text"] * n_t, pa.string()),
        SPLIT: pa.array(list(emb.images[SPLIT].astype(str)) + list(emb.rows[SPLIT].astype(str)), pa.string()),
        "vector": vectors(np.concatenate([emb.img_emb, emb.txt_emb])) if n_i + n_t else pa.array([], pa.list_(pa.float32())),
    })


def _per_query_table(split: str, rows: pd.DataFrame, images: pd.DataFrame, sc: Scored) -> pd.DataFrame:
    imgs = np.unique(rows["img"].to_numpy())
    img_ids = images[ROW_ID].to_numpy(np.int64)[imgs]
    parts = [
        pd.DataFrame({"direction": "i2t", ROW_ID: img_ids, "rank": sc.retrieval.i2t_rank, "ndcg10": sc.retrieval.i2t_ndcg}),
        pd.DataFrame({
            "direction": "t2i", ROW_ID: rows[ROW_ID].to_numpy(np.int64),
            "rank": sc.retrieval.t2i_rank, "ndcg10": sc.retrieval.t2i_ndcg,
        }),
    ]
    if sc.zeroshot is not None:
        has = images[LABEL].iloc[imgs].notna().to_numpy()
        parts.append(pd.DataFrame({
            "direction": "zs", ROW_ID: img_ids[has], "rank": sc.zeroshot.true_rank, "ndcg10": np.nan,
            "target": sc.zeroshot.target, "pred": sc.zeroshot.pred,
        }))
    out = pd.concat(parts, ignore_index=True)
    out.insert(0, SPLIT, split)
    for c in ("target", "pred"):
        out[c] = (out[c] if c in out else pd.Series(np.nan, index=out.index)).astype("Int64")
    return out


def per_query(
    run_dir: str | Path, split: str = "test", ks: Sequence[int] = (1, 5, 10), external: str | None = None
) -> dict[str, np.ndarray]:
    """Per-query values of the mean-type metrics of a finished evaluation, for paired comparisons.

    Queries come in row_id order, so two runs on the same split line up query by query.
    """
    run = RunLayout.of(run_dir)
    path = run.external(external) / PER_QUERY_FILE if external else run.per_query
    df = tables.read_parquet(path)
    if not (df[SPLIT] == split).any():
        raise InputError(f"per_query: no queries for split {split!r} in {path}; got splits {sorted(set(df[SPLIT]))}")
    df = df[df[SPLIT] == split]
    out: dict[str, np.ndarray] = {}
    for d_ in ("i2t", "t2i"):
        g = df[df["direction"] == d_].sort_values(ROW_ID)
        rank = g["rank"].to_numpy(np.float64)
        for k in ks:
            out[f"{d_}_r{k}"] = (rank <= k).astype(np.float64)
        out[f"{d_}_mean_rank"] = rank
        out[f"{d_}_ndcg10"] = g["ndcg10"].to_numpy(np.float64)
    z = df[df["direction"] == "zs"].sort_values(ROW_ID)
    if len(z):
        out["acc1"] = (z["rank"].to_numpy() <= 1).astype(np.float64)
        n_classes = len(tables.read_json(path.parent / METRICS_FILE)[split]["zeroshot"]["classes"])
        if n_classes >= 5:
            out["acc5"] = (z["rank"].to_numpy() <= 5).astype(np.float64)
    return out


def metrics_table(m: dict[str, Any]) -> pd.DataFrame:
    """metrics.json as a flat table (split, group, metric, value, low, high, chance), for artifacts."""
    out = []
    for split, body in m.items():
        if split in NOT_SPLITS or not isinstance(body, dict):
            continue
        chance = m.get("chance", {}).get(split, {})
        for group in ("retrieval", "zeroshot"):
            for metric, v in body.get(group, {}).items():
                if isinstance(v, dict) and "value" in v:
                    out.append({
                        "split": split, "group": group, "metric": metric, "value": v["value"],
                        "low": v["low"], "high": v["high"], "chance": chance.get(metric, np.nan),
                    })
    return pd.DataFrame(out, columns=["split", "group", "metric", "value", "low", "high", "chance"])


def summary_markdown(m: dict[str, Any], robustness_table: pd.DataFrame | None = None, split: str = "test") -> str:
    """The headline: a split's metrics with CIs and chance, and each degradation's worst drop."""
    t = metrics_table(m)
    t = t[t["split"] == split]
    lines = [f"| {split} metric | value | 95% CI | chance |", "|---|---|---|---|"]
    for r in t.itertuples():
        chance = "" if pd.isna(r.chance) else f"{r.chance:.3f}"
        lines.append(f"| {r.metric} | {r.value:.3f} | [{r.low:.3f}, {r.high:.3f}] | {chance} |")
    if robustness_table is not None and len(robustness_table):
        rob = robustness_table[(robustness_table["degradation"] != "clean") & (robustness_table["metric"] == "i2t_r5")]
        lines += ["", "| degradation | severity | i2t_r5 | 95% CI | relative drop |", "|---|---|---|---|---|"]
        for r in rob.itertuples():
            lines.append(f"| {r.degradation} | {r.severity:g} | {r.value:.3f} | [{r.low:.3f}, {r.high:.3f}] | {r.relative_drop:+.1%} |")
    comp = m.get("baseline", {}).get(split)
    if comp:
        lines += ["", f"baseline: {m['baseline']['model']}",
                  f"| {split} metric | baseline | this model | difference | 95% CI | p |", "|---|---|---|---|---|---|"]
        for group in ("retrieval", "zeroshot"):
            for metric, c in comp.get(group, {}).items():
                d = c["diff"]
                lines.append(f"| {metric} | {_num(c['baseline']['value'])} | {_num(c['model']['value'])} | "
                             f"{_num(d['value'], '+')} | [{_num(d['low'], '+')}, {_num(d['high'], '+')}] | {_num(d['p_value'])} |")
    return "\n".join(lines) + "\n"


def _num(x: float | None, sign: str = "") -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:{sign}.3f}"


# --------------------------------------------------------------------------- run


def _load_encoder(ctx: StageContext, device: str):
    from mmcore.clip_model import Encoder  # torch-heavy; imported only when evaluating a real model

    model_dir = RunLayout(ctx.run_dir).model
    if not model_dir.is_dir():
        raise InputError(f"evaluate: no trained model at {model_dir}; run the train stage first")
    return Encoder.load(model_dir, device=device, where="evaluate")


def _check(table: pd.DataFrame, cfg: EvaluateConfig, where: str) -> list[str]:
    tables.require_columns(table, [ROW_ID, IMAGE, TEXT, SPLIT], where)
    present = [s for s in cfg.splits if (table[SPLIT] == s).any()]
    if not present:
        got = sorted(map(str, table[SPLIT].dropna().unique()))
        raise InputError(f"{where}: no rows in evaluate.splits {cfg.splits}; the table's splits are {got}")
    return present


def _scorer(table: pd.DataFrame, emb: Embedded, encoder: Any, cfg: EvaluateConfig, seed: int, device: str) -> _Scorer:
    class_emb, classes = None, []
    if LABEL in table.columns:
        classes = sorted(map(str, table[LABEL].dropna().unique()))
        if len(classes) >= 2:
            class_emb = metrics.class_embeddings(lambda t: encoder.encode_texts(t, batch_size=cfg.batch_size), classes, cfg.templates)
    return _Scorer(emb, cfg, seed, classes, class_emb, device)


def _evaluate(
    table: pd.DataFrame, cfg: EvaluateConfig, ctx: StageContext, encoder: Any, splits: list[str], *, robust: bool,
    out_dir: Path, baseline: tuple[Any, Path | None] = (None, None),
) -> tuple[dict, Embedded, dict[str, tuple[pd.DataFrame, Scored]], pd.DataFrame]:
    """Embed, score every split (and domains, robustness), write metrics + embeddings + per-query.

    Args:
        baseline: (encoder, its folder) of the model to compare with on the same rows, or (None, None).
    """
    device = resolve_device(cfg.device)
    robust_split = "test" if robust and cfg.robustness and "test" in splits and cfg.degradations else None
    rows_in = table[table[SPLIT].isin(splits)]
    emb = embed(rows_in, encoder, cfg, ctx, robust_split)
    scorer = _scorer(table, emb, encoder, cfg, ctx.seed, device)
    train_domains = None
    if DOMAIN in table.columns and (table[SPLIT] == "train").any():
        train_domains = set(map(str, table.loc[table[SPLIT] == "train", DOMAIN].dropna().unique()))
    result: dict[str, Any] = {"chance": {}, "n_queries": {}}
    scored: dict[str, tuple[pd.DataFrame, Scored]] = {}
    rob = pd.DataFrame(columns=["degradation", "severity", "metric", "value", "low", "high", "relative_drop"])
    pq_parts = []
    for split in splits:
        rows = emb.rows[emb.rows[SPLIT] == split]
        if rows.empty:
            continue
        sc = scorer.score(rows)
        body = dict(sc.summary)
        if DOMAIN in rows.columns and rows[DOMAIN].notna().any():
            body["per_domain"] = _per_domain(scorer, rows, train_domains)
        if split == robust_split and emb.degraded:
            rob = _robustness(scorer, rows, sc)
            body["robustness"] = {
                f"{d}@{s:g}": {
                    r.metric: {"value": r.value, "low": r.low, "high": r.high, "relative_drop": r.relative_drop}
                    for r in g.itertuples()
                }
                for (d, s), g in rob[rob["degradation"] != "clean"].groupby(["degradation", "severity"], sort=False)
            }
        result[split] = body
        result["chance"][split] = sc.chance
        result["n_queries"][split] = {"images": body["n_images"], "texts": body["n_texts"]}
        pq_parts.append(_per_query_table(split, rows, emb.images, sc))
        scored[split] = (rows, sc)
    base_encoder, base_path = baseline
    if base_encoder is not None:
        bemb = embed(rows_in, base_encoder, cfg, ctx, None)
        bscorer = _scorer(table, bemb, base_encoder, cfg, ctx.seed, device)
        result["baseline"] = {"model": str(base_path) if base_path is not None else "given encoder",
                              **_baseline_block(scorer, bscorer, list(scored), cfg, ctx.seed)}
    head = getattr(encoder, "fusion", None)
    if head is not None and "test" in scored:
        result.update(_fusion_metrics(encoder, head, emb, scored["test"], cfg, ctx, device))
    tables.write_json(_finite(result), out_dir / METRICS_FILE)
    if pq_parts:
        tables.write_parquet(pd.concat(pq_parts, ignore_index=True), out_dir / PER_QUERY_FILE)
    return result, emb, scored, rob


def _fusion_metrics(
    encoder: Any, head: Any, emb: Embedded, test: tuple[pd.DataFrame, Scored], cfg: EvaluateConfig, ctx: StageContext,
    device: str,
) -> dict[str, Any]:
    """``metrics.json["matching"]`` and ``["rerank"]`` on the test split, with a model's matching head."""
    from mmcore import fusion  # torch-heavy; only for a model with a head

    rows, sc = test
    imgs = np.unique(rows["img"].to_numpy())
    local = np.searchsorted(imgs, rows["img"].to_numpy())
    ie, te = emb.img_emb[imgs], emb.txt_emb[rows.index.to_numpy()]
    max_side = max(64, 2 * int(getattr(encoder, "image_size", 224)))
    refs = emb.images[IMAGE].iloc[imgs].tolist()
    texts = rows[TEXT].astype(str).tolist()
    alpha = 1 - cfg.ci

    def ci(v, stat="mean"):
        return metrics.bootstrap_ci(v, n=cfg.bootstrap, seed=ctx.seed, alpha=alpha, stat=stat)

    # Every pair the head scores: the matching pairs (every positive, a hard and a random negative each)
    # and each query's contrastive top k, both directions; the images decoded a chunk at a time, each once.
    scale = float(encoder.model.logit_scale.detach().exp()) if hasattr(encoder, "model") else 100.0
    ii, tt, label = fusion.matching_pairs(ie, te, local, texts, ctx.seed, scale)
    top_i2t = fusion.topk(ie, te, min(cfg.rerank_k, len(te)), cfg.chunk_size)  # image -> captions
    top_t2i = fusion.topk(te, ie, min(cfg.rerank_k, len(ie)), cfg.chunk_size)  # caption -> images
    qi, qt = np.repeat(np.arange(len(ie)), top_i2t.shape[1]), np.repeat(np.arange(len(te)), top_t2i.shape[1])
    z, failed = fusion.pair_scores(encoder, head, lambda i: _load(ctx.data, refs[i], max_side), texts,
                                   np.r_[ii, qi, top_t2i.ravel()], np.r_[tt, top_i2t.ravel(), qt], cfg.batch_size, device)
    z_match, z_i2t, z_t2i = np.split(z, [len(ii), len(ii) + len(qi)])

    # 1) matching; an image that failed to decode here (after the embedding pass read it) leaves its pairs out
    ok = ~np.isnan(z_match)
    prob, label = 1 / (1 + np.exp(-z_match[ok].astype(np.float64))), label[ok]
    n_pos, n_neg = int(label.sum()), int((label == 0).sum())
    matching: dict[str, Any] = {k: ci(v, s) for k, (v, s) in metrics.matching_values(prob, label).items()}
    matching.update(n_pairs=int(len(label)), n_positive=n_pos, n_negative=n_neg, chance=metrics.matching_chance(n_pos, n_neg),
                    n_decode_failed=len(failed))

    # 2) re-ranking: the head re-orders each query's contrastive top k; ranks beyond k stay (and those of a
    # query with a candidate it could not score)
    rerank: dict[str, Any] = {"k": int(cfg.rerank_k), "blend": bool(cfg.rerank_blend)}
    def blended(score: np.ndarray, img: np.ndarray, txt: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
        # BLIP ranks its top k by ITM score + similarity: here the head's log-odds + the contrastive logit;
        # the cosine also breaks a tie in score (fusion.reranked_ranks)
        cos = np.sum(ie[img] * te[txt], axis=1)
        return (score + scale * cos if cfg.rerank_blend else score).reshape(shape), cos.reshape(shape)

    s_i2t = blended(z_i2t, qi, top_i2t.ravel(), top_i2t.shape)
    new_i2t = fusion.reranked_ranks(sc.retrieval.i2t_rank, local[top_i2t] == np.arange(len(ie))[:, None], *s_i2t)
    s_t2i = blended(z_t2i, top_t2i.ravel(), qt, top_t2i.shape)
    new_t2i = fusion.reranked_ranks(sc.retrieval.t2i_rank, top_t2i == local[:, None], *s_t2i)
    for d, base, new in (("i2t", sc.retrieval.i2t_rank, new_i2t), ("t2i", sc.retrieval.t2i_rank, new_t2i)):
        rerank[d] = {}
        for kk in cfg.ks:
            without, with_ = (base <= kk).astype(np.float64), (new <= kk).astype(np.float64)
            diff = (metrics.paired_bootstrap_diff(with_, without, n=cfg.bootstrap, seed=ctx.seed, alpha=alpha)
                    if cfg.bootstrap > 0 else {**ci(with_ - without), "p_value": float("nan")})
            rerank[d][f"R@{kk}"] = {"without": ci(without), "with": ci(with_), "difference": diff}
    return {"matching": matching, "rerank": rerank}


def _finite(obj: Any) -> Any:
    """NaN and inf as null, so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _stats(result: dict, emb: Embedded) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "n_decode_failed": int(len(emb.failed)),
        "n_images_embedded": int(len(emb.images)),
        "n_texts_embedded": int(len(emb.rows)),
    }
    m = result.get("matching")
    if m:
        stats.update({f"matching_{k}": m[k]["value"] for k in ("accuracy", "f1", "auroc")})
        stats["chance_matching_accuracy"] = m["chance"]["accuracy"]
        for d in ("i2t", "t2i"):
            for name, v in result["rerank"][d].items():
                stats[f"rerank_{d}_{name.replace('@', '')}_diff"] = v["difference"]["value"]
    for split, comp in result.get("baseline", {}).items():
        for k, c in comp.get("retrieval", {}).items() if isinstance(comp, dict) else ():
            if not k.endswith("median_rank"):
                stats[f"baseline_{split}_{k}"] = c["baseline"]["value"]
                stats[f"diff_{split}_{k}"] = c["diff"]["value"]
    for split, body in result.items():
        if split in NOT_SPLITS:
            continue
        for group in ("retrieval", "zeroshot"):
            for k, v in body.get(group, {}).items():
                if isinstance(v, dict) and "value" in v and not k.endswith("median_rank"):
                    stats[f"{split}_{k}"] = v["value"]
        for k, v in result["chance"].get(split, {}).items():
            stats[f"chance_{split}_{k}"] = v
    return _finite(stats)


def run(
    table: pd.DataFrame, cfg: EvaluateConfig, ctx: StageContext, encoder: Any = None, baseline_encoder: Any = None
) -> StageResult:
    """Evaluate the trained model (or ``encoder``) on the evaluated splits; all rows pass through.

    With a baseline (``evaluate.baseline_model``, by default the model train started from, or
    ``baseline_encoder``) it is scored on the same rows, and metrics.json gains ``baseline``.
    Writes metrics.json, embeddings.parquet, per_query.parquet, robustness.parquet and the
    spot-check sheet under ``RUN_DIR/evaluate/``.
    """
    splits = _check(table, cfg, "evaluate")
    baseline = _baseline_encoder(cfg, ctx, resolve_device(cfg.device)) if baseline_encoder is None else (baseline_encoder, None)
    if encoder is None:
        encoder = _load_encoder(ctx, resolve_device(cfg.device))
    out_dir = ctx.stage_dir(STAGE)
    result, emb, scored, rob = _evaluate(table, cfg, ctx, encoder, splits, robust=True, out_dir=out_dir, baseline=baseline)
    tables.write_parquet(_embeddings_table(emb), out_dir / EMBEDDINGS_FILE)
    floats = {c: "float64" for c in ("severity", "value", "low", "high", "relative_drop")}
    tables.write_parquet(rob.astype(floats), out_dir / ROBUSTNESS_FILE)

    sheet_split = "test" if "test" in scored else next(iter(scored), None)
    if sheet_split is not None and cfg.spotcheck_n > 0:
        rows, _ = scored[sheet_split]
        imgs = np.unique(rows["img"].to_numpy())
        im = emb.images.iloc[imgs]
        sheet = spotcheck.build(
            emb.img_emb[imgs], emb.txt_emb[rows.index.to_numpy()], im[IMAGE].tolist(), im[ROW_ID].tolist(),
            rows[TEXT].astype(str).tolist(), rows[ROW_ID].tolist(), cfg.spotcheck_n, seed=ctx.seed,
        )
        tables.write_bytes(sheet.to_csv(index=False).encode(), out_dir / SPOTCHECK_CSV)
        page = spotcheck.to_html(sheet, lambda p: _load(ctx.data, p, 224), f"mmpipe spot-check ({sheet_split} split)")
        tables.write_bytes(page.encode(), out_dir / SPOTCHECK_HTML)
    else:  # no sheet this time: an earlier run's must not pass for this one's
        (out_dir / SPOTCHECK_CSV).unlink(missing_ok=True)
        (out_dir / SPOTCHECK_HTML).unlink(missing_ok=True)

    bad = table[ROW_ID].isin(set(emb.failed[ROW_ID]))
    detail = table[ROW_ID].map(emb.failed.set_index(ROW_ID)["detail"]).fillna("").astype(str)
    res = tables.partition(table, [("decode_failed", bad, detail)])
    return StageResult(res.kept, res.quarantined, _stats(result, emb))


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(name: str) -> str:
    """An external dataset's name: one safe path component (it names a folder under evaluate/external)."""
    if not _NAME.match(name):
        raise InputError(f"evaluate --data: dataset name must match {_NAME.pattern}, got {name!r}")
    return name


def run_external(
    table: pd.DataFrame, cfg: EvaluateConfig, ctx: StageContext, name: str, encoder: Any = None, baseline_encoder: Any = None
) -> dict[str, Any]:
    """Evaluate the run's model on another dataset's (clean, probed, quality-checked) table.

    Without a ``split`` column every row is a test query. Writes
    ``RUN_DIR/evaluate/external/<name>/metrics.json`` (and per_query.parquet); returns the metrics.
    """
    check_name(name)
    if SPLIT not in table.columns:
        table = table.assign(**{SPLIT: "test"})
    splits = _check(table, cfg, f"evaluate external {name!r}")
    baseline = _baseline_encoder(cfg, ctx, resolve_device(cfg.device)) if baseline_encoder is None else (baseline_encoder, None)
    if encoder is None:
        encoder = _load_encoder(ctx, resolve_device(cfg.device))
    out_dir = RunLayout(ctx.run_dir).external(name)
    result, emb, _, _ = _evaluate(table, cfg, ctx, encoder, splits, robust=False, out_dir=out_dir, baseline=baseline)
    result["n_decode_failed"] = int(len(emb.failed))
    tables.write_json(_finite(result), out_dir / METRICS_FILE)
    return result


def verdicts(run_dir: str | Path, filled_csv: str | Path, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Human-judged precision@1/@5 with CIs from a filled spot-check sheet; also saved as verdicts.json."""
    out = spotcheck.read_verdicts(filled_csv, n_boot=n_boot, seed=seed)
    tables.write_json(out, RunLayout.of(run_dir).verdicts)
    return out


def ablation_table(
    results: dict[str, dict[str, np.ndarray]], baseline: str = "none", n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> pd.DataFrame:
    """Each scheme's metrics with CIs and its paired bootstrap difference against ``baseline``.

    Args:
        results: scheme -> metric -> per-query values (from ``per_query``); a 2-D array is
            (seeds, queries) and is averaged over seeds per query first.
    """
    if baseline not in results:
        raise InputError(f"ablation: baseline scheme {baseline!r} missing; got {', '.join(results)}")
    base = {k: np.asarray(v, dtype=np.float64).reshape(-1, np.shape(v)[-1]).mean(0) for k, v in results[baseline].items()}
    out = []
    for scheme, ms in results.items():
        for metric, v in ms.items():
            v = np.asarray(v, dtype=np.float64).reshape(-1, np.shape(v)[-1]).mean(0)
            c = metrics.bootstrap_ci(v, n=n_boot, seed=seed, alpha=1 - ci)
            row = {"scheme": scheme, "metric": metric, **c}
            if metric in base and len(base[metric]) == len(v):
                d = metrics.paired_bootstrap_diff(v, base[metric], n=n_boot, seed=seed, alpha=1 - ci)
                row.update({"diff": d["value"], "diff_low": d["low"], "diff_high": d["high"], "p_value": d["p_value"]})
                row["significant"] = bool(scheme != baseline and (d["low"] > 0 or d["high"] < 0))
            out.append(row)
    return pd.DataFrame(out)


def ablation_from_runs(variants: dict[str, list[str]], cfg: EvaluateConfig, seed: int = 0) -> pd.DataFrame:
    """``ablation_table`` of finished runs: scheme -> the run folders of its seeds; baseline ``none``
    when present, else the first scheme."""
    results = {}
    for scheme, run_dirs in variants.items():
        per_seed = [per_query(d, ks=cfg.ks) for d in run_dirs]
        results[scheme] = {m: np.stack([q[m] for q in per_seed]) for m in per_seed[0]}
    baseline = "none" if "none" in results else next(iter(results))
    return ablation_table(results, baseline=baseline, n_boot=cfg.bootstrap, seed=seed, ci=cfg.ci)
