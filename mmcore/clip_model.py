"""The CLIP dual encoder: model presets, the caption tokenizer, preprocessing and ``Encoder``.

Presets are ``mmcore/model_configs/<name>.json`` (``CLIPConfig`` keyword arguments), registered by file
stem like open_clip's ``model_configs``. A trained model folder holds what ``save_pretrained``
writes, ``tokenizer.json`` and ``preprocess.json``, so ``CLIPModel.from_pretrained`` loads it and
``Encoder.load`` embeds images and captions exactly as training saw them. Nothing is downloaded.
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

PREPROCESS_FILE = "preprocess.json"
TOKENIZER_FILE = "tokenizer.json"
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


def build_model(preset_or_path: str | os.PathLike, vocab_size: int = 2048, image_size: int | None = None) -> CLIPModel:
    """A randomly initialised ``CLIPModel`` from a preset name, or a saved one from a local folder.

    ``image_size`` overrides a preset's resolution (its position embeddings follow).
    """
    p = Path(preset_or_path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InputError(f"train.model_path: {p} has no config.json; expected a save_pretrained CLIPModel folder")
        quiet_transformers()
        return CLIPModel.from_pretrained(p, local_files_only=True)
    cfg = preset_config(str(preset_or_path))
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


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """Eval image preprocessing, saved as ``preprocess.json`` with the model."""

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    context_length: int = 77
    resize: str = "shortest_side_bicubic_then_center_crop"

    def save(self, model_dir: Path) -> None:
        from mmcore.tables import write_json

        write_json(asdict(self), model_dir / PREPROCESS_FILE)

    @classmethod
    def load(cls, model_dir: Path) -> Preprocess:
        d = json.loads((Path(model_dir) / PREPROCESS_FILE).read_text())
        return cls(
            image_size=int(d["image_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            context_length=int(d["context_length"]),
            resize=d.get("resize", cls.resize),
        )


def to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    """HWC uint8 PIL image -> normalised CHW float32 tensor."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


# --------------------------------------------------------------------------- encoder


def _normalise(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32)


class Encoder:
    """A trained model folder, ready to embed images and captions (rows L2-normalised)."""

    def __init__(self, model: CLIPModel, tokenizer: Tokenizer, pre: Preprocess, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = configure_tokenizer(tokenizer, pre.context_length)
        self.pre = pre
        self.device = device
        self.image_size = pre.image_size

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str = "cpu") -> Encoder:
        d = Path(model_dir)
        for f in ("config.json", TOKENIZER_FILE, PREPROCESS_FILE):
            if not (d / f).is_file():
                raise InputError(f"model folder {d} lacks {f}; expected the output of the train stage")
        quiet_transformers()
        model = CLIPModel.from_pretrained(d, local_files_only=True)
        return cls(model, load_tokenizer(d), Preprocess.load(d), device)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image], batch_size: int = 256) -> np.ndarray:
        out = [np.zeros((0, self.model.config.projection_dim), np.float32)]
        for i in range(0, len(images), batch_size):
            x = torch.stack(
                [to_tensor(resize_center_crop(im.convert("RGB"), self.image_size), self.pre.mean, self.pre.std)
                 for im in images[i : i + batch_size]]
            )
            out.append(_normalise(self.model.get_image_features(pixel_values=x.to(self.device)).pooler_output))
        return np.concatenate(out)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = [np.zeros((0, self.model.config.projection_dim), np.float32)]
        for i in range(0, len(texts), batch_size):
            ids = tokenize(self.tokenizer, texts[i : i + batch_size]).to(self.device)
            out.append(_normalise(self.model.get_text_features(input_ids=ids).pooler_output))
        return np.concatenate(out)
