"""The artifact contract: accounting, atomic and deterministic writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mmcore import tables
from mmcore.errors import AccountingError


def _df(ids):
    return pd.DataFrame({tables.ROW_ID: np.asarray(ids, dtype=np.int64), "x": [str(i) for i in ids]})


def test_accounting_catches_lost_duplicated_and_overlapping_rows():
    inp = np.arange(5)
    tables.check_accounting("s", inp, _df([0, 1, 2]), tables.quarantine(_df([3, 4]), "r"))
    with pytest.raises(AccountingError, match="1 lost"):
        tables.check_accounting("s", inp, _df([0, 1, 2]), tables.quarantine(_df([3]), "r"))
    with pytest.raises(AccountingError, match="both kept and quarantined"):
        tables.check_accounting("s", inp, _df([0, 1, 2, 3]), tables.quarantine(_df([3, 4]), "r"))
    with pytest.raises(AccountingError, match="1 duplicated"):
        tables.check_accounting("s", inp, _df([0, 1, 2, 2]), tables.quarantine(_df([3, 4]), "r"))


def test_write_stage_is_deterministic_and_sorted(tmp_path):
    kept, q = _df([4, 0, 2]), tables.quarantine(_df([3, 1]), "bad", "why")
    res = tables.StageResult(kept, q, {"extra": 1})
    s1 = tables.write_stage(tmp_path / "a", "clean", res, input_ids=np.arange(5), input_digest="d", seconds=0.1)
    s2 = tables.write_stage(tmp_path / "b", "clean", res, input_ids=np.arange(5), input_digest="d", seconds=0.2)
    assert s1["kept_digest"] == s2["kept_digest"] and s1["quarantine_digest"] == s2["quarantine_digest"]
    out = tables.load(tmp_path / "a", "clean")
    assert out[tables.ROW_ID].tolist() == [0, 2, 4]
    qq = tables.load(tmp_path / "a", "clean", quarantine=True)
    assert qq[[tables.STAGE, tables.REASON, tables.DETAIL]].iloc[0].tolist() == ["clean", "bad", "why"]
    assert s1["reasons"] == {"bad": 2} and s1["extra"] == 1


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    tables.write_parquet(_df([1, 2]), path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tables.pq, "write_table", boom)
    with pytest.raises(OSError):
        tables.write_parquet(_df([1, 2, 3]), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no temporary left behind


def test_partition_first_failing_check_wins():
    df = _df([0, 1, 2])
    a = pd.Series([True, True, False])
    b = pd.Series([False, True, True])
    res = tables.partition(df, [("a", a, "da"), ("b", b, "db")])
    assert res.kept[tables.ROW_ID].tolist() == []
    assert res.quarantined.set_index(tables.ROW_ID)[tables.REASON].to_dict() == {0: "a", 1: "a", 2: "b"}
