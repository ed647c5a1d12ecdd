"""Library transforms on inline rows, compared with chispa against values worked out by hand
(each with an empty input too): DataFrame in, DataFrame out."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.sql import functions as F

from movierec_spark import baselines, features, ranker, recommend, splits
from movierec_spark.evaluation import cooccurrence_similarity

RATINGS = "userId int, movieId int, rating double, rated_at timestamp"
SPLITS = RATINGS + ", split string"
T0 = dt.datetime(2020, 1, 1)


def day(n: int) -> dt.datetime:
    return T0 + dt.timedelta(days=n)


def eq(got, want, **kw):
    assert_df_equality(got, want, ignore_row_order=True, ignore_nullable=True, **kw)


@pytest.fixture(scope="module")
def ratings(spark):
    # user 1 rated movies 10, 20, 30; user 2 rated 10, 20; user 3 rated 10.
    return spark.createDataFrame([
        (1, 10, 4.0, day(1)), (1, 20, 3.0, day(2)), (1, 30, 5.0, day(3)),
        (2, 10, 2.0, day(1)), (2, 20, 4.0, day(5)),
        (3, 10, 5.0, day(4)),
    ], RATINGS)


@pytest.fixture(scope="module")
def empty(spark):
    return spark.createDataFrame([], RATINGS)


# ----------------------------------------------------------------------------- baselines

def test_popularity_ranks_movies_by_raters_then_id(spark, ratings, empty):
    want = spark.createDataFrame([(10, 3, 1), (20, 2, 2), (30, 1, 3)], "movieId int, n_ratings long, pop_rank int")
    eq(baselines.popularity(ratings).select("movieId", "n_ratings", "pop_rank"), want)
    assert baselines.popularity(empty).isEmpty()


def test_popularity_top_n_skips_what_each_user_rated(spark, ratings, empty):
    # Popularity order 10, 20, 30: user 2 has only 30 left, user 3 has 20 then 30, user 1 none.
    want = spark.createDataFrame([(2, 30, 1, 1.0), (3, 20, 1, 2.0), (3, 30, 2, 1.0)],
                                 "userId int, movieId int, rank int, score double")
    eq(baselines.popularity_top_n(ratings, 2), want)
    assert baselines.popularity_top_n(empty, 2).isEmpty()


def test_popularity_top_n_in_numpy_equals_the_range_join(spark, monkeypatch):
    """Random ratings with tied counts, heavy raters who leave fewer than n movies, and users
    (from `seen`) who rated movies train does not have, in several chunks per partition: the
    same rows as the range join it replaced."""
    import random

    from pyspark.sql import functions as F

    rnd = random.Random(3)
    train = spark.createDataFrame([(u, m, 4.0, None) for u, m in sorted({(rnd.randrange(1, 60), rnd.randrange(1, 40))
                                                                    for _ in range(900)})], RATINGS)
    seen = train.select("userId", "movieId").unionByName(spark.createDataFrame(
        [(u, m) for u in range(55, 75) for m in rnd.sample(range(1, 60), 12)], "userId int, movieId int")).distinct()

    def joins(train, seen, n):
        pop = baselines.popularity(train)
        users = seen.groupBy("userId").agg(F.count(F.lit(1)).alias("n_u"))
        cand = users.join(pop, F.col("pop_rank") <= F.col("n_u") + n).select("userId", "movieId", "pop_rank", "n_ratings")
        unseen = cand.join(seen, ["userId", "movieId"], "left_anti")
        return baselines.top_n_per_user(unseen, n, score=F.col("n_ratings").cast("double"), tiebreak=F.col("pop_rank"))

    monkeypatch.setattr(baselines, "POP_CHUNK_ROWS", 50)
    for n, s in ((7, None), (25, seen)):
        want = joins(train, train if s is None else s, n)
        got = baselines.popularity_top_n(train, n, seen=s)
        assert want.count() > 300
        eq(got, want)
    assert baselines.popularity_top_n(train, 5, seen=seen.limit(0)).isEmpty()


def test_top_n_per_user_orders_by_score_then_tiebreak_then_movie(spark):
    cands = spark.createDataFrame([(1, 5, 0.9, 2), (1, 6, 0.9, 1), (1, 7, 0.1, 0), (2, 8, 0.5, 0)],
                                  "userId int, movieId int, s double, t int")
    from pyspark.sql import functions as F

    got = baselines.top_n_per_user(cands, 2, score=F.col("s"), tiebreak=F.col("t"))
    want = spark.createDataFrame([(1, 6, 1, 0.9), (1, 5, 2, 0.9), (2, 8, 1, 0.5)],
                                 "userId int, movieId int, rank int, score double")
    eq(got, want)
    assert baselines.top_n_per_user(cands.limit(0), 2, score=F.col("s")).isEmpty()


def test_the_bias_baseline_is_korens_shrunk_means(spark, ratings, empty):
    from movierec_spark.config import BaselineConfig

    model = baselines.fit_bias(ratings, BaselineConfig(item_reg=1.0, user_reg=1.0, iterations=1))
    # By hand, one pass: b_i = sum(r - mu) / (n_i + 1), then b_u = sum(r - mu - b_i) / (n_u + 1).
    mu = 23 / 6
    b_i = {10: (4 + 2 + 5 - 3 * mu) / 4, 20: (3 + 4 - 2 * mu) / 3, 30: (5 - mu) / 2}
    b_u = {1: (4 + 3 + 5 - 3 * mu - b_i[10] - b_i[20] - b_i[30]) / 4, 2: (2 + 4 - 2 * mu - b_i[10] - b_i[20]) / 3,
           3: (5 - mu - b_i[10]) / 2}
    pairs = spark.createDataFrame([(1, 20), (3, 30), (9, 10), (1, 99)], "userId int, movieId int")
    want = spark.createDataFrame([
        (1, 20, mu + b_u[1] + b_i[20]), (3, 30, min(5.0, mu + b_u[3] + b_i[30])),
        (9, 10, mu + b_i[10]),  # unknown user: no user bias
        (1, 99, mu + b_u[1]),   # unknown movie: no movie bias
    ], "userId int, movieId int, baseline double")
    assert_approx_df_equality(model.predict(pairs).select("userId", "movieId", "baseline"), want, 1e-9,
                              ignore_row_order=True, ignore_nullable=True)
    assert model.predict(pairs.limit(0)).isEmpty()
    with pytest.raises(ValueError, match="no ratings to learn from"):
        baselines.fit_bias(empty, BaselineConfig())


# ----------------------------------------------------------------------------- splits

def test_temporal_user_split_holds_out_each_users_last_ratings(spark, ratings, empty):
    got = splits.temporal_user_split(ratings, 1)
    # Users with more than one rating lose their newest one to test; user 3 keeps its only one.
    want = spark.createDataFrame([
        (1, 10, 4.0, day(1), "train"), (1, 20, 3.0, day(2), "train"), (1, 30, 5.0, day(3), "test"),
        (2, 10, 2.0, day(1), "train"), (2, 20, 4.0, day(5), "test"),
        (3, 10, 5.0, day(4), "train")], SPLITS)
    eq(got, want)
    assert splits.temporal_user_split(empty, 1).isEmpty()


def test_temporal_global_split_puts_the_cutoff_day_and_later_in_test(spark, ratings, empty):
    got = splits.temporal_global_split(ratings, day(3))
    want = spark.createDataFrame([
        (1, 10, 4.0, day(1), "train"), (1, 20, 3.0, day(2), "train"), (1, 30, 5.0, day(3), "test"),
        (2, 10, 2.0, day(1), "train"), (2, 20, 4.0, day(5), "test"),
        (3, 10, 5.0, day(4), "test")], SPLITS)
    eq(got, want)
    assert splits.temporal_global_split(empty, day(3)).isEmpty()


def test_stratified_split_holds_out_a_share_of_each_user_never_a_single_rating(spark, ratings, empty):
    from pyspark.sql import functions as F

    got = splits.stratified_split(ratings, 0.5, 7)
    # round(n / 2) clamped to [1, n - 1]: user 1 (3 ratings) -> 2, user 2 (2) -> 1, user 3 (1) -> 0.
    per_user = got.groupBy("userId").agg(F.sum((F.col("split") == "test").cast("int")).alias("test"))
    eq(per_user, spark.createDataFrame([(1, 2), (2, 1), (3, 0)], "userId int, test long"))
    assert splits.stratified_split(empty, 0.5, 7).isEmpty()


def test_a_cold_users_split_keeps_the_chosen_users_earliest_ratings_in_train(spark, ratings, empty):
    # Every user chosen (ratio near 1), keep 1: each user's earliest rating stays in train, the
    # rest of theirs is test; user 3's single rating has nothing to test beside it.
    got = splits.cold_users_split(ratings, 0.999999, 1, 7)
    want = spark.createDataFrame([
        (1, 10, 4.0, day(1), "train"), (1, 20, 3.0, day(2), "test"), (1, 30, 5.0, day(3), "test"),
        (2, 10, 2.0, day(1), "train"), (2, 20, 4.0, day(5), "test"),
        (3, 10, 5.0, day(4), "train")], SPLITS)
    eq(got, want)
    # keep 2: user 2 keeps both; nobody chosen (ratio near 0): everything is train.
    assert {(r.userId, r.movieId) for r in splits.cold_users_split(ratings, 0.999999, 2, 7)
            .where("split = 'test'").collect()} == {(1, 30)}
    assert splits.cold_users_split(ratings, 1e-9, 1, 7).where("split = 'test'").isEmpty()
    assert splits.cold_users_split(empty, 0.5, 3, 7).isEmpty()


def test_a_serve_split_is_every_rating_as_train(spark, ratings, empty):
    from pyspark.sql import functions as F

    eq(splits.serve_split(ratings), ratings.withColumn("split", F.lit("train")))
    assert splits.serve_split(empty).isEmpty()


# ----------------------------------------------------------------------------- features, ranker

def test_cosine_neighbours_of_hand_computed_vectors(spark):
    # Centred ratings of users a=1, b=2, c=3 over movies 10, 20:
    #   a = (1, 1), b = (1, 0), c = (-1, 1) -> cos(a, b) = 1/sqrt(2), cos(a, c) = 0 (dropped: not
    #   positive), cos(b, c) = -1/sqrt(2) (dropped).
    centred = spark.createDataFrame([(1, 10, 1.0), (1, 20, 1.0), (2, 10, 1.0), (3, 10, -1.0), (3, 20, 1.0)],
                                    "userId int, movieId int, c double")
    got = features.cosine_neighbours(centred, "userId", "movieId", 5, 1, None, 0)
    s = 1 / math.sqrt(2)
    want = spark.createDataFrame([(1, 2, s, 1), (2, 1, s, 1)], "userId int, nb int, sim double, rank int")
    assert_approx_df_equality(got, want, 1e-12, ignore_row_order=True, ignore_nullable=True)
    assert features.cosine_neighbours(centred.limit(0), "userId", "movieId", 5, 1, None, 0).isEmpty()


def test_fold_neighbours_give_each_pass_the_lists_of_its_own_ratings(spark):
    # Users 1-4 over movies 10-40, each rating in fold 0 or 1. Pass 0 leaves out fold 0, pass 1
    # leaves out fold 1, pass 2 uses every rating: each must equal cosine_neighbours over that
    # pass's ratings centred by that pass's user means.
    rows = [(1, 10, 5.0, 0), (1, 20, 3.0, 0), (1, 30, 4.0, 1), (2, 10, 4.0, 0), (2, 20, 2.0, 0),
            (2, 30, 5.0, 1), (2, 40, 1.0, 0), (3, 10, 1.0, 1), (3, 20, 4.0, 1), (3, 40, 5.0, 1),
            (4, 20, 3.0, 0), (4, 30, 1.0, 1), (4, 40, 4.0, 1)]
    r = spark.createDataFrame(rows, "userId int, movieId int, rating double, fold int")
    outs = [0, 1, None]
    got = features.fold_neighbours(r, "userId", "movieId", outs, 3, 1, None, 0)
    for i, out in enumerate(outs):
        fit = r if out is None else r.where(F.col("fold") != out)
        mu = fit.groupBy("userId").agg(F.avg("rating").alias("mu"))
        centred = fit.join(mu, "userId").select("userId", "movieId", (F.col("rating") - F.col("mu")).alias("c"))
        want = features.cosine_neighbours(centred, "userId", "movieId", 3, 1, None, 0)
        assert_approx_df_equality(got.where(F.col("p") == i).drop("p"), want, 1e-12,
                                  ignore_row_order=True, ignore_nullable=True)
    assert {r.p for r in got.select("p").distinct().collect()} == {0, 1, 2}  # no pass is trivially empty
    assert features.fold_neighbours(r.limit(0), "userId", "movieId", outs, 3, 1, None, 0).isEmpty()


def test_ranker_neighbours_give_the_tables_of_the_ranker_part_and_of_train_from_one_join(spark):
    # 40 users rating random subsets of 15 movies: the two tables must equal item_neighbours
    # over train outside fold 0 (the ranker's training part) and over all of train, also with a
    # cap (each table samples its own ratings per user).
    import random
    from types import SimpleNamespace

    rnd = random.Random(3)
    rows = [(u, m, 4.0, day(1)) for u in range(1, 41) for m in range(1, 16) if rnd.random() < 0.5]
    train = spark.createDataFrame(rows, RATINGS)
    fold = F.pmod(F.xxhash64("userId", "movieId", F.lit(7)), F.lit(5))
    for cap in (None, 4):
        h = SimpleNamespace(ranker_knn_neighbours=6, ranker_knn_cap=cap, cap_per_user=100, folds=5)
        rest, whole, cached = ranker.ranker_neighbours(train, h, 7)
        assert_approx_df_equality(whole, ranker.item_neighbours(train, 6, cap, 7), 1e-12,
                                  ignore_row_order=True, ignore_nullable=True)
        assert_approx_df_equality(rest, ranker.item_neighbours(train.where(fold != 0), 6, cap, 7), 1e-12,
                                  ignore_row_order=True, ignore_nullable=True)
        assert rest.count() > 0 and whole.count() > rest.count() * 0.5
        cached.unpersist()
    off = SimpleNamespace(ranker_knn_neighbours=0, ranker_knn_cap=None, cap_per_user=100, folds=5)
    assert ranker.ranker_neighbours(train, off, 7) == (None, None, None)


def test_the_movie_self_join_also_gives_the_ranker_tables(spark):
    # The features stage's movie lists with `cooccur`: its own passes' lists must not change, and
    # the extra passes must be the ranker's tables exactly (ranker_neighbours, its own self-join),
    # with and without a cap that samples heavy raters (users rate up to 12 of 15 movies, cap 4).
    import random
    from types import SimpleNamespace

    rnd = random.Random(5)
    rows = [(u, m, float(rnd.randint(1, 10)) / 2, day(1)) for u in range(1, 41) for m in range(1, 16)
            if rnd.random() < 0.6]
    train = spark.createDataFrame(rows, RATINGS)
    folded = features.with_folds(train, 7, 5).cache()
    outs = [0, 1, None]
    for cap in (None, 4):
        plain = features.fold_neighbours(folded, "movieId", "userId", outs, 3, 2, cap, 7)
        merged = features.fold_neighbours(folded, "movieId", "userId", outs, 3, 2, cap, 7, cooccur=([0, None], 6))
        assert_df_equality(merged.where(F.col("p") < len(outs)), plain, ignore_row_order=True, ignore_nullable=True)
        h = SimpleNamespace(ranker_knn_neighbours=6, ranker_knn_cap=cap, cap_per_user=100, folds=5)
        rest, whole, cached = ranker.ranker_neighbours(train, h, 7)
        for p, want in ((len(outs), rest), (len(outs) + 1, whole)):
            got = merged.where(F.col("p") == p).select("movieId", "nb", "sim")
            assert_df_equality(got, want, ignore_row_order=True, ignore_nullable=True)
            assert got.count() > 30 and got.where(F.col("sim") < 1).count() > 0
        cached.unpersist()
    folded.unpersist()


def test_fold_neighbours_hold_their_capped_sample_and_give_the_same_lists(spark):
    # `hold`: the capped sample cached once for both sides of the self-join (the user lists,
    # cap 5 raters per movie; the movie lists with the item-kNN passes, cap 4 ratings per user).
    # The lists must be the rows computed without it, and the held sample the cap's rows.
    import random

    rnd = random.Random(11)
    rows = [(u, m, float(rnd.randint(1, 10)) / 2, day(1)) for u in range(1, 31) for m in range(1, 13)
            if rnd.random() < 0.6]
    folded = features.with_folds(spark.createDataFrame(rows, RATINGS), 7, 5).cache()
    outs = [0, None]
    for entity, via, cap, co in (("userId", "movieId", 5, None), ("movieId", "userId", 4, ([0, None], 6))):
        hold: list = []
        got = features.fold_neighbours(folded, entity, via, outs, 3, 2, cap, 7, cooccur=co, hold=hold)
        want = features.fold_neighbours(folded, entity, via, outs, 3, 2, cap, 7, cooccur=co)
        assert len(hold) == 1 and hold[0].is_cached
        per_via = hold[0].groupBy(via).count()
        if co is None:  # the shared sample alone: exactly min(cap, ratings) rows of each value
            want_n = folded.groupBy(via).agg(F.least(F.count(F.lit(1)), F.lit(cap)).alias("count"))
            assert_df_equality(per_via, want_n, ignore_row_order=True, ignore_nullable=True)
        assert_df_equality(got, want, ignore_row_order=True, ignore_nullable=True)
        assert {r.p for r in got.select("p").distinct().collect()} == set(range(len(outs) + (2 if co else 0)))
        hold[0].unpersist()
    folded.unpersist()


def test_item_neighbours_count_co_raters_over_the_norms(spark, ratings, empty):
    # Binary vectors over users: 10 = {1, 2, 3}, 20 = {1, 2}, 30 = {1}.
    # cos(10, 20) = 2 / sqrt(3 * 2), cos(10, 30) = 1 / sqrt(3), cos(20, 30) = 1 / sqrt(2).
    got = ranker.item_neighbours(ratings, 5, None, 0)
    a, b, c = 2 / math.sqrt(6), 1 / math.sqrt(3), 1 / math.sqrt(2)
    want = spark.createDataFrame([(10, 20, a), (10, 30, b), (20, 10, a), (20, 30, c), (30, 20, c), (30, 10, b)],
                                 "movieId int, nb int, sim double")
    assert_approx_df_equality(got, want, 1e-12, ignore_row_order=True, ignore_nullable=True)
    assert ranker.item_neighbours(empty, 5, None, 0).isEmpty()


def test_cooccurrence_similarity_of_the_pairs_the_lists_hold(spark, ratings):
    recs = spark.createDataFrame([(9, 20, 1), (9, 30, 2), (8, 10, 1)], "userId int, movieId int, rank int")
    got = cooccurrence_similarity(recs, ratings.select("userId", "movieId", "rating"), 2)
    # Only (20, 30) shares a list: co-rated by user 1, out of 2 and 1 raters.
    want = spark.createDataFrame([(20, 30, 1 / math.sqrt(2))], "movieId int, similar_movieId int, similarity double")
    assert_approx_df_equality(got, want, 1e-12, ignore_nullable=True)
    assert cooccurrence_similarity(recs.limit(0), ratings, 2).isEmpty()


# ----------------------------------------------------------------------------- final lists

def test_final_lists_rank_by_score_and_name_the_first_model_that_listed_each_movie(spark):
    lists = spark.createDataFrame([
        ("als_implicit", 1, 10, None), ("content", 1, 10, 99), ("content", 1, 20, 98), ("popularity", 1, 30, None),
    ], "model string, userId int, movieId int, because_movieId int")
    scored = spark.createDataFrame([(1, 10, 0.2), (1, 20, 0.9), (1, 30, 0.5)], "userId int, movieId int, prediction double")
    got = recommend.final_lists(scored, lists, ["als_implicit", "content", "popularity"], 2)
    # 10 came first from als_implicit (no because) but content names 99 for it.
    want = spark.createDataFrame([(1, 1, 20, 0.9, "content", 98), (1, 2, 30, 0.5, "popularity", None)],
                                 "userId int, rank int, movieId int, score double, source string, because_movieId int")
    eq(got, want)
    assert recommend.final_lists(scored.limit(0), lists, ["content"], 2).isEmpty()


def test_cold_users_get_popular_movies_they_did_not_rate(spark, ratings):
    train = ratings.where("userId != 3")
    # User 4 rated movie 10 after the split; user 3 is not in train either. Train's popularity:
    # 10 (2 raters), 20 (2), 30 (1).
    late = spark.createDataFrame([(4, 10, 3.0, day(9))], RATINGS)
    users, got = recommend.cold_user_lists(ratings.unionByName(late), train, 2)
    eq(users, spark.createDataFrame([(3,), (4,)], "userId int"))
    want = spark.createDataFrame([(u, r, m, s, "popular_cold", None, None) for u in (3, 4)
                                  for r, m, s in ((1, 20, 2.0), (2, 30, 1.0))],
                                 "userId int, rank int, movieId int, score double, source string, "
                                 "because_movieId int, predicted_rating double")
    eq(got, want)
    users, got = recommend.cold_user_lists(ratings, ratings, 2)
    assert users.isEmpty() and got.isEmpty()
    # Materialized before the recommend stage waits for the hybrid model: the same lists, and
    # the count of their users; none to build when no user is cold.
    n, kept = recommend.materialized_cold_lists(ratings.unionByName(late), train, 2)
    assert n == 2
    eq(kept, want)
    assert recommend.materialized_cold_lists(ratings, ratings, 2) == (0, None)


@pytest.fixture(scope="module")
def eras(spark):
    """Two eras a year apart: movie 100 is rated by users 1-4 early, movie 200 by users 5-7
    late, movie 300 by one user in each, and each of users 1-7 rated a movie of their own
    (900 + u); new user 8 rated 300 early, new user 9 rated 300 late. All-time popularity:
    100 (4 raters), 300 (4), 200 (3)."""
    rows = [(u, 100, 4.0, day(u)) for u in (1, 2, 3, 4)] + [(u, 200, 4.0, day(400 + u)) for u in (5, 6, 7)]
    rows += [(u, 900 + u, 3.0, day(u if u < 5 else 400 + u)) for u in range(1, 8)]
    rows += [(1, 300, 3.0, day(2)), (5, 300, 3.0, day(401)), (8, 300, 5.0, day(3)), (9, 300, 5.0, day(405))]
    return spark.createDataFrame(rows, RATINGS)


def test_new_users_get_what_was_popular_when_they_were_active(spark, eras, empty):
    users = recommend.new_users(eras, 1)
    eq(users, spark.createDataFrame([(8, 1, day(3)), (9, 1, day(405))], "userId int, n_u long, t_u timestamp"))
    got = recommend.active_popularity(eras, users, 180, 1, 1)
    # Within ~180 days of user 8's rating only movie 100 (and 300, which 8 rated) were rated;
    # user 9 sees the late era's 200 first, though 100 has more raters all-time.
    want = spark.createDataFrame([(8, 100, 1), (9, 200, 1)], "userId int, movieId int, rank int")
    eq(got, want)
    assert recommend.active_popularity(empty, recommend.new_users(empty, 5), 180, 2, 5).isEmpty()


def test_the_rankers_active_feature_counts_the_movies_ratings_around_the_users_median_time(spark, eras):
    cands = spark.createDataFrame([(8, 100), (8, 200), (9, 100), (9, 200), (9, 555)], "userId int, movieId int")
    got, names = ranker._time_features(cands, eras, 180)
    assert names == ["t_after", "t_dist", "m_active"]
    # User 8 rated early: 100's four early ratings are near, 200's late ones are not; user 9 the
    # other way round; 555 has no ratings at all.
    want = {(8, 100): 4, (8, 200): 0, (9, 100): 0, (9, 200): 3, (9, 555): 0}
    assert {(r.userId, r.movieId): round(math.expm1(r.m_active)) for r in got.collect()} == want
    # User 8's candidates with their user-side statistics read from user 8's rows only: the same
    # rows (the movie-side ones still count every user's ratings).
    only8, _ = ranker._time_features(cands.where("userId = 8"), eras, 180, users=F.col("userId") == 8)
    assert_df_equality(only8, got.where("userId = 8"), ignore_row_order=True, ignore_nullable=True)
    # A candidate of a user the predicate leaves out has no user-side times: the defaults.
    cut = {(r.userId, r.movieId): r.t_dist for r in
           ranker._time_features(cands, eras, 180, users=F.col("userId") == 8)[0].collect()}
    assert cut[(9, 100)] == 1e5 and cut[(8, 100)] != 1e5
    _, without = ranker._time_features(cands, eras)
    assert without == ["t_after", "t_dist"]


def test_users_newer_than_the_split_get_popularity_fused_with_what_was_popular_when_they_rated(spark, eras):
    train = eras.where("userId NOT IN (8, 9)")
    users, got = recommend.cold_user_lists(eras, train, 2, 180)
    eq(users, spark.createDataFrame([(8,), (9,)], "userId int"))
    # All-time popularity: 100 (4 raters), 200 (3). User 9, active in the late era: 200 is first
    # in the active list and second all-time (1/61 + 1/62), ahead of 100 (1/61) and the active
    # list's second, 905 (1/62). User 8, early: 100 (1/61 + 1/61), then 200 (1/62) and 901 (the
    # active second, 1/62) tie and the rating count breaks it. The score stays that count.
    want = spark.createDataFrame([(8, 1, 100, 4.0), (8, 2, 200, 3.0), (9, 1, 200, 3.0), (9, 2, 100, 4.0)],
                                 "userId int, rank int, movieId int, score double")
    eq(got.select("userId", "rank", "movieId", "score"), want)
    # What they rated is never listed: with 200 rated, user 9's first pick is 100 (tied with the
    # active list's 905 at 1/61, more raters).
    late = spark.createDataFrame([(9, 200, 4.0, day(406))], RATINGS)
    _, got = recommend.cold_user_lists(eras.unionByName(late), train, 1, 180)
    assert {(r.userId, r.movieId) for r in got.collect()} == {(8, 100), (9, 100)}
    # Without a window: popularity alone, 100 first for both.
    _, plain = recommend.cold_user_lists(eras, train, 1)
    assert {(r.userId, r.movieId) for r in plain.collect()} == {(8, 100), (9, 100)}


def test_the_new_user_blend_moves_to_the_rankers_order_as_history_grows(spark, eras):
    from movierec_spark.config import Config

    lists = spark.createDataFrame([
        ("popularity", u, 1, 100, None, None) for u in (5, 9)] + [("popularity", 9, 2, 400, None, None)],
        "model string, userId int, rank int, movieId int, score double, because_movieId int")
    # The ranker prefers 400 to 100 for user 9; user 5 (3 ratings) is not new at max 1.
    scored = spark.createDataFrame([(9, 100, 0.1), (9, 400, 0.9), (5, 100, 0.3)],
                                   "userId int, movieId int, prediction double")
    cfg = Config().model_copy(update={"recommend": Config().recommend.model_copy(update={"new_user_max_ratings": 1})})
    got, lists2, users = recommend.blend_new_users(scored, lists, eras, cfg, 1)
    eq(users, spark.createDataFrame([(8, 1), (9, 1)], "userId int, n_u long"))
    # User 9, 1 rating of max 1: the ranker's share is 1/2. Fused (weights pop 1, active 1,
    # content 1/4; total 2.25): 100 = 1/61 / 2.25, 400 = 1/62 / 2.25, 200 (active, rank 1) =
    # 1/61 / 2.25. Ranker: 400 first (1/61), 100 second (1/62), 200 unscored.
    k = 60.0
    f = lambda *rs: sum(1 / (k + r) for r in rs) / 2.25  # noqa: E731
    want = spark.createDataFrame([
        (5, 100, 0.3),
        (9, 100, 0.5 * f(1) + 0.5 / (k + 2)), (9, 400, 0.5 * f(2) + 0.5 / (k + 1)), (9, 200, 0.5 * f(1)),
        (8, 100, 0.5 * f(1))],
        "userId int, movieId int, prediction double")
    assert_approx_df_equality(got, want, 1e-12, ignore_row_order=True, ignore_nullable=True)
    # The popularity-when-active picks join the lists (as popularity) so final_lists can name them.
    assert {(r.userId, r.movieId) for r in lists2.where("model = 'popularity'").collect()} == {
        (5, 100), (9, 100), (9, 400), (8, 100), (9, 200)}


def test_mmr_spreads_a_list_and_never_puts_near_duplicates_side_by_side_when_it_can(spark):
    cols = "userId int, rank int, movieId int, score double, source string"
    ranked = spark.createDataFrame([
        (1, 1, 1, 1.0, "a"), (1, 2, 2, 0.9, "b"), (1, 3, 3, 0.8, "c"), (1, 4, 4, 0.1, "d"),
        (2, 1, 1, 0.5, "a"),
        (3, 1, 5, 0.7, "a"), (3, 2, 6, 0.6, "b")], cols)
    # 2 is a near-duplicate of 1 (listed on 1's side only: read as symmetric), 3 is half like 1;
    # 5 and 6 are near-duplicates with nothing else in user 3's list.
    sims = spark.createDataFrame([(1, 2, 0.95), (3, 1, 0.5), (5, 6, 0.99), (6, 5, 0.99)],
                                 "movieId int, similar_movieId int, similarity double")
    assert_df_equality(recommend.mmr_rerank(ranked, sims, 0.0, 3), ranked.where("rank <= 3"), ignore_row_order=True)

    def order(lam):
        got = recommend.mmr_rerank(ranked, sims, lam, 3).orderBy("userId", "rank").collect()
        assert got[0].asDict().keys() == {"userId", "rank", "movieId", "score", "source"}
        assert all(r.source == "abcd"[r.movieId - 1] for r in got if r.userId == 1)  # columns travel along
        return {u: [r.movieId for r in got if r.userId == u] for u in (1, 2, 3)}

    # lambda 0.1: relevance still leads, but 2 may not follow its near-duplicate 1 while 3 is left.
    assert order(0.1) == {1: [1, 3, 2], 2: [1], 3: [5, 6]}
    # lambda 0.5: after 1, 3 scores 0.5 x 0.78 - 0.5 x 0.5 > 0 (4); then 4 (0) beats 2
    # (0.5 x 0.89 - 0.5 x 0.95 < 0).
    assert order(0.5) == {1: [1, 3, 4], 2: [1], 3: [5, 6]}
    assert recommend.mmr_rerank(ranked.limit(0), sims, 0.5, 3).isEmpty()


def test_new_movie_slots_give_unrated_content_picks_the_last_of_the_first_n_positions(spark):
    cols = "userId int, rank int, movieId int, score double, source string, because_movieId int"
    ranked = spark.createDataFrame([(1, r, m, 1.0 - r / 10, "als_implicit", None) for r, m in enumerate((10, 20, 30, 40), 1)]
                                   + [(2, 1, 10, 0.9, "popularity", None), (3, 1, 10, 0.9, "popularity", None)], cols)
    lists = spark.createDataFrame([
        ("content", 1, 1, 20, 0.8, 10), ("content", 1, 2, 99, 0.7, 10), ("content", 1, 3, 98, 0.6, 30),
        ("content", 2, 1, 20, 0.5, 10), ("als_implicit", 2, 1, 97, 0.9, None), ("content", 3, 1, 99, 0.4, 10),
        ("content", 4, 1, 99, 0.3, 20)],
        "model string, userId int, rank int, movieId int, score double, because_movieId int")
    rated = spark.createDataFrame([(m,) for m in (10, 20, 30, 40)], "movieId int")
    got = recommend.new_movie_slots(ranked, lists, rated, 1, 3, 4)
    # User 1's first unrated content pick (99, because of 10) takes position 3 of n = 3; 30 and
    # 40 move down one, and the list is cut at 4. User 2's content list has no unrated movie
    # (97 is implicit ALS's, not content's). User 3's list of one gets 99 right after it; user
    # 4, with no ranked list at all (rated everything else), gets it first. A pick's score is
    # the first displaced row's (30's 0.7 for user 1), else the list's last (user 3), else null.
    want = spark.createDataFrame([
        (1, 1, 10, 0.9, "als_implicit", None), (1, 2, 20, 0.8, "als_implicit", None),
        (1, 3, 99, 0.7, "content", 10), (1, 4, 30, 0.7, "als_implicit", None),
        (2, 1, 10, 0.9, "popularity", None),
        (3, 1, 10, 0.9, "popularity", None), (3, 2, 99, 0.9, "content", 10), (4, 1, 99, None, "content", 20)], cols)
    assert_approx_df_equality(got, want, 1e-12, ignore_row_order=True, ignore_nullable=True)
    # Two slots: 99 and 98 at positions 2 and 3.
    two = {(r.rank, r.movieId) for r in recommend.new_movie_slots(ranked, lists, rated, 2, 3, 4).where("userId = 1").collect()}
    assert two == {(1, 10), (2, 99), (3, 98), (4, 20)}
    assert recommend.new_movie_slots(ranked, lists, rated, 0, 3, 4) is ranked


# ----------------------------------------------------------------------------- feature passes

def test_feature_passes_label_each_pass_rows_with_their_rating_split_and_fold(spark):
    feats0 = spark.createDataFrame([(1, 10, 0.5), (2, 20, 0.7)], "userId int, movieId int, x double")
    feats1 = spark.createDataFrame([(3, 30, 0.1), (4, 40, 0.2)], "userId int, movieId int, x double")
    rows0 = spark.createDataFrame([(1, 10, 4.0), (2, 20, 3.0)], "userId int, movieId int, rating double")
    test = spark.createDataFrame([(3, 30, 5.0)], "userId int, movieId int, rating double")
    cands = spark.createDataFrame([(4, 40, None)], "userId int, movieId int, rating double")
    passes = [features.FeaturePass("fold 1", None, None, [("train", rows0, 0)]),
              features.FeaturePass("whole", None, None, [("test", test, -1), ("candidate", cands, -1)])]
    want = spark.createDataFrame([(1, 10, 0.5, 4.0, "train", 0), (2, 20, 0.7, 3.0, "train", 0),
                                  (3, 30, 0.1, 5.0, "test", -1), (4, 40, 0.2, None, "candidate", -1)],
                                 "userId int, movieId int, x double, label double, split string, fold int")
    eq(features.labelled_rows(passes, [feats0, feats1]), want)
    assert features.labelled_rows(passes, [feats0.limit(0), feats1.limit(0)]).isEmpty()


def test_the_fold_plan_gives_each_fold_its_rows_and_the_test_rows_a_whole_train_pass(spark, ratings):
    from movierec_spark.config import HybridConfig

    train = ratings.select("userId", "movieId", "rating")
    test = spark.createDataFrame([(9, 10, 3.0)], "userId int, movieId int, rating double")
    h = HybridConfig(folds=2, max_train_rows=None)
    passes, info = features.plan_passes(train, test, None, h, 7, 6)
    assert info == {"oof_folds": 2, "oof_fraction": 1.0, "test_features": "full"}
    assert [p.what.split(" (")[0] for p in passes] == ["fold 1/2", "fold 2/2", "test rows, from the whole train part"]
    # Each fold's rows are featurised from the other fold only, and together they are train.
    for f, p in enumerate(passes[:2]):
        (split, rows, fold), = p.labels
        assert (split, fold) == ("train", f)
        assert rows.join(p.fit, ["userId", "movieId"]).isEmpty()
        eq(rows.drop("fold").unionByName(p.fit.drop("fold")), train)
    eq(passes[2].fit, train)
    eq(passes[2].keys, test.select("userId", "movieId"))
    # Serving forces the whole-train pass; 'fold' test features ride along with fold 0.
    _, info = features.plan_passes(train, test, None, h.model_copy(update={"test_features": "fold"}), 7, 6)
    assert info["test_features"] == "fold"
    _, info = features.plan_passes(train, test, None, h.model_copy(update={"test_features": "fold"}), 7, 6,
                                   whole_fit=True)
    assert info["test_features"] == "full"
    # A serve run with the learned ranker (no test rows, no candidates): the out-of-fold passes only.
    passes, info = features.plan_passes(train, test.limit(0), None, h, 7, 6, test_rows=False)
    assert info["test_features"] == "none" and [p.fold_out for p in passes] == [0, 1]
    assert [split for p in passes for split, _, _ in p.labels] == ["train", "train"]
    cands = test.select("userId", "movieId")
    passes, info = features.plan_passes(train, test.limit(0), cands, h, 7, 6, whole_fit=True, test_rows=False)
    assert [p.fold_out for p in passes] == [0, 1, None] and [s for s, _, _ in passes[2].labels] == ["candidate"]


# ----------------------------------------------------------------------------- ranker

@pytest.fixture(scope="module")
def sims(spark):
    # Content neighbours: 10 -> 40 (0.9); 30 -> 40 (0.5), 30 -> 10 (0.4).
    return spark.createDataFrame([(10, 40, 1, 0.9), (30, 40, 1, 0.5), (30, 10, 2, 0.4)],
                                 "movieId int, similar_movieId int, rank int, similarity double")


LISTS = "userId int, movieId int, model string, rank int, score double"


def test_candidate_lists_union_each_models_unseen_top_n(spark, ratings, empty, sims):
    from types import SimpleNamespace

    cfg = SimpleNamespace(content=SimpleNamespace(user_sources=30, user_neighbours=20))
    train = ratings.select("userId", "movieId", "rating")
    got, implicit, cached = ranker.candidate_lists(train, sims, ["content", "popularity"], cfg, 2, 0)
    assert implicit is None and cached == []
    # Content: user 1 (mean 4) liked 10 (weight 1) and 30 (weight 2): 40 scores 0.9 + 2 x 0.5;
    # 10 is rated. User 2 liked only 20, which has no neighbours. User 3 liked 10: 40 at 0.9.
    # Popularity (by raters, 10, 20, 30), unseen: user 2 gets 30, user 3 gets 20 then 30.
    want = spark.createDataFrame([(1, 40, "content", 1, 1.9), (3, 40, "content", 1, 0.9),
                                  (2, 30, "popularity", 1, 1.0), (3, 20, "popularity", 1, 2.0),
                                  (3, 30, "popularity", 2, 1.0)], LISTS)
    assert_approx_df_equality(got, want, 1e-12, ignore_row_order=True, ignore_nullable=True)
    # Lists for some users only; the models still learn from all of train.
    only3, _, _ = ranker.candidate_lists(train, sims, ["content", "popularity"], cfg, 2, 0,
                                         users=F.col("userId") == 3)
    assert_approx_df_equality(only3, want.where("userId = 3"), 1e-12, ignore_row_order=True, ignore_nullable=True)
    none, _, _ = ranker.candidate_lists(empty.select("userId", "movieId", "rating"), sims,
                                        ["content", "popularity"], cfg, 2, 0)
    assert none.isEmpty()


def test_ranker_features_pivot_each_models_rank_and_score_and_add_history(spark, ratings, empty):
    train = ratings.select("userId", "movieId", "rating")
    lists = spark.createDataFrame([(1, 30, "popularity", 1, 1.0), (1, 30, "content", 2, 0.5),
                                   (1, 40, "content", 1, 0.8), (5, 10, "popularity", 1, 3.0)], LISTS)
    item_nb = spark.createDataFrame([(30, 10, 0.5), (30, 20, 0.25)], "movieId int, nb int, sim double")
    got, names = ranker.ranker_features(lists, train, ["content", "popularity"], 3, item_nb=item_nb)
    assert names == ["content_rank", "content_score", "popularity_rank", "popularity_score", "n_lists",
                     "u_n", "u_avg", "m_n", "m_avg", "m_log_n", "knn", "knn_n", "knn_u"]
    g = 23 / 6  # the train mean: for a user or movie with no train ratings
    # A model that did not list a movie ranks it n + 1 with score 0. User 1 rated 10 and 20,
    # the neighbours of 30 (0.5 + 0.25), none of 40's; user 5 has no train ratings.
    want = spark.createDataFrame([
        (1, 30, 2.0, 0.5, 1.0, 1.0, 2.0, 3.0, 4.0, 1.0, 5.0, math.log(2), 0.75, 2.0, 0.75 / math.sqrt(3)),
        (1, 40, 1.0, 0.8, 4.0, 0.0, 1.0, 3.0, 4.0, 0.0, g, 0.0, 0.0, 0.0, 0.0),
        (5, 10, 4.0, 0.0, 1.0, 3.0, 1.0, 0.0, g, 3.0, 11 / 3, math.log(4), 0.0, 0.0, 0.0),
    ], "userId int, movieId int, " + ", ".join(f"{n} double" for n in names))
    assert_approx_df_equality(got.select("userId", "movieId", *names), want, 1e-12,
                              ignore_row_order=True, ignore_nullable=True)
    none, _ = ranker.ranker_features(lists.limit(0), train, ["content", "popularity"], 3, item_nb=item_nb)
    assert none.isEmpty()
    # Candidates of some users only, named by a predicate: their user-side statistics read only
    # those users' rows, and give the same values.
    one, _ = ranker.ranker_features(lists.where("userId = 1"), train, ["content", "popularity"], 3,
                                    item_nb=item_nb, users=F.col("userId") == 1)
    assert_approx_df_equality(one.select("userId", "movieId", *names), want.where("userId = 1"), 1e-12,
                              ignore_row_order=True, ignore_nullable=True)
    # The predicate is applied, not only accepted: a candidate of a user it leaves out gets no
    # user-side statistics (user 1's count 0 and the train mean; its kNN history unread).
    cut = {(r.userId, r.movieId): (r.u_n, r.u_avg, r.knn) for r in ranker.ranker_features(
        lists, train, ["content", "popularity"], 3, item_nb=item_nb, users=F.col("userId") == 5)[0].collect()}
    assert cut[(1, 30)] == (0.0, pytest.approx(g), 0.0) and cut[(5, 10)][0] == 0.0


# ----------------------------------------------------------------------------- evaluation

def test_user_lists_hold_each_evaluated_users_list_in_rank_order_and_relevant_movies(spark, ratings):
    from movierec_spark.evaluation import _ranked, _user_lists

    # Ranks with a tie (movie id breaks it) and a gap; user 9 has no test ratings.
    recs = spark.createDataFrame([(1, 30, 5), (1, 20, 2), (1, 40, 2), (2, 50, 1), (9, 10, 1)],
                                 "userId int, movieId int, rank int")
    ranked = _ranked(recs, 2)
    eq(ranked, spark.createDataFrame([(1, 20, 1), (1, 40, 2), (2, 50, 1), (9, 10, 1)], "userId int, movieId int, pos int"))
    test = ratings.select("userId", "movieId", "rating")
    # Relevant at 4 and above: user 1 -> 10, 30; user 2 -> 20; user 3 -> 10 (no list: empty pred).
    want = spark.createDataFrame([(1, [20.0, 40.0], [10.0, 30.0]), (2, [50.0], [20.0]), (3, [], [10.0])],
                                 "userId int, pred array<double>, labels array<double>")
    got = _user_lists(ranked, test, 2, 4.0).withColumn("labels", F.array_sort("labels"))
    eq(got, want)
    assert _user_lists(ranked, test.limit(0), 2, None).isEmpty()
    assert _user_lists(ranked.limit(0), test, 2, None).where(F.size("pred") > 0).isEmpty()


# ----------------------------------------------------------------------------- content

def test_exact_neighbours_across_blocks_match_numpy_with_ties_by_id(spark):
    """Block pairs in numpy (mapInArrow) give every movie the brute-force top k: similarity
    (rounded to 6 decimals) descending, ties by the smaller id, never itself, never a cosine of
    0, whichever block a neighbour sits in and whether a vector is stored sparse or dense."""
    import numpy as np
    from pyspark.ml.linalg import Vectors, VectorUDT
    from pyspark.sql.types import BooleanType, IntegerType, StructField, StructType

    from movierec_spark.content import exact_neighbours

    rng = np.random.default_rng(3)
    width, n, k = 12, 40, 4
    m = np.where(rng.random((n, width)) < 0.3, rng.random((n, width)), 0.0)
    m[5] = m[6] = m[7] = m[8]  # four identical vectors: ties broken by id
    m[9] = 0.0                 # no content: nobody's neighbour
    m[10] = np.eye(width)[0]   # shares nothing with movies lacking column 0
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    m = np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)
    ids = [100 + 3 * i for i in range(n)]
    rows = []
    for i, r in enumerate(m):
        nz = np.nonzero(r)[0]
        vec = Vectors.dense(r.tolist()) if i % 2 else Vectors.sparse(width, nz.tolist(), r[nz].tolist())
        rows.append((ids[i], vec, bool(len(nz))))
    schema = StructType([StructField("movieId", IntegerType()), StructField("features", VectorUDT()),
                         StructField("has_content", BooleanType())])
    vectors = spark.createDataFrame(rows, schema)
    sims = np.round(m @ m.T, 6)
    want = []
    for i in range(n):
        cands = sorted((-sims[i, j], ids[j]) for j in range(n) if j != i and sims[i, j] > 0)
        want += [(ids[i], j, r + 1, float(-s)) for r, (s, j) in enumerate(cands[:k])]
    want_df = spark.createDataFrame(want, "movieId int, similar_movieId int, rank int, similarity double")
    got = exact_neighbours(vectors, k, block_size=7)  # 6 blocks: 36 block pairs
    assert_approx_df_equality(got, want_df, 1e-9, ignore_row_order=True, ignore_nullable=True)
    assert [r.similar_movieId for r in got.where("movieId = 115 AND rank <= 3").orderBy("rank").collect()] == \
        [118, 121, 124]
    assert exact_neighbours(vectors.limit(0), k).isEmpty()


def test_materialize_keeps_the_rows_cuts_the_plan_and_release_frees_the_blocks(spark):
    from pyspark.sql import functions as F

    from movierec_spark.session import materialize, release

    df = spark.range(100).withColumn("x", F.col("id") * 2).groupBy((F.col("id") % 7).alias("k")).agg(F.sum("x").alias("s"))
    before = {r.k: r.s for r in df.collect()}
    m = materialize(df)
    assert {r.k: r.s for r in m.collect()} == before
    plan = m._jdf.queryExecution().logical()
    assert plan.nodeName() == "LogicalRDD"  # the lineage is gone: queries on it plan one node
    rdd_id = plan.rdd().id()
    held = lambda: rdd_id in {int(i) for i in spark.sparkContext._jsc.getPersistentRDDs().keySet()}  # noqa: E731
    assert held()
    release(m)
    assert not held()
    release(m)  # twice is harmless
