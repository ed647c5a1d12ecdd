"""Evaluation metrics against hand-computed toy examples and an independent pure-Python reference."""

from __future__ import annotations

import math
import random

import pytest
from chispa import assert_df_equality

from movierec_spark.evaluation import (
    METRICS_SCHEMA,
    RANKING_METRICS,
    cooccurrence_similarity,
    coverage,
    diversity,
    evaluate_ranking_model,
    evaluate_ranking_models,
    metrics_frame,
    novelty,
    ranking_metrics,
    rating_metrics,
    rating_metrics_by_model,
)

RECS_DDL = "userId int, movieId int, rank int"
TEST_DDL = "userId int, movieId int, rating double"
TRAIN_DDL = "userId int, movieId int, rating double"
SIM_DDL = "movieId int, similar_movieId int, similarity double"
L3 = 1 / math.log2(3)  # DCG gain at position 2


def as_dict(rows):
    return {(m, k): v for m, k, v in rows}


def assert_metrics(got: dict, want: dict):
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=1e-9), key


# --------------------------------------------------------------------------- rating metrics

def test_rating_metrics_by_hand(spark):
    # r - p = 0.5, 0, 1, -1, -1
    # RMSE = sqrt((0.25 + 0 + 1 + 1 + 1) / 5) = sqrt(0.65); MAE = 3.5 / 5 = 0.7
    # mean r = 14 / 5 = 2.8; SS_tot = 1.44 + 0.04 + 4.84 + 0.64 + 7.84 = 14.8; R² = 1 - 3.25 / 14.8
    # MAPE skips r = 0: (0.5/4 + 0/3 + 1/5 + 1/2) / 4 = 0.825 / 4 = 0.20625
    df = spark.createDataFrame([(4.0, 3.5), (3.0, 3.0), (5.0, 4.0), (2.0, 3.0), (0.0, 1.0)],
                               "rating double, prediction double")
    m = rating_metrics(df)
    assert set(m) == {"rmse", "mae", "r2", "mape"}
    assert m["rmse"] == pytest.approx(math.sqrt(0.65))
    assert m["mae"] == pytest.approx(0.7)
    assert m["r2"] == pytest.approx(1 - 3.25 / 14.8)
    assert m["mape"] == pytest.approx(0.20625)
    # MLlib's RegressionEvaluator, whose definitions the one aggregation follows.
    from pyspark.ml.evaluation import RegressionEvaluator

    for name in ("rmse", "mae", "r2"):
        assert m[name] == pytest.approx(RegressionEvaluator(metricName=name, labelCol="rating").evaluate(df),
                                        abs=1e-12), name


@pytest.mark.parametrize("rows", [[(4.0, 3.5)], [(4.0, 4.0)], [(3.0, 2.0), (3.0, 3.0)]],
                         ids=["one-row", "one-exact-row", "constant-label"])
def test_r2_edge_cases_as_mllib(spark, rows):
    # One row has no sample variance and a constant label none either: SS_tot is 0, and R² is
    # -inf (or NaN where nothing is wrong), as RegressionEvaluator gives.
    from pyspark.ml.evaluation import RegressionEvaluator

    df = spark.createDataFrame(rows, "rating double, prediction double")
    want = RegressionEvaluator(metricName="r2", labelCol="rating").evaluate(df)
    got = rating_metrics(df)["r2"]
    assert (math.isnan(got) and math.isnan(want)) or got == want, (got, want)


def test_rating_metrics_of_many_models_are_each_models_own(spark):
    rows = [("a", 4.0, 3.5), ("a", 3.0, 3.0), ("a", 5.0, 4.0), ("b", 2.0, 3.0), ("b", 1.0, 2.0), ("b", 4.5, 4.5)]
    df = spark.createDataFrame(rows, "model string, label double, prediction double")
    got = rating_metrics_by_model(df)
    assert set(got) == {"a", "b"}
    for model in ("a", "b"):
        alone = rating_metrics(df.where(f"model = '{model}'").withColumnRenamed("label", "rating"))
        assert got[model] == pytest.approx(alone, abs=1e-12), model
    assert got["a"]["mae"] == pytest.approx(0.5) and got["b"]["mae"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"1 of 3 rows \(model b\) have a null or NaN 'prediction'"):
        rating_metrics_by_model(df.unionByName(spark.createDataFrame([("b", 3.0, None)], df.schema)).where(
            "NOT (model = 'b' AND label = 1.0)"))


def test_rating_metrics_rejects_missing_predictions(spark):
    # A float prediction column (as ALS emits) with a null, then with a NaN.
    nulls = spark.createDataFrame([(4.0, 3.5), (3.0, None)], "r double, p float")
    with pytest.raises(ValueError, match=r"1 of 2 rows have a null or NaN 'p'"):
        rating_metrics(nulls, label_col="r", pred_col="p")
    nans = spark.createDataFrame([(4.0, 3.5), (3.0, float("nan"))], "rating double, prediction double")
    with pytest.raises(ValueError, match="null or NaN 'prediction'"):
        rating_metrics(nans)


# --------------------------------------------------------------------------- ranking, by hand

# test (userId, movieId, rating):
#   u1: 10 (5.0), 20 (4.0), 30 (2.0)
#   u2: 10 (3.0), 40 (4.5)
#   u3: 50 (1.0)
#   u4: 60 (4.0)                     -> relevant items, no recommendations
# recs, given out of order, lists longer than k:
#   u1: 20, 99, 10, 30  (ranks 1..4)
#   u2: 99, 98, 40
#   u3: 50, 10
#   u5: 10                           -> not in test: not evaluated
TEST_ROWS = [(1, 10, 5.0), (1, 20, 4.0), (1, 30, 2.0), (2, 10, 3.0), (2, 40, 4.5), (3, 50, 1.0), (4, 60, 4.0)]
RECS_ROWS = [(1, 30, 4), (1, 20, 1), (1, 10, 3), (1, 99, 2), (2, 40, 3), (2, 99, 1), (2, 98, 2),
             (3, 10, 2), (3, 50, 1), (5, 10, 1)]


# No threshold: R1 = {10, 20, 30}, R2 = {10, 40}, R3 = {50}, R4 = {60}; 4 users (u5 not).
# k = 1: lists u1 [20] hit, u2 [99] miss, u3 [50] hit, u4 [] -> per user 1, 0, 1, 0 for
#   precision, ndcg (IDCG = 1), map (/ min(|R|, 1) = 1), hit, mrr; recall 1/3, 0, 1, 0.
# k = 3: u1 [20, 99, 10]: hits at 1 and 3
#          P = 2/3, R = 2/3, DCG = 1 + 1/log2(4) = 1.5, IDCG = 1 + 1/log2(3) + 1/2,
#          AP = (1/1 + 2/3) / min(3, 3) = 5/9, RR = 1
#        u2 [99, 98, 40]: hit at 3
#          P = 1/3, R = 1/2, DCG = 1/2, IDCG = 1 + 1/log2(3), AP = (1/3) / min(2, 3) = 1/6, RR = 1/3
#        u3 [50, 10]: hit at 1; P = 1/3 (MLlib divides by k), R = 1, NDCG = 1, AP = 1, RR = 1
#        u4 []: all 0
BY_HAND = {
    ("precision", 1): 0.5, ("recall", 1): (1 / 3 + 1) / 4, ("ndcg", 1): 0.5, ("map", 1): 0.5,
    ("hit_rate", 1): 0.5, ("mrr", 1): 0.5,
    ("precision", 3): (2 / 3 + 1 / 3 + 1 / 3) / 4,
    ("recall", 3): (2 / 3 + 1 / 2 + 1) / 4,
    ("ndcg", 3): (1.5 / (1.5 + L3) + 0.5 / (1 + L3) + 1) / 4,
    ("map", 3): (5 / 9 + 1 / 6 + 1) / 4,
    ("hit_rate", 3): 3 / 4,
    ("mrr", 3): (1 + 1 / 3 + 1) / 4,
}


def test_ranking_metrics_by_hand(spark):
    recs = spark.createDataFrame(RECS_ROWS, RECS_DDL)
    test = spark.createDataFrame(TEST_ROWS, TEST_DDL)
    rows = ranking_metrics(recs, test, ks=(3, 1))
    assert [(m, k) for m, k, _ in rows] == [(m, k) for k in (1, 3) for m in RANKING_METRICS]
    assert_metrics(as_dict(rows), BY_HAND)


def test_ranking_metrics_relevance_threshold(spark):
    recs = spark.createDataFrame(RECS_ROWS, RECS_DDL)
    test = spark.createDataFrame(TEST_ROWS, TEST_DDL)
    rows = ranking_metrics(recs, test, ks=(3,), relevance_threshold=4.0)
    # rating >= 4: R1 = {10, 20}, R2 = {40}, R4 = {60}; u3 (only a 1.0) is not evaluated.
    #   u1 [20, 99, 10]: P = 2/3, R = 1, DCG = 1.5, IDCG = 1 + 1/log2(3), AP = (1 + 2/3) / 2 = 5/6, RR = 1
    #   u2 [99, 98, 40]: P = 1/3, R = 1, NDCG = (1/log2(4)) / 1 = 0.5, AP = (1/3) / 1, RR = 1/3
    #   u4 []: 0
    assert_metrics(as_dict(rows), {
        ("precision", 3): (2 / 3 + 1 / 3) / 3,
        ("recall", 3): 2 / 3,
        ("ndcg", 3): (1.5 / (1 + L3) + 0.5) / 3,
        ("map", 3): (5 / 6 + 1 / 3) / 3,
        ("hit_rate", 3): 2 / 3,
        ("mrr", 3): (1 + 1 / 3) / 3,
    })


def test_ranking_metrics_gapped_ranks_and_empty_recs(spark):
    test = spark.createDataFrame(TEST_ROWS, TEST_DDL)
    # Ranks with gaps (10, 20, 30, ...) order the lists exactly like 1, 2, 3, ...
    gapped = spark.createDataFrame([(u, m, r * 10) for u, m, r in RECS_ROWS], RECS_DDL)
    at3 = {key: v for key, v in BY_HAND.items() if key[1] == 3}
    assert_metrics(as_dict(ranking_metrics(gapped, test, ks=(3,))), at3)
    # No recommendations at all: every evaluated user scores 0.
    empty = spark.createDataFrame([], RECS_DDL)
    assert all(v == 0.0 for _, _, v in ranking_metrics(empty, test, ks=(5,)))
    # Nobody with a relevant item: nothing to average over.
    with pytest.raises(ValueError, match="no user has a test item with rating >= 5.5"):
        ranking_metrics(gapped, test, ks=(5,), relevance_threshold=5.5)
    with pytest.raises(ValueError, match="positive"):
        ranking_metrics(gapped, test, ks=(0, 5))


# --------------------------------------------------------------------------- ranking, reference

def reference_ranking(recs, test, ks, threshold):
    """Plain-Python metrics following the definitions in ranking_metrics' docstring."""
    relevant: dict[int, set] = {}
    for u, m, r in test:
        if threshold is None or r >= threshold:
            relevant.setdefault(u, set()).add(m)
    lists: dict[int, list] = {}
    for u, m, rank in sorted(recs, key=lambda t: (t[0], t[2], t[1])):
        lists.setdefault(u, []).append(m)
    out = {}
    for k in ks:
        acc = dict.fromkeys(RANKING_METRICS, 0.0)
        for u, rel in relevant.items():
            top = lists.get(u, [])[:k]
            flags = [m in rel for m in top]
            hits = sum(flags)
            acc["precision"] += hits / k
            acc["recall"] += hits / len(rel)
            dcg = sum(1 / math.log2(i + 2) for i, f in enumerate(flags) if f)
            idcg = sum(1 / math.log2(i + 2) for i in range(min(len(rel), k)))
            acc["ndcg"] += dcg / idcg
            seen, ap = 0, 0.0
            for i, f in enumerate(flags):
                if f:
                    seen += 1
                    ap += seen / (i + 1)
            acc["map"] += ap / min(len(rel), k)
            acc["hit_rate"] += 1.0 if hits else 0.0
            acc["mrr"] += 1 / (flags.index(True) + 1) if hits else 0.0
        for name, total in acc.items():
            out[(name, k)] = total / len(relevant)
    return out


@pytest.mark.parametrize("threshold", [None, 3.5])
def test_ranking_metrics_match_reference(spark, threshold):
    rnd = random.Random(7)
    test, recs = [], []
    for u in range(1, 31):
        # Users 1-3 have test items but no recs; users 28-30 have recs but no test items.
        if u <= 27:
            for m in rnd.sample(range(1, 41), rnd.randint(1, 8)):
                test.append((u, m, rnd.choice([1.0, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0])))
        if u > 3:
            items = rnd.sample(range(1, 41), rnd.randint(1, 15))  # some lists shorter than k
            recs += [(u, m, i + 1) for i, m in enumerate(items)]
    rnd.shuffle(recs)
    ks = (1, 5, 10)
    got = as_dict(ranking_metrics(spark.createDataFrame(recs, RECS_DDL),
                                  spark.createDataFrame(test, TEST_DDL), ks, threshold))
    want = reference_ranking(recs, test, ks, threshold)
    assert set(got) == set(want)
    assert_metrics(got, want)
    # The same lists through MLlib's own RankingEvaluator, whose definitions the one-pass
    # aggregation follows.
    from pyspark.ml.evaluation import RankingEvaluator

    from movierec_spark.evaluation import MLLIB_RANKING, _ranked, _user_lists

    lists = _user_lists(_ranked(spark.createDataFrame(recs, RECS_DDL), max(ks)),
                        spark.createDataFrame(test, TEST_DDL), max(ks), threshold).cache()
    for (name, k), value in got.items():
        if name in MLLIB_RANKING:
            ev = RankingEvaluator(predictionCol="pred", labelCol="labels", metricName=MLLIB_RANKING[name], k=k)
            assert value == pytest.approx(ev.evaluate(lists), abs=1e-12), (name, k)
    lists.unpersist()


# --------------------------------------------------------------------------- beyond accuracy

# train: movie 10 rated by users 1-4, 20 by 1-2, 30 by 1, 50 by 1-2 (never recommended),
#        40 by nobody; 4 distinct train users.
TRAIN_ROWS = [(1, 10, 4.0), (2, 10, 3.0), (3, 10, 5.0), (4, 10, 2.0), (1, 20, 4.0), (2, 20, 1.0),
              (1, 30, 3.0), (1, 50, 4.0), (2, 50, 4.0)]
# recs: u1 [10, 20, 30], u2 [10, 40], u3 [30]
BEYOND_RECS = [(1, 10, 1), (1, 20, 2), (1, 30, 3), (2, 10, 1), (2, 40, 2), (3, 30, 1)]


@pytest.fixture(scope="module")
def beyond(spark):
    return (spark.createDataFrame(BEYOND_RECS, RECS_DDL), spark.createDataFrame(TRAIN_ROWS, TRAIN_DDL))


def test_coverage_and_novelty_by_hand(spark, beyond):
    recs, train = beyond
    # top 1: {10, 30} -> 2/5; top 2: {10, 20, 40, 30} -> 4/5 of a 5-movie catalogue
    assert coverage(recs, 5, 1) == pytest.approx(0.4)
    assert coverage(recs, 5, 2) == pytest.approx(0.8)
    assert coverage(spark.createDataFrame([], RECS_DDL), 5, 2) == 0.0
    # -log2(p): 10 -> -log2(4/4) = 0, 20 -> -log2(2/4) = 1, 30 -> -log2(1/4) = 2,
    # 40 (no train ratings, counts as 1 user) -> 2
    # top 1 entries: 10, 10, 30 -> 2/3; top 2 entries: 10, 20, 10, 40, 30 -> 5/5
    assert novelty(recs, train, 1) == pytest.approx(2 / 3)
    assert novelty(recs, train, 2) == pytest.approx(1.0)
    assert math.isnan(novelty(spark.createDataFrame([], RECS_DDL), train, 2))


def test_diversity_by_hand(spark, beyond):
    recs, _ = beyond
    # (10, 20) given in both orientations, (10, 40) only as (40, 10); others missing = 0.
    sim = spark.createDataFrame([(10, 20, 0.5), (20, 10, 0.5), (40, 10, 0.2)], SIM_DDL)
    # k = 2: u1 [10, 20] -> 1 - 0.5; u2 [10, 40] -> 1 - 0.2; u3 [30] has no pair: left out
    assert diversity(recs, sim, 2) == pytest.approx((0.5 + 0.8) / 2)
    # k = 3: u1 [10, 20, 30] pairs 0.5, 0, 0 -> 1 - 1/6; u2 -> 0.8
    assert diversity(recs, sim, 3) == pytest.approx((5 / 6 + 0.8) / 2)
    # k = 1: nobody has two items
    assert math.isnan(diversity(recs, sim, 1))


def test_cooccurrence_similarity_by_hand(spark, beyond):
    recs, train = beyond
    # k = 2: lists [10, 20], [10, 40], [30] -> candidate pairs (10, 20), (10, 40).
    # U10 = {1,2,3,4}, U20 = {1,2}, U40 = {}: cos(10, 20) = 2 / sqrt(4 * 2); (10, 40) never
    # co-rated -> absent. (10, 30) and (10, 50) are co-rated but in no list -> absent.
    expected2 = spark.createDataFrame([(10, 20, 2 / math.sqrt(8))], SIM_DDL)
    assert_df_equality(cooccurrence_similarity(recs, train, 2), expected2, ignore_nullable=True,
                       ignore_row_order=True, allow_nan_equality=True)
    # k = 3 adds u1's (10, 30): 1 / sqrt(4 * 1) and (20, 30): 1 / sqrt(2 * 1)
    got3 = {(r.movieId, r.similar_movieId): r.similarity
            for r in cooccurrence_similarity(recs, train, 3).collect()}
    assert got3 == pytest.approx({(10, 20): 2 / math.sqrt(8), (10, 30): 0.5, (20, 30): 1 / math.sqrt(2)})


def test_evaluate_ranking_model(spark, beyond):
    recs, train = beyond
    # test: u1 likes 20, u2 likes 10, u4 likes 30 (no recs)
    test = spark.createDataFrame([(1, 20, 5.0), (2, 10, 4.0), (4, 30, 4.0)], TEST_DDL)
    ks = (1, 3)
    rows = evaluate_ranking_model(recs, test, train, n_items=5, ks=ks)
    got = as_dict(rows)
    assert len(rows) == len(got) == len(ks) * (len(RANKING_METRICS) + 3)
    assert all(isinstance(k, int) for _, k, _ in rows)
    # k = 1: u1 [10] miss, u2 [10] hit, u4 [] -> hit_rate 1/3; k = 3: u1 hit at 2, u2 at 1 -> mrr (1/2 + 1) / 3
    assert got[("hit_rate", 1)] == pytest.approx(1 / 3)
    assert got[("mrr", 3)] == pytest.approx(0.5)
    # coverage / novelty as in test_coverage_and_novelty_by_hand (k = 3: all four movies;
    # entries 10, 20, 30, 10, 40, 30 -> (0 + 1 + 2 + 0 + 2 + 2) / 6)
    assert got[("coverage", 1)] == pytest.approx(0.4) and got[("coverage", 3)] == pytest.approx(0.8)
    assert got[("novelty", 1)] == pytest.approx(2 / 3) and got[("novelty", 3)] == pytest.approx(7 / 6)
    # Co-occurrence diversity, k = 3: u1 pairs 2/sqrt(8), 1/2, 1/sqrt(2) -> 1 - mean;
    # u2 (10, 40) never co-rated -> 1. k = 1: no pairs.
    u1 = 1 - (2 / math.sqrt(8) + 0.5 + 1 / math.sqrt(2)) / 3
    assert got[("diversity", 3)] == pytest.approx((u1 + 1.0) / 2)
    assert math.isnan(got[("diversity", 1)])
    # A given similarity replaces the co-occurrence one.
    sim = spark.createDataFrame([(10, 20, 0.5), (40, 10, 0.2)], SIM_DDL)
    with_sim = as_dict(evaluate_ranking_model(recs, test, train, 5, ks=(3,), similarity=sim))
    assert with_sim[("diversity", 3)] == pytest.approx((5 / 6 + 0.8) / 2)


def test_many_models_in_one_pass_score_as_each_model_alone(spark, beyond):
    recs, train = beyond
    test = spark.createDataFrame([(1, 20, 5.0), (2, 10, 4.0), (4, 30, 4.0)], TEST_DDL)
    # Model b: other lists, one shorter, and nothing for user 2 (who has a test item).
    # It lists movie 50, which a never does, so coverage and novelty differ between them.
    other = spark.createDataFrame([(1, 30, 1), (1, 20, 2), (1, 50, 3), (3, 10, 1), (3, 40, 2)], RECS_DDL)
    # Model c lists nothing at all.
    top = (recs.selectExpr("'a' AS model", "*").unionByName(other.selectExpr("'b' AS model", "*")))
    for sim in (None, spark.createDataFrame([(10, 20, 0.5), (40, 10, 0.2), (20, 30, 0.3)], SIM_DDL)):
        got = evaluate_ranking_models(top, ["a", "b", "c"], test, train, 5, ks=(1, 3), similarity=sim)
        for model, alone in (("a", recs), ("b", other), ("c", recs.limit(0))):
            want = evaluate_ranking_model(alone, test, train, 5, ks=(1, 3), similarity=sim)
            assert [r[:2] for r in got[model]] == [r[:2] for r in want], model
            assert_metrics(as_dict(got[model]), {key: v for key, v in as_dict(want).items() if not math.isnan(v)})
            assert {key for key, v in as_dict(got[model]).items() if math.isnan(v)} == \
                {key for key, v in as_dict(want).items() if math.isnan(v)}, model
    # b: user 1 [30, 20] hits 20 at 2; user 2 has no list; user 4 neither -> mrr@3 = (1/2) / 3
    assert as_dict(got["b"])[("mrr", 3)] == pytest.approx(1 / 6)
    assert as_dict(got["c"])[("coverage", 3)] == 0.0


# --------------------------------------------------------------------------- metrics table rows

def test_metrics_frame(spark):
    rows = [("rmse", None, 0.9), ("ndcg", 10, 0.25), ("diversity", 1, float("nan"))]
    df = metrics_frame(spark, "run-1", "als", "test", rows)
    assert df.schema == METRICS_SCHEMA
    assert [f.name for f in df.schema] == ["run_id", "model", "metric", "k", "value", "split"]
    got = [tuple(r) for r in df.collect()]
    assert got[:2] == [("run-1", "als", "rmse", None, 0.9, "test"), ("run-1", "als", "ndcg", 10, 0.25, "test")]
    assert math.isnan(got[2][4])
    with pytest.raises(ValueError, match="expected"):
        metrics_frame(spark, "run-1", "als", "test", [("rmse", 0.9)])
