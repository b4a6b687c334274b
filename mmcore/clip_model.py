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
from torch import nn
from transformers import CLIPConfig, CLIPModel

from mmcore import fusion
from mmcore.errors import ConfigError, InputError
from mmcore.resources import MODEL_CONFIGS
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


@torch.no_grad()
def init_like_open_clip(model: CLIPModel, seed: int | None = None) -> CLIPModel:
    """Re-initialise a fresh ``CLIPModel`` as open_clip initialises its ``CLIP`` (in place).

    transformers' CLIP init swaps the attention's two scales (q/k/v get the small residual-branch
    std, the output projection the large one) and starts the image tower's embeddings at 0.02;
    open_clip's text tower uses the scales the other way round, and its image tower PyTorch's
    defaults (its ``init_parameters`` is a stub) with class and position embeddings at width**-0.5.

    With ``seed``, the token embedding is drawn from its own generator and every other tensor from
    the global one re-seeded with ``seed``: two tokenizers (vocabularies of any size) then start
    from the same towers, so comparing them is not also comparing initialisations.
    """
    if seed is not None:
        torch.manual_seed(seed)
    def linear_default(m: nn.Linear) -> None:  # nn.Linear's own init (kaiming uniform, a=sqrt(5))
        m.reset_parameters()

    t = model.text_model
    w, n = t.config.hidden_size, t.config.num_hidden_layers
    proj_std, attn_std, fc_std = w**-0.5 * (2 * n) ** -0.5, w**-0.5, (2 * w) ** -0.5
    # The table's own stream: a SeedSequence of (seed, a tag), apart from the loop's (seed, epoch) streams.
    tokens = None if seed is None else torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, 0x70CE]).generate_state(1, np.uint64)[0] >> 1))
    nn.init.normal_(t.embeddings.token_embedding.weight, std=0.02, generator=tokens)
    nn.init.normal_(t.embeddings.position_embedding.weight, std=0.01)
    for layer in t.encoder.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            nn.init.normal_(lin.weight, std=attn_std)
        nn.init.normal_(layer.self_attn.out_proj.weight, std=proj_std)
        nn.init.normal_(layer.mlp.fc1.weight, std=fc_std)
        nn.init.normal_(layer.mlp.fc2.weight, std=proj_std)
    nn.init.normal_(model.text_projection.weight, std=w**-0.5)

    v = model.vision_model
    vw = v.config.hidden_size
    nn.init.normal_(v.embeddings.class_embedding, std=vw**-0.5)
    nn.init.normal_(v.embeddings.position_embedding.weight, std=vw**-0.5)
    v.embeddings.patch_embedding.reset_parameters()
    for layer in v.encoder.layers:
        a = layer.self_attn
        # nn.MultiheadAttention: xavier-uniform over the packed (3w, w) q/k/v matrix, zero biases.
        qkv = torch.empty(3 * vw, vw)
        nn.init.xavier_uniform_(qkv)
        for lin, part in zip((a.q_proj, a.k_proj, a.v_proj), qkv.chunk(3)):
            lin.weight.copy_(part)
            nn.init.zeros_(lin.bias)
        linear_default(a.out_proj)
        nn.init.zeros_(a.out_proj.bias)
        linear_default(layer.mlp.fc1)
        linear_default(layer.mlp.fc2)
    nn.init.normal_(model.visual_projection.weight, std=vw**-0.5)
    return model


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


def clip_bpe_tokenizer() -> Tokenizer:
    """CLIP's BPE (OpenAI's vocabulary and merges, splitting text as transformers' ``CLIPTokenizerFast``;
    open_clip runs ftfy and HTML unescaping first), after mmpipe's four special tokens (ids 0-3, where
    a preset model pools): 49,410 tokens.

    The default of a preset model (``train.vocab_size`` unset). On OpenMoji val (bench_realdata, 250
    steps, 2 seeds) it gave R@1 +3 to +5 and R@5 +5 to +7 points over a 2,048-token BPE trained on
    the captions; on the synthetic demo data the two were level (4 seeds). See
    bench/results/realdata.md (third round).
    """
    import gzip

    from tokenizers import Regex

    from mmcore.resources import CLIP_BPE

    with gzip.open(CLIP_BPE) as f:
        lines = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in lines]
    byte = sorted(pre_tokenizers.ByteLevel.alphabet())  # CLIP's bytes_to_unicode order (by code point)
    words = [*byte, *[b + "</w>" for b in byte], *["".join(m) for m in merges]]
    vocab = {t: i for i, t in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                               fuse_unk=False, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
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

SHORT_SIDE_THEN_CROP = "shortest_side_bicubic_then_center_crop"
SQUARE = "square_bicubic"  # resize straight to image_size x image_size (processors without a centre crop)


@dataclass(frozen=True)
class Preprocess:
    """Eval image preprocessing: ``preprocess.json`` for a preset-trained model, else the folder's
    ``preprocessor_config.json`` read into the same fields."""

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    context_length: int = 77
    resize: str = SHORT_SIDE_THEN_CROP
    resize_size: int | None = None  # short side before the centre crop (CLIP's 224 -> 224); None = image_size

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
            resize=d.get("resize", SHORT_SIDE_THEN_CROP),
            resize_size=d.get("resize_size"),
        )

    @classmethod
    def from_processor(cls, proc, context_length: int, where: str) -> Preprocess:
        """The fields of a Hugging Face image processor (``size``, ``crop_size``, mean, std)."""
        size, crop = dict(proc.size or {}), dict(getattr(proc, "crop_size", None) or {})
        do_crop = bool(getattr(proc, "do_center_crop", False)) and bool(crop)
        if do_crop and crop.get("height") != crop.get("width"):
            raise InputError(f"{where}: only square crops are supported, got crop_size {crop}")
        if getattr(proc, "do_rescale", True) and not math.isclose(float(getattr(proc, "rescale_factor", 1 / 255)), 1 / 255):
            raise InputError(f"{where}: rescale_factor must be 1/255, got {proc.rescale_factor}")
        if "shortest_edge" in size:
            short = int(size["shortest_edge"])
            side, resize, resize_size = (int(crop["height"]) if do_crop else short), SHORT_SIDE_THEN_CROP, short
        elif size.get("height") and size.get("height") == size.get("width"):
            side, resize, resize_size = int(size["height"]), SQUARE, None
            if do_crop and int(crop["height"]) != side:
                raise InputError(f"{where}: a resize to {size} followed by a crop to {crop} is not supported")
        else:
            raise InputError(f"{where}: unsupported image processor size {size}; expected shortest_edge or a square")
        normalize = getattr(proc, "do_normalize", True)
        mean = tuple(float(x) for x in proc.image_mean) if normalize else (0.0, 0.0, 0.0)
        std = tuple(float(x) for x in proc.image_std) if normalize else (1.0, 1.0, 1.0)
        return cls(side, mean, std, context_length, resize, None if resize_size == side else resize_size)

    def image(self, img: Image.Image) -> Image.Image:
        """The model's input image (RGB, image_size x image_size) before normalisation."""
        img = img.convert("RGB")
        if self.resize == SQUARE:
            s = self.image_size
            return img if img.size == (s, s) else img.resize((s, s), Image.Resampling.BICUBIC)
        if self.resize_size is None:
            return resize_center_crop(img, self.image_size)
        w, h = img.size
        r = self.resize_size / min(w, h)
        img = img.resize((max(self.resize_size, round(w * r)), max(self.resize_size, round(h * r))), Image.Resampling.BICUBIC)
        return resize_center_crop(img, self.image_size)


def to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    """HWC uint8 PIL image -> normalised CHW float32 tensor."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


# --------------------------------------------------------------------------- the loader


@dataclass
class Loaded:
    """A model folder, loaded: the model, its configured tokenizer and preprocessing, and (for a
    Hugging Face folder) the tokenizer and image processor objects a fine-tuned copy is saved with."""

    path: Path
    model: CLIPModel
    tokenizer: Tokenizer  # start/end tokens, truncated and padded to the model's context length
    pre: Preprocess
    hf_tokenizer: object  # transformers tokenizer (saved with a fine-tuned copy)
    image_processor: object | None  # transformers image processor; None for a preset-trained folder
    fusion: nn.Module | None = None  # the image-text matching head saved with the model (mmcore.fusion)

    @property
    def kind(self) -> str:
        return "mmpipe" if self.image_processor is None else "huggingface"

    def save(self, model: CLIPModel, out: Path) -> None:
        """``model`` (fine-tuned from this one) saved with this folder's tokenizer and preprocessing."""
        model.save_pretrained(out)
        self.hf_tokenizer.save_pretrained(out)
        if self.image_processor is None:
            self.pre.save(out)
        else:
            self.image_processor.save_pretrained(out)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """Normalised model input, as ``Encoder.pixels``."""
        return _pixels(images, self.pre, self.image_processor)

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        return tokenize(self.tokenizer, texts)


def _read_config(p: Path, where: str) -> dict:
    f = p / MODEL_CONFIG_FILE
    if not p.is_dir() or not f.is_file():
        what = "does not exist" if not p.exists() else "has no config.json" if p.is_dir() else "is a file"
        raise InputError(f"{where}: {p} {what}; expected a Hugging Face CLIP model folder (save_pretrained) "
                         "or a model mmpipe trained")
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{where}: {f} is not valid JSON: {str(e).splitlines()[0][:120]}") from None
    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    if mt not in MODEL_TYPES:
        raise InputError(f"{where}: {p} is not a CLIP-family model: config.json has model_type {mt!r}; "
                         f"expected one of {', '.join(MODEL_TYPES)}")
    return cfg


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or {}


def load_hf_tokenizer(path: Path, where: str):
    """A tokenizer folder (or one ``tokenizer.json``) through ``AutoTokenizer``; one-line errors."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    quiet_transformers()
    try:
        if path.is_file():  # a bare tokenizer.json: mmpipe's special tokens name its start, end and padding
            specials = dict(zip(("pad_token", "unk_token", "bos_token", "eos_token"), SPECIALS))
            return PreTrainedTokenizerFast(tokenizer_file=str(path), **specials)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # no tokenizer files, a broken tokenizer.json: the user's folder, one line
        raise InputError(f"{where}: cannot load a tokenizer from {path}: {str(e).strip().splitlines()[0][:160]}") from None


def configure_hf_tokenizer(hf, ctx_len: int, where: str) -> Tokenizer:
    """The Rust tokenizer behind ``hf``, truncating and padding to ``ctx_len`` as ``hf(..., padding=
    "max_length", truncation=True)`` does; its post-processor adds the start and end tokens."""
    if not getattr(hf, "is_fast", False):
        raise InputError(f"{where}: tokenizer {type(hf).__name__} has no tokenizer.json (fast tokenizer); save it with a fast tokenizer")
    eos = hf.eos_token_id
    if eos is None:
        raise InputError(f"{where}: the tokenizer has no end token (eos_token); CLIP pools the text at it")
    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    pad_id = hf.pad_token_id if hf.pad_token_id is not None else eos
    tok.enable_truncation(max_length=ctx_len)
    tok.enable_padding(length=ctx_len, pad_id=pad_id, pad_token=hf.convert_ids_to_tokens(pad_id))
    return tok


def _check_vocab(tok: Tokenizer, vocab_size: int, where: str) -> None:
    n = tok.get_vocab_size(with_added_tokens=True)
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    if max(n, top + 1) > vocab_size:
        raise InputError(f"{where}: the tokenizer has {max(n, top + 1)} token ids but the model's text tower "
                         f"has {vocab_size}; use the model's own tokenizer")


def align_pooling(model: CLIPModel, tok: Tokenizer, eos_id: int, where: str) -> None:
    """Make transformers pool the text at the caption's end token.

    transformers' CLIP pools at ``argmax(input_ids)`` when the config's ``eos_token_id`` is 2 (as
    OpenAI's configs have it): right when the end token has the largest id (OpenAI's BPE), wrong for
    any other tokenizer. Otherwise it pools at the first ``eos_token_id``, which must be the
    tokenizer's. A mismatch is fixed in the config (and so in a saved copy).
    """
    tc = model.config.text_config
    top = max(tok.get_vocab(with_added_tokens=True).values())
    emitted = eos_id in tokenize(tok, ["a"])[0].tolist()
    if tc.eos_token_id == 2:
        if eos_id == top or not emitted:
            return
        if eos_id == 2:  # transformers cannot express "first id 2" when 2 is not the largest id
            raise InputError(f"{where}: the tokenizer's end token has id 2 but is not its largest id; "
                             "transformers' CLIP would pool the text at the largest id")
    elif tc.eos_token_id == eos_id:
        return
    tc.eos_token_id = eos_id
    model.text_model.eos_token_id = eos_id


def check(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None, where: str = "model") -> dict:
    """The cheap checks of ``load`` (files, model type, tokenizer fit), without the weights; the config."""
    p = Path(path)
    cfg = _read_config(p, where)
    if not (p / PREPROCESS_FILE).is_file() and not (p / PROCESSOR_FILE).is_file():
        raise InputError(f"{where}: {p} lacks {PROCESSOR_FILE}: a Hugging Face model's image preprocessing "
                         "(size, crop, mean, std) comes from it; save it with AutoProcessor.save_pretrained")
    ctx_len = int(_text_config(cfg).get("max_position_embeddings", 77))
    hf = load_hf_tokenizer(Path(tokenizer_path) if tokenizer_path is not None else p,
                           f"{where} tokenizer" if tokenizer_path is None else "train.tokenizer_path")
    tok = configure_hf_tokenizer(hf, ctx_len, where)
    _check_vocab(tok, int(_text_config(cfg).get("vocab_size", 49408)), where if tokenizer_path is None else "train.tokenizer_path")
    return cfg


def load(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None, where: str = "model") -> Loaded:
    """A model folder (preset-trained by mmpipe, or Hugging Face CLIP) with its own tokenizer and preprocessing.

    Args:
        tokenizer_path: another tokenizer folder (``AutoTokenizer``) or ``tokenizer.json``; its
            vocabulary must fit the model.
        where: what the error messages name (``train.model_path``, ``evaluate.baseline_model``).
    """
    p = Path(path)
    check(p, tokenizer_path, where)
    quiet_transformers()
    try:
        # fp32 whatever the file stores: training keeps fp32 weights (autocast does the bf16 products)
        model = CLIPModel.from_pretrained(p, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # missing or mismatched weights: one line, not transformers' traceback
        raise InputError(f"{where}: cannot load the CLIP weights in {p}: {str(e).strip().splitlines()[0][:200]}") from None
    ctx_len = context_length(model)
    tp = Path(tokenizer_path) if tokenizer_path is not None else p
    hf = load_hf_tokenizer(tp, where)
    tok = configure_hf_tokenizer(hf, ctx_len, where)
    processor = None
    if (p / PREPROCESS_FILE).is_file():
        pre = Preprocess.load(p)
    else:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(p, local_files_only=True)
        except Exception as e:
            raise InputError(f"{where}: cannot load {PROCESSOR_FILE} in {p}: {str(e).strip().splitlines()[0][:160]}") from None
        pre = Preprocess.from_processor(processor, ctx_len, where)
        if pre.image_size != model.config.vision_config.image_size:
            raise InputError(f"{where}: {PROCESSOR_FILE} crops to {pre.image_size} px but the vision tower takes "
                             f"{model.config.vision_config.image_size} px")
    align_pooling(model, tok, hf.eos_token_id, where)
    return Loaded(p, model.eval(), tok, pre, hf, processor, fusion.load(p, where))


# --------------------------------------------------------------------------- fine-tuning helpers


def _tower(model: CLIPModel, tower: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(encoder root, final norm, projection) of the "image" or "text" tower."""
    if tower == "image":
        return model.vision_model, model.vision_model.post_layernorm, model.visual_projection
    return model.text_model, model.text_model.final_layer_norm, model.text_projection


def lock_tower(model: CLIPModel, tower: str, unlocked_layers: int = 0) -> None:
    """Freeze a tower with its projection (LiT), all but its last ``unlocked_layers`` blocks, which
    stay trainable together with the tower's final norm and projection."""
    root, norm, proj = _tower(model, tower)
    for p in [*root.parameters(), *proj.parameters()]:
        p.requires_grad_(False)
    if unlocked_layers > 0:
        for m in (*root.encoder.layers[-unlocked_layers:], norm, proj):
            for p in m.parameters():
                p.requires_grad_(True)


def wise_ft(model: nn.Module, start: dict[str, torch.Tensor], alpha: float) -> None:
    """WiSE-FT in place: every float weight becomes ``(1 - alpha) * start + alpha * fine-tuned``."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.copy_((1 - alpha) * start[k].to(v.device, v.dtype) + alpha * v)


# --------------------------------------------------------------------------- encoder


def _pixels(images: list[Image.Image], pre: Preprocess, processor) -> torch.Tensor:
    if processor is not None:
        return processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    return torch.stack([to_tensor(pre.image(im), pre.mean, pre.std) for im in images])


def _normalise(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32)


class Encoder:
    """A model folder, ready to embed images and captions (rows L2-normalised)."""

    def __init__(self, model: CLIPModel, tokenizer: Tokenizer, pre: Preprocess, device: str = "cpu", processor=None,
                 fusion_head: nn.Module | None = None):
        """``tokenizer`` as ``load`` configures it (start/end tokens, padded to the context length).

        Args:
            processor: a Hugging Face folder's image processor: images go through it, so the
                embeddings are those of ``AutoProcessor`` + ``CLIPModel`` to the bit.
            fusion_head: the model's image-text matching head, if it has one (``Loaded.fusion``).
        """
        self.model = model.to(device).eval()
        self.fusion = fusion_head.to(device).eval() if fusion_head is not None else None
        self.tokenizer = tokenizer
        self.pre = pre
        self.processor = processor
        self.device = device
        self.image_size = pre.image_size

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str = "cpu", where: str = "model") -> Encoder:
        m = load(model_dir, where=where)
        return cls(m.model, m.tokenizer, m.pre, device, m.image_processor, m.fusion)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """Normalised model input, (n, 3, image_size, image_size)."""
        return _pixels(images, self.pre, self.processor)

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        return tokenize(self.tokenizer, texts)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image], batch_size: int = 256) -> np.ndarray:
        out = [np.zeros((0, self.model.config.projection_dim), np.float32)]
        for i in range(0, len(images), batch_size):
            x = self.pixels(images[i : i + batch_size])
            out.append(_normalise(self.model.get_image_features(pixel_values=x.to(self.device)).pooler_output))
        return np.concatenate(out)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = [np.zeros((0, self.model.config.projection_dim), np.float32)]
        for i in range(0, len(texts), batch_size):
            ids = tokenize(self.tokenizer, texts[i : i + batch_size]).to(self.device)
            out.append(_normalise(self.model.get_text_features(input_ids=ids).pooler_output))
        return np.concatenate(out)
