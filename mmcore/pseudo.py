"""Pseudo: a teacher model gives train images without a usable caption the best caption of a bank.

The offline form of the augmentation article's teacher labelling. After split, so a pseudo-pair is a
train row and stays one: a val or test row without a usable caption is quarantined (``no_caption``),
never labelled. A teacher (``pseudo.model_path``: a previous run's ``train/model`` or a local CLIP
folder, loaded by ``mmcore.clip_model``) scores each candidate image against a caption bank (the
train rows' own captions, deduplicated, or ``pseudo.captions``); the top caption becomes the row's
caption when it beats the runner-up by ``pseudo.min_margin`` (and, if set, scores at least
``pseudo.min_similarity``). Candidates are the train rows whose caption is empty (``clean
.keep_uncaptioned`` keeps them through the safety stages) and, with ``pseudo.relabel_below``, train
rows whose own caption the teacher scores below that cosine. A pseudo-pair carries
``pseudo_label`` (True), ``pseudo_weight`` (its loss weight), its margin and similarity, the
original caption and the teacher's digest; every other row ``pseudo_label`` False, weight 1.0. A pick
that is a val or test row's caption and no train row's (normalised) is refused and its row quarantined (``eval_caption``),
uncaptioned or misaligned alike (an image the teacher finds closer to an eval caption than to its own
is no pair to train on). The stats count kept rows per split (``splits``, like split's): train reads
this stage, so these are the rows it trains on.

Off (the default) the stage passes its input through unchanged, but for rows without a usable
caption (there are none unless clean kept them), which it quarantines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from mmcore import sources, tables
from mmcore.base import StageContext, StrictModel
from mmcore.digests import dir_digest
from mmcore.errors import ConfigError, InputError, LeakageError, MMPipeError
from mmcore.tables import (
    IMAGE,
    PSEUDO_LABEL,
    PSEUDO_MARGIN,
    PSEUDO_ORIGINAL,
    PSEUDO_SIMILARITY,
    PSEUDO_TEACHER,
    PSEUDO_WEIGHT,
    ROW_ID,
    TEXT,
    StageResult,
)

STAGE = "pseudo"
SPLIT = "split"  # split's column (train / val / test)
# The columns a pseudo-pair records besides PSEUDO_LABEL and PSEUDO_WEIGHT (named in mmcore.tables).
MARGIN, SIMILARITY, ORIGINAL, TEACHER = PSEUDO_MARGIN, PSEUDO_SIMILARITY, PSEUDO_ORIGINAL, PSEUDO_TEACHER
COLUMNS = (PSEUDO_LABEL, PSEUDO_WEIGHT, MARGIN, SIMILARITY, ORIGINAL, TEACHER)
# The margin histogram's bins (cosine differences), for the stats and the report.
MARGIN_BINS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 2.0)

REASONS = {
    "no_caption": "a val or test row without a usable caption (pseudo-labels are for train rows only), or any such "
                  "row with pseudo.enabled false",
    "low_margin": "a train row without a usable caption whose best bank caption won by less than pseudo.min_margin "
                  "(or scored below pseudo.min_similarity)",
    "image_error": "a candidate's image could not be decoded for the teacher",
    "eval_caption": "a train row without a usable caption, or one relabelled (pseudo.relabel_below), whose pseudo "
                    "caption is a val or test row's caption and no train row's (normalised: lower case, spacing "
                    "collapsed), which a pseudo-pair must not carry into training",
}


class PseudoConfig(StrictModel):
    """Pseudo-labels from a teacher model; off by default (the stage then passes rows through)."""

    enabled: bool = Field(False, description="Give train rows without a usable caption (and, with relabel_below, "
                          "low-alignment ones) the teacher's best bank caption; off: pass through.")
    model_path: Path | None = Field(None, description="Teacher: a run's train/model folder or a local CLIP folder "
                                    "(required when enabled).")
    captions: Path | None = Field(None, description="Caption bank, one caption per line; default: the train rows' "
                                  "own captions, deduplicated.")
    min_margin: float = Field(0.02, ge=0, le=2, description="Teacher cosine of the top caption minus the "
                              "runner-up's must reach this.")
    min_similarity: float | None = Field(None, ge=-1, le=1, description="And the top caption's cosine at least "
                                         "this (None: no floor).")
    relabel_below: float | None = Field(None, ge=-1, le=1, description="Train rows whose own caption the teacher "
                                        "scores below this cosine are candidates too (None: only empty captions).")
    weight: float = Field(0.5, gt=0, le=1, description="pseudo_weight of a pseudo-pair in the loss (real pairs: 1.0).")
    batch_size: int = Field(64, ge=1, description="Images or captions per teacher forward pass.")

    @model_validator(mode="after")
    def _teacher(self) -> PseudoConfig:
        if self.enabled and self.model_path is None:
            raise ValueError("pseudo.enabled needs pseudo.model_path (a teacher model folder)")
        return self


def has_caption(table: pd.DataFrame) -> pd.Series:
    """Rows with a usable caption: a non-empty one (clean's ``keep_uncaptioned`` rows have "")."""
    return table[TEXT].fillna("").astype("str").str.strip() != ""


def check_no_pseudo_in_eval(table: pd.DataFrame, where: str = STAGE) -> None:
    """No pseudo-pair is a val or test row; one that is raises LeakageError."""
    if PSEUDO_LABEL not in table.columns or SPLIT not in table.columns:
        return
    bad = table[PSEUDO_LABEL].fillna(False).astype(bool) & table[SPLIT].ne("train")
    if bad.any():
        ids = ", ".join(str(i) for i in table.loc[bad, ROW_ID].head(5))
        raise LeakageError(f"{where}: {int(bad.sum())} pseudo-labelled rows are in val or test (row_id {ids}); "
                           "expected pseudo-labels on train rows only")


def read_bank(path: Path) -> list[str]:
    """A caption bank file: one caption per line, blank lines skipped, duplicates once (first kept)."""
    if not Path(path).is_file():
        raise ConfigError(f"pseudo.captions: file not found: {path}")
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    return list(dict.fromkeys(s.strip() for s in lines if s.strip()))


def margins(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of an (images x captions) cosine matrix: the top caption's index, its cosine, and its
    margin over the runner-up."""
    top2 = np.argsort(-sim, axis=1, kind="stable")[:, :2]
    rows = np.arange(len(sim))
    best, second = sim[rows, top2[:, 0]], sim[rows, top2[:, 1]]
    return top2[:, 0], best, best - second


def _histogram(values: np.ndarray) -> dict[str, list]:
    counts, _ = np.histogram(np.clip(values, MARGIN_BINS[0], MARGIN_BINS[-1]), bins=MARGIN_BINS)
    return {"edges": list(MARGIN_BINS), "counts": counts.astype(int).tolist()}


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    q = np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0])
    return {k: round(float(v), 4) for k, v in zip(("min", "p10", "p50", "p90", "max"), q)}


def _embed_images(enc, paths: list[str], source, batch_size: int) -> tuple[np.ndarray, list[str]]:
    """Each distinct image once: embeddings (rows in ``paths`` order; zeros where it failed) and errors."""
    uniq = list(dict.fromkeys(paths))
    errors: dict[str, str] = {}
    vecs: dict[str, np.ndarray] = {}
    for lo in range(0, len(uniq), batch_size):
        batch, ims = [], []
        for p in uniq[lo : lo + batch_size]:
            try:
                ims.append(sources.load_rgb(source, p, max_side=448))
                batch.append(p)
            except Exception as e:  # a file broken since probe: its row, never the stage
                errors[p] = f"teacher decode: {type(e).__name__}: {str(e)[:200]}"
        if ims:
            vecs.update(zip(batch, enc.encode_images(ims, batch_size=batch_size)))
    dim = enc.model.config.projection_dim
    out = np.stack([vecs.get(p, np.zeros(dim, np.float32)) for p in paths]) if paths else np.zeros((0, dim), np.float32)
    return out, [errors.get(p, "") for p in paths]


def _load_teacher(cfg: PseudoConfig):
    from mmcore.clip_model import Encoder  # the one model loader: the model's own tokenizer and preprocessing

    try:
        return Encoder.load(cfg.model_path, where="pseudo.model_path")
    except MMPipeError as e:
        raise ConfigError(f"pseudo.model_path: cannot load a CLIP model from {cfg.model_path}: "
                          f"{str(e).removeprefix('pseudo.model_path: ')}") from None


def normalise_caption(text: pd.Series) -> pd.Series:
    """Caption compared with val and test captions: lower case, runs of whitespace one space, trimmed."""
    return text.fillna("").astype("str").str.lower().str.split().str.join(" ")


def split_counts(kept: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Kept rows per split, shaped like split's ``stats["splits"]`` (what train and evaluate will see)."""
    counts = kept[SPLIT].astype("str").value_counts()
    return {s: {"rows": int(counts.get(s, 0))} for s in ("train", "val", "test")}


def _passthrough(df: pd.DataFrame, captioned: pd.Series, enabled: bool) -> StageResult:
    """Off: every row with a caption as it came; rows without one quarantined as no_caption."""
    res = tables.partition(df, [("no_caption", ~captioned, "no usable caption and pseudo.enabled is false")])
    stats = {"enabled": enabled, "n_pseudo": 0, "n_candidates": 0, "splits": split_counts(res.kept)}
    return StageResult(res.kept, res.quarantined, stats)


def run(table: pd.DataFrame, cfg: PseudoConfig, ctx: StageContext) -> StageResult:
    """Pseudo-label train rows without a usable caption (and low-alignment ones) from a teacher's caption bank."""
    tables.require_columns(table, [ROW_ID, IMAGE, TEXT, SPLIT], STAGE)
    df = table
    captioned = has_caption(df)
    if not cfg.enabled:
        return _passthrough(df, captioned, enabled=False)
    train = df[SPLIT].eq("train")
    enc = _load_teacher(cfg)
    source = sources.of(ctx.data)
    teacher = dir_digest(cfg.model_path)

    # 1. The caption bank: a file, or the train rows' own captions (deduplicated, first kept).
    bank = read_bank(cfg.captions) if cfg.captions is not None else list(
        dict.fromkeys(df.loc[train & captioned, TEXT].astype("str")))
    if len(bank) < 2:
        raise InputError(f"pseudo: the caption bank has {len(bank)} captions; expected at least 2 (a margin needs "
                         "a runner-up): set pseudo.captions or train on captioned rows")
    bank_emb = enc.encode_texts(bank, batch_size=cfg.batch_size)

    # 2. Candidates: train rows without a caption; with relabel_below, train rows the teacher finds misaligned.
    empty = train & ~captioned
    own_cos = pd.Series(np.nan, index=df.index)
    low = pd.Series(False, index=df.index)
    if cfg.relabel_below is not None and (train & captioned).any():
        rows = df.index[train & captioned]
        img, err = _embed_images(enc, df.loc[rows, IMAGE].tolist(), source, cfg.batch_size)
        txt = enc.encode_texts(df.loc[rows, TEXT].astype("str").tolist(), batch_size=cfg.batch_size)
        cos = (img * txt).sum(1)
        cos[np.array([bool(e) for e in err])] = np.nan  # undecodable: no score, not a candidate
        own_cos.loc[rows] = cos
        low = own_cos < cfg.relabel_below
    cand = df.index[empty | low]
    img, err = _embed_images(enc, df.loc[cand, IMAGE].tolist(), source, cfg.batch_size)
    top, best, margin = margins(img @ bank_emb.T) if len(cand) else (np.zeros(0, int), np.zeros(0), np.zeros(0))
    failed = pd.Series([bool(e) for e in err], index=cand, dtype=bool)
    pick = pd.Series([bank[i] for i in top], index=cand, dtype="str")
    ok = pd.Series(margin >= cfg.min_margin, index=cand)
    if cfg.min_similarity is not None:
        ok &= pd.Series(best >= cfg.min_similarity, index=cand)
    ok &= ~failed
    # A misaligned row is relabelled only when the teacher prefers another caption to its own.
    relabel = low.loc[cand] & ~empty.loc[cand]
    ok &= ~relabel | ((pd.Series(best, index=cand) > own_cos.loc[cand]) & (pick != df.loc[cand, TEXT].astype("str")))
    # Never a val or test row's caption (a user bank may hold one): a row with such a pick is quarantined
    # (eval_caption), a misaligned one too: the teacher prefers an eval caption to its own. A caption
    # that train rows carry as well (templated captions repeat) brings nothing of val or test in.
    eval_captions = set(normalise_caption(df.loc[~train & captioned, TEXT])) - set(
        normalise_caption(df.loc[train & captioned, TEXT]))
    eval_pick = ok & normalise_caption(pick).isin(eval_captions)
    ok &= ~eval_pick

    # 3. The pseudo-pairs, marked in every column; everything else weight 1.0.
    out = df.copy()
    out[PSEUDO_LABEL] = False
    out[PSEUDO_WEIGHT] = 1.0
    out[MARGIN] = np.nan
    out[SIMILARITY] = np.nan
    out[ORIGINAL] = ""
    out[TEACHER] = ""
    out.loc[cand, MARGIN] = margin
    out.loc[cand, SIMILARITY] = best
    chosen = ok[ok].index
    out.loc[chosen, ORIGINAL] = df.loc[chosen, TEXT].astype("str")
    out.loc[chosen, TEXT] = pick.loc[chosen]
    out.loc[chosen, PSEUDO_LABEL] = True
    out.loc[chosen, PSEUDO_WEIGHT] = float(cfg.weight)
    out.loc[chosen, TEACHER] = teacher
    out[PSEUDO_LABEL] = out[PSEUDO_LABEL].astype(bool)
    out[PSEUDO_WEIGHT] = out[PSEUDO_WEIGHT].astype("float64")

    error_detail = pd.Series([e for e in err], index=cand, dtype="str").reindex(df.index, fill_value="")
    res = tables.partition(out, [
        ("no_caption", ~captioned & ~train, "no usable caption in a " + df[SPLIT].astype("str") + " row"),
        ("image_error", failed.reindex(df.index, fill_value=False) & empty, error_detail),
        ("eval_caption", eval_pick.reindex(df.index, fill_value=False),
         "pseudo caption " + pick.reindex(df.index, fill_value="").str.slice(0, 80).map(repr)
         + " is the caption of a val or test row"),
        ("low_margin", empty & ~ok.reindex(df.index, fill_value=False),
         "margin " + out[MARGIN].round(4).astype(str) + " < " + str(cfg.min_margin)
         + ("" if cfg.min_similarity is None else f" or similarity < {cfg.min_similarity}")),
    ])
    check_no_pseudo_in_eval(res.kept)
    m_all = margin[~failed.to_numpy()] if len(cand) else margin
    chosen_empty = empty.loc[chosen]
    stats = {
        "enabled": True,
        "teacher": teacher,
        "bank": "pseudo.captions" if cfg.captions is not None else "train captions",
        "n_bank": len(bank),
        "n_train": int(train.sum()),
        "n_uncaptioned": int((~captioned).sum()),
        "n_uncaptioned_train": int(empty.sum()),
        "n_low_alignment": int(low.sum()),
        "n_candidates": len(cand),
        "n_pseudo": int(len(chosen)),
        "n_pseudo_uncaptioned": int(chosen_empty.sum()),
        "n_pseudo_relabelled": int((~chosen_empty).sum()),
        "n_eval_caption": int(eval_pick.sum()),  # picks refused (a val or test caption), their rows quarantined
        "splits": split_counts(res.kept),  # kept rows per split: train's input
        "min_margin": cfg.min_margin,
        "weight": cfg.weight,
        "margin_hist": _histogram(m_all),
        "margin_quantiles": _quantiles(m_all),
        "similarity_quantiles": _quantiles(best[~failed.to_numpy()] if len(cand) else best),
    }
    return StageResult(res.kept, res.quarantined, stats)
