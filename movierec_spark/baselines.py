"""Baselines: global mean, Koren's regularized user/movie bias predictor, popularity top-N.

Also the top-N helper shared by every ranking model: lists that skip what the user rated in
train, computed without asking any model for "everything" per user.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from .config import BaselineConfig

log = logging.getLogger(__name__)


@dataclass
class BiasModel:
    mu: float
    user_bias: DataFrame  # userId, b_u
    item_bias: DataFrame  # movieId, b_i
    lo: float = 0.5
    hi: float = 5.0
    # A per-row global mean (a Column) instead of `mu`: for several independent fits in one frame
    # (features.batched_pass_features), each row's own fit's mean.
    mean: Column | None = None

    def unpersist(self) -> None:
        self.user_bias.unpersist()
        self.item_bias.unpersist()

    def predict(self, pairs: DataFrame) -> DataFrame:
        """Add `baseline` = mu + b_u + b_i (unknown user or movie: its bias is 0), clipped."""
        mu = self.mean if self.mean is not None else F.lit(self.mu)
        raw = (mu + F.coalesce(F.col("b_u"), F.lit(0.0)) + F.coalesce(F.col("b_i"), F.lit(0.0)))
        return (
            pairs.join(self.item_bias, on="movieId", how="left")
            .join(self.user_bias, on="userId", how="left")
            .withColumn("baseline", F.least(F.greatest(raw, F.lit(self.lo)), F.lit(self.hi)))
            .drop("b_u", "b_i")
        )


def global_mean(train: DataFrame) -> float:
    """The mean rating of `train` (one Spark job); ValueError when it has no rows."""
    mu = train.agg(F.avg("rating")).first()[0]
    if mu is None:
        raise ValueError("no ratings to learn from (the train part is empty)")
    return float(mu)


def fit_bias(train: DataFrame, cfg: BaselineConfig, lo: float = 0.5, hi: float = 5.0,
             mean: Column | None = None) -> BiasModel:
    """Koren (2008) baseline predictor by alternating shrunk means, as DataFrame aggregations.

    b_i = sum(r - mu - b_u) / (item_reg + n_i);  b_u = sum(r - mu - b_i) / (user_reg + n_u)

    `mean`: a per-row expression of mu (see BiasModel.mean) instead of train's mean.
    """
    mu = global_mean(train) if mean is None else float("nan")
    mu_c = F.lit(mu) if mean is None else mean
    r = train.select("userId", "movieId", "rating").cache()
    b_u = None
    b_i = None
    for _ in range(max(1, cfg.iterations)):
        resid = F.col("rating") - mu_c - (F.col("b_u") if b_u is not None else F.lit(0.0))
        src = r.join(b_u, "userId", "left") if b_u is not None else r
        new_i = (src.groupBy("movieId")
                 .agg((F.sum(resid) / (F.count(F.lit(1)) + cfg.item_reg)).alias("b_i")).cache())
        new_i.count()  # materialise: the next iteration builds on it, keep lineage short
        new_u = (r.join(new_i, "movieId", "left").groupBy("userId")
                 .agg((F.sum(F.col("rating") - mu_c - F.col("b_i")) / (F.count(F.lit(1)) + cfg.user_reg)).alias("b_u"))
                 .cache())
        new_u.count()
        for old in (b_i, b_u):
            if old is not None:
                old.unpersist()
        b_i, b_u = new_i, new_u
    r.unpersist()
    return BiasModel(mu, b_u, b_i, lo, hi, mean)


def bias_grid_rmse(train: DataFrame, held: DataFrame, settings: list[tuple[float, float]], iterations: int,
                   lo: float = 0.5, hi: float = 5.0) -> list[float]:
    """RMSE on `held` (userId, movieId, rating) of fit_bias(train) at each (item_reg, user_reg) of
    `settings`, all fitted side by side: every aggregation carries one column per setting, so
    the whole grid costs the Spark jobs of one fit (tuning 12 settings one by one took about
    30 s on ml-latest-small, mostly the jobs' fixed cost). The same arithmetic as fit_bias."""
    k = len(settings)
    mu = global_mean(train)
    r = train.select("userId", "movieId", "rating").cache()
    b_u = b_i = None
    for _ in range(max(1, iterations)):
        src = r.join(b_u, "userId", "left") if b_u is not None else r
        bu = [F.col(f"u{c}") if b_u is not None else F.lit(0.0) for c in range(k)]
        n = F.count(F.lit(1))
        new_i = src.groupBy("movieId").agg(
            *[(F.sum(F.col("rating") - mu - bu[c]) / (n + settings[c][0])).alias(f"i{c}") for c in range(k)]).cache()
        new_u = r.join(new_i, "movieId", "left").groupBy("userId").agg(
            *[(F.sum(F.col("rating") - mu - F.col(f"i{c}")) / (n + settings[c][1])).alias(f"u{c}") for c in range(k)]
        ).cache()
        new_u.count()
        for old in (b_u, b_i):  # the previous iteration's, which new_u no longer needs
            if old is not None:
                old.unpersist()
        b_u, b_i = new_u, new_i
    pred = held.select("userId", "movieId", "rating").join(b_i, "movieId", "left").join(b_u, "userId", "left")
    errs = [(F.col("rating") - F.least(F.greatest(mu + F.coalesce(F.col(f"u{c}"), F.lit(0.0))
                                                 + F.coalesce(F.col(f"i{c}"), F.lit(0.0)), F.lit(lo)), F.lit(hi)))
            for c in range(k)]
    row = pred.agg(*[F.sqrt(F.avg(e * e)).alias(f"e{c}") for c, e in enumerate(errs)]).first()
    for df in (r, b_u, b_i):
        df.unpersist()
    return [float(row[f"e{c}"]) for c in range(k)]


def popularity(train: DataFrame) -> DataFrame:
    """movieId, pop_rank (1 = most rated in train; ties by movieId), n_ratings."""
    w = Window.orderBy(F.col("n_ratings").desc(), F.col("movieId"))
    # One small row per movie: the global window is fine at catalog size.
    return train.groupBy("movieId").agg(F.count(F.lit(1)).alias("n_ratings")).withColumn("pop_rank", F.row_number().over(w))


# Popularity around a time: ratings counted per (movie, 30-day bucket of rated_at).
BUCKET_DAYS = 30


def time_bucket(seconds) -> Column:
    """The 30-day bucket of a Column of epoch seconds."""
    return F.floor(seconds / float(BUCKET_DAYS * 86400)).cast("long")


def windowed_counts(times: DataFrame, window_days: int, centres: DataFrame | None = None) -> DataFrame:
    """movieId, centre, c: each movie's ratings in `times` (movieId, rated_at) within about
    `window_days` (whole buckets) of bucket `centre`, for every centre its ratings reach (or only
    `centres`' column centre). Linear in the data: counted per (movie, bucket) first, each count
    then spread to the 2 x window / 30 + 1 centres whose window holds it."""
    half = max(1, round(window_days / BUCKET_DAYS))
    spread = (times.select("movieId", time_bucket(F.unix_timestamp("rated_at")).alias("b")).groupBy("movieId", "b").count()
              .select("movieId", "count", F.explode(F.sequence(F.col("b") - half, F.col("b") + half)).alias("centre")))
    if centres is not None:
        spread = spread.join(F.broadcast(centres.select("centre").distinct()), "centre")
    return spread.groupBy("movieId", "centre").agg(F.sum("count").alias("c"))


# Users scored in one numpy step of popularity_top_n (each n + their ratings' candidate ranks).
POP_CHUNK_ROWS = 2_000_000


def popularity_top_n(train: DataFrame, n: int, seen: DataFrame | None = None) -> DataFrame:
    """Per user, the n most popular movies (by train) they did not rate: userId, movieId, rank, score.

    The users and what they rated come from `seen` (default: train itself). Popularity is the
    movie's train rating count, ties by movieId (`popularity`'s pop_rank), and score is that
    count. A user's list is the first n pop ranks among 1 .. n + (their ratings) that they did
    not rate: no user x catalog product.

    Computed per partition in numpy (mapInArrow, no per-row Python): the ratings partitioned by
    user, the popularity order copied to every partition (partitioned.py). As a range join of
    users to pop ranks, anti-joined with the ratings and ranked in a window, it took about 50 s
    at 25M ratings (benchmarks/results/popularity-top-n-25M.md).
    """
    from .partitioned import batches_by_kind, movies_then_users, numpy_partitions, user_partition

    parts = numpy_partitions(train.sparkSession)
    pop = popularity(train).select(F.col("movieId").cast("int").alias("a"), F.col("pop_rank").cast("int").alias("b"),
                                   F.col("n_ratings").cast("double").alias("x"))
    rated = (train if seen is None else seen).select(
        user_partition(parts).alias("pid"), F.col("userId").cast("int").alias("a"),
        F.col("movieId").cast("int").alias("b"), F.lit(None).cast("double").alias("x"))
    # Unsorted: the reader keeps the whole partition anyway.
    rows = movies_then_users(pop, rated, parts, ordered=False)
    chunk_rows = POP_CHUNK_ROWS  # read here: the workers get the value, not the module's

    def run(batches):
        import numpy as np
        import pyarrow as pa

        got = batches_by_kind(batches)
        if not got[0] or not got[1]:
            return
        for out in _popularity_lists(got[0], got[1], n, chunk_rows, np):
            yield pa.RecordBatch.from_arrays(
                [pa.array(a, t) for a, t in zip(out, (pa.int32(), pa.int32(), pa.int32(), pa.float64()))],
                names=["userId", "movieId", "rank", "score"])

    return rows.mapInArrow(run, "userId int, movieId int, rank int, score double")


def _popularity_lists(pop_batches, rating_batches, n: int, chunk_rows: int, np):
    """popularity_top_n's lists of one partition's users: yields (userId, movieId, rank, score)
    arrays, a chunk of users at a time."""
    col = lambda bs, c: np.concatenate([b.column(c).to_numpy() for b in bs])  # noqa: E731
    movie, prank, count = col(pop_batches, "a"), col(pop_batches, "b"), col(pop_batches, "x")
    # A partition may hold two copies of the order (two pids hashed to one partition): once each.
    ranks, first = np.unique(prank, return_index=True)  # 1 .. movies, in order
    by_rank, count = movie[first], count[first]
    movie_sorted = np.sort(by_rank)
    rank_of = ranks[np.argsort(by_rank)]  # the pop rank of movie_sorted[i]
    u, m = col(rating_batches, "a"), col(rating_batches, "b")
    at = np.minimum(np.searchsorted(movie_sorted, m), len(movie_sorted) - 1)
    r = np.where(movie_sorted[at] == m, rank_of[at], 0)  # 0: a movie without train ratings
    users, inverse, u_n = np.unique(u, return_inverse=True, return_counts=True)
    # (user index, pop rank) of every rating: what each user's candidates must skip.
    seen = np.unique((inverse.astype(np.int64) << 32) | r.astype(np.int64))
    width = np.minimum(n + u_n, len(ranks))
    step = max(1, chunk_rows // (n + int(u_n.max())))
    for i0 in range(0, len(users), step):
        i1 = min(i0 + step, len(users))
        w = width[i0:i1]
        who = np.repeat(np.arange(i0, i1), w)
        cand = np.arange(len(who)) - np.repeat(np.cumsum(w) - w, w) + 1  # pop ranks 1 .. width
        q = (who.astype(np.int64) << 32) | cand
        pos = np.minimum(np.searchsorted(seen, q), len(seen) - 1)
        fresh = seen[pos] != q
        who, cand = who[fresh], cand[fresh]
        if len(who) == 0:
            continue
        head = np.flatnonzero(np.r_[True, who[1:] != who[:-1]])
        rank = np.arange(len(who)) - np.repeat(head, np.diff(np.r_[head, len(who)])) + 1
        top = rank <= n
        who, cand, rank = who[top], cand[top], rank[top]
        yield users[who], by_rank[cand - 1], rank.astype(np.int32), count[cand - 1]


def top_n_per_user(cands: DataFrame, n: int, score, tiebreak=None, keep: tuple[str, ...] = ()) -> DataFrame:
    """Keep each user's n best candidates by score (then tiebreak, then movieId): userId, movieId, rank, score
    (and the columns `keep`)."""
    order = [score.desc()] + ([tiebreak] if tiebreak is not None else []) + [F.col("movieId")]
    w = Window.partitionBy("userId").orderBy(*order)
    return (
        cands.withColumn("score", score)
        .withColumn("rank", F.row_number().over(w))
        .where(F.col("rank") <= n)
        .select("userId", "movieId", F.col("rank").cast("int"), "score", *keep)
    )
