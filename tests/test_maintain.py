"""`movierec maintain`: compaction with Z-order, VACUUM that keeps time travel, safe retention."""

from __future__ import annotations

import pytest
from delta.tables import DeltaTable

from movierec_spark import tables
from movierec_spark.maintain import MaintainError, maintain


def _recs(spark, run: str, users: range):
    rows = [(run, u, r, 1000 + u * 10 + r, 1.0 / r, "als_implicit", None) for u in users for r in range(1, 4)]
    return spark.createDataFrame(rows, schema=tables.TABLE_SCHEMAS["recommendations"])


def test_maintain_compacts_zorders_and_keeps_history(spark, tmp_path):
    wh = str(tmp_path / "wh")
    # Three runs, three writes: at least three data files.
    for i, run in enumerate(["r1", "r2", "r3"]):
        tables.replace_where(spark, _recs(spark, run, range(i * 50, i * 50 + 50)), wh, "recommendations", {"run_id": run})
    path = tables.table_path(wh, "recommendations")
    dt = DeltaTable.forPath(spark, path)
    before_files = dt.detail().first().numFiles
    before_version = dt.history(1).first().version
    assert before_files >= 3

    rows = maintain(spark, wh)
    (row,) = rows
    assert row["table"] == "recommendations" and row["zorder"] == "userId"
    assert row["files_before"] == before_files and row["files_after"] == 1
    hist = [r.operation for r in dt.history().collect()]
    assert "OPTIMIZE" in hist
    # Same rows after compaction; the 168-hour retention deleted nothing a version still needs,
    # so the pre-OPTIMIZE version still reads.
    assert tables.read_table(spark, wh, "recommendations").count() == 450
    old = spark.read.format("delta").option("versionAsOf", before_version).load(path)
    assert old.count() == 450 and row["vacuumed"] in (0, None)


def test_maintain_refuses_unsafe_retention_and_unknown_tables(spark, tmp_path):
    wh = str(tmp_path / "wh")
    tables.replace_where(spark, _recs(spark, "r1", range(5)), wh, "recommendations", {"run_id": "r1"})
    with pytest.raises(MaintainError, match="below the safe minimum"):
        maintain(spark, wh, retain_hours=1)
    with pytest.raises(MaintainError, match="not tables of"):
        maintain(spark, wh, only=["nope"])
    with pytest.raises(MaintainError, match="no movierec tables"):
        maintain(spark, str(tmp_path / "empty"))
