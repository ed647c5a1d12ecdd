"""A learned ranker for the final lists: "will this candidate be among the user's held-out movies?"

A predicted rating answers "how much would they like it", which ranks niche, well-liked movies
first; top-N lists are judged on what users go on to watch. The ranker learns that from the
train part alone: one hash fold of train (the same fold 0 the features stage holds out) plays
the held-out role, the candidate models are refitted on the rest of train, and an MLlib
GBTClassifier learns which of their candidates land in the held-out fold from the candidate
models' ranks and scores, the hybrid's out-of-fold inputs' cheap cousins (counts and means),
and whether the candidate models agree. At recommendation time the same features are built
from the whole train part and the run's own candidate lists.
"""

from __future__ import annotations

import logging

from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import GBTClassifier
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

log = logging.getLogger(__name__)


def candidate_lists(train: DataFrame, sims: DataFrame | None, models: list[str], cfg, n: int, seed: int) -> DataFrame:
    """userId, movieId, model, rank, score: the candidate models' top-n lists fitted on `train`."""
    from .als import fit_implicit, recommend_unseen
    from .baselines import popularity_top_n
    from .content import content_top_n

    parts = []
    if "als_implicit" in models:
        model = fit_implicit(train, cfg.als_implicit, seed)
        parts.append(recommend_unseen(model, train, n).withColumn("model", F.lit("als_implicit")))
    if "content" in models and sims is not None:
        parts.append(content_top_n(train, sims, n, cfg.content.user_sources, cfg.content.user_neighbours)
                     .withColumn("model", F.lit("content")))
    if "popularity" in models:
        parts.append(popularity_top_n(train, n).withColumn("model", F.lit("popularity")))
    out = parts[0].select("userId", "movieId", "model", "rank", "score")
    for p in parts[1:]:
        out = out.unionByName(p.select("userId", "movieId", "model", "rank", "score"))
    return out


def ranker_features(lists: DataFrame, train: DataFrame, models: list[str], n: int) -> tuple[DataFrame, list[str]]:
    """One row per candidate (userId, movieId) with the ranker's inputs; returns (frame, names)."""
    cols, names = [], []
    for m in models:
        is_m = F.col("model") == m
        cols += [F.coalesce(F.min(F.when(is_m, F.col("rank"))), F.lit(n + 1)).cast("double").alias(f"{m}_rank"),
                 F.coalesce(F.max(F.when(is_m, F.col("score"))), F.lit(0.0)).cast("double").alias(f"{m}_score")]
        names += [f"{m}_rank", f"{m}_score"]
    cands = lists.groupBy("userId", "movieId").agg(*cols, F.count(F.lit(1)).cast("double").alias("n_lists"))
    names.append("n_lists")
    u = train.groupBy("userId").agg(F.count(F.lit(1)).cast("double").alias("u_n"), F.avg("rating").alias("u_avg"))
    m = train.groupBy("movieId").agg(F.count(F.lit(1)).cast("double").alias("m_n"), F.avg("rating").alias("m_avg"))
    g = train.agg(F.avg("rating")).first()[0]
    out = (cands.join(u, "userId", "left").join(m, "movieId", "left")
           .select("*", F.log1p(F.coalesce("m_n", F.lit(0.0))).alias("m_log_n")).fillna(
               {"u_n": 0.0, "m_n": 0.0, "u_avg": g, "m_avg": g}))
    names += ["u_n", "u_avg", "m_n", "m_avg", "m_log_n"]
    return out, names


def fit_ranker(labelled: DataFrame, names: list[str], seed: int, max_iter: int = 40, max_depth: int = 5) -> PipelineModel:
    gbt = GBTClassifier(featuresCol="x", labelCol="label", maxIter=max_iter, maxDepth=max_depth, seed=seed,
                        subsamplingRate=0.8, stepSize=0.1)
    data = labelled.cache()
    pos = data.where("label = 1").count()
    log.info("ranker: %d validation candidates, %d of them held out", data.count(), pos)
    model = Pipeline(stages=[VectorAssembler(inputCols=names, outputCol="x"), gbt]).fit(data)
    data.unpersist()
    return model


def rank_scores(model: PipelineModel, feats: DataFrame) -> DataFrame:
    """userId, movieId, p: the ranker's probability that the candidate is a held-out movie."""
    return model.transform(feats).select("userId", "movieId", F.get(vector_to_array("probability"), 1).alias("p"))
