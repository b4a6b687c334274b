"""The image-text matching head (train.fusion): trained on a real tiny model, saved, reloaded, evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from mmcore import clip_model, demo_split, evaluate, fusion, metrics, tables, train, trainloop
from mmcore.base import StageContext
from mmcore.errors import ConfigError, InputError
from mmcore.evaluate import EvaluateConfig
from mmcore.train import TrainConfig

# The micro preset: the head must learn within a test's budget on 2 cores.
FAST = dict(preset="micro", batch_size=32, warmup_steps=5, num_workers=0, vocab_size=400, val_every_epoch=False,
            augment="none", lr=2e-3)


def _ctx(data, run_dir, seed=0):
    return StageContext(data=data, run_dir=run_dir, seed=seed, workers=1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    table, data = demo_split.make(root, n=400, seed=1, val=0.1, test=0.25)
    table["split_group"] = table["scene_id"]  # as the split stage writes it: a scene's copies stay together
    return table, data


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    table, data = demo
    run = tmp_path_factory.mktemp("run")
    res = train.run(table, TrainConfig(**FAST, steps=120, fusion="cross_attention"), _ctx(data, run))
    return table, data, run, res


def _pairs(table, data, split="test"):
    rows = table[table["split"] == split].drop_duplicates(tables.IMAGE).reset_index(drop=True)
    images = [Image.open(data.image_root / p).convert("RGB") for p in rows[tables.IMAGE]]
    return rows, images, rows[tables.TEXT].tolist()


def _mismatched(rows, seed=0):
    """Each image with a caption of another scene (a wrong caption, not a copy of its own)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(len(rows)):
        while True:
            j = int(rng.integers(len(rows)))
            if rows["scene_id"].iat[j] != rows["scene_id"].iat[i]:
                out.append(rows[tables.TEXT].iat[j])
                break
    return out


def test_head_separates_matched_from_mismatched_pairs_far_above_chance(trained):
    table, data, run, res = trained
    assert res.stats["fusion"] == "cross_attention" and res.stats["n_fusion_params"] > 0
    h = pd.read_parquet(run / "train" / "history.parquet")
    assert list(h.columns)[-1] == "itm_loss" and np.isfinite(h["itm_loss"]).all()
    model = clip_model.load(run / "train" / "model")
    rows, images, texts = _pairs(table, data)  # held-out test images, never trained on
    p_pos = fusion.match_probability(model, images, texts, batch_size=16)
    p_neg = fusion.match_probability(model, images, _mismatched(rows), batch_size=16)
    assert p_pos.shape == (len(rows),) and ((p_pos >= 0) & (p_pos <= 1)).all()
    pairs = np.stack([np.r_[p_pos, p_neg], np.r_[np.ones(len(p_pos)), np.zeros(len(p_neg))]], 1)
    auc = metrics.bootstrap_ci(pairs, n=500, seed=0, stat=metrics.auroc)
    assert auc["value"] == pytest.approx(roc_auc_score(pairs[:, 1], pairs[:, 0]))
    # chance is 0.5; 120 steps of the micro preset measured 0.69 [0.62, 0.76] on 2 cores
    assert auc["value"] > 0.62 and auc["low"] > 0.55, auc


def test_a_model_with_a_head_reloads_and_scores_identically(trained):
    table, data, run, _ = trained
    model_dir = run / "train" / "model"
    spec = json.loads((model_dir / fusion.FUSION_CONFIG_FILE).read_text())
    assert spec["kind"] == "cross_attention" and spec["layers"] == 1 and (model_dir / fusion.FUSION_WEIGHTS_FILE).is_file()
    rows, images, texts = _pairs(table, data)
    a = fusion.match_probability(clip_model.load(model_dir), images[:12], texts[:12], batch_size=5)
    b = fusion.match_probability(clip_model.load(model_dir), images[:12], texts[:12], batch_size=12)
    enc = clip_model.Encoder.load(model_dir)
    c = fusion.match_probability(enc, images[:12], texts[:12])
    assert np.array_equal(a, b) and np.array_equal(a, c)
    # The saved head is the trained one: the last checkpoint's weights, to the bit.
    ck = trainloop.load_checkpoint(run / "train" / "checkpoints" / "last.pt")
    saved = clip_model.load(model_dir).fusion.state_dict()
    assert saved.keys() == ck["fusion"].keys() and all(torch.equal(saved[k], ck["fusion"][k]) for k in saved)


def test_rerank_only_reorders_within_the_top_k(trained):
    table, data, run, _ = trained
    enc = clip_model.Encoder.load(run / "train" / "model")
    rows, images, texts = _pairs(table, data)
    ie, te = enc.encode_images(images), enc.encode_texts(texts)
    fi, ft = fusion.encode_pairs_source(enc, images, texts, 32, "cpu")
    k = 5
    cand = fusion.topk(ie, te, k)
    score = fusion.pair_logits(enc.fusion, fi, ft, np.repeat(np.arange(len(ie)), k), cand.ravel()).reshape(cand.shape)
    cos = np.take_along_axis(ie @ te.T, cand, 1)
    order = fusion.rerank_order(cand, score, cos)
    assert all(set(a) == set(b) for a, b in zip(cand, order))  # the same k candidates, reordered
    assert (np.diff(np.take_along_axis(score, np.argsort(-score, 1, kind="stable"), 1), axis=1) <= 0).all()
    r = metrics.retrieval(ie, te, np.arange(len(ie)))
    new = fusion.reranked_ranks(r.i2t_rank, cand == np.arange(len(ie))[:, None], score, cos)
    outside = r.i2t_rank > k
    assert np.array_equal(new[outside], r.i2t_rank[outside])  # beyond k nothing moves
    assert (new[~outside] <= k).all() and (new[~outside] >= 1).all()
    # The new rank is the positive's position in the reordered list, a full tie (a copy of its caption)
    # counting in its favour as in evaluate's ranks.
    for q in np.flatnonzero((cand == np.arange(len(ie))[:, None]).any(1)):  # (a tie may leave it out of the top k)
        at, j = list(order[q]).index(q), list(cand[q]).index(q)
        ahead = [list(cand[q]).index(c) for c in order[q][:at]]
        assert new[q] == 1 + sum((score[q, i], cos[q, i]) != (score[q, j], cos[q, j]) for i in ahead)


def test_reranked_ranks_on_hand_made_candidates():
    base = np.array([2, 7, 1])
    pos = np.array([[False, True, False], [False, False, False], [True, False, True]])
    score = np.array([[0.1, 0.5, 0.9], [1, 2, 3], [0.2, 0.9, 0.3]])
    cos = np.array([[0.3, 0.2, 0.1], [0.3, 0.2, 0.1], [0.3, 0.2, 0.1]])
    # query 0: its positive (0.5) is beaten by one wrong candidate (0.9); query 1: none in the top 3,
    # rank kept; query 2: best of two positives (0.3) beaten by one wrong (0.9)
    assert fusion.reranked_ranks(base, pos, score, cos).tolist() == [2, 7, 2]


def test_evaluate_reports_matching_and_rerank_with_cis(trained, tmp_path):
    table, data, run, _ = trained
    enc = clip_model.Encoder.load(run / "train" / "model")
    cfg = EvaluateConfig(splits=["test"], bootstrap=100, robustness=False, spotcheck_n=0, rerank_k=8)
    ctx = StageContext(data=data, run_dir=run, seed=0, workers=1)
    res = evaluate.run(table, cfg, ctx, encoder=enc)
    m = json.loads((run / "evaluate" / "metrics.json").read_text())
    mt = m["matching"]
    assert set(mt) == {"accuracy", "precision", "recall", "f1", "auroc", "n_pairs", "n_positive", "n_negative", "chance",
                       "n_decode_failed"}
    assert mt["n_decode_failed"] == 0
    assert mt["n_pairs"] == mt["n_positive"] + mt["n_negative"] and mt["n_negative"] == 2 * mt["n_positive"]
    assert mt["n_positive"] == m["test"]["n_texts"]
    assert mt["chance"] == pytest.approx({"accuracy": 2 / 3, "auroc": 0.5, "f1": 0.5})
    for k in ("accuracy", "precision", "recall", "f1", "auroc"):
        assert mt[k]["low"] <= mt[k]["value"] <= mt[k]["high"], k
    assert mt["auroc"]["value"] > 0.5
    rr = m["rerank"]
    assert rr["k"] == 8 and rr["blend"] is True and set(rr) == {"k", "blend", "i2t", "t2i"}
    for d in ("i2t", "t2i"):
        assert set(rr[d]) == {"R@1", "R@5", "R@10"}
        for name, v in rr[d].items():
            assert set(v) == {"without", "with", "difference"}
            # without re-ranking is the contrastive retrieval evaluate reports
            assert v["without"]["value"] == pytest.approx(m["test"]["retrieval"][f"{d}_r{name[2:]}"]["value"])
            assert v["difference"]["value"] == pytest.approx(v["with"]["value"] - v["without"]["value"])
            assert v["difference"]["low"] <= v["difference"]["value"] <= v["difference"]["high"]
        # R@10 can only change through positives that were in the top 8: never up beyond what 8 allows
    assert "test" in m and "matching" not in evaluate.metrics_table(m)["split"].tolist()
    assert res.stats["matching_auroc"] == mt["auroc"]["value"]


def test_pair_scores_decode_each_image_once_a_chunk_at_a_time_and_a_failure_stays_its_own(trained):
    import weakref

    table, data, run, _ = trained
    enc = clip_model.Encoder.load(run / "train" / "model")
    rows, images, texts = _pairs(table, data)
    images, texts = images[:7], texts[:7]
    rng = np.random.default_rng(0)
    ii, tt = rng.integers(0, 7, 40), rng.integers(0, 7, 40)
    alive, calls = [], []

    def load(i):
        calls.append(i)
        assert sum(r() is not None for r in alive) <= 3  # never more than one chunk of images held
        if i == 4:
            raise OSError("image file is truncated")
        im = images[i].copy()
        alive.append(weakref.ref(im))
        return im

    z, failed = fusion.pair_scores(enc, enc.fusion, load, texts, ii, tt, batch_size=2, chunk=3)
    assert sorted(calls) == sorted(set(ii.tolist()))  # each image once
    assert failed == {4: "OSError: image file is truncated"}
    assert np.isnan(z[ii == 4]).all() and not np.isnan(z[ii != 4]).any()
    fi, ft = fusion.encode_pairs_source(enc, images, texts, 16, "cpu")
    want = fusion.pair_logits(enc.fusion, fi, ft, ii, tt)
    assert np.allclose(z[ii != 4], want[ii != 4], atol=1e-5)
    # A query with a candidate the head could not score keeps its contrastive rank.
    assert fusion.reranked_ranks(np.array([3, 4]), np.array([[True, False], [True, False]]),
                                 np.array([[0.0, 1.0], [np.nan, 1.0]]), np.zeros((2, 2))).tolist() == [2, 4]


def test_evaluate_leaves_out_an_image_that_fails_to_decode_for_the_head(trained, tmp_path, monkeypatch):
    table, data, run, _ = trained
    enc = clip_model.Encoder.load(run / "train" / "model")
    seen: dict[str, int] = {}
    real = evaluate._load
    test_rows = table[table["split"] == "test"]
    broken = test_rows[tables.IMAGE].iloc[0]

    def flaky(data_cfg, ref, max_side):  # decodes for the embedding pass, not for the head's
        seen[ref] = seen.get(ref, 0) + 1
        if ref == broken and seen[ref] > 1:
            raise OSError("image file is truncated")
        return real(data_cfg, ref, max_side)

    monkeypatch.setattr(evaluate, "_load", flaky)
    cfg = EvaluateConfig(splits=["test"], bootstrap=0, robustness=False, spotcheck_n=0, rerank_k=8)
    res = evaluate.run(table, cfg, StageContext(data=data, run_dir=tmp_path, seed=0, workers=1), encoder=enc)
    m = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert res.quarantined.empty and m["matching"]["n_decode_failed"] == 1
    assert m["matching"]["n_positive"] == m["test"]["n_texts"] - int((test_rows[tables.IMAGE] == broken).sum())
    assert all(seen[r] == 2 for r in test_rows[tables.IMAGE].unique())  # every test image read twice, no more
    for d in ("i2t", "t2i"):
        assert m["rerank"][d]["R@1"]["without"]["value"] == pytest.approx(m["test"]["retrieval"][f"{d}_r1"]["value"])


def test_without_a_head_nothing_changes_and_match_probability_refuses(demo, tmp_path):
    table, data = demo
    train.run(table, TrainConfig(**FAST, steps=2), _ctx(data, tmp_path))
    model_dir = tmp_path / "train" / "model"
    assert not (model_dir / fusion.FUSION_CONFIG_FILE).exists()
    assert list(pd.read_parquet(tmp_path / "train" / "history.parquet").columns) == list(trainloop.HISTORY_COLUMNS)
    m = clip_model.load(model_dir)
    assert m.fusion is None and clip_model.Encoder.load(model_dir).fusion is None
    with pytest.raises(ConfigError, match=r"^fusion: the model .* has no fusion head; train one with train.fusion"):
        fusion.match_probability(m, [Image.new("RGB", (8, 8))], ["a red square"])
    cfg = EvaluateConfig(splits=["test"], bootstrap=0, robustness=False, spotcheck_n=0)
    evaluate.run(table, cfg, StageContext(data=data, run_dir=tmp_path, seed=0), encoder=clip_model.Encoder.load(model_dir))
    assert not {"matching", "rerank"} & set(json.loads((tmp_path / "evaluate" / "metrics.json").read_text()))


def test_unknown_fusion_head_is_a_one_line_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match="unknown fusion head 'xattn'; expected one of concat, cross_attention or none"):
        TrainConfig(fusion="xattn")
    assert TrainConfig(fusion="concat").fusion == "concat"


def test_concat_head_trains_saves_and_resumes_to_the_same_weights(demo, tmp_path):
    table, data = demo
    cfg = TrainConfig(**{**FAST, "steps": 5, "checkpoint_every": 2}, fusion="concat")
    trainloop.run_stage(table, cfg, _ctx(data, tmp_path / "full"))
    with pytest.raises(trainloop._Interrupted):
        trainloop.run_stage(table, cfg, _ctx(data, tmp_path / "killed"), interrupt_at=3)
    trainloop.run_stage(table, cfg, _ctx(data, tmp_path / "killed"))
    a, b = (clip_model.load(tmp_path / d / "train" / "model") for d in ("full", "killed"))
    assert isinstance(a.fusion, fusion.ConcatHead)
    sa, sb = a.fusion.state_dict(), b.fusion.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


# --------------------------------------------------------------------------- pseudo-label weights


def test_weighted_clip_loss_is_the_weighted_mean_of_each_pairs_terms():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    loss = trainloop.ClipLoss()
    assert torch.allclose(loss(img, txt, scale, torch.ones(6)), loss(img, txt, scale), atol=1e-6)
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 1.0])
    logits = scale * img @ txt.T
    lab = torch.arange(6)
    per = torch.nn.functional.cross_entropy(logits, lab, reduction="none") + torch.nn.functional.cross_entropy(logits.T, lab, reduction="none")
    assert torch.allclose(loss(img, txt, scale, w), (per * w).sum() / (2 * w.sum()), atol=1e-6)


def test_pseudo_weights_weight_training_and_are_carried(demo, tmp_path):
    table, data = demo
    cfg = TrainConfig(**FAST, steps=3)
    plain = trainloop.run_stage(table, cfg, _ctx(data, tmp_path / "plain"))
    ones = table.assign(**{tables.PSEUDO_LABEL: False, tables.PSEUDO_WEIGHT: 1.0})
    res_ones = trainloop.run_stage(ones, cfg, _ctx(data, tmp_path / "ones"))
    train_rows = table.index[table["split"] == "train"]
    some = ones.copy()
    some.loc[train_rows[::3], tables.PSEUDO_LABEL] = True
    some.loc[train_rows[::3], tables.PSEUDO_WEIGHT] = 0.0
    res_some = trainloop.run_stage(some, cfg, _ctx(data, tmp_path / "some"))
    assert "n_weighted_pairs" not in plain.stats and res_ones.stats["n_weighted_pairs"] == 0
    assert res_some.stats["n_weighted_pairs"] == len(train_rows[::3])
    assert {tables.PSEUDO_LABEL, tables.PSEUDO_WEIGHT} <= set(res_some.kept.columns)

    def weights(d):
        from safetensors.torch import load_file

        return load_file(tmp_path / d / "train" / "model" / "model.safetensors")

    p, o, s = weights("plain"), weights("ones"), weights("some")
    # weights of 1.0 train as no column (to rounding); zero weights train differently
    assert all(torch.allclose(p[k], o[k], atol=1e-5) for k in p)
    assert any(not torch.allclose(p[k], s[k], atol=1e-4) for k in p)
    bad = some.copy()
    bad.loc[train_rows[0], tables.PSEUDO_WEIGHT] = -1.0
    with pytest.raises(InputError, match="pseudo_weight must hold finite weights >= 0, got -1.0"):
        trainloop.run_stage(bad, cfg, _ctx(data, tmp_path / "bad"))


def test_matching_metrics_match_scikit_learn():
    from sklearn.metrics import f1_score, precision_score, recall_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + 0.65 * rng.random(300), 0, 1)
    v = {k: metrics.bootstrap_ci(x, n=0, stat=s)["value"] for k, (x, s) in metrics.matching_values(p, y).items()}
    pred = p >= 0.5
    assert v["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert v["f1"] == pytest.approx(f1_score(y, pred)) and v["precision"] == pytest.approx(precision_score(y, pred))
    assert v["recall"] == pytest.approx(recall_score(y, pred)) and v["accuracy"] == pytest.approx((pred == y).mean())
    assert metrics.matching_chance(100, 200) == pytest.approx({"accuracy": 2 / 3, "auroc": 0.5, "f1": 0.5})


def test_quality_alignment_can_score_with_the_matching_head(trained):
    """quality.alignment_score: match: the head's P(match) (as 2 P - 1) flags mismatched captions
    more often than their own ones, on held-out test images."""
    from mmcore import quality
    from mmcore.quality import QualityConfig

    table, data, run, _ = trained
    rows, _, _ = _pairs(table, data)
    wrong = rows.assign(text=_mismatched(rows))
    both = pd.concat([rows, wrong], ignore_index=True)
    scores, errors = quality.match_scores(both, run / "train" / "model", data.image_root, batch_size=32)
    assert not any(errors) and ((scores >= -1) & (scores <= 1)).all()
    own, other = scores[: len(rows)], scores[len(rows):]
    assert own.mean() > other.mean()
    cfg = QualityConfig(alignment_model=run / "train" / "model", alignment_score="match", alignment_threshold=0.0)
    assert cfg.alignment_score == "match"
    with pytest.raises(ConfigError, match=r"^quality.alignment_score match: .*no fusion head"):
        quality.match_scores(both.head(2), _plain_model(table, data, run), data.image_root)


def _plain_model(table, data, run) -> Path:
    out = run.parent / (run.name + "-plain")
    if not (out / "train" / "model").is_dir():
        train.run(table, TrainConfig(**FAST, steps=1), _ctx(data, out))
    return out / "train" / "model"


# --------------------------------------------------------------------------- negatives and ties


class _Recorder(torch.nn.Module):
    """A head that remembers which (image, caption) pairs it scored: the argmax of one-hot embeddings."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.pairs: list[tuple[int, int]] = []

    def forward(self, img, txt):
        self.pairs += list(zip(img.emb.argmax(1).tolist(), txt.emb.argmax(1).tolist()))
        return self.w.expand(len(img), 2)


def _one_hot_features(n: int) -> fusion.Features:
    return fusion.Features(torch.zeros(n, 2, 4), torch.ones(n, 2, dtype=torch.bool), torch.zeros(n, dtype=torch.long),
                           torch.eye(n))


def test_a_pair_without_a_valid_negative_gets_none_never_a_positive_labelled_no():
    # 0 and 1 are one group, 1 and 2 have one caption: 1 has no valid negative; 0 and 2 only each other.
    same = torch.tensor([[True, True, False], [True, True, True], [False, True, True]])
    for seed in range(20):
        neg_txt, neg_img = fusion.hard_negatives(torch.randn(3, 3), same, torch.Generator().manual_seed(seed))
        assert neg_txt.tolist() == [2, -1, 0] and neg_img.tolist() == [2, -1, 0]
    ids = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 6, 2]])
    head = _Recorder()
    loss, acc = fusion.itm_loss(head, _one_hot_features(3), _one_hot_features(3), ids, torch.tensor(10.0),
                                torch.Generator().manual_seed(0), groups=torch.tensor([7, 7, -1]))
    # the 3 positives, then per image and per caption a negative where one exists: never a pair of `same`
    assert head.pairs[:3] == [(0, 0), (1, 1), (2, 2)] and sorted(head.pairs[3:]) == [(0, 2), (0, 2), (2, 0), (2, 0)]
    assert torch.isfinite(loss) and acc == pytest.approx(4 / 7)  # the constant head answers "no" (argmax tie: 0)
    # One group, or one pair, has no negatives at all: only the positives are scored.
    for n, groups in ((4, torch.zeros(4, dtype=torch.long)), (1, None)):
        head = _Recorder()
        loss, _ = fusion.itm_loss(head, _one_hot_features(n), _one_hot_features(n), torch.arange(n)[:, None],
                                  torch.tensor(10.0), torch.Generator().manual_seed(0), groups=groups)
        assert head.pairs == [(i, i) for i in range(n)] and torch.isfinite(loss)


def test_rerank_ties_count_as_in_evaluates_retrieval_and_follow_rerank_order():
    # Captions 0 and 1 are one text (an exact cosine tie), so are 2 and 3; caption i belongs to image i.
    rng = np.random.default_rng(0)
    te = rng.normal(size=(6, 8)).astype(np.float32)
    te[1], te[3] = te[0], te[2]
    te /= np.linalg.norm(te, axis=1, keepdims=True)
    ie = te + 0.6 * rng.normal(size=te.shape).astype(np.float32)
    ie /= np.linalg.norm(ie, axis=1, keepdims=True)
    r = metrics.retrieval(ie, te, np.arange(6))
    assert (r.i2t_rank > 1).any()
    for k in (3, 6):
        cand = fusion.topk(ie, te, k)
        cos = np.take_along_axis(ie @ te.T, cand, 1)
        pos = cand == np.arange(6)[:, None]
        # A head that scores every candidate alike changes nothing: the ranks are evaluate's contrastive ones
        # (a copy of the right caption counting for it), and the order the contrastive one.
        flat = np.zeros(cand.shape)
        assert np.array_equal(fusion.reranked_ranks(r.i2t_rank, pos, flat, cos), r.i2t_rank)
        assert np.array_equal(fusion.rerank_order(cand, flat, cos), cand)
        # Scores with ties: the rank is 1 + the wrong candidates before the first right one in rerank_order,
        # but for a wrong one tied with it in score and cosine (a copy of its caption), which counts for it.
        for seed in range(20):
            score = np.random.default_rng(seed).integers(0, 3, cand.shape).astype(np.float64)
            order = fusion.rerank_order(cand, score, cos)
            new = fusion.reranked_ranks(r.i2t_rank, pos, score, cos)
            for q in range(6):
                if q not in order[q]:
                    assert new[q] == r.i2t_rank[q]
                    continue
                at = {c: j for j, c in enumerate(cand[q])}
                first = list(order[q]).index(q)
                key = (score[q, at[q]], cos[q, at[q]])
                assert new[q] == 1 + sum((score[q, at[c]], cos[q, at[c]]) != key for c in order[q][:first])
    # By hand: one tie in score, broken by the cosine (the wrong one is closer), as rerank_order breaks it.
    pos = np.array([[True, False]])
    assert fusion.reranked_ranks(np.array([2]), pos, np.array([[1.0, 1.0]]), np.array([[0.5, 0.6]])).tolist() == [2]
    assert fusion.rerank_order(np.array([[7, 9]]), np.array([[1.0, 1.0]]), np.array([[0.5, 0.6]])).tolist() == [[9, 7]]
