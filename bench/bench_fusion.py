"""Image-text matching head (train.fusion): matching on test pairs and re-ranking the contrastive top k.

Trains the tiny preset on the synthetic demo-like data with ``train.fusion: cross_attention`` (the
train stage's own schedule), evaluates the test split (matching accuracy, F1, AUROC with bootstrap
CIs and chance; R@1/5/10 with and without re-ranking, with the paired difference and its CI) and
writes ``bench/results/fusion.md``.

    .venv/bin/python bench/bench_fusion.py [--rows 2500] [--kind cross_attention] [--out bench/out/fusion]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mmcore import clip_model, demo_split, evaluate, train
from mmcore.base import StageContext
from mmcore.evaluate import EvaluateConfig
from mmcore.train import TrainConfig

RESULTS = Path(__file__).parent / "results" / "fusion.md"


def ci(v: dict, sign: str = "") -> str:
    return f"{v['value']:{sign}.3f} [{v['low']:{sign}.3f}, {v['high']:{sign}.3f}]"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2500)
    ap.add_argument("--kind", default="cross_attention")
    ap.add_argument("--rerank-k", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/fusion"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    table, data = demo_split.make(a.out / "data", n=a.rows, seed=a.seed, val=0.1, test=0.2)
    table["split_group"] = table["scene_id"]  # as the split stage writes it
    run = a.out / f"run-{a.kind}"
    ctx = StageContext(data=data, run_dir=run, seed=a.seed, workers=2)
    t0 = time.perf_counter()
    res = train.run(table, TrainConfig(fusion=a.kind, num_workers=0), ctx)
    t_train = time.perf_counter() - t0
    enc = clip_model.Encoder.load(run / "train" / "model")
    cfg = EvaluateConfig(splits=["test"], robustness=False, spotcheck_n=0, rerank_k=a.rerank_k, device="cpu")
    t0 = time.perf_counter()
    evaluate.run(table, cfg, ctx, encoder=enc)
    t_eval = time.perf_counter() - t0
    m = json.loads((run / "evaluate" / "metrics.json").read_text())
    mt, rr = m["matching"], m["rerank"]
    s = res.stats
    lines = [
        "# Image-text matching head (train.fusion)",
        "",
        f"`bench/bench_fusion.py --rows {a.rows} --kind {a.kind} --rerank-k {a.rerank_k} --seed {a.seed}`: synthetic "
        f"demo-like data ({len(table)} rows after clean; {s['n_train']} train, {m['test']['n_images']} test images, "
        f"{m['test']['n_texts']} test captions), tiny preset, {s['schedule']}, one seed.",
        f"Device: {platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads (2-core machine "
        f"shared with other jobs); Python {platform.python_version()}, torch {torch.__version__}. "
        f"Train {t_train:.0f} s ({s['steps']} steps, final contrastive+ITM loss {s['final_loss']}, ITM loss "
        f"{s.get('final_itm_loss')}), evaluate {t_eval:.0f} s. 95% bootstrap CIs, 1,000 resamples.",
        "",
        f"## Matching on test pairs ({mt['n_positive']} positives, {mt['n_negative']} negatives: a hard and a random one each)",
        "",
        "| metric | value [95% CI] | chance |",
        "|---|---|---|",
        f"| accuracy | {ci(mt['accuracy'])} | {mt['chance']['accuracy']:.3f} (always 'no match') |",
        f"| precision | {ci(mt['precision'])} | {mt['n_positive'] / mt['n_pairs']:.3f} |",
        f"| recall | {ci(mt['recall'])} | - |",
        f"| F1 | {ci(mt['f1'])} | {mt['chance']['f1']:.3f} (always 'match') |",
        f"| AUROC | {ci(mt['auroc'])} | 0.500 |",
        "",
        f"## Retrieval with the head re-ranking the contrastive top {rr['k']}",
        "",
        "| direction | metric | without | with | difference [95% CI] | p |",
        "|---|---|---|---|---|---|",
    ]
    for d in ("i2t", "t2i"):
        for name, v in sorted(rr[d].items(), key=lambda kv: int(kv[0][2:])):
            lines.append(f"| {d} | {name} | {ci(v['without'])} | {ci(v['with'])} | {ci(v['difference'], '+')} | "
                         f"{max(v['difference']['p_value'], 0.001):.3f} |".replace("0.001 |", "< 0.001 |"))
    chance = m["chance"]["test"]
    lines += ["", f"Chance R@1: i2t {chance['i2t_r1']:.3f}, t2i {chance['t2i_r1']:.3f}.", ""]
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text("\n".join(lines))
    print("\n".join(lines))
    return m


if __name__ == "__main__":
    main()
