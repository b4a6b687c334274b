"""Image-text matching (ITM) heads on a CLIP dual encoder's token features, as ALBEF and BLIP train them.

A head takes one image and one caption and says whether they match (two logits: no, yes). It is
trained next to the contrastive loss on each batch's positives and on hard negatives mined from
the contrastive similarities (ALBEF's ``model_retrieval.py``: for each image a wrong caption drawn
from ``softmax(sim)`` with the positives masked, for each caption a wrong image likewise), so it
learns exactly the distinctions the dual encoder finds confusing. At evaluation it re-ranks the
contrastive top k (BLIP's ``k_test``), and ``match_probability`` scores given pairs.

Heads are registered in ``HEADS`` by name (``train.fusion``):

- ``cross_attention``: 1-2 fusion layers at the text width; the caption's tokens attend to each
  other and to the image's patch tokens (ALBEF's fusion encoder, small); the head reads the token
  CLIP pools the caption at.
- ``concat``: an MLP on ``[img, txt, img * txt, |img - txt|]`` of the two normalised embeddings.

A head is saved in the model folder (``fusion.json`` + ``fusion.safetensors``) and
``clip_model.load`` returns it as ``Loaded.fusion``. The model loader imports this module, so it
imports nothing of mmcore's above the registry, errors and tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcore.errors import ConfigError, InputError, row_detail
from mmcore.registry import Registry

FUSION_CONFIG_FILE = "fusion.json"  # in the model folder, next to Hugging Face's files
FUSION_WEIGHTS_FILE = "fusion.safetensors"
NONE = "none"  # train.fusion without a head
HEADS: Registry[type[nn.Module]] = Registry("fusion head")
HARD_SHARE = 0.5  # share of a negative's draw from softmax(sim) (the rest uniform); see hard_negatives
IMAGE_CHUNK = 256  # images decoded and encoded at once by pair_scores: what bounds evaluate's memory


@dataclass(frozen=True)
class FusionSpec:
    """What builds a head: its kind and the widths of the encoder it sits on (saved as ``fusion.json``)."""

    kind: str
    text_width: int
    image_width: int
    embed_dim: int
    layers: int = 1
    heads: int = 4

    @classmethod
    def for_model(cls, model, kind: str, layers: int = 1) -> FusionSpec:
        """The spec of a ``kind`` head on ``model`` (a ``CLIPModel``); attention heads as the text tower's."""
        HEADS.check(kind, "train.fusion")
        tc, vc = model.config.text_config, model.config.vision_config
        return cls(kind, int(tc.hidden_size), int(vc.hidden_size), int(model.config.projection_dim), int(layers),
                   int(tc.num_attention_heads))


@dataclass(frozen=True)
class Features:
    """One side of a batch of pairs: token states, which tokens are real, the pooled token, the embedding."""

    tokens: torch.Tensor  # (n, L, width)
    mask: torch.Tensor  # (n, L) bool, True = a real token
    pool: torch.Tensor  # (n,) long: the token the tower pools at (image: 0, the class token)
    emb: torch.Tensor  # (n, embed_dim), L2-normalised

    def take(self, idx: torch.Tensor) -> Features:
        return Features(self.tokens[idx], self.mask[idx], self.pool[idx], self.emb[idx])

    def to(self, device) -> Features:
        return Features(self.tokens.to(device), self.mask.to(device), self.pool.to(device), self.emb.to(device))

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def cat(parts: Sequence[Features]) -> Features:
        return Features(*(torch.cat([getattr(p, f) for p in parts]) for f in ("tokens", "mask", "pool", "emb")))


# --------------------------------------------------------------------------- features


def text_pool_index(model, ids: torch.Tensor) -> torch.Tensor:
    """Where transformers' CLIP pools each caption: the end token (argmax of the ids for legacy eos id 2)."""
    eos = model.config.text_config.eos_token_id
    if eos == 2:
        return ids.argmax(-1)
    return (ids == eos).int().argmax(-1)


def image_features(vision_out, image_embeds: torch.Tensor) -> Features:
    """From a vision tower's output (``last_hidden_state``: class token + patches) and its embeddings."""
    t = vision_out.last_hidden_state
    n, length = t.shape[:2]
    return Features(t, torch.ones(n, length, dtype=torch.bool, device=t.device),
                    torch.zeros(n, dtype=torch.long, device=t.device), F.normalize(image_embeds.float(), dim=-1))


def text_features(model, ids: torch.Tensor, text_out, text_embeds: torch.Tensor) -> Features:
    t = text_out.last_hidden_state
    pool = text_pool_index(model, ids).to(t.device)
    mask = torch.arange(t.shape[1], device=t.device)[None] <= pool[:, None]  # padding follows the end token
    return Features(t, mask, pool, F.normalize(text_embeds.float(), dim=-1))


def output_features(model, ids: torch.Tensor, out) -> tuple[Features, Features]:
    """(image, text) features of a ``CLIPModel(input_ids=, pixel_values=)`` output."""
    return image_features(out.vision_model_output, out.image_embeds), text_features(model, ids, out.text_model_output, out.text_embeds)


@torch.no_grad()
def encode_images(model, pixels: torch.Tensor) -> Features:
    vo = model.vision_model(pixel_values=pixels)
    return image_features(vo, model.visual_projection(vo.pooler_output))


@torch.no_grad()
def encode_texts(model, ids: torch.Tensor) -> Features:
    to = model.text_model(input_ids=ids)
    return text_features(model, ids, to, model.text_projection(to.pooler_output))


# --------------------------------------------------------------------------- heads


class _FusionLayer(nn.Module):
    """Pre-norm: caption self-attention (padding masked), cross-attention to the image tokens, MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_self, self.ln_cross, self.ln_mlp = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, t: torch.Tensor, pad: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.ln_self(t)
        t = t + self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        h = self.ln_cross(t)
        t = t + self.cross_attn(h, img, img, need_weights=False)[0]
        return t + self.mlp(self.ln_mlp(t))


@HEADS.register("cross_attention")
class CrossAttentionHead(nn.Module):
    """ALBEF's fusion encoder, small: the caption's tokens attend to the image's; ``Linear(width, 2)`` on the pooled token."""

    def __init__(self, spec: FusionSpec):
        super().__init__()
        w = spec.text_width
        self.image_in = nn.Sequential(nn.LayerNorm(spec.image_width), nn.Linear(spec.image_width, w))
        self.layers = nn.ModuleList(_FusionLayer(w, spec.heads) for _ in range(spec.layers))
        self.norm = nn.LayerNorm(w)
        self.itm = nn.Linear(w, 2)

    def forward(self, img: Features, txt: Features) -> torch.Tensor:
        i = self.image_in(img.tokens.float())
        t = txt.tokens.float()
        for layer in self.layers:
            t = layer(t, ~txt.mask, i)
        pooled = t[torch.arange(len(t), device=t.device), txt.pool]
        return self.itm(self.norm(pooled))


@HEADS.register("concat")
class ConcatHead(nn.Module):
    """An MLP on ``[img, txt, img * txt, |img - txt|]`` of the normalised embeddings (no token features)."""

    def __init__(self, spec: FusionSpec):
        super().__init__()
        d = spec.embed_dim
        self.mlp = nn.Sequential(nn.Linear(4 * d, 2 * d), nn.GELU(), nn.Linear(2 * d, 2))

    def forward(self, img: Features, txt: Features) -> torch.Tensor:
        a, b = img.emb.float(), txt.emb.float()
        return self.mlp(torch.cat([a, b, a * b, (a - b).abs()], dim=-1))


def build(spec: FusionSpec) -> nn.Module:
    """A new head (initialised from torch's global RNG: seed it, or fork it, first)."""
    head = HEADS.get(spec.kind, "train.fusion")(spec)
    head.spec = spec
    return head


def save(head: nn.Module, model_dir: str | Path) -> None:
    """``fusion.json`` (the spec) and ``fusion.safetensors`` (the weights) into a model folder."""
    from safetensors.torch import save_file

    from mmcore.tables import write_json

    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(d / FUSION_WEIGHTS_FILE))
    write_json(asdict(head.spec), d / FUSION_CONFIG_FILE)


def load(model_dir: str | Path, where: str = "model") -> nn.Module | None:
    """The head saved in a model folder (eval mode), or None when the folder has none."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    if not (d / FUSION_CONFIG_FILE).is_file():
        return None
    try:
        raw = json.loads((d / FUSION_CONFIG_FILE).read_text())
        spec = FusionSpec(**raw)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"{where}: {d / FUSION_CONFIG_FILE} is not a fusion head spec: {str(e).splitlines()[0][:160]}") from None
    head = build(spec)
    try:
        head.load_state_dict(load_file(str(d / FUSION_WEIGHTS_FILE)))
    except Exception as e:  # missing or mismatched weights: one line
        raise InputError(f"{where}: cannot load the fusion head in {d}: {str(e).strip().splitlines()[0][:200]}") from None
    return head.eval()


# --------------------------------------------------------------------------- training


def hard_negatives(
    sim: torch.Tensor, same: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a wrong caption and for each caption a wrong image, drawn from
    ``HARD_SHARE * softmax(sim) + (1 - HARD_SHARE) * uniform`` over the valid ones; -1 where none is valid.

    Args:
        sim: (n, n) scaled image-text similarities of the batch (row = image).
        same: (n, n) True where caption j is also a right caption of image i (the diagonal, and
            captions identical to image i's own): never drawn as a negative.
    """
    out = []
    for s, m in ((sim, same), (sim.T, same.T)):
        m = m.cpu()
        hard = torch.softmax(s.detach().float().cpu().masked_fill(m, -torch.inf), dim=1).nan_to_num(0.0)
        uniform = (~m).float() / (~m).sum(1, keepdim=True).clamp_min(1)
        # Half hard (ALBEF's softmax(sim)), half uniform: fed hard negatives only, a head on a
        # small, young encoder sat at the class prior for hundreds of steps (bench/results/fusion.md).
        w = (HARD_SHARE * hard + (1 - HARD_SHARE) * uniform).masked_fill(m, 0.0)
        # Every other pair of the batch a right one too (one group, one caption): no negative, rather
        # than a right pair labelled "no match". A dummy weight keeps the draw (and the generator) in step.
        empty = w.sum(1) == 0
        neg = torch.multinomial(w.masked_fill(empty[:, None], 1.0), 1, generator=generator).squeeze(1)
        out.append(neg.masked_fill(empty, -1).to(sim.device))
    return out[0], out[1]  # (negative caption per image, negative image per caption)


def itm_loss(
    head: nn.Module,
    img: Features,
    txt: Features,
    ids: torch.Tensor,
    logit_scale: torch.Tensor,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the head on the batch's positives and one hard negative per image and per caption.

    Returns (loss, accuracy on those pairs). With ``weights`` (one per pair of the batch) each term is
    weighted by its anchor pair's weight (a weighted mean). ``groups`` (one int per pair, -1 = none)
    marks pairs of one image or duplicate cluster, which are never each other's negatives (BLIP masks
    its image ids so); an image or caption whose every other pair is such gets no negative term.
    """
    n = len(ids)
    with torch.no_grad():
        sim = logit_scale.detach().float() * img.emb @ txt.emb.T
        same = (ids[:, None, :] == ids[None, :, :]).all(-1)  # identical captions (and the diagonal)
        if groups is not None:  # pairs of one group (one image, its near-duplicates): never negatives
            g = groups.to(ids.device)
            same |= (g[:, None] == g[None, :]) & (g[:, None] >= 0)
        neg_txt, neg_img = hard_negatives(sim, same, generator)
    ar = torch.arange(n, device=ids.device)
    has_txt, has_img = neg_txt >= 0, neg_img >= 0
    ii = torch.cat([ar, ar[has_txt], neg_img[has_img]])
    tt = torch.cat([ar, neg_txt[has_txt], ar[has_img]])
    labels = torch.cat([torch.ones(n), torch.zeros(len(ii) - n)]).long().to(ids.device)
    logits = head(img.take(ii), txt.take(tt)).float()
    acc = (logits.argmax(1) == labels).float().mean().detach()
    if weights is None:
        return F.cross_entropy(logits, labels), acc
    w = weights.float()
    w = torch.cat([w, w[has_txt], w[has_img]])  # each term: its anchor pair's weight
    return (F.cross_entropy(logits, labels, reduction="none") * w).sum() / w.sum().clamp_min(1e-12), acc


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def pair_logits(head: nn.Module, img: Features, txt: Features, ii: np.ndarray, tt: np.ndarray, batch: int = 256,
                device: str | torch.device = "cpu") -> np.ndarray:
    """The head's match log-odds (logit yes - logit no) of the pairs (img[ii[p]], txt[tt[p]])."""
    head.eval()
    out = [np.zeros(0, np.float32)]
    for a in range(0, len(ii), batch):
        i = torch.as_tensor(np.asarray(ii[a : a + batch], dtype=np.int64))
        t = torch.as_tensor(np.asarray(tt[a : a + batch], dtype=np.int64))
        z = head(img.take(i).to(device), txt.take(t).to(device)).float()
        out.append((z[:, 1] - z[:, 0]).cpu().numpy().astype(np.float32))
    return np.concatenate(out)


def encode_pairs_source(model: Any, images: Sequence, texts: Sequence[str], batch_size: int, device: str) -> tuple[Features, Features]:
    """Token features of PIL ``images`` and ``texts`` through a loaded model (``clip_model.Loaded`` or
    ``Encoder``: ``.model``, ``.pixels(images)``, ``.token_ids(texts)``), preprocessed as evaluate does."""
    if not len(images) or not len(texts):
        raise InputError("fusion: no images or no texts to encode")
    return _encode_images(model, images, batch_size, device), _encode_texts(model, texts, batch_size, device)


def _encode_images(model: Any, images: Sequence, batch_size: int, device) -> Features:
    m = model.model.to(device).eval()
    return Features.cat([encode_images(m, model.pixels(list(images[a : a + batch_size])).to(device)).to("cpu")
                         for a in range(0, len(images), batch_size)])


def _encode_texts(model: Any, texts: Sequence[str], batch_size: int, device) -> Features:
    m = model.model.to(device).eval()
    return Features.cat([encode_texts(m, model.token_ids(list(texts[a : a + batch_size])).to(device)).to("cpu")
                         for a in range(0, len(texts), batch_size)])


def pair_scores(
    model: Any, head: nn.Module, load_image: Callable[[int], Any], texts: Sequence[str], ii: np.ndarray,
    tt: np.ndarray, batch_size: int = 64, device: str | torch.device = "cpu", chunk: int = IMAGE_CHUNK,
) -> tuple[np.ndarray, dict[int, str]]:
    """The head's match log-odds of the pairs (image ``ii[p]``, caption ``texts[tt[p]]``), decoding and
    encoding the images ``chunk`` at a time, each once.

    Memory holds one chunk of images with their token features, and the token features of the
    captions the pairs use. An image that fails to load leaves its pairs NaN; the second value maps
    its index to why (as evaluate's quarantine ``detail`` says it).

    Args:
        model: a loaded model (``clip_model.Loaded`` or ``Encoder``), preprocessing as evaluate does.
        load_image: image index -> PIL image; it may raise (a file broken since it was first read).
    """
    ii, tt = np.asarray(ii, np.int64), np.asarray(tt, np.int64)
    out, failed = np.full(len(ii), np.nan, np.float32), {}
    if not len(ii):
        return out, failed
    used = np.unique(tt)
    ft = _encode_texts(model, [texts[t] for t in used], batch_size, device)
    by_image = np.argsort(ii, kind="stable")
    sorted_ii, images = ii[by_image], np.unique(ii)
    for a in range(0, len(images), chunk):
        part = images[a : a + chunk]
        loaded, pil = [], []
        for i in part.tolist():
            try:
                pil.append(load_image(i))
                loaded.append(i)
            except Exception as e:  # one image's failure: its pairs, not the evaluation
                failed[i] = row_detail(e)
        lo, hi = np.searchsorted(sorted_ii, [part[0], part[-1] + 1])  # the pairs of this chunk's images
        sel = by_image[lo:hi][np.isin(sorted_ii[lo:hi], loaded)]
        if not len(sel):
            continue
        fi = _encode_images(model, pil, batch_size, device)
        out[sel] = pair_logits(head.to(device), fi, ft, np.searchsorted(loaded, ii[sel]), np.searchsorted(used, tt[sel]),
                               batch_size, device)
        del fi  # before the next chunk decodes
    return out, failed


def require_head(model: Any) -> nn.Module:
    """The model's fusion head; a model without one is a one-line ``ConfigError``."""
    head = getattr(model, "fusion", None)
    if head is None:
        where = getattr(model, "path", None)
        name = f"the model {where}" if where else "the model"
        raise ConfigError(f"fusion: {name} has no fusion head; train one with train.fusion: cross_attention (or concat)")
    return head


def match_probability(model: Any, images: Sequence, texts: Sequence[str], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """P(match) of each pair (images[i], texts[i]) by the model's fusion head.

    Args:
        model: what ``clip_model.load`` returns (or an ``Encoder``); a model without a head is a
            one-line ``ConfigError``.
        images: PIL images, preprocessed as evaluate does.
    """
    head = require_head(model)
    if len(images) != len(texts):
        raise InputError(f"match_probability: {len(images)} images but {len(texts)} texts; expected one text per image")
    if not len(images):
        return np.zeros(0, np.float64)
    head.to(device).eval()
    out = []
    for a in range(0, len(images), batch_size):
        fi, ft = encode_pairs_source(model, images[a : a + batch_size], texts[a : a + batch_size], batch_size, device)
        idx = np.arange(len(fi))
        out.append(pair_logits(head, fi, ft, idx, idx, batch_size, device))
    z = np.concatenate(out).astype(np.float64)
    return 1.0 / (1.0 + np.exp(-z))  # softmax over (no, yes) = sigmoid of the log-odds


# --------------------------------------------------------------------------- re-ranking


def reranked_ranks(base_rank: np.ndarray, cand_positive: np.ndarray, cand_score: np.ndarray,
                   cand_cosine: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best positive after re-ordering its top-k candidates as ``rerank_order`` does.

    Only the top k move: a query with a positive among them gets a rank in 1..k, 1 + the wrong
    candidates ahead of its best positive (a higher score, or an equal score and a higher cosine);
    one without keeps ``base_rank`` (> k), and so does one with a candidate the head could not score
    (NaN: its image failed to decode). A wrong candidate equal to the positive in both counts for
    the positive, as ``metrics.retrieval`` counts a cosine tie (a copy of the right caption), so a
    head that scores every candidate alike leaves every rank at ``base_rank``.

    Args:
        base_rank: (n,) the contrastive rank of the best positive (``metrics.retrieval``'s).
        cand_positive: (n, k) whether each top-k candidate is a right answer.
        cand_score: (n, k) the re-ranking score of each candidate (higher = better).
        cand_cosine: (n, k) the contrastive cosine of each candidate: what breaks a tie in score.
    """
    pos = np.asarray(cand_positive, bool)
    s, c = np.asarray(cand_score, np.float64), np.asarray(cand_cosine, np.float64)
    rows, order = np.arange(len(pos))[:, None], _order(s, c)
    best = order[rows, np.argmax(pos[rows, order], axis=1)[:, None]]  # the first positive in that order
    bs, bc = s[rows, best], c[rows, best]
    above = (((s > bs) | ((s == bs) & (c > bc))) & ~pos).sum(1)
    moved = pos.any(1) & ~np.isnan(s).any(1)
    return np.where(moved, above + 1, np.asarray(base_rank)).astype(np.int64)


def rerank_order(cand: np.ndarray, cand_score: np.ndarray, cand_cosine: np.ndarray) -> np.ndarray:
    """The top-k candidates re-ordered by score; a tie by the contrastive cosine, then the contrastive order."""
    return np.take_along_axis(np.asarray(cand), _order(cand_score, cand_cosine), axis=1)


def _order(score: np.ndarray, cosine: np.ndarray) -> np.ndarray:
    """Per row, candidate positions best first: score, then cosine, descending; stable (lexsort's last key leads)."""
    return np.lexsort((-np.asarray(cosine, np.float64), -np.asarray(score, np.float64)), axis=-1)


def topk(query: np.ndarray, gallery: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """(n, k) indices of each query's k most similar gallery rows, best first (cosine, chunked)."""
    k = min(k, len(gallery))
    g = torch.as_tensor(np.ascontiguousarray(gallery, np.float32))
    out = []
    for a in range(0, len(query), chunk):
        s = torch.as_tensor(np.ascontiguousarray(query[a : a + chunk], np.float32)) @ g.T
        out.append(torch.topk(s, k, dim=1).indices.numpy())
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


# --------------------------------------------------------------------------- test pairs


def _norm_text(t: str) -> str:
    return " ".join(str(t).lower().split())


def matching_pairs(
    img_emb: np.ndarray, txt_emb: np.ndarray, txt_to_img: np.ndarray, texts: Sequence[str], seed: int,
    scale: float = 100.0, chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matching test pairs: every positive, one hard and one random negative per positive (seeded).

    The hard negative of caption r of image a is, by a coin, a wrong caption of a or a wrong image
    of r drawn from ``softmax(scale * cosine)`` (as training draws them); the random one a wrong
    caption of a drawn uniformly. A caption equal (case and spacing aside) to one of the image's
    own is never a wrong one. Returns (image index, caption index, label) per pair.
    """
    rng = np.random.default_rng([seed, 20])
    t2i = np.asarray(txt_to_img, np.int64)
    n_txt, n_img = len(t2i), len(img_emb)
    code = _codes([_norm_text(t) for t in texts])
    own: list[set[int]] = [set() for _ in range(n_img)]  # image -> codes of its captions
    for c, a in zip(code, t2i):
        own[a].add(int(c))
    with_code: dict[int, list[int]] = {}
    for a, cs in enumerate(own):
        for c in cs:
            with_code.setdefault(c, []).append(a)
    ii, tt, lab = [t2i], [np.arange(n_txt)], [np.ones(n_txt, np.int64)]
    hard_i, hard_t = np.empty(n_txt, np.int64), np.empty(n_txt, np.int64)
    i2t = rng.random(n_txt) < 0.5
    for a0 in range(0, n_txt, chunk):
        r = np.arange(a0, min(n_txt, a0 + chunk))
        s_i2t = img_emb[t2i[r]] @ txt_emb.T  # (c, n_txt): the caption's image against every caption
        s_t2i = txt_emb[r] @ img_emb.T  # (c, n_img): the caption against every image
        for k, row in enumerate(r):
            if i2t[row]:
                bad = np.isin(code, list(own[t2i[row]]))
                s = np.where(bad, -np.inf, scale * s_i2t[k])
                hard_i[row], hard_t[row] = t2i[row], _gumbel_argmax(s, rng)
            else:
                bad = np.zeros(n_img, bool)
                bad[with_code[int(code[row])]] = True
                s = np.where(bad, -np.inf, scale * s_t2i[k])
                hard_i[row], hard_t[row] = _gumbel_argmax(s, rng), row
    ok = (hard_i >= 0) & (hard_t >= 0)
    ii.append(hard_i[ok])
    tt.append(hard_t[ok])
    lab.append(np.zeros(int(ok.sum()), np.int64))
    rand_t = np.full(n_txt, -1, np.int64)
    for row in range(n_txt):  # rejection sampling: a wrong caption is nearly every caption
        mine = own[t2i[row]]
        for _ in range(100):
            j = int(rng.integers(n_txt))
            if int(code[j]) not in mine:
                rand_t[row] = j
                break
    ok = rand_t >= 0
    ii.append(t2i[ok])
    tt.append(rand_t[ok])
    lab.append(np.zeros(int(ok.sum()), np.int64))
    return np.concatenate(ii), np.concatenate(tt), np.concatenate(lab)


def _codes(values: Sequence[str]) -> np.ndarray:
    """Integer codes of equal values (first-seen order)."""
    seen: dict[str, int] = {}
    return np.array([seen.setdefault(v, len(seen)) for v in values], dtype=np.int64)


def _gumbel_argmax(logits: np.ndarray, rng: np.random.Generator) -> int:
    """A draw from softmax(logits) (-inf = never); -1 when nothing can be drawn."""
    if not np.isfinite(logits).any():
        return -1
    return int(np.argmax(logits + rng.gumbel(size=logits.shape)))
