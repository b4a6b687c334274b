"""Which stages of a run are out of date for a config and the current inputs, without running any.

Each stage's ``stats.json`` records the digests its output was made from: its config section, its
code (``provenance.code_digest``) and its input (the manifest's bytes for clean, the previous
stage's ``kept_digest`` after that) and, for the stages in ``EXTRAS``, what it reads besides
(``extra_digest``). A stage is fresh when all of them equal today's and its own artifacts still have
the bytes it recorded; a stage after a stale (or missing) one is stale too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcore import tables
from mmcore.base import MODELS_DIR
from mmcore.errors import InputError, MMPipeError
from mmcore.provenance import code_digest
from mmcore.tables import STAGES, StagePaths

if TYPE_CHECKING:
    from mmcore.config import PipelineConfig

FRESH, STALE, NOT_RUN = "fresh", "stale", "not run"
CONFIG_FILE = "config.yaml"


def _saved_config(run_dir: Path) -> PipelineConfig | None:
    from mmcore.config import load_config

    path = run_dir / CONFIG_FILE
    try:
        return load_config(path) if path.is_file() else None
    except MMPipeError:  # a config from an older mmpipe: the digests still decide
        return None


def _artifacts_changed(paths: StagePaths, stats: dict[str, Any]) -> list[str]:
    why = []
    for name, path, key in (("kept", paths.kept, "kept_digest"), ("quarantine", paths.quarantine, "quarantine_digest")):
        if key not in stats:
            continue
        if not path.is_file():
            why.append(f"{path.name} is missing")
        elif tables.file_digest(path) != stats[key]:
            why.append(f"{path.name} changed since the stage wrote it")
    return why


def _clean_inputs(cfg: PipelineConfig, stats: dict[str, Any], saved: PipelineConfig | None) -> list[str]:
    why = []
    manifest = Path(cfg.data.manifest)
    if not manifest.is_file():
        why.append(f"manifest not found: {manifest}")
    elif tables.file_digest(manifest) != stats.get("input_digest"):
        why.append(f"manifest {manifest} changed")
    # The data section and the seed are in every stage's cache key but in no stage's config digest.
    if saved is not None:
        if saved.data.model_dump(mode="json") != cfg.data.model_dump(mode="json"):
            why.append("the data section differs from the run's config.yaml")
        if saved.seed != cfg.seed:
            why.append(f"seed changed ({saved.seed} -> {cfg.seed})")
    return why


def _images(cfg: PipelineConfig, run_dir: Path) -> str | None:
    """The probe's image files: a cheap fingerprint (``None`` before clean has run)."""
    kept = StagePaths.of(run_dir, "clean").kept
    if not kept.is_file():
        return None
    paths = tables.read_parquet(kept, columns=[tables.IMAGE])[tables.IMAGE]
    return tables.files_fingerprint(cfg.data.image_root, paths)


def _path_digest(path: Path | None, default: str) -> str:
    """A file's or a folder's content digest; ``default`` for no path, ``missing:...`` for a bad one."""
    if path is None:
        return default
    path = Path(path)
    if path.is_dir():
        return tables.dir_digest(path)
    return tables.file_digest(path) if path.is_file() else f"missing:{path}"


def _alignment_model(cfg: PipelineConfig, run_dir: Path) -> str:
    return _path_digest(cfg.quality.alignment_model, "none")


def _train_files(cfg: PipelineConfig, run_dir: Path) -> str:
    """The model presets, the synonym table, a local base model and a given tokenizer: data the
    training code reads."""
    from mmcore.augment import DEFAULT_SYNONYMS

    t = cfg.train
    return tables.text_digest(
        tables.dir_digest(MODELS_DIR), _path_digest(t.synonyms or DEFAULT_SYNONYMS, ""),
        _path_digest(t.model_path, "preset"), _path_digest(t.tokenizer_path, "trained on captions"),
    )


def _trained_model(cfg: PipelineConfig, run_dir: Path) -> str:
    return tables.dir_digest(run_dir / "train" / "model")


@dataclass(frozen=True)
class Extra:
    """What a stage reads besides its input table and config, and how to digest it."""

    what: str  # for the stale reason: "files it reads besides its input (<what>) changed"
    digest: Callable[[PipelineConfig, Path], str | None]


# The one list of extra inputs: the task layer adds each digest to the stage's cache key and records
# it in the stage's stats as ``extra_digest``; ``stale`` compares that record with today's digest.
EXTRAS: dict[str, Extra] = {
    "probe": Extra("image files", _images),
    "quality": Extra("alignment model", _alignment_model),
    "train": Extra("model presets, synonyms, base model or tokenizer", _train_files),
    "evaluate": Extra("trained model", _trained_model),
}


def extra_digest(stage: str, cfg: PipelineConfig, run_dir: str | os.PathLike | None = None) -> str | None:
    """Digest of what ``stage`` reads besides its input table and config (``EXTRAS``), or ``None`` if nothing."""
    extra = EXTRAS.get(stage)
    return extra.digest(cfg, Path(run_dir if run_dir is not None else cfg.run_dir)) if extra is not None else None


def stale(run_dir: str | os.PathLike, cfg: PipelineConfig | None = None) -> list[dict[str, str]]:
    """One entry per stage: ``stage``, ``status`` (fresh, stale, not run) and ``why``.

    Reads only the run's stats, its Parquet digests, the manifest and the code; runs nothing.

    Args:
        cfg: the config to compare with; default: the run's own ``config.yaml`` (code and inputs only).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run folder not found: {run_dir}")
    saved = _saved_config(run_dir)
    if cfg is None:
        if saved is None:
            raise InputError(f"no readable {CONFIG_FILE} in {run_dir}; pass the config to compare with")
        cfg = saved
    out: list[dict[str, str]] = []
    upstream: str | None = None  # the first stage that is stale or missing, which taints the rest
    prev_kept: str | None = None
    for stage in STAGES:
        paths = StagePaths.of(run_dir, stage)
        if not paths.stats.is_file():
            out.append({"stage": stage, "status": NOT_RUN, "why": f"no {stage}/{tables.STATS_FILE}"})
            upstream = upstream or stage
            prev_kept = None
            continue
        stats = tables.read_json(paths.stats)
        why = _artifacts_changed(paths, stats)
        if stats.get("config_digest") != tables.json_digest(cfg.section(stage).model_dump(mode="json")):
            why.append(f"config section {stage!r} changed")
        if stats.get("code_digest") != code_digest(f"mmcore.{stage}"):
            why.append(f"code of mmcore.{stage} (or a module it imports) changed")
        if stage in EXTRAS and "extra_digest" in stats and stats["extra_digest"] != extra_digest(stage, cfg, run_dir):
            why.append(f"files it reads besides its input ({EXTRAS[stage].what}) changed")
        if stage == STAGES[0]:
            why += _clean_inputs(cfg, stats, saved)
        elif prev_kept is not None and stats.get("input_digest") != prev_kept:
            why.append(f"input changed: {STAGES[STAGES.index(stage) - 1]} was re-run since")
        if upstream is not None:
            why.insert(0, f"upstream stage {upstream!r} is {out[STAGES.index(upstream)]['status']}")
        status = STALE if why else FRESH
        if status == STALE and upstream is None:
            upstream = stage
        out.append({"stage": stage, "status": status, "why": "; ".join(why)})
        prev_kept = stats.get("kept_digest")
    return out


def format_stale(rows: list[dict[str, str]]) -> str:
    """The staleness list as aligned text lines, for the terminal."""
    width = max(len(r["stage"]) for r in rows)
    return "\n".join(f"{r['stage']:<{width}}  {r['status']:<8} {r['why']}".rstrip() for r in rows)
