"""Train/test splitters. Deterministic for a seed, across reruns and partition counts.

No splitter uses rand(): a row's fate comes from a hash of (userId, movieId, seed), a pure
function of the row, so recomputing a lineage (a lost executor, a second action) cannot move a
row between train and test. The result is persisted in `rating_splits` and every later stage
reads it from there.
"""

from __future__ import annotations

import datetime as dt
import logging

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from .config import SplitConfig

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ["userId", "movieId", "rating", "rated_at", "split"]


def hash_unit(seed: int) -> Column:
    """A uniform number in [0, 1) from (userId, movieId, seed)."""
    h = F.xxhash64(F.col("userId"), F.col("movieId"), F.lit(seed))
    # pmod keeps it non-negative; 2^52 buckets are plenty and exact in a double.
    return F.pmod(h, F.lit(1 << 52)).cast("double") / float(1 << 52)


def random_split(ratings: DataFrame, test_ratio: float, seed: int) -> DataFrame:
    split = F.when(hash_unit(seed) < test_ratio, "test").otherwise("train")
    return ratings.select("userId", "movieId", "rating", "rated_at", split.alias("split"))


def stratified_split(ratings: DataFrame, test_ratio: float, seed: int) -> DataFrame:
    """Per user: round(n * test_ratio) of their ratings in test, at least 1 and at most n - 1.

    Users with a single rating stay in train (they cannot be both trained and tested on).
    """
    w = Window.partitionBy("userId").orderBy(hash_unit(seed), "movieId")
    n = F.count(F.lit(1)).over(Window.partitionBy("userId"))
    n_test = F.least(F.greatest(F.round(n * test_ratio), F.lit(1)), n - 1)
    split = F.when((n >= 2) & (F.row_number().over(w) <= n_test), "test").otherwise("train")
    return ratings.select("userId", "movieId", "rating", "rated_at", split.alias("split"))


def cold_users_split(ratings: DataFrame, cold_ratio: float, keep: int, seed: int) -> DataFrame:
    """New users, simulated: a hash share `cold_ratio` of users (by userId and seed) keep only
    their `keep` earliest ratings (ties by movieId) in train and the rest of theirs is test;
    every other user keeps everything in train. A chosen user with at most `keep` ratings has
    nothing to test and stays all train."""
    uh = F.pmod(F.xxhash64(F.col("userId"), F.lit(seed), F.lit("cold")), F.lit(1 << 52)).cast("double") / float(1 << 52)
    w = Window.partitionBy("userId").orderBy(F.col("rated_at"), F.col("movieId"))
    split = F.when((uh < cold_ratio) & (F.row_number().over(w) > keep), "test").otherwise("train")
    return ratings.select("userId", "movieId", "rating", "rated_at", split.alias("split"))


def temporal_global_split(ratings: DataFrame, cutoff: dt.datetime) -> DataFrame:
    """Everything rated at or after the cutoff is test: the model only sees the past."""
    split = F.when(F.col("rated_at") >= F.lit(cutoff), "test").otherwise("train")
    return ratings.select("userId", "movieId", "rating", "rated_at", split.alias("split"))


def temporal_user_split(ratings: DataFrame, last_n: int) -> DataFrame:
    """Each user's last n ratings (ties by movieId) are test, if the user has more than n."""
    w = Window.partitionBy("userId").orderBy(F.col("rated_at").desc(), F.col("movieId").desc())
    n = F.count(F.lit(1)).over(Window.partitionBy("userId"))
    split = F.when((n > last_n) & (F.row_number().over(w) <= last_n), "test").otherwise("train")
    return ratings.select("userId", "movieId", "rating", "rated_at", split.alias("split"))


def quantile_cutoff(ratings: DataFrame, test_ratio: float) -> dt.datetime:
    secs = ratings.select(F.unix_timestamp("rated_at").alias("s")).approxQuantile("s", [1.0 - test_ratio], 1e-4)[0]
    return dt.datetime.fromtimestamp(secs, dt.timezone.utc).replace(tzinfo=None)


def split_ratings(ratings: DataFrame, cfg: SplitConfig, seed: int) -> DataFrame:
    if cfg.method == "random":
        return random_split(ratings, cfg.test_ratio, seed)
    if cfg.method == "stratified":
        return stratified_split(ratings, cfg.test_ratio, seed)
    if cfg.method == "cold_users":
        return cold_users_split(ratings, cfg.cold_ratio, cfg.cold_keep, seed)
    if cfg.method == "temporal_user":
        return temporal_user_split(ratings, cfg.last_n)
    cutoff = dt.datetime.fromisoformat(cfg.cutoff) if cfg.cutoff else quantile_cutoff(ratings, cfg.test_ratio)
    log.info("temporal split at %s", cutoff.isoformat())
    return temporal_global_split(ratings, cutoff)


def check_predefined_split(spark, cfg: SplitConfig, movie_ids: DataFrame, whole_file_max_bytes: int) -> dict:
    """The --train/--test files read and checked like ingest's ratings (bad rows get a reason;
    a test pair also in train is 'in_train'): {'train': CheckedFile, 'test': CheckedFile}. Each
    checked frame is persisted and counted; unpersist them once written."""
    from .ingest import check_split_files
    from .layouts import rating_file_spec

    return check_split_files(spark, rating_file_spec(cfg.train_file), rating_file_spec(cfg.test_file), movie_ids,
                             (0.5, 5.0, 0.5), whole_file_max_bytes)


def predefined_parts(checked: dict, run_id: str) -> tuple[DataFrame, DataFrame]:
    """(rating_splits rows, rejects rows) of a checked predefined split."""
    rejects = checked["train"].rejects(run_id).unionByName(checked["test"].rejects(run_id))
    parts = None
    for role, cf in checked.items():
        part = cf.df.where(F.col("reason").isNull()).select(
            "userId", "movieId", "rating", "rated_at", F.lit(role).alias("split"))
        parts = part if parts is None else parts.unionByName(part)
    return parts, rejects


def serve_split(ratings: DataFrame) -> DataFrame:
    """A serve run's split: no test part, every rating is train (every model learns from all)."""
    return ratings.select("userId", "movieId", "rating", "rated_at", F.lit("train").alias("split"))
