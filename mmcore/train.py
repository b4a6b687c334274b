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

REASONS = {
    "decode_failed": "the image could not be decoded into the training shards",
}


class TrainConfig(StrictModel):
    """Model, data, augmentation and loop settings; defaults train the tiny preset in ~2 min on 2 CPU cores."""

    preset: str = Field("tiny", min_length=1, description="Model preset: a stem of mmcore/model_configs/*.json.")
    model_path: Path | None = Field(None, description="A local save_pretrained CLIPModel folder instead of a preset.")
    tokenizer_path: Path | None = Field(None, description="A tokenizer.json (or its folder); default: trained on captions.")
    vocab_size: int = Field(2048, ge=300, description="BPE vocabulary size of a tokenizer trained on the captions.")
    image_size: int | None = Field(None, ge=16, description="Training resolution; default: the preset's.")
    batch_size: int = Field(64, ge=2, description="Global batch (split across DDP ranks).")
    epochs: int | None = Field(None, ge=1, description="Length in epochs (exactly one of epochs, steps, minutes).")
    steps: int | None = Field(None, ge=1, description="Length in optimizer steps.")
    minutes: float | None = Field(None, gt=0, description="Wall-clock budget; the run ends with a checkpoint.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay on weight matrices (not biases, norms, scale).")
    beta2: float = Field(0.98, gt=0, lt=1, description="AdamW beta2 (CLIP uses 0.98).")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps before the cosine decay.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (each is a batch_size contrast).")
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm; null = no clipping.")
    augment: str = Field("light", description="Augmentation scheme: a name registered in mmcore.augment.SCHEMES.")
    synonyms: Path | None = Field(None, description="YAML word -> [synonyms] for augment=synonym; default mmcore/data/synonyms.yaml.")
    normalize: Literal["imagenet", "dataset"] = Field("imagenet", description="Mean/std: ImageNet or the train split's.")
    weighted_sampler: bool = Field(False, description="Sample train rows by split's sample_weight (with replacement).")
    checkpoint_every: int = Field(200, ge=1, description="Optimizer steps between atomic checkpoints.")
    compile: bool = Field(False, description="torch.compile the model.")
    grad_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes.")
    val_every_epoch: bool = Field(True, description="Val image-to-text R@5 at the end of each epoch.")
    val_max_rows: int = Field(2000, ge=10, description="Val rows used for the per-epoch retrieval score.")
    resume: bool = Field(True, description="Continue from train/checkpoints/last.pt when it matches this run.")

    @field_validator("augment")
    @classmethod
    def _known_augment(cls, v: str) -> str:
        SCHEMES.check(v)  # no location: the config error leads with train.augment
        return v

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        set_ = [k for k in ("epochs", "steps", "minutes") if getattr(self, k) is not None]
        if len(set_) > 1:
            raise ValueError(f"set exactly one of epochs, steps, minutes; got {', '.join(set_)}")
        return self

    @property
    def length(self) -> tuple[str, float]:
        """(unit, amount): the default is 8 epochs, ~2 minutes for the 3000-pair demo on 2 idle cores."""
        for k in ("epochs", "steps", "minutes"):
            if getattr(self, k) is not None:
                return k, getattr(self, k)
        return "epochs", 8


def run(table: pd.DataFrame, cfg: TrainConfig, ctx: StageContext) -> StageResult:
    """Build shards, train, save ``train/model``; kept = rows with a decodable image."""
    from mmcore import trainloop

    return trainloop.run_stage(table, cfg, ctx)
