"""`movierec maintain`: compaction with Z-order, VACUUM that keeps time travel, safe retention."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from delta.tables import DeltaTable
from pyspark.sql import types as T

from movierec_spark import tables
from movierec_spark.maintain import MaintainError, maintain, prune_runs


def _frame(spark, name: str, rows: list[dict], drop: tuple[str, ...] = ()):
    """A frame of the contract's `name` from dicts (absent columns null), minus `drop`."""
    schema = T.StructType([f for f in tables.TABLE_SCHEMAS[name].fields if f.name not in drop])
    return spark.createDataFrame([tuple(r.get(f.name) for f in schema.fields) for r in rows], schema=schema)


def _recs(spark, run: str, users: range):
    rows = [{"run_id": run, "userId": u, "rank": r, "movieId": 1000 + u * 10 + r, "score": 1.0 / r,
             "source": "als_implicit"} for u in users for r in range(1, 4)]
    return _frame(spark, "recommendations", rows)


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


# ------------------------------------------------------------------------------------------
# Pruning old runs: model directories and per-run intermediate rows


def _save_model_dir(wh: Path, *parts: str) -> Path:
    """A stand-in for a saved Spark ML model: metadata/ and data/ with a file each."""
    d = wh.joinpath("_models", *parts)
    for sub in ("metadata", "data"):
        (d / sub).mkdir(parents=True)
        (d / sub / "part-00000").write_text("x")
    return d


def _run_ids(spark, wh: str, name: str) -> list:
    return sorted(r[0] for r in tables.read_table(spark, wh, name).select("run_id").distinct().collect())


def _prune_fixture(spark, root: Path) -> tuple[str, dict[str, Path]]:
    wh = root / "wh"
    now = dt.datetime.now(dt.timezone.utc)
    days = dt.timedelta(days=1)
    # run -> (kind, status, finished): r-old and r-eval-old are past any 168 h retention;
    # r-latest is as old but `latest` points at it; r-young finished an hour ago; r-running
    # started long ago and has not finished; "hybrid" is an old run whose id is also the name
    # of a legacy model directory (`_models/hybrid`, a saved model itself).
    runs = {"r-old": ("serve", "succeeded", now - 30 * days), "r-eval-old": ("evaluate", "succeeded", now - 40 * days),
            "r-latest": ("serve", "succeeded", now - 20 * days),
            "r-young": ("serve", "failed", now - dt.timedelta(hours=1)),
            "r-running": ("serve", "running", None), "hybrid": (None, "succeeded", now - 50 * days)}
    tables.append(spark, _frame(spark, "runs", [
        {"run_id": r, "kind": k, "status": s, "started_at": now - 60 * days, "finished_at": f}
        for r, (k, s, f) in runs.items()]), str(wh), "runs")
    tables.append(spark, _frame(spark, "latest", [
        {"table_name": t, "run_id": "r-latest", "table_version": 0, "updated_at": now - 20 * days}
        for t in ("recommendations", "similar_movies")]), str(wh), "latest")
    with_rows = ["r-old", "r-eval-old", "r-latest", "r-young", "r-running"]
    tables.append(spark, _frame(spark, "similar_movies", [
        {"run_id": r, "movieId": m, "similar_movieId": m + 1, "rank": 1, "similarity": 0.5}
        for r in with_rows for m in range(3)]), str(wh), "similar_movies")
    tables.append(spark, _frame(spark, "rating_splits", [
        {"run_id": r, "userId": u, "movieId": 7, "rating": 4.0, "split": "train"}
        for r in with_rows for u in range(4)]), str(wh), "rating_splits")
    tables.append(spark, _frame(spark, "features", [
        {"run_id": r, "userId": 1, "movieId": 7, "label": 4.0, "split": "train", "fold": 0}
        for r in ("r-old", "r-latest", "r-young")]), str(wh), "features")
    tables.append(spark, _recs(spark, "r-latest", range(3)), str(wh), "recommendations")
    dirs = {r: _save_model_dir(wh, r, "hybrid").parent for r in with_rows}
    _save_model_dir(wh, "r-old", "als_implicit")
    dirs["legacy"] = _save_model_dir(wh, "hybrid")
    return str(wh), dirs


@pytest.mark.heavy
def test_maintain_prunes_old_runs_but_keeps_the_latest_and_young_ones(spark, tmp_path):
    wh, dirs = _prune_fixture(spark, tmp_path)

    # --no-vacuum compacts only: nothing is pruned.
    rows = maintain(spark, wh, only=["similar_movies"], vacuum=False)
    assert rows.pruned is None and rows[0]["pruned_rows"] == 0 and all(d.is_dir() for d in dirs.values())
    assert _run_ids(spark, wh, "similar_movies") == ["r-eval-old", "r-latest", "r-old", "r-running", "r-young"]

    # --tables similar_movies: only that table's old rows; no model directory is touched.
    rows = maintain(spark, wh, only=["similar_movies"])
    assert rows.pruned["rows"] == {"similar_movies": 6} and rows.pruned["model_dirs"] == []
    assert rows[0]["pruned_rows"] == 6
    assert _run_ids(spark, wh, "similar_movies") == ["r-latest", "r-running", "r-young"]
    assert _run_ids(spark, wh, "rating_splits") == ["r-eval-old", "r-latest", "r-old", "r-running", "r-young"]
    assert all(d.is_dir() for d in dirs.values())

    rows = maintain(spark, wh)
    p = rows.pruned
    assert p["runs"] == ["r-eval-old", "r-old"] and p["kept"] == ["r-latest"] and p["retain_hours"] == 168.0
    assert p["rows"] == {"rating_splits": 8, "features": 1}
    assert sorted(os.path.basename(d.rstrip("/")) for d in p["model_dirs"]) == ["r-eval-old", "r-old"]
    by_table = {r["table"]: r for r in rows}
    assert by_table["rating_splits"]["pruned_rows"] == 8 and by_table["features"]["pruned_rows"] == 1
    assert by_table["recommendations"]["pruned_rows"] == 0
    # Gone: the old runs' model directories and rows.
    assert not dirs["r-old"].exists() and not dirs["r-eval-old"].exists()
    # Kept: the run `latest` points at, the young run, the unfinished run, the legacy model
    # directory (whose name is an old run's id) and everything outside the pruned tables.
    for name in ("r-latest", "r-young", "r-running"):
        assert (dirs[name] / "hybrid" / "metadata" / "part-00000").is_file()
    assert (dirs["legacy"] / "metadata" / "part-00000").is_file()
    assert _run_ids(spark, wh, "similar_movies") == ["r-latest", "r-running", "r-young"]
    assert _run_ids(spark, wh, "rating_splits") == ["r-latest", "r-running", "r-young"]
    assert _run_ids(spark, wh, "features") == ["r-latest", "r-young"]
    assert tables.read_table(spark, wh, "similar_movies").count() == 9
    assert tables.read_table(spark, wh, "runs").count() == 6
    assert _run_ids(spark, wh, "recommendations") == ["r-latest"]
    hist = [r.operation for r in DeltaTable.forPath(spark, tables.table_path(wh, "rating_splits")).history().collect()]
    assert "DELETE" in hist

    # Again: nothing left to prune, and no commit for nothing.
    version = DeltaTable.forPath(spark, tables.table_path(wh, "rating_splits")).history(1).first().version
    again = prune_runs(spark, wh, 168.0)
    assert again == {"runs": [], "model_dirs": [], "rows": {}, "kept": ["r-latest"], "retain_hours": 168.0}
    assert DeltaTable.forPath(spark, tables.table_path(wh, "rating_splits")).history(1).first().version == version

    # With a 100-day retention no run is old: nothing is pruned, nor held back for `latest`.
    longer = prune_runs(spark, wh, 24 * 100)
    assert longer["kept"] == [] and longer["runs"] == []


def test_maintain_leaves_tables_without_run_id_alone(spark, tmp_path):
    wh = tmp_path / "wh"
    now = dt.datetime.now(dt.timezone.utc)
    tables.append(spark, _frame(spark, "runs", [
        {"run_id": "r-old", "kind": None, "status": "succeeded", "started_at": now - dt.timedelta(days=31),
         "finished_at": now - dt.timedelta(days=30)}]), str(wh), "runs")
    # similar_movies as written before it had a run_id column.
    legacy = _frame(spark, "similar_movies", [{"movieId": 1, "similar_movieId": 2, "rank": 1, "similarity": 0.5}],
                    drop=("run_id",))
    legacy.write.format("delta").save(tables.table_path(str(wh), "similar_movies"))
    run_dir = _save_model_dir(wh, "r-old", "hybrid").parent
    legacy_dir = _save_model_dir(wh, "hybrid")

    rows = maintain(spark, str(wh))
    assert rows.pruned["rows"] == {} and rows.pruned["runs"] == ["r-old"]
    assert not run_dir.exists() and (legacy_dir / "metadata").is_dir()
    assert tables.read_table(spark, str(wh), "similar_movies").count() == 1
    assert "run_id" not in tables.read_table(spark, str(wh), "similar_movies").columns
