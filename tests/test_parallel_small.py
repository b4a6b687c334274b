"""map_batches: the same result in-process, on the process pool and on Dask; worker log records reach the caller."""

from __future__ import annotations

import logging
import os
import threading

from mmcore import parallel

ROWS = list(range(23))


def _pids(batch: list[int]) -> list[tuple[int, int]]:
    return [(x * x, os.getpid()) for x in batch]


def _warn_each(batch: list[int]) -> list[int]:
    """Logs a WARNING per row on ``mmcore.io``, as a read retry does in a worker."""
    for x in batch:
        logging.getLogger("mmcore.io").warning("retry row %d", x)
    return [x * x for x in batch]


class _Seen(logging.Handler):
    """Each record's message and the thread that handled it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), threading.get_ident()))


def _squares(out: list[list[tuple[int, int]]]) -> list[int]:
    return [s for batch in out for s, _ in batch]


def test_a_small_job_runs_in_process_and_a_forced_pool_gives_the_same_result():
    inline = parallel.map_batches(_pids, ROWS, batch_size=5, workers=2)
    pool = parallel.map_batches(_pids, ROWS, batch_size=5, workers=2, min_rows_per_worker=0)
    assert _squares(inline) == _squares(pool) == [x * x for x in ROWS]
    assert {pid for b in inline for _, pid in b} == {os.getpid()}
    assert os.getpid() not in {pid for b in pool for _, pid in b}
    # One process per min_rows_per_worker rows: 23 rows make one worker of 10, hence in-process.
    assert {pid for b in parallel.map_batches(_pids, ROWS, batch_size=5, workers=4, min_rows_per_worker=12)
            for _, pid in b} == {os.getpid()}


def test_pool_workers_log_records_are_replayed_in_the_caller_once_in_order(caplog):
    with caplog.at_level(logging.WARNING, logger="mmcore.io"):
        out = parallel.map_batches(_warn_each, ROWS, batch_size=4, workers=2, min_rows_per_worker=0)
    assert [s for b in out for s in b] == [x * x for x in ROWS]
    assert [r.getMessage() for r in caplog.records if r.name == "mmcore.io"] == [f"retry row {x}" for x in ROWS]


def _on_worker(rows: list[int]) -> tuple[list[list[int]], int]:
    """A stage task on a Dask worker: map_batches fans out over the cluster from here."""
    return parallel.map_batches(_warn_each, rows, batch_size=4, workers=2), threading.get_ident()


def test_dask_workers_log_records_are_replayed_in_the_task_that_mapped():
    import distributed

    seen, logger = _Seen(), logging.getLogger("mmcore.io")
    logger.addHandler(seen)
    try:
        with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            out, task_thread = client.submit(_on_worker, ROWS, pure=False).result()
    finally:
        logger.removeHandler(seen)
    assert [s for b in out for s in b] == [x * x for x in ROWS]
    # Prefect attaches a record to the task run of the thread that handles it: the task's, not a batch's.
    assert [m for m, t in seen.seen if t == task_thread] == [f"retry row {x}" for x in ROWS]


def test_imap_batches_hands_each_result_over_before_running_later_batches():
    """What lets a caller (shards) write results out as they come instead of holding them all."""
    ran: list[int] = []

    def record(batch):
        ran.extend(batch)
        return sum(batch)

    it = parallel.imap_batches(record, ROWS, batch_size=5)
    assert next(it) == sum(ROWS[:5]) and ran == ROWS[:5]
    assert list(it) == [sum(ROWS[i : i + 5]) for i in range(5, len(ROWS), 5)] and ran == ROWS
