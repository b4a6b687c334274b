"""Chunked retrieval metrics at 100,000 x 100,000: wall time and peak memory, vs a dense matrix.

Each measurement runs in a fresh subprocess so its peak RSS is its own. The dense baseline
(the whole text x image score matrix, CLIP_benchmark-style) runs at a smaller size, where it
fits, and the chunked code runs at the same size for the ratio.

    .venv/bin/python bench/bench_retrieval.py [--n 100000] [--dense-n 20000] [--out bench/results/evaluate.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM = 512


def _embeddings(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, DIM), dtype=np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img + rng.standard_normal((n, DIM), dtype=np.float32)  # some signal, so ranks are not all ~n/2
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(mode: str, n: int, chunk: int) -> dict:
    import torch

    from mmcore import metrics

    img, txt = _embeddings(n, 0)
    base = _rss_mib()
    t, c = time.perf_counter(), time.process_time()
    if mode == "chunked":
        r = metrics.retrieval(img, txt, np.arange(n), chunk=chunk, device="cpu")
        r5 = float((r.t2i_rank <= 5).mean())
    else:  # dense: the full (n x n) score matrix at once, then top-k
        s = torch.from_numpy(txt) @ torch.from_numpy(img).T
        top = torch.topk(s, 5, dim=1).indices
        r5 = float((top == torch.arange(n)[:, None]).any(1).float().mean())
    sec, cpu = time.perf_counter() - t, time.process_time() - c
    return {"mode": mode, "n": n, "chunk": chunk if mode == "chunked" else None, "seconds": sec, "cpu_seconds": cpu,
            "peak_rss_mib": _rss_mib(), "inputs_rss_mib": base, "t2i_r5": r5, "threads": torch.get_num_threads()}


def _run(mode: str, n: int, chunk: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", mode, str(n), str(chunk)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dense-n", type=int, default=20_000)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "evaluate.md"))
    ap.add_argument("--worker", nargs=3)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), int(a.worker[2]))))
        return
    rows = [_run("dense", a.dense_n, a.chunk), _run("chunked", a.dense_n, a.chunk), _run("chunked", a.n, a.chunk)]
    import numpy  # noqa: E401 - versions for the record
    import torch

    dense, small = rows[0], rows[1]
    lines = [
        "## Retrieval metrics: chunked vs dense score matrix",
        "",
        f"Random normalised embeddings, dim {DIM}, one caption per image (text-to-image and image-to-text ranks, "
        f"NDCG@10); device: {platform.processor() or platform.machine()}, 2-core CPU, no GPU; "
        f"torch {torch.__version__}, numpy {numpy.__version__}, {rows[0]['threads']} threads.",
        "Peak RSS includes the inputs (two n x 512 float32 arrays); 'inputs' is RSS before scoring. "
        "CPU s (user + system, all threads) is less sensitive than wall time to other jobs on the machine.",
        "",
        "| method | n images x n texts | chunk | wall s | CPU s | peak RSS MiB | inputs RSS MiB | t2i R@5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['n']:,} x {r['n']:,} | {r['chunk'] or '-'} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['inputs_rss_mib']:.0f} | {r['t2i_r5']:.4f} |")
    extra_dense = dense["peak_rss_mib"] - dense["inputs_rss_mib"]
    extra_chunk = small["peak_rss_mib"] - small["inputs_rss_mib"]
    big = rows[2]
    lines += [
        "",
        f"At {a.dense_n:,}: dense needs {extra_dense:.0f} MiB above its inputs, chunked {extra_chunk:.0f} MiB "
        f"({extra_dense / max(extra_chunk, 1):.1f}x less); time ratio chunked/dense {small['seconds'] / dense['seconds']:.2f} "
        "(chunked also computes full ranks and NDCG in both directions, dense only top-5 one way).",
        f"At {a.n:,} x {a.n:,} chunked takes {big['seconds']:.0f} s and {big['peak_rss_mib'] - big['inputs_rss_mib']:.0f} MiB "
        f"above its inputs; a dense float32 score matrix alone would be {a.n * a.n * 4 / 2**30:.0f} GiB.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
