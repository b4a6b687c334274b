"""Curation ablations, DataComp's protocol: vary only the curation, fix the test set and the compute.

A variants file names each variant's config overrides (any stage's keys, and presets); every
variant is validated before anything runs. The test set is fixed once (the baseline variant's test
split, or a given evaluation manifest) and written as a held-out file; each variant's split
quarantines every row that matches it (``split.fixed_test``) and shares the rest between train
and val. Every variant trains the same number of steps at the same batch size, is evaluated on the
same test rows, and the table gives each metric with its CI and the paired bootstrap difference
from the baseline. The flow that runs it is ``flows/ablate.py``; this module holds the logic.

Variants file::

    baseline: no_filter            # optional: the variant differences are taken against (default: first)
    test_manifest: eval/manifest.csv   # optional: the fixed test set (default: the baseline's test split)
    steps: 300                     # optional: training steps of every variant (default: derived)
    variants:
      no_filter: {}
      align80:                     # DataComp's CLIP-score filter: keep the top 80% by image-text cosine
        quality.alignment_model: runs/first/train/model
        quality.alignment_keep_fraction: 0.8
      basic:
        presets: [datacomp_basic]
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mmcore import evaluate, graph, ingest, tables, trainloop
from mmcore.base import StrictModel
from mmcore.config import PipelineConfig, load_config, preset_names
from mmcore.errors import ConfigError, InputError, LeakageError
from mmcore.layout import RunLayout
from mmcore.report.ablation import HEADLINE
from mmcore.split import CONTENT_DIGEST, MANIFEST_DIGEST, SPLIT, STRATUM, read_held_out
from mmcore.tables import GROUP, ROW_ID

# The stages whose kept rows the table reports (train's and evaluate's are not curation).
CURATION = ("clean", "probe", "quality", "split", "pseudo")
PRESETS_KEY = "presets"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

# Keys a variant may not set, and why: they would change the test set or the compute, not the curation.
FIXED_KEYS = {
    "out": "each variant gets its own run folder under ablate/",
    "run_name": "the ablation is one run",
    "seed": "curation seeds are shared (training seeds: --seeds)",
    "evaluate": "every variant is evaluated alike",
    "split.fixed_test": "the fixed test set is the ablation's",
    "train.steps": "every variant trains the same steps (variants file 'steps' or --steps)",
    "train.epochs": "every variant trains the same steps",
    "train.minutes": "every variant trains the same steps",
    "train.batch_size": "every variant trains at the same batch size",
    "train.grad_accum": "every variant trains at the same batch size",
    "train.seed": "training seeds come from --seeds",
}


class AblationSpec(StrictModel):
    """A variants file (``mmpipe ablate --variants``), or ``--schemes`` as one."""

    baseline: str | None = Field(None, description="The variant differences are taken against; default: the first.")
    test_manifest: Path | None = Field(None, description="Evaluation manifest: the fixed test set; default: the "
                                       "baseline's test split.")
    steps: int | None = Field(None, ge=1, description="Training steps of every variant; default: --steps, else "
                              "the baseline's train.epochs (default 8) of its train split.")
    variants: dict[str, dict[str, Any]] = Field(min_length=1, description="name -> {dotted.key: value, presets: [...]}.")

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, overrides in v.items():
            if not re.match(_NAME, str(name)):
                raise ValueError(f"variant name must match {_NAME} (it names a folder), got {name!r}")
            overrides = overrides or {}
            for key in overrides:
                if key == PRESETS_KEY:
                    continue
                fixed = next((f for f in FIXED_KEYS if key == f or key.startswith(f + ".")), None)
                if fixed is not None:
                    raise ValueError(f"variant {name!r} sets {key!r}, which an ablation fixes: {FIXED_KEYS[fixed]}")
            presets = overrides.get(PRESETS_KEY, [])
            if not isinstance(presets, list) or not all(isinstance(p, str) for p in presets):
                raise ValueError(f"variant {name!r}: presets must be a list of names, got {presets!r}")
        return {k: dict(o or {}) for k, o in v.items()}

    @model_validator(mode="after")
    def _baseline(self) -> AblationSpec:
        if self.baseline is not None and self.baseline not in self.variants:
            raise ValueError(f"baseline {self.baseline!r} is not a variant; expected one of {', '.join(self.variants)}")
        return self

    @property
    def baseline_name(self) -> str:
        return self.baseline or next(iter(self.variants))

    @classmethod
    def from_schemes(cls, schemes: list[str], steps: int | None = None) -> AblationSpec:
        """``--schemes a,b``: one variant per augmentation scheme; baseline 'none' when listed."""
        return cls(baseline="none" if "none" in schemes else None, steps=steps,
                   variants={s: {"train.augment": s} for s in schemes})


def load_spec(path: str | os.PathLike) -> AblationSpec:
    """Read a variants file; a bad one is a one-line error naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"variants file not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {p}: {getattr(e, 'problem', e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"variants file {p} must be a mapping with 'variants', got {type(tree).__name__}")
    unknown = sorted(set(tree) - set(AblationSpec.model_fields))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in variants file {p}; expected one of: "
                          f"{', '.join(AblationSpec.model_fields)}")
    if tree.get("test_manifest") is not None:  # relative to the working directory, as config paths are
        tree["test_manifest"] = os.path.abspath(tree["test_manifest"])
    try:
        return AblationSpec.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"variants file {p}: {loc + ': ' if loc else ''}{msg}") from None


def _as_override(key: str, value: Any) -> str:
    # JSON is YAML: the value reaches the config exactly as the variants file wrote it.
    return f"{key}={json.dumps(value, default=str)}"


def variant_config(
    config: str | os.PathLike, spec: AblationSpec, name: str, overrides: list[str] | tuple[str, ...] = (),
    presets: list[str] | tuple[str, ...] = (), source: str = "variants file",
) -> PipelineConfig:
    """The config of one variant: the base config, its presets, the command line's overrides, then the
    variant's; a misnamed key is a one-line error naming the variant and listing the valid keys."""
    own = spec.variants[name]
    extra = [_as_override(k, v) for k, v in own.items() if k != PRESETS_KEY]
    try:
        return load_config(config, [*overrides, *extra], [*presets, *own.get(PRESETS_KEY, [])])
    except ConfigError as e:
        raise ConfigError(f"variant {name!r} ({source}): {e}") from None


def variant_configs(
    config: str | os.PathLike, spec: AblationSpec, overrides: list[str] | tuple[str, ...] = (),
    presets: list[str] | tuple[str, ...] = (), source: str = "variants file",
) -> dict[str, PipelineConfig]:
    """Every variant's config, all validated before anything runs (the baseline first)."""
    names = [spec.baseline_name, *(n for n in spec.variants if n != spec.baseline_name)]
    bad = [p for n in names for p in spec.variants[n].get(PRESETS_KEY, []) if p not in preset_names()]
    if bad:
        raise ConfigError(f"unknown preset {bad[0]!r} ({source}); expected one of: {', '.join(preset_names())}")
    return {n: variant_config(config, spec, n, overrides, presets, source) for n in names}


def test_set_config(base: PipelineConfig, manifest: str | os.PathLike) -> PipelineConfig:
    """The baseline's curation of a given evaluation manifest, every row of it a test row."""
    data = base.data.model_copy(update={"manifest": Path(os.path.abspath(manifest)), "root": None})
    split = base.split.model_copy(update={"ratios": {"train": 0.0, "val": 0.0, "test": 1.0}, "holdout_domains": []})
    return base.model_copy(update={"data": data, "split": split, "out": RunLayout(base.run_dir).test_set})


def for_variant(cfg: PipelineConfig, run_dir: Path, held_out: Path, steps: int | None, train_seed: int,
                batch_size: int | None = None) -> PipelineConfig:
    """A variant's config for one training seed: its run folder, the fixed test set, the fixed steps
    and batch size (equal compute: a variant's own automatic batch would follow its image count),
    and an evaluation of the test split only."""
    split = cfg.split.model_copy(update={"fixed_test": Path(held_out)})
    length = {"steps": steps, "epochs": None, "minutes": None} if steps is not None else {}
    if batch_size is not None and cfg.train.batch_size is None:
        length["batch_size"] = batch_size
    train = cfg.train.model_copy(update={**length, "seed": train_seed})
    evaluate_ = cfg.evaluate.model_copy(update={"splits": ["test"]})
    return cfg.model_copy(update={"out": Path(run_dir), "split": split, "train": train, "evaluate": evaluate_})


def for_evaluation(cfg: PipelineConfig, test: PipelineConfig) -> PipelineConfig:
    """A variant's config for evaluating its model on the fixed test set (whose images the test set's data names)."""
    return cfg.model_copy(update={"data": test.data})


def derive_steps(cfg: PipelineConfig, n_train: int) -> int:
    """Steps of the baseline's training length on ``n_train`` train images (``derive_compute``)."""
    return derive_compute(cfg, n_train)[0]


def derive_compute(cfg: PipelineConfig, n_train: int, steps: int | None = None) -> tuple[int, int]:
    """(steps, batch size) of the baseline's training on ``n_train`` train images, as the train stage
    would choose them (``trainloop.auto_schedule``; settings given win, ``steps`` first)."""
    sched = trainloop.auto_schedule(cfg.train, n_train)
    return (int(steps) if steps is not None else _steps(cfg, n_train, sched)), sched.batch_size


def _steps(cfg: PipelineConfig, n_train: int, sched) -> int:
    unit, amount = sched.unit, sched.amount
    if unit == "steps":
        return int(amount)
    if unit == "minutes":
        raise ConfigError("ablate: train.minutes is not equal compute across machines; set steps in the variants "
                          "file, --steps, or train.epochs")
    per_epoch = max(1, math.ceil(n_train / (sched.batch_size * cfg.train.grad_accum)))
    return int(amount * per_epoch)


# The stage whose kept table train reads (pseudo, after split): its train rows are the ones trained on.
TRAIN_INPUT = graph.stage("train").input


def n_train_rows(stats: dict[str, Any]) -> int:
    """Train rows in a stage's kept table, from its stats.json (``stats["splits"]["train"]["rows"]``: split
    and pseudo write it). Pass the stats of ``TRAIN_INPUT``: split's count overstates what train sees when
    pseudo quarantines uncaptioned train rows."""
    try:
        return int(stats["splits"]["train"]["rows"])
    except (KeyError, TypeError):
        raise InputError("ablate: the stage's stats.json has no per-split row counts (splits.train.rows); "
                         f"expected the stats of {TRAIN_INPUT!r}, train's input: rerun it") from None


# --------------------------------------------------------------------------- checks and the table


def check_no_leakage(held: pd.DataFrame, variant_split: pd.DataFrame, name: str, manifest_digest: str) -> dict[str, int]:
    """No row of a variant's train or val shares a content digest, or (same manifest: ids of another
    manifest mean nothing) a row_id or group, with the fixed test set; a shared one raises LeakageError."""
    trained = variant_split[variant_split[SPLIT].isin(["train", "val"])]
    same = held[MANIFEST_DIGEST].eq(manifest_digest).to_numpy(bool)
    counts = {}
    for col, rows in ((CONTENT_DIGEST, slice(None)), (GROUP, same), (ROW_ID, same)):
        if col in trained.columns:
            values = set(held.loc[rows, col].dropna().astype("str")) - {"", "None", "nan", "<NA>"}
            counts[col] = int(trained[col].astype("str").isin(values).sum())
    leaks = {k: v for k, v in counts.items() if v}
    if leaks:
        raise LeakageError(f"ablate: variant {name!r} trains on rows of the fixed test set: "
                           f"{', '.join(f'{v} rows share a {k}' for k, v in leaks.items())}")
    return counts


def scored_test_rows(run_dir: str | os.PathLike) -> np.ndarray:
    """The test queries' row_ids an evaluation scored (sorted)."""
    df = tables.read_parquet(RunLayout(run_dir).per_query)
    return np.unique(df.loc[df[SPLIT] == "test", ROW_ID].to_numpy(np.int64))


def _stats(run_dir: str | os.PathLike, stage: str) -> dict[str, Any]:
    return tables.read_json(tables.StagePaths.of(run_dir, stage).stats)


def _strata(run_dir: str | os.PathLike, top: int = 3) -> str:
    kept = tables.read_parquet(tables.StagePaths.of(run_dir, TRAIN_INPUT).kept)
    train = kept.loc[kept[SPLIT] == "train", STRATUM] if STRATUM in kept.columns else pd.Series(dtype="str")
    share = train.value_counts(normalize=True).head(top)
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in share.items())


def curation_row(name: str, run_dirs: list[str]) -> dict[str, Any]:
    """One variant's curation and compute: rows kept per stage, training set size and strata, steps, epochs."""
    first = run_dirs[0]
    row: dict[str, Any] = {"scheme": name, "n_manifest": _stats(first, "clean")["n_rows"]}
    for stage in CURATION:
        row[f"kept_{stage}"] = _stats(first, stage)["n_kept"]
    split = _stats(first, "split")
    row["n_held_out"] = int(split.get("reasons", {}).get("held_out_test", 0))
    trained = _stats(first, TRAIN_INPUT)  # after pseudo: the rows train and its val score saw
    row["n_train"], row["n_val"] = n_train_rows(trained), int(trained["splits"]["val"]["rows"])
    row["n_pseudo"] = int(_stats(first, "pseudo").get("n_pseudo", 0))  # pseudo-pairs among the train rows
    row["train_strata"] = _strata(first)
    trains = [_stats(d, "train") for d in run_dirs]
    row["steps"] = trains[0].get("steps")
    train_cfg = load_config(RunLayout(first).config).train
    # What ran (the train stage's stats), not the config: an unset batch size is chosen from the data.
    row["batch_size"] = int(trains[0].get("batch_size") or train_cfg.batch_size or 0) * train_cfg.grad_accum
    row["epochs"] = round(float(np.mean([t.get("epochs", np.nan) for t in trains])), 3)
    row["n_seeds"] = len(run_dirs)
    return row


def check_equal_compute(rows: list[dict[str, Any]]) -> None:
    """Every variant trained the same steps at the same batch size, or the comparison is not one."""
    seen = {(r["steps"], r["batch_size"]) for r in rows}
    if len(seen) > 1:
        got = ", ".join(f"{r['scheme']} {r['steps']}x{r['batch_size']}" for r in rows)
        raise InputError(f"ablate: variants trained unequal compute (steps x batch size): {got}")


def table(
    runs: dict[str, list[str]], baseline: str, held_out: str | os.PathLike, cfg: evaluate.EvaluateConfig, seed: int = 0,
) -> pd.DataFrame:
    """The ablation table: per variant and test metric, the value with its CI over the fixed test queries
    (per-query values averaged over seeds), the paired bootstrap difference from ``baseline`` with its CI
    and p-value, and the variant's curation (rows kept per stage, training set, steps, epochs).

    Checks first: no variant trained on the fixed test set, every run scored the same test rows, and
    every variant trained the same steps at the same batch size.
    """
    held = read_held_out(held_out)
    ids = None
    for name, dirs in runs.items():
        manifest = ingest.input_key(load_config(RunLayout(dirs[0]).config).data)
        check_no_leakage(held, tables.read_parquet(tables.StagePaths.of(dirs[0], "split").kept), name, manifest)
        for d in dirs:
            got = scored_test_rows(d)
            if ids is None:
                ids = got
            elif not np.array_equal(ids, got):
                raise InputError(f"ablate: {d} was scored on {len(got)} test rows, not the fixed test set's {len(ids)}")
    curation = [curation_row(n, d) for n, d in runs.items()]
    check_equal_compute(curation)
    results = {}
    for name, dirs in runs.items():
        per_seed = [evaluate.per_query(d, ks=cfg.ks) for d in dirs]
        results[name] = {m: np.stack([q[m] for q in per_seed]) for m in per_seed[0]}
    metrics = evaluate.ablation_table(results, baseline=baseline, n_boot=cfg.bootstrap, seed=seed, ci=cfg.ci)
    metrics.insert(1, "baseline", baseline)
    metrics.insert(2, "n_test", len(ids) if ids is not None else 0)
    return metrics.merge(pd.DataFrame(curation), on="scheme", how="left")


def summary(t: pd.DataFrame, metrics: tuple[str, ...] = (HEADLINE, "t2i_r5", "acc1")) -> pd.DataFrame:
    """The table's headline view: one row per variant, rows kept per stage, compute, and a few metrics
    as ``value [low, high]`` and ``diff [low, high] p``."""
    first = t.drop_duplicates("scheme").set_index("scheme")
    cols = [c for c in first.columns if c.startswith("kept_")] + ["n_train", "n_pseudo", "steps", "epochs", "n_seeds"]
    out = first[cols].copy()
    for m in metrics:
        rows = t[t["metric"] == m].set_index("scheme")
        if rows.empty:
            continue
        out[m] = [f"{r.value:.3f} [{r.low:.3f}, {r.high:.3f}]" for r in rows.itertuples()]
        if "diff" in rows.columns:
            out[f"{m} diff"] = [f"{r.diff:+.3f} [{r.diff_low:+.3f}, {r.diff_high:+.3f}] p={r.p_value:.3f}"
                                for r in rows.itertuples()]
    return out.reset_index()

