"""Neighbour similarities and the out-of-fold plan behind the hybrid's features."""

from __future__ import annotations

import numpy as np
import pytest
from chispa import assert_approx_df_equality
from pyspark.sql import functions as F

from movierec_spark.config import HybridConfig
from movierec_spark.features import cosine_neighbours, oof_plan


def test_cosine_neighbours_match_a_dense_numpy_computation(spark):
    # 12 users x 9 movies, about half rated, centred values: with no cap the self-join's
    # similarities must equal the dense cosine (norms over all of an entity's values), in both
    # directions of each pair (the join aggregates each unordered pair once, then mirrors it).
    rng = np.random.default_rng(3)
    mask = rng.random((12, 9)) < 0.5
    vals = np.where(mask, rng.normal(size=(12, 9)).round(3), 0.0)
    rows = [(int(u), int(m), float(vals[u, m])) for u, m in zip(*np.nonzero(mask))]
    centred = spark.createDataFrame(rows, "userId int, movieId int, c double")
    got = {(r.userId, r.nb): (r.sim, r.rank) for r in
           cosine_neighbours(centred, "userId", "movieId", 4, 2, None, 42).collect()}

    norms = np.sqrt((vals ** 2).sum(axis=1))
    expected = {}
    for u in range(12):
        cands = []
        for v in range(12):
            common = (mask[u] & mask[v]).sum()
            if v == u or common < 2 or norms[u] == 0 or norms[v] == 0:
                continue
            sim = float(vals[u] @ vals[v] / (norms[u] * norms[v]))
            if sim > 0:
                cands.append((-sim, v))
        for rank, (neg, v) in enumerate(sorted(cands)[:4], start=1):
            expected[(u, v)] = (-neg, rank)
    assert set(got) == set(expected)
    for key, (sim, rank) in expected.items():
        assert got[key][0] == pytest.approx(sim, abs=1e-12)
        assert got[key][1] == rank
    # Symmetric: whenever both ends keep each other, they see the same similarity.
    for (u, v), (sim, _) in got.items():
        if (v, u) in got:
            assert got[(v, u)][0] == pytest.approx(sim, abs=1e-15)


@pytest.mark.parametrize("n_train, oof_folds, expected", [
    (80_000, None, (5, 1.0)),            # ml-latest-small: every fold, every row
    (800_000, None, (5, 1.0)),           # 1M ratings: still under max_train_rows
    (4_000_000, None, (3, 2_000_000 / 2_400_000)),   # 5M: 3 folds supply 2.4M rows, 2M kept
    (20_000_000, None, (1, 0.5)),        # 25M: one fold of 4M rows, half kept
    (20_000_000, 2, (2, 0.25)),          # an explicit oof_folds wins
    (1_000, 9, (5, 1.0)),                # ... up to the number of folds
])
def test_oof_plan_computes_only_the_rows_the_gbt_trains_on(n_train, oof_folds, expected):
    n, frac = oof_plan(n_train, HybridConfig(oof_folds=oof_folds))
    assert n == expected[0]
    assert frac == pytest.approx(expected[1])
    assert n_train * n / 5 * frac <= 2_000_000 * 1.0001


def test_oof_plan_without_a_row_cap_uses_every_fold():
    assert oof_plan(50_000_000, HybridConfig(max_train_rows=None)) == (5, 1.0)


# About 80 s (it computes every pass twice): the default run exercises the batched path in
# every pipeline fixture; this equivalence check runs with the heavy tests (CI's time budget).
@pytest.mark.heavy
def test_batched_out_of_fold_passes_equal_the_passes_one_by_one(spark):
    """The out-of-fold passes as one batch (ids encoded per pass) give every feature the passes
    computed one by one give, with content neighbours too; residual ALS only up to its random
    start. A test pair that is also a train pair (never so in a real split) keeps each pass's
    own features. Each row's features come from its own pass: a leak across passes (another pass's
    ratings, hence the row's own) would move the means, counts and neighbour ratings. Both ways,
    the whole-train pass takes the als stage's model (also with the shared neighbour lists)."""
    from pyspark.sql import functions as F

    from movierec_spark.als import fit_explicit, predict_explicit
    from movierec_spark.baselines import fit_bias
    from movierec_spark.config import AlsConfig, BaselineConfig, ContentConfig
    from movierec_spark.features import compute_passes, labelled_rows, plan_passes, with_folds

    rng = np.random.default_rng(11)
    rows = [(int(u) * 7 + 3, int(m) * 5 + 1, float(rng.integers(1, 6)))
            for u in range(40) for m in range(30) if rng.random() < 0.4]
    train = spark.createDataFrame(rows, "userId int, movieId int, rating double")
    test = spark.createDataFrame([(3, 6, 3.0), (10, 11, 4.0)], "userId int, movieId int, rating double")
    mids = sorted({m for _, m, _ in rows})
    movies = spark.createDataFrame([(m, ["Drama"] if m % 2 else ["Comedy", "Drama"]) for m in mids],
                                   "movieId int, genres array<string>")
    sims = spark.createDataFrame([(a, b, 1.0 / (1 + abs(a - b)), r + 1) for a in mids
                                  for r, b in enumerate(sorted((b for b in mids if b != a), key=lambda b: abs(a - b))[:4])],
                                 "movieId int, similar_movieId int, similarity double, rank int")
    h = HybridConfig(folds=2, max_train_rows=None, neighbours=5)
    args = (movies, sims, BaselineConfig(), AlsConfig(rank=2, max_iter=5), ContentConfig(), h, 7, 0.5, 5.0)
    passes, _ = plan_passes(train, test, None, h, 7, len(rows))
    folded = with_folds(train, 7, 2)
    assert [p.fold_out for p in passes] == [0, 1, None]
    # A model the whole-train pass would not fit itself (another rank): its predictions prove it was used.
    bias = fit_bias(train, BaselineConfig())
    given = fit_explicit(train, bias, AlsConfig(rank=3, max_iter=4), 7)
    # Demographics for most users: each pass's like-user residuals stay within the pass too.
    users = spark.createDataFrame([(u * 7 + 3, "MF"[u % 2], 15 + u, f"job{u % 3}", "0") for u in range(35)],
                                  "userId int, gender string, age int, occupation string, zip string")
    one = compute_passes(spark, passes, args, folded=folded, batched=False, whole_als=given, users=users)
    whole: dict = {}
    many = compute_passes(spark, passes[:2], args, folded=folded, batched=True, users=users, whole_nb=whole)
    many.append(compute_passes(spark, passes[2:], args, whole_als=given, users=users)[0])
    assert len(many) == 3 and many[0] is many[1] and many[0] is not one[0]
    # The out-of-fold passes alone also gave the whole train part's neighbour lists (a serve
    # run's served pairs take them): what cosine_neighbours over train gives.
    from movierec_spark.session import release

    centred = {"userId": train.join(train.groupBy("userId").agg(F.avg("rating").alias("mu")), "userId"),
               "movieId": train.join(train.groupBy("movieId").agg(F.avg("rating").alias("mu")), "movieId")}
    for kind, entity, via, cap in (("user", "userId", "movieId", h.cap_per_movie),
                                   ("movie", "movieId", "userId", h.cap_per_user)):
        c = centred[entity].select("userId", "movieId", (F.col("rating") - F.col("mu")).alias("c"))
        assert_approx_df_equality(whole[kind], cosine_neighbours(c, entity, via, h.neighbours, h.min_common, cap, 7),
                                  1e-9, ignore_row_order=True)
        release(whole[kind])
    want = {(r.userId, r.movieId): r.prediction for r in
            predict_explicit(given, bias, test.select("userId", "movieId"), True).collect()}
    for results in (one, many):
        got = {(r.userId, r.movieId): r.als for r in results[-1].select("userId", "movieId", "als").collect()}
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-9) for k in want)
    a = labelled_rows(passes, one).drop("als")
    b = labelled_rows(passes, many).drop("als")
    assert a.where("split = 'train'").count() == len(rows) and a.where("split = 'test'").count() == 2
    assert_approx_df_equality(a, b, 1e-9, ignore_row_order=True, ignore_column_order=True, ignore_nullable=True)
    # ALS: the same model up to its random start, which on ratings without structure (these are
    # random) moves single predictions a lot; so its error against the rows' ratings is compared.
    # Seeing the row's own rating through another pass would make the batch's error far smaller.
    def mae(results):
        rows = labelled_rows(passes, results).where("split = 'train'")
        return rows.agg(F.avg(F.abs(F.col("als") - F.col("label")))).first()[0]

    assert 0.9 * mae(one) < mae(many) < 1.1 * mae(one)
    for df in one + many:
        df.unpersist()


def test_time_knn_and_implicit_features_of_a_pair(spark):
    # Issue 23's feature groups on a hand-checkable fit: the rating-day residual averages the
    # user's other ratings of the pair's day (shrunk), u_days / u_tdev / m_age come from the
    # pair's rated_at, a candidate without one is featurised at the user's latest rating, and
    # implicit ALS scores known pairs (0 for an unknown user).
    from datetime import datetime

    from pyspark.sql import functions as F

    from movierec_spark.baselines import fit_bias
    from movierec_spark.config import AlsConfig, BaselineConfig, ContentConfig, ImplicitAlsConfig
    from movierec_spark.features import pair_features

    d1, d2, d3 = datetime(2001, 1, 1, 10), datetime(2001, 1, 11, 10), datetime(2001, 1, 21, 10)
    rows = []
    for u in range(1, 9):
        for m in range(1, 9):
            if (u + m) % 3:
                rows.append((u, m, float(1 + (u * m) % 5), d1 if m <= 3 else (d2 if m <= 6 else d3)))
    fit = spark.createDataFrame(rows, "userId int, movieId int, rating double, rated_at timestamp")
    movies = spark.createDataFrame([(m, ["Drama"], 1990 + m) for m in range(1, 10)],
                                   "movieId int, genres array<string>, year int")
    pairs = spark.createDataFrame([(1, 2, 4.0, d2), (2, 1, None, None), (99, 1, 3.0, d1)],
                                  "userId int, movieId int, rating double, rated_at timestamp")
    base, h = BaselineConfig(), HybridConfig(neighbours=5, min_common=1, cap_per_movie=None, cap_per_user=None)
    got = {(r.userId, r.movieId): r for r in pair_features(
        fit, pairs, movies, None, base, AlsConfig(rank=2, max_iter=3), ContentConfig(), h, 42, 0.5, 5.0,
        ImplicitAlsConfig(rank=2, max_iter=3)).collect()}

    res = fit_bias(fit, base).predict(fit).withColumn("res", F.col("rating") - F.col("baseline"))
    day2 = res.where((F.col("userId") == 1) & (F.col("rated_at") == d2)).agg(F.sum("res"), F.count("*")).first()
    r = got[(1, 2)]
    assert r.day_n == day2[1] == 2  # movies 4 and 6 (user 1 has no rating of movie 5)
    assert r.day_res == pytest.approx(day2[0] / (day2[1] + h.day_shrink), abs=1e-9)
    assert r.u_days == pytest.approx(10.0)  # user 1's first rating is on d1
    ts = [t for u, _, _, t in rows if u == 1]
    mean_t = sum(t.timestamp() for t in ts) / len(ts)
    assert r.u_tdev == pytest.approx((d2.timestamp() - mean_t) / 86400.0, abs=1e-6)
    assert r.m_age == 2001 - 1992
    assert r.implicit != 0.0
    # knn_item: the baseline plus sim-weighted residuals of user 1's ratings of movie 2's listed
    # neighbours (cosine_neighbours, tested above, on movie-centred ratings), shrunk.
    cm = fit.join(fit.groupBy("movieId").agg(F.avg("rating").alias("ma")), "movieId").select(
        "userId", "movieId", (F.col("rating") - F.col("ma")).alias("c"))
    nbs = {x.nb: x.sim for x in cosine_neighbours(cm, "movieId", "userId", 5, 1, None, 42).where("movieId = 2").collect()}
    rated = {x.movieId: x.res for x in res.where("userId = 1").collect()}
    used = [m for m in nbs if m in rated]
    base12 = fit_bias(fit, base).predict(pairs.where("userId = 1")).first().baseline
    assert r.knn_item_n == len(used) >= 1
    assert r.knn_item == pytest.approx(
        base12 + sum(nbs[m] * rated[m] for m in used) / (sum(nbs[m] for m in used) + h.knn_shrink), abs=1e-9)
    # No rated_at: the user's latest rating (d3) is the time.
    c = got[(2, 1)]
    assert c.u_days == pytest.approx(20.0) and c.m_age == 2001 - 1991
    assert c.day_n == sum(1 for u, _, _, t in rows if u == 2 and t == d3)
    # A user the fit never saw: zeros, not NaN (the GBT refuses NaN), and the fit's mean rating.
    z = got[(99, 1)]
    assert (z.implicit, z.day_n, z.day_res, z.u_days, z.knn_user_n) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert z.GAvg == z.UAvg == pytest.approx(sum(x[2] for x in rows) / len(rows), abs=1e-12)

    # A bias model passed in (the run's, fitted once) is the one the features use, and it is
    # left cached for its owner. One fitted with other shrinkage moves the baseline and the
    # features built on it; the global mean stays the fit's.
    other = fit_bias(fit, BaselineConfig(item_reg=50.0, user_reg=50.0))
    given = {(r.userId, r.movieId): r for r in pair_features(
        fit, pairs, movies, None, base, AlsConfig(rank=2, max_iter=3), ContentConfig(), h, 42, 0.5, 5.0,
        bias=other).collect()}
    want = {(x.userId, x.movieId): x.baseline for x in other.predict(pairs.select("userId", "movieId")).collect()}
    assert {k: pytest.approx(v.baseline, abs=1e-12) for k, v in given.items()} == want
    assert given[(1, 2)].baseline != pytest.approx(r.baseline, abs=1e-6)
    assert given[(99, 1)].GAvg == z.GAvg
    assert other.user_bias.is_cached and other.item_bias.is_cached


def test_exclude_features_takes_groups_and_columns_and_refuses_unknown_names():
    from movierec_spark.hybrid import model_features
    from movierec_spark.tables import FEATURE_GROUPS, FEATURES

    assert model_features(HybridConfig(exclude_features=[])) == FEATURES
    kept = model_features(HybridConfig(exclude_features=["knn", "m_age"]))
    assert "m_age" not in kept and not set(FEATURE_GROUPS["knn"]) & set(kept) and "day_res" in kept
    # The default: the groups the validation ablation dropped.
    assert not {"implicit", "knn_item"} & set(model_features(HybridConfig()))
    with pytest.raises(ValueError, match="unknown feature or group 'nope'"):
        model_features(HybridConfig(exclude_features=["nope"]))


def test_demographic_features_average_the_residuals_of_like_users(spark):
    # demo_res: the movie's mean baseline residual among the fit ratings of users of the pair's
    # user's gender and age band (shrunk); occ_res: the same by occupation. Men of 18-24 loved
    # movie 10, women of 25-34 hated it: a young man's pair leans up, a woman's down, and a user
    # without a demographics row gets the neutral fill.
    from pyspark.sql import functions as F

    from movierec_spark.baselines import fit_bias
    from movierec_spark.config import AlsConfig, BaselineConfig, ContentConfig
    from movierec_spark.features import pair_features

    people = {u: ("M", 19 + u, "student" if u <= 2 else "writer") for u in range(1, 5)}
    people.update({u: ("F", 26 + u, "writer") for u in range(5, 9)})
    people.update({9: ("M", 21, "student"), 11: ("F", 30, "writer")})  # the pairs' users
    users = spark.createDataFrame([(u, g, a, o, "00000") for u, (g, a, o) in people.items()],
                                  "userId int, gender string, age int, occupation string, zip string")
    rows = [(u, 10, 5.0 if u <= 4 else 1.0) for u in range(1, 9)]
    rows += [(u, m, float(1 + (u + m) % 5)) for u in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11) for m in (20, 21, 22)]
    fit = spark.createDataFrame(rows, "userId int, movieId int, rating double")
    movies = spark.createDataFrame([(m, ["Drama"]) for m in (10, 20, 21, 22)], "movieId int, genres array<string>")
    pairs = spark.createDataFrame([(9, 10, 4.0), (11, 10, 2.0), (10, 10, 3.0)], "userId int, movieId int, rating double")
    h = HybridConfig(neighbours=5, min_common=1, cap_per_movie=None, cap_per_user=None)
    got = {r.userId: r for r in pair_features(fit, pairs, movies, None, BaselineConfig(), AlsConfig(rank=2, max_iter=3),
                                              ContentConfig(), h, 42, 0.5, 5.0, users=users).collect()}

    res = {r.userId: r.res for r in fit_bias(fit, BaselineConfig()).predict(fit.where("movieId = 10"))
           .select("userId", (F.col("rating") - F.col("baseline")).alias("res")).collect()}
    young_men, women = [1, 2, 3, 4], [5, 6, 7, 8]
    k = h.demo_shrink
    assert (got[9].u_age, got[9].u_male, got[11].u_male) == (21.0, 1.0, 0.0)
    assert got[9].demo_res == pytest.approx(sum(res[u] for u in young_men) / (4 + k), abs=1e-9) and got[9].demo_res > 0
    assert got[11].demo_res == pytest.approx(sum(res[u] for u in women) / (4 + k), abs=1e-9) and got[11].demo_res < 0
    assert got[9].occ_res == pytest.approx((res[1] + res[2]) / (2 + k), abs=1e-9)  # the students
    assert got[11].occ_res == pytest.approx(sum(res[u] for u in [3, 4, *women]) / (6 + k), abs=1e-9)
    z = got[10]  # no demographics row
    assert (z.u_age, z.u_male, z.demo_res, z.occ_res) == (-1.0, -1.0, 0.0, 0.0)


def test_neighbour_ratings_in_numpy_equal_the_spark_joins(spark, monkeypatch):
    """gather.neighbour_ratings against the joins it replaced (sur, smr, csmr) on random data:
    tied similarities (the lower rating first), lists longer and shorter than 5, content lists
    whose far neighbours count for the kNN sums only, pairs without a list or without a hit,
    several chunks per partition, and no pairs at all."""
    import random

    from movierec_spark import gather
    from movierec_spark.features import _content_ratings, _top_ratings

    rnd = random.Random(11)
    resid = spark.createDataFrame(
        [(u, m, float(rnd.randrange(1, 11)) / 2, rnd.uniform(-2, 2))
         for u, m in sorted({(rnd.randrange(1, 120), rnd.randrange(1, 60)) for _ in range(1500)})],
        "userId int, movieId int, r double, res double")
    keys = spark.createDataFrame(sorted({(rnd.randrange(1, 130), rnd.randrange(1, 70)) for _ in range(1200)}),
                                 "userId int, movieId int")
    sims = [0.25, 0.5, 0.75]  # few values: ties
    unb = spark.createDataFrame([(u, n, rnd.choice(sims)) for u in range(1, 110)
                                 for n in rnd.sample(range(1, 125), rnd.randrange(12)) if n != u],
                                "userId int, nb int, sim double")
    mnb = spark.createDataFrame([(m, n, rnd.choice(sims)) for m in range(1, 55)
                                 for n in rnd.sample(range(1, 65), rnd.randrange(9)) if n != m],
                                "movieId int, nb int, sim double")
    cnb = spark.createDataFrame([(m, n, rnd.random(), rnd.random() < 0.6) for m in range(1, 60)
                                 for n in rnd.sample(range(1, 65), rnd.randrange(10)) if n != m],
                                "movieId int, nb int, sim double, near boolean")
    monkeypatch.setattr(gather, "CHUNK", 50)
    shrink, cshrink = 1.0, 0.5

    got_u = gather.neighbour_ratings(keys, resid, [unb], "movieId", ["sur"], [shrink]).select(
        "userId", "movieId", *[f"sur{i}" for i in range(1, 6)], "n_sur", F.col("sur_knn").alias("_knn_user"),
        F.col("sur_cnt").alias("knn_user_n"))
    want_u = _top_ratings(keys.join(unb, "userId").join(
        resid.select(F.col("userId").alias("nb"), "movieId", "r", "res"), ["nb", "movieId"]),
        "sur", "n_sur", "knn_user", shrink)
    assert want_u.count() > 100
    assert_approx_df_equality(got_u, want_u, 1e-9, ignore_row_order=True, ignore_nullable=True,
                              ignore_column_order=True)

    got_m = gather.neighbour_ratings(keys, resid, [mnb, cnb], "userId", ["smr", "csmr"], [shrink, cshrink])
    want_m = _top_ratings(keys.join(mnb, "movieId").join(
        resid.select("userId", F.col("movieId").alias("nb"), "r", "res"), ["userId", "nb"]),
        "smr", "n_smr", "knn_item", shrink)
    want_c = _content_ratings(keys.join(cnb, "movieId").join(
        resid.select("userId", F.col("movieId").alias("nb"), "r", "res"), ["userId", "nb"]), cshrink)
    assert want_m.count() > 100 and want_c.count() > 100
    smr = got_m.where("smr_cnt > 0").select(
        "userId", "movieId", *[f"smr{i}" for i in range(1, 6)], "n_smr", F.col("smr_knn").alias("_knn_item"),
        F.col("smr_cnt").alias("knn_item_n"))
    assert_approx_df_equality(smr, want_m, 1e-9, ignore_row_order=True, ignore_nullable=True)
    csmr = got_m.where("csmr_cnt > 0").select(
        "userId", "movieId", *[f"csmr{i}" for i in range(1, 6)], "n_csmr", F.col("csmr_near").alias("content_sim"),
        F.col("csmr_knn").alias("_cres"))
    assert_approx_df_equality(csmr, want_c, 1e-9, ignore_row_order=True, ignore_nullable=True)
    # A kept row has a hit in one set at least; one without any hit is left out.
    assert got_m.where("smr_cnt = 0 and csmr_cnt = 0").isEmpty()
    assert got_m.count() == want_m.join(want_c, ["userId", "movieId"], "full").count()
    assert gather.neighbour_ratings(keys.limit(0), resid, [unb], "movieId", ["sur"], [shrink]).isEmpty()

    # The gather's rows come unsorted: the same values when every pair arrives before the ratings
    # and the lists, in batches of 7 rows (so one batch holds several kinds).
    from movierec_spark.partitioned import movies_then_users

    monkeypatch.setattr(gather, "movies_then_users", lambda m, u, p, ordered=True: movies_then_users(
        m, u, p, ordered=False).sortWithinPartitions(F.desc("kind")))
    batch = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "7")
    try:
        late = gather.neighbour_ratings(keys, resid, [mnb, cnb], "userId", ["smr", "csmr"], [shrink, cshrink])
        assert_approx_df_equality(late, got_m, 1e-9, ignore_row_order=True, ignore_nullable=True)
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", batch)
