"""Per-partition numpy work over users, with a small per-movie table beside every partition.

Scoring a user against many movies row by row in Spark costs a shuffle of users x movies rows;
in numpy it is a matrix product or a gather. The movie table (item factors, neighbour lists)
must then be in every partition. It is sent as rows, never collected to the driver: each of P
partitions gets one copy (kind 0) ahead of its users' rows (kind 1), by a sort within
partitions, and the Python side (mapInArrow, no per-row Python) keeps what it reads first (or,
unsorted, buffers the rest until the partition has been read).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F


def numpy_partitions(spark: SparkSession) -> int:
    """Two partitions per core (each holds a copy of the movie rows), at most the shuffle partitions."""
    sc = spark.sparkContext
    return max(1, min(int(spark.conf.get("spark.sql.shuffle.partitions")), 2 * sc.defaultParallelism))


def user_partition(parts: int) -> Column:
    return F.pmod(F.xxhash64("userId"), F.lit(parts)).cast("int")


def movies_then_users(movie_rows: DataFrame, user_rows: DataFrame, parts: int, ordered: bool = True) -> DataFrame:
    """`movie_rows` copied to each of `parts` partitions (kind 0), then `user_rows` (which carry
    their own `pid`, user_partition) in theirs (kind 1, or their own `kind` above 0 where they
    carry one: rows sort by it), movies first within a partition.

    `ordered` False leaves out the sort: rows of every kind arrive in any order, and the reader
    must buffer what it cannot use yet. At 25M ratings this sort was the run's whole spill
    (1.2 GB per task of the neighbour gather), so a reader that keeps everything anyway skips it.

    Hash partitioning on pid may put two pids' copies in one partition: the reader keeps the
    movies once each (np.unique)."""
    spark = movie_rows.sparkSession
    copies = (movie_rows.crossJoin(spark.range(parts).select(F.col("id").cast("int").alias("pid")))
              .withColumn("kind", F.lit(0)))
    if "kind" not in user_rows.columns:
        user_rows = user_rows.withColumn("kind", F.lit(1))
    rows = copies.unionByName(user_rows).repartition(parts, "pid")
    return rows.sortWithinPartitions("kind") if ordered else rows


def split_movie_rows(batches, take):
    """Read the movie rows (kind 0) that come first in a partition: call `take(batch)` on each
    batch of them, then yield the batches of user rows that follow (kind 1 only)."""
    import pyarrow as pa

    done = False
    for b in batches:
        if done:
            yield b
            continue
        movies = b.column("kind").to_numpy() == 0
        if movies.any():
            take(b.filter(pa.array(movies)))
        if movies.all():
            continue
        done = True
        yield b.filter(pa.array(~movies))


def batches_by_kind(batches, kinds: int = 2) -> tuple[list, ...]:
    """The Arrow batches of an unsorted movies_then_users partition, split by `kind` (0 ..
    kinds - 1): one list of batches per kind, every row kept (the reader holds the partition)."""
    import pyarrow as pa

    got = tuple([] for _ in range(kinds))
    for b in batches:
        kind = b.column("kind").to_numpy()
        for k, keep in enumerate(got):
            mask = kind == k
            if mask.all():
                keep.append(b)
            elif mask.any():
                keep.append(b.filter(pa.array(mask)))
    return got
