"""Splits, baselines and ALS: facts that must hold, on toy data and on ml-latest-small."""

from __future__ import annotations

import datetime as dt

import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from movierec_spark.baselines import fit_bias, popularity_top_n
from movierec_spark.config import BaselineConfig, SplitConfig
from movierec_spark.splits import split_ratings

SCHEMA = T.StructType([
    T.StructField("userId", T.IntegerType()), T.StructField("movieId", T.IntegerType()),
    T.StructField("rating", T.DoubleType()), T.StructField("rated_at", T.TimestampType()),
])


def synthetic(spark, users=60, movies=40, seed=3):
    import random

    rnd = random.Random(seed)
    rows = []
    for u in range(1, users + 1):
        for m in rnd.sample(range(1, movies + 1), rnd.randint(1, 25)):
            rows.append((u, m, float(rnd.randint(1, 10)) / 2, dt.datetime(2000, 1, 1) + dt.timedelta(days=rnd.randint(0, 3000))))
    return spark.createDataFrame(rows, SCHEMA)


@pytest.mark.parametrize("method", ["random", "stratified", "temporal_global", "temporal_user"])
def test_split_partitions_rows_disjointly_and_deterministically(spark, method):
    ratings = synthetic(spark)
    cfg = SplitConfig(method=method, test_ratio=0.25, last_n=2)
    a = split_ratings(ratings, cfg, 42)
    # Same result from a differently partitioned input: the split is a function of the rows.
    b = split_ratings(ratings.repartition(7), cfg, 42)
    ra = sorted(map(tuple, a.select("userId", "movieId", "split").collect()))
    rb = sorted(map(tuple, b.select("userId", "movieId", "split").collect()))
    assert ra == rb
    assert len(ra) == ratings.count()
    both = a.groupBy("userId", "movieId").agg(F.countDistinct("split").alias("n")).where("n > 1").count()
    assert both == 0  # no (userId, movieId) is in train and test
    n_test = a.where("split = 'test'").count()
    assert 0 < n_test < len(ra)


def test_random_split_ratio_and_seed(spark):
    ratings = synthetic(spark, users=200)
    n = ratings.count()
    t42 = split_ratings(ratings, SplitConfig(test_ratio=0.2), 42).where("split = 'test'")
    t7 = split_ratings(ratings, SplitConfig(test_ratio=0.2), 7).where("split = 'test'")
    assert abs(t42.count() / n - 0.2) < 0.03
    assert sorted(t42.select("userId", "movieId").collect()) != sorted(t7.select("userId", "movieId").collect())


def test_stratified_split_every_user_in_both(spark):
    ratings = synthetic(spark)
    s = split_ratings(ratings, SplitConfig(method="stratified", test_ratio=0.25), 42)
    per_user = s.groupBy("userId").agg(
        F.count("*").alias("n"), F.sum(F.when(F.col("split") == "test", 1).otherwise(0)).alias("t")).collect()
    for r in per_user:
        if r.n >= 2:
            assert 1 <= r.t <= r.n - 1 and r.t == min(max(int(r.n * 0.25 + 0.5), 1), r.n - 1)  # half-up, like Spark
        else:
            assert r.t == 0


def test_temporal_user_split_takes_the_last(spark):
    rows = [(1, m, 3.0, dt.datetime(2001, 1, m)) for m in range(1, 6)] + [(2, 1, 4.0, dt.datetime(2001, 1, 1))]
    s = split_ratings(spark.createDataFrame(rows, SCHEMA), SplitConfig(method="temporal_user", last_n=2), 1)
    assert sorted((r.userId, r.movieId) for r in s.where("split = 'test'").collect()) == [(1, 4), (1, 5)]


def test_bias_baseline_matches_hand_computation(spark):
    rows = [(1, 10, 5.0, None), (1, 20, 3.0, None), (2, 10, 4.0, None)]
    train = spark.createDataFrame(rows, SCHEMA)
    m = fit_bias(train, BaselineConfig(item_reg=1.0, user_reg=1.0, iterations=1))
    mu = 4.0
    # b_i = sum(r - mu) / (n_i + 1): movie 10 -> (1 + 0) / 3, movie 20 -> (-1) / 2
    bi = {10: 1 / 3, 20: -0.5}
    # b_u = sum(r - mu - b_i) / (n_u + 1)
    bu = {1: ((5 - mu - bi[10]) + (3 - mu - bi[20])) / 3, 2: (4 - mu - bi[10]) / 2}
    assert m.mu == pytest.approx(mu)
    got_i = {r.movieId: r.b_i for r in m.item_bias.collect()}
    got_u = {r.userId: r.b_u for r in m.user_bias.collect()}
    assert got_i == pytest.approx(bi) and got_u == pytest.approx(bu)
    pairs = spark.createDataFrame([(1, 20), (3, 10), (3, 99)], "userId int, movieId int")
    pred = {(r.userId, r.movieId): r.baseline for r in m.predict(pairs).collect()}
    assert pred == pytest.approx({(1, 20): mu + bu[1] + bi[20], (3, 10): mu + bi[10], (3, 99): mu})


def test_popularity_top_n_excludes_seen(spark):
    # Popularity: movie 1 (3 ratings) > 2 (2) > 3 (1) = 4 (1); user 1 has seen 1 and 2.
    rows = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 3), (4, 4)]
    train = spark.createDataFrame([(u, m, 4.0, None) for u, m in rows], SCHEMA)
    recs = {(r.userId, r.rank): r.movieId for r in popularity_top_n(train, 2).collect()}
    assert recs[(1, 1)] == 3 and recs[(1, 2)] == 4
    assert recs[(4, 1)] == 1 and recs[(4, 2)] == 2
    assert (3, 2) in recs and recs[(3, 1)] == 2 and recs[(3, 2)] == 4


@pytest.mark.heavy
def test_cf_pipeline_end_to_end(spark, tmp_path):
    """split -> baselines -> als -> evaluate on a generated set with latent structure."""
    from movierec_spark import tables
    from movierec_spark.generate import generate_dataset
    from movierec_spark.pipeline import run_pipeline

    from .conftest import make_config

    data = tmp_path / "gen"
    generate_dataset(data, users=150, movies=300, ratings=12_000, seed=5)
    cfg = make_config(tmp_path / "wh", als__rank=8, als__max_iter=8, als_implicit__rank=8, als_implicit__max_iter=8,
                      pipeline__mode="evaluate")
    # A fresh run (no run id given): its per-run rows are appended, not replaceWhere'd.
    ctx = run_pipeline(spark, cfg, str(data), stages=["ingest", "split", "baselines", "als", "als_implicit", "evaluate"])
    assert ctx.fresh
    run = ctx.run_id
    wh = cfg.paths.warehouse
    splits = tables.read_table(spark, wh, "rating_splits")
    test = splits.where("split = 'test'")
    n_test = test.count()
    preds = tables.read_table(spark, wh, "predictions").where(F.col("run_id") == run)
    n_metrics = tables.read_table(spark, wh, "metrics").where(F.col("run_id") == run).count()

    def check_predictions():
        # Every held-out pair is predicted by every rating model, exactly once.
        for model in ("global_mean", "bias_baseline", "als"):
            p = preds.where(F.col("model") == model)
            assert p.count() == n_test
            assert p.join(test, ["userId", "movieId"], "left_anti").count() == 0
            assert p.where(F.col("prediction").isNull() | F.isnan("prediction")).count() == 0

    check_predictions()
    # Rerunning stages under the same run id replaces that run's rows instead of adding to them.
    run_pipeline(spark, cfg, str(data), stages=["baselines", "evaluate"], run_id=run)
    check_predictions()
    assert tables.read_table(spark, wh, "metrics").where(F.col("run_id") == run).count() == n_metrics
    # Top-N lists never contain a movie the user rated in train.
    top = tables.read_table(spark, wh, "top_n").where(F.col("run_id") == run)
    train = splits.where("split = 'train'").select("userId", "movieId")
    assert top.join(train, ["userId", "movieId"], "inner").count() == 0
    assert {r.model for r in top.select("model").distinct().collect()} == {"popularity", "als", "als_implicit"}
    assert top.groupBy("model", "userId").count().where("count > 20").count() == 0
    m = {(r.model, r.metric, r.k): r.value for r in tables.read_table(spark, wh, "metrics").where(F.col("run_id") == run).collect()}
    assert m[("als", "rmse", None)] < m[("bias_baseline", "rmse", None)] < m[("global_mean", "rmse", None)]
    assert m[("als_implicit", "ndcg", 10)] > 0 and ("popularity", "coverage", 10) in m
    # The bias baseline stands in exactly for the test pairs whose user or movie train lacks.
    unseen = (test.join(train.select("userId").distinct(), "userId", "left_anti")
              .unionByName(test.join(train.select("movieId").distinct(), "movieId", "left_anti"))
              .select("userId", "movieId").distinct().count())
    assert ctx.results["als"]["fallbacks"] == unseen
    assert tables.read_table(spark, wh, "als_item_factors").first().features is not None


@pytest.mark.heavy
def test_predefined_split_files(spark, tmp_path):
    """--train/--test: ml-100k-style u1.base/u1.test; bad rows and leaked pairs go to rejects."""
    from movierec_spark import tables
    from movierec_spark.pipeline import run_pipeline

    from .conftest import make_config
    from .test_ingest import CSV_MOVIES, CSV_RATINGS, write_files

    root = write_files(tmp_path / "ml", {"movies.csv": CSV_MOVIES, "ratings.csv": CSV_RATINGS})
    base = write_files(tmp_path / "split", {
        "u1.base": "1\t1\t4\t881250949\n1\t2\t3\t881250950\n2\t3\t5\t881250951\n",
        # line 2 leaks a train pair; line 3 rates a movie the catalog lacks; line 4 is malformed.
        "u1.test": "2\t1\t2\t881250952\n1\t2\t3\t881250953\n3\t99\t4\t881250954\n3\t4\n",
        "test.csv": "userId,movieId,rating\n2,1,2.5\n",
    })
    cfg = make_config(tmp_path / "wh", split__train_file=str(base / "u1.base"),
                      split__test_file=str(base / "u1.test"), ingest__reject_threshold=0.9,
                      pipeline__mode="evaluate")
    run_pipeline(spark, cfg, str(root), stages=["ingest", "split"], run_id="pre")
    s = tables.read_table(spark, cfg.paths.warehouse, "rating_splits")
    assert sorted((r.split, r.userId, r.movieId, r.rating) for r in s.collect()) == [
        ("test", 2, 1, 2.0), ("train", 1, 1, 4.0), ("train", 1, 2, 3.0), ("train", 2, 3, 5.0)]
    rej = tables.read_table(spark, cfg.paths.warehouse, "rejects").where("run_id = 'pre'")
    assert sorted((r.source, r.line, r.reason) for r in rej.collect()) == [
        ("u1.test", 2, "in_train"), ("u1.test", 3, "unknown_movie"), ("u1.test", 4, "wrong_column_count")]
    # A CSV without timestamps is accepted too.
    cfg2 = make_config(tmp_path / "wh2", split__train_file=str(base / "u1.base"), split__test_file=str(base / "test.csv"),
                       pipeline__mode="evaluate")
    run_pipeline(spark, cfg2, str(root), stages=["ingest", "split"], run_id="csv")
    t = tables.read_table(spark, cfg2.paths.warehouse, "rating_splits").where("split = 'test'").collect()
    assert [(r.userId, r.movieId, r.rating, r.rated_at) for r in t] == [(2, 1, 2.5, None)]


@pytest.mark.parametrize("listing,extra,direct_max", [("numpy", 0, 0), ("mllib", 40, 2_000_000),
                                                      ("mllib", 0, 2_000_000), ("mllib", 0, 0)])
def test_recommend_unseen_is_exact(spark, monkeypatch, listing, extra, direct_max):
    """Against brute force (every user x movie score, seen removed, top 5): numpy per partition,
    and MLlib's first pass only, with a second pass by direct scoring, or by buckets give the
    same lists."""
    from pyspark.ml.recommendation import ALS

    from movierec_spark import als as A

    train = synthetic(spark, users=40, movies=120, seed=11).select("userId", "movieId", "rating").cache()
    model = ALS(rank=4, maxIter=4, regParam=0.1, userCol="userId", itemCol="movieId", ratingCol="rating",
                seed=1).fit(train)
    monkeypatch.setattr(A, "DIRECT_MAX_PAIRS", direct_max)
    monkeypatch.setattr(A, "LISTING", listing)
    monkeypatch.setattr(A, "NUMPY_USER_CHUNK", 7)  # several chunks per batch
    got = {(r.userId, r.rank): r.movieId for r in A.recommend_unseen(model, train, 5, extra=extra).collect()}
    uf = {r.id: r.features for r in model.userFactors.collect()}
    itf = {r.id: r.features for r in model.itemFactors.collect()}
    seen = {(r.userId, r.movieId) for r in train.collect()}
    want = {}
    for u, fu in uf.items():
        scores = sorted(((-sum(a * b for a, b in zip(fu, fi)), m) for m, fi in itf.items() if (u, m) not in seen))
        for rank, (_, m) in enumerate(scores[:5], 1):
            want[(u, rank)] = m
    # Float32 ties aside, lists match exactly; allow a swap only between equal scores.
    mismatched = [k for k in want if got.get(k) != want[k]]
    assert len(got) == len(want) and len(mismatched) <= 2, mismatched
    train.unpersist()


def test_the_numpy_pass_masks_what_each_user_rated_and_scores_like_mllib(spark, monkeypatch):
    """top_unseen_numpy against brute force from the factors: a user who rated all but two
    movies gets those two, a user with no rated movies gets the overall best, a user with
    factors but outside `users` gets nothing; scores equal u.v in float32."""
    import numpy as np
    from pyspark.ml.recommendation import ALS

    from movierec_spark import als as A

    train = synthetic(spark, users=30, movies=60, seed=13).select("userId", "movieId", "rating").cache()
    model = ALS(rank=3, maxIter=3, regParam=0.1, userCol="userId", itemCol="movieId", ratingCol="rating",
                seed=1).fit(train)
    uf = {r.id: np.array(r.features, np.float32) for r in model.userFactors.collect()}
    itf = {r.id: np.array(r.features, np.float32) for r in model.itemFactors.collect()}
    heavy, empty, left_out = sorted(uf)[:3]
    movies = sorted(itf)
    seen = spark.createDataFrame(
        [(heavy, m) for m in movies[2:]] + [(r.userId, r.movieId) for r in train.collect()
                                             if r.userId not in (heavy, empty, left_out)],
        "userId int, movieId int")
    users = spark.createDataFrame([(u,) for u in sorted(uf) if u != left_out], "userId int")
    monkeypatch.setattr(A, "NUMPY_USER_CHUNK", 4)
    got = {}
    for r in A.top_unseen_numpy(model, users, seen, 5).collect():
        got.setdefault(r.userId, {})[r.movieId] = r.s
    rated = {}
    for r in seen.collect():
        rated.setdefault(r.userId, set()).add(r.movieId)
    assert set(got) == set(uf) - {left_out}
    assert set(got[heavy]) == set(movies[:2])
    for u, fu in uf.items():
        if u == left_out:
            continue
        scores = {m: float(fu @ v) for m, v in itf.items() if m not in rated.get(u, set())}
        want = sorted(scores, key=lambda m: -scores[m])[:5]
        assert set(got[u]) == set(want), u
        assert all(abs(got[u][m] - scores[m]) < 1e-5 for m in want)
    train.unpersist()


def test_unseen_ndcg_scores_the_lists_ranking_metrics_scores_in_one_job(spark, monkeypatch):
    """Tuning's one-job nDCG@k: by hand on factors with ties at the cut (the lower movieId wins,
    as top_n_per_user orders), a held-out movie the model never saw, a user the model has no
    factors for (0) and a user with nothing held out (not counted); and equal to
    ranking_metrics(recommend_unseen(...)) on a fitted model."""
    import math

    from pyspark.ml.recommendation import ALS

    from movierec_spark import als as A
    from movierec_spark.evaluation import ranking_metrics

    monkeypatch.setattr(A, "NUMPY_USER_CHUNK", 2)  # several chunks per batch
    fs = "id int, features array<float>"
    items = spark.createDataFrame([(10, [5.0, 0.0]), (11, [4.0, 1.0]), (12, [3.0, 0.0]), (13, [3.0, 5.0]),
                                   (14, [1.0, 0.0]), (15, [0.0, 9.0])], fs)
    users = spark.createDataFrame([(1, [1.0, 0.0]), (2, [0.0, 1.0]), (3, [1.0, 1.0]), (5, [1.0, 0.0])], fs)
    model = A.als_model_from_factors(users, items, 2, "userId", "movieId")
    seen = spark.createDataFrame([(1, 10), (3, 15), (3, 13), (5, 11)], "userId int, movieId int")
    held = spark.createDataFrame([(1, 13), (2, 13), (2, 11), (2, 99), (3, 11), (4, 10)], "userId int, movieId int")
    got, n = A.unseen_ndcg(model, A.ndcg_users(seen, held), 2)
    # 1: unseen 11 (4), then 12 and 13 tie at 3: 12 is listed, 13 (held) is not -> 0.
    # 2: 15, 13 -> 13 at position 2 of an ideal 2.  3: 10 and 11 tie at 5 -> 11 at position 2 of an ideal 1.
    # 4: no factors -> 0.  5: nothing held -> not scored.
    want = (0 + (1 / math.log(3)) / (1 / math.log(2) + 1 / math.log(3)) + math.log(2) / math.log(3) + 0) / 4
    assert n == 4 and got == pytest.approx(want, abs=1e-12)

    train = synthetic(spark, users=40, movies=120, seed=14).select("userId", "movieId", "rating")
    fit, out = train.where(F.col("movieId") % 4 != 0).cache(), train.where(F.col("movieId") % 4 == 0)
    fitted = ALS(rank=4, maxIter=4, regParam=0.1, userCol="userId", itemCol="movieId", ratingCol="rating",
                 seed=1).fit(fit)
    recs = A.recommend_unseen(fitted, fit, 5)
    want = next(v for m, k, v in ranking_metrics(recs, out, ks=(5,)) if m == "ndcg")
    got, n = A.unseen_ndcg(fitted, A.ndcg_users(fit, out), 5)
    assert n == out.select("userId").distinct().count() and got == pytest.approx(want, abs=1e-12)
    recs.unpersist()
    fit.unpersist()


@pytest.mark.parametrize("listing", ["numpy", "mllib"])
def test_recommend_unseen_for_a_user_subset_equals_the_full_lists(spark, monkeypatch, listing):
    """The ranker lists candidates for a sample of users only: those users' lists must be the
    ones everyone's run gives them, and nobody else may get one."""
    from pyspark.ml.recommendation import ALS

    from movierec_spark import als as A

    monkeypatch.setattr(A, "LISTING", listing)

    train = synthetic(spark, users=40, movies=120, seed=12).select("userId", "movieId", "rating").cache()
    model = ALS(rank=4, maxIter=4, regParam=0.1, userCol="userId", itemCol="movieId", ratingCol="rating",
                seed=1).fit(train)
    every = {(r.userId, r.rank): r.movieId for r in A.recommend_unseen(model, train, 5, extra=0).collect()}
    some = sorted({u for u, _ in every})[::3]
    subset = spark.createDataFrame([(u,) for u in some], "userId int")
    got = {(r.userId, r.rank): r.movieId for r in A.recommend_unseen(model, train, 5, extra=0, users=subset).collect()}
    assert {u for u, _ in got} == set(some)
    assert got == {k: v for k, v in every.items() if k[0] in set(some)}
    train.unpersist()


def test_an_als_model_built_from_factor_tables_scores_their_dot_products(spark):
    """The one private route (MLlib's JVM ALSModel constructor): if a Spark upgrade changes it,
    this fails, not a stage."""
    from chispa import assert_approx_df_equality

    from movierec_spark.als import als_model_from_factors

    fs = T.StructType([T.StructField("id", T.IntegerType(), False),
                       T.StructField("features", T.ArrayType(T.FloatType(), False), False)])
    users = spark.createDataFrame([(1, [1.0, 2.0]), (2, [0.5, -1.0])], fs)
    items = spark.createDataFrame([(10, [3.0, 1.0]), (20, [-2.0, 4.0])], fs)
    model = als_model_from_factors(users, items, 2, "u", "m", prediction_col="dot")
    pairs = spark.createDataFrame([(1, 10), (1, 20), (2, 10), (2, 20), (3, 10)], "u int, m int")
    got = model.transform(pairs).select("u", "m", F.col("dot").cast("double").alias("dot"))
    want = spark.createDataFrame([(1, 10, 5.0), (1, 20, 6.0), (2, 10, 0.5), (2, 20, -5.0), (3, 10, float("nan"))],
                                 "u int, m int, dot double")
    assert_approx_df_equality(got, want, 1e-6, ignore_row_order=True, ignore_nullable=True, allow_nan_equality=True)
    top = {r.u: [x.m for x in r.recommendations] for r in model.recommendForAllUsers(1).collect()}
    assert top == {1: [20], 2: [10]}
