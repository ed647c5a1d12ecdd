"""Offline evaluation: rating accuracy, top-k ranking quality, coverage, novelty, diversity.

Everything runs as DataFrame jobs; only the final scalar metrics reach the driver. MLlib's
RegressionEvaluator computes RMSE, MAE and R²; the ranking metrics follow MLlib RankingMetrics'
definitions, written as array expressions in one aggregation (a test holds them to
RankingEvaluator's values); hit rate, MRR@k, MAPE and the beyond-accuracy metrics are DataFrame
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

from pyspark.ml.evaluation import RegressionEvaluator
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
    """RMSE, MAE, R² (MLlib RegressionEvaluator) and MAPE of predicted ratings.

    MAPE = mean(|r - p| / |r|) over the rows with r != 0 (NaN if there are none; MovieLens
    ratings are never 0). R² is MLlib's: 1 - SS_res / SS_tot.

    Raises ValueError if `pred` is empty or any prediction or label is null or NaN: every test
    pair must be predicted upstream (e.g. ALS with coldStartStrategy="nan" plus a fallback), and
    silently dropping them would flatter the model.
    """
    # Only two columns are needed; cached because four passes read them (check + 3 evaluators)
    # and `pred` is usually a model's transform output.
    df = pred.select(F.col(label_col).cast("double").alias("label"),
                     F.col(pred_col).cast("double").alias("prediction")).persist()
    try:
        def bad(c: str):
            return F.col(c).isNull() | F.isnan(c)

        nonzero = F.col("label") != 0
        s = df.agg(
            F.count(F.lit(1)).alias("n"),
            F.sum(F.when(bad("prediction"), 1).otherwise(0)).alias("bad_pred"),
            F.sum(F.when(bad("label"), 1).otherwise(0)).alias("bad_label"),
            F.avg(F.when(nonzero, F.abs(F.col("label") - F.col("prediction")) / F.abs(F.col("label"))))
            .alias("mape"),
        ).first()
        if s["n"] == 0:
            raise ValueError("rating_metrics: no rows to evaluate")
        if s["bad_pred"]:
            raise ValueError(f"rating_metrics: {s['bad_pred']:,} of {s['n']:,} rows have a null or NaN "
                             f"'{pred_col}'; every test pair must be predicted upstream")
        if s["bad_label"]:
            raise ValueError(f"rating_metrics: {s['bad_label']:,} of {s['n']:,} rows have a null or NaN "
                             f"'{label_col}'")
        out = {}
        for name in ("rmse", "mae", "r2"):
            ev = RegressionEvaluator(labelCol="label", predictionCol="prediction", metricName=name)
            out[name] = float(ev.evaluate(df))
        out["mape"] = float(s["mape"]) if s["mape"] is not None else math.nan
        return out
    finally:
        df.unpersist()


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


def _ranked(recs: DataFrame, max_k: int | None = None) -> DataFrame:
    """(userId, movieId, pos): pos = 1-based position in the user's list ordered by (rank, movieId).

    Re-numbering makes ties and gaps in `rank` harmless; the window and a later groupBy on
    userId share one shuffle.
    """
    w = Window.partitionBy("userId").orderBy(F.col("rank").asc(), F.col("movieId").asc())
    df = recs.select("userId", "movieId", "rank").withColumn("pos", F.row_number().over(w))
    if max_k is not None:
        df = df.filter(F.col("pos") <= max_k)
    return df.select("userId", "movieId", "pos")


def _user_lists(ranked: DataFrame, test: DataFrame, max_k: int,
                relevance_threshold: float | None) -> DataFrame:
    """One row per evaluated user: (userId, pred array<double> in rank order, labels array<double>).

    Evaluated users are those with at least one relevant test item; a user without
    recommendations gets an empty `pred`, so they score 0 rather than vanish.
    """
    rel = test.select("userId", "movieId", "rating")
    if relevance_threshold is not None:
        rel = rel.filter(F.col("rating") >= F.lit(float(relevance_threshold)))
    labels = rel.groupBy("userId").agg(
        F.array_distinct(F.collect_list(F.col("movieId").cast("double"))).alias("labels"))
    # sort_array on (pos, movieId) structs restores list order after the unordered collect.
    preds = (ranked.filter(F.col("pos") <= max_k)
             .groupBy("userId")
             .agg(F.sort_array(F.collect_list(F.struct("pos", "movieId"))).alias("s"))
             .select("userId", F.transform("s", lambda x: x["movieId"].cast("double")).alias("pred")))
    empty = F.array().cast(T.ArrayType(T.DoubleType()))
    return (labels.join(preds, "userId", "left")
            .select("userId", F.coalesce("pred", empty).alias("pred"), "labels"))


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
    max_k = max(ks)
    lists = _user_lists(ranked, test, max_k, relevance_threshold)
    # MLlib RankingMetrics' definitions, written as array expressions so that every metric at
    # every k is one aggregation over the users (MLlib's evaluator is a job per metric and k:
    # 16 per model). rel[i] = 1 when the (i+1)-th listed movie is relevant.
    # Hits within the first i+1 positions, at each relevant position: map's precisions.
    prec = F.transform("rel", lambda x, i: x * _total(F.slice(F.col("rel"), 1, i + 1), 0) / (i + 1.0))
    # Position of the first relevant item in the list (null if none): hit_rate and mrr.
    first = F.array_min(F.transform("rel", lambda x, i: F.when(x == 1, i + 1)))
    per_user = lists.select(_rel().alias("rel"), "labels").select(
        "rel", _n_rel().alias("n_rel"), _gain().alias("gain"), prec.alias("prec"), first.alias("first"))
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
    hand = per_user.agg(*aggs).first()
    if hand["n_users"] == 0:
        # MLlib would return NaN (a mean over no users): say why instead.
        thr = "" if relevance_threshold is None else f" with rating >= {relevance_threshold}"
        raise ValueError(f"ranking_metrics: no user has a test item{thr}; nothing to evaluate")
    log.info("ranking metrics over %s users, k in %s", f"{hand['n_users']:,}", ks)
    out: list[MetricRow] = [(name, k, float(hand[f"{name}_{k}"])) for k in ks for name in RANKING_METRICS]
    return out


# ----------------------------------------------------------------------------- beyond accuracy
# Internal versions take the output of `_ranked` and a list of ks, and answer every k in one job.

def _coverage(ranked: DataFrame, n_items: int, ks: list[int]) -> dict[int, float]:
    if n_items <= 0:
        raise ValueError(f"coverage: n_items must be positive, got {n_items}")
    row = ranked.agg(*[F.countDistinct(F.when(F.col("pos") <= k, F.col("movieId"))).alias(f"c{k}")
                       for k in ks]).first()
    return {k: row[f"c{k}"] / n_items for k in ks}


def coverage(recs: DataFrame, n_items: int, k: int) -> float:
    """Catalogue coverage: distinct movies appearing in any top-k list / n_items (0.0 if no recs)."""
    return _coverage(_ranked(recs, k), n_items, [k])[k]


def _novelty(ranked: DataFrame, train: DataFrame, ks: list[int]) -> dict[int, float]:
    pop = train.groupBy("movieId").agg(F.countDistinct("userId").alias("n_i"))
    n_users = train.agg(F.countDistinct("userId").alias("n_users"))
    # An item nobody rated in train counts as rated by one user: finite, and maximally novel.
    # greatest(.., 1) only guards an empty train (0 users) against a division by zero.
    p = F.coalesce(F.col("n_i"), F.lit(1)) / F.greatest(F.col("n_users"), F.lit(1))
    info = (ranked.join(pop, "movieId", "left").crossJoin(n_users)
            .select("pos", (-F.log2(p)).alias("info")))
    row = info.agg(*[F.avg(F.when(F.col("pos") <= k, F.col("info"))).alias(f"n{k}") for k in ks]).first()
    return {k: _float_or_nan(row[f"n{k}"]) for k in ks}


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


def _pairs(ranked: DataFrame) -> DataFrame:
    """Unordered item pairs within each user's list: (userId, i, j, pos) with i < j and pos the
    later of the two positions, so a pair belongs to the top k exactly when pos <= k."""
    a = ranked.select("userId", F.col("movieId").alias("i"), F.col("pos").alias("pos_i"))
    b = ranked.select("userId", F.col("movieId").alias("j"), F.col("pos").alias("pos_j"))
    return (a.join(b, "userId").filter(F.col("i") < F.col("j"))
            .select("userId", "i", "j", F.greatest("pos_i", "pos_j").alias("pos")))


def _diversity(ranked: DataFrame, similarity: DataFrame, ks: list[int]) -> dict[int, float]:
    sims = _pairs(ranked).join(_canonical_similarity(similarity), ["i", "j"], "left")
    sim = F.coalesce(F.col("sim"), F.lit(0.0))  # a pair missing from `similarity` is dissimilar
    # Per user: mean pairwise similarity of the top-k list; null when the list has < 2 items
    # (no pair with pos <= k), so avg() below leaves those users out.
    per_user = sims.groupBy("userId").agg(
        *[F.avg(F.when(F.col("pos") <= k, sim)).alias(f"s{k}") for k in ks])
    row = per_user.agg(*[F.avg(1.0 - F.col(f"s{k}")).alias(f"d{k}") for k in ks]).first()
    return {k: _float_or_nan(row[f"d{k}"]) for k in ks}


def diversity(recs: DataFrame, similarity: DataFrame, k: int) -> float:
    """Intra-list diversity: mean over users with >= 2 items in their top k of
    1 - (mean similarity over the unordered pairs of that list).

    `similarity` (movieId, similar_movieId, similarity) is treated as symmetric (either
    orientation, or both, may be present); a pair missing from it has similarity 0.
    NaN if no user has two items.
    """
    return _diversity(_ranked(recs, k), similarity, [k])[k]


def _cooccurrence_similarity(ranked: DataFrame, train: DataFrame, k: int) -> DataFrame:
    top = ranked.filter(F.col("pos") <= k)
    wanted = _pairs(top).select("i", "j").distinct()
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
    ks = _check_ks(ks)
    max_k = max(ks)
    # Recs are read by every metric: rank them once and cache the cut.
    ranked = _ranked(recs, max_k).persist()
    sim = None
    try:
        rows = _ranking_metrics(ranked, test, ks, relevance_threshold)
        if similarity is None:
            sim = _cooccurrence_similarity(ranked, train, max_k).persist()
        cov = _coverage(ranked, n_items, ks)
        nov = _novelty(ranked, train, ks)
        div = _diversity(ranked, sim if sim is not None else similarity, ks)
        for k in ks:
            rows += [("coverage", k, cov[k]), ("novelty", k, nov[k]), ("diversity", k, div[k])]
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


# How many models' metrics evaluate_run computes at a time.
EVALUATE_WORKERS = 4


def evaluate_run(spark: SparkSession, run_id: str, preds: DataFrame, top: DataFrame | None, train: DataFrame | None,
                 test: DataFrame | None, n_items: int, cfg, similarity: DataFrame | None
                 ) -> tuple[DataFrame | None, dict[str, list[MetricRow]]]:
    """(metrics rows with split 'test', or None when there is nothing to evaluate; the rows by
    model) of a run: rating metrics of every model in `preds` (model, rating, prediction) and
    ranking metrics of every model in `top` (model, userId, movieId, rank) against `test`.
    Runs Spark jobs (per model and metric family, EVALUATE_WORKERS models at a time); `cfg`: the
    evaluation config."""
    from .session import run_concurrently

    rated = sorted(r.model for r in preds.select("model").distinct().collect())
    ranked = sorted(r.model for r in top.select("model").distinct().collect()) if top is not None else []
    got: dict[tuple[str, str], list[MetricRow]] = {}

    def rating(model: str):
        def run():
            got[("rating", model)] = [(m, None, v) for m, v in rating_metrics(
                preds.where(F.col("model") == model)).items()]
        return run

    def ranking(model: str):
        def run():
            recs = top.where(F.col("model") == model).select("userId", "movieId", "rank").cache()
            try:
                got[("ranking", model)] = list(evaluate_ranking_model(
                    recs, test, train, n_items, ks=tuple(cfg.ks), relevance_threshold=cfg.relevance_threshold,
                    similarity=similarity))
            finally:  # another model's failure must not leave this one's lists cached
                recs.unpersist()
        return run

    # Each model's metrics are a chain of small jobs (an ml-latest-small evaluate run: about 1 s
    # per model's rating metrics, 5 s per model's lists, 30 s one after another), and no model's
    # depend on another's: side by side, a few at a time, they fill each other's idle gaps. The
    # longer ones are started first.
    jobs = {f"ranking {m}": ranking(m) for m in ranked}
    jobs.update({f"rating {m}": rating(m) for m in rated})
    run_concurrently(spark, jobs, {}, workers=EVALUATE_WORKERS)
    # In the order one model after another gave them: rating models, then ranking models, each sorted.
    rows_by_model: dict[str, list[MetricRow]] = {}
    for family, models in (("rating", rated), ("ranking", ranked)):
        for model in models:
            rows_by_model.setdefault(model, []).extend(got[(family, model)])
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
