"""The clean stage: caption normalisation and one reason per kind of bad row."""

from __future__ import annotations

import pandas as pd
import pytest

from mmcore import clean, synth, tables
from mmcore.base import DataConfig, StageContext
from mmcore.errors import InputError


def _ctx(tmp_path, manifest, **data) -> StageContext:
    return StageContext(data=DataConfig(manifest=manifest, **data), run_dir=tmp_path / "run")


def _run(tmp_path, rows: list[dict], cfg: clean.CleanConfig | None = None, **data):
    path = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    ctx = _ctx(tmp_path, path, **data)
    table = clean.read_manifest(ctx.data)
    return table, clean.run(table, cfg or clean.CleanConfig(), ctx)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty_caption"),
        ("   \t ", "empty_caption"),
        ("cat", "caption_too_short"),
        ("onlyoneword", "caption_too_short"),
        ("x " * 600, "caption_too_long"),
        ("#### 1234 5678 $$$$ %%%%", "non_text_caption"),
        ("dog dog dog dog dog dog dog dog", "repetitive_caption"),
    ],
)
def test_each_caption_defect_has_its_reason(tmp_path, text, reason):
    rows = [{"image_path": "a.jpg", "text": "a red circle on the left"}, {"image_path": "b.jpg", "text": text}]
    _, res = _run(tmp_path, rows)
    assert res.kept[tables.ROW_ID].tolist() == [0]
    assert res.quarantined[tables.REASON].tolist() == [reason]
    assert res.quarantined[tables.DETAIL].iloc[0] != ""


def test_empty_image_path_and_duplicate_pair(tmp_path):
    rows = [
        {"image_path": "a.jpg", "text": "a red circle on the left"},
        {"image_path": "", "text": "a blue square at the top"},
        {"image_path": "a.jpg", "text": "A  red circle on the LEFT"},  # same pair after normalisation
        {"image_path": "a.jpg", "text": "a second caption for the same image"},  # kept: several captions
    ]
    _, res = _run(tmp_path, rows)
    assert res.kept[tables.ROW_ID].tolist() == [0, 3]
    assert dict(zip(res.quarantined[tables.ROW_ID], res.quarantined[tables.REASON])) == {
        1: "empty_image_path",
        2: "duplicate_pair",
    }


def test_normalisation_fixes_mojibake_entities_whitespace_and_keeps_other_scripts(tmp_path):
    rows = [
        {"image_path": "a.jpg", "text": "a caf\u00e9 \u2014 tr\u00e8s joli".encode().decode("cp1252")},
        {"image_path": "b.jpg", "text": "fish &amp; chips &lt;b&gt;"},
        {"image_path": "c.jpg", "text": "  a   red\tcircle \n on the  left  "},
        {"image_path": "d.jpg", "text": "一个红色的圆形在图片的左边"},
        {"image_path": "e.jpg", "text": "красный круг слева"},
        {"image_path": "f.jpg", "text": "دائرة حمراء على اليسار"},
    ]
    _, res = _run(tmp_path, rows)
    assert res.kept[tables.TEXT].tolist() == [
        "a café — très joli",
        "fish & chips <b>",
        "a red circle on the left",
        "一个红色的圆形在图片的左边",
        "красный круг слева",
        "دائرة حمراء على اليسار",
    ]
    assert res.kept[tables.TEXT_RAW].iloc[2] == rows[2]["text"]
    assert res.stats["n_ftfy_fixed"] == 1 and res.stats["n_html_unescaped"] == 1


def test_thresholds_are_config(tmp_path):
    rows = [{"image_path": "a.jpg", "text": "two words"}]
    _, strict = _run(tmp_path, rows, clean.CleanConfig(min_words=3))
    _, lenient = _run(tmp_path, rows, clean.CleanConfig(min_words=2))
    assert len(strict.kept) == 0 and len(lenient.kept) == 1


def test_column_mapping_time_parsing_and_passthrough(tmp_path):
    rows = [
        {"file": "a.jpg", "caption": "a red circle on the left", "when": "2025-01-02T03:04:05Z", "extra": 1},
        {"file": "b.jpg", "caption": "a blue square at the top", "when": "yesterday", "extra": 2},
    ]
    table, res = _run(tmp_path, rows, image_column="file", text_column="caption", time_column="when")
    assert {tables.IMAGE, tables.TEXT, tables.TIME, "extra"} <= set(res.kept.columns)
    assert str(res.kept[tables.TIME].dtype).startswith("datetime64")
    assert res.quarantined[tables.REASON].tolist() == ["invalid_time"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_manifest_formats(tmp_path, suffix):
    df = pd.DataFrame({"image_path": ["a.jpg", "b.jpg"], "text": ["a red circle on the left", "NA"]})
    path = tmp_path / f"m{suffix}"
    {".csv": lambda: df.to_csv(path, index=False), ".parquet": lambda: df.to_parquet(path),
     ".jsonl": lambda: df.to_json(path, orient="records", lines=True)}[suffix]()
    table = clean.read_manifest(DataConfig(manifest=path))
    assert table[tables.ROW_ID].tolist() == [0, 1]
    assert table["text"].tolist() == ["a red circle on the left", "NA"]  # "NA" is text, not a null


def test_missing_column_is_one_line_error(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"image_path": ["a.jpg"], "caption": ["x"]}).to_csv(path, index=False)
    with pytest.raises(InputError, match=r"data.text_column: column 'text' not in manifest .*got 'image_path', 'caption'"):
        clean.check_columns(DataConfig(manifest=path))
    with pytest.raises(InputError, match="data.manifest: file not found"):
        clean.read_manifest(DataConfig(manifest=tmp_path / "nope.csv"))
    (tmp_path / "m.xml").write_text("<x/>")
    with pytest.raises(InputError, match="unsupported format '.xml'"):
        clean.read_manifest(DataConfig(manifest=tmp_path / "m.xml"))


def test_planted_caption_defects_are_caught(synth_small, tmp_path):
    ctx = _ctx(tmp_path, synth_small / "manifest.csv", group_column="scene_id", time_column="timestamp")
    table = clean.read_manifest(ctx.data)
    res = clean.run(table, clean.CleanConfig(), ctx)
    planted = synth.planted(synth_small)
    got = dict(zip(res.quarantined[tables.ROW_ID], res.quarantined[tables.REASON]))
    for row in planted.itertuples():
        if row.stage == "clean":
            assert got.get(row.row_id) == row.reason, row
        else:
            assert row.row_id not in got, row  # rows other stages must judge pass clean
    kept = res.kept.set_index(tables.ROW_ID)
    for row in planted[planted.expected_text != ""].itertuples():
        assert kept.loc[row.row_id, tables.TEXT] == row.expected_text  # repaired, or intact


def test_accounting_holds(synth_small, tmp_path):
    ctx = _ctx(tmp_path, synth_small / "manifest.csv")
    table = clean.read_manifest(ctx.data)
    res = clean.run(table, clean.CleanConfig(), ctx)
    tables.check_accounting("clean", table[tables.ROW_ID].to_numpy(), res.kept, res.quarantined)
    assert len(res.kept) + len(res.quarantined) == len(table)
