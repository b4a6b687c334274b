"""Map a function over batches of rows, in order, with a progress bar: in-process, in a process pool or on Dask.

Memory is bounded by ``batch_size`` x ``workers`` in flight, whatever the table's length.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")

# A process's first pool starts in about 1 s (fork server, numpy/pandas/PIL imports): what quality
# spends on about 1,000 640x480 JPEGs in one process (bench/RESULTS.md). Less work runs in-process.
MIN_ROWS_PER_WORKER = 1_000


def batches(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]


def map_batches(fn: Callable[..., R], items: Sequence[Any], **options: Any) -> list[R]:
    """Every batch's result, in order: ``list(imap_batches(fn, items, **options))``."""
    return list(imap_batches(fn, items, **options))


def imap_batches(
    fn: Callable[..., R],
    items: Sequence[Any],
    *,
    batch_size: int = 256,
    workers: int = 1,
    min_rows_per_worker: int = MIN_ROWS_PER_WORKER,
    desc: str | None = None,
    progress: bool = False,
    args: tuple = (),
) -> Iterator[R]:
    """``fn(batch, *args) for batch in batches(items)``, over up to ``workers`` processes, in order.

    Each result is handed over as soon as it and those before it are done, so a caller that writes
    results out holds only the batches in flight (at most ``2 x workers``), not the whole output.
    ``fn`` must be a module-level function (it is pickled). The pool gets one process per
    ``min_rows_per_worker`` rows, at most ``workers``; with one or none the batches run in-process
    (``min_rows_per_worker=0`` always uses the pool). The result is the same either way. On a Dask
    worker the batches go to the cluster, whose workers are already running.
    """
    chunks = list(batches(items, batch_size))
    if min_rows_per_worker > 0:
        workers = min(workers, len(items) // min_rows_per_worker)
    with tqdm(total=len(items), desc=desc, unit="row", disable=not progress, mininterval=0.5) as bar:
        if _on_dask_worker():
            yield from _map_dask(fn, chunks, args, bar)
        elif workers <= 1 or len(chunks) <= 1:
            for c in chunks:
                result = fn(c, *args)
                bar.update(len(c))
                yield result
        else:
            # forkserver: workers must not inherit threads or locks of the parent (Prefect, torch).
            ctx = mp.get_context("forkserver")
            # Import the heavy modules once in the fork server, not in every worker.
            ctx.set_forkserver_preload(["numpy", "pandas", "PIL.Image", "mmcore.tables", fn.__module__])
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_mute) as pool:
                yield from _windowed(lambda c: pool.submit(_capturing, fn, c, *args), chunks, 2 * workers, bar)


def _windowed(submit: Callable[[Sequence[Any]], Any], chunks: list, window: int, bar: tqdm) -> Iterator[Any]:
    """``submit(chunk).result()`` for each chunk, in order, with at most ``window`` chunks in flight.

    ``submit`` returns a future of ``_capturing``'s ``(result, records)``: the records are replayed
    here, in the caller's thread.
    """
    todo = iter(chunks)
    pending = deque((submit(c), len(c)) for c in islice(todo, window))
    while pending:
        fut, n = pending.popleft()
        result, records = fut.result()
        _replay(records)
        bar.update(n)
        pending.extend((submit(c), len(c)) for c in islice(todo, 1))  # refill before handing over
        yield result


class _Collect(logging.Handler):
    """The records emitted by the thread that made it (a Dask worker runs other tasks' threads too)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if threading.get_ident() != self.thread:
            return
        record.msg, record.args, record.exc_info, record.exc_text = record.getMessage(), None, None, None
        self.records.append(record)


def _capturing(fn: Callable[..., R], chunk: Sequence[Any], *args: Any) -> tuple[R, list[logging.LogRecord]]:
    """In a worker: ``fn``'s result and the ``mmcore`` log records it emitted (e.g. read retries).

    A worker has no Prefect run context, so its records are sent back and re-emitted by ``_replay``
    in the task's thread, where Prefect attaches them to the task run's logs.
    """
    handler, logger = _Collect(), logging.getLogger("mmcore")
    logger.addHandler(handler)
    try:
        return fn(chunk, *args), handler.records
    finally:
        logger.removeHandler(handler)


def _mute() -> None:
    """Pool worker initializer: ``mmcore`` records go back to the parent only, not to this worker's stderr.

    Not done on Dask: there the task that replays them may share the worker's process.
    """
    logging.getLogger("mmcore").propagate = False


def _replay(records: list[logging.LogRecord]) -> None:
    for record in records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def _on_dask_worker() -> bool:
    """True inside a task that a Dask worker runs (the flow's ``--runner dask``)."""
    if "distributed" not in sys.modules:  # a Dask worker has imported it; a local run need not
        return False
    try:
        from distributed import get_worker
    except ImportError:
        return False
    try:
        get_worker()
        return True
    except ValueError:
        return False


def _map_dask(fn: Callable[..., R], chunks: list, args: tuple, bar: tqdm) -> Iterator[R]:
    """Fan the batches out over the whole Dask cluster from inside a task running on one worker.

    ``worker_client`` secedes this task's thread while it waits, so the worker can run batches too.
    """
    from distributed import worker_client

    with worker_client() as client:
        window = 2 * max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
        yield from _windowed(lambda c: client.submit(_capturing, fn, c, *args, pure=False), chunks, window, bar)
