"""Map a function over batches of rows in worker processes, in order, with a progress bar.

Memory is bounded by ``batch_size`` x ``workers`` in flight, whatever the table's length.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


def batches(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]


def map_batches(
    fn: Callable[..., R],
    items: Sequence[Any],
    *,
    batch_size: int = 256,
    workers: int = 1,
    desc: str | None = None,
    progress: bool = False,
    args: tuple = (),
) -> list[R]:
    """``[fn(batch, *args) for batch in batches(items)]``, over ``workers`` processes, in order.

    ``fn`` must be a module-level function (it is pickled). With ``workers <= 1`` it runs inline.
    """
    chunks = list(batches(items, batch_size))
    bar = tqdm(total=len(items), desc=desc, unit="row", disable=not progress, mininterval=0.5)
    out: list[R] = []
    try:
        if _on_dask_worker():
            return _map_dask(fn, chunks, args, bar)
        if workers <= 1 or len(chunks) <= 1:
            for c in chunks:
                out.append(fn(c, *args))
                bar.update(len(c))
            return out
        # forkserver: workers must not inherit threads or locks of the parent (Prefect, torch).
        ctx = mp.get_context("forkserver")
        # Import the heavy modules once in the fork server, not in every worker.
        ctx.set_forkserver_preload(["numpy", "pandas", "PIL.Image", "mmcore.tables", fn.__module__])
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            window = 2 * workers  # bounded in-flight batches
            futures = []
            it = iter(chunks)
            for c in it:
                futures.append((pool.submit(_capturing, fn, c, *args), len(c)))
                if len(futures) >= window:
                    break
            while futures:
                fut, n = futures.pop(0)
                result, records = fut.result()
                _replay(records)
                out.append(result)
                bar.update(n)
                nxt = next(it, None)
                if nxt is not None:
                    futures.append((pool.submit(_capturing, fn, nxt, *args), len(nxt)))
        return out
    finally:
        bar.close()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args, record.exc_info, record.exc_text = record.getMessage(), None, None, None
        self.records.append(record)


def _capturing(fn: Callable[..., R], chunk: Sequence[Any], *args: Any) -> tuple[R, list[logging.LogRecord]]:
    """In a worker: ``fn``'s result and the ``mmcore`` log records it emitted (e.g. read retries).

    A worker process has no Prefect run context, so its records are sent back and re-emitted by
    ``_replay`` in the task's thread, where Prefect attaches them to the task run's logs.
    """
    handler, logger = _Collect(), logging.getLogger("mmcore")
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        return fn(chunk, *args), handler.records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


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


def _map_dask(fn, chunks: list, args: tuple, bar) -> list:
    """Fan the batches out over the whole Dask cluster from inside a task running on one worker.

    ``worker_client`` secedes this task's thread while it waits, so the worker can run batches too.
    A bounded window of batches is in flight, so memory does not grow with the table.
    """
    from distributed import as_completed, worker_client

    results: dict[int, Any] = {}
    with worker_client() as client:
        n_workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
        window = 2 * n_workers
        todo = iter(enumerate(chunks))
        pending = as_completed()
        index = {}

        def submit_next() -> bool:
            nxt = next(todo, None)
            if nxt is None:
                return False
            i, c = nxt
            fut = client.submit(fn, c, *args, pure=False)
            index[fut.key] = (i, len(c))
            pending.add(fut)
            return True

        for _ in range(window):
            if not submit_next():
                break
        for fut in pending:
            i, n = index.pop(fut.key)
            results[i] = fut.result()
            bar.update(n)
            submit_next()
    return [results[i] for i in range(len(chunks))]
