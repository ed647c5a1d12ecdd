"""The learned ranker's inputs, by hand on a toy set."""

from __future__ import annotations

import math

import pytest
from pyspark.sql import functions as F

from movierec_spark.ranker import item_neighbours, ranker_features


def test_item_neighbours_and_knn_feature_by_hand(spark):
    # Raters: movie 10 by users 1, 2, 3; movie 20 by 1, 2; movie 30 by 2.
    train = spark.createDataFrame(
        [(1, 10, 4.0), (1, 20, 3.0), (2, 10, 5.0), (2, 20, 2.0), (2, 30, 4.0), (3, 10, 1.0)],
        "userId int, movieId int, rating double")
    nb = {(r.movieId, r.nb): r.sim for r in item_neighbours(train, 2, None, 42).collect()}
    # cosine of binary rater vectors: co-raters / sqrt(n_a * n_b)
    assert nb == pytest.approx({(10, 20): 2 / math.sqrt(6), (10, 30): 1 / math.sqrt(3),
                                (20, 10): 2 / math.sqrt(6), (20, 30): 1 / math.sqrt(2),
                                (30, 20): 1 / math.sqrt(2), (30, 10): 1 / math.sqrt(3)})
    top1 = {(r.movieId, r.nb) for r in item_neighbours(train, 1, None, 42).collect()}
    assert top1 == {(10, 20), (20, 10), (30, 20)}
    # User 3 rated only movie 10: candidate 20's kNN score is sim(20, 10), from one rated neighbour;
    # candidate 30's is sim(30, 10).
    lists = spark.createDataFrame([(3, 20, "popularity", 1, 2.0), (3, 30, "popularity", 2, 1.0)],
                                  "userId int, movieId int, model string, rank int, score double")
    feats, names = ranker_features(lists, train, ["popularity"], 20, item_nb=item_neighbours(train, 2, None, 42))
    got = {r.movieId: (r.knn, r.knn_n, r.knn_u) for r in feats.collect()}
    assert got[20] == pytest.approx((2 / math.sqrt(6), 1.0, 2 / math.sqrt(6)))  # u_n = 1
    assert got[30] == pytest.approx((1 / math.sqrt(3), 1.0, 1 / math.sqrt(3)))
    assert {"knn", "knn_n", "knn_u", "popularity_rank"} <= set(names)


def test_implicit_score_is_the_factors_dot_product_for_every_candidate(spark):
    # A real implicit ALS fit; imp_dot is u.v summed in a double over the float factors, for
    # candidates the model did not list too, and 0 where the user or the movie has no factors.
    import numpy as np

    from movierec_spark.als import fit_implicit
    from movierec_spark.config import ImplicitAlsConfig

    train = spark.createDataFrame([(u, m, float(1 + (u * m) % 5)) for u in range(1, 9) for m in range(10, 17)
                                   if (u + m) % 3], "userId int, movieId int, rating double")
    model = fit_implicit(train, ImplicitAlsConfig(rank=6, max_iter=3), 42)
    pairs = [(u, m) for u in (1, 2, 5, 99) for m in (10, 11, 16, 77)]
    lists = spark.createDataFrame([(u, m, "popularity", i + 1, 1.0) for i, (u, m) in enumerate(pairs)],
                                  "userId int, movieId int, model string, rank int, score double")
    got = {(r.userId, r.movieId): r.imp_dot for r in ranker_features(lists, train, ["popularity"], 20, model)[0].collect()}
    uf = {r.id: np.array(r.features, np.float32) for r in model.userFactors.collect()}
    itf = {r.id: np.array(r.features, np.float32) for r in model.itemFactors.collect()}
    want = {(u, m): sum(float(x) for x in uf[u] * itf[m]) if u in uf and m in itf else 0.0 for u, m in pairs}
    assert got == pytest.approx(want, abs=1e-12)
    assert sum(v != 0 for v in want.values()) == 9  # users 1, 2, 5 x movies 10, 11, 16


def test_counts_are_put_on_the_serving_scale_when_learning_from_a_share_of_train(spark):
    # Learning from half of train: every count doubles (what all of train would show), the rest stays.
    train = spark.createDataFrame(
        [(1, 10, 4.0, 0), (1, 20, 3.0, 10), (2, 10, 5.0, 20), (2, 20, 2.0, 30), (2, 30, 4.0, 40), (3, 10, 1.0, 50)],
        "userId int, movieId int, rating double, t int").withColumn("rated_at", F.timestamp_seconds(F.col("t") * 86400))
    lists = spark.createDataFrame([(3, 20, "popularity", 1, 2.0), (3, 30, "popularity", 2, 1.0)],
                                  "userId int, movieId int, model string, rank int, score double")
    nb = item_neighbours(train, 2, None, 42)
    args = (lists, train, ["popularity"], 20, None, train.select("userId", "movieId", "rated_at"), nb, 180)
    whole, names = ranker_features(*args)
    half, _ = ranker_features(*args, share=0.5)
    w, h = {r.movieId: r for r in whole.collect()}, {r.movieId: r for r in half.collect()}
    for movie in (20, 30):
        a, b = w[movie], h[movie]
        for c in ("u_n", "m_n", "popularity_score", "knn", "knn_n"):
            assert b[c] == pytest.approx(2 * a[c]) and a[c] > 0, c
        assert b.m_log_n == pytest.approx(math.log1p(2 * a.m_n))
        assert b.m_active == pytest.approx(math.log1p(2 * math.expm1(a.m_active))) and a.m_active > 0
        assert b.knn_u == pytest.approx(a.knn_u * math.sqrt(2))  # knn / sqrt(u_n): both doubled
        for c in ("popularity_rank", "u_avg", "m_avg", "n_lists", "t_after", "t_dist"):
            assert b[c] == a[c], c
    assert set(names) >= {"m_active", "t_dist", "knn_u"}


def test_the_ranker_learns_with_its_counts_scaled_by_the_share_of_train_it_learns_from():
    from movierec_spark.config import HybridConfig
    from movierec_spark.ranker import _rest_share

    # train_ranker learns from train outside fold 0 of `folds`: (folds - 1) / folds of what it serves from.
    assert _rest_share(HybridConfig()) == pytest.approx(0.8)
    assert _rest_share(HybridConfig(folds=4)) == pytest.approx(0.75)
    assert _rest_share(HybridConfig(ranker_rescale_counts=False)) == 1.0


def test_sample_users_is_a_stable_hash_sample_of_about_the_cap(spark):
    from movierec_spark.ranker import sample_users

    train = spark.range(4000).selectExpr("cast(id % 2000 as int) as userId", "cast(id as int) as movieId")
    assert sample_users(train, 2000, 42) is None       # everyone fits: no sample
    assert sample_users(train, None, 42) is None

    def sampled(seed):  # a predicate on userId
        return {r.userId for r in train.where(sample_users(train, 500, seed)).select("userId").distinct().collect()}

    a, b = sampled(42), sampled(42)
    assert a == b                                      # reruns train on the same users
    assert 400 <= len(a) <= 600 and a <= set(range(2000))
    assert a != sampled(7)


def test_a_shorter_pool_cut_from_the_features_equals_features_of_the_shorter_lists(spark):
    from chispa import assert_df_equality

    from movierec_spark.ranker import within_pool

    train = spark.createDataFrame([(u, m, float(1 + (u * m) % 5)) for u in range(1, 4) for m in range(1, 9)
                                   if (u + m) % 3], "userId int, movieId int, rating double")
    models = ["als_implicit", "popularity"]
    # Implicit ALS lists 6 per user (ranks 1..6), popularity 2; movie 20 is in both of user 1's.
    imp = [(u, 10 * r + u, "als_implicit", r, 1.0 / r) for u in (1, 2) for r in range(1, 7)]
    pop = [(1, 20 + 1, "popularity", 1, 9.0), (1, 50 + 1, "popularity", 2, 8.0), (2, 99, "popularity", 1, 9.0),
           (2, 60 + 2, "popularity", 2, 7.0)]
    schema = "userId int, movieId int, model string, rank int, score double"
    long_lists = spark.createDataFrame(imp + pop, schema)
    short_lists = spark.createDataFrame([r for r in imp if r[3] <= 3] + pop, schema)
    long_feats, names = ranker_features(long_lists, train, models, 6)
    short_feats, _ = ranker_features(short_lists, train, models, 3)
    cut = within_pool(long_feats, models, 6, 3)
    assert_df_equality(cut.select(*short_feats.columns), short_feats, ignore_row_order=True,
                       ignore_nullable=True)
    # Movies 51 and 62: implicit ALS listed them at 5 and 6, popularity too: they stay, as popularity's.
    assert {(r.userId, r.movieId) for r in cut.where("n_lists = 1 AND popularity_rank <= 2").collect()} >= {(1, 51), (2, 62)}
    assert within_pool(long_feats, models, 6, 6) is long_feats


def test_per_user_ndcg_averages_to_ranking_metrics_and_pairs_by_user(spark):
    from movierec_spark.evaluation import paired_gain, ranking_metrics, user_ndcg

    test = spark.createDataFrame([(1, 10, 4.0), (1, 11, 3.0), (2, 20, 5.0), (3, 30, 1.0)],
                                 "userId int, movieId int, rating double")
    recs = spark.createDataFrame([(1, 10, 1), (1, 99, 2), (1, 11, 3), (2, 98, 1), (2, 20, 2), (3, 97, 1)],
                                 "userId int, movieId int, rank int")
    per = {r.userId: r.ndcg for r in user_ndcg(recs, test, 10).collect()}
    # User 1: hits at 1 and 3 of 2 relevant; user 2: a hit at 2 of 1; user 3: none.
    ln = math.log
    assert per == pytest.approx({1: (1 / ln(2) + 1 / ln(4)) / (1 / ln(2) + 1 / ln(3)), 2: (1 / ln(3)) / (1 / ln(2)),
                                 3: 0.0})
    mean = next(v for m, k, v in ranking_metrics(recs, test, ks=(10,)) if m == "ndcg")
    assert sum(per.values()) / 3 == pytest.approx(mean)
    # A second list that fixes user 3 only: the mean gain is 1/3, its standard error that of (0, 0, 1).
    better = recs.where("userId != 3").unionByName(spark.createDataFrame([(3, 30, 1)], "userId int, movieId int, rank int"))
    gain, se, users = paired_gain(user_ndcg(recs, test, 10), user_ndcg(better, test, 10))
    assert users == 3 and gain == pytest.approx(1 / 3) and se == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))


def test_knn_scores_in_numpy_equal_the_spark_join(spark, monkeypatch):
    """The per-partition kNN scoring against the join it replaced, on random lists: users with
    no ratings, candidates without neighbour lists, neighbours nobody rated, ragged lists."""
    import random

    from chispa import assert_approx_df_equality

    from movierec_spark import ranker

    rnd = random.Random(7)
    hist = spark.createDataFrame(sorted({(u, rnd.randrange(60)) for u in range(1, 400) for _ in range(rnd.randrange(12))}),
                                 "userId int, movieId int")
    nb = spark.createDataFrame([(m, n, rnd.random()) for m in range(50) for n in rnd.sample(range(80), rnd.randrange(9))
                                if n != m], "movieId int, nb int, sim double")
    cands = spark.createDataFrame(sorted({(u, rnd.randrange(70)) for u in range(1, 450) for _ in range(rnd.randrange(8))}),
                                  "userId int, movieId int")
    monkeypatch.setattr(ranker, "KNN_USER_CHUNK", 64)  # several chunks per partition
    got = ranker.knn_scores(cands, hist, nb)
    monkeypatch.setattr(ranker, "KNN", "join")
    want = ranker.knn_scores(cands, hist, nb)
    assert want.count() > 150  # the random set exercises the scoring
    assert_approx_df_equality(got, want, 1e-9, ignore_row_order=True, ignore_nullable=True)
    assert ranker.knn_scores(cands.limit(0), hist, nb).isEmpty()


def test_rankers_fitted_from_one_shared_input_equal_rankers_fitted_from_their_own(spark):
    # choose_ranker lays a pool's training rows out once (ranker_input) and fits each depth's
    # trial from them: every such ranker must be the one fit_ranker fits from the rows alone.
    from chispa import assert_df_equality

    from movierec_spark.ranker import fit_ranker, fit_ranker_on, rank_scores, ranker_input
    from movierec_spark.session import release

    rows = spark.range(400).select(
        (F.col("id") % 40).cast("int").alias("userId"), F.col("id").cast("int").alias("movieId"),
        ((F.col("id") * 7) % 11).cast("double").alias("a"), ((F.col("id") * 13) % 17).cast("double").alias("b"))
    labelled = rows.withColumn("label", ((F.col("a") + F.col("b") + F.col("movieId") % 3) > 14).cast("double"))
    names = ["a", "b"]
    shared = ranker_input(labelled)
    try:
        for depth in (2, 3):
            own = rank_scores(fit_ranker(labelled, names, 7, 5, depth), rows).orderBy("movieId")
            from_shared = rank_scores(fit_ranker_on(shared, names, 7, 5, depth), rows).orderBy("movieId")
            assert_df_equality(from_shared, own)
        # A tree of another depth is another model: the comparison above can tell models apart.
        two = rank_scores(fit_ranker_on(shared, names, 7, 5, 2), rows).orderBy("movieId")
        three = rank_scores(fit_ranker_on(shared, names, 7, 5, 3), rows).orderBy("movieId")
        assert two.exceptAll(three).count() > 0
    finally:
        release(shared)
