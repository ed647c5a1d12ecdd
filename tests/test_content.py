"""Content similarity: hand-computed cosines, the LSH path, real data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from movierec_spark.config import ContentConfig
from movierec_spark.content import exact_neighbours, lsh_neighbours, movie_vectors, neighbour_recall

MOVIES = "movieId int, title string, year int, genres array<string>"
TAGS = "userId int, movieId int, tag string, tagged_at timestamp"


def vectors(spark, movies, tags=None, **cfg):
    m = spark.createDataFrame(movies, MOVIES)
    t = spark.createDataFrame(tags, TAGS) if tags is not None else None
    return movie_vectors(m, t, None, ContentConfig(**cfg))


def test_toy_catalog_cosines_match_hand_computation(spark):
    # Genres only (year and tags off): A=(1,1,0)/sqrt2, B=(1,0,0), C=(0,1,1)/sqrt2, D=(0,0,1).
    movies = [(1, "A", None, ["Action", "Comedy"]), (2, "B", None, ["Action"]),
              (3, "C", None, ["Comedy", "Drama"]), (4, "D", None, ["Drama"]),
              (5, "Nothing", None, [])]
    v = vectors(spark, movies, year_weight=0.0, tag_weight=0.0)
    got = {(r.movieId, r.similar_movieId): (r.rank, r.similarity) for r in exact_neighbours(v, 3).collect()}
    s = 1 / math.sqrt(2)
    assert got[(1, 2)] == (1, pytest.approx(s, abs=1e-6))
    assert got[(1, 3)] == (2, pytest.approx(0.5, abs=1e-6))
    assert got[(3, 4)] == (1, pytest.approx(s, abs=1e-6))
    assert got[(3, 1)] == (2, pytest.approx(0.5, abs=1e-6))
    assert (1, 4) not in got and (2, 4) not in got  # cosine 0: not neighbours
    # The movie with no attributes: a zero vector, no NaN, no neighbours, in nobody's list.
    row = v.where("movieId = 5").first()
    assert not row.has_content and all(x == 0 for x in row.features.toArray())
    assert all(5 not in pair for pair in got)


def test_tags_are_normalised_and_weighted_by_idf(spark):
    movies = [(1, "A", 1995, ["Drama"]), (2, "B", 1995, ["Drama"]), (3, "C", 1995, ["Drama"])]
    tags = [(1, 1, "Pixar ", None), (2, 2, "pixar", None), (3, 1, "funny", None), (3, 3, "funny", None),
            (4, 2, "  PIXAR", None)]
    v = vectors(spark, movies, tags)
    nb = {(r.movieId, r.similar_movieId): r.similarity for r in exact_neighbours(v, 2).collect()}
    # 1 and 2 share 'pixar' (normalised), 1 and 3 share 'funny'; genres and decade are equal
    # for all, so the tag block decides the order.
    assert nb[(2, 1)] > nb[(2, 3)]
    assert all(not math.isnan(x) for x in nb.values())


def test_lsh_finds_exact_top_k_on_clustered_catalog(spark):
    """Two tight clusters: the true neighbours are near-duplicates, so banded LSH must find them."""
    genres = [["Action", "Thriller", "Crime"], ["Animation", "Children", "Comedy"]]
    movies = [(i, f"m{i}", 1990 + (i % 3), genres[i % 2]) for i in range(1, 41)]
    v = vectors(spark, movies, tag_weight=0.0).cache()
    exact = exact_neighbours(v, 5).cache()
    approx = lsh_neighbours(v, 5, bits=6, tables=8, seed=7)
    assert neighbour_recall(approx, exact, 5) == 1.0
    assert approx.where(F.col("movieId") == F.col("similar_movieId")).count() == 0
    # Same cosines for the pairs both found.
    j = approx.alias("a").join(exact.alias("e"), ["movieId", "similar_movieId"])
    assert j.where(F.abs(F.col("a.similarity") - F.col("e.similarity")) > 1e-6).count() == 0


def test_lsh_lists_are_the_exact_top_k_over_the_pairs_sharing_a_bucket(spark):
    """Buckets scored in numpy keep, per movie, exactly what scoring every candidate pair would:
    the exact lists restricted to pairs that share a table's code, re-ranked (same cosines, same
    tie order). 3 bits x 2 tables split the 60 movies, so the candidates are a strict subset."""
    from chispa import assert_df_equality
    from pyspark.sql import Window

    from movierec_spark.content import lsh_codes

    names = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Crime"]
    movies = [(i, f"m{i}", 1950 + 7 * (i % 9), [g for b, g in enumerate(names) if (i * 37) >> b & 1])
              for i in range(1, 61)]
    v = vectors(spark, movies, tag_weight=0.0).cache()
    codes = lsh_codes(v, 3, 2, 11)
    a, b = codes.alias("a"), codes.alias("b")
    cands = (a.join(b, ["t", "code"]).where(F.col("a.movieId") != F.col("b.movieId"))
             .select(F.col("a.movieId").alias("movieId"), F.col("b.movieId").alias("similar_movieId")).distinct())
    assert 0 < cands.count() < 60 * 59
    every = exact_neighbours(v, 60)
    w = Window.partitionBy("movieId").orderBy("rank")
    expected = (every.join(cands, ["movieId", "similar_movieId"], "left_semi")
                .withColumn("rank", F.row_number().over(w)).where("rank <= 5")
                .select("movieId", "similar_movieId", F.col("rank").cast("int"), "similarity"))
    got = lsh_neighbours(v, 5, bits=3, tables=2, bucket_cap=1000, seed=11)
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)
    v.unpersist()


FRANCHISE_PAIRS = Path(__file__).parent / "fixtures" / "franchise_pairs.csv"


def test_title_tokens_keep_the_franchise_and_drop_sequel_marks(spark):
    from movierec_spark.content import title_tokens

    titles = ["Star Wars: Episode V - The Empire Strikes Back (1980)", "Godfather: Part II, The (1974)",
              "Aliens (1986)", "Toy Story 2 (1999)", "Friday the 13th Part VII: The New Blood (1988)",
              "2001: A Space Odyssey (1968)", "Kill Bill: Vol. 2 (2004)"]
    got = [r[0] for r in spark.createDataFrame([(t,) for t in titles], "title string")
           .select(title_tokens()).collect()]
    assert got == [["star", "war", "empire", "strike", "back", "star_war", "war_empire", "empire_strike", "strike_back"],
                   ["godfather"], ["alien"], ["toy", "story", "toy_story"],
                   ["friday", "13th", "new", "blood", "friday_13th", "13th_new", "new_blood"],
                   ["2001", "space", "odyssey", "2001_space", "space_odyssey"], ["kill", "bill", "kill_bill"]]


def test_ties_go_to_the_more_rated_movie(spark):
    # Three movies with identical vectors: movie 1's equal neighbours 2 and 3 are ordered by
    # their number of ratings (3 has more), not by id.
    movies = [(1, "A", 1995, ["Drama"]), (2, "B", 1995, ["Drama"]), (3, "C", 1995, ["Drama"])]
    m = spark.createDataFrame(movies, MOVIES)
    pop = spark.createDataFrame([(2, 5), (3, 40)], "movieId int, n long")
    v = movie_vectors(m, None, None, ContentConfig(), pop)
    for nb in (exact_neighbours(v, 2), lsh_neighbours(v, 2, bits=4, tables=4)):
        assert [r.similar_movieId for r in nb.where("movieId = 1").orderBy("rank").collect()] == [3, 2]
    # Without popularity, the smaller id first.
    v0 = movie_vectors(m, None, None, ContentConfig())
    assert [r.similar_movieId for r in exact_neighbours(v0, 2).where("movieId = 1").orderBy("rank").collect()] == [2, 3]


def test_similar_movies_know_the_sequel_on_ml_latest_small(spark, ml_small_wh):
    """75 film -> sequel pairs of ml-latest-small (tests/fixtures/franchise_pairs.csv): the sequel is
    in the film's top 10 for at least 90% of them (about a third were before titles counted)."""
    import pandas as pd

    from movierec_spark import tables
    from movierec_spark.content import franchise_recall

    cfg, _ = ml_small_wh
    wh = cfg.paths.warehouse
    pairs = spark.createDataFrame(pd.read_csv(FRANCHISE_PAIRS)[["movieId", "sequelId"]])
    assert pairs.count() >= 30
    pop = tables.read_table(spark, wh, "ratings").groupBy("movieId").agg(F.count(F.lit(1)).alias("n"))
    # Cached: the neighbour search reads the vectors three times (count, left and right blocks).
    v = movie_vectors(tables.read_table(spark, wh, "movies"), tables.read_table(spark, wh, "tags"), None,
                      cfg.content, pop).cache()
    sims = exact_neighbours(v, 10, sources=pairs.select("movieId")).cache()
    assert franchise_recall(sims, pairs, 10) >= 0.9
    toy = [r.similar_movieId for r in sims.where("movieId = 1").orderBy("rank").collect()]
    assert len(toy) == 10 and 1 not in toy and 3114 in toy  # Toy Story 2 (1999)
    assert sims.where(F.isnan("similarity") | (F.col("similarity") > 1.000001)).count() == 0
    # Ranks are 1..n without gaps and similarities never increase with rank.
    bad = sims.alias("a").join(sims.alias("b"), (F.col("a.movieId") == F.col("b.movieId"))
                               & (F.col("b.rank") == F.col("a.rank") + 1)).where("b.similarity > a.similarity")
    assert bad.count() == 0
    sims.unpersist()
    v.unpersist()


RATINGS = "userId int, movieId int, rating double"
SIMS = "movieId int, similar_movieId int, rank int, similarity double"


def test_content_top_n_by_hand(spark):
    from movierec_spark.content import content_top_n

    # User 1's train mean is 4: movie 1 (5.0) is liked with weight 2, movie 2 (3.0) is not.
    train = spark.createDataFrame([(1, 1, 5.0), (1, 2, 3.0)], RATINGS)
    sims = spark.createDataFrame([(1, 3, 1, 0.9), (1, 2, 2, 0.8), (1, 4, 3, 0.5), (2, 5, 1, 0.9)], SIMS)
    got = [(r.rank, r.movieId, round(r.score, 6), r.because_movieId)
           for r in content_top_n(train, sims, 2).orderBy("rank").collect()]
    # 2 is seen; 5 comes only from the movie the user did not like.
    assert got == [(1, 3, 1.8, 1), (2, 4, 1.0, 1)]


def _content_top_n_joins(train, sims, n, sources, neighbours):
    """content_top_n as Spark joins (what the numpy path replaced): the yardstick."""
    from pyspark.sql import Window

    from movierec_spark.baselines import top_n_per_user

    w = Window.partitionBy("userId").orderBy(F.col("rating").desc(), F.col("movieId"))
    liked = (train.withColumn("mu_u", F.avg("rating").over(Window.partitionBy("userId")))
             .where(F.col("rating") >= F.col("mu_u"))
             .withColumn("o", F.row_number().over(w)).where(F.col("o") <= sources)
             .select("userId", F.col("movieId").alias("src"), (F.col("rating") - F.col("mu_u") + 1.0).alias("wt")))
    nb = sims.where(F.col("rank") <= neighbours).select(
        F.col("movieId").alias("src"), F.col("similar_movieId").alias("movieId"), "similarity")
    cands = (liked.join(nb, "src")
             .select("userId", "movieId", "src", (F.col("similarity") * F.col("wt")).alias("c"))
             .groupBy("userId", "movieId")
             .agg(F.sum("c").alias("s"), F.max_by("src", F.struct(F.col("c"), -F.col("src"))).alias("because_movieId"))
             .join(train.select("userId", "movieId"), ["userId", "movieId"], "left_anti"))
    scale = 10.0 ** 9  # content.SCORE_DECIMALS
    return top_n_per_user(cands, n, score=F.floor(F.col("s") * scale + 0.5) / scale, keep=("because_movieId",))


def test_content_top_n_in_numpy_equals_the_spark_joins(spark, monkeypatch):
    """Random ratings and lists with tied similarities and tied ratings (the sources' order,
    the because movie, the ranking), users with more liked movies than `sources`, users whose
    liked movies have no list, lists longer than `neighbours`, and several chunks of users per
    partition: the same rows as the joins, scores to 1e-9."""
    import random

    from chispa import assert_approx_df_equality

    from movierec_spark import content

    rnd = random.Random(5)
    train = spark.createDataFrame(
        [(u, m, float(rnd.randrange(1, 11)) / 2)
         for u, m in sorted({(rnd.randrange(1, 90), rnd.randrange(1, 80)) for _ in range(2500)})], RATINGS)
    sims = spark.createDataFrame(
        [(m, nb, rank + 1, sim) for m in range(1, 70)
         for rank, (sim, nb) in enumerate(sorted(((rnd.choice([0.2, 0.4, 0.6]), nb)
                                                   for nb in rnd.sample(range(1, 90), rnd.randrange(9)) if nb != m),
                                                  key=lambda t: -t[0]))], SIMS)
    monkeypatch.setattr(content, "TOP_N_CHUNK_ROWS", 40)
    got = content.content_top_n(train, sims, 7, sources=6, neighbours=5)
    want = _content_top_n_joins(train, sims, 7, 6, 5)
    assert want.count() > 300 and want.where("rank = 7").count() > 20
    assert_approx_df_equality(got, want, 1e-9, ignore_row_order=True, ignore_nullable=True)
    assert content.content_top_n(train.limit(0), sims, 7).isEmpty()
    assert content.content_top_n(train, sims.limit(0), 7).isEmpty()


def test_content_top_n_ties_in_exact_arithmetic_go_to_the_lower_movie(spark):
    """Movie 100 sums 0.95 + 0.75 + 0.1 (1.7999999999999998 as numpy adds them), movie 101
    sums 0.9 + 0.9 (1.8): equal in exact arithmetic, so the lower id ranks first, and both
    scores read 1.8."""
    from chispa import assert_df_equality

    from movierec_spark.content import content_top_n

    train = spark.createDataFrame([(1, 10, 4.0), (1, 11, 4.0), (1, 12, 4.0)], RATINGS)
    sims = spark.createDataFrame([(10, 100, 1, 0.95), (10, 101, 2, 0.9), (11, 101, 1, 0.9), (11, 100, 2, 0.75),
                                  (12, 100, 1, 0.1)], SIMS)
    want = spark.createDataFrame([(1, 100, 1, 1.8, 10), (1, 101, 2, 1.8, 10)],
                                 "userId int, movieId int, rank int, score double, because_movieId int")
    assert_df_equality(content_top_n(train, sims, 5), want, ignore_row_order=True, ignore_nullable=True)


def test_content_predict_by_hand(spark):
    from movierec_spark.baselines import BiasModel
    from movierec_spark.content import content_predict

    zero_u = spark.createDataFrame([(1, 0.0)], "userId int, b_u double")
    zero_i = spark.createDataFrame([(2, 0.0)], "movieId int, b_i double")
    bias = BiasModel(3.0, zero_u, zero_i)
    train = spark.createDataFrame([(1, 2, 4.0), (1, 3, 2.0)], RATINGS)
    sims = spark.createDataFrame([(1, 2, 1, 0.5), (1, 3, 2, 0.25)], SIMS)
    pairs = spark.createDataFrame([(1, 1, 4.5), (1, 9, 1.0)], RATINGS)
    got = {r.movieId: (r.prediction, r.n_nb) for r in content_predict(pairs, train, sims, bias, shrink=1.0).collect()}
    # 3 + (0.5 * (4-3) + 0.25 * (2-3)) / (0.75 + 1); movie 9 has no rated neighbour: baseline.
    assert got[1][0] == pytest.approx(3 + 0.25 / 1.75) and got[1][1] == 2
    assert got[9] == (3.0, 0)


def test_exact_neighbours_take_dense_and_sparse_vectors_alike(spark):
    # The genome block makes stored vectors dense; tags and genres leave them sparse. The block
    # product reads the left block as a sparse matrix of the stored entries and the right one
    # dense: both storage kinds must give the same cosines.
    from pyspark.ml.linalg import Vectors

    s = 1 / math.sqrt(2)
    rows = [(1, Vectors.dense([s, s, 0.0]), True, 5), (2, Vectors.sparse(3, [0], [1.0]), True, 3),
            (3, Vectors.sparse(3, [1, 2], [s, s]), True, 1), (4, Vectors.dense([0.0, 0.0, 1.0]), True, 1)]
    v = spark.createDataFrame(rows, ["movieId", "features", "has_content", "pop"])
    got = {(r.movieId, r.similar_movieId): r.similarity for r in exact_neighbours(v, 3).collect()}
    assert got == {(1, 2): pytest.approx(s, abs=1e-6), (1, 3): pytest.approx(0.5, abs=1e-6),
                   (2, 1): pytest.approx(s, abs=1e-6), (3, 4): pytest.approx(s, abs=1e-6),
                   (3, 1): pytest.approx(0.5, abs=1e-6), (4, 3): pytest.approx(s, abs=1e-6)}
