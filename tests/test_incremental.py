"""Incremental runs: new and changed ratings are merged, reach the outputs; unchanged input
commits nothing."""

from __future__ import annotations

import csv

import pytest

from delta.tables import DeltaTable
from pyspark.sql import functions as F

from movierec_spark import tables

STAGES = ["ingest", "split", "baselines"]
WATCHED = ["movies", "ratings", "tags", "links", "rejects", "rating_splits", "predictions", "top_n", "metrics"]


def _versions(spark, wh):
    out = {}
    for name in WATCHED:
        path = tables.table_path(wh, name)
        if tables.table_exists(spark, path):
            out[name] = DeltaTable.forPath(spark, path).history(1).first().version
    return out


@pytest.mark.heavy
def test_incremental_merges_changes_and_skips_when_nothing_changed(spark, tmp_path):
    from movierec_spark.generate import generate_dataset
    from movierec_spark.pipeline import run_pipeline

    from .conftest import make_config

    generate_dataset(tmp_path / "full", users=30, movies=60, ratings=1_200, seed=3)
    wh = tmp_path / "wh"
    cfg = make_config(wh, pipeline__mode="evaluate")
    run_pipeline(spark, cfg, str(tmp_path / "full"), stages=STAGES, run_id="r1")

    with open(tmp_path / "full" / "ratings.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    old = rows[0]
    rated = {(r["userId"], r["movieId"]) for r in rows}
    movie_ids = sorted({r["movieId"] for r in rows}, key=int)
    new_movie = next(m for m in movie_ids if (old["userId"], m) not in rated)
    changed_value = 0.5 if float(old["rating"]) != 0.5 else 5.0
    newer = tmp_path / "newer"
    newer.mkdir()
    with open(newer / "ratings.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        w.writerow([old["userId"], old["movieId"], changed_value, int(old["timestamp"]) + 60])
        w.writerow([old["userId"], new_movie, 4.0, int(old["timestamp"]) + 120])

    inc = make_config(wh, ingest__incremental=True, pipeline__mode="evaluate")
    ctx = run_pipeline(spark, inc, str(newer), stages=STAGES, run_id="r2")
    assert ctx.results["ingest"]["changed"] == 2 and "skipped" not in ctx.results

    ratings = tables.read_table(spark, str(wh), "ratings")
    assert ratings.count() == len(rows) + 1
    u, m = int(old["userId"]), int(old["movieId"])
    assert ratings.where((F.col("userId") == u) & (F.col("movieId") == m)).first().rating == changed_value
    # The next run's outputs saw it: the split carries the new value, and the global-mean
    # prediction of run r2 is the mean of a train part that includes it.
    splits = tables.read_table(spark, str(wh), "rating_splits").where("run_id = 'r2'")
    got = splits.where((F.col("userId") == u) & (F.col("movieId") == m)).first()
    assert got.rating == changed_value
    train_mean = splits.where("split = 'train'").agg(F.avg("rating")).first()[0]
    preds = tables.read_table(spark, str(wh), "predictions").where("model = 'global_mean'")
    p1 = preds.where("run_id = 'r1'").first().prediction
    p2 = preds.where("run_id = 'r2'").first().prediction
    assert abs(p2 - train_mean) < 1e-9 and p1 != p2

    # The same input again: nothing new or changed, so no table gets a new version and the
    # model stages are skipped (the run itself is recorded in `runs`).
    before = _versions(spark, str(wh))
    ctx = run_pipeline(spark, inc, str(newer), stages=STAGES, run_id="r3")
    assert ctx.results["ingest"]["changed"] == 0
    assert ctx.results["skipped"]["stages"] == ["split", "baselines"]
    assert _versions(spark, str(wh)) == before
    run = tables.read_table(spark, str(wh), "runs").where("run_id = 'r3'").first()
    assert run.status == "succeeded"


def test_another_dataset_is_refused_then_replaces_the_old_one_exactly(spark, tmp_path):
    """A plain ingest never merges a second dataset into a used warehouse; --replace makes every
    ingested table the new input exactly (rows absent from it deleted), in one commit per table."""
    import pytest
    from chispa import assert_df_equality

    from movierec_spark.generate import generate_dataset
    from movierec_spark.ingest import IngestError, ingest_dataset

    from .conftest import make_config

    # Two datasets of the same shape, different content (the old one stands in for
    # ml-latest-small, whose ingest would double the test's time).
    old, gen = tmp_path / "ml-old", tmp_path / "gen"
    generate_dataset(old, users=60, movies=90, ratings=2500, seed=6)
    generate_dataset(gen, users=40, movies=60, ratings=1500, seed=5)
    cfg = make_config(tmp_path / "wh")
    wh = cfg.paths.warehouse
    ingest_dataset(spark, cfg, str(old), "first")
    before = _versions(spark, wh)
    with pytest.raises(IngestError, match=r"holds another dataset: .*ml-old.*ingested by run first; "
                                          r"this input is .*gen.*--replace"):
        ingest_dataset(spark, cfg, str(gen), "second")
    assert _versions(spark, wh) == before  # refused before any table was touched
    # The same dataset again is fine (a rerun): nothing changes.
    ingest_dataset(spark, cfg, str(old), "again")
    assert _versions(spark, wh) == before

    summary = ingest_dataset(spark, make_config(tmp_path / "wh", ingest__replace=True), str(gen), "third")
    assert summary["ratings.csv"]["deleted"] > 0
    with open(gen / "ratings.csv", encoding="utf-8") as f:  # the generated file, read without Spark
        rows = [(int(r["userId"]), int(r["movieId"]), float(r["rating"])) for r in csv.DictReader(f)]
    want = spark.createDataFrame(rows, "userId int, movieId int, rating double")
    got = tables.read_table(spark, wh, "ratings").select("userId", "movieId", "rating")
    assert_df_equality(got, want, ignore_row_order=True, ignore_nullable=True)
    with open(gen / "movies.csv", encoding="utf-8") as f:
        movie_ids = sorted(int(r["movieId"]) for r in csv.DictReader(f))
    assert sorted(r.movieId for r in tables.read_table(spark, wh, "movies").collect()) == movie_ids
    history = DeltaTable.forPath(spark, tables.table_path(wh, "ratings")).history(1).first()
    assert history.operation == "MERGE" and history.version == before["ratings"] + 1  # one commit
    modes = [r.mode for r in tables.read_table(spark, wh, "sources").orderBy("ingested_at").collect()]
    assert modes == ["full", "replace"]
