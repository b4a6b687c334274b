"""Optimizer step benchmark: AdamW's three CPU implementations on the tiny preset's parameters.

mmpipe's trainer builds AdamW with ``fused=True`` (one kernel over every parameter). On CPU, torch's
default is the single-tensor loop (``foreach`` is the default on CUDA only), which is what open_clip's
main() gets on CPU. The cost grows with the token table: CLIP's BPE (49,410 tokens, mmpipe's default
tokenizer) makes the tiny preset's text embedding 6.3 M of its 8.4 M parameters. This measures the
step time of each implementation, one torch thread, for the tiny preset at 2,048 and 49,410 tokens,
and a whole training step (forward, backward, clip, optimizer) at batch 64, as ratios in one run.

    python bench/bench_optim.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmcore import clip_model, trainloop  # noqa: E402

KINDS = {"loop (CPU default)": {"foreach": False}, "foreach": {"foreach": True}, "fused (mmpipe)": {"fused": True}}


def _opt(model, kind: str) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainloop.param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, **KINDS[kind])


def step_ms(vocab: int, kind: str, repeats: int) -> float:
    """Median ms of ``opt.step()`` alone, gradients already in place."""
    torch.manual_seed(0)
    model = clip_model.init_like_open_clip(clip_model.build_model("tiny", vocab_size=vocab), seed=0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = _opt(model, kind)
    opt.step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def train_step_ms(vocab: int, kind: str, repeats: int, batch: int = 64) -> float:
    """Median ms of a whole step: forward, CLIP loss, backward, clip at 1.0, optimizer, zero_grad."""
    torch.manual_seed(0)
    model = clip_model.init_like_open_clip(clip_model.build_model("tiny", vocab_size=vocab), seed=0)
    opt, loss_fn = _opt(model, kind), trainloop.ClipLoss()
    ctx = clip_model.context_length(model)
    pixels = torch.randn(batch, 3, 64, 64)
    ids = torch.randint(4, vocab, (batch, ctx))
    ids[:, -1] = 3  # the end token, where the preset pools
    times = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        loss = trainloop.clip_forward(model, pixels, ids, loss_fn)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(1)
    lines = ["| tokens | parameters | AdamW | optimizer step ms | vs loop | whole train step ms (batch 64) | vs loop |",
             "|---|---|---|---|---|---|---|"]
    for vocab in (2048, 49_410):
        n = sum(p.numel() for p in clip_model.build_model("tiny", vocab_size=vocab).parameters())
        base = base_t = None
        for kind in KINDS:
            ms, tms = step_ms(vocab, kind, a.repeats), train_step_ms(vocab, kind, max(5, a.repeats // 2))
            base, base_t = base or ms, base_t or tms
            lines.append(f"| {vocab:,} | {n / 1e6:.1f} M | {kind} | {ms:.1f} | {base / ms:.2f}x | {tms:.0f} | {base_t / tms:.2f}x |")
    print(f"torch {torch.__version__}, {platform.machine()}, 1 thread, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
