"""Optimizer step benchmark: AdamW's three CPU implementations on the tiny preset's parameters.

mmpipe's trainer builds AdamW with ``fused=True`` (one kernel over every parameter). On CPU, torch's
default is the single-tensor loop (``foreach`` is the default on CUDA only), which is what open_clip's
main() gets on CPU. The cost grows with the token table: CLIP's BPE (49,410 tokens, mmpipe's default
tokenizer) makes the tiny preset's text embedding 6.3 M of its 8.4 M parameters. This measures the
step time of each implementation, one torch thread, for the tiny preset at 2,048 and 49,410 tokens,
and a whole training step (forward, backward, clip, optimizer) at batch 64, as ratios in one run;
then a whole step by precision (fp32, bf16 and fp16 autocast) for mmpipe and for open_clip 3.3.0.

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
    return _timed_steps(model, opt, lambda: trainloop.clip_forward(model, pixels, ids, loss_fn), repeats)


def _timed_steps(model, opt, forward, repeats: int, autocast=None) -> float:
    """Median ms of ``repeats`` steps (after 2 warm ones): ``forward()`` under ``autocast``, backward,
    clip at 1.0, optimizer, zero_grad."""
    times = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        with autocast or torch.autocast("cpu", enabled=False):
            loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def precision_step_ms(system: str, precision: str, attn: str, repeats: int, batch: int = 64, length: int = 32) -> float:
    """Median ms of a whole step of the tiny architecture at batch 64, captions of ``length`` tokens:
    mmpipe (transformers' CLIP, fused AdamW) or open_clip 3.3.0 (its own model, loss and default AdamW),
    under fp32, bf16 autocast or fp16 autocast, with ``attn`` (sdpa or eager; mmpipe only)."""
    torch.manual_seed(0)
    if system == "mmpipe":
        model = clip_model.init_like_open_clip(clip_model.build_model("tiny", vocab_size=49_410), seed=0)
        model.set_attn_implementation(attn)
        opt, loss_fn = _opt(model, "fused (mmpipe)"), trainloop.ClipLoss()
    else:
        import json
        import tempfile

        import open_clip

        from bench.bench_train import OPENCLIP_TINY

        d = Path(tempfile.mkdtemp())
        (d / "mmpipe-tiny.json").write_text(json.dumps(OPENCLIP_TINY))
        open_clip.add_model_config(d)
        model, _, _ = open_clip.create_model_and_transforms("mmpipe-tiny", pretrained=None, output_dict=True)
        opt, loss_fn = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6), open_clip.ClipLoss()
    pixels = torch.randn(batch, 3, 64, 64)
    ids = torch.randint(4, 49_000, (batch, length))
    ids[:, -1] = 3 if system == "mmpipe" else 49_407  # the end token, where each pools
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def forward():
        if system == "mmpipe":
            return trainloop.clip_forward(model, pixels, ids, loss_fn)
        out = model(pixels, ids)
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

    amp = torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    return _timed_steps(model, opt, forward, repeats, amp)


PRECISIONS = [  # (system, precision, attention, note)
    ("mmpipe", "fp32", "sdpa", "train.precision: fp32"),
    ("mmpipe", "bf16", "sdpa", "bf16 autocast, torch's flash attention"),
    ("mmpipe", "bf16", "eager", "train.precision: bf16 (auto on AMX): matmul attention"),
    ("open_clip", "fp32", "-", "the benchmark's open_clip setting"),
    ("open_clip", "bf16", "-", "open_clip --precision amp_bf16"),
    ("open_clip", "fp16", "-", "open_clip --precision amp (its default)"),
]


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
    amx = trainloop.cpu_has_bf16_matmul()
    lines += ["", f"Whole step by precision (tiny architecture, 49,410 tokens, batch 64, 32-token captions; "
              f"AMX: {'yes' if amx else 'no'}):", "",
              "| system | precision | attention | step ms | vs mmpipe fp32 | what it is |", "|---|---|---|---|---|---|"]
    base = None
    for system, prec, attn, note in PRECISIONS:
        ms = precision_step_ms(system, prec, attn if attn != "-" else "sdpa", max(5, a.repeats // 2))
        base = base or ms
        lines.append(f"| {system} | {prec} | {attn} | {ms:.0f} | {base / ms:.2f}x | {note} |")
    print(f"torch {torch.__version__}, {platform.machine()}, 1 thread, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
