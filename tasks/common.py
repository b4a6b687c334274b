"""Caching, retries and artifact publishing shared by the stage tasks.

Prefect's ``INPUTS`` policy would hash a path as a string, not the file's bytes, and
``TASK_SOURCE`` sees only the task body, not the mmcore code it calls. So a stage's cache key is
built here from content digests of its inputs, its config section, the data section, the seed,
``provenance.code_digest`` of its mmcore module and, for the stages with an ``extra`` in
``mmcore.graph``, the digest of what the stage reads besides its input table. No path is in the
key, the run folder's included (``provenance.settings_json`` marks every path setting; what it
points at is keyed by content): a stage computed in one run folder, checkout or worker is a cache
hit in another with the same files (an ablation variant, a moved dataset), and ``run_cached``
copies its files into the run folder that asked.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import time
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import FlowRunContext, TaskRunContext
from prefect.serializers import Serializer
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

from mmcore import execute, faults, graph, ingest, storage, tables
from mmcore.config import PipelineConfig
from mmcore.layout import KEPT_FILE, QUARANTINE_FILE, STATS_FILE, RunLayout, StagePaths
from mmcore.provenance import code_digest, settings_json
from mmcore.stale import extra_digest

# Bump to invalidate every cached stage at once (e.g. after a change to this caching scheme).
CACHE_SCHEME = "5"  # 2: the run folder left the key; 4: so did every other path; 5: StageOutput.location

# The extra digest a task run's cache key was built from, for its body to record in the stats.
# Prefect calls the key function and then the body in the same context, but passes the body nothing
# from the key; computing the digest again would lstat every image (probe) or hash a model folder
# (quality, train, evaluate) a second time, and could record a value other than the key's.
_KEYED_EXTRA: ContextVar[tuple[UUID, str | None] | None] = ContextVar("mmpipe_keyed_extra", default=None)


@dataclass(frozen=True)
class StageOutput:
    """What a stage task returns (and Prefect caches): where its artifacts are and their digests.

    Never a DataFrame: a cache check unpickles the whole result.
    """

    stage: str
    run_dir: str
    kept_digest: str
    quarantine_digest: str
    n_kept: int
    n_quarantined: int
    stats_digest: str  # its stats.json: config, code and extra digests, so a later run's files are told apart
    location: str = ""  # the remote run folder it was uploaded to ("" when local): a worker without the files pulls them

    @property
    def paths(self) -> StagePaths:
        return StagePaths.of(self.run_dir, self.stage)

    @property
    def digests(self) -> dict[str, str]:
        """The recorded digest of each checked file, by its name in the stage folder."""
        return {KEPT_FILE: self.kept_digest, QUARANTINE_FILE: self.quarantine_digest, STATS_FILE: self.stats_digest}

    def intact(self) -> bool:
        """Artifacts still on disk with the bytes this output recorded: not deleted, not overwritten,
        and not replaced by a later run of the stage with another config (its stats differ even when
        its tables do not: train and evaluate keep the same rows whatever their settings)."""
        return storage.files_match(self.paths.dir, self.digests)


def digest_of(value: Any) -> str:
    """Content digest of a task input: a stage output's kept table, a file, or a plain value."""
    if isinstance(value, StageOutput):
        return value.kept_digest  # checked against the file's bytes by run_cached (intact)
    if isinstance(value, Path):
        return tables.file_digest(value) if value.is_file() else f"missing:{value}"
    return tables.json_digest(value)


def stage_cache(stage: str) -> CachePolicy:
    """Cache policy of a stage task: the content of what it reads (the manifest, or each upstream
    stage's kept table) + its config section, the data section and the seed + its code + the
    digest of its graph ``extra``. Not the run folder: ``run_cached`` brings a hit's files over."""
    graph.stage(stage)  # an unknown name fails when the task is built

    def key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
        s = graph.stage(stage)
        cfg: PipelineConfig = params["cfg"]
        upstream: dict[str, StageOutput] = params["upstream"]
        _worker_inputs(cfg, upstream)  # the key reads local files: remote ones are brought here first
        parts = [
            CACHE_SCHEME,
            stage,
            code_digest(s.module),
            settings_json(cfg.section(stage)),  # paths marked: their files are keyed by content
            settings_json(cfg.data),
            str(cfg.seed),
            *(f"{name}={digest_of(out)}" for name, out in sorted(upstream.items())),
        ]
        if s.input is None:  # the manifest's bytes; shards and Parquet files as they are (unread: ingest.input_key)
            parts.append(ingest.input_key(cfg.data))
        if s.per_run:  # a remote run folder by its URL: the same on every worker, whatever its local copy
            parts += [storage.url_of(cfg.run_dir) or str(cfg.run_dir), cfg.run_name]
        if faults.injection():  # a test's injected faults: never shared with a normal run's cache
            parts.append(faults.injection())
        if s.extra is not None:
            parts.append(_key_extra(ctx, stage, cfg))
        digest = tables.text_digest(*parts)
        guard_record(digest, cfg.storage.results)  # never unpickle: only mmpipe's JSON record may be read under this key
        return digest

    return CachePolicy.from_cache_key_fn(key) + TASK_SOURCE


# A full disk or quota does not pass in a second: retrying only repeats the failed write.
_PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.ENAMETOOLONG})


def is_transient(task, task_run, state) -> bool:
    """Retry only I/O errors that may pass (a flaky mount); bad data, a full disk or bugs fail at once."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, faults.ReadError):  # mmcore's reader already retried; its reason code says
        return exc.reason == "read_error"
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return False
    return isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError))


# --------------------------------------------------------------------------- persisted results
#
# Prefect persists a task's result (for its cache) with the serializer its record names, pickle by
# default: whoever can write a record into the result storage (a shared PREFECT_HOME, as multi-node
# Dask suggests) would run code in every later cached run. A stage task's result is a StageOutput:
# six strings and numbers, written here as JSON, and ``guard_record`` deletes any record in the
# result storage (PREFECT_HOME's, or ``storage.results``) that is not such JSON before Prefect looks
# it up (a miss: the stage runs again). A result storage block configured elsewhere
# (PREFECT_DEFAULT_RESULT_STORAGE_BLOCK) is not guarded: keep such storage writable by the run's user only.
STAGE_OUTPUT_SERIALIZER = "mmpipe-stage-output-json"


class StageOutputSerializer(Serializer):
    """JSON of a ``StageOutput``; loads nothing else."""

    type: str = STAGE_OUTPUT_SERIALIZER

    def dumps(self, obj: Any) -> bytes:
        if isinstance(obj, BaseException):  # a failed run's state: its error as text, never a pickle
            return json.dumps({"error": type(obj).__name__, "message": str(obj)[:2000]}, sort_keys=True).encode()
        if isinstance(obj, Path):  # a task whose result is one file (the external evaluation's metrics)
            return json.dumps({"path": str(obj)}).encode()
        if not isinstance(obj, StageOutput):
            raise TypeError(f"only a StageOutput is persisted, got {type(obj).__name__}")
        return json.dumps(dataclasses.asdict(obj), sort_keys=True).encode()

    def loads(self, blob: bytes) -> StageOutput | RuntimeError:
        data = json.loads(blob)
        if isinstance(data, dict) and set(data) == {"error", "message"}:
            return RuntimeError(f"{data['error']}: {data['message']}")  # text only: no class is looked up
        if isinstance(data, dict) and set(data) == {"path"} and isinstance(data["path"], str):
            return Path(data["path"])
        return stage_output_from_json(blob)


def stage_output_from_json(blob: bytes | str) -> StageOutput:
    """A ``StageOutput`` from its JSON; anything else raises ``ValueError``."""
    data = json.loads(blob)
    fields = {f.name: f.type for f in dataclasses.fields(StageOutput)}
    if not isinstance(data, dict) or set(data) != set(fields):
        raise ValueError("not a StageOutput record")
    for k, v in data.items():
        want = int if fields[k] in (int, "int") else str
        if type(v) is not want:
            raise ValueError(f"StageOutput.{k} must be {want.__name__}")
    return StageOutput(**data)


def guard_record(key: str, results: str | None = None) -> bool:
    """Before Prefect reads the cache record ``key`` from its result storage (local, or the
    ``storage.results`` URL): a record that is not mmpipe's JSON stage result (a pickle planted in a
    shared PREFECT_HOME or bucket) is deleted unread, so the lookup is a miss and the stage runs
    again. Returns whether one was deleted."""
    base = storage.results_base(results) if results else str(PREFECT_LOCAL_STORAGE_PATH.value())
    return storage.remove_unless(storage.join(base, key), _is_stage_record, max_bytes=1 << 20)  # a few hundred bytes


def _is_stage_record(content: bytes) -> bool:
    """Whether a Prefect result record is mmpipe's JSON stage result (checked without unpickling)."""
    try:
        record = json.loads(content)
        StageOutputSerializer().loads(record["result"])
        return record["metadata"]["serializer"]["type"] == STAGE_OUTPUT_SERIALIZER
    except Exception:
        return False


def _flow_run_token() -> str | None:
    flow = FlowRunContext.get()
    return str(flow.flow_run.id) if flow is not None and flow.flow_run is not None else None


_RESULT_BLOCKS: dict[tuple[str, str], Any] = {}


def result_storage(cfg: PipelineConfig):
    """The Prefect storage block of ``storage.results`` (None: Prefect's default, PREFECT_HOME's).

    Prefect takes a task's result storage only as a block saved on its server: saved here once per
    flow run, as ``mmpipe-results-<digest of the URL>`` (the same document whatever the worker).
    """
    url = cfg.storage.results
    if url is None:
        return None
    key = (url, _flow_run_token() or "")
    if key not in _RESULT_BLOCKS:
        from prefect.filesystems import LocalFileSystem, RemoteFileSystem

        base = storage.results_base(url)
        block = RemoteFileSystem(basepath=base) if storage.is_url(base) else LocalFileSystem(basepath=base)
        block.save(f"mmpipe-results-{tables.text_digest(url).split(':')[-1][:12]}", overwrite=True)
        _RESULT_BLOCKS[key] = block
    return _RESULT_BLOCKS[key]


def localize(out: StageOutput) -> StageOutput | None:
    """``out`` with its files on this machine: as it is when they are intact here, else pulled from the
    remote run folder it was uploaded to (``storage.pull_stage``: checked against the record's
    digests). None when neither has them whole (the stage runs again)."""
    if out.intact():
        return out
    if not out.location:
        return None
    run_dir = storage.pull_stage(out.location, out.stage, execute.stage_files(out.stage), out.digests)
    return replace(out, run_dir=str(run_dir)) if run_dir is not None else None


def push(out: StageOutput) -> None:
    """Upload a stage's files to the remote run folder its local copy stands for (``storage.push_stage``:
    ``stats.json`` last, skipped when the remote stats are already these); nothing for a local run."""
    url = storage.url_of(out.run_dir)
    if url is not None:
        storage.push_stage(out.run_dir, url, out.stage, execute.stage_files(out.stage))


def _worker_inputs(cfg: PipelineConfig, upstream: dict[str, StageOutput]) -> None:
    """On the worker a stage task runs on (a thread of the flow, or a Dask worker with a disk of its
    own): remote inputs mirrored (once per flow run and process) and upstream stages pulled from
    their remote run folder, before the cache key digests local files and before the body reads them."""
    storage.sync_inputs(cfg.data, token=_flow_run_token())
    for out in upstream.values():
        if out.location and localize(out) is None:
            raise OSError(f"{out.stage}: its files are neither in {out.run_dir} nor in its remote run folder {out.location}")


def _key_extra(ctx: TaskRunContext, stage: str, cfg: PipelineConfig) -> str:
    """The stage's ``extra`` digest for its cache key, kept for the task body (``keyed_extra``).

    Module-level, not inside the key closure: Dask pickles the closure by value, and a ContextVar
    does not pickle.
    """
    digest = extra_digest(stage, cfg)
    _KEYED_EXTRA.set((ctx.task_run.id, digest))
    return digest or "none"


def keyed_extra(stage: str, cfg: PipelineConfig) -> str | None:
    """The ``extra`` digest this task run's cache key was built from (computed now outside one)."""
    ctx, keyed = TaskRunContext.get(), _KEYED_EXTRA.get()
    if ctx is not None and keyed is not None and keyed[0] == ctx.task_run.id:
        return keyed[1]
    return extra_digest(stage, cfg)


def output_of(stage: str, cfg: PipelineConfig, stats: dict[str, Any]) -> StageOutput:
    """What a stage task returns, from the stats ``execute.run_stage`` wrote."""
    return StageOutput(
        location=storage.url_of(cfg.run_dir) or "",
        stage=stage,
        run_dir=str(cfg.run_dir),
        kept_digest=stats["kept_digest"],
        quarantine_digest=stats["quarantine_digest"],
        n_kept=stats["n_kept"],
        n_quarantined=stats["n_quarantined"],
        stats_digest=tables.file_digest(StagePaths.of(cfg.run_dir, stage).stats),
    )


def summary_rows(stats: dict[str, Any], cached: bool) -> list[dict[str, Any]]:
    rows = [
        {"metric": "n_rows", "value": stats["n_rows"]},
        {"metric": "n_kept", "value": stats["n_kept"]},
        {"metric": "n_quarantined", "value": stats["n_quarantined"]},
        *({"metric": f"dropped_{r}", "value": n} for r, n in stats.get("reasons", {}).items()),
        {"metric": "seconds", "value": stats["seconds"]},
        {"metric": "cached", "value": cached},
    ]
    return rows


def publish(task, task_run, state) -> None:
    """on_completion hook (fires on Completed and on Cached): stats table + markdown summary.

    (``status.json`` is written by ``run_cached``: a cache hit's output may name another run folder.)
    """
    out = _local_result(state)
    if out is None:
        return
    stats = tables.read_json(out.paths.stats)
    cached = state.name == "Cached"
    create_table_artifact(
        key=f"{out.stage}-summary",
        table=summary_rows(stats, cached),
        description=f"{out.stage}: rows in, kept, quarantined per reason",
    )
    reasons = "\n".join(f"| `{r}` | {n} |" for r, n in stats.get("reasons", {}).items()) or "| (none) | 0 |"
    create_markdown_artifact(
        key=f"{out.stage}-report",
        markdown=(
            f"### {out.stage}{' (from cache)' if cached else ''}\n\n"
            f"**{stats['n_rows']}** rows in, **{stats['n_kept']}** kept, **{stats['n_quarantined']}** "
            f"quarantined in {stats['seconds']} s.\n\n| reason | rows |\n|---|---|\n{reasons}\n\n"
            f"Artifacts: `{out.paths.dir}`\n"
        ),
        description=f"{out.stage} summary",
    )


def publish_metrics(task, task_run, state) -> None:
    """on_completion hook of evaluate: the metrics with their CIs as a table artifact."""
    from mmcore import evaluate

    out = _local_result(state)
    metrics = RunLayout(out.run_dir).metrics if out is not None else None
    if metrics is None or not metrics.is_file():
        return
    table = evaluate.metrics_table(tables.read_json(metrics))
    table = table.astype(object).where(table.notna(), None)  # NaN is not JSON
    create_table_artifact(key="evaluate-metrics", table=table.to_dict(orient="records"),
                          description="test/val metrics with 95% bootstrap CIs")


def publish_run(task, task_run, state) -> None:
    """on_completion hook of the report: the whole run's summary and a link to the report."""
    from prefect.artifacts import create_link_artifact

    from mmcore import report

    out = _local_result(state)
    if out is None:
        return
    create_markdown_artifact(key="mmpipe-run-summary", markdown=report.summary_markdown(out.run_dir) + report.headline_plots(out.run_dir),
                             description="mmpipe run: funnel, headline metrics and plots")
    html = RunLayout(out.run_dir).report
    if out.location:  # where the run folder's storage serves it, not this worker's disk
        link = storage.report_link(out.location, html.relative_to(out.run_dir).as_posix(), _storage_settings(out.run_dir))
        text = storage.join(out.location, html.relative_to(out.run_dir).as_posix())
    else:
        link, text = html.resolve().as_uri(), str(html)
    create_link_artifact(key="mmpipe-report", link=link, link_text=text, description="the run's self-contained HTML report")


def _local_result(state) -> StageOutput | None:
    """A hook's stage output with its files on this machine (pulled from its remote run folder when a
    cache hit was made on another worker), or None."""
    out = state.result(raise_on_failure=False)
    return localize(out) if isinstance(out, StageOutput) else None


def _storage_settings(run_dir: str | os.PathLike):
    """The storage section of the flow run that asked (a hook has no parameters of its own), else the
    one the run folder's config.yaml holds (``from_config`` takes a file, not a config)."""
    flow = FlowRunContext.get()
    cfg = flow.parameters.get("cfg") if flow is not None else None
    if isinstance(cfg, PipelineConfig):
        return cfg.storage
    try:
        from mmcore.config import load_config

        return load_config(RunLayout(run_dir).config).storage
    except Exception:  # no readable config.yaml: the defaults (a signed link)
        return storage.StorageConfig()


def materialize(out: StageOutput, run_dir: str | os.PathLike) -> StageOutput:
    """A cache hit computed in another run folder, brought into ``run_dir`` (``execute.copy_stage``);
    a source changed meanwhile is not brought over."""
    execute.copy_stage(out.stage, out.run_dir, run_dir)
    here = replace(out, run_dir=str(run_dir), location=storage.url_of(run_dir) or "")
    if not here.intact():  # the source was rewritten while it was copied
        raise OSError(f"{out.stage}: the cached files in {out.paths.dir} changed while they were copied; run again")
    return here


def _same_dir(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def record_status(out: StageOutput, cached: bool, task_run_id: Any) -> None:
    """``RUN_DIR/<stage>/status.json``: whether this run took the stage from cache."""
    tables.write_json(
        {"cached": cached, "task_run_id": str(task_run_id), "flow_run_id": _flow_run_token(),
         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        out.paths.status,
    )


def run_cached(task, cfg: PipelineConfig, *args: Any, **kwargs: Any) -> StageOutput:
    """Call a stage task for ``cfg``'s run folder; a cache hit made in another run folder has its files
    copied here (pulled first from its remote run folder when this machine lacks them); if a cached
    result's files were deleted or overwritten, the stage runs again. A remote run folder gets the
    stage's files when it is done."""
    block = result_storage(cfg)
    if block is not None:  # the cache records every worker sharing storage.results sees
        task = task.with_options(result_storage=block)
    # submit(): the flow's task runner decides where it runs (a thread here, a worker on Dask).
    fut = task.submit(cfg, *args, **kwargs)
    out = localize(fut.result())
    if out is None:
        fut = task.with_options(refresh_cache=True).submit(cfg, *args, **kwargs)
        out = fut.result()
    cached = fut.state.name == "Cached"
    if not _same_dir(out.run_dir, cfg.run_dir):
        out = materialize(out, cfg.run_dir)
    record_status(out, cached, fut.task_run_id)
    push(out)
    return out
