"""Map a function over batches of rows in worker processes, in order, with a progress bar.

Memory is bounded by ``batch_size`` x ``workers`` in flight, whatever the table's length.
"""

from __future__ import annotations

import multiprocessing as mp
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
        if workers <= 1 or len(chunks) <= 1:
            for c in chunks:
                out.append(fn(c, *args))
                bar.update(len(c))
            return out
        # forkserver: workers must not inherit threads or locks of the parent (Prefect, torch).
        ctx = mp.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            window = 2 * workers  # bounded in-flight batches
            futures = []
            it = iter(chunks)
            for c in it:
                futures.append((pool.submit(fn, c, *args), len(c)))
                if len(futures) >= window:
                    break
            while futures:
                fut, n = futures.pop(0)
                out.append(fut.result())
                bar.update(n)
                nxt = next(it, None)
                if nxt is not None:
                    futures.append((pool.submit(fn, nxt, *args), len(nxt)))
        return out
    finally:
        bar.close()
