"""The final lists: ranked candidates with the model that brought each one in, and the lists of
users the run's models never saw."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from .baselines import popularity_top_n, top_n_per_user


def final_lists(scored: DataFrame, lists: DataFrame, candidate_models: list[str], n: int) -> DataFrame:
    """The top `n` per user of `scored` (userId, movieId, prediction) among the candidates of
    `lists` (model, userId, movieId, because_movieId, ...): userId, rank, movieId, score,
    source (the first model in `candidate_models`' order that listed the movie) and
    because_movieId (that model's, else any model's)."""
    prio = F.array_position(F.array(*[F.lit(m) for m in candidate_models]), F.col("model"))
    src = (lists
           .groupBy("userId", "movieId")
           .agg(F.min_by(F.struct("model", "because_movieId"), prio).alias("s"),
                F.max("because_movieId").alias("any_because")))
    return top_n_per_user(scored.join(src, ["userId", "movieId"]), n, score=F.col("prediction")).join(
        src, ["userId", "movieId"]).select(
        "userId", "rank", "movieId", "score", F.col("s.model").alias("source"),
        F.coalesce(F.col("s.because_movieId"), F.col("any_because")).alias("because_movieId"))


def cold_user_lists(ratings: DataFrame, train: DataFrame, n: int) -> tuple[DataFrame, DataFrame]:
    """(users, lists): the users with ratings but none in `train` (rated after the run's split),
    and their popularity lists without what they rated, as `recommendations` rows without
    run_id (source 'popular_cold', no because_movieId, no predicted_rating)."""
    cold = ratings.select("userId", "movieId").join(train.select("userId").distinct(), "userId", "left_anti")
    lists = popularity_top_n(train, n, seen=cold).select(
        "userId", "rank", "movieId", "score", F.lit("popular_cold").alias("source"),
        F.lit(None).cast("int").alias("because_movieId"), F.lit(None).cast("double").alias("predicted_rating"))
    return cold.select("userId").distinct(), lists
