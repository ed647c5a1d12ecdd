"""The learned ranker's inputs, by hand on a toy set."""

from __future__ import annotations

import math

import pytest

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


def test_sample_users_is_a_stable_hash_sample_of_about_the_cap(spark):
    from movierec_spark.ranker import sample_users

    train = spark.range(4000).selectExpr("cast(id % 2000 as int) as userId", "cast(id as int) as movieId")
    assert sample_users(train, 2000, 42) is None       # everyone fits: no sample
    assert sample_users(train, None, 42) is None
    a = {r.userId for r in sample_users(train, 500, 42).collect()}
    b = {r.userId for r in sample_users(train, 500, 42).collect()}
    assert a == b                                      # reruns train on the same users
    assert 400 <= len(a) <= 600 and a <= set(range(2000))
    assert a != {r.userId for r in sample_users(train, 500, 7).collect()}
