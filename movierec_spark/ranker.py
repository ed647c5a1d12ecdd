"""A learned ranker for the final lists: "will this candidate be among the user's held-out movies?"

A predicted rating answers "how much would they like it", which ranks niche, well-liked movies
first; top-N lists are judged on what users go on to watch. The ranker learns that from the
train part alone: one hash fold of train (the same fold 0 the features stage holds out) plays
the held-out role, the candidate models are refitted on the rest of train, and an MLlib
GBTClassifier learns which of their candidates land in the held-out fold from the candidate
models' ranks and scores, implicit ALS's score of every candidate (also those it did not
list), an item-kNN score (summed co-occurrence cosine of the candidate to the user's movies),
user and movie counts and means, when the user was active against when the movie was being
rated (train timestamps), and whether the candidate models agree. At recommendation time the
same features are built from the whole train part and the run's own candidate lists.
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


def sample_users(train: DataFrame, max_users: int | None, seed: int) -> DataFrame | None:
    """A hash sample of about `max_users` of train's users (None: fewer users than that, take all).

    The ranker learns how the candidate models' ranks and scores relate to what a user goes on
    to rate; 20,000 users' candidate lists (over a million rows) teach it that as well as
    160,000 users' would, at an eighth of the cost of listing and featurising candidates.
    """
    if not max_users:
        return None
    users = train.select("userId").distinct()
    total = users.count()
    if total <= max_users:
        return None
    frac = max_users / total
    log.info("ranker: trained on a %.1f%% hash sample of %d users (hybrid.ranker_max_users=%d)",
             100 * frac, total, max_users)
    from .features import hash_sample

    return users.where(hash_sample(["userId"], seed + 2, frac))


def candidate_lists(train: DataFrame, sims: DataFrame | None, models: list[str], cfg, n: int, seed: int,
                    pool: int | None = None, users: DataFrame | None = None):
    """(lists, implicit, cached): the candidate models' lists fitted on `train` (userId, movieId,
    model, rank, score; implicit ALS lists its top `pool`, the others their top n), the implicit
    ALS model (None when it is not a candidate model), and the frames cached on the way, for
    the caller to unpersist once it is done with the lists. `users`: lists for those users only
    (the models are still fitted on all of `train`)."""
    from .als import fit_implicit, recommend_unseen
    from .baselines import popularity_top_n
    from .content import content_top_n

    parts, model, cached = [], None, []
    own = train if users is None else train.join(users, "userId", "left_semi")
    if "als_implicit" in models:
        model = fit_implicit(train, cfg.als_implicit, seed)
        recs = recommend_unseen(model, train, pool or n, users=users)  # cached by recommend_unseen
        cached.append(recs)
        parts.append(recs.withColumn("model", F.lit("als_implicit")))
    if "content" in models and sims is not None:
        # A user's content list depends on their own ratings only.
        parts.append(content_top_n(own, sims, n, cfg.content.user_sources, cfg.content.user_neighbours)
                     .withColumn("model", F.lit("content")))
    if "popularity" in models:
        pop = popularity_top_n(train, n)
        parts.append((pop if users is None else pop.join(users, "userId", "left_semi")).withColumn("model", F.lit("popularity")))
    out = parts[0].select("userId", "movieId", "model", "rank", "score")
    for p in parts[1:]:
        out = out.unionByName(p.select("userId", "movieId", "model", "rank", "score"))
    return out, model, cached


def ranker_features(lists: DataFrame, train: DataFrame, models: list[str], n: int,
                    implicit=None, times: DataFrame | None = None,
                    item_nb: DataFrame | None = None) -> tuple[DataFrame, list[str]]:
    """One row per candidate (userId, movieId) with the ranker's inputs; returns (frame, names).

    `implicit` (the implicit ALS model fitted on `train`) adds its score u.v for every candidate,
    also those it did not list: a content or popularity pick the collaborative model also
    rates highly is a better bet than one it does not.
    """
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
    if implicit is not None:
        uf = implicit.userFactors.select(F.col("id").alias("userId"), F.col("features").alias("u"))
        itf = implicit.itemFactors.select(F.col("id").alias("movieId"), F.col("features").alias("v"))
        dot = F.aggregate(F.zip_with("u", "v", lambda a, b: a * b), F.lit(0.0), lambda acc, x: acc + x)
        out = (out.join(uf, "userId", "left").join(itf, "movieId", "left")
               .withColumn("imp_dot", F.coalesce(dot.cast("double"), F.lit(0.0))).drop("u", "v"))
        names.append("imp_dot")
    if times is not None:
        out, more = _time_features(out, times)
        names += more
    if item_nb is not None:
        # Item-kNN: summed co-occurrence cosine of the candidate to the movies the user rated.
        hist = train.select("userId", F.col("movieId").alias("nb"))
        knn = (out.select("userId", "movieId").join(item_nb, "movieId").join(hist, ["userId", "nb"])
               .groupBy("userId", "movieId").agg(F.sum("sim").alias("knn"), F.count(F.lit(1)).cast("double").alias("knn_n")))
        out = (out.join(knn, ["userId", "movieId"], "left").fillna({"knn": 0.0, "knn_n": 0.0})
               .withColumn("knn_u", F.col("knn") / F.sqrt(F.greatest(F.col("u_n"), F.lit(1.0)))))
        names += ["knn", "knn_n", "knn_u"]
    return out, names


def item_neighbours(train: DataFrame, m: int, cap: int | None, seed: int) -> DataFrame:
    """movieId, nb, sim: each movie's top-m movies by cosine of binary user vectors (co-occurrence).

    The features stage's capped co-rating self-join (features.cosine_neighbours) on vectors of
    ones: the dot product counts co-raters (at most `cap` ratings per user in the join), the
    norms are sqrt(raters).
    """
    from .features import cosine_neighbours

    ones = train.select("userId", "movieId", F.lit(1.0).alias("c"))
    return cosine_neighbours(ones, "movieId", "userId", m, 1, cap, seed).select("movieId", "nb", "sim")


def _time_features(cands: DataFrame, times: DataFrame) -> tuple[DataFrame, list[str]]:
    """When the user was active against when the movie was being rated, from train timestamps.

    A user rates movies of the period they were active in: a movie whose first rating came
    after the user's last one, or whose ratings centre years away from the user's, is an
    unlikely next watch. For a user active today this is a recency signal (what is being
    watched now); for a user who left years ago it ranks the movies of their time.
    """
    secs = F.unix_timestamp("rated_at").cast("double")
    day = 86400.0
    u = times.groupBy("userId").agg(F.max(secs).alias("u_last"), F.percentile_approx(secs, 0.5).alias("u_mid"))
    m = times.groupBy("movieId").agg(F.min(secs).alias("m_first"), F.percentile_approx(secs, 0.5).alias("m_mid"))
    out = (cands.join(u, "userId", "left").join(m, "movieId", "left")
           .withColumn("t_after", F.coalesce(F.greatest(F.col("m_first") - F.col("u_last"), F.lit(0.0)) / day, F.lit(0.0)))
           .withColumn("t_dist", F.coalesce(F.abs(F.col("m_mid") - F.col("u_mid")) / day, F.lit(1e5)))
           .drop("u_last", "u_mid", "m_first", "m_mid"))
    return out, ["t_after", "t_dist"]


def fit_ranker(labelled: DataFrame, names: list[str], seed: int, max_iter: int = 30, max_depth: int = 4) -> PipelineModel:
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
