"""Retrieval and zero-shot metrics: equal to CLIP_benchmark's, known answers, bootstrap intervals."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from clip_benchmark.metrics import zeroshot_classification as cb_zs
from clip_benchmark.metrics import zeroshot_retrieval as cb_ret
from sklearn.metrics import balanced_accuracy_score, f1_score

from mmcore import metrics


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _paired(n_img: int, noise: float, seed: int = 0, d: int = 32, max_caps: int = 4):
    """Images with 1..max_caps captions each; captions = image + noise (noise=0: perfect)."""
    rng = np.random.default_rng(seed)
    t2i = np.repeat(np.arange(n_img), rng.integers(1, max_caps + 1, n_img))
    img = _unit(rng.normal(size=(n_img, d)))
    txt = _unit(img[t2i] + noise * rng.normal(size=(len(t2i), d)))
    return img, txt, t2i


@pytest.mark.parametrize("noise", [0.6, 1.0, 2.0])
def test_recall_equals_clip_benchmark_with_several_captions_per_image(noise):
    img, txt, t2i = _paired(250, noise, seed=int(noise * 10))
    assert len(txt) > len(img)  # several captions per image
    ours = metrics.retrieval(img, txt, t2i, chunk=33)
    # CLIP_benchmark's own code path: scores (texts x images), positive pairs, batchify(recall_at_k) > 0.
    scores = torch.from_numpy(txt) @ torch.from_numpy(img).T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), torch.from_numpy(t2i)] = True
    for k in (1, 5, 10):
        t2i_cb = (cb_ret.batchify(cb_ret.recall_at_k, scores, positive, 64, "cpu", k=k) > 0).float().mean().item()
        i2t_cb = (cb_ret.batchify(cb_ret.recall_at_k, scores.T, positive.T, 64, "cpu", k=k) > 0).float().mean().item()
        assert (ours.t2i_rank <= k).mean() == pytest.approx(t2i_cb, abs=1e-6)
        assert (ours.i2t_rank <= k).mean() == pytest.approx(i2t_cb, abs=1e-6)


def test_zeroshot_equals_clip_benchmark_and_sklearn():
    rng = np.random.default_rng(3)
    c, n = 7, 400
    class_emb = _unit(rng.normal(size=(c, 16)))
    target = rng.integers(0, c, n)
    img = _unit(class_emb[target] + 1.2 * rng.normal(size=(n, 16)))
    zs = metrics.zeroshot(img, class_emb, target, chunk=50)
    vals = {k: metrics.bootstrap_ci(v, n=0, stat=s)["value"] for k, (v, s) in zs.values().items()}
    logits, tgt = torch.from_numpy(img @ class_emb.T), torch.from_numpy(target)
    try:
        acc1, acc5 = cb_zs.accuracy(logits, tgt, topk=(1, 5))
    except TypeError:  # 1.6.2's float(1-element array) fails on numpy >= 2.4: same steps, .item()
        pred = logits.topk(5, 1, True, True)[1].t()
        correct = pred.eq(tgt.view(1, -1).expand_as(pred))
        acc1, acc5 = (correct[:k].reshape(-1).float().sum().item() / n for k in (1, 5))
    assert vals["acc1"] == pytest.approx(acc1)
    assert vals["acc5"] == pytest.approx(acc5)
    assert vals["balanced_acc"] == pytest.approx(balanced_accuracy_score(target, zs.pred))
    assert vals["macro_f1"] == pytest.approx(f1_score(target, zs.pred, average="macro"))
    assert zs.confusion().sum() == n and np.trace(zs.confusion()) == (zs.pred == target).sum()
    assert "acc5" not in metrics.zeroshot(img, class_emb[:4], np.minimum(target, 3)).values()  # < 5 classes


def test_class_embeddings_are_normalised_template_means():
    def enc(texts):  # one fixed vector per distinct prompt (crc32, not hash(): that is salted per process)
        return np.stack([_unit(np.random.default_rng(zlib.crc32(t.encode())).normal(size=8)) for t in texts])

    w = metrics.class_embeddings(enc, ["cat", "dog"], ["a {}.", "a photo of a {c}."])
    expected = enc(["a cat.", "a photo of a cat."]).mean(0)
    # float32 unit vectors: compare absolutely (a relative tolerance fails on a component near 0)
    np.testing.assert_allclose(w[0], expected / np.linalg.norm(expected), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:y_pred contains classes")
def test_balanced_accuracy_and_macro_f1_match_sklearn_with_missing_classes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t, p = rng.integers(0, 6, 30), rng.integers(0, 6, 30)
        t[t == 5] = 4  # class 5 appears only in predictions
        assert metrics.balanced_accuracy(t, p, 6) == pytest.approx(balanced_accuracy_score(t, p))
        assert metrics.macro_f1(t, p, 6) == pytest.approx(f1_score(t, p, average="macro", labels=np.union1d(t, p)))


def test_perfect_embeddings_give_recall_one():
    img, txt, t2i = _paired(300, 0.0)
    r = metrics.retrieval(img, txt, t2i)
    for d in ("i2t", "t2i"):
        assert (getattr(r, f"{d}_rank") == 1).all()
        np.testing.assert_allclose(getattr(r, f"{d}_ndcg"), 1.0)


def test_shuffled_embeddings_give_chance():
    img, txt, t2i = _paired(1000, 0.1, seed=5, d=64, max_caps=1)
    rng = np.random.default_rng(1)
    r = metrics.retrieval(img, txt[rng.permutation(len(txt))], t2i)
    chance = metrics.retrieval_chance(t2i, len(img))
    for k in (5, 10):
        p = chance[f"t2i_r{k}"]
        se = np.sqrt(p * (1 - p) / len(txt))
        assert abs((r.t2i_rank <= k).mean() - p) < 4 * se
        assert abs((r.i2t_rank <= k).mean() - chance[f"i2t_r{k}"]) < 4 * se
    assert r.t2i_rank.mean() == pytest.approx(chance["t2i_mean_rank"], rel=0.1)


def test_chance_of_several_captions_matches_simulation():
    t2i = np.repeat(np.arange(50), np.tile([1, 3], 25))
    chance = metrics.retrieval_chance(t2i, 50, ks=(5,))
    rng = np.random.default_rng(0)
    sims = [np.isin(rng.permutation(len(t2i))[:5][None], np.flatnonzero(t2i == 1)).any() for _ in range(4000)]
    # image 1 has 3 captions among 100: P(hit@5) = 1 - C(97,5)/C(100,5)
    assert np.mean(sims) == pytest.approx(1 - np.prod([(97 - j) / (100 - j) for j in range(5)]), abs=0.02)
    assert 5 / 100 < chance["i2t_r5"] < 15 / 100


def test_ndcg_with_several_captions_known_answer():
    # one image with captions 0 and 2; caption 1 belongs to another image and scores highest
    img = _unit(np.array([[1.0, 0.0], [0.0, 1.0]]))
    txt = _unit(np.array([[0.8, 0.2], [1.0, 0.01], [0.5, 0.5]]))
    r = metrics.retrieval(img, txt, np.array([0, 1, 0]))
    assert r.i2t_rank[0] == 2
    dcg = 1 / np.log2(3) + 1 / np.log2(4)  # positives at ranks 2 and 3
    assert r.i2t_ndcg[0] == pytest.approx(dcg / (1 + 1 / np.log2(3)))


def test_chunked_equals_one_block():
    img, txt, t2i = _paired(120, 1.0, seed=9)
    a, b = metrics.retrieval(img, txt, t2i, chunk=7), metrics.retrieval(img, txt, t2i, chunk=10_000)
    for f in ("i2t_rank", "t2i_rank", "i2t_ndcg", "t2i_ndcg"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_bad_caption_index_is_an_error():
    img, txt, t2i = _paired(5, 0.0)
    with pytest.raises(ValueError, match="image indices in"):
        metrics.retrieval(img, txt, t2i + 5)
    with pytest.raises(ValueError, match="at least one caption"):
        metrics.retrieval(np.concatenate([img, img[:1]]), txt, t2i)


def test_ci_contains_value_and_narrows_with_more_queries():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1000, 10_000):
        hits = (rng.random(n) < 0.3).astype(float)
        ci = metrics.bootstrap_ci(hits, n=1000, seed=1)
        assert ci["low"] <= ci["value"] <= ci["high"]
        widths.append(ci["high"] - ci["low"])
        # close to the normal approximation 2 x 1.96 x se
        assert widths[-1] == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / n), rel=0.2)
    assert widths[0] > widths[1] > widths[2]
    ranks = rng.integers(1, 50, 500).astype(float)
    med = metrics.bootstrap_ci(ranks, stat="median", seed=2)
    assert med["value"] == np.median(ranks) and med["low"] <= med["value"] <= med["high"]
    assert metrics.bootstrap_ci(hits, seed=4) == metrics.bootstrap_ci(hits, seed=4)  # seeded


def test_paired_bootstrap_detects_a_real_difference_only():
    rng = np.random.default_rng(0)
    base = (rng.random(2000) < 0.4).astype(float)
    better = np.where(rng.random(2000) < 0.1, 1.0, base)  # strictly more hits on the same queries
    d = metrics.paired_bootstrap_diff(better, base, seed=0)
    assert d["value"] == pytest.approx(better.mean() - base.mean()) and d["low"] > 0 and d["p_value"] < 0.01
    noise = np.where(rng.random(2000) < 0.05, 1 - base, base)  # flips in both directions
    e = metrics.paired_bootstrap_diff(noise, base, seed=0)
    assert e["low"] < 0 < e["high"] or abs(e["value"]) < 0.01
    with pytest.raises(ValueError, match="same non-empty queries"):
        metrics.paired_bootstrap_diff(base, base[:10])
