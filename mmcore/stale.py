"""Which stages of a run are out of date for a config and the current inputs, without running any.

Each stage's ``stats.json`` records the digests its output was made from: its config section, its
code (``provenance.code_digest``), its input (the manifest's bytes for clean, its input stage's
``kept_digest`` after that; ``mmcore.graph`` says which stage that is) and, for the stages with an
``extra`` in the graph, what it reads besides (``extra_digest``). A stage is fresh when all of them
equal today's and its own artifacts still have the bytes it recorded; a stage that reads a stale
(or missing) one is stale too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcore import graph, ingest, tables
from mmcore.errors import InputError, MMPipeError
from mmcore.layout import RunLayout, StagePaths
from mmcore.provenance import code_digest, settings_digest, settings_json

if TYPE_CHECKING:
    from mmcore.config import PipelineConfig

FRESH, STALE, NOT_RUN = "fresh", "stale", "not run"


def _saved_config(run_dir: Path) -> PipelineConfig | None:
    from mmcore.config import load_config

    path = RunLayout(run_dir).config
    try:
        return load_config(path) if path.is_file() else None
    except MMPipeError:  # a config from an older mmpipe: the digests still decide
        return None


def _artifacts_changed(paths: StagePaths, stats: dict[str, Any]) -> list[str]:
    why = []
    for path, key in ((paths.kept, "kept_digest"), (paths.quarantine, "quarantine_digest")):
        if key not in stats:
            continue
        if not path.is_file():
            why.append(f"{path.name} is missing")
        elif tables.file_digest(path) != stats[key]:
            why.append(f"{path.name} changed since the stage wrote it")
    return why


def _manifest_inputs(cfg: PipelineConfig, stats: dict[str, Any], saved: PipelineConfig | None) -> list[str]:
    why = []
    if cfg.data.format == "manifest":
        manifest = Path(cfg.data.manifest)
        if not manifest.is_file():
            why.append(f"manifest not found: {manifest}")
        elif tables.file_digest(manifest) != stats.get("input_digest"):
            why.append(f"manifest {manifest} changed")
    else:  # shards, Parquet or caption files: what ingest reads (their headers and captions, not the pixels)
        try:
            if ingest.input_digest(cfg.data) != stats.get("input_digest"):
                why.append(f"the {cfg.data.format} input changed")
        except MMPipeError as e:
            why.append(f"the {cfg.data.format} input cannot be read: {e}")
    # The data section and the seed are in every stage's cache key but in no stage's config digest.
    if saved is not None:
        if settings_json(saved.data) != settings_json(cfg.data):
            why.append("the data section differs from the run's config.yaml")
        if saved.seed != cfg.seed:
            why.append(f"seed changed ({saved.seed} -> {cfg.seed})")
    return why


def extra_digest(stage: str, cfg: PipelineConfig, run_dir: str | os.PathLike | None = None) -> str | None:
    """Digest of what ``stage`` reads besides its input table and config, or ``None`` if nothing."""
    extra = graph.stage(stage).extra
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
            raise InputError(f"no readable {RunLayout(run_dir).config.name} in {run_dir}; pass the config to compare with")
        cfg = saved
    status: dict[str, str] = {}
    kept: dict[str, str | None] = {}  # each stage's kept_digest as recorded (None when not run)
    out: list[dict[str, str]] = []
    for name, s in graph.STAGES.items():
        paths = StagePaths.of(run_dir, name)
        if not paths.stats.is_file():
            status[name], kept[name] = NOT_RUN, None
            out.append({"stage": name, "status": NOT_RUN, "why": f"no {name}/{paths.stats.name}"})
            continue
        stats = tables.read_json(paths.stats)
        kept[name] = stats.get("kept_digest")
        # A stage that reads whichever stages ran (the report) is not tainted by one that did not.
        tainted = [r for r in s.reads if status[r] == STALE or (status[r] == NOT_RUN and s.input != graph.LAST_RUN)]
        why = [f"upstream stage {r!r} is {status[r]}" for r in tainted]
        why += _artifacts_changed(paths, stats)
        if stats.get("config_digest") != settings_digest(cfg.section(name)):
            why.append(f"config section {name!r} changed")
        if stats.get("code_digest") != code_digest(s.module):
            why.append(f"code of {s.module} (or a module it imports) changed")
        if s.extra is not None and "extra_digest" in stats and stats["extra_digest"] != extra_digest(name, cfg, run_dir):
            why.append(f"files it reads besides its input ({s.extra.what}) changed")
        if s.input is None:
            why += _manifest_inputs(cfg, stats, saved)
        else:
            source = graph.input_of(s, [r for r in s.reads if status[r] != NOT_RUN])
            if source is not None and kept[source] is not None and stats.get("input_digest") != kept[source]:
                why.append(f"input changed: {source} was re-run since")
        status[name] = STALE if why else FRESH
        out.append({"stage": name, "status": status[name], "why": "; ".join(why)})
    return out


def format_stale(rows: list[dict[str, str]]) -> str:
    """The staleness list as aligned text lines, for the terminal."""
    width = max(len(r["stage"]) for r in rows)
    return "\n".join(f"{r['stage']:<{width}}  {r['status']:<8} {r['why']}".rstrip() for r in rows)
