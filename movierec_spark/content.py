"""Content-based similarity: movie attribute vectors and their top-K cosine neighbours.

A movie's vector concatenates weighted, separately L2-normalised blocks (genres multi-hot; user
tags as TF-IDF over normalised tag text; tag-genome relevance where the dataset has it; release
decade one-hot; title words as TF-IDF, see `title_tokens`) and is L2-normalised again, so a dot
product is the cosine. The vectors are MLlib feature transformers' output, sparse throughout: no
Python on the rows. Equal similarities are ordered by the neighbour's number of ratings (more
first), then by id: genres and decade alone give many movies identical vectors, and among
those the one people watch is the better answer.

Neighbours:
- `exact_neighbours`: every movie against every movie, block pairs multiplied in numpy inside
  `mapInArrow` (no per-row Python): exact, cost movies^2 x dimensions, so it is the
  small-catalog mode and the yardstick for the approximation.
- `lsh_neighbours`: random-hyperplane LSH with banding over the unit vectors for candidates,
  each bucket's movies scored exactly in numpy as exact_neighbours scores a block pair, top-K
  per movie.

A movie with no genres, no tags, no genome and no year has the zero vector: cosine is undefined,
so it gets no neighbours and appears in nobody's list (documented in README).
"""

from __future__ import annotations

import logging

from pyspark.ml.feature import IDF, CountVectorizer, Normalizer, VectorAssembler
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from .config import ContentConfig

log = logging.getLogger(__name__)


def normalize_tag(col: str = "tag"):
    """Lower case, trimmed, inner whitespace collapsed: 'Pixar ', 'pixar' and 'PIXAR' are one tag."""
    return F.regexp_replace(F.lower(F.trim(F.col(col))), r"\s+", " ")


# Words that mark a sequel, not a franchise: "Part II", "Episode V", "Vol. 2", "3" all drop out,
# so "Godfather: Part II" is "godfather" like "Godfather, The". Numbers of three or more digits
# stay ("2001", "1984" are titles); "13th" stays too.
SEQUEL_MARKERS = ["part", "episode", "chapter", "vol", "volume", "ii", "iii", "iv", "v", "vi", "vii", "viii",
                  "ix", "x", "xi", "xii", "xiii", "aka"]


def title_tokens(title: str = "title"):
    """A title's franchise words: lower case, the trailing "(1995)" dropped, split on anything
    that is not a letter or digit, one-letter words, sequel markers (SEQUEL_MARKERS, numbers of
    one or two digits) and English stop words dropped, a plural "s" stripped ("Aliens" is
    "alien"), plus each pair of neighbouring words. MovieLens's "Empire Strikes Back, The" and
    alternative titles in parentheses need no special case: their words are words. TF-IDF then
    weighs a franchise's rare name far above common words."""
    from pyspark.ml.feature import StopWordsRemover

    stop = StopWordsRemover.loadDefaultStopWords("english")
    t = F.regexp_replace(F.lower(F.col(title)), r"\s*\(\d{4}\)\s*$", "")
    words = F.filter(F.split(t, r"[^\p{L}\p{N}]+"),
                     lambda w: (F.length(w) > 1) & ~w.isin(SEQUEL_MARKERS) & ~w.rlike(r"^\d{1,2}$")
                     & ~w.isin(stop))
    words = F.transform(words, lambda w: F.regexp_replace(w, r"^(.{2,}[^s])s$", "$1"))
    # Word pairs too ("star_war", "toy_story"): rarer than either word, so with IDF a shared
    # franchise name outweighs a shared common word ("hope", "toy", "new").
    pairs = F.when(F.size(words) > 1, F.transform(F.sequence(F.lit(1), F.size(words) - 1),
                                                  lambda i: F.concat(words[i - 1], F.lit("_"), words[i]))
                   ).otherwise(F.array().cast("array<string>"))
    return F.array_distinct(F.concat(words, pairs))


def _block(df: DataFrame, tokens: str, out: str, binary: bool, min_df: float = 1.0, idf: bool = False,
           vocab: int = 1 << 18) -> tuple[DataFrame, int]:
    """Token arrays -> L2-normalised count (or TF-IDF) vectors in column `out`, and their width
    (0: no movie has a token; the column is then left out). The vectors stay sparse."""
    cv = CountVectorizer(inputCol=tokens, outputCol=f"{out}_tf", binary=binary, minDF=min_df, vocabSize=vocab)
    model = cv.fit(df)
    if not model.vocabulary:
        # No movie has this attribute (e.g. a dataset without tags): the block is left out.
        return df, 0
    vec = model.transform(df)
    col = f"{out}_tf"
    if idf:
        vec = IDF(inputCol=col, outputCol=f"{out}_idf").fit(vec).transform(vec)
        col = f"{out}_idf"
    # Normalizer leaves a zero vector as it is (no NaN): a movie without the block adds nothing.
    return Normalizer(inputCol=col, outputCol=out, p=2.0).transform(vec), len(model.vocabulary)


def _scale(df: DataFrame, col: str, weight: float, width: int) -> DataFrame:
    """The block's unit vectors times `weight`, still sparse. (Through arrays, as before issue 22,
    every vector became dense: ~1,700 doubles a movie on ml-latest-small, and every later step
    paid for the zeros.)"""
    if weight == 1.0:
        return df
    from pyspark.ml.feature import ElementwiseProduct
    from pyspark.ml.linalg import Vectors

    return (ElementwiseProduct(scalingVec=Vectors.dense([weight] * width), inputCol=col, outputCol=f"{col}_w")
            .transform(df).drop(col).withColumnRenamed(f"{col}_w", col))


def movie_vectors(movies: DataFrame, tags: DataFrame | None, genome: DataFrame | None,
                  cfg: ContentConfig, popularity: DataFrame | None = None) -> DataFrame:
    """movieId, features (unit-length MLlib vector; zero for a movie with no attributes),
    has_content, pop (its number of ratings in `popularity` (movieId, n), 0 without: the tie
    break among equal similarities)."""
    base = movies.select(
        "movieId",
        title_tokens().alias("title_tokens"),
        F.coalesce("genres", F.array().cast("array<string>")).alias("genre_tokens"),
        F.when(F.col("year").isNotNull(), F.array(F.concat(F.lit("decade_"), (F.floor(F.col("year") / 10) * 10).cast("string"))))
        .otherwise(F.array().cast("array<string>")).alias("year_tokens"),
    )
    if tags is not None:
        # Each application of a tag counts once per user: TF = number of users who applied it.
        tag_tokens = (tags.select("movieId", "userId", normalize_tag().alias("t")).where(F.col("t") != "")
                      .distinct().groupBy("movieId").agg(F.collect_list("t").alias("tag_tokens")))
        base = base.join(tag_tokens, "movieId", "left")
    base = base.withColumn("tag_tokens", F.coalesce(F.col("tag_tokens") if tags is not None else F.lit(None),
                                                    F.array().cast("array<string>")))
    df, w_genre = _block(base, "genre_tokens", "v_genre", binary=True)
    df, w_tag = _block(df, "tag_tokens", "v_tag", binary=False, min_df=float(cfg.min_tag_movies), idf=True,
                       vocab=cfg.max_tags)
    df, w_year = _block(df, "year_tokens", "v_year", binary=True)
    # A word only one title has links nothing: min_df 2 keeps the vocabulary to shared words.
    df, w_title = _block(df, "title_tokens", "v_title", binary=True, min_df=2.0, idf=True)
    blocks = [(c, w, n) for c, w, n in (("v_genre", cfg.genre_weight, w_genre), ("v_tag", cfg.tag_weight, w_tag),
                                        ("v_year", cfg.year_weight, w_year), ("v_title", cfg.title_weight, w_title))
              if n and w > 0]
    if genome is not None:
        # Dense relevance over the genome's tags, in tagId order.
        g = genome.groupBy("movieId").agg(
            F.sort_array(F.collect_list(F.struct("tagId", "relevance"))).alias("g"))
        g = g.select("movieId", array_to_vector(F.transform("g", lambda s: s["relevance"])).alias("g_raw"))
        g = Normalizer(inputCol="g_raw", outputCol="v_genome", p=2.0).transform(g).select("movieId", "v_genome")
        width = len(g.first()["v_genome"]) if g.take(1) else 0
        df = df.join(g, "movieId", "left").withColumn(
            "v_genome", F.coalesce(F.col("v_genome"), array_to_vector(F.array_repeat(F.lit(0.0), width))))
        if width and cfg.genome_weight > 0:
            blocks.append(("v_genome", cfg.genome_weight, width))
    for col, w, n in blocks:
        df = _scale(df, col, w, n)
    df = VectorAssembler(inputCols=[c for c, _, _ in blocks], outputCol="raw").transform(df)
    df = Normalizer(inputCol="raw", outputCol="features", p=2.0).transform(df)
    # Every block's entries are >= 0 (counts, TF-IDF, relevance) and its weight > 0, so a movie
    # has content when its largest entry is positive. (Counting non-zeros through a filter
    # lambda interpreted ~5,000 entries a movie: 4 s of the content stage on ml-latest-small.)
    top = F.array_max(vector_to_array("raw"))
    if popularity is not None:
        df = df.join(popularity.select("movieId", F.col("n").alias("pop")), "movieId", "left")
    pop = F.coalesce(F.col("pop"), F.lit(0)) if popularity is not None else F.lit(0)
    return df.select("movieId", "features", (F.coalesce(top, F.lit(0.0)) > 0).alias("has_content"), pop.cast("long").alias("pop"))


def _pop(df: DataFrame):
    """The vectors' or pairs' popularity column (0 when the frame has none)."""
    return F.coalesce(F.col("pop"), F.lit(0)).cast("long") if "pop" in df.columns else F.lit(0).cast("long")


def _top_k(pairs: DataFrame, k: int) -> DataFrame:
    """pairs(movieId, similar_movieId, similarity[, pop]) in both orientations -> top-k per movie.

    Ties broken by the neighbour's popularity (`pop`, more first), then its id (smaller first),
    so reruns give identical lists.
    """
    pairs = pairs.withColumn("pop", _pop(pairs))
    w = Window.partitionBy("movieId").orderBy(F.col("similarity").desc(), F.col("pop").desc(), F.col("similar_movieId"))
    # A cosine of 0 shares nothing: not a neighbour.
    return (pairs.where(F.col("similarity") > 0).withColumn("rank", F.row_number().over(w)).where(F.col("rank") <= k)
            .select(F.col("movieId").cast("int"), F.col("similar_movieId").cast("int"),
                    F.col("rank").cast("int"), F.col("similarity").cast("double")))


def _pairs_frame(pairs: DataFrame) -> DataFrame:
    return pairs.select(F.col("movieId").cast("int"), F.col("similar_movieId").cast("int"),
                        F.round(F.col("dot").cast("double"), 6).alias("similarity"))


def _empty_pairs(spark) -> DataFrame:
    return spark.createDataFrame([], "movieId int, similar_movieId int, similarity double")


def exact_neighbours(vectors: DataFrame, k: int, block_size: int = 2048, sources: DataFrame | None = None) -> DataFrame:
    """Exact top-k cosine neighbours of every movie against the whole catalog.

    A self-join on feature index would be exact too, but genres are shared by thousands of
    movies, so it emits sum(df^2) partial products. Instead the catalog's unit vectors are cut
    into hash blocks of about `block_size` movies and every (left block, right block) pair is
    one row: `mapInArrow` receives the two blocks' vectors as they are stored (MLlib's sparse
    index/value arrays), multiplies the left block's sparse rows by the right block's dense
    ones (scipy.sparse, float64) and keeps each left movie's top k of the right block in the
    final order (similarity rounded to 6 decimals, descending, then the more rated (`pop`), then
    the smaller id), so the union of the blocks' lists holds every movie's true top k. Cost
    non-zeros x movies multiply-adds, movies^2 scores sorted, movies x blocks x k rows out of
    Python: the small-catalog mode, and the yardstick for the approximation. `sources`
    (movieId): lists for those movies only, still against the whole catalog. (MLlib's blocked
    product, used before issue 22, took 35 s of the content stage's 63 s on ml-latest-small and
    its top-(k+1) heap dropped tied movies before the id tie-break: 130,389 of 194,700
    (movie, rank) rows differ from these lists, all among equal similarities.)
    """
    spark = vectors.sparkSession
    v = vectors.where("has_content").select("movieId", "features", _pop(vectors).alias("pop"))
    n = v.count()
    if n == 0:
        return _top_k(_empty_pairs(spark), k)
    n_blocks = max(1, -(-n // block_size))
    def blocks(df: DataFrame) -> DataFrame:
        return (df.withColumn("b", F.pmod(F.xxhash64("movieId"), F.lit(n_blocks)))
                .groupBy("b").agg(F.collect_list(F.struct("movieId", "features", "pop")).alias("m")))

    left = blocks(v if sources is None else v.join(sources.select("movieId"), "movieId", "left_semi"))
    pairs = (left.select(F.col("m").alias("l")).crossJoin(blocks(v).select(F.col("m").alias("r")))
             .repartition(n_blocks * n_blocks))  # one block pair per task: the pairs are the work
    out = pairs.mapInArrow(_block_top_k(k), "movieId int, similar_movieId int, similarity double, pop long")
    return _top_k(out, k)


def _vector_width(vectors) -> int:
    """The width of an Arrow array of MLlib vectors (their stored struct: type 0 sparse with size,
    indices and values / 1 dense with values only, no size)."""
    import pyarrow.compute as pc

    _, size, _, val = vectors.flatten()
    return max(int(pc.max(size).as_py() or 0), int(pc.max(val.value_lengths()).as_py() or 0))


def _vector_rows(vectors, width: int, dense: bool = True):
    """An Arrow array of MLlib vectors -> a float64 matrix, one row per vector: a dense numpy
    array, or (dense=False) a scipy CSR matrix of the stored entries only."""
    import numpy as np

    typ, _, idx, val = vectors.flatten()
    n = len(vectors)
    lengths = val.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = val.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    starts = np.cumsum(lengths) - lengths
    # A dense vector's value j sits at column j; a sparse one's at its index.
    cols = np.arange(len(flat)) - np.repeat(starts, lengths)
    sparse = np.repeat(typ.fill_null(1).to_numpy(zero_copy_only=False) == 0, lengths)
    if sparse.any():
        cols[sparse] = idx.flatten().to_numpy(zero_copy_only=False)
    if not dense:
        from scipy.sparse import csr_matrix

        return csr_matrix((flat, cols, np.append(starts, len(flat))), shape=(n, width))
    m = np.zeros((n, width))
    m[np.repeat(np.arange(n), lengths), cols] = flat
    return m


def _block_top_k(k: int):
    """exact_neighbours' mapInArrow function: rows (l, r) of two blocks' (movieId, features, pop)
    -> each left movie's top k right movies (itself excluded, similarity > 0) with their pop.
    A row with `l` only (lsh_neighbours' buckets) scores that block against itself."""
    def run(batches):
        import numpy as np
        import pyarrow as pa

        for batch in batches:
            right_col = batch.column("r" if "r" in batch.schema.names else "l")
            for i in range(batch.num_rows):
                left, right = batch.column("l")[i].values, right_col[i].values
                lids, lvec = left.flatten()[0].to_numpy(zero_copy_only=False), left.flatten()[1]
                rids, rvec, rpop = right.flatten()
                rids = rids.to_numpy(zero_copy_only=False)
                rpop = rpop.fill_null(0).to_numpy(zero_copy_only=False)
                # Right movies by popularity (more first), then id, so a stable sort on
                # similarity breaks ties the same way.
                order = np.lexsort((rids, -rpop))
                rids, rpop = rids[order], rpop[order]
                width = max(_vector_width(lvec), _vector_width(rvec))
                # Sparse left x dense right: a movie has a few dozen non-zeros of thousands of
                # columns, so this costs nnz(left) x right movies, not left x right x width (on
                # ml-latest-small the dense product was most of the content stage).
                lm, rm = _vector_rows(lvec, width, dense=False), _vector_rows(rvec, width)
                sims = np.round(np.asarray(lm @ rm[order].T), 6)
                sims[lids[:, None] == rids[None, :]] = 0.0  # not its own neighbour
                kk = min(k, len(rids))
                top = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
                li = np.repeat(np.arange(len(lids)), kk)
                ri = top.ravel()
                s = sims[li, ri]
                keep = s > 0
                yield pa.RecordBatch.from_arrays(
                    [pa.array(lids[li[keep]], pa.int32()), pa.array(rids[ri[keep]], pa.int32()),
                     pa.array(s[keep], pa.float64()), pa.array(rpop[ri[keep]], pa.int64())],
                    names=["movieId", "similar_movieId", "similarity", "pop"])

    return run


def lsh_codes(vectors: DataFrame, bits: int, tables: int, seed: int) -> DataFrame:
    """movieId, t, code: per table t, the signs of the movie's projections on `bits` hyperplanes.

    The projections are MLlib BucketedRandomProjectionLSH hash functions: floor(x.r / L) for
    random unit vectors r. With L = 4 and unit x, |x.r| < L, so the value is 0 or -1: the sign
    of the projection, i.e. random-hyperplane LSH (SimHash). MLlib computes them in the JVM on
    the sparse vectors, so no movies x hyperplanes product is ever materialised.
    """
    from pyspark.ml.feature import BucketedRandomProjectionLSH

    brp = BucketedRandomProjectionLSH(inputCol="features", outputCol="h", bucketLength=4.0,
                                      numHashTables=bits * tables, seed=seed)
    hashed = brp.fit(vectors).transform(vectors.where("has_content").select("movieId", "features"))
    signs = F.transform("h", lambda v: F.when(vector_to_array(v)[0] >= 0, 1).otherwise(0))
    code = lambda t: F.aggregate(F.slice("s", t * bits + 1, bits), F.lit(0).cast("long"),  # noqa: E731
                                 lambda acc, x: acc * 2 + x)
    return (hashed.select("movieId", signs.alias("s"))
            .select("movieId", F.posexplode(F.transform(F.sequence(F.lit(0), F.lit(tables - 1)), code))
                    .alias("t", "code")))


def lsh_neighbours(vectors: DataFrame, k: int, bits: int = 8, tables: int = 16, bucket_cap: int = 256,
                   seed: int = 42) -> DataFrame:
    """Approximate top-k by random-hyperplane LSH (SimHash) with banding, exact cosine on candidates.

    Each of `tables` tables hashes a movie to the signs of its projections on `bits` random
    hyperplanes (see lsh_codes); two movies at angle theta share a table's code with probability
    (1 - theta/pi)^bits, so close pairs collide in some table and distant ones rarely. (MLlib's
    own LSH join uses one projection per table, which cannot separate unit vectors in high
    dimensions.) Movies sharing a code are candidates; a crowded bucket (many identical vectors)
    is cut into sub-buckets of about `bucket_cap`, so candidates stay linear in the catalog:
    at most movies x tables x bucket_cap pairs.

    Each bucket is one row holding its movies' vectors, scored inside `mapInArrow` as
    exact_neighbours scores a block pair (the same function, so the same float64 cosines and
    tie order), and only each movie's top k of the bucket leaves Python: movies x tables x k
    rows at most, deduplicated (a pair can share several tables' buckets), then top k per movie.
    A movie's top k among all its candidates is the top k of its buckets' top k's, so this
    equals scoring every candidate pair. (Before issue 22, every candidate pair was scored by a
    join on the pairs' shared vector entries and all pairs were ranked in a Window: at 25M
    ratings that query took 755 task-seconds and most of the content stage's 15 GB of spill.)
    """
    spark = vectors.sparkSession
    v = vectors.where("has_content").select("movieId", "features", _pop(vectors).alias("pop"))
    n = v.count()
    if n == 0:
        return _top_k(_empty_pairs(spark), k)
    codes = lsh_codes(vectors, bits, tables, seed)
    size = F.count(F.lit(1)).over(Window.partitionBy("t", "code"))
    buckets = codes.withColumn(
        "sub", F.pmod(F.xxhash64("movieId", "t", F.lit(seed)), F.greatest(F.ceil(size / bucket_cap), F.lit(1))))
    rows = (buckets.join(v, "movieId").groupBy("t", "code", "sub")
            .agg(F.collect_list(F.struct("movieId", "features", "pop")).alias("m"))
            .where(F.size("m") > 1))
    # About 64 full buckets per task: every task's Arrow batch stays a few MB whatever the catalog.
    parts = max(spark.sparkContext.defaultParallelism, -(-n * tables // (bucket_cap * 64)))
    out = (rows.select(F.col("m").alias("l")).repartition(parts)
           .mapInArrow(_block_top_k(k), "movieId int, similar_movieId int, similarity double, pop long"))
    # The same pair from two tables' buckets has the same cosine (the same product of the same two vectors).
    return _top_k(out.groupBy("movieId", "similar_movieId").agg(F.max("similarity").alias("similarity"),
                                                                F.max("pop").alias("pop")), k)


def neighbour_recall(approx: DataFrame, exact: DataFrame, k: int) -> float:
    """Mean over movies of |approx top-k that are as similar as the exact k-th| / |exact top-k|.

    Tie-aware: with many equal cosines any of the tied movies is a correct k-th neighbour.
    """
    kth = exact.groupBy("movieId").agg(F.min("similarity").alias("kth"), F.count(F.lit(1)).alias("n"))
    hits = (approx.join(kth, "movieId", "inner").where(F.col("similarity") >= F.col("kth") - 1e-9)
            .groupBy("movieId").agg(F.count(F.lit(1)).alias("h")))
    r = kth.join(hits, "movieId", "left").select(
        (F.least(F.coalesce("h", F.lit(0)), F.col("n")) / F.col("n")).alias("r")).agg(F.avg("r")).first()[0]
    return float(r) if r is not None else float("nan")


def franchise_recall(sims: DataFrame, pairs: DataFrame, k: int) -> float:
    """Share of (movieId, sequelId) pairs whose sequel is among the movie's top k in `sims`
    (similar_movies rows): does "similar movies" know a film's sequel?"""
    hit = sims.where(F.col("rank") <= k).select("movieId", F.col("similar_movieId").alias("sequelId"), F.lit(1).alias("hit"))
    r = pairs.join(hit, ["movieId", "sequelId"], "left").agg(F.avg(F.coalesce("hit", F.lit(0)))).first()[0]
    return float(r) if r is not None else float("nan")


# ---------------------------------------------------------------------------------------------
# The content model for users: "because you watched X" lists and a rating prediction


# content_top_n's scores are rounded to this many decimals before ranking (see _content_lists).
SCORE_DECIMALS = 9
# Users scored in one numpy step of content_top_n (each up to sources x list-length contributions).
TOP_N_CHUNK_ROWS = 2_000_000


def content_top_n(train: DataFrame, sims: DataFrame, n: int, sources: int = 30, neighbours: int = 20) -> DataFrame:
    """Per user, the n unseen movies most similar to what they liked: userId, movieId, rank,
    score, because_movieId.

    Liked = rated at or above the user's own train mean (their `sources` best, ties by id, so
    a heavy rater costs no more than a light one). A candidate's score sums similarity x
    (rating - user mean + 1) over the liked movies that have it among their `neighbours`
    nearest; because_movieId is the liked movie that contributed most (ties: the lower id).
    Scores are rounded to SCORE_DECIMALS decimals, so that sums equal in exact arithmetic tie
    whatever order they were added in; ranked by score, then movieId. Users whose liked movies
    have no content neighbours get no list (catalog coverage shows it).

    Computed per partition in numpy (mapInArrow, no per-row Python): the ratings partitioned by
    user, the neighbour lists copied to every partition (partitioned.py), each user's liked x
    neighbours contributions summed and ranked where the user's ratings are. As Spark joins this
    was liked x neighbours rows (up to 600 a user) shuffled, aggregated, anti-joined with train
    and ranked in a window: at 25M ratings 326 task seconds and 3.6 GB of shuffle read
    (benchmarks/results/content-top-n-25M.md: 173.7 s, 73.5 s in numpy).
    """
    from .partitioned import batches_by_kind, movies_then_users, numpy_partitions, user_partition

    parts = numpy_partitions(train.sparkSession)
    lists = sims.where(F.col("rank") <= neighbours).select(
        F.col("movieId").cast("int").alias("a"), F.col("similar_movieId").cast("int").alias("b"),
        F.col("similarity").cast("double").alias("x"))
    rated = train.select(user_partition(parts).alias("pid"), F.col("userId").cast("int").alias("a"),
                         F.col("movieId").cast("int").alias("b"), F.col("rating").cast("double").alias("x"))
    # Unsorted: the reader keeps the whole partition anyway (a sort by kind spilled at 25M).
    rows = movies_then_users(lists, rated, parts, ordered=False)
    chunk_rows = TOP_N_CHUNK_ROWS  # read here: the workers get the value, not the module's

    def run(batches):
        import numpy as np
        import pyarrow as pa

        got = batches_by_kind(batches)
        if not got[1]:
            return
        for out in _content_lists(got[0], got[1], n, sources, chunk_rows, np):
            yield pa.RecordBatch.from_arrays(
                [pa.array(a, t) for a, t in zip(out, (pa.int32(), pa.int32(), pa.int32(), pa.float64(), pa.int32()))],
                names=["userId", "movieId", "rank", "score", "because_movieId"])

    return rows.mapInArrow(run, "userId int, movieId int, rank int, score double, because_movieId int")


def _columns(batches, np):
    """(a, b, x) of a list of Arrow batches as numpy arrays."""
    if not batches:
        return np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0)
    return tuple(np.concatenate([b.column(c).to_numpy() for b in batches]) for c in ("a", "b", "x"))


def _content_lists(list_batches, rating_batches, n: int, sources: int, chunk_rows: int, np):
    """content_top_n's lists of one partition's users: yields (userId, movieId, rank, score,
    because_movieId) arrays, a chunk of users at a time."""
    e, nb, sim = _columns(list_batches, np)
    # A partition may hold two copies of the lists (two pids hashed to one partition): once each.
    code = (e.astype(np.int64) << 32) | (nb.astype(np.int64) & 0xFFFFFFFF)
    _, first = np.unique(code, return_index=True)
    e, nb, sim = e[first], nb[first], sim[first]  # in (e, nb) order
    src_ids, src_start, src_n = np.unique(e, return_index=True, return_counts=True)
    if len(src_ids) == 0:
        return
    width = int(src_n.max())
    slot = np.arange(len(e)) - np.repeat(src_start, src_n)
    row = np.repeat(np.arange(len(src_ids)), src_n)
    m_nb = np.zeros((len(src_ids), width), np.int32)
    m_sim = np.zeros((len(src_ids), width))
    m_ok = np.zeros((len(src_ids), width), bool)
    m_nb[row, slot], m_sim[row, slot], m_ok[row, slot] = nb, sim, True

    u, m, r = _columns(rating_batches, np)
    # Each user's ratings best first, ties by movieId: the order `sources` counts in.
    order = np.lexsort((m, -r, u))
    u, m, r = u[order], m[order], r[order]
    users, u_start, u_n = np.unique(u, return_index=True, return_counts=True)
    # Exact, as Spark's avg: ratings are multiples of 0.5, so their sums are exact in a double.
    mu = np.add.reduceat(r, u_start) / u_n
    seen = np.sort((u.astype(np.int64) << 32) | (m.astype(np.int64) & 0xFFFFFFFF))
    step = max(1, chunk_rows // (min(sources, int(u_n.max())) * width))
    scale = 10.0 ** SCORE_DECIMALS
    for i0 in range(0, len(users), step):
        i1 = min(i0 + step, len(users))
        lo, hi = u_start[i0], u_start[i1] if i1 < len(users) else len(u)
        who = np.repeat(np.arange(i0, i1), u_n[i0:i1])
        liked = (r[lo:hi] >= mu[who]) & (np.arange(lo, hi) - u_start[who] < sources)
        who, src, wt = who[liked], m[lo:hi][liked], r[lo:hi][liked] - mu[who[liked]] + 1.0
        at = np.minimum(np.searchsorted(src_ids, src), len(src_ids) - 1)
        listed = src_ids[at] == src
        who, src, wt, at = who[listed], src[listed], wt[listed], at[listed]
        ok = m_ok[at]
        c_who = np.repeat(who[:, None], width, 1)[ok]
        c_src = np.repeat(src[:, None], width, 1)[ok]
        c_movie = m_nb[at][ok]
        c = (m_sim[at] * wt[:, None])[ok]
        q = (users[c_who].astype(np.int64) << 32) | (c_movie.astype(np.int64) & 0xFFFFFFFF)
        pos = np.minimum(np.searchsorted(seen, q), max(len(seen) - 1, 0))
        fresh = seen[pos] != q
        c_who, c_src, c_movie, c = c_who[fresh], c_src[fresh], c_movie[fresh], c[fresh]
        if len(c) == 0:
            continue
        # Per (user, movie): the sum, and the source of the largest contribution (ties: lower id).
        order = np.lexsort((c_src, -c, c_movie, c_who))
        c_who, c_src, c_movie, c = c_who[order], c_src[order], c_movie[order], c[order]
        head = np.ones(len(c), bool)
        head[1:] = (c_who[1:] != c_who[:-1]) | (c_movie[1:] != c_movie[:-1])
        starts = np.flatnonzero(head)
        g_who, g_movie, g_src, score = c_who[starts], c_movie[starts], c_src[starts], np.add.reduceat(c, starts)
        # Rounded to SCORE_DECIMALS (floor(s x 10^d + 0.5): the same IEEE steps in Spark SQL), so
        # that sums equal in exact arithmetic tie whatever order they were added in, and the tie
        # goes to the lower movieId: 0.95 + 0.75 + 0.1 is 1.7999999999999998 here, 0.9 + 0.9 is
        # 1.8. Without it, Spark's joins and this path ranked 115 of 1M's 129,704 list rows apart,
        # and the learned ranker trained on them moved.
        score = np.floor(score * scale + 0.5) / scale
        # Each user's n best by score, then movieId.
        order = np.lexsort((g_movie, -score, g_who))
        g_who, g_movie, g_src, score = g_who[order], g_movie[order], g_src[order], score[order]
        first_of = np.flatnonzero(np.r_[True, g_who[1:] != g_who[:-1]])
        rank = np.arange(len(g_who)) - np.repeat(first_of, np.diff(np.r_[first_of, len(g_who)])) + 1
        top = rank <= n
        yield users[g_who[top]], g_movie[top], rank[top].astype(np.int32), score[top], g_src[top]


def content_predict(pairs: DataFrame, train: DataFrame, sims: DataFrame, bias, shrink: float = 1.0,
                    lo: float = 0.5, hi: float = 5.0) -> DataFrame:
    """Content rating prediction for (userId, movieId) pairs: pairs' columns + prediction, n_nb.

    Item-kNN on content neighbours over the bias baseline: b_um + sum(sim x (r_uj - b_uj)) /
    (sum(sim) + shrink) over the movie's content neighbours j that the user rated in train, so
    a movie with no rated neighbour backs off to the bias baseline b_um (n_nb = 0) and a single
    weak neighbour moves it little. Uses train ratings only: a test rating never informs its
    own prediction.
    """
    resid = bias.predict(train.select("userId", "movieId", "rating")).select(
        "userId", F.col("movieId").alias("j"), (F.col("rating") - F.col("baseline")).alias("r"))
    nb = sims.select("movieId", F.col("similar_movieId").alias("j"), "similarity")
    agg = (pairs.select("userId", "movieId").join(nb, "movieId").join(resid, ["userId", "j"])
           .groupBy("userId", "movieId")
           .agg(F.sum(F.col("similarity") * F.col("r")).alias("num"), F.sum("similarity").alias("den"),
                F.count(F.lit(1)).alias("n_nb")))
    raw = F.col("baseline") + F.coalesce(F.col("num") / (F.col("den") + F.lit(shrink)), F.lit(0.0))
    return (bias.predict(pairs.join(agg, ["userId", "movieId"], "left"))
            .select(*pairs.columns, F.least(F.greatest(raw, F.lit(lo)), F.lit(hi)).alias("prediction"),
                    F.coalesce("n_nb", F.lit(0)).cast("int").alias("n_nb")))


def neighbour_method(method: str, n_movies: int, exact_max_movies: int) -> str:
    """'exact' or 'lsh': `content.method`, with 'auto' exact up to `exact_max_movies` movies."""
    return method if method != "auto" else ("exact" if n_movies <= exact_max_movies else "lsh")


def movie_neighbours(vectors: DataFrame, c, method: str, seed: int) -> DataFrame:
    """The `similar_movies` rows (movieId, similar_movieId, similarity, rank) of `vectors` by
    `method` ('exact' or 'lsh')."""
    if method == "exact":
        return exact_neighbours(vectors, c.k)
    return lsh_neighbours(vectors, c.k, c.lsh_bits, c.lsh_tables, c.lsh_bucket_cap, seed)
