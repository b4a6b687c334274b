"""Scale benchmark: probe + quality on the same images on a Dask LocalCluster of 1 and 2 workers.

Run: ``.venv/bin/python bench/bench_dask.py [--n 2000] [--out bench/out/dask]``

Each measurement submits one task (as the Prefect DaskTaskRunner does) that runs ``probe.run`` and
``quality.run``; inside it ``mmcore.parallel`` fans the image batches out over every worker of the
cluster. One worker process per core, one thread each. The ratio of the two wall times is the
speed-up (goal >= 1.7x on 2 cores). Also checks the outputs are identical. Writes
``bench/results/dask.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_quality import make_images  # noqa: E402
from mmcore import probe, quality, tables  # noqa: E402
from mmcore.base import DataConfig, StageContext  # noqa: E402
from mmcore.provenance import versions  # noqa: E402


def probe_and_quality(table: pd.DataFrame, root: str) -> tuple[pd.DataFrame, float]:
    ctx = StageContext(data=DataConfig(manifest=Path(root) / "manifest.csv"), run_dir=Path(root) / "run")
    t0 = time.perf_counter()
    p = probe.run(table, probe.ProbeConfig(), ctx)
    q = quality.run(p.kept, quality.QualityConfig(), ctx)
    return q.kept, time.perf_counter() - t0


def measure(table: pd.DataFrame, root: str, workers: int, rounds: int) -> tuple[float, pd.DataFrame]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            client.submit(probe_and_quality, table.iloc[:64], root, pure=False).result()  # warm the workers
            best, kept = float("inf"), None
            for _ in range(rounds):
                kept, seconds = client.submit(probe_and_quality, table, root, pure=False).result()
                best = min(best, seconds)
    return best, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/out/dask"))
    args = ap.parse_args()
    root = args.out.resolve()
    names = make_images(root, args.n)
    table = pd.DataFrame({tables.ROW_ID: range(len(names)), tables.IMAGE: names, tables.TEXT: "a shape"})
    t1, k1 = measure(table, str(root), 1, args.rounds)
    t2, k2 = measure(table, str(root), 2, args.rounds)
    same = tables.to_arrow(k1.reset_index(drop=True)).equals(tables.to_arrow(k2.reset_index(drop=True)))
    v = versions()
    lines = [
        "## Dask scale: probe + quality, LocalCluster of 1 vs 2 workers",
        "",
        f"{args.n} JPEGs 640x480; one worker process per core, one thread each; best of {args.rounds} rounds.",
        f"Machine: {platform.processor() or platform.machine()}, 2-core CPU, no GPU; python {v['python']}, "
        f"dask/distributed 2026.8.0, pillow {v.get('pillow')}, opencv {v.get('opencv-python-headless')}.",
        "",
        "| workers | seconds | images/s | speed-up |",
        "|---:|---:|---:|---:|",
        f"| 1 | {t1:.2f} | {args.n / t1:.0f} | 1.00x |",
        f"| 2 | {t2:.2f} | {args.n / t2:.0f} | {t1 / t2:.2f}x |",
        "",
        f"Outputs identical between 1 and 2 workers: {same}. Goal: >= 1.7x.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).resolve().parent / "results" / "dask.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
