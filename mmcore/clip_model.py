"""The CLIP dual encoder: presets, the caption tokenizer, preprocessing, the one model loader, ``Encoder``.

Presets are ``mmcore/model_configs/<name>.json`` (``CLIPConfig`` keyword arguments), registered by file
stem like open_clip's ``model_configs``. ``load`` is the only way a model folder is read (train,
evaluate, the quality alignment score): a folder mmpipe trained from a preset (``save_pretrained``
files, mmpipe's tokenizer and ``preprocess.json``), or any local Hugging Face CLIP folder in
OpenAI's layout (weights, tokenizer files, ``preprocessor_config.json``), which keeps its own
tokenizer (``AutoTokenizer``) and image processor (``AutoImageProcessor``: resize, crop, mean, std).
A model fine-tuned from one is saved with those same files, so ``CLIPModel``/``AutoProcessor`` and
``Encoder.load`` embed alike. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import CLIPConfig, CLIPModel

from mmcore.resources import MODEL_CONFIGS
from mmcore.errors import ConfigError, InputError
from mmcore.shards import resize_center_crop  # noqa: F401  (re-exported: the eval preprocessing)

PREPROCESS_FILE = "preprocess.json"  # mmpipe's eval preprocessing, for a model trained from a preset
TOKENIZER_FILE = "tokenizer.json"
MODEL_CONFIG_FILE = "config.json"  # Hugging Face's names, fixed by transformers
PROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MODEL_TYPES = ("clip",)  # config.json model_type values load() accepts
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Special tokens. EOS must not be id 2: transformers' CLIP then pools at argmax(input_ids) (legacy).
PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<start_of_text>", "<end_of_text>"
SPECIALS = (PAD, UNK, SOT, EOT)
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100)


# --------------------------------------------------------------------------- presets


def quiet_transformers() -> None:
    """No per-file progress bars from transformers' save/load (the train bar is the one that counts)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def list_presets() -> list[str]:
    """Names of the model presets (stems of ``mmcore/model_configs/*.json``)."""
    return sorted(p.stem for p in MODEL_CONFIGS.glob("*.json"))


def preset_config(name: str) -> dict:
    """A preset's ``CLIPConfig`` keyword arguments; an unknown name is a one-line ``ConfigError``."""
    path = MODEL_CONFIGS / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"train.preset: unknown model preset {name!r}; expected one of {', '.join(list_presets())}")
    cfg = json.loads(path.read_text())
    cfg.pop("description", None)
    return cfg


def build_model(preset: str, vocab_size: int = 2048, image_size: int | None = None) -> CLIPModel:
    """A randomly initialised ``CLIPModel`` from a preset name (a saved model: ``load``).

    ``image_size`` overrides a preset's resolution (its position embeddings follow).
    """
    cfg = preset_config(str(preset))
    text, vision = dict(cfg["text_config"]), dict(cfg["vision_config"])
    if image_size is not None:
        vision["image_size"] = image_size
    ids = {t: i for i, t in enumerate(SPECIALS)}
    text.update(vocab_size=vocab_size, pad_token_id=ids[PAD], bos_token_id=ids[SOT], eos_token_id=ids[EOT])
    config = CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=cfg["projection_dim"],
        logit_scale_init_value=LOGIT_SCALE_INIT,
    )
    return CLIPModel(config)


def context_length(model: CLIPModel) -> int:
    return int(model.config.text_config.max_position_embeddings)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
    """A lower-cased byte-level BPE tokenizer trained on the captions (offline, deterministic)."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from ``tokenizer.json`` or a folder holding one."""
    p = Path(path)
    f = p / TOKENIZER_FILE if p.is_dir() else p
    if not f.is_file():
        raise InputError(f"tokenizer not found: {f}; expected a tokenizers tokenizer.json")
    return Tokenizer.from_file(str(f))


def configure_tokenizer(tok: Tokenizer, ctx_len: int) -> Tokenizer:
    """Wrap captions in start/end tokens, truncate and pad to the model's context length."""
    sot, eot, pad = tok.token_to_id(SOT), tok.token_to_id(EOT), tok.token_to_id(PAD)
    if None in (sot, eot, pad):
        raise InputError(f"tokenizer lacks the special tokens {', '.join(SPECIALS)}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, sot), (EOT, eot)]
    )
    tok.enable_truncation(max_length=ctx_len)
    tok.enable_padding(length=ctx_len, pad_id=pad, pad_token=PAD)
    return tok


def tokenize(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids, shape (n, context_length); a truncated caption still ends with its end token."""
    enc = tok.encode_batch(list(texts))
    return torch.tensor([e.ids for e in enc], dtype=torch.long)


def save_tokenizer(tok: Tokenizer, model_dir: Path, ctx_len: int) -> None:
    """``tokenizer.json`` plus the transformers files, so ``AutoTokenizer`` loads it too."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=SOT, eos_token=EOT, model_max_length=ctx_len
    )
    fast.save_pretrained(model_dir)
    # save_pretrained may drop padding/truncation; write the exact tokenizer last.
    tok.save(str(model_dir / TOKENIZER_FILE))


