"""Collaborative filtering with MLlib ALS.

Explicit ALS predicts ratings. Spark's ALS has no bias terms, so by default it is fitted to the
residuals of the bias baseline and its prediction is baseline + u.v: the biases carry what plain
ALS spends its factors on. Test pairs whose user or movie ALS never saw get the baseline alone.

Implicit ALS (implicitPrefs) ranks: trained on confidence derived from ratings, it answers
"what will this user watch", which is what top-N lists are judged on.
"""

from __future__ import annotations

import logging

from pyspark import SparkContext
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
        checkpointInterval=getattr(cfg, "checkpoint_interval", 10), nonnegative=False,
    )
    if implicit:
        als.setAlpha(cfg.alpha)
    blocks = als_blocks(cfg)
    als.setNumUserBlocks(blocks).setNumItemBlocks(blocks)
    return als


def als_blocks(cfg: AlsConfig | ImplicitAlsConfig) -> int:
    """User and item block count: the config's, else the cores Spark has (defaultParallelism).

    MLlib's default is 10 blocks whatever the cluster; on 2 cores that is 10 tasks per half-step
    for 2 slots, and measured on ml-latest-small (rank 20, 15 iterations) a fit took 5.4 s with
    10 blocks, 2.5 s with 4 and 2.1 s with 2. One block per core keeps every core busy with the
    fewest shuffle blocks; more cores (a cluster) give more blocks.
    """
    if cfg.num_blocks:
        return int(cfg.num_blocks)
    # The process's SparkContext, not SparkSession.getActiveSession(): the active session is
    # per thread, so a fit from a worker thread (hybrid.feature_threads > 1) saw none, fell back
    # to 10 blocks and fitted a different model than the same pass run on the main thread.
    sc = SparkContext._active_spark_context
    return max(2, sc.defaultParallelism) if sc is not None else 10


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


def als_model_from_factors(users: DataFrame, items: DataFrame, rank: int, user_col: str, item_col: str,
                           prediction_col: str = "prediction", uid: str = "from_factors") -> ALSModel:
    """An ALSModel over given factor tables (id, features array<float> of length `rank`): MLlib's
    blocked BLAS scoring (transform, recommendForAllUsers) of any two factor sets.

    pyspark has no public constructor from factor tables, so this is the one place that calls
    the JVM constructor (`ALSModel(uid, rank, userFactors, itemFactors)`, private[ml] in Scala);
    tests/test_cf.py holds its scores to the dot products, so a Spark upgrade that changes it
    fails there.
    """
    jvm = users.sparkSession.sparkContext._jvm
    jmodel = jvm.org.apache.spark.ml.recommendation.ALSModel(uid, rank, users._jdf, items._jdf)
    # Params live on the JVM object; set them there (recommendForUserSubset reads them there).
    jmodel.setUserCol(user_col).setItemCol(item_col).setPredictionCol(prediction_col).setColdStartStrategy("nan")
    out = ALSModel(jmodel)
    out._transfer_params_from_java()
    return out


def model_with_item_bias(spark: SparkSession, model: ALSModel, bias: BiasModel) -> ALSModel:
    """An ALSModel whose dot product is u.v + b_i: the explicit model's rating order per user.

    (b_u and mu are constant within a user's list, so they do not change the order.) The
    factors gain one dimension: users [u, 1], items [v, b_i]. Built through the JVM constructor
    because pyspark exposes no way to make an ALSModel from factor tables.
    """
    uf = model.userFactors.select("id", F.concat("features", F.array(F.lit(1.0).cast("float"))).alias("features"))
    itf = (model.itemFactors.join(bias.item_bias.select(F.col("movieId").alias("id"), "b_i"), "id", "left")
           .select("id", F.concat("features", F.array(F.coalesce("b_i", F.lit(0.0)).cast("float"))).alias("features")))
    # Not cached (a transform leaves no cache behind): rebuilding them is a catalog-sized join.
    return als_model_from_factors(uf, itf, model.rank + 1, "userId", "movieId", uid=model.uid + "_biased")


# Second-pass users x movies below which scoring them against the whole catalog in one
# DataFrame job beats a recommendForUserSubset job per bucket.
DIRECT_MAX_PAIRS = 2_000_000

# Candidates asked of every user in the first pass, beyond n: enough that most users' top-n
# unseen movies are already there (explicit ALS scatters seen movies; implicit ALS ranks them
# high, which sends heavy raters to the second pass).
FIRST_PASS_EXTRA = 40


# How recommend_unseen lists: "numpy" (top_unseen_numpy: every user against every movie per
# partition, rated movies masked; at 25M ratings, top 20 of 162,540 users in 70.1 s) or "mllib"
# (recommendForAllUsers, then recommendForUserSubset passes for the heavy raters: 433.7 s there,
# a top-k aggregation with k up to thousands that spilled gigabytes; benchmarks/topn_pass.py,
# results/topn-pass-25M.md). Both exact: the lists agreed on 99.998% of (user, rank) slots, the
# rest float32 ties.
LISTING = "numpy"

# Users scored at once inside top_unseen_numpy: a users x catalog float32 block (at 60,000
# movies, 256 users are 61 MB) bounds each Python worker's memory whatever the batch size.
NUMPY_USER_CHUNK = 256


def _vectors(col, rank: int):
    """A list<float> Arrow column as a rows x rank float32 matrix."""
    import numpy as np

    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, rank)


def _after_item_factors(batches, rank: int):
    """(item_ids, v, batch) for each batch of user rows of a movies_then_users partition: the
    partition's item factors read first, movieIds sorted ascending and v their rank x items
    matrix (columns in movieId order). Sorted and kept once each: hash partitioning may bring
    two partitions' copies together."""
    import numpy as np

    from .partitioned import split_movie_rows

    ids, vecs = [], []

    def take(b):
        ids.append(b.column("id").to_numpy())
        vecs.append(_vectors(b.column("features"), rank))

    item_ids = v = None
    for b in split_movie_rows(batches, take):
        if v is None:
            item_ids = np.concatenate(ids) if ids else np.empty(0, np.int32)
            v = np.concatenate(vecs) if vecs else np.empty((0, rank), np.float32)
            item_ids, first = np.unique(item_ids, return_index=True)
            v = np.ascontiguousarray(v[first].T)
        yield item_ids, v, b


def top_unseen_numpy(model: ALSModel, users: DataFrame, seen: DataFrame, n: int) -> DataFrame:
    """userId, movieId, s: each of `users`' n best movies by u.v among those they have not rated
    (`seen`: userId, movieId), exact, through numpy per partition (mapInArrow: no per-row Python).

    Every partition gets a copy of the item factors ahead of its users' rows (factors and the
    list of rated movies; partitioned.py); the users are scored NUMPY_USER_CHUNK at a time
    (float32, as MLlib's blocked scoring; rated movies set to -inf and never returned).
    """
    from .partitioned import movies_then_users, numpy_partitions, user_partition

    parts = numpy_partitions(users.sparkSession)
    rated = seen.join(users, "userId", "left_semi").groupBy("userId").agg(F.collect_list("movieId").alias("seen"))
    user_rows = (model.userFactors.withColumnRenamed("id", "userId").join(users, "userId", "left_semi")
                 .join(rated, "userId", "left")
                 .select(user_partition(parts).alias("pid"), F.col("userId").alias("id"), "features",
                         F.coalesce("seen", F.array().cast("array<int>")).alias("seen")))
    item_rows = model.itemFactors.select("id", "features", F.lit(None).cast("array<int>").alias("seen"))
    rows = movies_then_users(item_rows, user_rows, parts)
    rank, chunk = model.rank, NUMPY_USER_CHUNK

    def score(batches):
        import numpy as np
        import pyarrow as pa

        for item_ids, v, b in _after_item_factors(batches, rank):
            if len(item_ids) == 0 or b.num_rows == 0:
                continue
            uid = b.column("id").to_numpy()
            u = _vectors(b.column("features"), rank)
            # Absolute offsets into the child values (a batch may be a slice of a larger array).
            seen_col = b.column("seen")
            offsets = seen_col.offsets.to_numpy()
            seen_ids = seen_col.values.to_numpy(zero_copy_only=False)
            k = min(n, len(item_ids))
            for lo in range(0, len(uid), chunk):
                hi = min(lo + chunk, len(uid))
                s = u[lo:hi] @ v  # users x items, float32
                a, z = offsets[lo], offsets[hi]
                if z > a:
                    rated_ids = seen_ids[a:z]
                    cols = np.minimum(np.searchsorted(item_ids, rated_ids), len(item_ids) - 1)
                    who = np.repeat(np.arange(hi - lo), np.diff(offsets[lo:hi + 1]))
                    hit = item_ids[cols] == rated_ids  # rated movies the model has factors for
                    s[who[hit], cols[hit]] = -np.inf
                top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(np.arange(k), (hi - lo, 1))
                best = np.take_along_axis(s, top, axis=1)
                keep = np.isfinite(best).ravel()
                yield pa.RecordBatch.from_arrays(
                    [pa.array(np.repeat(uid[lo:hi], k)[keep], pa.int32()),
                     pa.array(item_ids[top].ravel()[keep], pa.int32()),
                     pa.array(best.ravel()[keep], pa.float32())], names=["userId", "movieId", "s"])

    return rows.mapInArrow(score, "userId int, movieId int, s float")


def ndcg_users(seen: DataFrame, held: DataFrame) -> DataFrame:
    """userId, seen, held: one row per user with a held-out movie, with the movies they rated in
    `seen` (the model's fit data) and their held-out movies (distinct), as int arrays: the users
    unseen_ndcg scores. Build it once and cache it when several models are scored against it."""
    rated = seen.groupBy("userId").agg(F.collect_list(F.col("movieId").cast("int")).alias("seen"))
    labels = held.groupBy("userId").agg(F.array_distinct(F.collect_list(F.col("movieId").cast("int"))).alias("held"))
    return labels.join(rated, "userId", "left").select(
        F.col("userId").cast("int").alias("userId"), F.coalesce("seen", F.array().cast("array<int>")).alias("seen"),
        "held")


def unseen_ndcg(model: ALSModel, users: DataFrame, k: int) -> tuple[float, int]:
    """(mean nDCG@k, users): each of `users`' (ndcg_users) top-k movies by u.v among those they
    have not rated, judged against their held-out movies, in one Spark job.

    The same figure as ranking_metrics(recommend_unseen(model, seen, k), held, ks=(k,))'s ndcg@k
    (MLlib's definition; ties in score go to the lower movieId, as top_n_per_user orders them;
    a user the model has no factors for scores 0), which costs about a dozen jobs: a cached list
    table, then a join, two collects and an aggregation. Tuning scores every candidate setting
    this way: on ml-latest-small's validation fold (implicit ALS, six settings, one warm
    process) 1.6 s per setting against 3.3 s, medians, the same figure to 1e-15."""
    from .partitioned import movies_then_users, numpy_partitions, user_partition

    parts = numpy_partitions(users.sparkSession)
    user_rows = (users.join(model.userFactors.withColumnRenamed("id", "userId"), "userId", "left")
                 .select(user_partition(parts).alias("pid"), F.col("userId").alias("id"), "features", "seen", "held"))
    item_rows = model.itemFactors.select("id", "features", F.lit(None).cast("array<int>").alias("seen"),
                                         F.lit(None).cast("array<int>").alias("held"))
    rows = movies_then_users(item_rows, user_rows, parts)
    rank, chunk = model.rank, NUMPY_USER_CHUNK

    def score(batches):
        import numpy as np
        import pyarrow as pa

        # 1 / ln(i + 2) at 0-based position i, and its running sums: the ideal DCG of r relevant movies.
        disc = 1.0 / np.log(np.arange(k) + 2.0)
        ideal = np.concatenate([[0.0], np.cumsum(disc)])
        for item_ids, v, b in _after_item_factors(batches, rank):
            if b.num_rows == 0:
                continue
            uid = b.column("id").to_numpy()
            has = ~np.asarray(b.column("features").is_null())
            held_col, seen_col = b.column("held"), b.column("seen")
            h_off, h_ids = held_col.offsets.to_numpy(), held_col.values.to_numpy(zero_copy_only=False)
            s_off, s_ids = seen_col.offsets.to_numpy(), seen_col.values.to_numpy(zero_copy_only=False)
            out = np.zeros(len(uid))
            scored = np.flatnonzero(has)
            if len(scored) and len(item_ids):
                u = _vectors(b.column("features").take(pa.array(scored)), rank)
                for lo in range(0, len(scored), chunk):
                    rows_ = scored[lo:lo + chunk]
                    s = u[lo:lo + chunk] @ v  # users x items, float32
                    for j, r in enumerate(rows_):
                        rated = s_ids[s_off[r]:s_off[r + 1]]
                        cols = np.minimum(np.searchsorted(item_ids, rated), len(item_ids) - 1)
                        s[j, cols[item_ids[cols] == rated]] = -np.inf
                    kk = min(k, s.shape[1])
                    top = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < s.shape[1] else np.tile(np.arange(kk), (len(rows_), 1))
                    for j, r in enumerate(rows_):
                        row = s[j]
                        cut = row[top[j]].min()
                        # Every movie at or above the k-th score (ties at the cut included), then
                        # score descending and movieId ascending (columns are in movieId order).
                        cand = np.flatnonzero(row >= cut) if np.isfinite(cut) else top[j][np.isfinite(row[top[j]])]
                        cand = cand[np.lexsort((cand, -row[cand].astype(np.float64)))][:kk]
                        cand = cand[np.isfinite(row[cand])]
                        want = h_ids[h_off[r]:h_off[r + 1]]
                        rel = np.isin(item_ids[cand], want)
                        dcg = 0.0
                        for i in np.flatnonzero(rel):
                            dcg += disc[i]
                        out[r] = dcg / ideal[min(len(want), k)]
            yield pa.RecordBatch.from_arrays([pa.array(uid, pa.int32()), pa.array(out, pa.float64())],
                                             names=["userId", "ndcg"])

    got = rows.mapInArrow(score, "userId int, ndcg double").agg(F.avg("ndcg"), F.count(F.lit(1))).first()
    return float(got[0] or 0.0), int(got[1])


def _candidates(recs: DataFrame) -> DataFrame:
    return recs.select("userId", F.explode("recommendations").alias("rec")).select(
        "userId", F.col("rec.movieId").alias("movieId"), F.col("rec.rating").alias("s"))


def _score_all(model: ALSModel, users: DataFrame) -> DataFrame:
    """userId, movieId, s = u.v for the given users and every movie (a small users x catalog product)."""
    uf = model.userFactors.join(users.select(F.col("userId").alias("id")), "id").select(
        F.col("id").alias("userId"), F.col("features").alias("u"))
    itf = model.itemFactors.select(F.col("id").alias("movieId"), F.col("features").alias("v"))
    # Spelled out per dimension: generated code, where zip_with/aggregate lambdas are interpreted row by row.
    dot = sum(F.col("u")[i] * F.col("v")[i] for i in range(model.rank))
    return uf.crossJoin(F.broadcast(itf)).select("userId", "movieId", dot.alias("s"))


def recommend_unseen(model: ALSModel, train: DataFrame, n: int, extra: int = FIRST_PASS_EXTRA,
                     users: DataFrame | None = None) -> DataFrame:
    """Top-n movies per train user by the model's score, excluding movies rated in train. Exact.

    `users` (a userId column) limits the lists to those users: the same lists as for everyone,
    at the cost of those users only.

    With LISTING "numpy" (the default) every user is scored against the whole catalog in numpy
    (top_unseen_numpy), the rated movies masked before the top n is taken. With "mllib":
    recommendForAllUsers(n) would return seen movies, and asking everyone for n + max(seen)
    costs users x max(seen). So: one pass asks everyone for n + extra; a user is done when at
    least n of those are unseen (nothing unseen can rank above the candidates it was given) or
    when n + extra already covers n + everything they rated. The rest (heavy raters whose seen
    movies crowd the top) are scored against the whole catalog when they are few, else asked
    again grouped by how many movies they rated (powers of four), each group for n + its
    bound: at most 4x what each user needs, linear in the data.
    """
    seen = train.select("userId", "movieId")
    if users is not None:
        users = users.select("userId").distinct()
        seen = seen.join(users, "userId", "left_semi")
    if LISTING == "numpy":
        listed = seen.select("userId").distinct() if users is None else users
        out = top_n_per_user(top_unseen_numpy(model, listed, seen, n), n, score=F.col("s").cast("double")).cache()
        out.count()
        return out
    counts = seen.groupBy("userId").agg(F.count(F.lit(1)).alias("n_u"))
    k1 = n + extra
    asked = model.recommendForAllUsers(k1) if users is None else model.recommendForUserSubset(users, k1)
    first = _candidates(asked).join(seen, ["userId", "movieId"], "left_anti").cache()
    got = first.groupBy("userId").agg(F.count(F.lit(1)).alias("got"))
    rest = (counts.join(got, "userId", "left")
            .where((F.coalesce("got", F.lit(0)) < n) & (F.col("n_u") + n > k1))
            .withColumn("b", F.greatest(F.ceil(F.log2(F.col("n_u")) / 2), F.lit(3)).cast("int"))
            .select("userId", "n_u", "b").cache())
    groups = rest.groupBy("b").agg(F.count(F.lit(1)).alias("users")).collect()
    users = sum(g.users for g in groups)
    parts = [first.join(rest, "userId", "left_anti")]
    n_items = model.itemFactors.count() if users else 0
    if users and users * n_items <= DIRECT_MAX_PAIRS:
        # A few heavy raters: score them against every movie directly, one small job.
        parts.append(_score_all(model, rest.select("userId")).join(seen, ["userId", "movieId"], "left_anti"))
        passes = "direct scoring"
    else:
        passes = f"{len(groups)} bucketed pass(es)"
        for g in sorted(groups, key=lambda g: g.b):
            recs = model.recommendForUserSubset(rest.where(F.col("b") == g.b).select("userId"), n + (1 << (2 * g.b)))
            parts.append(_candidates(recs).join(seen, ["userId", "movieId"], "left_anti"))
    log.info("top-%d: %d users need more than %d candidates: %s", n, users, k1, passes if users else "none")
    cands = parts[0]
    for p in parts[1:]:
        cands = cands.unionByName(p)
    # Materialised (users x n rows, small) so the intermediate caches can go now; the caller
    # unpersists the result after writing it.
    out = top_n_per_user(cands, n, score=F.col("s").cast("double")).cache()
    out.count()
    first.unpersist()
    rest.unpersist()
    return out


def factors_frame(model: ALSModel, kind: str) -> DataFrame:
    key = "userId" if kind == "user" else "movieId"
    df = model.userFactors if kind == "user" else model.itemFactors
    return df.select(F.col("id").cast("int").alias(key), F.col("features"))
