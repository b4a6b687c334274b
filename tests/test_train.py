"""Train stage: augmentation, shards, presets, the loop, resume, DDP and the saved model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmcore import augment, clip_model, demo_split, shards, tables, train, trainloop
from mmcore.base import StageContext
from mmcore.errors import ConfigError
from mmcore.layout import TRAIN_CONFIG_FILE
from mmcore.train import REASONS, TrainConfig
from mmpipe import trainer
from tests.conftest import write_train_run

# The micro preset and a few steps keep the whole file well under a minute on 2 cores.
FAST = dict(preset="micro", batch_size=16, steps=4, warmup_steps=2, num_workers=0, checkpoint_every=2, vocab_size=400)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    table, data = demo_split.make(root, n=300, seed=1)
    return table, data


def _ctx(data, run_dir: Path, seed: int = 0) -> StageContext:
    return StageContext(data=data, run_dir=run_dir, seed=seed, workers=1)


# --------------------------------------------------------------------------- augmentation


def test_flip_swaps_left_and_right_words_and_pixels():
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 8, 32))  # red band on the left
    text = "a red circle on the left of a Right square, leftmost"
    # Find a seed whose first draw flips, then check image and caption flipped together.
    for seed in range(20):
        out, cap = augment.apply("aligned", img, text, np.random.default_rng(seed), 32)
        if cap != text:
            break
    assert cap == "a red circle on the right of a Left square, rightmost"
    a = np.asarray(out).astype(int)
    assert a[:, -4:, 0].mean() > 150 and a[:, :4, 0].mean() < 100  # red now on the right
    assert augment.flip_caption(augment.flip_caption(text)) == text


def test_synonym_only_touches_words_in_table():
    table = {"small": ["little"], "picture": ["photo"]}
    text = "A small red circle at the left of the picture"
    outs = {augment.synonym_caption(text, table, np.random.default_rng(s), p=1.0) for s in range(5)}
    assert outs == {"A little red circle at the left of the photo"}
    default = augment.load_synonyms()
    for word in ("red", "circle", "left", "right", "square", "blue"):
        assert word not in default  # meaning-carrying words are never replaced by default


def test_cross_modal_erases_and_drops_words_deterministically():
    img = Image.new("RGB", (48, 48), (128, 128, 128))
    text = "a small red circle on the left over a gray background"
    a = augment.apply("cross_modal", img, text, np.random.default_rng(3), 32)
    b = augment.apply("cross_modal", img, text, np.random.default_rng(3), 32)
    assert a[1] == b[1] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert a[0].size == (32, 32)
    assert 1 <= len(a[1].split()) < len(text.split()) + 1
    assert np.asarray(a[0]).std() > 5  # the erased patch is noise on a flat image


def test_bad_synonym_file_is_one_line_error(tmp_path):
    p = tmp_path / "syn.yaml"
    p.write_text("small: little\n")
    with pytest.raises(ConfigError, match=r"train.synonyms: .* must map words to non-empty lists"):
        augment.load_synonyms(p)


# --------------------------------------------------------------------------- presets, shards


def test_bad_preset_is_one_line_error_listing_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown model preset 'vit-h-99'; expected one of .*tiny.*vit-b-32") as e:
        clip_model.build_model("vit-h-99")
    assert "\n" not in str(e.value)
    assert {"tiny", "vit-b-32"} <= set(clip_model.list_presets())


def test_config_lengths_are_exclusive():
    with pytest.raises(ValueError, match="exactly one of epochs, steps, minutes"):
        TrainConfig(epochs=2, minutes=1.0)
    assert TrainConfig().length == ("epochs", 8)


def test_config_fusion_with_several_gpus_fails_at_load(tmp_path):
    """A matching head trains in one process: the config says so at load, before any curation runs."""
    with pytest.raises(ValueError, match=r"fusion 'concat' trains its matching head in one process .*gpus 2"):
        TrainConfig(fusion="concat", gpus=2)
    from mmcore.config import load_config

    with pytest.raises(ConfigError, match=r"train.*fusion 'concat' trains its matching head in one process") as e:
        load_config(None, [f"data.manifest={tmp_path / 'm.csv'}", "train.fusion=concat", "train.gpus=2"])
    assert "\n" not in str(e.value)
    assert TrainConfig(fusion="concat", gpus=1).gpus == 1


def test_shards_are_deterministic_cached_and_quarantine_bad_images(demo, tmp_path):
    table, data = demo
    t = table.head(40).copy()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    t.loc[t.index[0], tables.IMAGE] = str(bad)  # absolute path outside the root: refused too
    m1 = shards.build(t, data.image_root, tmp_path / "a", 32)
    m2 = shards.build(t, data.image_root, tmp_path / "b", 32)
    assert m1["n_rows"] == 39 and list(m1["failed"]) == [str(t[tables.ROW_ID].iloc[0])]
    assert tables.file_digest(tmp_path / "a" / m1["files"][0]) == tables.file_digest(tmp_path / "b" / m2["files"][0])
    rows = shards.read(tmp_path / "a")
    assert shards.decode(rows["jpeg"].iloc[0]).size == (32, 32)
    before = (tmp_path / "a" / m1["files"][0]).stat().st_mtime_ns
    shards.build(t, data.image_root, tmp_path / "a", 32)  # same key: reused, not rewritten
    assert (tmp_path / "a" / m1["files"][0]).stat().st_mtime_ns == before


def test_shards_stream_to_disk_a_file_at_a_time(demo, tmp_path, monkeypatch):
    """A file is written as soon as it is full, before later images are decoded: memory holds one
    file's images, not the dataset's; the rows, their order and the split column are as in one pass."""
    table, data = demo
    t = table.head(45).copy()
    t["split"] = np.where(np.arange(len(t)) % 3 == 0, "val", "train")
    t.loc[t.index[7], tables.IMAGE] = "images/missing.jpg"
    monkeypatch.setattr(shards, "ROWS_PER_FILE", 10)
    monkeypatch.setattr(shards, "BATCH_SIZE", 4)
    decoded, written = [], []
    decode_batch, write_arrow = shards._decode_batch, tables.write_arrow
    monkeypatch.setattr(shards, "_decode_batch", lambda rows, *a: decoded.extend(rows) or decode_batch(rows, *a))
    monkeypatch.setattr(tables, "write_arrow", lambda tb, path: written.append(len(decoded)) or write_arrow(tb, path))
    meta = shards.build(t, data.image_root, tmp_path / "s", 32)
    # 29 train rows (one image is missing) and 15 val rows, 10 to a file, one split per file
    assert meta["parts"] == {"train": [f"train-{i:05d}.arrow" for i in range(3)], "val": ["val-00000.arrow", "val-00001.arrow"]}
    assert meta["n_rows"] == 44 and written[0] < len(t)  # the first file went out while rows were still undecoded
    want = t.drop(index=t.index[7]).sort_values(tables.ROW_ID)
    for split in ("train", "val", None):
        rows = shards.read(tmp_path / "s", split)
        w = want if split is None else want[want["split"] == split]
        assert rows[tables.ROW_ID].tolist() == w[tables.ROW_ID].tolist()
        assert rows["split"].tolist() == w["split"].tolist() and rows[tables.TEXT].tolist() == w[tables.TEXT].tolist()
    # Read from the memory map: the split's JPEG bytes are not copied into the DataFrame.
    train = shards.read(tmp_path / "s", "train")
    assert isinstance(train["jpeg"].dtype, pd.ArrowDtype) and shards.decode(train["jpeg"].array[0]).size == (32, 32)


# --------------------------------------------------------------------------- the stage


def test_batch_plan_is_resumable_and_splits_global_batches_across_ranks():
    full = trainloop.BatchPlan(n=50, batch_size=8, grad_accum=1, seed=3)
    it = iter(full)
    seq = [next(it) for _ in range(14)]  # 6 steps per epoch: crosses two epoch boundaries
    assert [b[0][0] for b in seq[::6]] == [0, 1, 2] and all(len(b) == 8 for b in seq)
    later = iter(trainloop.BatchPlan(n=50, batch_size=8, grad_accum=1, seed=3, start=9))
    assert [next(later) for _ in range(5)] == seq[9:14]
    ranks = [iter(trainloop.BatchPlan(n=50, batch_size=8, grad_accum=1, seed=3, rank=r, world=2)) for r in (0, 1)]
    for b in seq[:7]:
        assert next(ranks[0]) + next(ranks[1]) == b
    w = np.r_[np.ones(25), np.zeros(25)]  # weighted sampler: zero-weight rows are never drawn
    drawn = trainloop.BatchPlan(n=50, batch_size=8, grad_accum=1, seed=3, weights=w).order(0)
    assert drawn.max() < 25


def test_train_run_saves_a_model_that_reloads_with_same_embeddings(demo, tmp_path):
    table, data = demo
    table = table.copy()
    broken = [table.index[table["split"] == s][-1] for s in ("train", "test")]
    table.loc[broken, tables.IMAGE] = "images/gone.jpg"
    res = train.run(table, TrainConfig(**FAST, augment="aligned", normalize="dataset"), _ctx(data, tmp_path))
    # The train row is quarantined; test rows are not decoded here (evaluate decodes them), so they pass.
    assert res.quarantined[tables.ROW_ID].tolist() == [table.loc[broken[0], tables.ROW_ID]]
    assert res.quarantined[tables.REASON].tolist() == ["decode_failed"] and set(REASONS) == {"decode_failed"}
    assert set(res.kept[tables.ROW_ID]) == set(table[tables.ROW_ID]) - {table.loc[broken[0], tables.ROW_ID]}
    assert set(tables.read_json(tmp_path / "train" / "shards" / "meta.json")["parts"]) == {"train", "val"}
    s = res.stats
    assert s["steps"] == 4 and s["device"] == "cpu" and s["cpu_only"] and s["preset"] == "micro"
    assert s["samples_seen"] == 64 and s["n_params"] > 0 and 0 < s["chance_r5"] <= 1
    h = pd.read_parquet(tmp_path / "train" / "history.parquet")
    assert list(h.columns) == ["step", "epoch", "loss", "lr", "logit_scale", "val_i2t_r5"]  # no wall clock
    timing = tables.read_json(tmp_path / "train" / "timing.json")
    assert timing["step"] == [1, 2, 3, 4] and all(x > 0 for x in timing["samples_per_s"])
    assert h["step"].tolist() == [1, 2, 3, 4] and np.isfinite(h["loss"]).all() and h["val_i2t_r5"].notna().any()

    from transformers import AutoTokenizer, CLIPModel

    model_dir = tmp_path / "train" / "model"
    model = CLIPModel.from_pretrained(model_dir)
    enc = clip_model.Encoder.load(model_dir)
    assert enc.image_size == 32 and enc.device == "cpu" and enc.pre.mean != clip_model.IMAGENET_MEAN
    texts = table[tables.TEXT].head(5).tolist()
    imgs = [Image.open(data.image_root / p).convert("RGB") for p in table[tables.IMAGE].head(5)]
    et, ei = enc.encode_texts(texts, batch_size=2), enc.encode_images(imgs, batch_size=2)
    assert et.dtype == np.float32 and et.shape == (5, 32) and np.allclose(np.linalg.norm(ei, axis=1), 1, atol=1e-5)
    ids = torch.tensor(AutoTokenizer.from_pretrained(model_dir)(texts, padding="max_length", max_length=16, truncation=True)["input_ids"])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1).numpy()
    assert np.allclose(ref, et, atol=1e-5)


def test_resume_after_kill_gives_identical_weights(demo, tmp_path):
    table, data = demo
    cfg = TrainConfig(**{**FAST, "steps": 5})
    trainloop.run_stage(table, cfg, _ctx(data, tmp_path / "full"))
    with pytest.raises(trainloop._Interrupted):
        trainloop.run_stage(table, cfg, _ctx(data, tmp_path / "killed"), interrupt_at=3)  # checkpoint at 2
    assert trainloop.load_checkpoint(tmp_path / "killed/train/checkpoints/last.pt")["step"] == 2
    res = trainloop.run_stage(table, cfg, _ctx(data, tmp_path / "killed"))
    assert res.stats["steps"] == 5
    a = load_file(tmp_path / "full/train/model/model.safetensors")
    b = load_file(tmp_path / "killed/train/model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The curves of the resumed run are the uninterrupted run's, to the byte.
    assert (tmp_path / "full/train/history.parquet").read_bytes() == (tmp_path / "killed/train/history.parquet").read_bytes()




def test_ddp_two_gloo_processes_match_single_process(demo, tmp_path):
    table, data = demo
    # fp32: bf16 products of half a batch round differently from the whole batch's (1e-3 after 3 steps)
    train = {**FAST, "steps": 3, "val_every_epoch": False, "precision": "fp32"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    write_train_run(tmp_path / "single", table, data, train)
    assert trainer.main([str(tmp_path / "single")]) == 0
    write_train_run(tmp_path / "ddp", table, data, train)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mmpipe", "train", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = tables.read_json(tmp_path / "ddp" / "train" / "stats.json")
    assert stats["world_size"] == 2 and stats["steps"] == 3
    a = load_file(tmp_path / "single/train/model/model.safetensors")
    b = load_file(tmp_path / "ddp/train/model/model.safetensors")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst


@pytest.mark.slow
def test_ddp_rank0_failing_to_build_shards_stops_every_rank_at_once(demo, tmp_path):
    """Every rank stops with rank 0's reason. Before, rank 1 waited at a barrier for shards that
    would never come: torchrun tears such a group down, other launchers waited for the timeout."""
    table, data = demo
    write_train_run(tmp_path / "ddp", table, data, {**FAST, "steps": 3})
    (tmp_path / "ddp" / "train").mkdir(parents=True)
    (tmp_path / "ddp" / "train" / "shards").write_text("a file where the shard folder goes")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mmpipe", "train", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "train: rank 0 could not build the shards: FileExistsError" in r.stderr, r.stderr[-2000:]


def _with_and_without(demo, tmp_path, precision="auto", **update):
    """Train 3 steps plainly (``tmp_path/plain``) and with ``update`` (``tmp_path/changed``)."""
    table, data = demo
    cfg = TrainConfig(**{**FAST, "steps": 3, "precision": precision})
    trainloop.run_stage(table, cfg, _ctx(data, tmp_path / "plain"))
    res = trainloop.run_stage(table, cfg.model_copy(update=update), _ctx(data, tmp_path / "changed"))
    assert res.stats["steps"] == 3
    return res


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_weights(demo, tmp_path):
    _with_and_without(demo, tmp_path, grad_checkpointing=True)
    a = load_file(tmp_path / "plain/train/model/model.safetensors")
    b = load_file(tmp_path / "changed/train/model/model.safetensors")
    # Recomputing activations in backward repeats the same float ops: the same weights.
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_torch_compile_trains_and_matches_eager(demo, tmp_path):
    """compile=True goes through TorchInductor on CPU (about a minute to compile the micro model)."""
    # fp32: in bf16, fused and eager kernels round apart by ~2e-3 of the loss
    res = _with_and_without(demo, tmp_path, precision="fp32", compile=True)
    he = pd.read_parquet(tmp_path / "plain/train/history.parquet")
    hc = pd.read_parquet(tmp_path / "changed/train/history.parquet")
    # Fused kernels round differently: the same training to float tolerance, not to the bit.
    assert np.allclose(he["loss"], hc["loss"], rtol=1e-3, atol=1e-4), (he["loss"].tolist(), hc["loss"].tolist())
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tmp_path / "changed/train/model")  # saved unwrapped, reloads as usual
    assert sum(p.numel() for p in model.parameters()) == res.stats["n_params"]


# --------------------------------------------------------------------------- automatic schedule


@pytest.mark.parametrize("n, batch, epochs", [(300, 64, 63), (2161, 64, 8), (1350, 64, 12), (20000, 128, 8), (60000, 256, 8), (100, 64, 250)])
def test_auto_schedule_picks_batch_and_length_from_the_data(n, batch, epochs):
    s = trainloop.auto_schedule(TrainConfig(), n)
    assert (s.batch_size, s.unit, s.amount, s.auto) == (batch, "epochs", epochs, ("batch_size", "length"))
    assert s.amount * (n // s.batch_size) >= trainloop.AUTO_MIN_STEPS and s.amount >= trainloop.AUTO_EPOCHS
    assert f"batch {batch} (auto" in s.reason and f"{epochs} epochs" in s.reason


def test_auto_schedule_never_overrides_what_the_user_set():
    s = trainloop.auto_schedule(TrainConfig(batch_size=64, steps=30), 20000)
    assert (s.batch_size, s.unit, s.amount, s.auto) == (64, "steps", 30, ())
    s = trainloop.auto_schedule(TrainConfig(minutes=2.5), 60000)  # a time budget: only the batch is chosen
    assert (s.batch_size, s.unit, s.amount, s.auto) == (256, "minutes", 2.5, ("batch_size",))
    s = trainloop.auto_schedule(TrainConfig(epochs=3), 40)  # a batch never larger than the data
    assert s.batch_size <= 40 and s.auto == ("batch_size",) and "(set)" in s.reason
    assert trainloop.auto_schedule(TrainConfig(), 2000, world=3).batch_size == 63  # divisible by the ranks
    # From YAML / --set the same way: an explicit value is in model_fields_set.
    assert trainloop.auto_schedule(TrainConfig.model_validate({"batch_size": 64}), 20000).batch_size == 64


def test_auto_schedule_is_saved_in_stats_and_config(demo, tmp_path):
    table, data = demo
    cfg = TrainConfig(**{k: v for k, v in FAST.items() if k not in ("batch_size", "steps")})
    monkey = pytest.MonkeyPatch()
    monkey.setattr(trainloop, "AUTO_MIN_STEPS", 3)
    monkey.setattr(trainloop, "AUTO_EPOCHS", 1)
    try:
        res = train.run(table, cfg, _ctx(data, tmp_path))
    finally:
        monkey.undo()
    s = res.stats
    epochs = int(s["length"].split()[0])
    assert s["batch_size"] == 64 and s["auto"] == ["batch_size", "length"] and s["steps"] == epochs * s["steps_per_epoch"] >= 3
    assert "auto" in s["schedule"]
    saved = tables.read_json(tmp_path / "train" / TRAIN_CONFIG_FILE)
    assert saved["batch_size"] == 64 and saved["epochs"] == epochs


def test_an_unset_batch_size_is_chosen_alike_after_a_round_trip_through_the_saved_config():
    """RUN_DIR/config.yaml writes every field: ``mmpipe train RUN_DIR`` and torchrun (train.gpus) read
    it back, and must choose the batch size the in-process run chose."""
    cfg = TrainConfig()
    again = TrainConfig.model_validate(cfg.model_dump(mode="json"))
    assert again.batch_size is None
    assert trainloop.auto_schedule(again, 20000).batch_size == trainloop.auto_schedule(cfg, 20000).batch_size == 128
    ft = TrainConfig.model_validate({"model_path": "/m"})
    assert trainloop.auto_schedule(ft, 20000).batch_size == trainloop.FINETUNE_BATCH


def test_a_given_tokenizer_is_pooled_at_its_own_end_token(demo, tmp_path):
    """A preset model trained with train.tokenizer_path pools the caption at that tokenizer's end
    token, wherever its id is (build_model assumes mmpipe's own order, end token = id 3)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    table, data = demo
    tok = Tokenizer(models.BPE(unk_token=clip_model.UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    specials = [clip_model.EOT, clip_model.SOT, clip_model.PAD, clip_model.UNK]  # not mmpipe's order
    tok.train_from_iterator(table["text"].tolist(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    assert tok.token_to_id(clip_model.EOT) == 0
    tok.save(str(tmp_path / "tokenizer.json"))
    trainloop.run_stage(table, TrainConfig(**{**FAST, "steps": 1}, tokenizer_path=tmp_path / "tokenizer.json"),
                        _ctx(data, tmp_path / "run"))
    tc = clip_model.load(tmp_path / "run" / "train" / "model").model.config.text_config
    assert (tc.eos_token_id, tc.bos_token_id, tc.pad_token_id) == (0, 1, 2)


def test_the_default_tokenizer_splits_captions_as_clips_own_bpe():
    """A preset model's default tokenizer is OpenAI CLIP's BPE (shipped in mmcore/data), after mmpipe's
    four special tokens: the same pieces as CLIP's tokenizer (transformers' CLIPTokenizer on the real
    merges), each id shifted by those four."""
    from tests.test_finetune import openai_tokenizer

    tok, ref = clip_model.clip_bpe_tokenizer(), openai_tokenizer()
    assert tok.get_vocab_size() == 49_410
    assert [tok.token_to_id(s) for s in clip_model.SPECIALS] == [0, 1, 2, 3]
    captions = ["Grinning face, face, grin", "a red  circle above two small squares", "hashtag: #1 & 42 naïve café",
                "don't touch the ROOSTER's egg!"]
    for c in captions:
        want = [i + len(clip_model.SPECIALS) for i in ref(c, add_special_tokens=False)["input_ids"]]
        assert tok.encode(c, add_special_tokens=False).ids == want, c


def test_the_towers_start_alike_whatever_the_vocabulary():
    """With a seed, init_like_open_clip draws the token table from its own generator: a model with
    CLIP's 49,410 tokens and one with 400 start with the same towers, projections and logit scale,
    and the first 400 rows of their token tables agree."""
    small = clip_model.init_like_open_clip(clip_model.build_model("micro", vocab_size=400), seed=3)
    large = clip_model.init_like_open_clip(clip_model.build_model("micro", vocab_size=49_410), seed=3)
    a, b = small.state_dict(), large.state_dict()
    table = "text_model.embeddings.token_embedding.weight"
    assert torch.equal(a[table], b[table][:400])
    assert all(torch.equal(a[k], b[k]) for k in a if k != table)
    other = clip_model.init_like_open_clip(clip_model.build_model("micro", vocab_size=400), seed=4).state_dict()
    assert not torch.equal(a["vision_model.embeddings.patch_embedding.weight"], other["vision_model.embeddings.patch_embedding.weight"])


def test_a_preset_trains_with_clips_bpe_by_default_and_says_so(demo, tmp_path):
    """No tokenizer asked for: CLIP's BPE; the model reloads with it, pools at its end token (id 3),
    and the saved config and stats name what ran (tokenizer, vocabulary, init)."""
    table, data = demo
    cfg = TrainConfig(**{**{k: v for k, v in FAST.items() if k != "vocab_size"}, "steps": 1})
    res = trainloop.run_stage(table, cfg, _ctx(data, tmp_path / "run"))
    assert (res.stats["tokenizer"], res.stats["vocab_size"], res.stats["init"]) == ("CLIP's BPE", 49_410, "open_clip")
    saved = tables.read_json(tmp_path / "run" / "train" / TRAIN_CONFIG_FILE)
    assert saved["init"] == "open_clip" and saved["vocab_size"] is None and saved["tokenizer_path"] is None
    loaded = clip_model.load(tmp_path / "run" / "train" / "model")
    tc = loaded.model.config.text_config
    assert (tc.vocab_size, tc.eos_token_id, tc.bos_token_id, tc.pad_token_id) == (49_410, 3, 2, 0)
    caption = "a red circle above a small blue square"
    ids = clip_model.tokenize(loaded.tokenizer, [caption])[0].tolist()
    want = clip_model.clip_bpe_tokenizer().encode(caption, add_special_tokens=False).ids
    assert ids[: len(want) + 2] == [2, *want, 3] and set(ids[len(want) + 2:]) == {0}


# --------------------------------------------------------------------------- text padding, SigLIP


def test_trimming_the_padding_leaves_every_caption_embedding_as_it_was():
    """The plain step cuts the ids after the batch's last end token: CLIP's text tower is causal and
    read at the end token, so the embeddings are those of the whole context (to float rounding)."""
    tok = clip_model.configure_tokenizer(clip_model.clip_bpe_tokenizer(), 32)
    model = clip_model.init_like_open_clip(clip_model.build_model("tiny", vocab_size=tok.get_vocab_size()), seed=0).eval()
    texts = ["grinning face, face, grin", "a red flag", "smiling cat with heart-eyes, cat, heart, love, smile"]
    ids = clip_model.tokenize(tok, texts)
    eos = trainloop._end_token(model)
    cut = trainloop.trim_context(ids, eos)
    longest = max(len(tok.encode(t).ids) - tok.encode(t).ids.count(0) for t in texts)
    assert eos == 3 and cut.shape == (3, longest) and torch.equal(cut, ids[:, :longest])
    with torch.no_grad():
        full = model.get_text_features(input_ids=ids).pooler_output
        trimmed = model.get_text_features(input_ids=cut).pooler_output
    assert torch.allclose(full, trimmed, atol=1e-5)
    assert trainloop.trim_context(ids[:, :5], eos).shape == (3, 5)  # a row with no end token: left whole
    assert trainloop.trim_context(ids, None) is ids  # pooled at the largest id: left whole


def test_siglip_loss_is_open_clips_and_its_weights_are_a_weighted_mean():
    from open_clip.loss import SigLipLoss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1).requires_grad_()
    ours = trainloop.SigLipLoss()
    scale = torch.tensor(trainloop.SigLipLoss.INIT_SCALE).exp()
    a = ours(img, txt, scale)
    b = SigLipLoss()(img, txt, scale, torch.tensor(-10.0))
    assert torch.allclose(a, b)
    ga = torch.autograd.grad(a, [img, txt])
    gb = torch.autograd.grad(SigLipLoss()(img, txt, scale, torch.tensor(-10.0)), [img, txt])
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))
    assert torch.allclose(ours(img, txt, scale, torch.ones(6)), a)  # weights of 1: the plain loss
    w = torch.tensor([1.0, 1, 1, 1, 1, 0])  # a pair of weight 0: its row and column terms drop out
    per = -torch.nn.functional.logsigmoid((2 * torch.eye(6) - 1) * (scale * img @ txt.T - 10))
    want = (per.sum(1)[:5] + per.sum(0)[:5]).sum() / 10
    assert torch.allclose(ours(img, txt, scale, w), want)


def test_siglip_trains_resumes_to_the_same_weights_and_says_so(demo, tmp_path):
    """train.loss=siglip: the scale starts at 10, the bias at -10 and is learnt; a killed run resumes
    (bias and its optimizer state from the checkpoint) to the uninterrupted run's weights."""
    table, data = demo
    cfg = TrainConfig(**{**FAST, "steps": 5, "loss": "siglip"})
    res = trainloop.run_stage(table, cfg, _ctx(data, tmp_path / "full"))
    assert res.stats["loss"] == "siglip" and tables.read_json(tmp_path / "full/train" / TRAIN_CONFIG_FILE)["loss"] == "siglip"
    h = pd.read_parquet(tmp_path / "full/train/history.parquet")
    assert abs(h["logit_scale"].iloc[0] - 10) < 0.1 and np.isfinite(h["loss"]).all()
    ck = trainloop.load_checkpoint(tmp_path / "full/train/checkpoints/last.pt")
    assert float(ck["loss"]["logit_bias"]) != -10.0  # learnt
    with pytest.raises(trainloop._Interrupted):
        trainloop.run_stage(table, cfg, _ctx(data, tmp_path / "killed"), interrupt_at=3)
    trainloop.run_stage(table, cfg, _ctx(data, tmp_path / "killed"))
    a = load_file(tmp_path / "full/train/model/model.safetensors")
    b = load_file(tmp_path / "killed/train/model/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="softmax")


# --------------------------------------------------------------------------- precision


def test_precision_auto_is_bf16_where_bf16_products_run_in_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert trainloop.resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert trainloop.resolve_precision("auto", "cuda") == "fp32"  # a GPU without bf16 units (before Ampere)
    assert trainloop.resolve_precision("fp32", "cuda") == "fp32" and trainloop.resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(trainloop, "cpu_has_bf16_matmul", lambda: False)
    assert trainloop.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(trainloop, "cpu_has_bf16_matmul", lambda: True)
    assert trainloop.resolve_precision("auto", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


def test_a_bf16_run_on_cpu_says_so_and_gives_back_the_models_attention(demo, tmp_path, monkeypatch):
    """bf16 on CPU trains through the matmul attention (its bf16 products run on AMX; torch's CPU
    flash attention is slow in bf16) and leaves the model as it found it; the stats, the printed
    choice and the saved config say which precision ran, and fp32 stays available."""
    table, data = demo
    seen, built = [], []
    real, real_build = trainloop.clip_forward, clip_model.build_model

    def spy(model, pixels, ids, loss_fn):
        # (attention, autocast on, the last column holds an end token: no padding past the longest caption)
        seen.append((trainloop.unwrap(model).config._attn_implementation, torch.is_autocast_enabled("cpu"),
                     bool((ids[:, -1] == 3).any())))
        return real(model, pixels, ids, loss_fn)

    def attention(model) -> set[str]:
        return {c._attn_implementation for c in (model.config, model.config.text_config, model.config.vision_config)}

    monkeypatch.setattr(trainloop, "clip_forward", spy)
    monkeypatch.setattr(clip_model, "build_model", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    res = trainloop.run_stage(table, TrainConfig(**{**FAST, "steps": 2, "precision": "bf16"}), _ctx(data, tmp_path / "bf16"))
    assert seen == [("eager", True, True)] * 2 and attention(built[-1]) == {"sdpa"}  # given back
    assert res.stats["precision"] == "bf16" and np.isfinite(res.stats["final_loss"])
    assert tables.read_json(tmp_path / "bf16/train" / TRAIN_CONFIG_FILE)["precision"] == "bf16"
    with pytest.raises(trainloop._Interrupted):  # a run stopped mid-loop gives it back too
        trainloop.run_stage(table, TrainConfig(**{**FAST, "steps": 3, "precision": "bf16"}), _ctx(data, tmp_path / "cut"),
                            interrupt_at=1)
    assert attention(built[-1]) == {"sdpa"}
    seen.clear()
    res = trainloop.run_stage(table, TrainConfig(**{**FAST, "steps": 2, "precision": "fp32"}), _ctx(data, tmp_path / "fp32"))
    assert [x[:2] for x in seen] == [("sdpa", False)] * 2 and res.stats["precision"] == "fp32"
    monkeypatch.setattr(trainloop, "cpu_has_bf16_matmul", lambda: False)
    res = trainloop.run_stage(table, TrainConfig(**{**FAST, "steps": 1}), _ctx(data, tmp_path / "auto"))
    assert res.stats["precision"] == "fp32"  # auto without AMX


def test_the_losses_stay_fp32_under_bf16_autocast():
    """The towers' products run in bf16; the logits of both losses do not (bf16 rounds -10 + x to
    steps of 0.06, a scale of 100 to steps of 0.5)."""
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(8, 32, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(8, 32, generator=g), dim=1)
    scale = torch.tensor(100.0)
    for loss in (trainloop.ClipLoss(), trainloop.SigLipLoss()):
        plain = loss(img, txt, scale)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = loss(img.bfloat16(), txt.bfloat16(), scale)
        want = loss(img.bfloat16().float(), txt.bfloat16().float(), scale)
        assert under.dtype == torch.float32 and torch.allclose(under, want, atol=1e-6), (under, want, plain)
