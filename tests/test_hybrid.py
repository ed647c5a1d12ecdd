"""Hybrid: features without leakage, the GBT, the final recommendations (small generated set)."""

from __future__ import annotations

import json
import math

import pytest
from delta.tables import DeltaTable
from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.features import FEATURES
from movierec_spark.hybrid import model_features



def test_every_test_pair_gets_a_hybrid_prediction(hybrid_run):
    spark, cfg, _ = hybrid_run
    wh = cfg.paths.warehouse
    test = tables.read_table(spark, wh, "rating_splits").where("split = 'test' AND run_id = 'hy'")
    preds = tables.read_table(spark, wh, "predictions").where("run_id = 'hy' AND model = 'hybrid'")
    assert preds.count() == test.count()
    assert preds.join(test, ["userId", "movieId"], "left_anti").count() == 0
    assert preds.where(F.isnan("prediction") | (F.col("prediction") < 0.5) | (F.col("prediction") > 5.0)).count() == 0
    feats = tables.read_table(spark, wh, "features").where("run_id = 'hy'")
    # Train rows are out-of-fold: each appears once, in the fold its hash gives it.
    train = tables.read_table(spark, wh, "rating_splits").where("split = 'train' AND run_id = 'hy'")
    tf = feats.where("split = 'train'")
    assert tf.count() == train.count() and tf.select("userId", "movieId").distinct().count() == train.count()
    assert feats.where(" OR ".join(f"isnan({c}) OR {c} IS NULL" for c in FEATURES)).count() == 0
    imp = {r.feature: r.importance for r in tables.read_table(spark, wh, "feature_importances").where("run_id = 'hy'").collect()}
    # One importance per column the GBT took: FEATURES less hybrid.exclude_features, and less
    # the demographic group, which a dataset without users' demographics leaves constant.
    assert set(imp) == set(model_features(cfg.hybrid)) - set(tables.FEATURE_GROUPS["demo"])
    assert math.isclose(sum(imp.values()), 1.0, abs_tol=1e-6)
    assert feats.where("u_age != -1 OR u_male != -1 OR demo_res != 0 OR occ_res != 0").isEmpty()
    assert "day_res" in imp and "knn_item" not in imp


def test_recommendations_contract(serve_run):
    spark, cfg, _ = serve_run
    wh = cfg.paths.warehouse
    n = cfg.evaluation.top_n
    recs = tables.read_table(spark, wh, "recommendations").where("run_id = 'sv'")
    train = tables.read_table(spark, wh, "rating_splits").where("split = 'train' AND run_id = 'sv'")
    # Every user with n movies left unrated gets exactly n, ranked 1..n, none of them rated (on
    # this 150-movie catalog some users rated everything: tests/test_serve.py counts those).
    per_user = recs.groupBy("userId").agg(F.count(F.lit(1)).alias("c"), F.max("rank").alias("m"))
    n_movies = tables.read_table(spark, wh, "movies").count()
    users = train.groupBy("userId").count().where(f"count <= {n_movies - n}").select("userId")
    assert per_user.join(users, "userId").where(f"c != {n} OR m != {n}").count() == 0
    assert users.join(per_user, "userId", "left_anti").count() == 0
    assert recs.join(train, ["userId", "movieId"]).count() == 0
    sources = {r.source for r in recs.select("source").distinct().collect()}
    assert sources <= set(cfg.hybrid.candidate_models) | {"popular_cold"}
    # A content pick names the watched movie behind it, and the user did rate that movie.
    content = recs.where("source = 'content'")
    assert content.where("because_movieId IS NULL").count() == 0
    assert content.join(train.select("userId", F.col("movieId").alias("because_movieId")),
                        ["userId", "because_movieId"], "left_anti").count() == 0
    # Scores fall with rank.
    r = recs.alias("a").join(recs.alias("b"), (F.col("a.userId") == F.col("b.userId")) & (F.col("b.rank") == F.col("a.rank") + 1))
    assert r.where("b.score > a.score + 1e-12 AND a.source != 'popular_cold'").count() == 0
    # A serve run's quality figures are validation ones (rows held out inside the run).
    m = {(x.model, x.metric, x.k, x.split) for x in tables.read_table(spark, wh, "metrics").where("run_id = 'sv'").collect()}
    assert ("hybrid", "rmse", None, "validation") in m and ("hybrid", "ndcg", 10, "validation") in m
    assert {x[3] for x in m} == {"validation"}


@pytest.mark.parametrize("kind", ["evaluate", "serve"])
def test_every_table_reads_the_same_in_delta_rs_and_duckdb(kind, request):
    """Interop: each table the pipeline wrote, read without a JVM (delta-rs, and DuckDB over
    the Arrow dataset delta-rs gives), has the row count Spark sees."""
    import duckdb
    from deltalake import DeltaTable as RsTable

    spark, cfg, _ = request.getfixturevalue("hybrid_run" if kind == "evaluate" else "serve_run")
    wh = cfg.paths.warehouse
    written = [n for n in tables.TABLE_SCHEMAS if tables.table_exists(spark, tables.table_path(wh, n))]
    # Everything the full pipeline writes on a dataset without genome or demographics: an
    # evaluate run its held-out predictions, a serve run the recommendations `latest` names.
    common = {"movies", "ratings", "tags", "links", "rejects", "runs", "rating_splits", "similar_movies", "metrics",
              "top_n", "features", "feature_importances"}
    # (The serve fixture skips explicit ALS, whose factor tables nothing it serves reads.)
    own = ({"predictions", "als_user_factors", "als_item_factors"} if kind == "evaluate"
           else {"recommendations", "latest"})
    assert set(written) >= common | own
    assert not set(written) & ({"recommendations", "latest"} if kind == "evaluate" else {"predictions"})
    for name in written:
        path = tables.table_path(wh, name)
        spark_rows = tables.read_table(spark, wh, name).count()
        ds = RsTable(path).to_pyarrow_dataset()
        with duckdb.connect() as con:
            con.register("t", ds)
            duck_rows = con.execute("SELECT COUNT(*) FROM t").fetchall()[0][0]
        assert (name, ds.count_rows(), duck_rows) == (name, spark_rows, spark_rows)


def test_latest_pointer_names_the_run_and_its_version(serve_run):
    from movierec_spark import query

    spark, cfg, _ = serve_run
    wh = cfg.paths.warehouse
    row = tables.read_table(spark, wh, "latest").where("table_name = 'recommendations'").collect()
    assert len(row) == 1 and row[0].run_id == "sv"
    # The version it names holds that run's rows (time travel to it gives the same list).
    at = spark.read.format("delta").option("versionAsOf", row[0].table_version).load(
        tables.table_path(wh, "recommendations")).where("run_id = 'sv'").count()
    assert at == tables.read_table(spark, wh, "recommendations").where("run_id = 'sv'").count() > 0
    user = tables.read_table(spark, wh, "recommendations").first().userId
    got = query.recs(wh, user)
    assert got.meta["run_id"] == "sv" and "table `latest`" in got.notes[0] and got.rows


def test_shuffled_labels_do_not_beat_the_bias_baseline(hybrid_run):
    """Trained on permuted labels the GBT has nothing to learn: if it still beat the bias
    baseline, the test features would be carrying the test ratings."""
    from movierec_spark.evaluation import rating_metrics
    from movierec_spark.hybrid import fit_hybrid, predict_hybrid

    spark, cfg, _ = hybrid_run
    wh = cfg.paths.warehouse
    feats = tables.read_table(spark, wh, "features").where("run_id = 'hy'")
    train = feats.where("split = 'train'")
    order = lambda seed: F.row_number().over(__import__("pyspark.sql", fromlist=["Window"]).Window.orderBy(  # noqa: E731
        F.xxhash64("userId", "movieId", F.lit(seed))))
    keyed = train.withColumn("i", order(1)).drop("label")
    labels = train.select(F.col("label"), order(2).alias("i"))
    shuffled = keyed.join(labels, "i").drop("i")
    model, _, _ = fit_hybrid(shuffled, cfg.hybrid, 42)
    test = feats.where("split = 'test'")
    rmse = rating_metrics(predict_hybrid(model, test).select(F.col("label").alias("rating"), "prediction"))["rmse"]
    bias = rating_metrics(test.select(F.col("label").alias("rating"), F.col("baseline").alias("prediction")))["rmse"]
    assert rmse > bias


@pytest.mark.heavy
def test_large_data_plan_features_one_sampled_fold_and_test_rows_from_its_fit(hybrid_run, tmp_path):
    """With train larger than hybrid.max_train_rows the stage featurises one fold's hash sample
    and (test_features auto -> fold) the test rows from the same fit, train minus fold 0: the
    test rows' UAvg and m_n must be those of train without fold 0, not of the whole train part."""
    import shutil

    from movierec_spark.features import gbt_sample
    from movierec_spark.pipeline import run_pipeline

    spark, cfg, ctx = hybrid_run
    assert ctx.results["features"]["test_features"] == "full"  # small data: the default plan
    wh = str(tmp_path / "wh")
    shutil.copytree(cfg.paths.warehouse, wh)
    h = cfg.hybrid.model_copy(update=dict(max_train_rows=1000))
    big = cfg.model_copy(update=dict(hybrid=h, paths=cfg.paths.model_copy(update=dict(warehouse=wh))))
    res = run_pipeline(spark, big, None, stages=["features"], run_id="hy-plan").results["features"]
    # A run that wrote no split of its own reads the newest one of its kind: hy's.
    splits = tables.read_table(spark, wh, "rating_splits").where("run_id = 'hy'")
    train = splits.where("split = 'train'")
    n_train = train.count()
    assert res["oof_folds"] == 1 and res["test_features"] == "fold"
    frac = 1000 / (n_train / 2)  # 2 folds: one fold's rows, cut to max_train_rows
    assert res["oof_fraction"] == pytest.approx(frac, abs=1e-4)
    seed = cfg.pipeline.seed
    fold0 = train.where(F.pmod(F.xxhash64("userId", "movieId", F.lit(seed)), F.lit(2)) == 0)
    rest = train.join(fold0.select("userId", "movieId"), ["userId", "movieId"], "left_anti")
    feats = tables.read_table(spark, wh, "features").where("run_id = 'hy-plan'")
    tr = feats.where("split = 'train'")
    want = fold0.where(gbt_sample(seed, frac))
    assert tr.count() == want.count() and 800 <= tr.count() <= 1200
    assert tr.join(want, ["userId", "movieId"], "left_anti").count() == 0
    te = feats.where("split = 'test'")
    assert te.count() == splits.where("split = 'test'").count()
    u = rest.groupBy("userId").agg(F.avg("rating").alias("want_u"))
    m = rest.groupBy("movieId").agg(F.count(F.lit(1)).cast("double").alias("want_m"))
    chk = te.join(u, "userId").join(m, "movieId")
    assert chk.count() > 0.9 * te.count()
    assert chk.where(F.abs(F.col("UAvg") - F.col("want_u")) > 1e-9).count() == 0
    assert chk.where(F.col("m_n") != F.col("want_m")).count() == 0


def test_a_rows_own_rating_never_reaches_its_features(hybrid_run):
    """Change one train rating and rebuild the features: that row's features stay the same."""
    from movierec_spark.pipeline import run_pipeline

    spark, cfg, _ = hybrid_run
    wh = cfg.paths.warehouse
    before = (tables.read_table(spark, wh, "features").where("split = 'train' AND run_id = 'hy'")
              .orderBy("userId", "movieId").first())
    u, m = before.userId, before.movieId
    dt = DeltaTable.forPath(spark, tables.table_path(wh, "rating_splits"))
    new = 0.5 if before.label > 2.5 else 5.0
    dt.update(f"userId = {u} AND movieId = {m}", {"rating": F.lit(new)})
    # (Runs last in this module: it leaves the changed rating and features behind.) Rebuilt with
    # two feature threads, so the passes-side-by-side path is held to the same values as the
    # one-at-a-time path that built `before`.
    threaded = cfg.model_copy(update=dict(hybrid=cfg.hybrid.model_copy(update=dict(feature_threads=2))))
    run_pipeline(spark, threaded, None, stages=["features"], run_id="hy-changed")
    after = tables.read_table(spark, wh, "features").where(
        f"userId = {u} AND movieId = {m} AND split = 'train' AND run_id = 'hy-changed'").first()
    assert after.label == new  # the label moved...
    for c in FEATURES:  # ...its features did not (float tolerance for ALS's summation order)
        assert getattr(after, c) == pytest.approx(getattr(before, c), rel=1e-4, abs=1e-4), c


def test_demographic_features_stay_only_where_they_lower_the_validation_rmse(spark):
    # The hybrid stage's choice on feature rows whose label follows demo_res: with the group the
    # validation RMSE is lower, so it is kept; rows without demographics (every user -1) never
    # cost a second fit and the GBT leaves the constant columns out.
    from movierec_spark.config import HybridConfig
    from movierec_spark.stages import _fit_with_demographics

    h = HybridConfig(max_iter=15, max_depth=3, min_instances_per_node=5)
    demo = tables.FEATURE_GROUPS["demo"]
    # Keyed like every feature row: the GBT's input is laid out by (userId, movieId).
    base = spark.range(3000).select(
        F.col("id").cast("int").alias("userId"), F.lit(1).alias("movieId"),
        *[(F.rand(seed=i) * 2).alias(c) for i, c in enumerate(FEATURES) if c not in demo],
        F.lit(30.0).alias("u_age"), (F.col("id") % 2).cast("double").alias("u_male"),
        (F.rand(seed=99) * 2 - 1).alias("demo_res"), F.lit(0.0).alias("occ_res"),
        (F.rand(seed=7) < 0.2).alias("is_val"))
    rows = base.withColumn("label", 3.0 + 1.5 * F.col("demo_res") + F.rand(seed=5) * 0.2).cache()
    model, imp, trees, out = _fit_with_demographics(rows, h, 42, 0.5, 5.0)
    d = out["demographics"]
    assert d["kept"] and d["rmse_with"] < 0.5 * d["rmse_without"]
    assert {"demo_res", "u_male"} <= {f for f, _ in imp} and trees == 15
    # A gain below hybrid.demographics_min_gain is not told from noise: the group is left out.
    _, imp, _, out = _fit_with_demographics(rows, h.model_copy(update={"demographics_min_gain": 10.0}), 42, 0.5, 5.0)
    assert not out["demographics"]["kept"] and not set(demo) & {f for f, _ in imp}
    none = rows.withColumn("u_age", F.lit(-1.0)).withColumn("u_male", F.lit(-1.0))
    _, imp, _, out = _fit_with_demographics(none, h, 42, 0.5, 5.0)
    assert out == {} and not set(demo) & {f for f, _ in imp}
    rows.unpersist()


def test_the_gbt_learns_the_same_model_from_the_same_rows_in_any_order(spark):
    # MLlib draws each tree's subsample and split candidates per partition: without gbt_input's
    # fixed layout, rows that arrive in one partition in another order fit another model (a
    # refactor that changed no value once moved ml-latest-small's test nDCG@10 by 0.013).
    from chispa import assert_df_equality

    from movierec_spark.config import HybridConfig
    from movierec_spark.hybrid import fit_hybrid, predict_hybrid

    # A subsample below 1, so the draw is there to move (under 10,000 rows MLlib takes every
    # row's value as a split candidate: subsample 1.0 would draw nothing).
    h = HybridConfig(max_iter=8, max_depth=3, min_instances_per_node=5, validation_fraction=0.0, subsample=0.8)
    rows = spark.range(4000).select(
        (F.col("id") % 400).cast("int").alias("userId"), (F.col("id") / 400).cast("int").alias("movieId"),
        *[(F.rand(seed=i) * 2).alias(c) for i, c in enumerate(FEATURES)])
    rows = rows.withColumn("label", 3.0 + F.col("als") - F.col("baseline") + F.rand(seed=5) * 0.5).cache()
    ascending = rows.orderBy("userId", "movieId").coalesce(1)
    descending = rows.orderBy(F.col("userId").desc(), F.col("movieId").desc()).coalesce(1)
    assert ascending.first().userId != descending.first().userId  # two orders, one partition each
    preds = []
    for layout in (ascending, descending, rows.repartition(5)):
        model, _, trees = fit_hybrid(layout, h, 42)
        assert trees == 8
        preds.append(predict_hybrid(model, rows.select("userId", "movieId", *FEATURES))
                     .select("userId", "movieId", "prediction"))
    for other in preds[1:]:
        assert_df_equality(preds[0], other, ignore_row_order=True)
    rows.unpersist()


def test_gbt_input_is_a_checkpoint_of_the_same_rows_in_the_fixed_layout(spark):
    # The learners run a job per tree level on it: a checkpoint, so those jobs carry no query plan
    # behind it, holding exactly the input's rows, one partition per core, sorted by (user, movie).
    from chispa import assert_df_equality

    from movierec_spark.features import gbt_input
    from movierec_spark.session import release

    rows = spark.createDataFrame([(3, 1, 1.0), (1, 2, 2.0), (2, 9, 3.0), (1, 1, 4.0), (3, 0, 5.0)],
                                 "userId int, movieId int, label double")
    out = gbt_input(rows)
    assert out._jdf.queryExecution().logical().nodeName() == "LogicalRDD"  # not the query above it
    assert out.rdd.getNumPartitions() == spark.sparkContext.defaultParallelism
    assert_df_equality(out, rows, ignore_row_order=True)
    for part in out.rdd.glom().collect():  # five rows: sorted within each partition
        keys = [(r.userId, r.movieId) for r in part]
        assert keys == sorted(keys)
    release(out)


def test_the_stage_records_count_what_the_tables_hold(hybrid_run):
    # The content and recommend stages' record figures come from one aggregation each: they must
    # still be the figures the written tables give.
    spark, cfg, ctx = hybrid_run
    wh = cfg.paths.warehouse
    rec = {r.stage: json.loads(r.result) for r in
           tables.read_table(spark, wh, "run_stages").where(f"run_id = '{ctx.run_id}'").collect()}
    lists = tables.read_table(spark, wh, "top_n").where(f"run_id = '{ctx.run_id}' AND model = 'hybrid'")
    per_user = {r.userId: r.m for r in lists.groupBy("userId").agg(F.max("rank").alias("m")).collect()}
    assert rec["recommend"]["users"] == len(per_user) > 0
    assert rec["recommend"]["users_short_of_n"] == sum(m < cfg.evaluation.top_n for m in per_user.values())
    movies = tables.read_table(spark, wh, "movies").count()
    with_neighbours = (tables.read_table(spark, wh, "similar_movies").where(f"run_id = '{ctx.run_id}'")
                       .select("movieId").distinct().count())
    assert rec["content"]["movies"] == movies
    assert 0 <= rec["content"]["without_content"] <= movies - with_neighbours
