"""The final lists: ranked candidates with the model that brought each one in, and the lists of
users the run's models never saw."""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from .baselines import popularity_top_n, top_n_per_user


def final_lists(scored: DataFrame, lists: DataFrame, candidate_models: list[str], n: int) -> DataFrame:
    """The top `n` per user of `scored` (userId, movieId, prediction) among the candidates of
    `lists` (model, userId, movieId, because_movieId, ...): userId, rank, movieId, score,
    source (the first model in `candidate_models`' order that listed the movie) and
    because_movieId (that model's, else any model's)."""
    # A model outside candidate_models (the new-user blend's popularity picks when popularity is
    # not a candidate model) comes last, not first (array_position gives 0 when it is absent).
    prio = F.array_position(F.array(*[F.lit(m) for m in candidate_models]), F.col("model"))
    prio = F.when(prio == 0, F.lit(len(candidate_models) + 1)).otherwise(prio)
    src = (lists
           .groupBy("userId", "movieId")
           .agg(F.min_by(F.struct("model", "because_movieId"), prio).alias("s"),
                F.max("because_movieId").alias("any_because")))
    return top_n_per_user(scored.join(src, ["userId", "movieId"]), n, score=F.col("prediction")).join(
        src, ["userId", "movieId"]).select(
        "userId", "rank", "movieId", "score", F.col("s.model").alias("source"),
        F.coalesce(F.col("s.because_movieId"), F.col("any_because")).alias("because_movieId"))


def cold_user_lists(ratings: DataFrame, train: DataFrame, n: int, window_days: int | None = None
                    ) -> tuple[DataFrame, DataFrame]:
    """(users, lists): the users with ratings but none in `train` (rated after the run's split),
    and their lists without what they rated, as `recommendations` rows without run_id (source
    'popular_cold', no because_movieId, no predicted_rating, score = the movie's train rating
    count).

    They are the newest users of all. With `window_days` (and rated_at in both frames) their
    list fuses, by reciprocal rank, popularity with popularity around their latest rating (the
    new-user blend's two popularity lists, recommend.blend_new_users; no model knows these
    users, so no content or ranker share); without, it is popularity alone."""
    from .baselines import popularity

    cold = ratings.join(train.select("userId").distinct(), "userId", "left_anti")
    pop = popularity_top_n(train, n, seen=cold)
    if window_days and "rated_at" in cold.columns and "rated_at" in train.columns:
        users = cold.groupBy("userId").agg(F.count(F.lit(1)).alias("n_u"), F.max("rated_at").alias("t_u"))
        most = users.agg(F.max("n_u")).first()[0] or 0  # one number: how deep each window's list goes
        active = active_popularity(train, users, window_days, n, most, seen=cold)  # their ratings are not in train
        fused = (pop.select("userId", "movieId", "rank").unionByName(active)
                 .groupBy("userId", "movieId").agg(F.sum(1.0 / (RRF_K + F.col("rank"))).alias("f"))
                 .join(popularity(train).select("movieId", "n_ratings"), "movieId"))
        pop = top_n_per_user(fused, n, score=F.col("f"), tiebreak=F.col("n_ratings").desc()).join(
            fused.select("userId", "movieId", "n_ratings"), ["userId", "movieId"]).select(
            "userId", "movieId", "rank", F.col("n_ratings").cast("double").alias("score"))
    lists = pop.select(
        "userId", "rank", "movieId", "score", F.lit("popular_cold").alias("source"),
        F.lit(None).cast("int").alias("because_movieId"), F.lit(None).cast("double").alias("predicted_rating"))
    return cold.select("userId").distinct(), lists


def materialized_cold_lists(ratings: DataFrame, train: DataFrame, n: int, window_days: int | None = None
                            ) -> tuple[int, DataFrame | None]:
    """(how many users cold_user_lists finds, their lists materialized (session.materialize; give
    them back with session.release), or None when there are none). Runs its jobs now: one over
    `ratings` when there are none, the usual case; their lists only when there are some."""
    from .session import materialize, release

    # The cold users' ratings, kept: they are few (ratings ingested after the split).
    cold = materialize(ratings.join(train.select("userId").distinct(), "userId", "left_anti"))
    users = cold.select("userId").distinct().count()
    lists = materialize(cold_user_lists(cold, train, n, window_days)[1]) if users else None
    release(cold)
    return users, lists


# ---------------------------------------------------------------------------------------------
# New users: few ratings, so the collaborative models know little about them.

# Reciprocal-rank fusion's constant: a list's position p contributes w / (RRF_K + p), so the
# first few positions of every source count alike and a long tail counts little.
RRF_K = 60.0


def new_users(train: DataFrame, max_ratings: int) -> DataFrame:
    """userId, n_u, t_u: the users with at most `max_ratings` train ratings (`train` has
    rated_at), their count and their latest rating's time."""
    return (train.groupBy("userId").agg(F.count(F.lit(1)).alias("n_u"), F.max("rated_at").alias("t_u"))
            .where(F.col("n_u") <= max_ratings))


def active_popularity(train: DataFrame, users: DataFrame, window_days: int, n: int, max_seen: int,
                      seen: DataFrame | None = None) -> DataFrame:
    """userId, movieId, rank: per user of `users` (userId, t_u), the n movies they did not rate
    that were rated most within about `window_days` of t_u (30-day buckets; the users have at
    most `max_seen` ratings each, which `seen` holds: default `train`): what people were
    watching when the user was active. On simulated new users it beat all-time popularity by
    12% nDCG@10 (benchmarks/cold_start.py).

    Linear in the data: ratings are counted per (movie, bucket), each count is spread to the
    buckets whose window holds it, and only the top n + (max history) per window centre the
    users need are kept before the per-user join."""
    from .baselines import time_bucket, top_n_per_user, windowed_counts

    bucket = lambda c: time_bucket(F.unix_timestamp(c))  # noqa: E731
    counts = windowed_counts(train, window_days, users.select(bucket("t_u").alias("centre")))
    w = Window.partitionBy("centre").orderBy(F.col("c").desc(), F.col("movieId"))
    top = counts.withColumn("r", F.row_number().over(w)).where(F.col("r") <= n + max_seen)
    cands = (users.select("userId", bucket("t_u").alias("centre")).join(top, "centre")
             .join((train if seen is None else seen).select("userId", "movieId"), ["userId", "movieId"], "left_anti"))
    return top_n_per_user(cands, n, score=F.col("c").cast("double")).select("userId", "movieId", "rank")


def blend_new_users(scored: DataFrame, lists: DataFrame, train: DataFrame, cfg, n: int
                    ) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(scored, lists, users): `scored` (userId, movieId, prediction) with each new user's
    candidates scored by the new-user blend instead, `lists` with their popularity-when-active
    candidates added (as model 'popularity'), and the new users (userId, n_u).

    A new user (at most recommend.new_user_max_ratings train ratings, n_u of them) gets
    (1 - s) * fused + s / (RRF_K + ranker position), s = n_u / (max + 1): fused is the
    weighted mean of 1 / (RRF_K + position) in the popularity list (weight 1), the
    popularity-when-active list (1) and the content list (new_user_content_weight). So the
    ranker's order takes over smoothly as the history grows, and is all that counts past max."""
    r = cfg.recommend
    users = new_users(train, r.new_user_max_ratings)
    active = active_popularity(train, users, r.new_user_window_days, n, r.new_user_max_ratings)
    lists = lists.select("model", "userId", "rank", "movieId", "score", "because_movieId")
    weights = {"popularity": 1.0, "content": r.new_user_content_weight}
    total = 1.0 + sum(weights.values())
    fused = lists.join(users.select("userId"), "userId", "left_semi").where(F.col("model").isin(*weights)).select(
        "userId", "movieId", (F.when(F.col("model") == "content", weights["content"]).otherwise(1.0)
                              / (RRF_K + F.col("rank"))).alias("f"))
    fused = fused.unionByName(active.select("userId", "movieId", (1.0 / (RRF_K + F.col("rank"))).alias("f")))
    by_ranker = Window.partitionBy("userId").orderBy(F.col("prediction").desc(), F.col("movieId"))
    ranked = (scored.join(users.select("userId"), "userId", "left_semi")
              .select("userId", "movieId", (1.0 / (RRF_K + F.row_number().over(by_ranker))).alias("q")))
    share = F.col("n_u") / float(r.new_user_max_ratings + 1)
    blended = (fused.groupBy("userId", "movieId").agg((F.sum("f") / total).alias("f"))
               .join(ranked, ["userId", "movieId"], "full").join(users, "userId")
               .select("userId", "movieId", ((1 - share) * F.coalesce("f", F.lit(0.0))
                                             + share * F.coalesce("q", F.lit(0.0))).alias("prediction")))
    out = scored.join(users.select("userId"), "userId", "left_anti").unionByName(blended)
    added = active.select(F.lit("popularity").alias("model"), "userId", "rank", "movieId",
                          F.lit(None).cast("double").alias("score"), F.lit(None).cast("int").alias("because_movieId"))
    return out, lists.unionByName(added.select(*lists.columns)), users.select("userId", "n_u")


# ---------------------------------------------------------------------------------------------
# Diversity on request: maximal marginal relevance over content similarity.

def _mmr_pick(lam: float, n: int, near_duplicate: float):
    """applyInPandas function: one user's pool (movieId, rank, rel, nbs = [(movieId, sim)])
    re-ranked greedily; returns the pool's rows that were picked with their new rank."""
    import pandas as pd

    def run(pool: pd.DataFrame) -> pd.DataFrame:
        pool = pool.sort_values("rank", kind="stable").reset_index(drop=True)
        ids = pool["movieId"].tolist()
        pos = {m: i for i, m in enumerate(ids)}
        sim = [dict() for _ in ids]
        for i, nbs in enumerate(pool["nbs"]):
            for nb in (nbs if nbs is not None else []):
                j = pos.get(nb["j"])
                if j is not None and j != i:  # symmetric: either side's neighbour list names the pair
                    sim[i][j] = max(sim[i].get(j, 0.0), nb["s"])
                    sim[j][i] = max(sim[j].get(i, 0.0), nb["s"])
        rel = pool["rel"].tolist()
        left, picked, redundancy = list(range(len(ids))), [], [0.0] * len(ids)
        while left and len(picked) < n:
            last = picked[-1] if picked else None
            # A near-duplicate of the previous pick waits while anything else is left.
            ok = [i for i in left if last is None or sim[i].get(last, 0.0) <= near_duplicate] or left
            best = max(ok, key=lambda i: ((1 - lam) * rel[i] - lam * redundancy[i], -i))
            picked.append(best)
            left.remove(best)
            for i in left:
                redundancy[i] = max(redundancy[i], sim[i].get(best, 0.0))
        out = pool.iloc[picked][["userId", "movieId"]].copy()
        out["rank"] = range(1, len(picked) + 1)
        return out

    return run


def mmr_rerank(ranked: DataFrame, sims: DataFrame, lam: float, n: int, near_duplicate: float = 0.9) -> DataFrame:
    """Each user's list (userId, rank, movieId, score, ...) re-ranked by maximal marginal
    relevance: the next pick maximises (1 - lam) * relevance - lam * (its largest content
    similarity to a movie already picked), relevance = score min-max scaled within the user's
    list; and when lam > 0, a movie more similar than `near_duplicate` to the previous pick
    waits while another is left. Returns the first n picks with the input's columns (rank
    renumbered). lam = 0 keeps the order. `sims`: similar_movies (movieId, similar_movieId,
    similarity), read as symmetric; a pair in neither list counts as dissimilar.

    Sequential per user, so it runs as one pandas function per user's list (applyInPandas; a
    list is at most a few dozen rows), not as a per-row UDF."""
    if lam <= 0:
        return ranked.where(F.col("rank") <= n)
    u = Window.partitionBy("userId")
    lo, hi = F.min("score").over(u), F.max("score").over(u)
    pool = ranked.select("userId", "movieId", "rank",
                         F.when(hi > lo, (F.col("score") - lo) / (hi - lo)).otherwise(F.lit(1.0)).alias("rel"))
    mine = pool.select("userId", F.col("movieId").alias("j"))
    nbs = (pool.select("userId", "movieId").join(
        sims.select("movieId", F.col("similar_movieId").alias("j"), F.col("similarity").alias("s")), "movieId")
        .join(mine, ["userId", "j"])
        .groupBy("userId", "movieId").agg(F.collect_list(F.struct("j", "s")).alias("nbs")))
    picked = (pool.join(nbs, ["userId", "movieId"], "left")
              .groupBy("userId").applyInPandas(_mmr_pick(lam, n, near_duplicate), "userId int, movieId int, rank int"))
    return picked.join(ranked.drop("rank"), ["userId", "movieId"]).select(*ranked.columns)


# ---------------------------------------------------------------------------------------------
# New movies: no train rating, so only the content model can know them.

def new_movie_slots(ranked: DataFrame, lists: DataFrame, rated_movies: DataFrame, slots: int, n: int,
                    length: int) -> DataFrame:
    """`ranked` (userId, rank, movieId, score, source, because_movieId) with up to `slots` of
    each user's first n positions given to movies nobody rated in train (not in
    `rated_movies`), taken from the user's content list (`lists` rows of model 'content') in
    its order: they take positions n - s + 1 .. n (s = how many the user has, at most `slots`;
    right after a list shorter than n - s),
    with source 'content', their because_movieId and the score of the first row they displaced
    (so scores still fall with rank); the ranked movies from
    there on move down s places; each list is cut at `length`. The ranker cannot place such a
    movie (no ratings, no collaborative signal), so without slots it would never be served."""
    if slots <= 0:
        return ranked
    slots = min(slots, n)  # at most every one of the first n positions
    w = Window.partitionBy("userId").orderBy(F.col("rank"), F.col("movieId"))
    fresh = (lists.where(F.col("model") == "content").join(rated_movies, "movieId", "left_anti")
             .withColumn("j", F.row_number().over(w)).where(F.col("j") <= slots)
             .select("userId", "movieId", "j", "score", "because_movieId"))
    s_u = fresh.groupBy("userId").agg(F.count(F.lit(1)).alias("s"))
    rest = (ranked.join(fresh.select("userId", "movieId"), ["userId", "movieId"], "left_anti")
            .withColumn("r", F.row_number().over(w)).join(s_u, "userId", "left")
            .withColumn("s", F.coalesce("s", F.lit(0)))
            .withColumn("rank", F.when(F.col("r") <= n - F.col("s"), F.col("r")).otherwise(F.col("r") + F.col("s"))))
    # A list shorter than n - s (a user who rated nearly everything) gets its picks right after it.
    # Each pick carries the score of the first row it displaced (else the list's last score), so
    # scores still fall with rank: the ranker's and the content model's are not on one scale.
    held = rest.groupBy("userId").agg(F.count(F.lit(1)).alias("c"), F.min("score").alias("last"))
    first_moved = rest.where(F.col("r") == F.lit(n) - F.col("s") + 1).select(
        "userId", F.col("score").alias("moved"))
    picks = fresh.drop("score").join(s_u, "userId").join(held, "userId", "left").join(first_moved, "userId", "left").select(
        "userId", (F.least(F.lit(n) - F.col("s"), F.coalesce("c", F.lit(0))) + F.col("j")).alias("rank"),
        "movieId", F.coalesce("moved", "last").alias("score"), F.lit("content").alias("source"), "because_movieId")
    typed = [F.col(c).cast(ranked.schema[c].dataType) for c in ranked.columns]
    out = rest.select(*typed).unionByName(picks.select(*typed))
    return out.where(F.col("rank") <= length)
