"""Run one stage of the graph on a table and write its artifacts: the one place that does it.

The Prefect task factory (``tasks/``) and the torchrun entry (``mmpipe train``) both call
``run_stage``, so a stage's ``stats.json`` records the same digests (config, code, input and
extra) however it was run, and ``mmpipe inspect --stale`` judges both alike.
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from mmcore import graph, ingest, tables
from mmcore.base import StageContext
from mmcore.layout import KEPT_FILE, QUARANTINE_FILE, SCRATCH, STATS_FILE, StagePaths
from mmcore.provenance import code_digest, settings_digest

if TYPE_CHECKING:
    from mmcore.config import PipelineConfig


def context(cfg: PipelineConfig, progress: bool = True) -> StageContext:
    return StageContext(data=cfg.data, run_dir=cfg.run_dir, seed=cfg.seed, workers=cfg.n_workers, progress=progress,
                        run_name=cfg.run_name)


def config_digest(cfg: PipelineConfig, stage: str) -> str:
    """The stage's settings (paths marked: their files are in the extra digest), as the cache key has them."""
    return settings_digest(cfg.section(stage))


def read_source(cfg: PipelineConfig, stage: str) -> tuple[pd.DataFrame, str]:
    """A stage whose input is the manifest (``graph``: ``input=None``): its table and its digest (the
    manifest's bytes; for shards, Parquet with bytes and caption files, the content of the table read,
    ``ingest.input_digest``: no absolute path, so a copy of the dataset elsewhere is a cache hit)."""
    mod = importlib.import_module(graph.stage(stage).module)
    table = mod.read_input(cfg.data)
    return table, ingest.input_digest(cfg.data, table)


def _copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src``, replaced atomically. A copy, not a hard link: some writers
    (``save_pretrained``, a spreadsheet saving the spot-check sheet) rewrite files in place, which
    would change the other run folder too."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def stage_files(stage: str) -> list[str]:
    """A stage's own files besides its stats: kept, quarantine and the graph's ``writes``, not
    ``layout.SCRATCH`` (shards and checkpoints are rebuilt if ever needed). What travels when a stage
    is copied to another run folder or to and from a remote one."""
    return [KEPT_FILE, QUARANTINE_FILE, *(w for w in graph.stage(stage).writes if w not in SCRATCH)]


def copy_stage(stage: str, src_run: str | os.PathLike, dst_run: str | os.PathLike) -> None:
    """Copy a stage's own files (kept, quarantine, stats and the graph's ``writes``, not
    ``layout.SCRATCH``: shards and checkpoints are rebuilt if ever needed) from one run folder to
    another, replacing the destination's; nothing else of either folder is touched (the user's
    verdicts, external evaluations)."""
    src, dst = StagePaths.of(src_run, stage).dir, StagePaths.of(dst_run, stage).dir
    names = [*stage_files(stage), STATS_FILE]
    for name in names:
        if (dst / name).is_dir() and not (dst / name).is_symlink():
            shutil.rmtree(dst / name)
        else:
            (dst / name).unlink(missing_ok=True)
    for name in names:
        path = src / name
        files = sorted(f for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                _copy(f, dst / f.relative_to(src))


def run_stage(
    stage: str,
    cfg: PipelineConfig,
    table: pd.DataFrame,
    input_digest: str,
    extra: str | None,
    *,
    ctx: StageContext | None = None,
    write: bool = True,
) -> dict[str, Any] | None:
    """Run ``stage``'s ``run`` on ``table`` and (if ``write``) write its artifacts; the stats, or None.

    Args:
        extra: the digest of the stage's extra inputs as they were when its inputs were keyed
            (``stale.extra_digest``), recorded as ``extra_digest``.
        write: false on the DDP ranks other than 0, which train but write nothing.
    """
    s = graph.stage(stage)
    mod = importlib.import_module(s.module)
    t0 = time.perf_counter()
    result = mod.run(table, cfg.section(stage), ctx or context(cfg))
    if not write:
        return None
    if extra is not None:
        result = tables.StageResult(result.kept, result.quarantined, {**result.stats, "extra_digest": extra})
    return tables.write_stage(
        cfg.run_dir,
        stage,
        result,
        input_ids=table[tables.ROW_ID].to_numpy(),
        input_digest=input_digest,
        seconds=time.perf_counter() - t0,
        config_digest=config_digest(cfg, stage),
        code_digest=code_digest(s.module),
    )
