"""Handcrafted features for the hybrid model, leak-free by construction.

`pair_features(fit, pairs, ...)` computes every feature of the (userId, movieId) `pairs` from the
ratings in `fit` only. The features stage calls it K times for the train part (out-of-fold:
fold f's rows get features from train minus fold f, so no row informs its own features) and
once for the test part (from the whole train part).

Features (the article's names where it has them):
- GAvg, UAvg, MAvg: global, user and movie mean rating; u_n, m_n counts; u_std, m_std spread.
- sur1..sur5: ratings of this movie by the 5 users most similar to this user (cosine over
  mean-centred rating vectors), missing filled with MAvg; n_sur counts the real ones.
- smr1..smr5: this user's ratings of the 5 movies most similar to this movie by rating-vector
  cosine among those the user rated, missing filled with UAvg; n_smr. csmr1..csmr5 / n_csmr:
  the same by content cosine (similar_movies).
- baseline: the bias baseline; als: residual ALS (baseline + u.v), the baseline where ALS does
  not know the user or movie.
- content: the content kNN prediction; content_sim: the summed content similarity of the
  movie to the user's rated movies (how close it is to the user's profile).
- genre_aff: the user's mean centred rating over movies sharing the movie's genres.
- knn_item, knn_user (+ _n counts): kNN-baseline predictions, the baseline plus the
  similarity-weighted residuals of the same neighbour ratings smr and sur draw from (every listed
  neighbour, shrunk by hybrid.knn_shrink).
- day_res, day_n: the user's mean baseline residual over their ratings of the pair's rating day
  (shrunk by hybrid.day_shrink) and their count; u_days, u_tdev: days since the user's first
  rating and from their mean rating time; m_age: years since the movie's release when rated.
- implicit: implicit ALS's score of the pair (which movies the user chose to rate).
- u_age, u_male: the user's age and gender where the layout has them (ml-100k's u.user, ml-1m's
  users.dat; -1 without); demo_res, occ_res: the movie's mean baseline residual among the
  user's gender and age band, and among the user's occupation (shrunk by hybrid.demo_shrink):
  how people like this user rate this movie beyond its average. The hybrid stage keeps the
  group only where it lowers its validation RMSE (hybrid.demographics, demographics_min_gain).
The GBT takes these less hybrid.exclude_features (hybrid.model_features).

Scale: neighbour similarities come from sparse co-rating self-joins, never a dense all-pairs
product. The self-join emits sum(n^2) pairs per join key, so each key's rows are capped
(`cap_per_movie` raters per movie for user-user, `cap_per_user` ratings per user for
movie-movie, a deterministic hash sample) and each entity keeps its top `neighbours` (with at
least `min_common` co-ratings). The dot products use the capped co-ratings, the norms the full
vectors; with caps above the largest count the similarities are exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from .config import AlsConfig, BaselineConfig, ContentConfig, HybridConfig, ImplicitAlsConfig
from .gather import neighbour_ratings
from .session import materialize
from .tables import CSMR, FEATURE_GROUPS, FEATURES, NB, SMR, SUR  # noqa: F401  (the table contract's columns)

DEMO = FEATURE_GROUPS["demo"]

log = logging.getLogger(__name__)


def hash_sample(cols: list[str], seed: int, frac: float):
    """A deterministic `frac` sample by a hash of `cols`: the same rows on every rerun and any
    partitioning (never an unpersisted rand())."""
    return (F.abs(F.xxhash64(*cols, F.lit(seed))) % 1_000_000) < frac * 1_000_000


def gbt_input(df: DataFrame) -> DataFrame:
    """`df` in one partition per core, rows in a fixed order (hash of the pair, then sorted):
    what MLlib's tree learners should cache.

    Always, not only when `df` has more partitions: MLlib draws each tree's subsample and its
    split candidates per partition, so the same rows in another order give another model. Before,
    rows that arrived in two partitions or fewer kept the order their query left them in, and
    refactors that changed no value moved the evaluation: ml-latest-small's random 80/20
    evaluate run, the same features table to the last digit, hybrid test RMSE 0.8161 at 8a6d94b
    and 0.8172 at 4cec6a0 (the numpy gather), and, the same candidate lists, the learned
    ranker's test nDCG@10 0.3349 at ee01cfb and 0.3215 at b268059 (the content lists ranked in
    one pass). Keyed on (userId, movieId), so reruns, and code that computes the same rows,
    train the same models on this many cores.

    One partition per core: the learners run a job per tree level with a task per partition,
    so on 2 cores 8 small partitions cost 8 task launches per level for 2 slots (the ranker's
    30-tree fit on ml-latest-small's 50,037 candidate rows took 23.7 s in 8 partitions and 11.0
    s in 2).

    Materialized (session.materialize: computed now, its plan cut to the result), not cached:
    every tree level is a job whose task binary serializes the learner's RDD chain back to the
    last shuffle, and a cached frame keeps the whole query (joins, the features table's scan)
    in that chain. The hybrid's 150-tree fit on ml-latest-small's stratified train part took
    about the same time as cached in benchmarks/gbt_lineage.py (the same model; no speed-up told
    apart from this machine's drift), with a short plan behind each level's tasks. Give it back with
    session.release."""
    from .session import materialize

    return materialize(gbt_layout(df))


def gbt_layout(df: DataFrame) -> DataFrame:
    """gbt_input's layout, not yet computed: one partition per core by hash of (userId, movieId),
    rows sorted within each."""
    cores = df.sparkSession.sparkContext.defaultParallelism
    return df.repartition(cores, "userId", "movieId").sortWithinPartitions("userId", "movieId")


def gbt_sample(seed: int, frac: float):
    """The hash sample of (userId, movieId) rows the GBT trains on when `hybrid.max_train_rows`
    caps it: the features stage computes only those."""
    return hash_sample(["userId", "movieId"], seed + 1, frac)


def oof_plan(n_train: int, cfg: HybridConfig) -> tuple[int, float]:
    """(folds to compute out-of-fold features for, fraction of their rows to keep).

    Each out-of-fold pass costs an ALS fit and two neighbour self-joins over most of train,
    whatever the number of rows it featurises, while the GBT trains on at most
    `max_train_rows` rows. So when the train part is large, only as many folds as supply
    `max_train_rows` rows are computed (hash folds are random, so one fold's rows are as good a
    sample as five folds'), and only the hash sample the GBT would keep. On ml-latest-small and
    1M ratings nothing changes (5 folds, all rows); on 25M ratings 1 pass instead of 5.
    `oof_folds` set in config wins over the automatic choice.
    """
    folds = cfg.folds
    if cfg.oof_folds:
        n = min(cfg.oof_folds, folds)
    elif cfg.max_train_rows and n_train > cfg.max_train_rows:
        n = min(folds, max(1, -(-cfg.max_train_rows * folds // max(n_train, 1))))
    else:
        n = folds
    rows = n_train * n / folds
    frac = cfg.max_train_rows / rows if cfg.max_train_rows and rows > cfg.max_train_rows else 1.0
    return n, frac


def _capped(ratings: DataFrame, key: str, cap: int | None, seed: int) -> DataFrame:
    """At most `cap` rows per `key` value, a deterministic hash sample (None: all rows)."""
    if not cap:
        return ratings
    w = Window.partitionBy(key).orderBy(F.xxhash64("userId", "movieId", F.lit(seed)))
    return ratings.withColumn("_o", F.row_number().over(w)).where(F.col("_o") <= cap).drop("_o")


def cosine_neighbours(centred: DataFrame, entity: str, via: str, neighbours: int, min_common: int,
                      cap: int | None, seed: int) -> DataFrame:
    """Top `neighbours` of each `entity` value by cosine of centred rating vectors.

    centred: userId, movieId, c (centred rating). Returns entity, nb, sim, rank.
    """
    norms = centred.groupBy(entity).agg(F.sqrt(F.sum(F.col("c") * F.col("c"))).alias("norm"))
    pruned = _capped(centred, via, cap, seed).select(entity, via, "c")
    a = pruned.select(F.col(entity).alias("e"), via, F.col("c").alias("ca"))
    b = pruned.select(F.col(entity).alias("nb"), via, F.col("c").alias("cb"))
    # Cosine is symmetric: each unordered pair is aggregated once (e < nb), which halves the
    # self-join's output and the shuffle behind it, then mirrored.
    dots = (a.join(b, via).where(F.col("e") < F.col("nb"))
            .groupBy("e", "nb").agg(F.sum(F.col("ca") * F.col("cb")).alias("dot"), F.count(F.lit(1)).alias("common"))
            .where(F.col("common") >= min_common))
    na = norms.select(F.col(entity).alias("e"), F.col("norm").alias("na"))
    nbn = norms.select(F.col(entity).alias("nb"), F.col("norm").alias("nn"))
    half = (dots.join(na, "e").join(nbn, "nb")
            .where((F.col("na") > 0) & (F.col("nn") > 0))
            .select("e", "nb", (F.col("dot") / (F.col("na") * F.col("nn"))).alias("sim"))
            .where(F.col("sim") > 0))
    # One scan emits both orders (a union would evaluate the self-join twice).
    both = F.explode(F.array(F.struct(F.col("e").alias("e"), F.col("nb").alias("nb")),
                             F.struct(F.col("nb").alias("e"), F.col("e").alias("nb"))))
    sims = half.select(both.alias("p"), "sim").select("p.e", "p.nb", "sim")
    w = Window.partitionBy("e").orderBy(F.col("sim").desc(), F.col("nb"))
    return (sims.withColumn("rank", F.row_number().over(w)).where(F.col("rank") <= neighbours)
            .select(F.col("e").alias(entity), "nb", "sim", "rank"))


def fold_neighbours(ratings: DataFrame, entity: str, via: str, outs: list[int | None], neighbours: int,
                    min_common: int, cap: int | None, seed: int, centred: bool = True,
                    cap_per_pass: bool = False, cooccur: tuple[list[int | None], int] | None = None,
                    hold: list | None = None) -> DataFrame:
    """cosine_neighbours for several out-of-fold passes from one self-join: p, entity, nb, sim, rank.

    ratings: userId, movieId, rating, fold. Pass p (an index into `outs`) uses the ratings
    outside fold outs[p] (None: all of them), each centred by `entity`'s mean over those same
    ratings, as cosine_neighbours would on that pass's ratings. The centred dot product of a pair
    expands into sums over its co-ratings, sum(ra rb) - mu_b sum(ra) - mu_a sum(rb) + n mu_a mu_b,
    and norms into sum(r^2) - sum(r)^2 / n, so one self-join gathers the sums of every pass at
    once (a co-rating counts for a pass when neither of its two ratings is in the left-out fold)
    instead of one self-join per pass. The cap samples each `via` value's rows once for all passes.
    `centred` False: the plain cosine of the rating vectors (dot sum(ra rb), norm sqrt(sum(r^2))),
    as cosine_neighbours over the ratings themselves. `cap_per_pass`: each pass samples its own
    `cap` rows per `via` value from the ratings it keeps (the same hash order), exactly as
    cosine_neighbours over that pass's ratings would; the join then carries the union of the
    passes' samples.

    `cooccur` (co_outs, m), with the shared cap: also, as passes len(outs) + j, the top m of each
    entity by the cosine of binary vectors (co-raters over sqrt(raters x raters), min_common 1)
    over the ratings outside fold co_outs[j], each pass sampling its own `cap` rows per `via`
    value: the rows fold_neighbours(ratings with rating 1, entity, via, co_outs, m, 1, cap, seed,
    centred=False, cap_per_pass=True) gives (the learned ranker's item-kNN tables), from this
    same self-join instead of one of their own. The join carries the union of the shared and
    the per-pass samples; each pass sums only the co-ratings of its own sample.

    `hold` (a list): the capped sample is cached (lazily) and put in `hold`; the caller fills it
    (one count, before the result is computed: not by the two sides' stages at once) and
    unpersists it once the result is computed. Both sides of the self-join then read it,
    where otherwise each side sorts all the ratings for the cap: Spark 4.2's adaptive execution
    does not reuse an exchange over cached data (SPARK-58767), and `ratings` is cached in the
    features stage. Measured (benchmarks/results/fold-neighbours-25M.md): the user lists 70.2 ->
    51.8-56.0 s at 25M ratings, 16.3 -> 18.8 s at 1M; the movie lists (a sample three times larger)
    158.0 -> 153.0 s and 21.8 -> 25.2 s, so compute_passes holds the user lists' only.
    """
    co = list(cooccur[0]) if cooccur else []
    if co and cap_per_pass:
        raise ValueError("fold_neighbours: cooccur goes with the shared cap (cap_per_pass False)")
    r = ratings.select(entity, via, F.col("rating").cast("double").alias("r"), "fold")

    def keep(out, *folds):
        """A rating (or co-rating) counts for the pass leaving out fold `out` when none of its
        ratings is in that fold."""
        cond = F.lit(True)
        if out is not None:
            for f in folds:
                cond = cond & (F.col(f) != out)
        return cond

    # Per entity and pass: count, mean and centred norm over the pass's ratings (all of them, uncapped).
    stats = r.groupBy(entity).agg(*[
        agg for i, out in enumerate(outs) for agg in (
            F.sum(F.when(keep(out, "fold"), 1).otherwise(0)).alias(f"n{i}"),
            F.sum(F.when(keep(out, "fold"), F.col("r")).otherwise(0.0)).alias(f"s{i}"),
            F.sum(F.when(keep(out, "fold"), F.col("r") * F.col("r")).otherwise(0.0)).alias(f"q{i}"))],
        *[F.sum(F.when(keep(out, "fold"), 1).otherwise(0)).alias(f"cn{j}") for j, out in enumerate(co)])
    per_pass = F.explode(F.array(*[F.struct(F.lit(i).alias("p"), F.col(f"n{i}").alias("n"), F.col(f"s{i}").alias("s"),
                                            F.col(f"q{i}").alias("q")) for i in range(len(outs))]))
    # Uncentred: a mean of 0 turns the centred sums below into the plain ones.
    mu = F.col("x.s") / F.col("x.n") if centred else F.lit(0.0)
    sq = F.col("x.q") - F.col("x.s") * F.col("x.s") / F.col("x.n") if centred else F.col("x.q")
    means = (stats.select(entity, per_pass.alias("x")).where(F.col("x.n") > 0)
             .select(entity, "x.p", mu.alias("mu"), F.sqrt(F.greatest(sq, F.lit(0.0))).alias("norm")))
    if co:
        # Binary vectors: no centring, and the squared norm is the rating count (a sum of ones).
        counts = F.explode(F.array(*[F.struct(F.lit(len(outs) + j).alias("p"), F.col(f"cn{j}").alias("n"))
                                     for j in range(len(co))]))
        means = means.unionByName(stats.select(entity, counts.alias("x")).where(F.col("x.n") > 0).select(
            entity, "x.p", F.lit(0.0).alias("mu"), F.sqrt(F.col("x.n").cast("double")).alias("norm")))
    own = bool(cap) and cap_per_pass
    if own:
        # In pass i's sample: kept by the pass, and among the first `cap` rows of the `via` value
        # the pass keeps, in _capped's hash order (a running count of the kept rows).
        w = (Window.partitionBy(via).orderBy(F.xxhash64("userId", "movieId", F.lit(seed)))
             .rowsBetween(Window.unboundedPreceding, Window.currentRow))
        ins = [keep(out, "fold") & (F.sum(keep(out, "fold").cast("int")).over(w) <= cap) for out in outs]
        anywhere = F.lit(False)
        for i in range(len(outs)):
            anywhere = anywhere | F.col(f"in{i}")
        pruned = r.select("*", *[c.alias(f"in{i}") for i, c in enumerate(ins)]).where(anywhere)
    elif co:
        # The shared sample (_capped's: the first `cap` rows of each `via` value in hash order)
        # and each co-occurrence pass's own (the first `cap` of the rows it keeps), from one sort.
        order = Window.partitionBy(via).orderBy(F.xxhash64("userId", "movieId", F.lit(seed)))
        upto = order.rowsBetween(Window.unboundedPreceding, Window.currentRow)
        shared = (F.row_number().over(order) <= cap) if cap else F.lit(True)
        ins = [keep(out, "fold") & ((F.sum(keep(out, "fold").cast("int")).over(upto) <= cap) if cap else F.lit(True))
               for out in co]
        anywhere = F.col("sh")
        for j in range(len(co)):
            anywhere = anywhere | F.col(f"cin{j}")
        pruned = r.select("*", shared.alias("sh"), *[c.alias(f"cin{j}") for j, c in enumerate(ins)]).where(anywhere)
    else:
        pruned = _capped(r, via, cap, seed)
    if hold is not None:
        pruned = pruned.cache()
        hold.append(pruned)
    flags = ([f"in{i}" for i in range(len(outs))] if own else []) + (["sh", *[f"cin{j}" for j in range(len(co))]]
                                                                     if co else [])
    a = pruned.select(F.col(entity).alias("e"), via, F.col("r").alias("ra"), F.col("fold").alias("fa"),
                      *[F.col(f).alias(f"a_{f}") for f in flags])
    b = pruned.select(F.col(entity).alias("nb"), via, F.col("r").alias("rb"), F.col("fold").alias("fb"),
                      *[F.col(f).alias(f"b_{f}") for f in flags])
    sums = []
    for i, out in enumerate(outs):
        k = (F.col(f"a_in{i}") & F.col(f"b_in{i}")) if own else keep(out, "fa", "fb")
        if co:  # the join also holds rows outside the shared sample
            k = k & F.col("a_sh") & F.col("b_sh")
        sums += [F.sum(F.when(k, 1).otherwise(0)).alias(f"c{i}"),
                 F.sum(F.when(k, F.col("ra") * F.col("rb")).otherwise(0.0)).alias(f"ab{i}"),
                 F.sum(F.when(k, F.col("ra")).otherwise(0.0)).alias(f"a{i}"),
                 F.sum(F.when(k, F.col("rb")).otherwise(0.0)).alias(f"b{i}")]
    sums += [F.sum(F.when(F.col(f"a_cin{j}") & F.col(f"b_cin{j}"), 1).otherwise(0)).alias(f"cc{j}")
             for j in range(len(co))]
    # Each unordered pair once (e < nb), mirrored after scoring, as in cosine_neighbours.
    pair_sums = a.join(b, via).where(F.col("e") < F.col("nb")).groupBy("e", "nb").agg(*sums)
    # A binary pass's sums of ratings and of their products are its co-rater count.
    per_pair = F.explode(F.array(*[F.struct(F.lit(i).alias("p"), F.col(f"c{i}").alias("c"), F.col(f"ab{i}").alias("ab"),
                                            F.col(f"a{i}").alias("a"), F.col(f"b{i}").alias("b"))
                                   for i in range(len(outs))],
                                 *[F.struct(F.lit(len(outs) + j).alias("p"), F.col(f"cc{j}").alias("c"),
                                            *[F.col(f"cc{j}").cast("double").alias(x) for x in ("ab", "a", "b")])
                                   for j in range(len(co))]))
    need = F.lit(max(1, min_common))
    if co:
        need = F.when(F.col("x.p") >= len(outs), F.lit(1)).otherwise(need)
    pairs = (pair_sums.select("e", "nb", per_pair.alias("x")).where(F.col("x.c") >= need)
             .select("e", "nb", "x.*"))
    ma = means.select(F.col(entity).alias("e"), "p", F.col("mu").alias("mua"), F.col("norm").alias("na"))
    mb = means.select(F.col(entity).alias("nb"), "p", F.col("mu").alias("mub"), F.col("norm").alias("nn"))
    dot = (F.col("ab") - F.col("mub") * F.col("a") - F.col("mua") * F.col("b")
           + F.col("c") * F.col("mua") * F.col("mub"))
    half = (pairs.join(ma, ["e", "p"]).join(mb, ["nb", "p"])
            .where((F.col("na") > 0) & (F.col("nn") > 0))
            .select("p", "e", "nb", (dot / (F.col("na") * F.col("nn"))).alias("sim"))
            .where(F.col("sim") > 0))
    both = F.explode(F.array(F.struct(F.col("e").alias("e"), F.col("nb").alias("nb")),
                             F.struct(F.col("nb").alias("e"), F.col("e").alias("nb"))))
    sims = half.select("p", both.alias("x"), "sim").select("p", "x.e", "x.nb", "sim")
    w = Window.partitionBy("p", "e").orderBy(F.col("sim").desc(), F.col("nb"))
    co_top = cooccur[1] if co else neighbours
    # A literal bound first (Spark then keeps each partition's top rows before the shuffle).
    top = sims.withColumn("rank", F.row_number().over(w)).where(F.col("rank") <= max(neighbours, co_top))
    if co_top != neighbours:
        top = top.where(F.col("rank") <= F.when(F.col("p") >= len(outs), F.lit(co_top)).otherwise(F.lit(neighbours)))
    return top.select("p", F.col("e").alias(entity), "nb", "sim", "rank")


# How pair_features reads the neighbours' ratings (sur, smr, csmr): "numpy", gathered per
# partition (gather.py); "join", the Spark joins it replaced (kept for the A/B benchmark).
GATHER = "numpy"


def _top_ratings(joined: DataFrame, prefix: str, n_col: str, knn: str, shrink: float) -> DataFrame:
    """joined: userId, movieId, sim, r, res -> userId, movieId, prefix1..5 (most similar first),
    n_col, and from the same rows the kNN-baseline residual `_knn` (sum of sim x residual over
    every listed neighbour, divided by their summed sim + `shrink`) with `knn`_n, their count."""
    top = F.slice(F.sort_array(F.collect_list(F.struct((-F.col("sim")).alias("k"), F.col("r"))), True), 1, NB)
    agg = joined.groupBy("userId", "movieId").agg(
        top.alias("_t"), (F.sum(F.col("sim") * F.col("res")) / (F.sum("sim") + F.lit(shrink))).alias(f"_{knn}"),
        F.count(F.lit(1)).alias(f"{knn}_n"))
    return agg.select("userId", "movieId", *[F.get(F.col("_t"), i)["r"].alias(f"{prefix}{i + 1}") for i in range(NB)],
                      F.size("_t").alias(n_col), f"_{knn}", f"{knn}_n")


def _content_ratings(joined: DataFrame, shrink: float) -> DataFrame:
    """joined: userId, movieId, sim, near, r, res -> userId, movieId, csmr1..5 (the near
    neighbours' ratings, most similar first), n_csmr, content_sim (their summed sim) and `_cres`,
    the content kNN residual over every listed neighbour."""
    near = F.col("near")
    top = F.slice(F.sort_array(F.filter(F.collect_list(F.struct(near.alias("n"), (-F.col("sim")).alias("k"), "r")),
                                        lambda x: x["n"]), True), 1, NB)
    cagg = joined.groupBy("userId", "movieId").agg(
        top.alias("_t"), F.sum(F.when(near, F.col("sim"))).alias("content_sim"),
        F.sum(F.col("sim") * F.col("res")).alias("_num"), F.sum("sim").alias("_den"))
    return cagg.select("userId", "movieId", *[F.get(F.col("_t"), i)["r"].alias(f"csmr{i + 1}") for i in range(NB)],
                       F.size("_t").alias("n_csmr"), "content_sim",
                       (F.col("_num") / (F.col("_den") + F.lit(shrink))).alias("_cres"))


def pair_features(fit: DataFrame, pairs: DataFrame, movies: DataFrame, sims: DataFrame | None,
                  base_cfg: BaselineConfig, als_cfg: AlsConfig, content_cfg: ContentConfig, cfg: HybridConfig,
                  seed: int, lo: float = 0.5, hi: float = 5.0, implicit_cfg: ImplicitAlsConfig | None = None,
                  user_nb: DataFrame | None = None, movie_nb: DataFrame | None = None, als_model=None,
                  mean=None, finish=None, users: DataFrame | None = None, bias=None) -> DataFrame:
    """Features of `pairs` (userId, movieId[, rating][, rated_at]) from the ratings in `fit` only.

    With `rated_at` in `fit`, the time features (day_res, day_n, u_days, u_tdev, m_age) are
    computed at each pair's `rated_at` (a pair without one, a served candidate: at the user's
    latest rating in `fit`, as if rated in their latest session); without, they are 0 (m_age -1).
    `implicit_cfg`: implicit ALS fitted on `fit` scores each pair (`implicit`; None: 0).

    `user_nb` / `movie_nb` (userId or movieId, nb, sim, rank): the neighbour lists of `fit`
    when the caller computed them already (fold_neighbours, for every pass at once);
    `als_model`: the residual ALS model of `fit` when one was fitted already (the als stage's,
    for the whole-train pass); `bias`: the bias baseline of `fit` (a BiasModel) when one was
    fitted already (the run's, context.bias_model, for the whole-train pass: it is left cached);
    `mean`: a per-row Column of the global mean, for a `fit` that
    holds several independent fits (batched_pass_features), instead of `fit`'s mean; `finish`: a
    DataFrame -> DataFrame step applied to the features before they are materialized (the
    batched passes' id decoding), so the result is materialized once. `users` (userId, gender,
    age, occupation): the demographic features (without: u_age, u_male -1, demo_res, occ_res 0)."""
    from .als import fit_explicit, predict_explicit
    from .baselines import fit_bias

    timed = "rated_at" in fit.columns
    fit = fit.select("userId", "movieId", "rating", *(["rated_at"] if timed else [])).cache()
    own_bias = bias is None
    bias = fit_bias(fit, base_cfg, lo, hi, mean) if own_bias else bias
    # The bias model's mu is fit's mean rating (global_mean): no job of its own.
    g = F.lit(bias.mu) if mean is None else mean
    ustats = fit.groupBy("userId").agg(F.avg("rating").alias("UAvg"), F.count(F.lit(1)).alias("u_n"),
                                       F.coalesce(F.stddev("rating"), F.lit(0.0)).alias("u_std")).cache()
    mstats = fit.groupBy("movieId").agg(F.avg("rating").alias("MAvg"), F.count(F.lit(1)).alias("m_n"),
                                        F.coalesce(F.stddev("rating"), F.lit(0.0)).alias("m_std")).cache()
    keys = pairs.select("userId", "movieId")
    # Every rating of `fit` with its residual from the bias baseline: the kNN baselines (user
    # and movie neighbours, content neighbours) and the rating day average these.
    resid = bias.predict(fit).select("userId", "movieId", *(["rated_at"] if timed else []), F.col("rating").alias("r"),
                                     (F.col("rating") - F.col("baseline")).alias("res")).cache()

    # Neighbour ratings. User-user: centred by the user's mean; movie-movie: by the movie's mean
    # (adjusted per item, so a generous rater does not make every movie look alike).
    cu = fit.join(ustats.select("userId", "UAvg"), "userId").select(
        "userId", "movieId", "rating", (F.col("rating") - F.col("UAvg")).alias("c"))
    unb = user_nb if user_nb is not None else cosine_neighbours(
        cu, "userId", "movieId", cfg.neighbours, cfg.min_common, cfg.cap_per_movie, seed)
    if GATHER == "numpy":
        sur = neighbour_ratings(keys, resid, [unb.select("userId", "nb", "sim")], "movieId", ["sur"],
                                [cfg.knn_shrink]).select(
            "userId", "movieId", *SUR, "n_sur", F.col("sur_knn").alias("_knn_user"),
            F.col("sur_cnt").alias("knn_user_n"))
    else:
        sur = _top_ratings(
            keys.join(unb, "userId").join(resid.select(F.col("userId").alias("nb"), "movieId", "r", "res"),
                                          ["nb", "movieId"]),
            "sur", "n_sur", "knn_user", cfg.knn_shrink)
    cm = fit.join(mstats.select("movieId", "MAvg"), "movieId").select(
        "userId", "movieId", (F.col("rating") - F.col("MAvg")).alias("c"))
    mnb = movie_nb if movie_nb is not None else cosine_neighbours(
        cm, "movieId", "userId", cfg.neighbours, cfg.min_common, cfg.cap_per_user, seed)
    cnb = None if sims is None else sims.select(
        "movieId", F.col("similar_movieId").alias("nb"), F.col("similarity").alias("sim"),
        (F.col("rank") <= content_cfg.user_neighbours).alias("near"))
    if GATHER == "numpy":
        # smr and csmr from one pass over each user's ratings: one row per pair with both.
        names = ["smr"] + (["csmr"] if cnb is not None else [])
        item = neighbour_ratings(keys, resid, [mnb.select("movieId", "nb", "sim")] + ([cnb] if cnb is not None else []),
                                 "userId", names, [cfg.knn_shrink, content_cfg.predict_shrink])
        smr = item.select("userId", "movieId", *SMR, "n_smr", F.col("smr_knn").alias("_knn_item"),
                          F.col("smr_cnt").alias("knn_item_n"),
                          *([*CSMR, "n_csmr", F.col("csmr_near").alias("content_sim"), F.col("csmr_knn").alias("_cres")]
                            if cnb is not None else []))
    else:
        smr = _top_ratings(
            keys.join(mnb, "movieId").join(resid.select("userId", F.col("movieId").alias("nb"), "r", "res"),
                                           ["userId", "nb"]),
            "smr", "n_smr", "knn_item", cfg.knn_shrink)

    model = als_model if als_model is not None else fit_explicit(fit, bias, als_cfg, seed)
    als = predict_explicit(model, bias, keys, True, lo, hi).select("userId", "movieId", F.col("prediction").alias("als"))
    feats = (bias.predict(keys).withColumnRenamed("baseline", "baseline")
             .join(als, ["userId", "movieId"], "left").join(ustats, "userId", "left").join(mstats, "movieId", "left")
             .join(sur, ["userId", "movieId"], "left").join(smr, ["userId", "movieId"], "left"))

    # The pairs' content neighbours the user rated feed three features: csmr (nearest
    # user_neighbours, ratings), content_sim (their summed similarity) and the content kNN
    # prediction (every listed neighbour, residuals).
    if cnb is not None and GATHER != "numpy":  # (the numpy path's smr rows carry them already)
        cfeat = _content_ratings(keys.join(cnb, "movieId").join(
            resid.select("userId", F.col("movieId").alias("nb"), "r", "res"), ["userId", "nb"]),
            content_cfg.predict_shrink)
        feats = feats.join(cfeat, ["userId", "movieId"], "left")
    if cnb is not None:
        feats = feats.withColumn(
            "content", F.least(F.greatest(F.col("baseline") + F.coalesce("_cres", F.lit(0.0)), F.lit(lo)), F.lit(hi))
        ).drop("_cres")
    else:
        feats = feats.select("*", *[F.lit(None).cast("double").alias(c) for c in CSMR + ["content", "content_sim"]],
                             F.lit(0).alias("n_csmr"))

    # Genre affinity: the user's mean centred rating per genre, averaged over the movie's genres.
    mg = movies.select("movieId", F.explode("genres").alias("genre"))
    ug = (cu.join(mg, "movieId").groupBy("userId", "genre").agg(F.avg("c").alias("aff")))
    gaff = keys.join(mg, "movieId").join(ug, ["userId", "genre"]).groupBy("userId", "movieId").agg(
        F.avg("aff").alias("genre_aff"))
    feats = feats.join(gaff, ["userId", "movieId"], "left")

    # Time (Koren's temporal effects, as features): the user's mean residual on the pair's
    # rating day over their other ratings that day (a mood or a session's scale) and how many
    # there are; days since the user's first rating and from their mean rating time (drift);
    # the movie's age in years when rated.
    if timed:
        ts = F.unix_timestamp("rated_at")
        day = resid.groupBy("userId", F.to_date("rated_at").alias("_d")).agg(F.sum("res").alias("_ds"),
                                                                             F.count(F.lit(1)).alias("day_n"))
        ut = fit.groupBy("userId").agg(F.min(ts).alias("_t0"), F.avg(ts).alias("_tm"), F.max("rated_at").alias("_tl"))
        at = F.col("rated_at") if "rated_at" in pairs.columns else F.lit(None).cast("timestamp")
        year = F.col("year") if "year" in movies.columns else F.lit(None).cast("int")
        tfeat = (pairs.select("userId", "movieId", at.alias("_at")).join(ut, "userId", "left")
                 .withColumn("_t", F.coalesce("_at", "_tl")).withColumn("_d", F.to_date("_t"))
                 .join(day, ["userId", "_d"], "left").join(movies.select("movieId", year.alias("_y")), "movieId", "left")
                 .select("userId", "movieId", (F.col("_ds") / (F.col("day_n") + F.lit(cfg.day_shrink))).alias("day_res"),
                         "day_n", ((F.unix_timestamp("_t") - F.col("_t0")) / 86400.0).alias("u_days"),
                         ((F.unix_timestamp("_t") - F.col("_tm")) / 86400.0).alias("u_tdev"),
                         (F.year("_t") - F.col("_y")).cast("double").alias("m_age")))
        feats = feats.join(tfeat, ["userId", "movieId"], "left")
    else:
        feats = feats.select("*", *[F.lit(None).cast("double").alias(c) for c in ("day_res", "day_n", "u_days",
                                                                                   "u_tdev", "m_age")])
    # Which movies the user chose to rate (SVD++'s implicit feedback): implicit ALS's score of
    # the pair, fitted on `fit`'s ratings only.
    if implicit_cfg is not None:
        from .als import fit_implicit
        imodel = fit_implicit(fit, implicit_cfg, seed)
        feats = feats.join(imodel.transform(keys).select("userId", "movieId", F.col("prediction").alias("implicit")),
                           ["userId", "movieId"], "left")
    else:
        feats = feats.withColumn("implicit", F.lit(None).cast("double"))

    if users is not None:
        feats = feats.join(demographic_features(resid, keys, users, cfg.demo_shrink), ["userId", "movieId"], "left")
    else:
        feats = feats.select("*", *[F.lit(None).cast("double").alias(c) for c in DEMO])

    # The article's fills: a missing neighbour's rating is the movie's (sur) or the user's (smr)
    # average; unknown users or movies get the global average.
    uavg = F.coalesce(F.col("UAvg"), g)
    mavg = F.coalesce(F.col("MAvg"), g)
    out = feats.select(
        "userId", "movieId",
        g.alias("GAvg"), uavg.alias("UAvg"), mavg.alias("MAvg"),
        *[F.coalesce(c, F.lit(0)).cast("double").alias(n) for c, n in (("u_n", "u_n"), ("m_n", "m_n"),
                                                                      ("u_std", "u_std"), ("m_std", "m_std"))],
        *[F.coalesce(F.col(c), mavg).alias(c) for c in SUR], F.coalesce("n_sur", F.lit(0)).cast("double").alias("n_sur"),
        *[F.coalesce(F.col(c), uavg).alias(c) for c in SMR], F.coalesce("n_smr", F.lit(0)).cast("double").alias("n_smr"),
        *[F.coalesce(F.col(c), uavg).alias(c) for c in CSMR],
        F.coalesce("n_csmr", F.lit(0)).cast("double").alias("n_csmr"),
        "baseline", F.coalesce("als", "baseline").alias("als"), F.coalesce("content", "baseline").alias("content"),
        F.coalesce("content_sim", F.lit(0.0)).alias("content_sim"), F.coalesce("genre_aff", F.lit(0.0)).alias("genre_aff"),
        F.least(F.greatest(F.col("baseline") + F.coalesce("_knn_item", F.lit(0.0)), F.lit(lo)), F.lit(hi)).alias("knn_item"),
        F.coalesce("knn_item_n", F.lit(0)).cast("double").alias("knn_item_n"),
        F.least(F.greatest(F.col("baseline") + F.coalesce("_knn_user", F.lit(0.0)), F.lit(lo)), F.lit(hi)).alias("knn_user"),
        F.coalesce("knn_user_n", F.lit(0)).cast("double").alias("knn_user_n"),
        *[F.coalesce(F.col(c).cast("double"), F.lit(0.0)).alias(c) for c in ("day_res", "day_n", "u_days", "u_tdev")],
        F.coalesce("m_age", F.lit(-1.0)).alias("m_age"),
        # MLlib scores an unknown user or movie NaN (coldStartStrategy nan).
        F.nanvl(F.coalesce("implicit", F.lit(0.0)), F.lit(0.0)).cast("double").alias("implicit"),
        *[F.coalesce(F.col(c).cast("double"), F.lit(-1.0 if c in ("u_age", "u_male") else 0.0)).alias(c) for c in DEMO],
    )
    label = pairs.select("userId", "movieId", F.col("rating").alias("label")) if "rating" in pairs.columns else None
    if label is not None:
        out = out.join(label, ["userId", "movieId"])
    result = materialize(finish(out) if finish is not None else out)
    for df in (fit, ustats, mstats, resid):
        df.unpersist()
    if own_bias:
        bias.unpersist()
    return result


def age_band(age):
    """ml-1m's age groups (1: under 18, 18: 18-24, 25, 35, 45, 50, 56: 56+), which ml-1m's
    users.dat already holds and ml-100k's exact ages fall into."""
    return (F.when(age < 18, 1).when(age < 25, 18).when(age < 35, 25).when(age < 45, 35).when(age < 50, 45)
            .when(age < 56, 50).when(age.isNotNull(), 56))


def demographic_features(resid: DataFrame, keys: DataFrame, users: DataFrame, shrink: float) -> DataFrame:
    """userId, movieId, u_age, u_male, demo_res, occ_res of `keys` from the residuals `resid`
    (userId, movieId, res) of the fit ratings: the movie's summed residual over the fit ratings
    of users of the pair's user's gender and age band (occupation), over their count + shrink.
    A pair's own rating is never in `resid` (out-of-fold), so it never informs its features."""
    gender = F.upper(F.trim("gender"))
    u = users.select("userId", F.col("age").cast("double").alias("u_age"),
                     F.when(gender == "M", 1.0).when(gender == "F", 0.0).alias("u_male"),
                     age_band(F.col("age")).alias("_band"), F.lower(F.trim("occupation")).alias("_occ"))
    r = resid.select("userId", "movieId", "res").join(u, "userId")
    by_demo = r.groupBy("movieId", "u_male", "_band").agg(F.sum("res").alias("_ds"), F.count(F.lit(1)).alias("_dn"))
    by_occ = r.groupBy("movieId", "_occ").agg(F.sum("res").alias("_os"), F.count(F.lit(1)).alias("_on"))
    return (keys.join(u, "userId", "left").join(by_demo, ["movieId", "u_male", "_band"], "left")
            .join(by_occ, ["movieId", "_occ"], "left")
            .select("userId", "movieId", "u_age", "u_male",
                    (F.col("_ds") / (F.col("_dn") + F.lit(shrink))).alias("demo_res"),
                    (F.col("_os") / (F.col("_on") + F.lit(shrink))).alias("occ_res")))


@dataclass
class FeaturePass:
    """One pair_features call: features of `keys` from the ratings in `fit`; `labels` says which
    of them land in the table as what: (split name, rows with their rating, fold; -1: not a
    train fold)."""
    what: str
    fit: DataFrame
    keys: DataFrame
    labels: list
    # The train fold `fit` leaves out (None: the whole train part).
    fold_out: int | None = None


def with_folds(train: DataFrame, seed: int, folds: int) -> DataFrame:
    """train with `fold`: its hash fold, the same for a rating on every rerun."""
    return train.withColumn("fold", F.pmod(F.xxhash64("userId", "movieId", F.lit(seed)), F.lit(folds)).cast("int"))


def plan_passes(train: DataFrame, test: DataFrame, cands: DataFrame | None, h: HybridConfig, seed: int,
                n_train: int, whole_fit: bool = False, test_rows: bool = True) -> tuple[list[FeaturePass], dict]:
    """The features stage's passes, and figures for its log: out-of-fold passes over train's hash
    folds (fold f's rows from the other folds), and test rows plus recommendation candidates
    (`cands`: userId, movieId) from the whole train part.

    `test_features` 'fold' lets the test rows ride along with fold 0's pass (the same ALS fit and
    neighbour lists: one pass fewer, train and test features from fits of the same size); 'auto'
    picks it when one out-of-fold pass is computed on a sample. `whole_fit` (a serve run) forces
    a pass from the whole train part: served pairs are featurised from every rating, never a fold.
    `test_rows` False (a serve run: no test part): no test rows; without `cands` either, the plan
    is the out-of-fold passes alone.
    """
    folded = with_folds(train, seed, h.folds)
    # The pairs' rating times ride along (the time features); a candidate has none.
    kcols = ["userId", "movieId"] + (["rated_at"] if "rated_at" in train.columns else [])
    n_oof, frac = oof_plan(n_train, h)
    keep = F.lit(True) if frac >= 1.0 else gbt_sample(seed, frac)
    if frac < 1.0:
        log.info("features: out-of-fold rows of %d fold(s), a %.1f%% hash sample of them (hybrid.max_train_rows=%d)",
                 n_oof, 100 * frac, h.max_train_rows)
    test_mode = h.test_features
    if test_mode == "auto":
        test_mode = "fold" if n_oof == 1 and frac < 1.0 else "full"
    if whole_fit:
        test_mode = "full"
    names = (("test",) if test_rows else ()) + (("candidate",) if cands is not None else ())
    if not names:
        test_mode = "none"
    pairs = test.withColumn("split", F.lit("test"))
    if cands is not None:
        pairs = pairs.unionByName(cands.select("userId", "movieId", F.lit(None).cast("double").alias("rating"),
                                               F.lit("candidate").alias("split"),
                                               *[F.lit(None).cast("timestamp").alias(c) for c in kcols[2:]]))
    passes = []
    for f in range(n_oof):
        rows = folded.where((F.col("fold") == f) & keep)
        shared = f == 0 and test_mode == "fold"
        keys = rows.select(*kcols)
        if shared:
            keys = keys.unionByName(pairs.select(*kcols)).distinct()
        labels = [("train", rows, f)] + ([(n, pairs.where(F.col("split") == n), -1) for n in names] if shared else [])
        what = f"fold {f + 1}/{n_oof} (train rows of this fold{' and the test rows' if shared else ''}, " \
               f"from the other {h.folds - 1} folds)"
        passes.append(FeaturePass(what, folded.where(F.col("fold") != f), keys, labels, f))
    if test_mode == "full":
        what = " and ".join(("test rows",) * test_rows + ("candidates",) * (cands is not None))
        passes.append(FeaturePass(f"{what}, from the whole train part",
                                  train, pairs.select(*kcols).distinct(),
                                  [(n, pairs.where(F.col("split") == n), -1) for n in names]))
    return passes, {"oof_folds": n_oof, "oof_fraction": round(frac, 4), "test_features": test_mode}


# The column of a batched result that names each row's pass.
PASS = "_pass"


def batched_pass_features(folded: DataFrame, passes: list[FeaturePass], args: tuple, user_nb: DataFrame,
                          movie_nb: DataFrame, users: DataFrame | None = None) -> DataFrame | None:
    """pair_features of several passes in one call: features of every pass's keys (userId,
    movieId, features...), each row from its own pass's ratings only (the ratings outside its
    fold_out; all of them for a pass without one). The passes' keys must be distinct pairs (a
    train row is in one fold; test and candidate pairs are not train's). None when the ids are
    too large to encode (the caller then runs the passes one by one).

    Each pass's ratings get ids of their own, id x P + pass (P passes), so the passes share no
    user and no movie: every statistic, bias, neighbour rating and the residual ALS (one MLlib
    fit whose factor blocks never meet: the same model as a fit per pass, up to the random
    start) stays within its pass, while each Spark job serves all P passes. On ml-latest-small
    the five passes took 19-20 s each one by one, mostly the fixed cost of their ~100 small jobs.
    `user_nb` / `movie_nb`: fold_neighbours' lists (p, id, nb, sim, rank), p the pass's index
    in `passes`; the global mean is each pass's own (a per-row lookup by the encoded id).
    """
    movies, sims = args[0], args[1]
    n = len(passes)
    outs = [q.fold_out for q in passes]
    top = folded.agg(F.max("userId"), F.max("movieId")).first()
    if top[0] is None or max(top) * n + n >= 2**31:
        return None
    spark = folded.sparkSession
    pid = spark.createDataFrame([(i, o) for i, o in enumerate(outs)], "p int, out int")

    def enc(col: str):
        return (F.col(col).cast("long") * n + F.col("p")).cast("int")

    # A rating is in every pass that does not leave its fold out (the whole-train pass: all).
    times = ["rated_at"] if "rated_at" in folded.columns else []
    fit = folded.join(F.broadcast(pid), F.col("out").isNull() | (F.col("fold") != F.col("out"))).select(
        enc("userId").alias("userId"), enc("movieId").alias("movieId"), "rating", *times)
    keys = None
    for i, q in enumerate(passes):
        k = q.keys.withColumn("p", F.lit(i)).select(enc("userId").alias("userId"), enc("movieId").alias("movieId"),
                                                    *[c for c in times if c in q.keys.columns])
        keys = k if keys is None else keys.unionByName(k)
    # One row per pass: each pass's own global mean, looked up per row from the encoded id.
    by_pass = {r.p: r.mu for r in fit.groupBy(F.pmod("userId", F.lit(n)).alias("p"))
               .agg(F.avg("rating").alias("mu")).collect()}
    mean = F.element_at(F.array(*[F.lit(float(by_pass.get(i, float("nan")))) for i in range(n)]),
                        (F.pmod("userId", F.lit(n)) + 1).cast("int"))
    e_movies = movies.crossJoin(F.broadcast(pid.select("p"))).select(
        enc("movieId").alias("movieId"), "genres", *[c for c in ("year",) if c in movies.columns])
    e_sims = None if sims is None else sims.crossJoin(F.broadcast(pid.select("p"))).select(
        enc("movieId").alias("movieId"), enc("similar_movieId").alias("similar_movieId"), "similarity", "rank")
    e_users = None if users is None else users.crossJoin(F.broadcast(pid.select("p"))).select(
        enc("userId").alias("userId"), "gender", "age", "occupation")
    e_unb = user_nb.select(enc("userId").alias("userId"), enc("nb").alias("nb"), "sim", "rank")
    e_mnb = movie_nb.select(enc("movieId").alias("movieId"), enc("nb").alias("nb"), "sim", "rank")
    def decode(feats: DataFrame) -> DataFrame:
        """Back to the real ids, with the pass each row belongs to."""
        return feats.select(F.floor(F.col("userId") / n).cast("int").alias("userId"),
                            F.floor(F.col("movieId") / n).cast("int").alias("movieId"),
                            F.pmod("userId", F.lit(n)).cast("int").alias(PASS),
                            *[c for c in feats.columns if c not in ("userId", "movieId")])

    # Decoded before pair_features materializes its result: one copy, not two.
    return pair_features(fit, keys, e_movies, e_sims, *args[2:], user_nb=e_unb, movie_nb=e_mnb, mean=mean,
                         finish=decode, users=e_users)


def compute_passes(spark, passes: list[FeaturePass], args: tuple, threads: int = 1,
                   folded: DataFrame | None = None, whole_als=None, whole_bias=None, batched: bool = True,
                   users: DataFrame | None = None, whole_nb: dict | None = None,
                   ranker_nb: dict | None = None) -> list[DataFrame]:
    """pair_features of every pass (each result materialized: `release` them once
    written); `threads` > 1 runs passes side by side (measured slower on 2 cores, see config).

    `folded` (train with `fold`, see with_folds): with two passes or more, the passes' user and
    movie neighbour lists come from one self-join each over it (fold_neighbours) instead of two
    per pass.
    `whole_als`: the residual ALS model of the whole train part, for the pass fitted on it;
    `whole_bias`: its bias baseline (a BiasModel), likewise.
    `batched` (with `folded` and several out-of-fold passes): those passes in one
    batched_pass_features call. `users`: the demographics (the `users` table), if any.
    `whole_nb` (a dict, with `folded`): the user and movie neighbour lists of the whole train part
    (userId or movieId, nb, sim, rank), as cosine_neighbours over train gives them, are put in it
    materialized ("user", "movie": `release` them), from the same self-join as the passes' lists
    (one more pass's sums in it), for featurising pairs from the whole train part later (a serve
    run's served pairs, once the ranker has chosen them).
    `ranker_nb` (a dict, with `folded`): the learned ranker's item-kNN tables (p, movieId, nb,
    sim as ranker.ranker_neighbours gives them: p 0 over train outside fold 0, p 1 over all of
    train) are put in it materialized ("table": `release` it), from the movie lists' self-join
    (fold_neighbours' `cooccur`) instead of a self-join of their own in the recommend stage;
    nothing is put when the passes' lists come from no shared self-join (fewer than two).
    """
    nbs: list = []
    held: list = []  # the user lists' capped sample, cached until the lists are computed
    outs = [p.fold_out for p in passes]
    whole = None
    if whole_nb is not None and folded is not None:
        if None not in outs:
            outs.append(None)
        whole = outs.index(None)
    # One self-join over all of train instead of one over each pass's share of it: a win from
    # two passes on (a single pass, as on 25M ratings, would join more rows than it needs).
    if folded is not None and len(outs) > 1:
        h, seed = args[5], args[6]
        log.info("features: neighbour lists of %d passes from one self-join each%s", len(outs),
                 " (the movies' also gives the ranker's item-kNN tables)" if ranker_nb is not None else "")
        cooccur = ([0, None], h.ranker_knn_neighbours) if ranker_nb is not None else None
        nbs = [fold_neighbours(folded, "userId", "movieId", outs, h.neighbours, h.min_common, h.cap_per_movie,
                               seed, hold=held).cache(),
               fold_neighbours(folded, "movieId", "userId", outs, h.neighbours, h.min_common, h.cap_per_user,
                               seed, cooccur=cooccur).cache()]
        for df in held:
            df.count()  # the held sample filled by one job, before both sides of its self-join read it
        if whole is not None:
            whole_nb.update(user=materialize(nbs[0].where(F.col("p") == whole).drop("p")),
                            movie=materialize(nbs[1].where(F.col("p") == whole).drop("p")))
        if ranker_nb is not None:
            ranker_nb["table"] = materialize(nbs[1].where(F.col("p") >= len(outs)).select(
                (F.col("p") - len(outs)).cast("int").alias("p"), "movieId", "nb", "sim"))

    def run_pass(i: int) -> DataFrame:
        p = passes[i]
        log.info("features: %s", p.what)
        own = {"als_model": whole_als} if p.fold_out is None and whole_als is not None else {}
        if p.fold_out is None and whole_bias is not None:
            own["bias"] = whole_bias
        own["users"] = users
        if nbs:
            own.update(user_nb=nbs[0].where(F.col("p") == i).drop("p"),
                       movie_nb=nbs[1].where(F.col("p") == i).drop("p"))
        return pair_features(p.fit, p.keys, *args, **own)

    # The out-of-fold passes (the first ones) in one batched call when there are several (data
    # small enough for all folds, where each pass's ~100 small jobs cost more than its
    # arithmetic). The whole-train pass stays apart: it takes the als stage's model, and
    # batched with the others it measured slower (ml-latest-small: 133 s for the six passes
    # against 70 + 47 s). A one-fold plan (25M ratings) runs pass after pass.
    oof = [i for i, p in enumerate(passes) if p.fold_out is not None]
    batch = (batched and nbs and len(oof) > 1 and oof == list(range(len(oof)))
             and all(len(passes[i].labels) == 1 for i in oof))
    try:
        if batch:
            log.info("features: %d out-of-fold passes in one batch (each pass's ids kept apart)", len(oof))
            got = batched_pass_features(folded, [passes[i] for i in oof], args,
                                        nbs[0].where(F.col("p") < len(oof)), nbs[1].where(F.col("p") < len(oof)),
                                        users)
            if got is not None:
                # The batch holds every out-of-fold pass's rows; labelled_rows takes each pass's by `_pass`.
                return [got] * len(oof) + [run_pass(i) for i in range(len(oof), len(passes))]
        if threads <= 1:
            return [run_pass(i) for i in range(len(passes))]
        from concurrent.futures import ThreadPoolExecutor

        from pyspark import inheritable_thread_target

        # inheritable_thread_target: the pass's jobs keep the stage's job group (the scale harness
        # and the kill test attribute jobs by it).
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="features") as pool:
            return list(pool.map(inheritable_thread_target(spark)(run_pass), range(len(passes))))
    finally:
        for df in nbs + held:  # every pass's result is materialized by now
            df.unpersist()


def labelled_rows(passes: list[FeaturePass], results: list[DataFrame]) -> DataFrame:
    """The features table's rows: each pass's features joined to the rows it labels, with their
    rating as `label`, their split and fold. A batched result (column `_pass`) gives each pass
    its own rows."""
    frames = []
    for i, (p, feats) in enumerate(zip(passes, results)):
        if PASS in feats.columns:
            feats = feats.where(F.col(PASS) == i).drop(PASS)
        for split, rows, f in p.labels:
            frames.append(feats.join(rows.select("userId", "movieId", F.col("rating").alias("label")),
                                     ["userId", "movieId"])
                          .withColumn("split", F.lit(split)).withColumn("fold", F.lit(f)))
    df = frames[0]
    for p in frames[1:]:
        df = df.unionByName(p)
    return df
