"""Collaborative filtering with MLlib ALS.

Explicit ALS predicts ratings. Spark's ALS has no bias terms, so by default it is fitted to the
residuals of the bias baseline and its prediction is baseline + u.v: the biases carry what plain
ALS spends its factors on. Test pairs whose user or movie ALS never saw get the baseline alone.

Implicit ALS (implicitPrefs) ranks: trained on confidence derived from ratings, it answers
"what will this user watch", which is what top-N lists are judged on.
"""

from __future__ import annotations

import logging

from pyspark.ml.evaluation import RegressionEvaluator
from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.ml.tuning import ParamGridBuilder, TrainValidationSplit
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from .baselines import BiasModel, top_n_per_user
from .config import AlsConfig, ImplicitAlsConfig

log = logging.getLogger(__name__)


def _als(cfg: AlsConfig | ImplicitAlsConfig, seed: int, rating_col: str, implicit: bool) -> ALS:
    als = ALS(
        rank=cfg.rank, maxIter=cfg.max_iter, regParam=cfg.reg_param, userCol="userId", itemCol="movieId",
        ratingCol=rating_col, implicitPrefs=implicit, seed=seed, coldStartStrategy="nan",
        checkpointInterval=getattr(cfg, "checkpoint_interval", 5), nonnegative=False,
    )
    if implicit:
        als.setAlpha(cfg.alpha)
    if getattr(cfg, "num_blocks", None):
        als.setNumUserBlocks(cfg.num_blocks).setNumItemBlocks(cfg.num_blocks)
    return als


def with_residual(train: DataFrame, bias: BiasModel) -> DataFrame:
    return bias.predict(train).withColumn("residual", F.col("rating") - F.col("baseline"))


def fit_explicit(train: DataFrame, bias: BiasModel | None, cfg: AlsConfig, seed: int) -> ALSModel:
    """Fit explicit ALS on train (residuals of `bias` when cfg.residual); tune on train only."""
    target = "residual" if cfg.residual else "rating"
    data = with_residual(train, bias) if cfg.residual else train
    data = data.select("userId", "movieId", target).cache()
    als = _als(cfg, seed, target, implicit=False)
    try:
        if not cfg.tune:
            return als.fit(data)
        grid = (ParamGridBuilder().addGrid(als.rank, cfg.tune_ranks).addGrid(als.regParam, cfg.tune_reg_params)
                .addGrid(als.maxIter, cfg.tune_max_iters).build())
        # Validation pairs unseen in the tuning fold would be NaN: drop them for scoring only.
        als.setColdStartStrategy("drop")
        tvs = TrainValidationSplit(
            estimator=als, estimatorParamMaps=grid, trainRatio=0.8, seed=seed,
            evaluator=RegressionEvaluator(metricName="rmse", labelCol=target, predictionCol="prediction"),
        )
        tuned = tvs.fit(data)
        best = min(zip(tuned.validationMetrics, grid), key=lambda t: t[0])
        log.info("ALS tuning on train: best validation rmse %.4f with %s", best[0],
                 {p.name: v for p, v in best[1].items()})
        model = tuned.bestModel
        model.setColdStartStrategy("nan")
        return model
    finally:
        data.unpersist()


def predict_explicit(model: ALSModel, bias: BiasModel | None, pairs: DataFrame, residual: bool,
                     lo: float = 0.5, hi: float = 5.0) -> DataFrame:
    """Predict every pair: the pairs' columns plus `prediction` (clipped to the scale) and
    `fallback` (true where ALS could not score the pair: unknown user or movie, so the bias
    baseline alone was used).
    """
    scored = model.transform(pairs)
    if residual:
        scored = bias.predict(scored)
        base = F.col("baseline")
        als_part = F.col("prediction")
    else:
        base = F.lit(None).cast("double")
        if bias is not None:
            scored = bias.predict(scored)
            base = F.col("baseline")
        als_part = F.col("prediction")
    missing = als_part.isNull() | F.isnan(als_part)
    raw = F.when(missing, base).otherwise((base + als_part) if residual else als_part)
    out = scored.select(
        *[c for c in pairs.columns],
        F.least(F.greatest(raw, F.lit(lo)), F.lit(hi)).alias("prediction"),
        missing.alias("fallback"),
    )
    return out


def implicit_confidence(train: DataFrame, cfg: ImplicitAlsConfig) -> DataFrame:
    kept = train.where(F.col("rating") >= cfg.min_rating)
    conf = F.lit(1.0) if cfg.confidence == "binary" else F.col("rating")
    return kept.select("userId", "movieId", conf.alias("confidence"))


def fit_implicit(train: DataFrame, cfg: ImplicitAlsConfig, seed: int) -> ALSModel:
    data = implicit_confidence(train, cfg).cache()
    try:
        return _als(cfg, seed, "confidence", implicit=True).fit(data)
    finally:
        data.unpersist()


def model_with_item_bias(spark: SparkSession, model: ALSModel, bias: BiasModel) -> ALSModel:
    """An ALSModel whose dot product is u.v + b_i: the explicit model's rating order per user.

    (b_u and mu are constant within a user's list, so they do not change the order.) The
    factors gain one dimension: users [u, 1], items [v, b_i]. Built through the JVM constructor
    because pyspark exposes no way to make an ALSModel from factor tables.
    """
    uf = model.userFactors.select("id", F.concat("features", F.array(F.lit(1.0).cast("float"))).alias("features"))
    itf = (model.itemFactors.join(bias.item_bias.select(F.col("movieId").alias("id"), "b_i"), "id", "left")
           .select("id", F.concat("features", F.array(F.coalesce("b_i", F.lit(0.0)).cast("float"))).alias("features")))
    jvm = spark.sparkContext._jvm
    jmodel = jvm.org.apache.spark.ml.recommendation.ALSModel(model.uid + "_biased", model.rank + 1, uf._jdf, itf._jdf)
    # Params live on the JVM object; set them there (recommendForUserSubset reads them there).
    jmodel.setUserCol("userId").setItemCol("movieId").setColdStartStrategy("nan")
    out = ALSModel(jmodel)
    out._transfer_params_from_java()
    return out


# Below this many candidate rows, one recommendForAllUsers pass beats several bucketed ones.
SINGLE_PASS_MAX_ROWS = 5_000_000


def recommend_unseen(model: ALSModel, train: DataFrame, n: int) -> DataFrame:
    """Top-n movies per train user by the model's score, excluding movies rated in train.

    recommendForAllUsers(n) would return seen movies, and asking everyone for n + max(seen)
    costs users x max(seen). Instead users are grouped by how many movies they rated (powers of
    four, at least 64) and each group asks for n + its bound, so the candidate rows total at most
    about n * users + 4 * ratings + 64 * users: linear in the data.
    """
    seen = train.select("userId", "movieId")
    counts = seen.groupBy("userId").agg(F.count(F.lit(1)).alias("n_u"))
    stats = counts.agg(F.count(F.lit(1)).alias("users"), F.max("n_u").alias("most")).first()
    if stats.users and stats.users * (n + stats.most) <= SINGLE_PASS_MAX_ROWS:
        # Small enough to ask everyone for n + the largest history in one job.
        recs = model.recommendForAllUsers(n + stats.most)
        cands = recs.select("userId", F.explode("recommendations").alias("rec")).select(
            "userId", F.col("rec.movieId").alias("movieId"), F.col("rec.rating").alias("s"))
        unseen = cands.join(seen, on=["userId", "movieId"], how="left_anti")
        return top_n_per_user(unseen, n, score=F.col("s").cast("double"))
    # Buckets of powers of 4 from 64 up: few jobs, and no user asks for more than 4x its need.
    exp = F.greatest(F.ceil(F.log2(F.greatest(F.col("n_u"), F.lit(1))) / 2), F.lit(3)).cast("int")
    bucketed = counts.withColumn("b", exp).cache()
    buckets = sorted(r.b for r in bucketed.select("b").distinct().collect())  # <= ~10 values
    parts = []
    for b in buckets:
        users = bucketed.where(F.col("b") == b).select("userId")
        k = n + (1 << (2 * b))
        recs = model.recommendForUserSubset(users, k)
        parts.append(recs.select("userId", F.posexplode("recommendations").alias("pos", "rec"))
                     .select("userId", F.col("rec.movieId").alias("movieId"), F.col("rec.rating").alias("s")))
    cands = parts[0]
    for p in parts[1:]:
        cands = cands.unionByName(p)
    unseen = cands.join(seen, on=["userId", "movieId"], how="left_anti")
    out = top_n_per_user(unseen, n, score=F.col("s").cast("double"))
    bucketed.unpersist()
    return out


def factors_frame(model: ALSModel, kind: str) -> DataFrame:
    key = "userId" if kind == "user" else "movieId"
    df = model.userFactors if kind == "user" else model.itemFactors
    return df.select(F.col("id").cast("int").alias(key), F.col("features"))
