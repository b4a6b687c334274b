"""One run at a time per run folder, and no stage of an earlier, different run shown as this run's.

``hold`` takes an exclusive ``flock`` on a lock file in the run folder for as long as the run lasts:
a second run into the same folder fails at once with one line naming the holder (the kernel drops
the lock when its process dies, so a SIGKILLed run never leaves the folder locked). It also refuses
a run folder that is ``/``, the dataset's folder or a folder above it, where stage folders would
mix with the images.

``retire_stale`` moves aside, into ``RUN_DIR/.superseded/<run id>/``, the stages this run will not
run (beyond ``--until``) that are stale for its config and inputs (``mmcore.stale``): outputs of an
earlier run on other data are never read as this run's by the report or ``mmpipe inspect``. They are
moved, not deleted. ``RUN_DIR/run.json`` records the run's identity (id, start, planned stages).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mmcore import graph, tables
from mmcore.errors import InputError, MMPipeError
from mmcore.layout import ABLATE_DIR, LOCK_FILE, RUN_FILE, SUPERSEDED_DIR, RunLayout
from mmcore.stale import STALE, stale

if TYPE_CHECKING:
    from mmcore.config import PipelineConfig


# Folders of a run folder that a run writes, moves aside or replaces.
_RUN_OWNED = frozenset({*graph.ORDER, ABLATE_DIR, SUPERSEDED_DIR})


class RunFolderBusy(InputError):
    """Another run holds the run folder's lock."""


def check_run_dir(run_dir: str | os.PathLike, data_root: str | os.PathLike | None) -> None:
    """Refuse a run folder that is ``/``, the dataset's folder, a folder above it, or a file."""
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise InputError(f"run folder {run_dir} is a file; expected a folder (or a path that does not exist yet)")
    out = Path(os.path.realpath(run_dir))
    if out == Path(out.anchor):
        raise InputError(f"run folder {run_dir} is the file system root; expected a folder of its own (--out runs/NAME)")
    if out == Path(os.path.realpath(Path.home())):
        raise InputError(f"run folder {run_dir} is the home folder; expected a folder of its own (--out runs/NAME)")
    if data_root is not None:
        root = Path(os.path.realpath(data_root))
        if root == out:
            raise InputError(f"run folder {run_dir} is the dataset folder {data_root}; expected a folder of its own "
                             "(--out runs/NAME)")
        # Above the dataset is fine (the demo keeps its data in RUN_DIR/data), unless the dataset lies
        # in a folder the run writes, moves or replaces (a stage's folder, ablate/, .superseded/).
        if out in root.parents and root.relative_to(out).parts[0] in _RUN_OWNED:
            raise InputError(f"dataset folder {data_root} lies in {root.relative_to(out).parts[0]}/ of run folder "
                             f"{run_dir}, which the run writes; put the run folder elsewhere (--out runs/NAME)")


def _lock(fd: int, mode: int, busy) -> None:
    """``flock`` without waiting; ``busy(holder)`` is raised when another process holds it."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise busy(os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown") from None


@contextlib.contextmanager
def reading(run_dir: str | os.PathLike, what: str = "read it") -> Iterator[None]:
    """A shared lock on the run folder while reading it (an export): a run writing it holds it
    exclusively (``hold``), so the two never overlap and what is read is one run's."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, PermissionError):  # no run ever locked it, or a copy we may only read
        yield
        return
    try:
        _lock(fd, fcntl.LOCK_SH, lambda holder: InputError(
            f"run folder {run_dir} is being written by an mmpipe run ({holder}); {what} when it has finished"))
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike, data_root: str | os.PathLike | None = None,
         stages: tuple[str, ...] = ()) -> Iterator[str]:
    """Hold the run folder's lock while inside; yields this run's id (also in ``run.json``)."""
    check_run_dir(run_dir, data_root)
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        _lock(fd, fcntl.LOCK_EX, lambda holder: RunFolderBusy(
            f"run folder {run_dir} is in use by another mmpipe run ({holder}); wait for it to finish or use another --out"))
        run_id = uuid.uuid4().hex[:12]
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, run {run_id}, started {started}".encode(), 0)
        tables.write_bytes(json.dumps({"run_id": run_id, "started": started, "stages": list(stages)}, indent=1).encode(),
                           out / RUN_FILE)
        yield run_id
    finally:
        os.close(fd)  # releases the lock


def retire_stale(cfg: PipelineConfig, planned: tuple[str, ...], run_id: str) -> list[str]:
    """Move aside the stages this run will not run that are stale for ``cfg``; returns their names.

    Call before the run saves its config: staleness compares with the folder's previous config.
    """
    run_dir = Path(cfg.run_dir)
    later = [n for n in graph.STAGES if n not in planned and RunLayout(run_dir).stage_dir(n).is_dir()]
    if not later or not RunLayout(run_dir).config.is_file():
        return []  # nothing beyond this run's stages, or a new run folder: nothing to mistake for this run's
    moved = []
    try:
        rows = {r["stage"]: r["status"] for r in stale(run_dir, cfg)}
    except MMPipeError:  # an unreadable earlier run: its stages are rebuilt or left as they are
        return []
    for name in later:
        here = RunLayout(run_dir).stage_dir(name)
        if rows.get(name) != STALE:
            continue
        dest = run_dir / SUPERSEDED_DIR / run_id / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(here, dest)
        moved.append(name)
    return moved
