"""The stage graph, declared once: every stage's module, config section, inputs and outputs.

The flow runs it, the task factory builds one Prefect task per record, ``mmpipe inspect --stale``
walks it, and the CLI's table, the report's funnel and the README's stage table list it. Adding a
stage is one module (a config model and ``run(table, section, ctx) -> StageResult``) plus one
record here (plus its report section).

Each stage's input table is the kept table of ``input`` (``None``: the manifest, read by the
stage module's ``read_input``; ``LAST_RUN``: the last stage of this run before it). ``reads`` lists
every stage whose outputs it reads: a stage is stale when any of them is. ``extra`` names what it
reads besides its input table and config (image files, models, side files): its digest joins the
stage's cache key and is recorded in its stats for the staleness check.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from mmcore import layout, sources
from mmcore.digests import dir_digest, file_digest, text_digest
from mmcore.errors import InputError
from mmcore.layout import RunLayout, StagePaths
from mmcore.resources import CLIP_BPE, DEFAULT_SYNONYMS, MODEL_CONFIGS
from mmcore.tables import IMAGE

if TYPE_CHECKING:
    from mmcore.config import PipelineConfig

LAST_RUN = "last run"  # the report's input: whichever stage ran last


@dataclass(frozen=True)
class Extra:
    """What a stage reads besides its input table and config, and how to digest it."""

    what: str  # for the stale reason: "files it reads besides its input (<what>) changed"
    digest: Callable[[PipelineConfig, Path], str | None]


@dataclass(frozen=True)
class Stage:
    """One node of the pipeline."""

    name: str  # module mmcore.<name>, task, RUN_DIR/<name>/, config section, stats prefix, artifact key
    config: str  # its config model's class name (in the stage module; PipelineConfig.<name> holds it)
    input: str | None  # whose kept table is its input: a stage, LAST_RUN, or None for the manifest
    reads: tuple[str, ...]  # every stage whose outputs it reads (its input's stage included)
    summary: str  # one line, for the README and --help
    writes: tuple[str, ...] = ()  # its own files besides kept, quarantine and stats (mmcore.layout names)
    extra: Extra | None = None
    # Its output names the run (title, folder): cached per run folder and run name, never brought over
    # from another folder's run of the same inputs.
    per_run: bool = False

    @property
    def module(self) -> str:
        return f"mmcore.{self.name}"

    @property
    def section(self) -> str:
        return self.name


# --------------------------------------------------------------------------- extra inputs


def _path_digest(path: str | os.PathLike | None, default: str) -> str:
    """A file's or a folder's content digest; ``default`` for no path, ``missing:...`` for a bad one."""
    if path is None:
        return default
    path = Path(path)
    if path.is_dir():
        return dir_digest(path)
    return file_digest(path) if path.is_file() else f"missing:{path}"


def _images(cfg: PipelineConfig, run_dir: Path) -> str | None:
    """The probe's image files: a cheap fingerprint (``None`` before clean has run)."""
    kept = StagePaths.of(run_dir, "clean").kept
    if not kept.is_file():
        return None
    paths = pq.read_table(kept, columns=[IMAGE]).column(IMAGE).to_pylist()
    return sources.of(cfg.data).fingerprint(paths)  # the files, shards or Parquet files referenced


def _alignment_model(cfg: PipelineConfig, run_dir: Path) -> str:
    return _path_digest(cfg.quality.alignment_model, "none")


def _reference_sets(cfg: PipelineConfig, run_dir: Path) -> str:
    """The reference sets' manifests and image files, and the embedding model (by the stage's own
    digest, found through its record like any stage module)."""
    return importlib.import_module(STAGES["decontam"].module).extra_digest(cfg.decontam)


def _fixed_test(cfg: PipelineConfig, run_dir: Path) -> str:
    return _path_digest(cfg.split.fixed_test, "none")


def _teacher(cfg: PipelineConfig, run_dir: Path) -> str:
    """The teacher model and a given caption bank (nothing while the stage is off)."""
    p = cfg.pseudo
    if not p.enabled:
        return "off"
    return text_digest(_path_digest(p.model_path, ""), _path_digest(p.captions, "train captions"))


def _train_files(cfg: PipelineConfig, run_dir: Path) -> str:
    """The model presets, the synonym table, a local base model and a given tokenizer."""
    t = cfg.train
    return text_digest(
        dir_digest(MODEL_CONFIGS), _path_digest(t.synonyms or DEFAULT_SYNONYMS, ""),
        _path_digest(t.model_path, "preset"),
        _path_digest(t.tokenizer_path, "trained on captions" if t.vocab_size else _path_digest(CLIP_BPE, "")),
    )


def _trained_model(cfg: PipelineConfig, run_dir: Path) -> str:
    """The trained model, and a baseline model given by path (the default baseline, train's
    ``model_path``, is in train's own extra digest)."""
    model = dir_digest(RunLayout(run_dir).model)
    if cfg.evaluate.baseline_model is None:
        return model
    return text_digest(model, _path_digest(cfg.evaluate.baseline_model, ""))


def _run_files(cfg: PipelineConfig, run_dir: Path) -> str:
    """Everything the report reads: the run's config, every stage's stats and whether this run took it
    from cache, the training curves, and the evaluation's files (metrics, robustness, spot-check and
    its verdicts, an ablation table, external datasets' metrics)."""
    run = RunLayout(run_dir)
    files = [run.config, *(StagePaths.of(run_dir, s).stats for s in ORDER[:-1])]
    files += [run.history, run.timing, run.metrics, run.robustness, run.spotcheck_csv, run.verdicts, run.ablation]
    files += run.external_metrics()
    parts = [f"{f.relative_to(run_dir)}={file_digest(f) if f.is_file() else '-'}" for f in files]
    for s in ORDER[:-1]:  # the cache badges: only the flag (status.json also holds times and run ids)
        status = StagePaths.of(run_dir, s).status
        parts.append(f"{s}.cached={json.loads(status.read_text()).get('cached') if status.is_file() else '-'}")
    return text_digest(*parts)


# --------------------------------------------------------------------------- the graph

_STAGES = (
    Stage("clean", "CleanConfig", None, (),
          "reads the manifest; normalises captions; drops empty, short, long, non-text and duplicate rows"),
    Stage("probe", "ProbeConfig", "clean", ("clean",),
          "opens every distinct image file once: size, format, mode, content digest, pHash",
          extra=Extra("image files", _images)),
    Stage("quality", "QualityConfig", "probe", ("probe",),
          "decodes each image at draft scale: blur, exposure, information, aspect, duplicates, alignment",
          extra=Extra("alignment model", _alignment_model)),
    Stage("decontam", "DecontamConfig", "quality", ("quality",),
          "quarantines rows whose image or caption is in a reference (evaluation) set; links mirrored and "
          "semantic near-duplicates",
          writes=(layout.REFERENCES_DIR,),
          extra=Extra("reference sets, embedding model", _reference_sets)),
    Stage("split", "SplitConfig", "decontam", ("decontam",),
          "train/val/test by group, content digest, pHash, mirrored and semantic clusters (or a given split); "
          "checks that nothing leaks",
          extra=Extra("fixed test set", _fixed_test)),
    Stage("pseudo", "PseudoConfig", "split", ("split",),
          "off by default; a teacher model gives train images without a usable caption the best caption of a "
          "bank (pseudo-pairs, weighted); val and test rows without one are quarantined",
          extra=Extra("teacher model, caption bank", _teacher)),
    Stage("train", "TrainConfig", "pseudo", ("pseudo",),
          "decodes train and val images into shards and trains a CLIP dual encoder",
          writes=(layout.MODEL_DIR, layout.HISTORY_FILE, layout.TIMING_FILE, layout.CHECKPOINT_DIR,
                  layout.SHARDS_DIR),
          extra=Extra("model presets, synonyms, base model or tokenizer", _train_files)),
    Stage("evaluate", "EvaluateConfig", "pseudo", ("pseudo", "train"),
          "retrieval and zero-shot metrics with bootstrap CIs, robustness, a spot-check sheet",
          writes=(layout.METRICS_FILE, layout.PER_QUERY_FILE, layout.EMBEDDINGS_FILE, layout.ROBUSTNESS_FILE,
                  layout.SPOTCHECK_CSV, layout.SPOTCHECK_HTML),
          extra=Extra("trained model", _trained_model)),
    Stage("report", "ReportConfig", LAST_RUN, ("clean", "probe", "quality", "decontam", "split", "pseudo", "train",
                                                  "evaluate"),
          "one self-contained HTML page: funnel, reasons, galleries, curves, metrics",
          writes=(layout.REPORT_FILE,),
          extra=Extra("the run's stats, curves and evaluation files", _run_files), per_run=True),
)
STAGES: dict[str, Stage] = {s.name: s for s in _STAGES}
ORDER: tuple[str, ...] = tuple(STAGES)


def _check(stages: dict[str, Stage]) -> None:
    """Each stage reads only stages before it, and its input is one of them."""
    seen: set[str] = set()
    for s in stages.values():
        assert set(s.reads) <= seen, f"{s.name} reads a stage that does not come before it: {s.reads}"
        assert s.input in (None, LAST_RUN, *s.reads), f"{s.name}: input {s.input!r} is not in reads"
        seen.add(s.name)


_check(STAGES)


def stage(name: str) -> Stage:
    """The stage called ``name``; an unknown name is a one-line error listing the valid ones."""
    try:
        return STAGES[name]
    except KeyError:
        raise InputError(f"unknown stage {name!r}; expected one of {', '.join(ORDER)}") from None


def plan(until: str = ORDER[-1]) -> tuple[Stage, ...]:
    """The stages a run up to ``until`` runs, in order; the report always runs last."""
    last = ORDER.index(stage(until).name)
    names = [*ORDER[: last + 1], *(() if ORDER[-1] in ORDER[: last + 1] else (ORDER[-1],))]
    return tuple(STAGES[n] for n in names)


def input_of(s: Stage, ran: list[str] | tuple[str, ...]) -> str | None:
    """The stage whose kept table is ``s``'s input, given the stages that ran before it in this run."""
    if s.input == LAST_RUN:
        return next((r for r in reversed(ran) if r in s.reads), None)
    return s.input


def markdown_table() -> str:
    """The README's stage table (a test checks that the README carries it as written here)."""
    rows = ["| stage | input | also reads | what it does | its own files |", "|---|---|---|---|---|"]
    for s in STAGES.values():
        inp = "manifest" if s.input is None else s.input
        also = ", ".join(r for r in s.reads if r != s.input) if s.input != LAST_RUN else "every stage's stats"
        if s.extra is not None:
            also = ", ".join(x for x in (also, s.extra.what) if x)
        files = ", ".join(f"`{f}`" for f in s.writes)
        rows.append(f"| `{s.name}` | {inp} | {also or '-'} | {s.summary} | {files or '-'} |")
    return "\n".join(rows)
