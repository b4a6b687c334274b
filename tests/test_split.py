"""Split stage: partition, groups kept whole, ratios, strata, time and domain modes, leakage, weights."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from mmcore import clean, split, tables
from mmcore.base import DataConfig, StageContext
from mmcore.errors import ConfigError, InputError, LeakageError
from mmcore.split import SplitConfig

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SPLITS = ("train", "val", "test")


def ctx(tmp_path=None, seed: int = 0) -> StageContext:
    return StageContext(data=DataConfig(manifest="manifest.csv"), run_dir=tmp_path or "runs/test", seed=seed)


def make_table(n: int, seed: int = 0, rows_per_image: int = 1, cluster_share: float = 0.0, n_groups: int = 0,
               time: bool = True) -> pd.DataFrame:
    """A table shaped like quality's output: images with 1..rows_per_image captions, some clustered."""
    rng = np.random.default_rng(seed)
    image = np.sort(rng.integers(0, max(n // rows_per_image, 1), n)) if rows_per_image > 1 else np.arange(n)
    words = np.array(["red", "circle", "blue", "square", "on", "the", "left", "a", "photo", "of"])
    text = [" ".join(rng.choice(words, int(k))) for k in rng.integers(2, 40, n)]
    cluster = np.where(rng.random(n) < cluster_share, rng.integers(0, max(n // 8, 1), n), -1)
    df = pd.DataFrame({
        "row_id": np.arange(n, dtype=np.int64),
        "image_path": pd.Series([f"images/{i:05d}.png" for i in image], dtype="str"),
        "text": pd.Series(text, dtype="str"),
        "content_digest": pd.Series([f"sha256:{i:064x}" for i in image], dtype="str"),
        "res_bucket": pd.Series(rng.choice(["<=256", "<=512", ">512"], n, p=[0.5, 0.4, 0.1]), dtype="str"),
        "aspect_bucket": pd.Series(rng.choice(["square", "landscape", "portrait"], n), dtype="str"),
        "dup_cluster": cluster.astype(np.int64),
        "label": pd.Series(rng.choice(["circle", "square", "star"], n, p=[0.6, 0.3, 0.1]), dtype="str"),
        "domain": pd.Series(rng.choice(["flat", "textured"], n), dtype="str"),
    })
    if time:
        df["time"] = pd.to_datetime(rng.integers(1.7e9, 1.73e9, n), unit="s", utc=True)
    if n_groups:
        df["group"] = pd.Series([f"g{k}" for k in rng.integers(0, n_groups, n)], dtype="str")
    return df


def assert_groups_whole(kept: pd.DataFrame) -> None:
    """Every key the leakage rules name maps to one split (checked from the raw columns)."""
    for col in ("content_digest", "dup_cluster", "group", "split_group"):
        if col not in kept:
            continue
        keyed = kept[kept[col] >= 0] if col == "dup_cluster" else kept[kept[col].notna()]
        assert (keyed.groupby(col)["split"].nunique() <= 1).all(), col


def assert_partition(inp: pd.DataFrame, res: tables.StageResult) -> None:
    tables.check_accounting("split", inp["row_id"].to_numpy(), res.kept, res.quarantined)
    assert set(res.kept["split"]) <= set(SPLITS)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("ratios", "match"),
    [
        ({"train": 0.7, "val": 0.2, "test": 0.2}, "must sum to 1, got 1.1"),
        ({"train": 1.2, "val": -0.2}, "must be non-negative"),
        ({"train": 0.8, "valid": 0.2}, "unknown split.*valid.*expected train, val, test"),
    ],
)
def test_bad_ratios_are_one_line_config_errors(ratios, match):
    from mmcore.config import build_config  # here: the config imports every stage

    with pytest.raises(ValidationError, match=match):
        SplitConfig(ratios=ratios)
    with pytest.raises(ConfigError, match=match) as e:
        build_config({"data": {"manifest": "m.csv"}, "split": {"ratios": ratios}}, "cfg.yaml")
    assert "\n" not in str(e.value) and "cfg.yaml" in str(e.value)


def test_missing_ratio_is_zero_and_bad_strata_list_valid_ones():
    from mmcore.config import build_config

    assert SplitConfig(ratios={"train": 0.8, "test": 0.2}).ratios == {"train": 0.8, "val": 0.0, "test": 0.2}
    with pytest.raises(ConfigError, match="unknown stratum 'colour'; expected any of caption_length, res_bucket"):
        build_config({"data": {"manifest": "m.csv"}, "split": {"strata": ["colour"]}})
    with pytest.raises(ValidationError, match="strictly increasing"):
        SplitConfig(caption_bins=[100, 50])


def test_missing_required_column_names_it():
    df = make_table(20).drop(columns=["content_digest"])
    with pytest.raises(InputError, match="split input: missing column.*'content_digest'"):
        split.run(df, SplitConfig(), ctx())
    with pytest.raises(InputError, match="missing column.*'time'"):
        split.run(make_table(20, time=False), SplitConfig(mode="time"), ctx())
    with pytest.raises(InputError, match="holdout_domains: .*'sketch' not in column 'domain'; got 'flat', 'textured'"):
        split.run(make_table(20), SplitConfig(holdout_domains=["sketch"]), ctx())


def test_optional_columns_may_be_absent_and_empty_input_is_fine():
    df = make_table(60).drop(columns=["dup_cluster", "label", "domain", "time", "aspect_bucket"])
    res = split.run(df, SplitConfig(), ctx())
    assert len(res.kept) == 60 and res.kept["split_group"].nunique() == 60
    empty = split.run(make_table(60).iloc[:0], SplitConfig(), ctx())
    assert len(empty.kept) == 0 and len(empty.quarantined) == 0
    assert {"split", "split_group", "stratum", "sample_weight"} <= set(empty.kept.columns)
    assert empty.stats["splits"]["train"]["rows"] == 0


# --------------------------------------------------------------------------- properties


@st.composite
def tables_and_configs(draw):
    n = draw(st.integers(0, 400))
    seed = draw(st.integers(0, 2**16))
    df = make_table(
        n, seed, rows_per_image=draw(st.integers(1, 4)), cluster_share=draw(st.sampled_from([0.0, 0.1, 0.4])),
        n_groups=draw(st.sampled_from([0, n // 3 + 1, 5])),
    )
    df = df.sample(frac=1.0, random_state=seed)  # input order must not matter
    a, b = draw(st.integers(0, 10)), draw(st.integers(0, 10))
    lo, hi = sorted((a, b))
    ratios = {"train": lo / 10, "val": (hi - lo) / 10, "test": (10 - hi) / 10}
    cfg = SplitConfig(
        ratios=ratios, strata=draw(st.sampled_from([[], ["caption_length", "res_bucket"], ["label", "domain"]])),
        weight_by="label", group_by_caption=draw(st.booleans()), min_stratum_size=draw(st.integers(1, 30)),
        allow_imbalance=True,  # drawn tables may be one group: the property is the partition, not the ratios
    )
    return df, cfg, seed


@SETTINGS
@given(tables_and_configs())
def test_split_is_a_seeded_partition_without_group_leakage(case):
    df, cfg, seed = case
    res = split.run(df, cfg, ctx(seed=seed))
    assert_partition(df, res)
    assert len(res.quarantined) == 0  # stratified mode drops nothing
    assert_groups_whole(res.kept)
    if cfg.group_by_caption:
        assert (res.kept.groupby(split.caption_key(res.kept["text"]))["split"].nunique() <= 1).all()
    again = split.run(df.sample(frac=1.0, random_state=seed + 1), cfg, ctx(seed=seed))
    pd.testing.assert_frame_equal(res.kept, again.kept)
    for s in SPLITS:  # a split with a zero ratio stays empty
        if cfg.ratios[s] == 0:
            assert (res.kept["split"] != s).all()
    w = res.kept.loc[res.kept["split"] == "train", "sample_weight"]
    if len(w):
        assert w.mean() == pytest.approx(1.0)


@SETTINGS
@given(n=st.integers(30, 600), seed=st.integers(0, 2**16), per_image=st.integers(1, 3),
       strata=st.sampled_from([[], ["caption_length", "res_bucket"], ["caption_length", "res_bucket", "label"]]))
def test_ratios_are_within_tolerance_when_groups_are_small(n, seed, per_image, strata):
    """Stated tolerance: each split's row count is within 2 * largest group + 1 of ratio * n."""
    df = make_table(n, seed, rows_per_image=per_image)
    res = split.run(df, SplitConfig(strata=strata), ctx(seed=seed))
    biggest = res.kept["split_group"].value_counts().max()
    counts = res.kept["split"].value_counts()
    for s, r in SplitConfig().ratios.items():
        assert abs(counts.get(s, 0) - r * n) <= 2 * biggest + 1, (s, counts.to_dict(), biggest)
    assert res.stats["max_ratio_deviation"] <= (2 * biggest + 1) / n


def test_ratios_and_strata_are_close_on_a_large_table():
    df = make_table(12_000, 3, rows_per_image=2, cluster_share=0.1)
    res = split.run(df, SplitConfig(), ctx())
    assert res.stats["max_ratio_deviation"] < 0.005 and res.stats["ratio_within_tolerance"]
    assert res.stats["max_stratum_deviation"] < 0.01
    assert res.stats["leakage"] == {"content_digest": 0, "dup_cluster": 0, "split_group": 0}
    other = split.run(df, SplitConfig(), ctx(seed=1))
    assert (other.kept["split"] != res.kept["split"]).mean() > 0.3  # the seed matters


@SETTINGS
@given(n=st.integers(1, 300), seed=st.integers(0, 2**16), per_image=st.integers(1, 3))
def test_time_mode_puts_train_before_test(n, seed, per_image):
    df = make_table(n, seed, rows_per_image=per_image, cluster_share=0.1)
    # Ordering is under test, not balance: a tiny table can be one group of 13 rows in 18 (hypothesis
    # found n=18, seed=0, per_image=3), which the collapse check rightly refuses.
    res = split.run(df, SplitConfig(mode="time", allow_imbalance=True), ctx(seed=seed))
    assert_partition(df, res)
    assert_groups_whole(res.kept)
    k = res.kept
    # A group is as new as its newest row: train groups are never newer than val, val than test.
    newest = k.groupby("split_group")["time"].transform("max")
    by = {s: newest[k["split"] == s] for s in SPLITS}
    for a, b in (("train", "val"), ("val", "test"), ("train", "test")):
        if len(by[a]) and len(by[b]):
            assert by[a].max() <= by[b].min()
    # Ties inside a group aside, every train row is at or before every test row.
    single = k["split_group"].map(k["split_group"].value_counts()) == 1
    tr, te = k.loc[single & (k["split"] == "train"), "time"], k.loc[single & (k["split"] == "test"), "time"]
    if len(tr) and len(te):
        assert tr.max() <= te.min()


def test_time_mode_quarantines_rows_without_time():
    df = make_table(50)
    df["time"] = df["time"].astype("object")
    df.loc[[3, 7], "time"] = None
    df.loc[9, "time"] = "not a date"
    res = split.run(df, SplitConfig(mode="time"), ctx())
    assert_partition(df, res)
    assert sorted(res.quarantined["row_id"]) == [3, 7, 9]
    assert set(res.quarantined["reason"]) == {"missing_time"} <= set(split.REASONS)


# --------------------------------------------------------------------------- groups, strata, domains


def test_planted_near_duplicate_clusters_stay_together(tmp_path, synth_small):
    """Synthetic dataset: renders of one scene are near-duplicates; each scene lands in one split."""
    root = synth_small
    data = DataConfig(manifest=root / "manifest.csv", time_column="timestamp", label_column="label",
                      domain_column="domain")
    cctx = StageContext(data=data, run_dir=tmp_path / "run", seed=0)
    df = clean.run(clean.read_manifest(data), clean.CleanConfig(), cctx).kept
    # Stand-ins for probe and quality: real file digests and sizes; the scene is the cluster.
    rows = []
    for r in df.itertuples():
        p = root / r.image_path
        if r.image_path.startswith(("/", "..")) or p.is_symlink() or not p.is_file():
            continue
        try:
            with Image.open(p) as im:
                side = min(im.size)
        except Exception:  # unreadable files are probe's business; leave them out here
            continue
        rows.append((r.row_id, tables.file_digest(p), "<=256" if side <= 256 else ">256"))
    probe = pd.DataFrame(rows, columns=["row_id", "content_digest", "res_bucket"])
    df = df.merge(probe, on="row_id")
    df["content_digest"] = df["content_digest"].astype("str")
    df["res_bucket"] = df["res_bucket"].astype("str")
    df["dup_cluster"] = pd.factorize(df["scene_id"])[0].astype(np.int64)
    assert df["scene_id"].value_counts().max() > 1  # clusters were planted

    res = split.run(df, SplitConfig(), cctx)
    assert_partition(df, res)
    assert_groups_whole(res.kept)
    assert (res.kept.groupby("scene_id")["split"].nunique() == 1).all()
    assert res.kept["split"].value_counts().to_dict().keys() == set(SPLITS)
    # Written as the stage's artifact and read back intact.
    tables.write_stage(tmp_path / "run", "split", res, input_ids=df["row_id"].to_numpy(), input_digest="", seconds=0)
    back = tables.load(tmp_path / "run", "split")
    assert back["split"].dtype == "str" and back["split_group"].dtype == np.int64
    assert back["sample_weight"].dtype == np.float64

    held = split.run(df, SplitConfig(holdout_domains=["textured"]), cctx).kept
    assert (held.loc[held["domain"] == "textured", "split"] == "test").all()
    assert (held.loc[held["split"] != "test", "domain"] == "flat").all()


def test_holdout_domain_takes_its_groups_to_test():
    df = make_table(400, 1, rows_per_image=2)
    df.loc[df.index[:10], "group"] = "shared"  # one user group across both domains
    df.loc[df.index[:5], "domain"], df.loc[df.index[5:10], "domain"] = "flat", "textured"
    df["group"] = df["group"].astype("str")
    res = split.run(df, SplitConfig(holdout_domains=["textured"]), ctx())
    k = res.kept
    assert (k.loc[k["domain"] == "textured", "split"] == "test").all()
    assert (k.loc[k["group"] == "shared", "split"] == "test").all()
    assert res.stats["n_holdout_rows"] >= (df["domain"] == "textured").sum() + 5
    assert res.stats["max_ratio_deviation"] < 0.03  # ratios apply to the remaining rows


def test_rare_strata_are_merged_and_reported():
    df = make_table(200)
    df.loc[0, "res_bucket"] = "huge"  # a stratum with one member would make scikit-learn raise
    res = split.run(df, SplitConfig(strata=["res_bucket"], min_stratum_size=5), ctx())
    assert res.kept.loc[0, "stratum"] == "other"
    assert res.stats["n_strata_merged"] == 1 and res.stats["n_rows_merged"] == 1
    assert any("merged" in w for w in res.stats["warnings"])
    assert set(res.kept["stratum"]) == {"<=256", "<=512", ">512", "other"}


def test_caption_length_bins_are_configurable():
    text = pd.Series(["x" * k for k in (0, 49, 50, 99, 100, 250)], dtype="str")
    bins = split.caption_length_bins(text, [50, 100, 200])
    assert bins.tolist() == ["0-50", "0-50", "50-100", "50-100", "100-200", "200+"]
    assert split.caption_length_bins(text, [10]).tolist() == ["0-10", "10+", "10+", "10+", "10+", "10+"]


def test_nullable_cluster_and_numeric_user_group():
    df = make_table(40)
    df["dup_cluster"] = pd.array([v for b in range(10) for v in (b, b, None, -1)], dtype="Int64")  # null, -1: none
    df["group"] = np.arange(40) // 4
    k = split.run(df, SplitConfig(), ctx()).kept
    assert_groups_whole(k)
    assert k["split_group"].nunique() == 10  # each user group of 4 holds one cluster pair
    k = split.run(df.drop(columns=["group"]), SplitConfig(), ctx()).kept
    assert k["split_group"].nunique() == 30  # the pairs, and 20 rows on their own


def test_connected_groups_union_all_keys():
    digest = np.array([0, 0, 1, 2, 3, 4, -1])
    cluster = np.array([-1, -1, 5, 5, -1, -1, -1])
    user = np.array([-1, -1, -1, 7, 7, -1, -1])
    assert split.connected_groups([digest, cluster, user]).tolist() == [0, 0, 1, 1, 1, 2, 3]


# --------------------------------------------------------------------------- leakage and weights


def test_check_leakage_fails_loudly_on_a_shared_digest():
    df = split.run(make_table(100, rows_per_image=2), SplitConfig(), ctx()).kept
    assert split.check_leakage(df)["content_digest"] == 0
    leaky = df.copy()
    first_test = leaky.index[leaky["split"] == "test"][0]
    leaky.loc[first_test, "content_digest"] = leaky.loc[leaky["split"] == "train", "content_digest"].iloc[0]
    with pytest.raises(LeakageError, match=r"1 content_digest value\(s\) .* in more than one split") as e:
        split.check_leakage(leaky)
    assert "\n" not in str(e.value)
    assert split.check_leakage(leaky, raise_on_leak=False)["content_digest"] == 1


def test_caption_overlap_is_counted_and_grouping_by_caption_removes_it():
    df = pd.concat([make_table(150), make_table(150, 1)], ignore_index=True)  # text in two Arrow chunks
    df["row_id"] = np.arange(300)
    df["text"] = pd.Series(np.where(np.arange(300) % 3 == 0, "A red circle!", df["text"]), dtype="str")
    df.loc[1, "text"] = "a  RED circle"  # normalises to the same caption
    res = split.run(df, SplitConfig(), ctx())
    assert res.stats["caption_overlap"] >= 1
    grouped = split.run(df, SplitConfig(group_by_caption=True), ctx())
    assert grouped.stats["caption_overlap"] == 0
    assert grouped.kept.loc[grouped.kept["text"].isin(["A red circle!", "a  RED circle"]), "split"].nunique() == 1


def test_empty_captions_are_no_caption_group():
    """Rows clean.keep_uncaptioned keeps ("" or only punctuation) are not one caption group: each is
    grouped by its other keys only, and they count as no caption overlap."""
    text = pd.Series(["", "", "  ", "...", "a red circle", "A red circle!", "", "blue"], dtype="str")
    codes = split._caption_codes(text)
    assert codes[[0, 1, 2, 3, 6]].tolist() == [-1] * 5
    assert codes[4] == codes[5] >= 0 and codes[7] >= 0 and codes[7] != codes[4]
    df = make_table(300, 2)
    df["text"] = pd.Series(np.where(np.arange(300) % 2 == 0, "", df["text"]), dtype="str")  # half uncaptioned
    res = split.run(df, SplitConfig(group_by_caption=True), ctx())
    kept = res.kept
    empty = kept["text"] == ""
    assert set(kept.loc[empty, "split"]) == set(SPLITS)  # not one group: spread over every split
    assert res.stats["largest_group"] < 10
    assert res.stats["caption_overlap"] == 0
    assert_groups_whole(kept)


def test_held_out_mask_does_not_group_uncaptioned_rows_with_a_fixed_test_row(tmp_path):
    from mmcore import ingest

    (tmp_path / "manifest.csv").write_text("x\n")
    c = StageContext(data=DataConfig(manifest=tmp_path / "manifest.csv"), run_dir=tmp_path / "run", seed=0)
    n = 40
    df = pd.DataFrame({
        "row_id": np.arange(n, dtype=np.int64),
        "text": pd.Series(["" if i % 2 else f"caption {i}" for i in range(n)], dtype="str"),
        "content_digest": pd.Series([f"d{i}" for i in range(n)], dtype="str"),
    })
    # One uncaptioned and one captioned fixed test row, from this manifest.
    held = split.held_out_rows(df[df["row_id"].isin([1, 2])], ingest.input_key(c.data))
    hit, why = split.held_out_mask(df, held, SplitConfig(group_by_caption=True), c)
    assert hit[hit].index.tolist() == [1, 2]  # its own rows only: no other uncaptioned row goes with row 1
    assert why.loc[1] == "row_id in the fixed test set"


def test_sample_weights_favour_rare_strata():
    df = make_table(3000, 2)
    res = split.run(df, SplitConfig(strata=["label"], weight_exponent=1.0), ctx())
    k = res.kept
    w = k[k["split"] == "train"].groupby("label")["sample_weight"].mean()
    assert w["star"] > w["square"] > w["circle"]
    # With exponent 1 each label gets the same total weight in train.
    tot = k[k["split"] == "train"].groupby("label")["sample_weight"].sum()
    assert tot.max() / tot.min() == pytest.approx(1.0)
    flat = split.run(df, SplitConfig(weight_exponent=0), ctx()).kept
    assert (flat["sample_weight"] == 1.0).all()


def test_report_table_has_one_row_per_split():
    res = split.run(make_table(500, 4), SplitConfig(), ctx())
    rows = split.report_table(res.stats)
    assert [r["split"] for r in rows] == list(SPLITS)
    assert sum(r["rows"] for r in rows) == 500
    for r in rows:
        assert r["groups"] == res.kept.loc[res.kept["split"] == r["split"], "split_group"].nunique()
    assert {"groups", "ratio", "target", "deviation", "stratum", "label", "domain"} <= set(rows[0])
    d = res.stats["distributions"]
    assert sum(d["label"]["test"].values()) == res.stats["splits"]["test"]["rows"]


# --------------------------------------------------------------------------- decontam's clusters, a given split


def test_mirror_and_semantic_clusters_join_groups_and_the_leakage_check():
    df = make_table(400, 5)
    df["mirror_cluster"] = np.where(np.arange(400) % 40 < 2, np.arange(400) // 40, -1).astype(np.int64)
    df["semantic_cluster"] = np.where(np.arange(400) % 50 == 7, 1000, -1).astype(np.int64)
    res = split.run(df, SplitConfig(), ctx())
    assert_partition(df, res)
    k = res.kept
    for col in ("mirror_cluster", "semantic_cluster"):
        linked = k[k[col] >= 0]
        assert (linked.groupby(col)["split"].nunique() == 1).all(), col
        assert res.stats["leakage"][col] == 0
    # -1 is "no cluster": those rows are not one giant group.
    assert res.stats["largest_group"] < 20
    leaky = k.copy()
    leaky.loc[leaky.index[:2], "semantic_cluster"] = 5000
    leaky.loc[leaky.index[:2], "split"] = ["train", "test"]
    with pytest.raises(LeakageError, match="semantic_cluster"):
        split.check_leakage(leaky)


def test_given_mode_keeps_the_datasets_split_and_reports_leaks():
    df = make_table(300, 6, rows_per_image=2)
    df[tables.GIVEN_SPLIT] = pd.Series(np.array(["train", "restval", "val", "test", "dev", None], dtype=object)[np.arange(300) % 6],
                                       dtype="str")
    res = split.run(df, SplitConfig(mode="given"), ctx())
    assert_partition(df, res)
    q = res.quarantined
    assert set(q[tables.REASON]) == {"unknown_given_split"} and len(q) == 100
    assert q[tables.DETAIL].str.contains("given split 'dev' not in split.given_values|given split '<null>'").all()
    k = res.kept
    want = k[tables.GIVEN_SPLIT].map({"train": "train", "restval": "train", "val": "val", "test": "test"})
    assert (k["split"] == want).all()
    # Two captions of an image given to different splits: kept as given, the leak reported.
    assert res.stats["leakage"]["content_digest"] > 0
    assert any("the given split leaks" in w for w in res.stats["warnings"])
    with pytest.raises(ValidationError, match="given_values must map to train, val or test"):
        SplitConfig(mode="given", given_values={"train": "training"})
    with pytest.raises(ValidationError, match="fixed_test and holdout_domains"):
        SplitConfig(mode="given", holdout_domains=["flat"])
    with pytest.raises(InputError, match="missing column.*'given_split'"):
        split.run(make_table(20), SplitConfig(mode="given"), ctx())
