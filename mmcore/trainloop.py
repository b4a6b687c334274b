"""The train stage's torch side: CLIP loss, data loading, the loop, checkpoints, DDP and ``run_stage``.

nanoGPT's loop as functions: ``get_lr`` (warmup then cosine), a loss module like open_clip's
``ClipLoss``, atomic checkpoints with model, optimizer, RNG and data position, so that a run
killed mid-epoch and resumed ends with the same weights. Which sample a step sees and how it is
augmented depend only on (seed, epoch, index), never on workers, ranks or restarts.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmcore import augment, clip_model, fusion, shards, sources, tables
from mmcore.base import StageContext
from mmcore.errors import ConfigError, InputError, row_detail
from mmcore.layout import (
    CHECKPOINT_DIR,
    HISTORY_FILE,
    LAST_CHECKPOINT,
    MODEL_DIR,
    SHARDS_DIR,
    TIMING_FILE,
    TRAIN_CONFIG_FILE,
    RunLayout,
)
from mmcore.tables import PSEUDO_LABEL, PSEUDO_WEIGHT, ROW_ID, TEXT, StageResult

if TYPE_CHECKING:  # mmcore.train imports this module to run the stage; its config is a type here
    from mmcore.train import TrainConfig

# history.parquet: the training curves, byte-identical across runs of the same inputs and config;
# timing.json: wall-clock samples/s per step (differs run to run).
HISTORY_COLUMNS = ("step", "epoch", "loss", "lr", "logit_scale", "val_i2t_r5")
CONTENT_DIGEST = "content_digest"  # the probe's digest of the image bytes: two paths, one image


# --------------------------------------------------------------------------- loss


def gather_features(img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' features in rank order, with gradients flowing back to each rank (gather_with_grad)."""
    import torch.distributed.nn.functional as dnf

    return torch.cat(dnf.all_gather(img), 0), torch.cat(dnf.all_gather(txt), 0)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_weights(weights: torch.Tensor) -> torch.Tensor:
    """Every rank's per-pair weights in rank order, as ``gather_features`` orders the pairs."""
    parts = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, weights)
    return torch.cat(parts)


class _PairLoss(nn.Module):
    """A contrastive loss over a batch's (image, caption) embeddings, computed in fp32: under bf16
    autocast the logits' matmul would otherwise round to bf16 (steps of 0.06 near -10, 0.5 near 100)."""

    def forward(self, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(img.device.type, enabled=False):
            return self._loss(img.float(), txt.float(), logit_scale.float(), weights)

    def _loss(self, img, txt, logit_scale, weights) -> torch.Tensor:
        raise NotImplementedError


class ClipLoss(_PairLoss):
    """Symmetric cross-entropy over the image-text similarity matrix (CLIP).

    With ``weights`` (one per pair, e.g. a pseudo-labelled pair's ``pseudo_weight``) each pair's
    term in both directions counts by its weight: a weighted mean. Without, the plain mean.
    """

    def get_logits(self, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor):
        if _distributed():
            img, txt = gather_features(img, txt)
        logits = logit_scale * img @ txt.T
        return logits, logits.T

    def _loss(self, img, txt, logit_scale, weights):
        li, lt = self.get_logits(img, txt, logit_scale)
        labels = torch.arange(li.shape[0], device=li.device)
        if weights is None:
            return (F.cross_entropy(li, labels) + F.cross_entropy(lt, labels)) / 2
        if _distributed():  # every rank's pairs are in the logits: their weights too, in rank order
            weights = _gather_weights(weights)
        w = weights.float()
        per_pair = F.cross_entropy(li, labels, reduction="none") + F.cross_entropy(lt, labels, reduction="none")
        return (per_pair * w).sum() / (2 * w.sum().clamp_min(1e-12))


class SigLipLoss(_PairLoss):
    """Sigmoid loss (SigLIP, Zhai et al. 2023; open_clip's ``SigLipLoss``): each image-text pair of the
    batch is its own binary decision (its own pair: match, every other: no match) on
    ``logit_scale * cos + logit_bias``; no softmax over the batch. The learnt bias starts at -10 and the
    scale at 10 (the paper's and open_clip's init); ``sum over pairs / batch`` as theirs.

    With ``weights`` (one per pair) each row's and column's terms count by its pair's weight: the
    weighted mean of the per-image and per-caption sums (the plain loss when every weight is 1).
    The bias only shifts every score alike, so retrieval and zero-shot rankings never use it.
    """

    INIT_SCALE, INIT_BIAS = math.log(10.0), -10.0

    def __init__(self):
        super().__init__()
        self.logit_bias = nn.Parameter(torch.tensor(self.INIT_BIAS))

    def _loss(self, img, txt, logit_scale, weights):
        if _distributed():  # every rank scores the global batch (as ClipLoss here): DDP's mean is the gradient
            img, txt = gather_features(img, txt)
            if weights is not None:
                weights = _gather_weights(weights)
        n = img.shape[0]
        logits = logit_scale * img @ txt.T + self.logit_bias
        labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
        per = -F.logsigmoid(labels * logits)  # (images, captions)
        if weights is None:
            return per.sum() / n
        w = weights.float()
        return ((per.sum(1) + per.sum(0)) * w).sum() / (2 * w.sum().clamp_min(1e-12))


LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss}  # train.loss


def trim_context(ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """``ids`` cut after the column of the batch's last end token (the padding to the context length).

    Exact for CLIP's text tower: attention is causal and the caption is read at its end token, so
    no output the model uses sees a later position; the tower's cost falls with the batch's longest
    caption instead of the context length (OpenMoji: ~27 of 32 tokens; Noto's names: ~18). Rows
    without an end token (a tokenizer that does not add one) leave ``ids`` whole.
    """
    if eos_id is None or ids.ndim != 2 or ids.shape[1] == 0:
        return ids
    is_end = ids == eos_id
    if not bool(is_end.any(1).all()):
        return ids
    n = int(is_end.int().argmax(1).max()) + 1
    return ids if n == ids.shape[1] else ids[:, :n]


def _end_token(model: nn.Module) -> int | None:
    """The id the text tower pools at, or None where it pools at the largest id (transformers' legacy rule)."""
    eos = getattr(unwrap(model).config.text_config, "eos_token_id", None)
    return None if eos is None or eos == 2 else int(eos)


def clip_forward(model, pixels: torch.Tensor, ids: torch.Tensor, loss_fn: ClipLoss) -> torch.Tensor:
    """Loss of one batch; goes through ``model(...)`` so DDP's gradient hooks see the whole model."""
    out = model(input_ids=ids, pixel_values=pixels)  # embeds come back L2-normalised
    return loss_fn(out.image_embeds.float(), out.text_embeds.float(), unwrap(model).logit_scale.exp())


@dataclass
class Fusion:
    """The matching head trained next to the contrastive loss, and how much its loss counts."""

    head: nn.Module
    weight: float


def fused_forward(
    model, pixels: torch.Tensor, ids: torch.Tensor, loss_fn: ClipLoss, *, head: Fusion | None,
    weights: torch.Tensor | None, generator: torch.Generator | None, groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """(total loss, matching loss) of one batch with a matching head or per-pair weights.

    Hard negatives are mined within this rank's micro-batch (ALBEF gathers them across GPUs).
    """
    out = model(input_ids=ids, pixel_values=pixels)
    scale = unwrap(model).logit_scale.exp()
    loss = loss_fn(out.image_embeds.float(), out.text_embeds.float(), scale, weights)
    if head is None:
        return loss, float("nan")
    img, txt = fusion.output_features(unwrap(model), ids, out)
    itm, _ = fusion.itm_loss(head.head, img, txt, ids, scale, generator, weights, groups)
    return loss + head.weight * itm, float(itm.detach())


# --------------------------------------------------------------------------- schedule


def get_lr(step: int, cfg: TrainConfig, progress: float, total: int | None = None) -> float:
    """Learning rate at ``step``; ``progress`` in [0, 1] is the share of the run done (steps or time).

    Args:
        total: the run's steps (None for a time budget, whose warmup_fraction is a share of the time).
    """
    # 1) linear warmup: warmup_steps, or warmup_fraction of the run's steps
    warm = cfg.warmup_steps if cfg.warmup_fraction is None else (
        round(cfg.warmup_fraction * total) if total is not None else None)
    if warm is not None and step < warm:
        return cfg.lr * (step + 1) / warm
    # 1b) a time budget's warmup: a share of the time
    if warm is None and progress < cfg.warmup_fraction:
        return cfg.lr * max(progress, 1e-3) / cfg.warmup_fraction
    # 2) past the end: the floor
    if progress >= 1:
        return cfg.lr * cfg.min_lr_ratio
    # 3) cosine from lr down to the floor
    coeff = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * coeff)


PROJECTIONS = ("visual_projection.", "text_projection.", "logit_scale")  # what train.projection_lr applies to


def param_groups(model: nn.Module, weight_decay: float, projection_scale: float | None = None) -> list[dict]:
    """Decay weight matrices only: biases, norms and the logit scale are left alone (as open_clip).

    Frozen parameters (a locked tower) are left out. With ``projection_scale`` the projections and
    the logit scale get their own groups, whose ``lr_scale`` multiplies the scheduled rate.
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "norm" in name or "bias" in name or "logit_scale" in name
        proj = projection_scale is not None and name.startswith(PROJECTIONS)
        groups.setdefault((not skip, proj), []).append(p)
    out = []
    for (decay, proj), params in sorted(groups.items(), key=lambda kv: (kv[0][1], not kv[0][0])):
        out.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                    "lr_scale": projection_scale if proj else 1.0})
    return out


# --------------------------------------------------------------------------- schedule from the data

# The automatic schedule (train.batch_size, epochs, steps and minutes left unset): see ``auto_schedule``.
FINETUNE_BATCH = 64  # fine-tuning's batch size when train.batch_size is unset
AUTO_EPOCHS = 8  # passes over the data when that is enough steps (larger sets)
AUTO_MIN_STEPS = 250  # however small the data: at ~100 steps R@5 was half what 250 steps gave (bench_realdata)
AUTO_BATCH = (64, 256)  # smallest and largest automatic batch
AUTO_ROWS_PER_PAIR = 100  # about n / 100 pairs per batch: 64 below 12,800 images, 128 below 25,600, then 256


@dataclass(frozen=True)
class Schedule:
    """The batch size and length a run trains with, and which of them were chosen automatically."""

    batch_size: int
    unit: str  # epochs, steps or minutes
    amount: float
    auto: tuple[str, ...]  # "batch_size", "length": the settings the user left to auto_schedule
    reason: str

    def update(self) -> dict:
        """The TrainConfig fields that make a config say what ran."""
        return {"batch_size": self.batch_size, self.unit: self.amount}


def auto_schedule(cfg: TrainConfig, n_images: int, world: int = 1) -> Schedule:
    """Batch size and length for ``n_images`` distinct train images; settings the user gave win.

    - Batch size: about ``n_images / 100`` rounded down to a power of two, within ``AUTO_BATCH``
      (64 below 12,800 images). A contrastive batch is also the number of negatives, so larger data
      gets larger batches; on small data a large batch leaves few steps per epoch.
    - Length: ``AUTO_EPOCHS`` epochs, but at least ``AUTO_MIN_STEPS`` optimizer steps, so that a
      small set (a few hundred to a few thousand images) is not stopped long before it converges.
    - With ``minutes``, the time budget is the length; only the batch size is chosen.
    """
    if cfg.model_path is not None:  # fine-tuning keeps its fixed defaults (FINETUNE_DEFAULTS, 8 epochs)
        unit, amount = cfg.length
        bs = cfg.batch_size or FINETUNE_BATCH
        return Schedule(bs, unit, amount, (), f"batch {bs}, {amount} {unit} (fine-tune)")
    auto = []
    bs = cfg.batch_size
    if bs is None:  # a value, not "was it set": a saved config.yaml (every field written) means the same
        target = max(1, n_images // AUTO_ROWS_PER_PAIR)
        bs = min(AUTO_BATCH[1], max(AUTO_BATCH[0], 2 ** int(math.log2(target))))
        # never more than the data holds (fit raises on a batch larger than the train images)
        while bs > 2 and bs * cfg.grad_accum > n_images:
            bs //= 2
        bs = max(world, bs - bs % world)  # split evenly across DDP ranks
        auto.append("batch_size")
    why = [f"batch {bs}" + (f" (auto: ~{n_images:,} images / {AUTO_ROWS_PER_PAIR})" if auto else " (set)")]
    given = [k for k in ("epochs", "steps", "minutes") if getattr(cfg, k) is not None]
    if given:
        unit, amount = given[0], getattr(cfg, given[0])
        why.append(f"{amount} {unit} (set)")
    else:
        per_epoch = max(1, n_images // (bs * cfg.grad_accum))
        epochs = max(AUTO_EPOCHS, math.ceil(AUTO_MIN_STEPS / per_epoch))
        unit, amount = "epochs", epochs
        auto.append("length")
        why.append(f"{epochs} epochs = {epochs * per_epoch} steps (auto: {AUTO_EPOCHS} epochs, at least {AUTO_MIN_STEPS} steps)")
    return Schedule(bs, unit, amount, tuple(auto), "; ".join(why))


# --------------------------------------------------------------------------- data


class PairDataset(Dataset):
    """Shard images and captions; item ``(epoch, i)`` is sample i augmented with seed (seed, epoch, i)."""

    def __init__(self, jpegs, texts, scheme, size, seed, synonyms=None, weights=None, groups=None):
        # jpegs by position: a list, or a shard column's Arrow array read from the memory map (not
        # copied into this process, nor into DataLoader workers started by fork, Linux's default;
        # a spawned worker gets a pickled copy).
        self.jpegs, self.texts = jpegs, list(texts)
        self.scheme, self.size, self.seed = scheme, size, seed
        self.synonyms = synonyms
        # Per-pair loss weights (pseudo_weight) and group codes (the matching head's negatives);
        # with either, items are (image, text, weight, group), else (image, text).
        self.weights, self.groups = weights, groups

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        img, text = augment.apply(self.scheme, shards.decode(self.jpegs[i]), self.texts[i], rng, self.size, self.synonyms)
        if self.weights is not None or self.groups is not None:
            w = 1.0 if self.weights is None else float(self.weights[i])
            return self.as_uint8(img), text, w, -1 if self.groups is None else int(self.groups[i])
        return self.as_uint8(img), text

    @staticmethod
    def as_uint8(img) -> torch.Tensor:
        # uint8 CHW: a quarter of the bytes to pin and copy; normalised on the device.
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())


def _collate(items):
    if len(items[0]) == 4:  # with per-pair weights and groups
        return (torch.stack([x[0] for x in items]), [x[1] for x in items],
                torch.tensor([x[2] for x in items], dtype=torch.float32), torch.tensor([x[3] for x in items], dtype=torch.long))
    return torch.stack([x for x, _ in items]), [t for _, t in items]


@dataclass
class BatchPlan:
    """Micro-batches from optimizer step ``start`` on: epoch permutations seeded by (seed, epoch)."""

    n: int
    batch_size: int  # global
    grad_accum: int
    seed: int
    start: int = 0
    rank: int = 0
    world: int = 1
    weights: np.ndarray | None = None
    groups: np.ndarray | None = None  # an image id per row: an epoch takes one caption of each image

    def __post_init__(self):
        if self.groups is not None and self.weights is None:
            codes, inverse = np.unique(np.asarray(self.groups), return_inverse=True)
            if len(codes) == self.n:  # one caption per image: the plain permutation
                self.groups = None
            else:
                self._rows = np.argsort(inverse, kind="stable")  # rows, image by image
                self._count = np.bincount(inverse)
                self._start = np.r_[0, np.cumsum(self._count)[:-1]]
        else:
            self.groups = None

    @property
    def epoch_size(self) -> int:
        return self.n if self.groups is None else len(self._count)

    @property
    def steps_per_epoch(self) -> int:
        return (self.epoch_size // self.batch_size) // self.grad_accum

    def order(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.weights is not None:
            w = torch.as_tensor(self.weights, dtype=torch.float64)
            return torch.multinomial(w, self.n, replacement=True, generator=g).numpy()
        if self.groups is not None:
            # Each image once, with one of its captions drawn for this epoch: a batch never holds the
            # same image twice, so no caption is a false negative of its own image in the loss.
            u = torch.rand(len(self._count), generator=g, dtype=torch.float64).numpy()
            pick = self._rows[self._start + np.minimum((u * self._count).astype(np.int64), self._count - 1)]
            return pick[torch.randperm(len(pick), generator=g).numpy()]
        return torch.randperm(self.n, generator=g).numpy()

    def __iter__(self):
        step, per = self.start, self.batch_size // self.world
        cached: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))
        while True:
            epoch, k = divmod(step, self.steps_per_epoch)
            if cached[0] != epoch:
                cached = (epoch, self.order(epoch))
            for j in range(self.grad_accum):
                lo = (k * self.grad_accum + j) * self.batch_size + self.rank * per
                yield [(epoch, int(i)) for i in cached[1][lo : lo + per]]
            step += 1


# --------------------------------------------------------------------------- eval


@torch.no_grad()
def i2t_recall(model, pixels: torch.Tensor, ids: torch.Tensor, mean, std, k: int = 5, batch: int = 256) -> float:
    """Image-to-text R@k on uint8 images: image i's own caption ranks in the top k (ties count in its favour)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    m, s = torch.tensor(mean, device=dev).view(1, 3, 1, 1), torch.tensor(std, device=dev).view(1, 3, 1, 1)
    img = torch.cat([
        F.normalize(model.get_image_features(pixel_values=(pixels[i : i + batch].to(dev).float() / 255 - m) / s).pooler_output.float(), dim=-1)
        for i in range(0, len(pixels), batch)
    ])
    txt = torch.cat([F.normalize(model.get_text_features(input_ids=ids[i : i + batch].to(dev)).pooler_output.float(), dim=-1)
                     for i in range(0, len(ids), batch)])
    model.train(was)
    sim = img @ txt.T
    better = (sim > sim.diag()[:, None]).sum(1)
    return float((better < k).float().mean())


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a kill mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, or ``{}`` (train from the start) when it cannot be loaded.

    A torn, truncated or planted ``last.pt`` (a pickle ``weights_only`` refuses) must not block
    training on every re-run: it is reported and ignored, and the next checkpoint replaces it.
    """
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reason a file cannot be loaded: it is not a usable checkpoint
        import logging

        logging.getLogger("mmcore.train").warning("ignoring unreadable checkpoint %s (%s): training from the start",
                                                  path, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return {}
    return ck if isinstance(ck, dict) else {}


def unwrap(model: nn.Module) -> nn.Module:
    """The CLIPModel inside DDP (``module``) and ``torch.compile`` (``_orig_mod``) wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) or isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


# --------------------------------------------------------------------------- the loop


@dataclass
class FitData:
    """What the loop trains on: shard rows of train and val, and the resolved preprocessing."""

    train: pd.DataFrame  # row_id, text, jpeg (+ sample_weight)
    val: pd.DataFrame
    pre: clip_model.Preprocess
    fingerprint: str
    groups: np.ndarray | None = None  # per train row, its image (content digest or path)
    match_groups: np.ndarray | None = None  # per train row, its split_group: the matching head's negatives avoid it


class _Interrupted(Exception):
    """Raised by the test hook that simulates a kill right after a step."""


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX tiles, Sapphire Rapids on)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # a torch build without the probe's backing
        return False


def resolve_precision(precision: str, device: str) -> str:
    """``train.precision`` as it will run: ``auto`` is bf16 on CUDA and on a CPU with AMX, else fp32.

    On such a CPU a bf16 autocast step of the tiny preset takes 0.64x the fp32 step's time (with the
    matmul attention, see ``fit``) with no difference in learning per step detected (OpenMoji val, 4 seeds); without AMX
    bf16 has no matrix unit to run on, so auto keeps fp32 there.
    """
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if cpu_has_bf16_matmul() else "fp32"


def pick_device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA GPU is available; use 'auto' or 'cpu'")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def fit(
    model: nn.Module,
    tok,
    data: FitData,
    cfg: TrainConfig,
    out: Path,
    *,
    seed: int,
    device: str,
    progress: bool = False,
    interrupt_at: int | None = None,
    head: Fusion | None = None,
) -> dict[str, Any]:
    """Train ``model`` (and ``head``, a matching head) in place; writes checkpoints and ``history.parquet``
    under ``out`` (rank 0). A ``pseudo_weight`` column in ``data.train`` weights each pair's loss terms."""
    rank, world = _dist()
    if cfg.batch_size % world:
        raise ConfigError(f"train.batch_size must be divisible by the {world} DDP ranks, got {cfg.batch_size}")
    n = len(data.train)
    if n < cfg.batch_size * cfg.grad_accum:
        raise ConfigError(
            f"train.batch_size x grad_accum ({cfg.batch_size} x {cfg.grad_accum}) exceeds the {n} train rows; lower it"
        )
    synonyms = augment.load_synonyms(cfg.synonyms) if cfg.augment == "synonym" else None
    pair_w = pair_weights(data.train)
    match_groups = None
    if head is not None:  # pairs of one image or duplicate cluster are never the head's negatives
        key = data.match_groups if data.match_groups is not None else data.groups
        match_groups = pd.factorize(pd.Series(key, dtype=object))[0] if key is not None else np.arange(n)
    ds = PairDataset(data.train["jpeg"].array, data.train[TEXT], cfg.augment, data.pre.image_size, seed, synonyms,
                     pair_w, match_groups)
    weights = data.train["sample_weight"].to_numpy(float) if cfg.weighted_sampler and "sample_weight" in data.train else None

    # Resume: model, optimizer, step, RNG and history from the last checkpoint of this same run.
    ckpt_path = out / CHECKPOINT_DIR / LAST_CHECKPOINT
    proj_scale = cfg.projection_lr / cfg.lr if cfg.projection_lr is not None else None
    groups = param_groups(unwrap(model), cfg.weight_decay, proj_scale)
    if head is not None:  # the head's own groups after the model's (decay on its weight matrices only)
        groups += param_groups(head.head, cfg.weight_decay)
    loss_fn = LOSSES[cfg.loss]()
    loss_params = list(loss_fn.parameters())  # SigLIP's bias: learnt at the base rate, no decay
    if loss_params:
        groups.append({"params": loss_params, "weight_decay": 0.0, "lr_scale": 1.0})
    params = [p for g in groups for p in g["params"]]
    # fused: one kernel over all parameters (CPU and CUDA); on CPU torch's default is a loop per
    # tensor, 5x slower (bench/results/realdata.md): with CLIP's 49k-token table that is ~10% of a step.
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-6, fused=True)
    step, seconds, history = 0, 0.0, []
    if cfg.resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if ck.get("fingerprint") != data.fingerprint:
            if rank == 0:
                print(f"train: {ckpt_path} is from other settings or data (or an older mmpipe); starting at step 0", flush=True)
        else:
            unwrap(model).load_state_dict(ck["model"])
            if head is not None:
                head.head.load_state_dict(ck["fusion"])
            if loss_params:
                loss_fn.load_state_dict(ck["loss"])
            opt.load_state_dict(ck["optim"])
            step, seconds, history = int(ck["step"]), float(ck["seconds"]), list(ck["history"])
            torch.set_rng_state(ck["rng_torch"])
    model.to(device)
    loss_fn.to(device)
    if head is not None:
        head.head.to(device).train()
    for st in opt.state.values():  # optimizer state follows the model onto the device (fused: the step count too)
        for k, v in st.items():
            if torch.is_tensor(v):
                st[k] = v.to(device)

    plan = BatchPlan(n, cfg.batch_size, cfg.grad_accum, seed, start=step, rank=rank, world=world, weights=weights,
                     groups=data.groups if cfg.unique_images else None)
    if plan.epoch_size < cfg.batch_size * cfg.grad_accum:
        raise ConfigError(f"train.batch_size x grad_accum ({cfg.batch_size} x {cfg.grad_accum}) exceeds the "
                          f"{plan.epoch_size} distinct train images (unique_images); lower it")
    spe = plan.steps_per_epoch
    unit, amount = cfg.length
    total = int(amount * spe) if unit == "epochs" else int(amount) if unit == "steps" else None
    budget = amount * 60 if unit == "minutes" else None
    loader = DataLoader(ds, batch_sampler=plan, num_workers=cfg.num_workers, collate_fn=_collate,
                        pin_memory=device == "cuda", persistent_workers=cfg.num_workers > 0,
                        prefetch_factor=4 if cfg.num_workers else None)
    vn = len(data.val)
    vi = np.linspace(0, vn - 1, min(vn, cfg.val_max_rows)).round().astype(int) if vn else np.zeros(0, int)
    val_px = torch.stack([PairDataset.as_uint8(shards.decode(data.val["jpeg"].iloc[i])) for i in vi]) if vn else None
    val_ids = clip_model.tokenize(tok, data.val[TEXT].iloc[vi].tolist()) if vn else None

    mean_t = torch.tensor(data.pre.mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(data.pre.std, device=device).view(1, 3, 1, 1)
    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)
    fwd_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    eos_id = _end_token(model)
    bf16 = resolve_precision(cfg.precision, device) == "bf16"  # run_stage resolved it; fit called alone may not
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    attn = unwrap(model).config._attn_implementation
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not (progress and rank == 0), mininterval=1)
    it = None
    model.train()
    t_start = time.perf_counter() - seconds
    last_val = next((h["val_i2t_r5"] for h in reversed(history) if not math.isnan(h["val_i2t_r5"])), float("nan"))
    try:
        if bf16 and device == "cpu" and attn == "sdpa":
            # torch's CPU flash-attention backward is ~6x slower in bf16 than in fp32, while the matmul
            # attention's bf16 products run on AMX: a step of the tiny preset takes 0.64x the fp32 step's
            # time this way, 1.08x with sdpa (bench/bench_optim.py); set back after the loop.
            unwrap(model).set_attn_implementation("eager")
        it = iter(loader)
        while True:
            elapsed = time.perf_counter() - t_start
            if (total is not None and step >= total) or (budget is not None and elapsed >= budget):
                break
            prog = step / total if total else elapsed / budget
            lr = get_lr(step, cfg, prog, total)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            t0 = time.perf_counter()
            loss_sum = 0.0
            itm_sum = 0.0
            for j in range(cfg.grad_accum):
                pixels, texts, *extra = next(it)
                ids = clip_model.tokenize(tok, texts)
                if not extra:  # the plain step: no padding past the batch's longest caption (the head's path keeps its shapes)
                    ids = trim_context(ids, eos_id)
                ids = ids.to(device, non_blocking=True)
                pixels = pixels.to(device, non_blocking=True).float().div_(255).sub_(mean_t).div_(std_t)
                sync = j == cfg.grad_accum - 1 or world == 1
                ctx_sync = ddp_model.no_sync() if not sync else contextlib.nullcontext()
                with ctx_sync, amp:
                    if not extra:  # the plain CLIP step
                        loss = clip_forward(fwd_model, pixels, ids, loss_fn)
                    else:  # negatives drawn from (seed, step, micro-batch): the same after a resume
                        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + j)
                        w = extra[0].to(device) if pair_w is not None else None
                        loss, itm = fused_forward(fwd_model, pixels, ids, loss_fn, head=head, weights=w, generator=gen,
                                                  groups=extra[1])
                        itm_sum += itm / cfg.grad_accum
                (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach()) / cfg.grad_accum
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # every trained tensor: a head's, SigLIP's bias
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():  # CLIP clamps the temperature so logits stay <= 100
                unwrap(model).logit_scale.clamp_(0, clip_model.LOGIT_SCALE_MAX)
            step += 1
            dt = time.perf_counter() - t0
            scale = float(unwrap(model).logit_scale.detach().exp())
            row = {"step": step, "epoch": step / spe, "loss": loss_sum, "lr": lr, "logit_scale": scale,
                   "samples_per_s": cfg.batch_size * cfg.grad_accum / dt, "val_i2t_r5": float("nan")}
            if head is not None:
                row["itm_loss"] = itm_sum
            if step % spe == 0 and cfg.val_every_epoch and val_px is not None:
                row["val_i2t_r5"] = last_val = i2t_recall(unwrap(model), val_px, val_ids, data.pre.mean, data.pre.std)
            history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", scale=f"{scale:.1f}", r5=f"{last_val:.2f}", refresh=False)
            if step % cfg.checkpoint_every == 0:
                _checkpoint(model, opt, step, time.perf_counter() - t_start, history, data.fingerprint, ckpt_path, rank, head,
                            loss_fn)
            if interrupt_at is not None and step >= interrupt_at:
                raise _Interrupted(step)
    finally:
        bar.close()
        del it
        if unwrap(model).config._attn_implementation != attn:
            unwrap(model).set_attn_implementation(attn)
    seconds = time.perf_counter() - t_start
    if cfg.val_every_epoch and val_px is not None and (not history or math.isnan(history[-1]["val_i2t_r5"])):
        last_val = i2t_recall(unwrap(model), val_px, val_ids, data.pre.mean, data.pre.std)
        if history:
            history[-1]["val_i2t_r5"] = last_val
    _checkpoint(model, opt, step, seconds, history, data.fingerprint, ckpt_path, rank, head, loss_fn)
    curves = [*HISTORY_COLUMNS, *(["itm_loss"] if head is not None else [])]  # the head's loss: only with a head
    h = pd.DataFrame(history, columns=[*curves, "samples_per_s"])
    if rank == 0:
        # The curves are deterministic Parquet; the wall-clock throughput per step goes to JSON.
        tables.write_parquet(h[curves], out / HISTORY_FILE)
        tables.write_json({"step": h["step"].tolist(), "samples_per_s": [round(float(x), 3) for x in h["samples_per_s"]]},
                          out / TIMING_FILE)
    train_time = float(sum(cfg.batch_size * cfg.grad_accum / r for r in h["samples_per_s"])) if len(h) else 0.0
    extra = {}
    if head is not None:
        extra["final_itm_loss"] = round(float(h["itm_loss"].tail(max(1, min(spe, 20))).mean()), 4) if len(h) else float("nan")
    if pair_w is not None:
        extra["n_weighted_pairs"] = int((pair_w != 1.0).sum())
    return {
        **extra,
        "steps": step,
        "epochs": round(step / spe, 3),
        "steps_per_epoch": spe,
        "samples_seen": step * cfg.batch_size * cfg.grad_accum,
        "samples_per_s": round(len(h) * cfg.batch_size * cfg.grad_accum / train_time, 2) if train_time else 0.0,
        "seconds_training": round(seconds, 2),
        "final_loss": round(float(h["loss"].tail(max(1, min(spe, 20))).mean()), 4) if len(h) else float("nan"),
        "val_i2t_r5": round(last_val, 4) if not math.isnan(last_val) else None,
        "chance_r5": round(min(1.0, 5 / len(vi)), 4) if len(vi) else None,
        "n_val_scored": int(len(vi)),
        "world_size": world,
    }


def _checkpoint(model, opt, step, seconds, history, fingerprint, path, rank, head: Fusion | None = None,
                loss_fn: nn.Module | None = None) -> None:
    if rank != 0:
        return
    state = {
        "model": unwrap(model).state_dict(),
        "optim": opt.state_dict(),
        "step": step,
        "seconds": seconds,
        "history": history,
        "rng_torch": torch.get_rng_state(),
        "fingerprint": fingerprint,
    }
    if head is not None:
        state["fusion"] = head.head.state_dict()
    if loss_fn is not None and any(True for _ in loss_fn.parameters()):
        state["loss"] = loss_fn.state_dict()
    save_checkpoint(path, state)


def pair_weights(train: pd.DataFrame) -> np.ndarray | None:
    """Per-pair loss weights from ``pseudo_weight`` (missing = 1.0, a real pair), or None without the column."""
    if PSEUDO_WEIGHT not in train.columns:
        return None
    w = pd.to_numeric(train[PSEUDO_WEIGHT], errors="coerce").fillna(1.0).to_numpy(np.float64)
    if not np.isfinite(w).all() or (w < 0).any():
        bad = w[~np.isfinite(w) | (w < 0)][0]
        raise InputError(f"train: column {PSEUDO_WEIGHT} must hold finite weights >= 0, got {bad}")
    return w


# --------------------------------------------------------------------------- the stage


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fingerprint(cfg: TrainConfig, shard_key: str, seed: int, world: int) -> str:
    # What must match for a checkpoint to be resumed: settings that change the math, not workers.
    c = cfg.model_dump(mode="json", exclude={"resume", "num_workers", "checkpoint_every", "val_every_epoch"})
    return tables.json_digest({"cfg": c, "shards": shard_key, "seed": seed, "world": world})


def run_stage(
    table: pd.DataFrame,
    cfg: TrainConfig,
    ctx: StageContext,
    *,
    interrupt_at: int | None = None,
) -> StageResult:
    """Build shards, the tokenizer (CLIP's BPE unless another is asked for) and the model; train; save
    ``train/model``; see ``mmcore.train.run``."""
    rank, world = _dist()
    seed = ctx.seed if cfg.seed is None else cfg.seed  # train.seed varies training only
    out = RunLayout(ctx.run_dir).train_dir
    tables.require_columns(table, [ROW_ID, tables.IMAGE, TEXT, "split"], out.name)
    device = pick_device(cfg.device)
    clip_model.quiet_transformers()
    # Every check of the model, tokenizer and settings comes before the first file is written.
    src, tok = None, None
    if cfg.model_path is not None:
        src = clip_model.load(cfg.model_path, cfg.tokenizer_path, where="train.model_path")
        image_size = src.pre.image_size
        if cfg.image_size is not None and cfg.image_size != image_size:
            raise ConfigError(f"train.image_size: a pretrained model trains at its own resolution, {image_size} px; "
                              f"got {cfg.image_size}")
        _lock(src.model, cfg)
    else:
        clip_model.preset_config(cfg.preset)  # a bad name fails before any image is decoded
        image_size = cfg.image_size or _model_image_size(cfg.preset)
        if cfg.tokenizer_path is not None:
            tok = clip_model.load_tokenizer(cfg.tokenizer_path)

    shard_dir = out / SHARDS_DIR
    # Only train and val images are decoded here; test rows pass through (evaluate decodes them).
    fit_rows = table[table["split"].isin(["train", "val"])]
    if rank == 0:
        try:
            meta = shards.build(fit_rows, sources.of(ctx.data), shard_dir, image_size, workers=ctx.workers,
                                progress=ctx.progress)
        except BaseException as e:
            _from_rank0(world, row_detail(e))  # the other ranks stop waiting for shards that will not come
            raise
        _from_rank0(world, "")
    else:
        failure = _from_rank0(world, "")
        if failure:
            raise InputError(f"train: rank 0 could not build the shards: {failure}")
        meta = tables.read_json(shard_dir / shards.META_FILE)
    failed = {int(k): v for k, v in meta["failed"].items()}
    train_df, val_df = shards.read(shard_dir, "train"), shards.read(shard_dir, "val")  # memory-mapped
    # Row columns the loop reads, carried from the split table onto the shard rows.
    for col in ("sample_weight", PSEUDO_LABEL, PSEUDO_WEIGHT):
        if col in table:
            values = table.set_index(ROW_ID)[col]
            for df in (train_df, val_df):
                df[col] = values.reindex(df[ROW_ID]).to_numpy()
    if not len(train_df):
        raise InputError(f"train: no decodable rows with split == 'train' in the input ({len(table)} rows)")

    if src is not None:  # the pretrained model's own tokenizer and preprocessing
        model, tok, pre = src.model, src.tokenizer, src.pre
        model.train()
        tokenizer = f"the model's own ({cfg.tokenizer_path or cfg.model_path})"
    else:
        if tok is not None:
            tokenizer = str(cfg.tokenizer_path)
        elif cfg.vocab_size:
            tok, tokenizer = clip_model.train_tokenizer(train_df[TEXT].tolist(), cfg.vocab_size), "BPE trained on the train captions"
        else:
            tok, tokenizer = clip_model.clip_bpe_tokenizer(), "CLIP's BPE"
        torch.manual_seed(seed)
        model = clip_model.build_model(cfg.preset, vocab_size=tok.get_vocab_size(), image_size=cfg.image_size)
        if cfg.init in (None, "open_clip"):  # unset: open_clip's init
            clip_model.init_like_open_clip(model, seed=seed)
        if tok.get_vocab_size() > model.config.text_config.vocab_size:
            raise ConfigError(
                f"train.tokenizer_path: tokenizer has {tok.get_vocab_size()} tokens, more than the model's "
                f"{model.config.text_config.vocab_size}"
            )
        _lock(model, cfg)
        ctx_len = clip_model.context_length(model)
        clip_model.configure_tokenizer(tok, ctx_len)
        if cfg.tokenizer_path is not None:  # a given tokenizer's special tokens may sit at other ids than build_model's
            tc = model.config.text_config
            tc.pad_token_id, tc.bos_token_id = tok.token_to_id(clip_model.PAD), tok.token_to_id(clip_model.SOT)
            clip_model.align_pooling(model, tok, tok.token_to_id(clip_model.EOT), "train.tokenizer_path")
        if cfg.normalize == "dataset":
            mean, std = shards.mean_std(train_df["jpeg"].array)
        else:
            mean, std = list(clip_model.IMAGENET_MEAN), list(clip_model.IMAGENET_STD)
        pre = clip_model.Preprocess(image_size=image_size, mean=tuple(mean), std=tuple(std), context_length=ctx_len)
    if cfg.loss == "siglip":
        # SigLIP's init, a pretrained CLIP's temperature too (about 100 there: with the bias at -10 most
        # negatives would start as matches); a resumed run takes both from its checkpoint (fit).
        with torch.no_grad():
            model.logit_scale.fill_(SigLipLoss.INIT_SCALE)
    head = None
    if cfg.fusion != fusion.NONE:
        if world > 1:
            raise ConfigError(f"train.fusion: a matching head trains in one process for now; got train.gpus / "
                              f"a world of {world} processes")
        spec = fusion.FusionSpec.for_model(model, cfg.fusion, cfg.fusion_layers)
        prev = src.fusion if src is not None else None
        with torch.random.fork_rng(devices=[]):  # the head's init leaves the model's RNG stream alone
            torch.manual_seed(seed + 1)
            built = fusion.build(spec)
        if prev is not None and prev.spec == spec:  # fine-tuning a model with a head: start from it
            built.load_state_dict(prev.state_dict())
        head = Fusion(built, cfg.fusion_weight)
    if cfg.grad_checkpointing:
        model.activation_checkpointing_enable()
    # WiSE-FT mixes the fine-tuned weights with these (kept on the CPU).
    start = {k: v.detach().clone() for k, v in model.state_dict().items()} if cfg.wise_ft_alpha is not None else None
    groups = _image_ids(table, train_df)
    # Batch size and length from the data when the user left them unset; the resolved values go into
    # the fingerprint, the saved config and the stats, so that every output says what ran.
    n_images = len(np.unique(groups)) if cfg.unique_images and cfg.weighted_sampler is False else len(train_df)
    sched = auto_schedule(cfg, n_images, world)
    # A preset's init as it ran (unset = open_clip's), so that the saved config says it.
    auto_precision = cfg.precision == "auto"
    cfg = cfg.model_copy(update={**sched.update(), **({"init": cfg.init or "open_clip"} if src is None else {}),
                                 "precision": resolve_precision(cfg.precision, device)})
    if rank == 0:
        print(f"train: {sched.reason}; {cfg.precision}" + (" (auto)" if auto_precision else ""), flush=True)
        if cfg.precision == "bf16" and device == "cpu" and not cpu_has_bf16_matmul():
            print("train: warning: bf16 asked for on a CPU without bf16 matrix units (AMX): emulated, slower than "
                  "fp32; train.precision: auto picks fp32 here", flush=True)
    fp = _fingerprint(cfg, meta["key"], seed, world)
    if PSEUDO_WEIGHT in train_df:  # the weights change the math: a checkpoint of other weights is not resumed
        fp = tables.json_digest({"run": fp, "pair_weights": pair_weights(train_df).tolist()})
    match_groups = None
    if "split_group" in table.columns:  # the split's groups: one image's copies, near-duplicates, clusters
        match_groups = table.set_index(ROW_ID)["split_group"].astype(str).reindex(train_df[ROW_ID]).to_numpy(dtype=object)
    data = FitData(train_df, val_df, pre, fp, groups, match_groups)
    stats = fit(model, tok, data, cfg, out, seed=seed, device=device, progress=ctx.progress, interrupt_at=interrupt_at,
                head=head)

    model_dir = out / MODEL_DIR
    if rank == 0:
        m = unwrap(model)
        if cfg.grad_checkpointing:
            m.activation_checkpointing_disable()
        m.to("cpu")
        if start is not None:  # the raw fine-tuned weights stay in checkpoints/last.pt
            clip_model.wise_ft(m, start, cfg.wise_ft_alpha)
        if src is not None:
            src.save(m, model_dir)
        else:
            m.save_pretrained(model_dir)
            clip_model.save_tokenizer(tok, model_dir, pre.context_length)
            pre.save(model_dir)
        for f in (fusion.FUSION_CONFIG_FILE, fusion.FUSION_WEIGHTS_FILE):  # an earlier run's head must not pass for this one's
            (model_dir / f).unlink(missing_ok=True)
        if head is not None:
            fusion.save(head.head.to("cpu").eval(), model_dir)
        tables.write_json(cfg.model_dump(mode="json"), out / TRAIN_CONFIG_FILE)
    bad = table[ROW_ID].isin(list(failed))
    detail = table.loc[bad, ROW_ID].map(lambda r: failed.get(int(r), "")).astype(str)
    res = tables.partition(table, [("decode_failed", bad, detail)])
    stats.update(
        device=device if device == "cpu" else torch.cuda.get_device_name(),
        cpu_only=device == "cpu",
        note="trained on CPU: no GPU found" if device == "cpu" and cfg.device == "auto" else "",
        preset=cfg.preset if cfg.model_path is None else str(cfg.model_path),
        source="preset" if src is None else src.kind,
        n_params=int(sum(p.numel() for p in unwrap(model).parameters())),
        n_trainable=int(sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad)),
        wise_ft_alpha=cfg.wise_ft_alpha,
        n_train=int(len(train_df)),
        n_val=int(len(val_df)),
        image_size=image_size,
        augment=cfg.augment,
        tokenizer=tokenizer,
        vocab_size=int(tok.get_vocab_size()),
        init=cfg.init,
        loss=cfg.loss,
        precision=cfg.precision,
        batch_size=cfg.batch_size,
        length=f"{sched.amount} {sched.unit}",
        auto=list(sched.auto),
        schedule=sched.reason,
        model_dir=str(model_dir.relative_to(ctx.run_dir)) if model_dir.is_relative_to(ctx.run_dir) else str(model_dir),
    )
    if head is not None:
        stats.update(fusion=cfg.fusion, n_fusion_params=int(sum(p.numel() for p in head.head.parameters())))
    return StageResult(res.kept, res.quarantined, stats)


def _from_rank0(world: int, message: str) -> str:
    """Rank 0's ``message`` on every rank ('' for success); the other ranks wait here for it."""
    if world <= 1:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _model_image_size(preset: str) -> int:
    return int(clip_model.preset_config(preset)["vision_config"]["image_size"])


def _lock(model: nn.Module, cfg: TrainConfig) -> None:
    """Freeze the towers ``cfg`` locks; a setting that leaves nothing but the logit scale to train is an error."""
    if cfg.lock_image:
        clip_model.lock_tower(model, "image", cfg.lock_image_unlocked_layers)
    if cfg.lock_text:
        clip_model.lock_tower(model, "text", cfg.lock_text_unlocked_layers)
    if not any(p.requires_grad for n, p in model.named_parameters() if n != "logit_scale"):
        raise ConfigError("train.lock_image/lock_text freeze every parameter; unlock some layers or lock one tower")


def _image_ids(table: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """Each shard row's image: its content digest where the probe computed one, else its path."""
    t = table.set_index(ROW_ID)
    key = "path:" + t[tables.IMAGE].astype(str)
    if CONTENT_DIGEST in t.columns:
        d = t[CONTENT_DIGEST].astype("string")
        key = d.where(d.notna() & (d != ""), key).astype(str)
    return key.reindex(rows[ROW_ID]).fillna("").to_numpy(dtype=object)
