"""Train benchmark: mmpipe against open_clip 3.3.0, quality per wall-clock (CPU) and throughput (GPU).

CPU part: the tiny preset and an equivalent open_clip model (ViT 64 px, patch 8, width 128, 4
layers, 4 heads; text width 128, 4 layers, 4 heads, context 32; embedding 128) trained on the same
synthetic split, from the same 64 px shards, with the same optimizer settings and batch, each for
the same wall-clock budget, then scored identically: test image-to-text R@5 (ties count in the
image's favour) over several seeds. open_clip trains with its own ``train_one_epoch``, ``ClipLoss``,
transforms and tokenizer; only its LR schedule is driven by elapsed time (as mmpipe's
``minutes`` mode), since its step-based cosine needs a step count a time budget does not give.

GPU part (only where CUDA is present): ViT-B/32 samples/s on synthetic on-device batches (pure
model) and through mmpipe's shard loader, bf16, same batch, with MFU and peak memory.

    python bench/bench_train.py [--budget-s 180] [--seeds 0 1 2] [--n 3000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmcore import clip_model, demo_split, shards, trainloop  # noqa: E402
from mmcore.base import StageContext  # noqa: E402
from mmcore.train import TrainConfig  # noqa: E402

OPENCLIP_TINY = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
# Forward GMACs per sample of open_clip ViT-B-32 (its model profile): image 4.41, text 2.96.
VITB32_TRAIN_FLOP = 3 * 2 * (4.41 + 2.96) * 1e9
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def r5(img: np.ndarray, txt: np.ndarray, k: int = 5) -> float:
    """Image-to-text R@k, the own caption in the top k (ties in its favour): the one scorer for both."""
    sim = img @ txt.T
    return float(((sim > np.diag(sim)[:, None]).sum(1) < k).mean())


# --------------------------------------------------------------------------- CPU: quality per wall-clock


def run_mmpipe(table, data, out: Path, seed: int, budget_s: float, workers: int, eval_split: str = "test",
               overrides: dict | None = None) -> dict:
    """mmpipe's train stage for ``budget_s`` on ``out/shards``; scores ``out/eval_shards``'s ``eval_split``
    rows (embeddings in img/txt)."""
    overrides = overrides or {}
    length = {} if {"steps", "epochs"} & set(overrides) else {"minutes": budget_s / 60}
    cfg = TrainConfig(**{**length, "val_every_epoch": False, "num_workers": workers, "checkpoint_every": 10**6,
                         "resume": False, **overrides})
    ctx = StageContext(data=data, run_dir=out / f"mmpipe-{seed}", seed=seed, workers=1)
    # Shards are built outside the budget (they are their own cached step): copy the shared ones in.
    sdir = ctx.stage_dir("train") / "shards"
    if not sdir.exists():
        sdir.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((out / "shards").resolve(), sdir)
    t = time.perf_counter()
    res = trainloop.run_stage(table, cfg, ctx)
    wall = time.perf_counter() - t
    test = shards.read(out / "eval_shards", eval_split)
    enc = clip_model.Encoder.load(ctx.stage_dir("train") / "model")
    img = enc.encode_images([shards.decode(b) for b in test["jpeg"]])
    txt = enc.encode_texts(test["text"].tolist())
    s = res.stats
    return {"seed": seed, "steps": s["steps"], "batch_size": s.get("batch_size", cfg.batch_size),
            "samples_seen": s["samples_seen"], "samples_per_s": s["samples_per_s"], "seconds": round(wall, 1),
            "final_loss": s["final_loss"], "test_r5": r5(img, txt), "chance": 5 / len(test), "img": img, "txt": txt}


class _OpenClipPairs(torch.utils.data.Dataset):
    """Shard rows through open_clip's train transform and tokenizer (module level: picklable for spawn)."""

    def __init__(self, rows, transform, tokenizer):
        self.jpegs, self.texts = rows["jpeg"].tolist(), rows["text"].tolist()
        self.transform, self.tokenizer = transform, tokenizer

    def __len__(self):
        return len(self.jpegs)

    def __getitem__(self, i):
        return self.transform(shards.decode(self.jpegs[i])), self.tokenizer([self.texts[i]])[0]


class _Budgeted:
    """A DataLoader that stops yielding once the wall-clock deadline has passed."""

    def __init__(self, loader, deadline: float):
        self.loader, self.deadline = loader, deadline
        self.num_batches, self.num_samples = len(loader), len(loader) * loader.batch_size

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        for b in self.loader:
            if time.perf_counter() >= self.deadline:
                return
            yield b


def openclip_setup(out: Path, seed: int, workers: int, cfg):
    """The tiny architecture as an open_clip model (seeded), its eval transform and tokenizer, and a
    seeded DataLoader over ``out/shards``'s train rows with open_clip's train transform."""
    import open_clip

    cfg_dir = out / "openclip_cfg"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / "mmpipe-tiny.json").write_text(json.dumps(OPENCLIP_TINY))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(seed)
    model, pre_train, pre_val = open_clip.create_model_and_transforms("mmpipe-tiny", pretrained=None, output_dict=True)
    tok = open_clip.get_tokenizer("mmpipe-tiny")
    train = shards.read(out / "shards", "train")
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(_OpenClipPairs(train, pre_train, tok), batch_size=cfg.batch_size, shuffle=True,
                                         drop_last=True, generator=g, num_workers=workers, persistent_workers=workers > 0)
    return model, pre_val, tok, loader


def openclip_optimizer(model, cfg) -> torch.optim.Optimizer:
    """open_clip main()'s optimizer: AdamW, no decay on gains, biases and the logit scale."""
    excl = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    return torch.optim.AdamW(
        [{"params": [p for n, p in named if excl(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not excl(n, p) and p.requires_grad], "weight_decay": cfg.weight_decay}],
        lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-6)


def openclip_args(cfg) -> SimpleNamespace:
    """The arguments open_clip_train's train_one_epoch reads, for one CPU process."""
    return SimpleNamespace(
        device="cpu", precision="fp32", accum_freq=1, distill=False, skip_scheduler=False, horovod=False,
        grad_clip_norm=cfg.grad_clip, log_every_n_steps=10**9, batch_size=cfg.batch_size, world_size=1, rank=0,
        local_rank=0, wandb=False, distributed=False, save_logs=False, tensorboard=False, dataset_type="csv",
        coca_caption_loss_weight=0, coca_contrastive_loss_weight=0, siglip=False, loss_dist_impl=None)


def run_openclip(out: Path, seed: int, budget_s: float, workers: int, cfg: TrainConfig, eval_split: str = "test") -> dict:
    """open_clip's own training pieces for ``budget_s`` on ``out/shards``; scores as ``run_mmpipe``."""
    import open_clip
    from open_clip_train.train import train_one_epoch

    model, pre_val, tok, loader = openclip_setup(out, seed, workers, cfg)
    opt, args = openclip_optimizer(model, cfg), openclip_args(cfg)
    loss = open_clip.ClipLoss()
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    steps = [0]

    def sched(step):  # open_clip's warmup + cosine, driven by elapsed time like mmpipe's `minutes`
        steps[0] = step + 1
        if step < cfg.warmup_steps:
            lr = cfg.lr * (step + 1) / cfg.warmup_steps
        else:
            lr = 0.5 * (1 + math.cos(math.pi * min(1.0, (time.perf_counter() - t0) / budget_s))) * cfg.lr
        for grp in opt.param_groups:
            grp["lr"] = lr

    # open_clip_train.data.DataInfo needs webdataset extras; this is its interface (dataloader, set_epoch).
    data = {"train": SimpleNamespace(dataloader=_Budgeted(loader, deadline), set_epoch=lambda e: None)}
    epoch = 0
    model.train()
    while time.perf_counter() < deadline:
        train_one_epoch(model, data, loss, epoch, opt, None, sched, None, args)
        epoch += 1
    wall = time.perf_counter() - t0
    img, txt, n_test = openclip_embed(model, out / "eval_shards", eval_split, pre_val, tok)
    return {"seed": seed, "steps": steps[0], "batch_size": cfg.batch_size, "samples_seen": steps[0] * cfg.batch_size,
            "samples_per_s": round(steps[0] * cfg.batch_size / wall, 2), "seconds": round(wall, 1),
            "test_r5": r5(img, txt), "chance": 5 / n_test, "img": img, "txt": txt}


def openclip_embed(model, shard_dir: Path, split: str, pre_val, tok) -> tuple[np.ndarray, np.ndarray, int]:
    """Normalised image and caption embeddings of an open_clip model over one split's shards."""
    model.eval()
    test = shards.read(shard_dir, split)
    with torch.no_grad():
        img = torch.cat([model.encode_image(torch.stack([pre_val(shards.decode(b)) for b in test["jpeg"].iloc[i:i + 256]]), normalize=True)
                         for i in range(0, len(test), 256)]).numpy()
        txt = torch.cat([model.encode_text(tok(test["text"].iloc[i:i + 256].tolist()), normalize=True)
                         for i in range(0, len(test), 256)]).numpy()
    return img, txt, len(test)


def cpu_part(a) -> str:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table, data = demo_split.make(out / "synth", n=a.n, seed=0)
    # The train stage's own shards (train + val rows, so its build finds them ready) and the test rows'.
    shards.build(table[table.split.isin(["train", "val"])], data.image_root, out / "shards", 64, workers=2)
    shards.build(table[table.split == "test"], data.image_root, out / "eval_shards", 64, workers=2)
    # open_clip's batch: the one mmpipe's automatic schedule picks for these train images (64 here).
    cfg = TrainConfig(batch_size=trainloop.auto_schedule(TrainConfig(), int((table.split == "train").sum())).batch_size)
    rows = []
    for seed in a.seeds:
        jobs = (("mmpipe", run_mmpipe, (table, data, out, seed, a.budget_s, a.workers)),
                ("open_clip", run_openclip, (out, seed, a.budget_s, a.workers, cfg)))
        if a.side_by_side:
            # Both at once, one process and one torch thread each: on a shared machine the neighbours'
            # load then falls on both alike (one after the other, it differs from run to run).
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                     initargs=(1,)) as ex:
                futs = [(name, ex.submit(fn, *args)) for name, fn, args in jobs]
                done = [(name, f.result()) for name, f in futs]
        else:
            done = [(name, fn(*args)) for name, fn, args in jobs]
        for name, res in done:
            r = {"system": name, **res}
            r.pop("img"), r.pop("txt")
            print(json.dumps(r), flush=True)
            rows.append(r)
    lines = [
        f"### CPU: test image-to-text R@5 at equal wall clock ({a.budget_s:.0f} s per run, {len(a.seeds)} seeds)",
        "",
        f"Data: synthetic n={a.n} (train {int((table.split == 'train').sum())}, test {int((table.split == 'test').sum())} rows), "
        f"64 px shards, batch {cfg.batch_size}, lr {cfg.lr}, wd {cfg.weight_decay}, warmup {cfg.warmup_steps}, "
        f"DataLoader workers {a.workers}, torch threads {1 if a.side_by_side else torch.get_num_threads()}"
        f"{', both systems at the same time' if a.side_by_side else ', one system after the other'}.",
        "",
        "| system | seed | steps | samples/s | test R@5 | chance |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['system']} | {r['seed']} | {r['steps']} | {r['samples_per_s']} | {r['test_r5']:.3f} | {r['chance']:.3f} |")
    m = {s: np.mean([r["test_r5"] for r in rows if r["system"] == s]) for s in ("mmpipe", "open_clip")}
    sps = {s: np.mean([r["samples_per_s"] for r in rows if r["system"] == s]) for s in ("mmpipe", "open_clip")}
    lines += ["", f"Mean test R@5: mmpipe {m['mmpipe']:.3f}, open_clip {m['open_clip']:.3f} "
                  f"(ratio {m['mmpipe'] / max(m['open_clip'], 1e-9):.2f}x); samples/s ratio "
                  f"{sps['mmpipe'] / max(sps['open_clip'], 1e-9):.2f}x."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- GPU: throughput


def _gpu_step_fns(batch: int):
    import open_clip

    dev = "cuda"
    torch.manual_seed(0)
    hf = clip_model.build_model("vit-b-32", vocab_size=49408).to(dev).train()
    oc, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    oc = oc.to(dev).train()
    px = torch.randn(batch, 3, 224, 224, device=dev)
    ids = torch.randint(4, 49000, (batch, 77), device=dev)
    ids[:, 40] = 3  # mmpipe's end token
    oc_ids = ids.clone()
    oc_ids[:, 40] = 49407  # open_clip's end token (argmax pooling)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    oc_opt = torch.optim.AdamW(oc.parameters(), lr=1e-4, fused=True)
    hf_loss, oc_loss = trainloop.ClipLoss(), open_clip.ClipLoss()

    def hf_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = trainloop.clip_forward(hf, px, ids, hf_loss)
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    def oc_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            i, t, s = oc(px, oc_ids)
            loss = oc_loss(i, t, s)
        loss.backward()
        oc_opt.step()
        oc_opt.zero_grad(set_to_none=True)

    return {"mmpipe": hf_step, "open_clip": oc_step}


def _time(fn, steps: int) -> tuple[float, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps, torch.cuda.max_memory_allocated() / 2**30


def gpu_part(a) -> str:
    if not torch.cuda.is_available():
        return "### GPU: not measured: no GPU\n\n| system | samples/s (synthetic) | samples/s (shards + loader) | ratio | MFU | peak GiB |\n| --- | --- | --- | --- | --- | --- |\n| mmpipe | not measured | not measured | - | - | - |\n| open_clip | not measured | not measured | - | - | - |"
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    res = {}
    for sys_name, fn in _gpu_step_fns(a.gpu_batch).items():
        dt, mem = _time(fn, a.gpu_steps)
        res[sys_name] = (a.gpu_batch / dt, mem)
    # With the loader: mmpipe's own loop on real 224 px shards of the synthetic set.
    out = Path(a.out) / "gpu"
    table, data = demo_split.make(out / "synth", n=a.n, seed=0)
    cfg = TrainConfig(preset="vit-b-32", batch_size=a.gpu_batch, steps=a.gpu_steps + 10, warmup_steps=5,
                      num_workers=a.gpu_workers, val_every_epoch=False, checkpoint_every=10**6, resume=False)
    res_loader = trainloop.run_stage(table, cfg, StageContext(data=data, run_dir=out / "run", seed=0, workers=a.gpu_workers)).stats
    loader_sps = res_loader["samples_per_s"]
    lines = [f"### GPU: ViT-B/32 training throughput, bf16, batch {a.gpu_batch} ({name})", "",
             "| system | samples/s (synthetic) | ratio to open_clip | MFU | peak GiB |", "| --- | --- | --- | --- | --- |"]
    for s, (sps, mem) in res.items():
        mfu = f"{sps * VITB32_TRAIN_FLOP / peak:.1%}" if peak else "n/a"
        lines.append(f"| {s} | {sps:.0f} | {sps / res['open_clip'][0]:.2f}x | {mfu} | {mem:.1f} |")
    lines += ["", f"mmpipe with shards + DataLoader ({a.gpu_workers} workers): {loader_sps:.0f} samples/s, "
                  f"GPU busy ~{loader_sps / res['mmpipe'][0]:.0%} of the pure-model rate."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=180)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers on CPU (both systems)")
    p.add_argument("--gpu-batch", type=int, default=256)
    p.add_argument("--gpu-steps", type=int, default=30)
    p.add_argument("--gpu-workers", type=int, default=8)
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--side-by-side", action=argparse.BooleanOptionalAction, default=True,
                   help="run mmpipe and open_clip at the same time, one thread each (fair on a shared machine)")
    p.add_argument("--out", default="bench/out/train")
    a = p.parse_args()
    import open_clip
    import transformers

    head = (f"Device: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
            f"{', GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ', no GPU'}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, open_clip {open_clip.__version__}, "
            f"python {platform.python_version()}.")
    parts = [head, ""]
    if not a.skip_cpu:
        parts += [cpu_part(a), ""]
    parts.append(gpu_part(a))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
