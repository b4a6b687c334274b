"""Fine-tune benchmark: does fine-tuning a pretrained model beat the model it started from?

The synthetic data has two rendering domains (``domain``: flat and textured). The tiny preset is
pretrained with mmpipe on the source domain and saved; it is then fine-tuned on the target
domain for a fixed small number of steps. Test image-to-text R@5 (with 95% bootstrap CIs, and
the paired difference against the pretrained model) on the target domain and on the source
domain (forgetting), for:

(a) the pretrained model, zero-shot on the target;
(b) fine-tuned on the target;
(c) fine-tuned with WiSE-FT (alpha 0.5 between (a) and (b));
(d) the tiny preset trained from scratch on the target with the same steps.

Every model is scored by ``mmcore.evaluate.run`` on the same test rows.

    python bench/bench_finetune.py [--n 3000] [--pretrain-steps 300] [--steps 60] [--out bench/results/finetune]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmcore import clip_model, demo_split, evaluate, tables, trainloop  # noqa: E402
from mmcore.base import StageContext  # noqa: E402
from mmcore.evaluate import EvaluateConfig  # noqa: E402
from mmcore.layout import RunLayout  # noqa: E402
from mmcore.train import TrainConfig  # noqa: E402

METRIC = "i2t_r5"


def _train(table, data, run: Path, seed: int, **cfg) -> tuple[Path, dict]:
    ctx = StageContext(data=data, run_dir=run, seed=seed, workers=1)
    t0 = time.perf_counter()
    res = trainloop.run_stage(table, TrainConfig(num_workers=0, val_every_epoch=False, resume=False, **cfg), ctx)
    return RunLayout(run).model, {**res.stats, "wall_s": round(time.perf_counter() - t0, 1)}


def _score(table, data, run: Path, encoder, baseline, bootstrap: int) -> dict:
    cfg = EvaluateConfig(splits=["test"], bootstrap=bootstrap, robustness=False, spotcheck_n=0, device="cpu")
    ctx = StageContext(data=data, run_dir=run, seed=0, workers=1)
    evaluate.run(table, cfg, ctx, encoder=encoder, baseline_encoder=baseline)
    m = tables.read_json(RunLayout(run).metrics)
    out = {"model": m["test"]["retrieval"][METRIC], "chance": m["chance"]["test"][METRIC],
           "n_images": m["test"]["n_images"]}
    if "baseline" in m:
        out["diff_vs_pretrained"] = m["baseline"]["test"]["retrieval"][METRIC]["diff"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--source", default="flat")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-4, help="Fine-tuning peak lr (tiny model, few steps).")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/finetune"))
    ap.add_argument("--work", type=Path, default=None, help="Data and runs; default: a temporary folder.")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    t_all = time.perf_counter()
    table, data = demo_split.make(work / "data", n=a.n, seed=a.seed)
    domains = sorted(table["domain"].dropna().unique())
    target = next(d for d in domains if d != a.source)
    src_rows, tgt_rows = table[table["domain"] == a.source], table[table["domain"] == target]

    pre_dir, pre_stats = _train(src_rows, data, work / "pretrain", a.seed, preset="tiny", steps=a.pretrain_steps,
                                batch_size=a.batch, lr=1e-3, warmup_steps=20)
    ft_dir, ft_stats = _train(tgt_rows, data, work / "finetune", a.seed, model_path=pre_dir, steps=a.steps,
                              batch_size=a.batch, lr=a.lr)
    sc_dir, sc_stats = _train(tgt_rows, data, work / "scratch", a.seed, preset="tiny", steps=a.steps,
                              batch_size=a.batch, lr=1e-3, warmup_steps=min(20, a.steps // 5))

    pre = clip_model.Encoder.load(pre_dir)
    ft = clip_model.Encoder.load(ft_dir)
    start = {k: v.clone() for k, v in clip_model.load(pre_dir).model.state_dict().items()}
    wise_model = clip_model.load(ft_dir)
    clip_model.wise_ft(wise_model.model, start, a.alpha)
    wise = clip_model.Encoder(wise_model.model, wise_model.tokenizer, wise_model.pre)
    scratch = clip_model.Encoder.load(sc_dir)
    models = {"(a) pretrained, zero-shot": (pre, None), "(b) fine-tuned": (ft, pre),
              f"(c) WiSE-FT alpha {a.alpha}": (wise, pre), "(d) from scratch on target": (scratch, pre)}
    results: dict = {}
    for dom, rows in ((target, tgt_rows), (a.source, src_rows)):
        for name, (enc, base) in models.items():
            key = name.split(")")[0] + ")"
            results.setdefault(name, {})[dom] = _score(rows, data, work / "eval" / dom / key.strip("()"), enc, base, a.bootstrap)
    total = time.perf_counter() - t_all

    lines = [f"Test image-to-text R@5 [95% CI]; difference vs (a) [95% CI], paired bootstrap over the same test images. "
             f"Source domain `{a.source}`, target `{target}`.", "",
             f"| model | target `{target}` R@5 | vs (a) | source `{a.source}` R@5 (forgetting) | vs (a) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        cells = []
        for dom in (target, a.source):
            m = r[dom]["model"]
            cells.append(f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]")
            d = r[dom].get("diff_vs_pretrained")
            cells.append(f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ch = results["(a) pretrained, zero-shot"]
    lines += ["", f"Chance R@5: target {ch[target]['chance']:.3f} ({ch[target]['n_images']} test images), "
                  f"source {ch[a.source]['chance']:.3f} ({ch[a.source]['n_images']} test images).",
              f"Pretrain: tiny preset, {a.pretrain_steps} steps x batch {a.batch} on {len(src_rows[src_rows.split == 'train'])} "
              f"source train rows ({pre_stats['wall_s']} s). Fine-tune: {a.steps} steps x batch {a.batch}, lr {a.lr}, "
              f"warmup 10% ({ft_stats['wall_s']} s). From scratch: {a.steps} steps, lr 1e-3 ({sc_stats['wall_s']} s). "
              f"Total {total:.0f} s on {__import__('os').cpu_count()} CPU cores."]
    md = "\n".join(lines)
    print(md)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "finetune.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": results,
                                                     "seconds": round(total, 1)}, indent=1))
    (a.out / "finetune.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
