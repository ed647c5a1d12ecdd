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
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

log = logging.getLogger(__name__)


def sample_users(train: DataFrame, max_users: int | None, seed: int) -> Column | None:
    """A predicate on userId: a hash sample of about `max_users` of train's users (None: fewer
    users than that, take all).

    The ranker learns how the candidate models' ranks and scores relate to what a user goes on
    to rate; 20,000 users' candidate lists (over a million rows) teach it that as well as
    160,000 users' would, at an eighth of the cost of listing and featurising candidates. A
    predicate, not a frame of users: the user-side statistics (ranker_features' `users`) filter
    train's rows by it before they aggregate, with no join.
    """
    if not max_users:
        return None
    total = train.select("userId").distinct().count()
    if total <= max_users:
        return None
    frac = max_users / total
    log.info("ranker: trained on a %.1f%% hash sample of %d users (hybrid.ranker_max_users=%d)",
             100 * frac, total, max_users)
    from .features import hash_sample

    return hash_sample(["userId"], seed + 2, frac)


def candidate_lists(train: DataFrame, sims: DataFrame | None, models: list[str], cfg, n: int, seed: int,
                    pool: int | None = None, users: Column | None = None):
    """(lists, implicit, cached): the candidate models' lists fitted on `train` (userId, movieId,
    model, rank, score; implicit ALS lists its top `pool`, the others their top n), the implicit
    ALS model (None when it is not a candidate model), and the frames cached on the way, for
    the caller to unpersist once it is done with the lists. `users` (a predicate on userId, as
    sample_users gives): lists for those users only (the models are still fitted on all of
    `train`)."""
    from .als import fit_implicit, recommend_unseen
    from .baselines import popularity_top_n
    from .content import content_top_n

    parts, model, cached = [], None, []
    own = train if users is None else train.where(users)
    if "als_implicit" in models:
        model = fit_implicit(train, cfg.als_implicit, seed)
        recs = recommend_unseen(model, train, pool or n,  # cached by recommend_unseen
                                users=None if users is None else own.select("userId"))
        cached.append(recs)
        parts.append(recs.withColumn("model", F.lit("als_implicit")))
    if "content" in models and sims is not None:
        # A user's content list depends on their own ratings only.
        parts.append(content_top_n(own, sims, n, cfg.content.user_sources, cfg.content.user_neighbours)
                     .withColumn("model", F.lit("content")))
    if "popularity" in models:
        # Popularity from all of train, lists for `own`'s users only.
        parts.append(popularity_top_n(train, n, seen=own).withColumn("model", F.lit("popularity")))
    out = parts[0].select("userId", "movieId", "model", "rank", "score")
    for p in parts[1:]:
        out = out.unionByName(p.select("userId", "movieId", "model", "rank", "score"))
    return out, model, cached


# Candidate models whose score is a count of train ratings (popularity: the movie's count).
COUNT_SCORES = ("popularity",)


def ranker_features(lists: DataFrame, train: DataFrame, models: list[str], n: int,
                    implicit=None, times: DataFrame | None = None,
                    item_nb: DataFrame | None = None, active_days: int = 0,
                    share: float = 1.0, users: Column | None = None) -> tuple[DataFrame, list[str]]:
    """One row per candidate (userId, movieId) with the ranker's inputs; returns (frame, names).

    `implicit` (the implicit ALS model fitted on `train`) adds its score u.v for every candidate,
    also those it did not list: a content or popularity pick the collaborative model also
    rates highly is a better bet than one it does not.

    `share`: the fraction of the serving data that `train` is. The ranker learns on train
    outside one fold and serves from all of train, so every count (the user's and the movie's
    ratings, the popularity score, the rated kNN neighbours, the ratings around the user's
    time) is divided by it: the trees' thresholds then sit where the served counts fall, not
    1/share lower.

    `users` (a predicate on userId, as sample_users gives) when every candidate is a user it
    holds: the user-side statistics then aggregate only those users' rows (the same values;
    at 25M ratings the ranker's 20,000 sampled users are an eighth of train's). The movie-side
    ones read all of `train`.
    """
    cols, names = [], []
    mine = train if users is None else train.where(users)
    for m in models:
        is_m = F.col("model") == m
        score = F.col("score") / share if m in COUNT_SCORES else F.col("score")
        cols += [F.coalesce(F.min(F.when(is_m, F.col("rank"))), F.lit(n + 1)).cast("double").alias(f"{m}_rank"),
                 F.coalesce(F.max(F.when(is_m, score)), F.lit(0.0)).cast("double").alias(f"{m}_score")]
        names += [f"{m}_rank", f"{m}_score"]
    cands = lists.groupBy("userId", "movieId").agg(*cols, F.count(F.lit(1)).cast("double").alias("n_lists"))
    names.append("n_lists")
    count = (F.count(F.lit(1)) / share).cast("double")
    u = mine.groupBy("userId").agg(count.alias("u_n"), F.avg("rating").alias("u_avg"))
    m = train.groupBy("movieId").agg(count.alias("m_n"), F.avg("rating").alias("m_avg"))
    g = train.agg(F.avg("rating")).first()[0]
    out = (cands.join(u, "userId", "left").join(m, "movieId", "left")
           .select("*", F.log1p(F.coalesce("m_n", F.lit(0.0))).alias("m_log_n")).fillna(
               {"u_n": 0.0, "m_n": 0.0, "u_avg": g, "m_avg": g}))
    names += ["u_n", "u_avg", "m_n", "m_avg", "m_log_n"]
    if implicit is not None:
        uf = implicit.userFactors.select(F.col("id").alias("userId"), F.col("features").alias("u"))
        uf = uf if users is None else uf.where(users)
        itf = implicit.itemFactors.select(F.col("id").alias("movieId"), F.col("features").alias("v"))
        # Spelled out per dimension: generated code, where zip_with/aggregate lambdas are
        # interpreted row by row. Each float product is added to a double from 0, as that
        # aggregate did, so the values are the same.
        dot = sum((F.col("u")[i] * F.col("v")[i]).cast("double") for i in range(implicit.rank))
        out = (out.join(uf, "userId", "left").join(itf, "movieId", "left")
               .withColumn("imp_dot", F.coalesce(dot.cast("double"), F.lit(0.0))).drop("u", "v"))
        names.append("imp_dot")
    if times is not None:
        out, more = _time_features(out, times, active_days, share, users)
        names += more
    if item_nb is not None:
        # Item-kNN: summed co-occurrence cosine of the candidate to the movies the user rated.
        knn = knn_scores(out.select("userId", "movieId"), mine.select("userId", "movieId"), item_nb)
        knn = knn.select("userId", "movieId", (F.col("knn") / share).alias("knn"), (F.col("knn_n") / share).alias("knn_n"))
        out = (out.join(knn, ["userId", "movieId"], "left").fillna({"knn": 0.0, "knn_n": 0.0})
               .withColumn("knn_u", F.col("knn") / F.sqrt(F.greatest(F.col("u_n"), F.lit(1.0)))))
        names += ["knn", "knn_n", "knn_u"]
    return out, names


# How the item-kNN features are computed: "numpy" (per partition, knn_scores) or "join" (the
# Spark join it replaced, kept for benchmarks/knn_scores.py).
KNN = "numpy"
KNN_USER_CHUNK = 512


def knn_scores(cands: DataFrame, hist: DataFrame, item_nb: DataFrame) -> DataFrame:
    """userId, movieId, knn, knn_n: for each candidate (userId, movieId; distinct), the summed
    `sim` of its neighbours (item_nb: movieId, nb, sim) that the user rated (hist: userId,
    movieId, one row per rating: ingest keeps one per pair), and how many; candidates with none
    are left out.

    As a Spark join this is candidates x neighbours rows (at 25M ratings about 8M candidates x
    50 neighbours, shuffled and joined to the ratings). Here each partition holds a copy of the
    neighbour lists (partitioned.py) and its users' candidates and rated movies, and gathers
    the flags of every candidate's neighbours from a dense rated-or-not matrix, KNN_USER_CHUNK
    users at a time.
    """
    if KNN == "join":
        rated = hist.select("userId", F.col("movieId").alias("nb"))
        return (cands.join(item_nb, "movieId").join(rated, ["userId", "nb"]).groupBy("userId", "movieId")
                .agg(F.sum("sim").alias("knn"), F.count(F.lit(1)).cast("double").alias("knn_n")))
    from .partitioned import movies_then_users, numpy_partitions, split_movie_rows, user_partition

    parts = numpy_partitions(cands.sparkSession)
    wanted = cands.groupBy("userId").agg(F.collect_list("movieId").alias("a"))
    seen = hist.join(wanted, "userId", "left_semi").groupBy("userId").agg(F.collect_list("movieId").alias("seen"))
    user_rows = wanted.join(seen, "userId", "left").select(
        user_partition(parts).alias("pid"), F.col("userId").alias("id"), "a",
        F.lit(None).cast("array<double>").alias("s"), F.coalesce("seen", F.array().cast("array<int>")).alias("seen"))
    lists = item_nb.groupBy("movieId").agg(F.collect_list(F.struct(F.col("nb").cast("int").alias("nb"),
                                                                    F.col("sim").cast("double").alias("sim"))).alias("l"))
    movie_rows = lists.select(F.col("movieId").alias("id"), F.col("l.nb").alias("a"), F.col("l.sim").alias("s"),
                              F.lit(None).cast("array<int>").alias("seen"))
    rows = movies_then_users(movie_rows, user_rows, parts)
    chunk = KNN_USER_CHUNK

    def score(batches):
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        got: list = []

        def ragged(col):
            """(values, row of each value, length of each row) of a list column."""
            counts = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
            return col.flatten().to_numpy(zero_copy_only=False), np.repeat(np.arange(len(counts)), counts), counts

        space = None
        for b in split_movie_rows(batches, got.append):
            if space is None:
                movies = pa.Table.from_batches(got, schema=b.schema) if got else None
                ids = movies.column("id").to_numpy() if movies else np.empty(0, np.int32)
                ids, first = np.unique(ids, return_index=True)  # a partition may hold two copies
                nb, row, counts = (ragged(movies.column("a").combine_chunks().take(first)) if movies
                                   else (np.empty(0, np.int32), np.empty(0, np.int64), np.zeros(0, np.int64)))
                sim = (movies.column("s").combine_chunks().take(first).flatten().to_numpy(zero_copy_only=False)
                       if movies else np.empty(0))
                # Every movie named as a candidate's neighbour gets a column; column len(space)
                # pads the shorter neighbour lists and is never set.
                space = np.unique(nb)
                width = int(counts.max()) if len(counts) else 0
                slot = np.arange(len(nb)) - np.repeat(np.cumsum(counts) - counts, counts)
                nb_col = np.full((len(ids), width), len(space), np.int64)
                nb_sim = np.zeros((len(ids), width))
                nb_col[row, slot] = np.searchsorted(space, nb)
                nb_sim[row, slot] = sim
            uid = b.column("id").to_numpy()
            for lo in range(0, len(uid), chunk):
                part = b.slice(lo, chunk)
                want, who_c, counts_c = ragged(part.column("a"))
                rated, who_r, _ = ragged(part.column("seen"))
                flags = np.zeros((part.num_rows, len(space) + 1), bool)
                at = np.minimum(np.searchsorted(space, rated), max(len(space) - 1, 0))
                known = space[at] == rated if len(space) else np.zeros(len(rated), bool)
                flags[who_r[known], at[known]] = True
                mi = np.minimum(np.searchsorted(ids, want), max(len(ids) - 1, 0))
                has = ids[mi] == want if len(ids) else np.zeros(len(want), bool)
                if not has.any():
                    continue
                hit = flags[who_c[has][:, None], nb_col[mi[has]]]
                n_hit = hit.sum(axis=1)
                keep = n_hit > 0
                yield pa.RecordBatch.from_arrays(
                    [pa.array(np.repeat(uid[lo:lo + part.num_rows], counts_c)[has][keep], pa.int32()),
                     pa.array(want[has][keep], pa.int32()),
                     pa.array((nb_sim[mi[has]] * hit).sum(axis=1)[keep], pa.float64()),
                     pa.array(n_hit[keep].astype(np.float64), pa.float64())],
                    names=["userId", "movieId", "knn", "knn_n"])

    return rows.mapInArrow(score, "userId int, movieId int, knn double, knn_n double")


def item_neighbours(train: DataFrame, m: int, cap: int | None, seed: int) -> DataFrame:
    """movieId, nb, sim: each movie's top-m movies by cosine of binary user vectors (co-occurrence).

    The features stage's capped co-rating self-join (features.cosine_neighbours) on vectors of
    ones: the dot product counts co-raters (at most `cap` ratings per user in the join), the
    norms are sqrt(raters).
    """
    from .features import cosine_neighbours

    ones = train.select("userId", "movieId", F.lit(1.0).alias("c"))
    return cosine_neighbours(ones, "movieId", "userId", m, 1, cap, seed).select("movieId", "nb", "sim")


def _time_features(cands: DataFrame, times: DataFrame, active_days: int = 0,
                   share: float = 1.0, users: Column | None = None) -> tuple[DataFrame, list[str]]:
    """When the user was active against when the movie was being rated, from train timestamps
    (`users`: as ranker_features', for the user-side statistics).

    A user rates movies of the period they were active in: a movie whose first rating came
    after the user's last one, or whose ratings centre years away from the user's, is an
    unlikely next watch. For a user active today this is a recency signal (what is being
    watched now); for a user who left years ago it ranks the movies of their time.
    """
    secs = F.unix_timestamp("rated_at").cast("double")
    day = 86400.0
    mine = times if users is None else times.where(users)
    u = mine.groupBy("userId").agg(F.max(secs).alias("u_last"), F.percentile_approx(secs, 0.5).alias("u_mid"))
    m = times.groupBy("movieId").agg(F.min(secs).alias("m_first"), F.percentile_approx(secs, 0.5).alias("m_mid"))
    out = (cands.join(u, "userId", "left").join(m, "movieId", "left")
           .withColumn("t_after", F.coalesce(F.greatest(F.col("m_first") - F.col("u_last"), F.lit(0.0)) / day, F.lit(0.0)))
           .withColumn("t_dist", F.coalesce(F.abs(F.col("m_mid") - F.col("u_mid")) / day, F.lit(1e5))))
    names = ["t_after", "t_dist"]
    if active_days > 0:
        # How much the movie was rated around the user's median rating time (30-day buckets,
        # +/- active_days): the new users' "popularity when active" as a feature for everyone.
        from .baselines import time_bucket, windowed_counts

        per = windowed_counts(times, active_days).withColumnRenamed("c", "m_act")
        out = (out.withColumn("centre", time_bucket(F.col("u_mid")))
               .join(per, ["movieId", "centre"], "left")
               .withColumn("m_active", F.log1p(F.coalesce(F.col("m_act"), F.lit(0)).cast("double") / share))
               .drop("centre", "m_act"))
        names.append("m_active")
    return out.drop("u_last", "u_mid", "m_first", "m_mid"), names


def fit_ranker(labelled: DataFrame, names: list[str], seed: int, max_iter: int = 30, max_depth: int = 4,
               subsample: float = 1.0, step: float = 0.1) -> PipelineModel:
    from .session import release

    data = ranker_input(labelled)
    try:
        return fit_ranker_on(data, names, seed, max_iter, max_depth, subsample, step)
    finally:
        release(data)


def ranker_input(labelled: DataFrame) -> DataFrame:
    """The ranker's training rows as its learner reads them (features.gbt_input: materialized in
    the fixed layout); give it back with session.release."""
    from .features import gbt_input

    data = gbt_input(labelled)
    rows, pos = data.agg(F.count(F.lit(1)), F.sum("label")).first()  # one job on the materialized rows
    log.info("ranker: %d training candidates, %d of them held out", rows, int(pos or 0))
    return data


def fit_ranker_on(data: DataFrame, names: list[str], seed: int, max_iter: int = 30, max_depth: int = 4,
                  subsample: float = 1.0, step: float = 0.1) -> PipelineModel:
    """The ranker fitted on `data` (ranker_input's rows)."""
    gbt = GBTClassifier(featuresCol="x", labelCol="label", maxIter=max_iter, maxDepth=max_depth, seed=seed,
                        subsamplingRate=subsample, stepSize=step)
    return Pipeline(stages=[VectorAssembler(inputCols=names, outputCol="x"), gbt]).fit(data)


def rank_scores(model: PipelineModel, feats: DataFrame) -> DataFrame:
    """userId, movieId, p: the ranker's probability that the candidate is a held-out movie."""
    return model.transform(feats).select("userId", "movieId", F.get(vector_to_array("probability"), 1).alias("p"))


def pool_length(cfg) -> int:
    """How long a candidate list per model the learned ranker takes: the pool, at least max(ks)."""
    return max(cfg.hybrid.candidate_pool, max(cfg.evaluation.ks))


def implicit_pool(cfg) -> int | None:
    """How long a list of implicit ALS the als_implicit stage keeps for the learned ranker
    (None: no learned ranker in this run)."""
    h = cfg.hybrid
    if h.ranker != "learned" or "als_implicit" not in h.candidate_models or "recommend" not in cfg.pipeline.stages:
        return None
    return pool_length(cfg)


def cached_item_neighbours(train: DataFrame, h, seed: int) -> DataFrame | None:
    """The ranker's item-kNN table of `train`, cached (None when `ranker_knn_neighbours` is 0)."""
    if not h.ranker_knn_neighbours:
        return None
    return item_neighbours(train, h.ranker_knn_neighbours, h.ranker_knn_cap or h.cap_per_user, seed).cache()


def ranker_neighbours(train: DataFrame, h, seed: int) -> tuple[DataFrame | None, DataFrame | None, DataFrame | None]:
    """(rest, whole, cached): the ranker's item-kNN tables (movieId, nb, sim) of train outside
    fold 0 (what the ranker trains on, see train_ranker) and of the whole of train (what it
    serves from), from one co-occurrence self-join (features.fold_neighbours, uncentred: a
    co-rating counts for `rest` when neither rating is in fold 0), and the cached frame both
    read, for the caller to release; (None, None, None) when `ranker_knn_neighbours` is 0.

    Two self-joins (one per table) cost about 5 s each on ml-latest-small and dominate the
    ranker's kNN cost at scale; the one join emits both tables' sums. Each table samples its own
    `cap` ratings per user, so both equal item_neighbours over their ratings (a first version
    capped once for both: heavy raters kept fewer co-ratings in `rest` than the ranker had been
    trained on until then)."""
    if not h.ranker_knn_neighbours:
        return None, None, None
    from .features import fold_neighbours, with_folds

    ones = with_folds(train.select("userId", "movieId"), seed, h.folds).withColumn("rating", F.lit(1.0))
    both = fold_neighbours(ones, "movieId", "userId", [0, None], h.ranker_knn_neighbours, 1,
                           h.ranker_knn_cap or h.cap_per_user, seed, centred=False, cap_per_pass=True).select(
        "p", "movieId", "nb", "sim").cache()
    return (both.where(F.col("p") == 0).drop("p"), both.where(F.col("p") == 1).drop("p"), both)


def within_pool(feats: DataFrame, models: list[str], pool: int, p: int) -> DataFrame:
    """The ranker's rows (ranker_features over lists with implicit ALS's top `pool`) as they
    would be had implicit ALS listed only its top `p` (p <= pool; the other models' lists are
    no longer than p): candidates only implicit ALS listed below p go, its rank and score there
    become the unlisted fills, and every model's unlisted rank fill pool + 1 becomes p + 1.
    Lets the search score a shorter pool without listing or featurising anything again."""
    if p >= pool:
        return feats
    r = F.col("als_implicit_rank")
    beyond = (r > p) & (r <= pool)  # listed by implicit ALS, but not within its top p
    out = feats.where(~(beyond & (F.col("n_lists") == 1)))
    cols = {"n_lists": F.col("n_lists") - F.when(beyond, 1.0).otherwise(0.0),
            "als_implicit_score": F.when(beyond, F.lit(0.0)).otherwise(F.col("als_implicit_score"))}
    for m in models:
        c = F.col(f"{m}_rank")
        cols[f"{m}_rank"] = F.when(c > p, F.lit(float(p + 1))).otherwise(c)
    return out.withColumns(cols)


def _rest_share(h) -> float:
    """The share of train the ranker learns from (train outside fold 0), as ranker_features'
    `share`: 1.0 when hybrid.ranker_rescale_counts is off."""
    return (h.folds - 1) / h.folds if h.ranker_rescale_counts else 1.0


def train_ranker(train: DataFrame, times: DataFrame, sims: DataFrame | None, cfg, n_items: int,
                 search: bool = False, item_nb: DataFrame | None = None) -> tuple[PipelineModel, list, dict]:
    """(model, validation rows, tune): the ranker fitted on fold 0 of `train` (the features
    stage's hash folds) with the candidate models refitted on the other folds, so neither the
    ranker nor its inputs see a test part. A hash share of the users
    (`hybrid.ranker_validation_users`) is left out of its training: its ranked lists for them,
    against their fold-0 movies, give the validation metric rows (model, k, value) (empty when
    that share is 0).

    `search` (with validation users): the candidate pool and depth are chosen on those users
    (tune.ranker_*, a coordinate search; see choose_ranker); tune = {"settings": {"hybrid":
    {candidate_pool, ranker_max_depth}}, "trials": [...]}, else {}. The validation rows are
    the chosen ranker's.

    Runs Spark jobs: it caches the refitted lists on the way and unpersists them before it
    returns. `times`: train's (userId, movieId, rated_at). `item_nb`: the item-kNN table of
    train outside fold 0 when the caller has it (ranker_neighbours), else computed here.
    """
    from .baselines import top_n_per_user
    from .evaluation import evaluate_ranking_model
    from .features import hash_sample

    h = cfg.hybrid
    models, seed = h.candidate_models, cfg.pipeline.seed
    n, pool = max(cfg.evaluation.ks), pool_length(cfg)
    fold = F.pmod(F.xxhash64("userId", "movieId", F.lit(seed)), F.lit(h.folds))
    rest, held = train.where(fold != 0).cache(), train.where(fold == 0)
    users = sample_users(rest, h.ranker_max_users, seed)
    lists, implicit, inner = candidate_lists(rest, sims, models, cfg, n, seed, pool, users=users)
    lists = lists.cache()
    own_nb = cached_item_neighbours(rest, h, seed) if item_nb is None else None
    nb = own_nb if item_nb is None else item_nb
    feats, names = ranker_features(lists, rest, models, pool, implicit, times.where(fold != 0), nb,
                                   h.ranker_active_days, share=_rest_share(h), users=users)
    # Materialized: the fit reads it, and the validation users' lists and held-out movies read it
    # again (on ml-latest-small, recomputing it there cost about 40 s of the recommend stage);
    # a checkpoint, not a cache, so the queries on it do not plan its lineage again.
    from .session import materialize, release

    feats = materialize(feats)
    labelled = (feats.join(held.select("userId", "movieId", F.lit(1.0).alias("label")), ["userId", "movieId"], "left")
                .fillna({"label": 0.0}))
    val_share = h.ranker_validation_users
    is_val = hash_sample(["userId"], seed + 4, val_share) if val_share > 0 else F.lit(False)
    n_eval = max(max(cfg.evaluation.ks), cfg.evaluation.top_n)
    # The users the ranker never trains on, and their fold-0 movies (the candidate models did not see them).
    vusers = feats.where(is_val).select("userId").distinct()
    vheld = held.join(vusers, "userId", "left_semi")
    tune: dict = {}
    chosen = pool
    if search and val_share > 0:
        setting, model, trials = choose_ranker(feats, labelled, is_val, vheld, names, cfg, pool)
        chosen = setting["candidate_pool"]
        tune = {"settings": {"hybrid": setting}, "trials": trials}
    else:
        model = fit_ranker(labelled.where(~is_val), names, seed, h.ranker_max_iter, h.ranker_max_depth,
                           h.ranker_subsample)
    validation = []
    if val_share > 0:
        # The final lists of the validation users, scored like every list.
        vfeats = within_pool(feats.where(is_val), models, pool, chosen)
        vlists = top_n_per_user(rank_scores(model, vfeats), n_eval, score=F.col("p"))
        validation = evaluate_ranking_model(vlists, vheld, rest, n_items, ks=tuple(cfg.evaluation.ks),
                                            relevance_threshold=cfg.evaluation.relevance_threshold, similarity=sims)
    for df in (feats, rest, lists, own_nb, *inner):
        if df is not None:
            release(df)
    return model, validation, tune


def choose_ranker(feats: DataFrame, labelled: DataFrame, is_val, vheld: DataFrame, names: list[str], cfg,
                  pool: int) -> tuple[dict, PipelineModel, list[dict]]:
    """(setting, its fitted ranker, trials): the candidate pool, then the depth, chosen by nDCG@10
    of the validation users' lists (users the rankers do not train on), from the configured
    values (tune.py coordinate_search, candidates side by side). A candidate replaces the kept
    one only when its mean per-user nDCG@10 gain over it exceeds tune.ranker_z standard errors
    of the per-user differences (evaluation.paired_gain): a gain within the noise keeps the
    configured value."""
    import threading
    import time

    from .baselines import top_n_per_user
    from .evaluation import paired_gain, user_ndcg
    from .session import release
    from .tune import coordinate_search

    h, t, seed = cfg.hybrid, cfg.tune, cfg.pipeline.seed
    models = h.candidate_models
    floor = max(cfg.evaluation.ks)  # the lists the ranker merges are this long
    pools = sorted({pool, *(p for p in t.ranker_pools if floor <= p <= pool)})
    depths = sorted({h.ranker_max_depth, *t.ranker_depths})
    fitted: dict[tuple, PipelineModel] = {}
    # One training input per pool, laid out by whichever of its trials asks first (a lock per
    # pool: another pool's trial does not wait), shared by the pool's depth trials. gbt_input
    # fixes the rows' layout, so each trial fits the same model it fitted from a copy of its own;
    # on ml-latest-small three of the four trials use pool 100, and two layouts (a sort and a
    # checkpoint each, plus a counting job) are saved.
    inputs: dict[int, DataFrame] = {}
    locks = {p: threading.Lock() for p in pools}

    def rows_of(p: int) -> DataFrame:
        with locks[p]:
            if p not in inputs:
                inputs[p] = ranker_input(within_pool(labelled, models, pool, p).where(~is_val))
            return inputs[p]

    def evaluate(setting: dict):
        t0 = time.perf_counter()
        p, d = setting["candidate_pool"], setting["ranker_max_depth"]
        model = fit_ranker_on(rows_of(p), names, seed, h.ranker_max_iter, d, h.ranker_subsample)
        vfeats = within_pool(feats.where(is_val), models, pool, p)
        lists = top_n_per_user(rank_scores(model, vfeats), 10, score=F.col("p"))
        per_user = user_ndcg(lists, vheld, 10, cfg.evaluation.relevance_threshold).cache()
        mean = per_user.agg(F.avg("ndcg")).first()[0] or 0.0
        fitted[(p, d)] = model
        trial = {"candidate_pool": p, "ranker_max_depth": d, "ndcg@10": round(mean, 4),
                 "seconds": round(time.perf_counter() - t0, 1)}
        log.info("tune: ranker pool %d, depth %d: validation nDCG@10 %.4f (%.1f s)", p, d, mean, trial["seconds"])
        return (per_user, mean, (p, d)), trial

    decided: dict[tuple, dict] = {}

    def better(cand, best) -> bool:
        gain, se, users = paired_gain(best[0], cand[0])
        kept = gain > t.ranker_z * se
        # A trial's record is its first meeting, as a challenger of the best so far. A setting
        # may meet again: when a step's challenger displaces the step's incumbent, the incumbent
        # (its grid value too) meets the new best, and the next step's candidates meet it. That
        # later meeting must not overwrite the one that decided whether it was kept.
        decided.setdefault(cand[2], {"gain": round(gain, 4), "se": round(se, 4), "over": list(best[2]),
                                     "users": users, "kept": bool(kept)})
        return kept

    start = {"candidate_pool": pool, "ranker_max_depth": h.ranker_max_depth}
    per: list = []
    try:
        best, (_, best_mean, _), trials = coordinate_search(
            start, (("candidate_pool",), ("ranker_max_depth",)), {"candidate_pool": pools, "ranker_max_depth": depths},
            lambda s: _kept(evaluate(s), per), parallelism=t.parallelism, better=better)
    finally:
        for frame in per:
            frame.unpersist()
        for data in inputs.values():
            release(data)
    for tr in trials:  # each challenger's paired gain over the setting it was compared with
        tr.update(decided.get((tr["candidate_pool"], tr["ranker_max_depth"]), {}))
    log.info("tune: ranker chose pool %d, depth %d (validation nDCG@10 %.4f; a challenger is kept above "
             "%.1f standard errors of the per-user gain) after %d fits", best["candidate_pool"],
             best["ranker_max_depth"], best_mean, t.ranker_z, len(trials))
    return best, fitted[(best["candidate_pool"], best["ranker_max_depth"])], trials


def _kept(result, frames: list):
    """Remember a trial's cached per-user frame for release once the search is over."""
    frames.append(result[0][0])
    return result


def serving_scores(model: PipelineModel, lists: DataFrame, train: DataFrame, times: DataFrame,
                   nb: DataFrame | None, implicit, cfg) -> DataFrame:
    """userId, movieId, prediction: the ranker's probability for each candidate of `lists`
    (model, userId, rank, movieId, score, because_movieId), its features built from `train`."""
    feats, _ = ranker_features(lists, train, cfg.hybrid.candidate_models, pool_length(cfg), implicit, times, nb,
                               cfg.hybrid.ranker_active_days)
    return rank_scores(model, feats).withColumnRenamed("p", "prediction")
