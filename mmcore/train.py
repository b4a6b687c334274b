"""Train: a CLIP dual encoder on the split's train rows, with val retrieval each epoch.

This module holds the config and the stage's ``run``; torch lives in the friend modules
(``clip_model``, ``shards``, ``augment``, ``trainloop``) so that loading a config stays light.
``mmpipe train RUN_DIR`` (also under ``torchrun ... -m mmpipe train``) trains from the run's
config and its split stage's kept table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import Field, field_validator, model_validator

from mmcore.augment import SCHEMES
from mmcore.base import StageContext, StrictModel
from mmcore.tables import StageResult

STAGE = "train"

# Defaults that change when training starts from a pretrained model (train.model_path): a learning
# rate small enough not to wash out what it knows, and a warmup that scales with the run
# (open_clip and transformers' run_clip fine-tune CLIP at 1e-5 .. 5e-5 with ~10% warmup).
FINETUNE_DEFAULTS = {"lr": 1e-5, "warmup_fraction": 0.1}

REASONS = {
    "decode_failed": "the image could not be decoded into the training shards",
}


class TrainConfig(StrictModel):
    """Model, data, augmentation and loop settings; defaults train the tiny preset in ~2 min on 2 CPU cores."""

    preset: str = Field("tiny", min_length=1, description="Model preset: a stem of mmcore/model_configs/*.json.")
    model_path: Path | None = Field(
        None, description="Fine-tune this local CLIP folder (Hugging Face layout, or a model mmpipe trained) instead of a preset."
    )
    tokenizer_path: Path | None = Field(
        None, description="A tokenizer folder or tokenizer.json; default: model_path's own, else CLIP's BPE (see vocab_size)."
    )
    vocab_size: int | None = Field(
        None, ge=300, description="Train a BPE tokenizer of this many tokens on the captions; default: CLIP's BPE "
        "(49,410 tokens with mmpipe's 4 special ones, as open_clip; measured better on real captions); not with model_path."
    )
    init: Literal["open_clip", "transformers"] | None = Field(
        None, description="Weight init of a preset model: open_clip's CLIP (the default; measured better on real data) "
        "or transformers' CLIPModel; not with model_path."
    )
    image_size: int | None = Field(None, ge=16, description="Training resolution; default: the preset's (model_path: its own, only).")
    batch_size: int | None = Field(
        None, ge=2, description="Global batch (split across DDP ranks); none: ~1 per 100 train images, 64 to 256 "
        "(fine-tuning: 64)."
    )
    epochs: int | None = Field(
        None, ge=1, description="Length in epochs (at most one of epochs, steps, minutes); none set: 8 epochs, "
        "at least 250 steps."
    )
    steps: int | None = Field(None, ge=1, description="Length in optimizer steps.")
    minutes: float | None = Field(None, gt=0, description="Wall-clock budget; the run ends with a checkpoint.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW); default 1e-3, with model_path 1e-5.")
    projection_lr: float | None = Field(
        None, gt=0, description="Peak learning rate of the two projections and the logit scale; default: lr."
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay on weight matrices (not biases, norms, scale).")
    beta2: float = Field(0.98, gt=0, lt=1, description="AdamW beta2 (CLIP uses 0.98).")
    warmup_steps: int | None = Field(20, ge=0, description="Linear warmup steps before the cosine decay.")
    warmup_fraction: float | None = Field(
        None, ge=0, lt=1, description="Warmup as a share of the run instead of warmup_steps; default 0.1 with model_path."
    )
    lock_image: bool = Field(False, description="Freeze the image tower and its projection (LiT).")
    lock_image_unlocked_layers: int = Field(0, ge=0, description="With lock_image: its last N blocks (+ final norm, projection) train.")
    lock_text: bool = Field(False, description="Freeze the text tower and its projection.")
    lock_text_unlocked_layers: int = Field(0, ge=0, description="With lock_text: its last N blocks (+ final norm, projection) train.")
    wise_ft_alpha: float | None = Field(
        None, ge=0, le=1, description="WiSE-FT: save (1 - alpha) * model_path's weights + alpha * fine-tuned ones."
    )
    unique_images: bool = Field(
        True, description="An epoch shows each image once, with one of its captions: no image twice in a batch."
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (each is a batch_size contrast).")
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm; null = no clipping.")
    augment: str = Field("light", description="Augmentation scheme: a name registered in mmcore.augment.SCHEMES.")
    synonyms: Path | None = Field(None, description="YAML word -> [synonyms] for augment=synonym; default mmcore/data/synonyms.yaml.")
    normalize: Literal["imagenet", "dataset"] | None = Field(
        None, description="Mean/std: ImageNet (the default) or the train split's; model_path: always its own."
    )
    weighted_sampler: bool = Field(False, description="Sample train rows by split's sample_weight (with replacement).")
    checkpoint_every: int = Field(200, ge=1, description="Optimizer steps between atomic checkpoints.")
    compile: bool = Field(False, description="torch.compile the model.")
    grad_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus: int = Field(1, ge=1, le=1024, description="Training processes (DDP: one per GPU; gloo processes on CPU). Above 1 "
                      "the train task launches torchrun itself, so a scheduled run trains on every GPU of its worker.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes.")
    val_every_epoch: bool = Field(True, description="Val image-to-text R@5 at the end of each epoch.")
    val_max_rows: int = Field(2000, ge=10, description="Val rows used for the per-epoch retrieval score.")
    resume: bool = Field(True, description="Continue from train/checkpoints/last.pt when it matches this run.")
    seed: int | None = Field(
        None, ge=0, description="Seed of initialisation, order and augmentation; default: the run's seed (so "
        "training seeds vary while the curation stages stay cached)."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Matmul precision while training: bf16 autocast (weights, optimizer and loss stay fp32) "
        "or fp32; auto: bf16 on a GPU and on a CPU with bf16 matrix units (Intel AMX), else fp32."
    )
    loss: Literal["clip", "siglip"] = Field(
        "clip", description="Contrastive loss: clip (softmax over the batch, both directions) or siglip (a sigmoid "
        "per pair with a learnt bias; Zhai et al. 2023; behind clip at batch 64 on OpenMoji, bench/results/realdata.md)."
    )
    fusion: str = Field(
        "none", description="Image-text matching head trained with the contrastive loss on in-batch hard negatives "
        "(ALBEF/BLIP ITM): none, cross_attention (caption tokens attend to image patches) or concat (an MLP on the "
        "two embeddings); saved with the model, scored by evaluate."
    )
    fusion_weight: float = Field(1.0, gt=0, description="With fusion: weight of the matching loss next to the contrastive loss.")
    fusion_layers: int = Field(1, ge=1, le=12, description="With fusion cross_attention: fusion layers at the text width.")

    @field_validator("fusion")
    @classmethod
    def _known_fusion(cls, v: str) -> str:
        if v != "none":
            from mmcore.fusion import HEADS  # torch: only when a head is asked for

            if (msg := HEADS.problem(v)) is not None:
                raise ValueError(f"{msg} or none")
        return v

    @field_validator("augment")
    @classmethod
    def _known_augment(cls, v: str) -> str:
        SCHEMES.check(v)  # no location: the config error leads with train.augment
        return v

    @model_validator(mode="before")
    @classmethod
    def _finetune_defaults(cls, data):
        """From a pretrained model the defaults are fine-tuning ones (``FINETUNE_DEFAULTS``); they go
        into the resolved config, so the saved config says what ran."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("model_path") is not None:
            data.setdefault("lr", FINETUNE_DEFAULTS["lr"])
            if "warmup_steps" not in data and "warmup_fraction" not in data:
                data["warmup_fraction"] = FINETUNE_DEFAULTS["warmup_fraction"]
        if data.get("warmup_fraction") is not None and "warmup_steps" not in data:
            data["warmup_steps"] = None  # the fraction replaces the default step count
        return data

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        set_ = [k for k in ("epochs", "steps", "minutes") if getattr(self, k) is not None]
        if len(set_) > 1:
            raise ValueError(f"set exactly one of epochs, steps, minutes; got {', '.join(set_)}")
        return self

    @model_validator(mode="after")
    def _fusion_one_process(self) -> TrainConfig:
        # Checked again in trainloop (the world size); here so the run fails at load, not after curation.
        if self.fusion != "none" and self.gpus > 1:
            raise ValueError(f"fusion {self.fusion!r} trains its matching head in one process for now; "
                             f"set gpus: 1 or fusion: none, got gpus {self.gpus}")
        return self

    @model_validator(mode="after")
    def _finetune(self) -> TrainConfig:
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise ValueError(f"set warmup_steps or warmup_fraction, not both; got {self.warmup_steps} and {self.warmup_fraction}")
        if self.model_path is not None:
            if self.vocab_size is not None:
                raise ValueError("vocab_size trains a new tokenizer, but a pretrained model (model_path) keeps its own; "
                                 "remove vocab_size")
            if self.init is not None:
                raise ValueError(f"init: a pretrained model (model_path) starts from its own weights, got {self.init!r}; "
                                 "remove init")
            if self.normalize is not None:
                raise ValueError(f"normalize: a pretrained model (model_path) uses its own mean and std, got {self.normalize!r}")
        elif self.wise_ft_alpha is not None:
            raise ValueError("wise_ft_alpha ensembles with the starting weights; it needs model_path")
        if self.lock_image and self.lock_text and not (self.lock_image_unlocked_layers or self.lock_text_unlocked_layers):
            raise ValueError("lock_image and lock_text with no unlocked layers freeze every parameter; "
                             "unlock some layers or lock one tower")
        return self

    @property
    def length(self) -> tuple[str, float]:
        """(unit, amount) as set; unset, 8 epochs here, and ``trainloop.auto_schedule`` sets the run's length."""
        for k in ("epochs", "steps", "minutes"):
            if getattr(self, k) is not None:
                return k, getattr(self, k)
        return "epochs", 8


def run(table: pd.DataFrame, cfg: TrainConfig, ctx: StageContext) -> StageResult:
    """Build shards, train, save ``train/model``; kept = rows with a decodable image."""
    from mmcore import trainloop

    return trainloop.run_stage(table, cfg, ctx)
