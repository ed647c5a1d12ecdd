"""Offline evaluation: rating accuracy, top-k ranking quality, coverage, novelty, diversity.

Everything runs as DataFrame jobs; only the final scalar metrics reach the driver. RMSE, MAE
and R² follow MLlib's RegressionEvaluator and the ranking metrics MLlib RankingMetrics'
definitions, each family written as one aggregation over every model (tests hold them to the
evaluators' values); hit rate, MRR@k, MAPE and the beyond-accuracy metrics are DataFrame
aggregations too (no Python UDFs).

Conventions shared by every function taking `recs` (userId, movieId, rank):
- rank is 1-based, lower is better. A user's list is ordered by (rank, movieId), and "top k" is
  the first k entries of that order. With the usual contiguous ranks 1..n (row_number) this is
  exactly `rank <= k`; the explicit ordering only makes ties or gaps in rank well defined and
  keeps MLlib's array positions and the hand-written metrics on the same cut.
- Lists may be longer than any k; each metric cuts per k.

Metric rows are (metric, k, value) tuples, k None for rating metrics; `metrics_frame` turns them
into the `metrics` table's rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

log = logging.getLogger(__name__)

MetricRow = tuple[str, int | None, float]

# The `metrics` table contract: one row per (run, model, split, metric, k).
METRICS_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType(), False),
    T.StructField("model", T.StringType(), False),
    T.StructField("metric", T.StringType(), False),
    T.StructField("k", T.IntegerType(), True),
    T.StructField("value", T.DoubleType(), False),
    T.StructField("split", T.StringType(), False),
])

RANKING_METRICS = ("precision", "recall", "ndcg", "map", "hit_rate", "mrr")
# Our metric name -> MLlib RankingEvaluator's metricName, whose definition it follows.
MLLIB_RANKING = {
    "precision": "precisionAtK",
    "recall": "recallAtK",
    "ndcg": "ndcgAtK",
    "map": "meanAveragePrecisionAtK",
}


# ----------------------------------------------------------------------------- rating metrics

def rating_metrics(pred: DataFrame, label_col: str = "rating", pred_col: str = "prediction") -> dict[str, float]:
    """RMSE, MAE, R² and MAPE of predicted ratings, as MLlib's RegressionEvaluator defines the
    first three (a test holds them to its values).

    MAPE = mean(|r - p| / |r|) over the rows with r != 0 (NaN if there are none; MovieLens
    ratings are never 0). R² is MLlib's: 1 - SS_res / SS_tot.

    Raises ValueError if `pred` is empty or any prediction or label is null or NaN: every test
    pair must be predicted upstream (e.g. ALS with coldStartStrategy="nan" plus a fallback), and
    silently dropping them would flatter the model.
    """
    df = pred.select(F.lit("").alias("model"), F.col(label_col).alias("label"), F.col(pred_col).alias("prediction"))
    got = rating_metrics_by_model(df, label_col, pred_col)
    if not got:
        raise ValueError("rating_metrics: no rows to evaluate")
    return got[""]


def rating_metrics_by_model(preds: DataFrame, label_name: str = "rating", pred_name: str = "prediction"
                            ) -> dict[str, dict[str, float]]:
    """rating_metrics of every model in `preds` (model, label, prediction) in one aggregation
    (one job for all models, where three MLlib evaluators and a check were four per model):
    {model: {rmse, mae, r2, mape}}. The names are the caller's column names, for its errors."""
    label, predicted = F.col("label").cast("double"), F.col("prediction").cast("double")

    def bad(c):  # on the double value: isnan of a string or decimal column fails to analyse
        return c.isNull() | F.isnan(c)

    err = label - predicted
    n = F.count(F.lit(1))
    rows = preds.groupBy("model").agg(
        n.alias("n"),
        F.sum(F.when(bad(predicted), 1).otherwise(0)).alias("bad_pred"),
        F.sum(F.when(bad(label), 1).otherwise(0)).alias("bad_label"),
        F.avg(F.when(label != 0, F.abs(err) / F.abs(label))).alias("mape"),
        F.avg(err * err).alias("mse"),
        F.avg(F.abs(err)).alias("mae"),
        F.sum(err * err).alias("ss_res"),
        # SS_tot as a numerically stable variance (n - 1 times the sample variance), as MLlib's;
        # one row has no sample variance (null), and its SS_tot is 0 there.
        F.when(n > 1, F.var_samp(label) * (n - 1)).otherwise(F.lit(0.0)).alias("ss_tot"),
    ).collect()
    out = {}
    for s in sorted(rows, key=lambda r: r["model"]):
        who = f" (model {s['model']})" if s["model"] else ""
        if s["bad_pred"]:
            raise ValueError(f"rating_metrics: {s['bad_pred']:,} of {s['n']:,} rows{who} have a null or NaN "
                             f"'{pred_name}'; every test pair must be predicted upstream")
        if s["bad_label"]:
            raise ValueError(f"rating_metrics: {s['bad_label']:,} of {s['n']:,} rows{who} have a null or NaN "
                             f"'{label_name}'")
        ss_tot = s["ss_tot"]
        out[s["model"]] = {
            "rmse": math.sqrt(s["mse"]),
            "mae": float(s["mae"]),
            # MLlib: 1 - SS_res / SS_tot, so a constant label (SS_tot 0) gives -inf or NaN as there.
            "r2": 1.0 - s["ss_res"] / ss_tot if ss_tot else (math.nan if s["ss_res"] == 0 else -math.inf),
            "mape": float(s["mape"]) if s["mape"] is not None else math.nan,
        }
    return out


# ----------------------------------------------------------------------------- ranking metrics

def rmse(pred: DataFrame, label_col: str = "rating", pred_col: str = "prediction") -> float:
    """RMSE alone, in one aggregation: for a search scoring many candidates (tune.py), where
    rating_metrics' null checks and three evaluators cost a few Spark jobs more each. Rows must
    be complete (no null or NaN), which rating_metrics checks and this does not."""
    return float(pred.agg(F.sqrt(F.avg((F.col(label_col) - F.col(pred_col)) ** 2))).first()[0])


def _check_ks(ks: Iterable[int]) -> list[int]:
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 1:
        raise ValueError(f"ks must be a non-empty set of positive integers, got {list(ks)!r}")
    return out


def _ranked(recs: DataFrame, max_k: int | None = None, by: Sequence[str] = ()) -> DataFrame:
    """(*by, userId, movieId, pos): pos = 1-based position in the user's list ordered by (rank,
    movieId). `by`: columns that tell lists apart beyond the user (["model"]: many models' lists).

    Re-numbering makes ties and gaps in `rank` harmless; the window and a later groupBy on
    userId share one shuffle.
    """
    keys = [*by, "userId"]
    w = Window.partitionBy(*keys).orderBy(F.col("rank").asc(), F.col("movieId").asc())
    df = recs.select(*keys, "movieId", "rank").withColumn("pos", F.row_number().over(w))
    if max_k is not None:
        df = df.filter(F.col("pos") <= max_k)
    return df.select(*keys, "movieId", "pos")


def _user_lists(ranked: DataFrame, test: DataFrame, max_k: int,
                relevance_threshold: float | None, models: DataFrame | None = None) -> DataFrame:
    """One row per evaluated user: (userId, pred array<double> in rank order, labels array<double>).

    Evaluated users are those with at least one relevant test item; a user without
    recommendations gets an empty `pred`, so they score 0 rather than vanish. With `models` (one
    row per model name), `ranked` holds every model's lists (a "model" column) and the rows are
    (model, userId, pred, labels): every evaluated user once per model.
    """
    rel = test.select("userId", "movieId", "rating")
    if relevance_threshold is not None:
        rel = rel.filter(F.col("rating") >= F.lit(float(relevance_threshold)))
    labels = rel.groupBy("userId").agg(
        F.array_distinct(F.collect_list(F.col("movieId").cast("double"))).alias("labels"))
    # sort_array on (pos, movieId) structs restores list order after the unordered collect.
    keys = ["userId"] if models is None else ["model", "userId"]
    preds = (ranked.filter(F.col("pos") <= max_k)
             .groupBy(*keys)
             .agg(F.sort_array(F.collect_list(F.struct("pos", "movieId"))).alias("s"))
             .select(*keys, F.transform("s", lambda x: x["movieId"].cast("double")).alias("pred")))
    if models is not None:
        labels = models.crossJoin(labels)
    empty = F.array().cast(T.ArrayType(T.DoubleType()))
    return (labels.join(preds, keys, "left")
            .select(*keys, F.coalesce("pred", empty).alias("pred"), "labels"))


# Per-user array expressions over _user_lists' rows (pred, labels), shared by ranking_metrics and
# user_ndcg (functions: a Column needs the running JVM). rel[i] = 1 when the (i+1)-th listed
# movie is relevant; gain[i] its discounted gain.
def _rel():
    return F.transform("pred", lambda x: F.when(F.array_contains(F.col("labels"), x), 1).otherwise(0))


def _n_rel():
    return F.size("labels").cast("double")


def _gain():
    return F.transform("rel", lambda x, i: x / F.log(i + 2.0))


def _total(arr, zero):
    return F.aggregate(arr, F.lit(zero), lambda acc, x: acc + x)


def _ndcg(k: int):
    """nDCG@k of a row holding `gain` and `n_rel` (MLlib's definition, see ranking_metrics)."""
    ideal = F.least(F.col("n_rel"), F.lit(float(k)))
    idcg = F.aggregate(F.sequence(F.lit(0), ideal.cast("int") - 1), F.lit(0.0),
                       lambda acc, i: acc + 1.0 / F.log(i + 2.0))
    return _total(F.slice(F.col("gain"), 1, k), 0.0) / idcg


def user_ndcg(recs: DataFrame, test: DataFrame, k: int, relevance_threshold: float | None = None) -> DataFrame:
    """userId, ndcg: each evaluated user's nDCG@k (ranking_metrics' ndcg@k is their mean), for
    comparing two lists user by user (paired_gain)."""
    lists = _user_lists(_ranked(recs, k), test, k, relevance_threshold)
    return (lists.select("userId", _rel().alias("rel"), "labels")
            .select("userId", _n_rel().alias("n_rel"), _gain().alias("gain"))
            .select("userId", _ndcg(k).alias("ndcg")))


def paired_gain(a: DataFrame, b: DataFrame) -> tuple[float, float, int]:
    """(mean, standard error, users) of b's per-user value minus a's (user_ndcg frames), over
    the users both hold. Two lists scored on the same users differ by less noise than either
    figure carries alone: the paired standard error measures that noise."""
    d = a.join(b.withColumnRenamed("ndcg", "ndcg_b"), "userId").select((F.col("ndcg_b") - F.col("ndcg")).alias("d"))
    row = d.agg(F.avg("d").alias("m"), F.stddev_samp("d").alias("s"), F.count(F.lit(1)).alias("n")).first()
    n = int(row["n"])
    mean = float(row["m"]) if row["m"] is not None else 0.0
    se = float(row["s"]) / math.sqrt(n) if n > 1 and row["s"] is not None else float("inf")
    return mean, se, n


def ranking_metrics(recs: DataFrame, test: DataFrame, ks: Sequence[int] = (1, 5, 10, 20),
                    relevance_threshold: float | None = None) -> list[MetricRow]:
    """Top-k ranking quality of `recs` (userId, movieId, rank) against held-out `test`
    (userId, movieId, rating).

    Relevant items of user u: R_u = u's test items with rating >= relevance_threshold (all of
    them when None). Evaluated users: those with |R_u| >= 1 (users with relevant items but no
    recommendations count, with an empty list). Every metric is the mean over evaluated users;
    L_u is u's top-k list (first k by rank; may be shorter than k); hits = |L_u ∩ R_u|.
    Users in recs but not in test (or with no relevant item) are ignored.

    MLlib RankingEvaluator's definitions (mllib RankingMetrics), exactly, computed here in one
    aggregation (tests hold them to RankingEvaluator's values):
    - precision@k = hits / k  (divides by k even if the list is shorter than k)
    - recall@k    = hits / |R_u|  (not min(|R_u|, k): a user with more than k relevant items
      cannot reach 1)
    - ndcg@k      = DCG / IDCG with binary relevance, DCG = sum over positions i = 1..k with
      L_u[i] in R_u of 1 / log(i + 1), IDCG = sum over i = 1..min(|R_u|, k) of 1 / log(i + 1)
      (MLlib uses ln; the base cancels in the ratio, so this equals the usual log2 form)
    - map@k       = (sum over positions i <= k with L_u[i] in R_u of hits_in_first_i / i)
      / min(|R_u|, k)

    By hand (same lists, same users):
    - hit_rate@k  = share of users with hits >= 1
    - mrr@k       = mean of 1 / (position of the first relevant item in L_u), 0 if none in top k

    Returns rows ("precision", k, value), ... for every k in ks (ascending) and the metrics in
    RANKING_METRICS order. Raises ValueError if no user has a relevant test item.
    """
    ks = _check_ks(ks)
    return _ranking_metrics(_ranked(recs, max(ks)), test, ks, relevance_threshold)


def _ranking_metrics(ranked: DataFrame, test: DataFrame, ks: list[int],
                     relevance_threshold: float | None) -> list[MetricRow]:
    return _ranking_metrics_by_model(ranked.withColumn("model", F.lit("")), test, ks, relevance_threshold,
                                     [""])[""]


def _ranking_metrics_by_model(ranked: DataFrame, test: DataFrame, ks: list[int],
                              relevance_threshold: float | None, models: list[str]) -> dict[str, list[MetricRow]]:
    """_ranking_metrics of every model in `ranked` (a "model" column; `models`: their names) in
    one aggregation: {model: rows}."""
    max_k = max(ks)
    names = ranked.sparkSession.createDataFrame([(m,) for m in models], "model string")
    lists = _user_lists(ranked, test, max_k, relevance_threshold, names)
    # MLlib RankingMetrics' definitions, written as array expressions so that every metric at
    # every k is one aggregation over the users (MLlib's evaluator is a job per metric and k:
    # 16 per model). rel[i] = 1 when the (i+1)-th listed movie is relevant.
    # Hits within the first i+1 positions, at each relevant position: map's precisions.
    prec = F.transform("rel", lambda x, i: x * _total(F.slice(F.col("rel"), 1, i + 1), 0) / (i + 1.0))
    # Position of the first relevant item in the list (null if none): hit_rate and mrr.
    first = F.array_min(F.transform("rel", lambda x, i: F.when(x == 1, i + 1)))
    per_user = lists.select("model", _rel().alias("rel"), "labels").select(
        "model", "rel", _n_rel().alias("n_rel"), _gain().alias("gain"), prec.alias("prec"), first.alias("first"))
    aggs = [F.count(F.lit(1)).alias("n_users")]
    for k in ks:
        hits = _total(F.slice(F.col("rel"), 1, k), 0)
        ideal = F.least(F.col("n_rel"), F.lit(float(k)))
        hit = F.col("first") <= k
        aggs += [F.avg(hits / float(k)).alias(f"precision_{k}"),
                 F.avg(hits / F.col("n_rel")).alias(f"recall_{k}"),
                 F.avg(_ndcg(k)).alias(f"ndcg_{k}"),
                 F.avg(_total(F.slice(F.col("prec"), 1, k), 0.0) / ideal).alias(f"map_{k}"),
                 F.avg(F.when(hit, 1.0).otherwise(0.0)).alias(f"hit_rate_{k}"),
                 F.avg(F.when(hit, 1.0 / F.col("first")).otherwise(0.0)).alias(f"mrr_{k}")]
    got = {r["model"]: r for r in per_user.groupBy("model").agg(*aggs).collect()}
    if not got:
        # Every model has a row for each evaluated user, so no row means no such user. MLlib
        # would return NaN (a mean over no users): say why instead.
        thr = "" if relevance_threshold is None else f" with rating >= {relevance_threshold}"
        raise ValueError(f"ranking_metrics: no user has a test item{thr}; nothing to evaluate")
    log.info("ranking metrics over %s users, k in %s", f"{next(iter(got.values()))['n_users']:,}", ks)
    return {m: [(name, k, float(got[m][f"{name}_{k}"])) for k in ks for name in RANKING_METRICS] for m in models}


# ----------------------------------------------------------------------------- beyond accuracy
# Internal versions take the output of `_ranked` and a list of ks, and answer every k in one job.

def _by_model(rows, models: list[str], ks: list[int], prefix: str, value, empty: float) -> dict[str, dict[int, float]]:
    """{model: {k: value(row[prefix + k])}} from one aggregated row per model (`rows`, grouped by
    "model"); a model without rows (an empty list) gets `empty` at every k."""
    got = {r["model"]: r for r in rows}
    return {m: {k: value(got[m][f"{prefix}{k}"]) if m in got else empty for k in ks} for m in models}


def _coverage(ranked: DataFrame, n_items: int, ks: list[int]) -> dict[int, float]:
    return _coverage_by_model(ranked.withColumn("model", F.lit("")), n_items, ks, [""])[""]


def _coverage_by_model(ranked: DataFrame, n_items: int, ks: list[int], models: list[str]) -> dict[str, dict[int, float]]:
    if n_items <= 0:
        raise ValueError(f"coverage: n_items must be positive, got {n_items}")
    rows = ranked.groupBy("model").agg(*[F.countDistinct(F.when(F.col("pos") <= k, F.col("movieId"))).alias(f"c{k}")
                                         for k in ks]).collect()
    return _by_model(rows, models, ks, "c", lambda v: v / n_items, 0.0)


def coverage(recs: DataFrame, n_items: int, k: int) -> float:
    """Catalogue coverage: distinct movies appearing in any top-k list / n_items (0.0 if no recs)."""
    return _coverage(_ranked(recs, k), n_items, [k])[k]


def _novelty(ranked: DataFrame, train: DataFrame, ks: list[int]) -> dict[int, float]:
    return _novelty_by_model(ranked.withColumn("model", F.lit("")), train, ks, [""])[""]


def _novelty_by_model(ranked: DataFrame, train: DataFrame, ks: list[int], models: list[str]
                      ) -> dict[str, dict[int, float]]:
    pop = train.groupBy("movieId").agg(F.countDistinct("userId").alias("n_i"))
    n_users = train.agg(F.countDistinct("userId").alias("n_users"))
    # An item nobody rated in train counts as rated by one user: finite, and maximally novel.
    # greatest(.., 1) only guards an empty train (0 users) against a division by zero.
    p = F.coalesce(F.col("n_i"), F.lit(1)) / F.greatest(F.col("n_users"), F.lit(1))
    info = (ranked.join(pop, "movieId", "left").crossJoin(n_users)
            .select("model", "pos", (-F.log2(p)).alias("info")))
    rows = info.groupBy("model").agg(*[F.avg(F.when(F.col("pos") <= k, F.col("info"))).alias(f"n{k}")
                                       for k in ks]).collect()
    return _by_model(rows, models, ks, "n", _float_or_nan, math.nan)


def novelty(recs: DataFrame, train: DataFrame, k: int) -> float:
    """Mean self-information -log2(p_i) over all (user, item) entries of the top-k lists.

    p_i = distinct train users who rated i / distinct train users; an item without train ratings
    counts as rated by one user. NaN if there are no recommendations.
    """
    return _novelty(_ranked(recs, k), train, [k])[k]


def _canonical_similarity(similarity: DataFrame) -> DataFrame:
    """(i, j, sim) with i < j, one row per unordered pair.

    The input may hold a pair in one or both orientations; both are folded onto (min, max) and,
    should they disagree, the larger similarity is kept so the result does not depend on order.
    """
    a, b = F.col("movieId"), F.col("similar_movieId")
    return (similarity
            .select(F.least(a, b).alias("i"), F.greatest(a, b).alias("j"),
                    F.col("similarity").cast("double").alias("sim"))
            .filter(F.col("i") != F.col("j"))
            .groupBy("i", "j").agg(F.max("sim").alias("sim")))


def _pairs(ranked: DataFrame, by: Sequence[str] = ()) -> DataFrame:
    """Unordered item pairs within each user's list: (*by, userId, i, j, pos) with i < j and pos
    the later of the two positions, so a pair belongs to the top k exactly when pos <= k."""
    keys = [*by, "userId"]
    a = ranked.select(*keys, F.col("movieId").alias("i"), F.col("pos").alias("pos_i"))
    b = ranked.select(*keys, F.col("movieId").alias("j"), F.col("pos").alias("pos_j"))
    return (a.join(b, keys).filter(F.col("i") < F.col("j"))
            .select(*keys, "i", "j", F.greatest("pos_i", "pos_j").alias("pos")))


def _diversity(ranked: DataFrame, similarity: DataFrame, ks: list[int]) -> dict[int, float]:
    return _diversity_by_model(ranked.withColumn("model", F.lit("")), similarity, ks, [""])[""]


def _diversity_by_model(ranked: DataFrame, similarity: DataFrame, ks: list[int], models: list[str]
                        ) -> dict[str, dict[int, float]]:
    sims = _pairs(ranked, ["model"]).join(_canonical_similarity(similarity), ["i", "j"], "left")
    sim = F.coalesce(F.col("sim"), F.lit(0.0))  # a pair missing from `similarity` is dissimilar
    # Per user: mean pairwise similarity of the top-k list; null when the list has < 2 items
    # (no pair with pos <= k), so avg() below leaves those users out.
    per_user = sims.groupBy("model", "userId").agg(
        *[F.avg(F.when(F.col("pos") <= k, sim)).alias(f"s{k}") for k in ks])
    rows = per_user.groupBy("model").agg(*[F.avg(1.0 - F.col(f"s{k}")).alias(f"d{k}") for k in ks]).collect()
    return _by_model(rows, models, ks, "d", _float_or_nan, math.nan)


def diversity(recs: DataFrame, similarity: DataFrame, k: int) -> float:
    """Intra-list diversity: mean over users with >= 2 items in their top k of
    1 - (mean similarity over the unordered pairs of that list).

    `similarity` (movieId, similar_movieId, similarity) is treated as symmetric (either
    orientation, or both, may be present); a pair missing from it has similarity 0.
    NaN if no user has two items.
    """
    return _diversity(_ranked(recs, k), similarity, [k])[k]


def _cooccurrence_similarity(ranked: DataFrame, train: DataFrame, k: int, by: Sequence[str] = ()) -> DataFrame:
    # A pair's similarity depends on train alone: with many models' lists (`by`), one self-join
    # serves the pairs any of them holds.
    top = ranked.filter(F.col("pos") <= k)
    wanted = _pairs(top, by).select("i", "j").distinct()
    # Only recommended items matter: shrinking train before the self-join keeps it small when
    # the lists concentrate on few (popular) items.
    items = top.select("movieId").distinct()
    # |U_i| rides along each (user, item) row (a window count, not a groupBy joined back), so
    # the pair aggregate below needs no further joins.
    t = (train.select("userId", "movieId").distinct().join(items, "movieId", "left_semi")
         .withColumn("n", F.count(F.lit(1)).over(Window.partitionBy("movieId"))))
    a = t.select("userId", F.col("movieId").alias("i"), F.col("n").alias("n_i"))
    b = t.select("userId", F.col("movieId").alias("j"), F.col("n").alias("n_j"))
    return (a.join(b, "userId").filter(F.col("i") < F.col("j"))
            .join(wanted, ["i", "j"], "left_semi")
            .groupBy("i", "j", "n_i", "n_j").agg(F.count(F.lit(1)).alias("n_ij"))
            .select(F.col("i").alias("movieId"), F.col("j").alias("similar_movieId"),
                    (F.col("n_ij") / F.sqrt(F.col("n_i") * F.col("n_j"))).alias("similarity")))


def cooccurrence_similarity(recs: DataFrame, train: DataFrame, k: int) -> DataFrame:
    """Cosine similarity of binary user-rating vectors for item pairs that co-occur in some
    top-k list: cos(i, j) = |U_i ∩ U_j| / sqrt(|U_i| |U_j|), U_i = train users who rated i.

    Returns (movieId, similar_movieId, similarity) with movieId < similar_movieId (one row per
    unordered pair; `diversity` treats it as symmetric). Pairs no train user rated together are
    absent, i.e. similarity 0. Lazy: nothing runs until it is used.
    """
    return _cooccurrence_similarity(_ranked(recs, k), train, k)


def _float_or_nan(v) -> float:
    return math.nan if v is None else float(v)


# ----------------------------------------------------------------------------- combined, table

def evaluate_ranking_model(recs: DataFrame, test: DataFrame, train: DataFrame, n_items: int,
                           ks: Sequence[int] = (1, 5, 10, 20), relevance_threshold: float | None = None,
                           similarity: DataFrame | None = None) -> list[MetricRow]:
    """All ranking rows for one model: ranking_metrics, then coverage, novelty and diversity at
    every k in ks. Diversity uses `similarity` if given, else cooccurrence_similarity on train
    (computed once for the longest cut, which holds every shorter cut's pairs)."""
    return evaluate_ranking_models(recs.select(F.lit("").alias("model"), "userId", "movieId", "rank"), [""], test,
                                   train, n_items, ks, relevance_threshold, similarity)[""]


def evaluate_ranking_models(top: DataFrame, models: list[str], test: DataFrame, train: DataFrame, n_items: int,
                            ks: Sequence[int] = (1, 5, 10, 20), relevance_threshold: float | None = None,
                            similarity: DataFrame | None = None) -> dict[str, list[MetricRow]]:
    """evaluate_ranking_model of every model in `top` (model, userId, movieId, rank; `models`:
    the names, each listed once), all models in each Spark job: {model: rows}. Each metric
    family is one aggregation grouped by model, where one model at a time cost about twenty
    small jobs per model."""
    ks = _check_ks(ks)
    max_k = max(ks)
    # The lists are read by every metric: rank them once and cache the cut.
    ranked = _ranked(top, max_k, ["model"]).persist()
    sim = None
    try:
        rows = _ranking_metrics_by_model(ranked, test, ks, relevance_threshold, models)
        if similarity is None:
            sim = _cooccurrence_similarity(ranked, train, max_k, ["model"]).persist()
        cov = _coverage_by_model(ranked, n_items, ks, models)
        nov = _novelty_by_model(ranked, train, ks, models)
        div = _diversity_by_model(ranked, sim if sim is not None else similarity, ks, models)
        for m in models:
            for k in ks:
                rows[m] += [("coverage", k, cov[m][k]), ("novelty", k, nov[m][k]), ("diversity", k, div[m][k])]
        return rows
    finally:
        if sim is not None:
            sim.unpersist()
        ranked.unpersist()


def metrics_frame(spark: SparkSession, run_id: str, model: str, split: str,
                  rows: list[tuple[str, int | None, float]]) -> DataFrame:
    """Rows (metric, k, value) as a DataFrame with METRICS_SCHEMA (k null for rating metrics)."""
    data = []
    for r in rows:
        if len(r) != 3:
            raise ValueError(f"metrics_frame: expected (metric, k, value), got {r!r}")
        metric, k, value = r
        data.append((run_id, model, str(metric), None if k is None else int(k), float(value), split))
    return spark.createDataFrame(data, METRICS_SCHEMA)


def evaluate_run(spark: SparkSession, run_id: str, preds: DataFrame, top: DataFrame | None, train: DataFrame | None,
                 test: DataFrame | None, n_items: int, cfg, similarity: DataFrame | None
                 ) -> tuple[DataFrame | None, dict[str, list[MetricRow]]]:
    """(metrics rows with split 'test', or None when there is nothing to evaluate; the rows by
    model) of a run: rating metrics of every model in `preds` (model, rating, prediction) and
    ranking metrics of every model in `top` (model, userId, movieId, rank) against `test`.
    Every model's figures come from the same Spark jobs (rating_metrics_by_model,
    evaluate_ranking_models); `cfg`: the evaluation config."""
    rated = sorted(r.model for r in preds.select("model").distinct().collect())
    ranked = sorted(r.model for r in top.select("model").distinct().collect()) if top is not None else []
    rating = rating_metrics_by_model(preds.select("model", F.col("rating").alias("label"), "prediction")) if rated else {}
    ranking = (evaluate_ranking_models(top.select("model", "userId", "movieId", "rank"), ranked, test, train, n_items,
                                       ks=tuple(cfg.ks), relevance_threshold=cfg.relevance_threshold,
                                       similarity=similarity) if ranked else {})
    # Rating models, then ranking models, each sorted.
    rows_by_model: dict[str, list[MetricRow]] = {}
    for model in rated:
        rows_by_model.setdefault(model, []).extend((m, None, v) for m, v in rating[model].items())
    for model in ranked:
        rows_by_model.setdefault(model, []).extend(ranking[model])
    frames = [metrics_frame(spark, run_id, m, "test", rows) for m, rows in rows_by_model.items()]
    if not frames:
        return None, rows_by_model
    df = frames[0]
    for f in frames[1:]:
        df = df.unionByName(f)
    return df, rows_by_model


def log_metrics(rows_by_model: dict[str, list[MetricRow]]) -> dict:
    """Log every metric row; return the headline figures per model (rmse, mae, precision@10, ndcg@10)."""
    out = {}
    for model, rows in rows_by_model.items():
        for metric, k, value in rows:
            log.info("metric %-13s %-10s %-4s %.4f", model, metric, "" if k is None else f"@{k}", value)
        out[model] = {f"{m}@{k}" if k else m: round(v, 4) for m, k, v in rows
                      if (k is None and m in ("rmse", "mae")) or (k == 10 and m in ("precision", "ndcg"))}
    return out
