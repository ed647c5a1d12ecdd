"""MovieLens files -> validated Delta tables, with every bad row accounted for in `rejects`.

The flow per file: read physical lines with their line numbers (`read_lines`), split them into raw
string fields (`split_fields`), type and check them (`check_<role>`), which adds a `reason` column:
null for a good row, a reason code for a rejected one. Nothing is filtered silently, so for every
file, input rows = loaded rows + rejected rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import reduce

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from .fs import exists as fs_exists
from .fs import file_size
from .layouts import ML100K_ITEM_FIXED, FileSpec, Layout
from .tables import TABLE_SCHEMAS

log = logging.getLogger(__name__)

# A rating timestamp more than a day ahead of the ingest is a clock or unit error.
FUTURE_SLACK_SECONDS = 86_400
NO_GENRES = "(no genres listed)"
REASONS = (
    "blank_line",
    "malformed",
    "wrong_column_count",
    "null_key",
    "non_numeric_id",
    "bad_id",
    "bad_rating",
    "rating_off_scale",
    "rating_off_step",
    "bad_timestamp",
    "bad_encoding",
    "empty_value",
    "unknown_movie",
    "unknown_tag",
    "duplicate",
    "in_train",
)
MAX_INT = 2**31 - 1


class IngestError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Reading lines


def read_lines(spark: SparkSession, spec: FileSpec, whole_file_max_bytes: int, size: int) -> DataFrame:
    """Physical lines of one file as (line long, raw string), 1-based, header included.

    Small files are read whole and decoded in their declared encoding, which gives exact line
    numbers at no extra cost. Large files (ratings of ml-25m) are split across tasks; their line
    numbers come from per-partition row counts, which needs one extra scan but no Python and no
    driver-side data beyond one number per partition.
    """
    if size <= whole_file_max_bytes:
        content = spark.read.format("binaryFile").load(spec.path).select("content")
        lines = content.select(
            F.posexplode(F.split(F.decode("content", spec.encoding), "\n", -1)).alias("pos", "raw")
        ).select((F.col("pos") + 1).cast("long").alias("line"), "raw")
        # The newline that ends the last line does not start another one.
        n_last = content.select(F.size(F.split(F.decode("content", spec.encoding), "\n", -1)).alias("n"))
        lines = lines.crossJoin(F.broadcast(n_last)).where(
            ~((F.col("line") == F.col("n")) & (F.col("raw") == ""))
        ).drop("n")
    else:
        if spec.encoding.upper() not in ("UTF-8", "UTF8", "US-ASCII"):
            log.warning("%s is %s but large: non-ASCII bytes in it are not decoded", spec.path, spec.encoding)
        text = spark.read.text(spec.path).select(
            F.spark_partition_id().alias("pid"),
            F.monotonically_increasing_id().alias("mid"),
            "value",
        )
        # monotonically_increasing_id puts the partition index in the upper 31 bits; the rest
        # is the row's position within its partition, and partitions of one file follow file order.
        offsets = (
            text.groupBy("pid").count()
            .select(
                "pid",
                (F.sum("count").over(Window.orderBy("pid").rowsBetween(Window.unboundedPreceding, -1)))
                .alias("offset"),
            )
            .fillna(0, ["offset"])
        )
        lines = text.join(F.broadcast(offsets), on="pid", how="inner").select(
            (F.col("offset") + (F.col("mid") - F.shiftleft(F.col("pid").cast("long"), 33)) + 1)
            .cast("long").alias("line"),
            F.col("value").alias("raw"),
        )
    # CRLF files and a UTF-8 BOM are common after a round trip through a spreadsheet.
    raw = F.regexp_replace("raw", "\r$", "")
    raw = F.when(F.col("line") == 1, F.regexp_replace(raw, "^\ufeff", "")).otherwise(raw)
    return lines.select("line", raw.alias("raw"))


def split_fields(lines: DataFrame, spec: FileSpec) -> DataFrame:
    """Add `f` (array<string> of raw fields) and `n_fields` to lines."""
    if spec.sep == "csv":
        # Quote-aware: count commas outside RFC 4180 quoted sections, then parse with from_csv.
        unquoted = F.regexp_replace("raw", r'"(?:[^"]|"")*"', "")
        n_fields = F.size(F.split(unquoted, ",", -1))
        schema = ", ".join(f"c{i} STRING" for i in range(len(spec.columns)))
        parsed = F.from_csv("raw", schema, {"escape": '"', "mode": "PERMISSIVE"})
        fields = F.array(*[parsed[f"c{i}"] for i in range(len(spec.columns))])
        balanced = (F.length("raw") - F.length(F.regexp_replace("raw", '"', ""))) % 2 == 0
        return lines.select(
            "line", "raw", fields.alias("f"),
            F.when(balanced, n_fields).otherwise(F.lit(-1)).alias("n_fields"),
        )
    pattern = {"::": "::", "\t": "\t", "|": r"\|"}[spec.sep]
    parts = F.split("raw", pattern, -1)
    return lines.select("line", "raw", parts.alias("f"), F.size(parts).alias("n_fields"))


# ---------------------------------------------------------------------------------------------
# Typing and checks


def _field(i: int) -> Column:
    # get() is null past the end (a short line), where [] raises under ANSI mode.
    return F.trim(F.get(F.col("f"), i))


def _id(i: int) -> Column:
    return _field(i).try_cast("int")


def _id_reasons(*idx: int) -> list[tuple[Column, str]]:
    out: list[tuple[Column, str]] = []
    for i in idx:
        s = _field(i)
        out.append(((s.isNull()) | (s == ""), "null_key"))
    for i in idx:
        s = _field(i)
        out.append((~s.rlike(r"^[+-]?\d+$"), "non_numeric_id"))
    for i in idx:
        # Zero, negative, or beyond int range (try_cast gives null on overflow).
        out.append((_id(i).isNull() | (_id(i) <= 0), "bad_id"))
    return out


def _timestamp_reasons(i: int, now: int) -> list[tuple[Column, str]]:
    ts = _field(i).try_cast("long")
    return [(ts.isNull() | (ts < 0) | (ts > F.lit(now + FUTURE_SLACK_SECONDS)), "bad_timestamp")]


def _with_reason(df: DataFrame, spec: FileSpec, checks: list[tuple[Column, str]]) -> DataFrame:
    """First failing check wins; the order of `checks` is the order of precedence."""
    base = [
        (F.col("raw").isNull() | (F.trim("raw") == ""), "blank_line"),
        (F.col("n_fields") == -1, "malformed"),
        (F.col("n_fields") != len(spec.columns), "wrong_column_count"),
        # Undecodable bytes became U+FFFD; keep the row's text but do not load it.
        (F.col("raw").contains("\ufffd"), "bad_encoding"),
    ]
    reason = reduce(
        lambda acc, cr: acc.when(cr[0], F.lit(cr[1])), base[1:] + checks, F.when(base[0][0], F.lit(base[0][1]))
    )
    return df.withColumn("reason", reason.otherwise(F.lit(None).cast("string")))


def _data_lines(df: DataFrame, spec: FileSpec) -> DataFrame:
    return df.where(F.col("line") > 1) if spec.header else df


def check_ratings(df: DataFrame, spec: FileSpec, layout: Layout, now: int) -> DataFrame:
    rating = _field(2).try_cast("double")
    lo, hi, step = layout.rating_min, layout.rating_max, layout.rating_step
    checks = _id_reasons(0, 1) + [
        (rating.isNull() | F.isnan(rating) | (F.abs(rating) == float("inf")), "bad_rating"),
        ((rating < lo) | (rating > hi), "rating_off_scale"),
        # Compare in integer steps so 3.5 on a 0.5 scale is exact.
        (F.abs((rating - lo) / step - F.round((rating - lo) / step)) > 1e-9, "rating_off_step"),
    ]
    has_time = len(spec.columns) > 3  # predefined split files may omit the timestamp
    if has_time:
        checks += _timestamp_reasons(3, now)
    out = _with_reason(_data_lines(df, spec), spec, checks)
    rated_at = F.timestamp_seconds(_field(3).try_cast("long")) if has_time else F.lit(None).cast("timestamp")
    return out.select(
        "line", "raw", "reason",
        _id(0).alias("userId"), _id(1).alias("movieId"), rating.alias("rating"), rated_at.alias("rated_at"),
    )


def check_split_files(spark: SparkSession, train_spec: FileSpec, test_spec: FileSpec, movie_ids: DataFrame,
                      scale: tuple[float, float, float], whole_file_max_bytes: int,
                      now: int | None = None) -> dict[str, CheckedFile]:
    """Check predefined train and test rating files like ingest checks ratings.

    On top: a test pair that is also in train is rejected as 'in_train' (it would leak).
    """
    import os

    now = int(now if now is not None else time.time())
    layout = Layout("split", "", scale[0], scale[1], scale[2])
    out = {}
    for role, spec in (("train", train_spec), ("test", test_spec)):
        lines = split_fields(read_lines(spark, spec, whole_file_max_bytes, os.path.getsize(spec.path)), spec)
        df = reject_unknown(check_ratings(lines, spec, layout, now), movie_ids, "movieId", "unknown_movie")
        df = reject_duplicates(df, ["userId", "movieId"], [F.col("rated_at").desc_nulls_last(), F.col("line").desc()])
        if role == "test":
            train_pairs = out["train"].df.where(F.col("reason").isNull()).select(
                "userId", "movieId", F.lit(True).alias("_in_train"))
            df = df.join(train_pairs, ["userId", "movieId"], "left").withColumn(
                "reason", F.when(F.col("reason").isNull() & F.col("_in_train"), F.lit("in_train"))
                .otherwise(F.col("reason"))).drop("_in_train")
        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        out[role] = CheckedFile("ratings", os.path.basename(spec.path), df, _count_reasons(df))
        log.info("checked %s (%s): %s", out[role].source, role, out[role].counts)
    return out


YEAR_RE = r"\((\d{4})(?:[-\u2013]\d{0,4})?\)\s*$"


def check_movies(df: DataFrame, spec: FileSpec, layout: Layout) -> DataFrame:
    title = _field(1)
    checks = _id_reasons(0) + [((title.isNull()) | (title == ""), "empty_value")]
    out = _with_reason(_data_lines(df, spec), spec, checks)
    if layout.name == "100k":
        flags = [
            F.when(_field(len(ML100K_ITEM_FIXED) + i) == "1", F.lit(g))
            for i, g in enumerate(layout.genre_names)
            if g != "unknown"  # u.genre's "unknown" is ml-100k's "(no genres listed)"
        ]
        genres = F.filter(F.array(*flags), lambda g: g.isNotNull())
    else:
        genres = F.filter(F.split(_field(2), r"\|"), lambda g: (g != "") & (g != NO_GENRES))
    year = F.regexp_extract(title, YEAR_RE, 1)
    return out.select(
        "line", "raw", "reason",
        _id(0).alias("movieId"),
        title.alias("title"),
        F.when(year != "", year.cast("int")).alias("year"),
        F.coalesce(genres, F.array().cast("array<string>")).alias("genres"),
    )


def check_tags(df: DataFrame, spec: FileSpec, now: int) -> DataFrame:
    tag = _field(2)
    checks = _id_reasons(0, 1) + [((tag.isNull()) | (tag == ""), "empty_value")] + _timestamp_reasons(3, now)
    out = _with_reason(_data_lines(df, spec), spec, checks)
    return out.select(
        "line", "raw", "reason", _id(0).alias("userId"), _id(1).alias("movieId"), tag.alias("tag"),
        F.timestamp_seconds(_field(3).try_cast("long")).alias("tagged_at"),
    )


def check_users(df: DataFrame, spec: FileSpec, layout: Layout) -> DataFrame:
    cols = spec.columns
    pos = {c: i for i, c in enumerate(cols)}
    age = _field(pos["age"]).try_cast("int")
    checks = _id_reasons(0) + [(age.isNull() | (age < 0), "empty_value")]
    out = _with_reason(_data_lines(df, spec), spec, checks)
    return out.select(
        "line", "raw", "reason", _id(0).alias("userId"),
        _field(pos["gender"]).alias("gender"), age.alias("age"),
        _field(pos["occupation"]).alias("occupation"), _field(pos["zip"]).alias("zip"),
    )


def check_links(df: DataFrame, spec: FileSpec) -> DataFrame:
    tmdb = _field(2)
    checks = _id_reasons(0) + [
        ((tmdb != "") & tmdb.isNotNull() & _field(2).try_cast("int").isNull(), "non_numeric_id"),
    ]
    out = _with_reason(_data_lines(df, spec), spec, checks)
    return out.select(
        "line", "raw", "reason", _id(0).alias("movieId"), _field(1).alias("imdbId"),
        _field(2).try_cast("int").alias("tmdbId"),
    )


def check_genome_tags(df: DataFrame, spec: FileSpec) -> DataFrame:
    checks = _id_reasons(0) + [((_field(1).isNull()) | (_field(1) == ""), "empty_value")]
    out = _with_reason(_data_lines(df, spec), spec, checks)
    return out.select("line", "raw", "reason", _id(0).alias("tagId"), _field(1).alias("tag"))


def check_genome_scores(df: DataFrame, spec: FileSpec) -> DataFrame:
    rel = _field(2).try_cast("double")
    checks = _id_reasons(0, 1) + [
        (rel.isNull() | F.isnan(rel) | (rel < 0) | (rel > 1), "bad_rating"),
    ]
    out = _with_reason(_data_lines(df, spec), spec, checks)
    return out.select(
        "line", "raw", "reason", _id(0).alias("movieId"), _id(1).alias("tagId"), rel.alias("relevance")
    )


def reject_unknown(df: DataFrame, known: DataFrame, key: str, reason: str) -> DataFrame:
    """Mark good rows whose `key` is not among `known`'s keys."""
    flags = known.select(F.col(key), F.lit(True).alias("_known"))
    joined = df.join(flags, on=key, how="left")
    return joined.withColumn(
        "reason",
        F.when(F.col("reason").isNull() & F.col("_known").isNull(), F.lit(reason)).otherwise(F.col("reason")),
    ).drop("_known")


def reject_duplicates(df: DataFrame, keys: list[str], order: list[Column]) -> DataFrame:
    """Among good rows sharing `keys`, keep the first by `order`; mark the rest 'duplicate'."""
    good = F.col("reason").isNull()
    w = Window.partitionBy(*keys, good.alias("_g")).orderBy(*order)
    rn = F.row_number().over(w)
    return df.withColumn(
        "reason", F.when(good & (rn > 1), F.lit("duplicate")).otherwise(F.col("reason"))
    )


# ---------------------------------------------------------------------------------------------
# The whole dataset


@dataclass
class CheckedFile:
    role: str
    source: str
    df: DataFrame  # line, raw, reason, typed columns
    counts: dict[str, int] = field(default_factory=dict)  # reason ("loaded" for good) -> rows

    @property
    def input_rows(self) -> int:
        return sum(self.counts.values())

    @property
    def rejected(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "loaded")

    def loaded(self) -> DataFrame:
        return self.df.where(F.col("reason").isNull()).select(*TABLE_SCHEMAS[TABLE_OF[self.role]].fieldNames())

    def rejects(self, run_id: str) -> DataFrame:
        return self.df.where(F.col("reason").isNotNull()).select(
            F.lit(run_id).alias("run_id"), F.lit(self.source).alias("source"),
            F.col("line").cast("long").alias("line"), "raw", "reason",
        )


TABLE_OF = {
    "ratings": "ratings", "movies": "movies", "tags": "tags", "users": "users",
    "links": "links", "genome_scores": "genome", "genome_tags": "genome_tags",
}


def _count_reasons(df: DataFrame) -> dict[str, int]:
    rows = df.groupBy(F.coalesce("reason", F.lit("loaded")).alias("r")).count().collect()
    return {r["r"]: int(r["count"]) for r in rows}  # one row per reason: bounded


def check_dataset(spark: SparkSession, layout: Layout, whole_file_max_bytes: int, now: int | None = None,
                  known_movies: DataFrame | None = None) -> dict[str, CheckedFile]:
    """Read and check every file of the layout; DataFrames are persisted and counted.

    `known_movies` (movieId; the warehouse's movies in an incremental run) also count as known
    movies, and stand in for the movies file when the layout has none.
    """

    now = int(now if now is not None else time.time())
    checked: dict[str, CheckedFile] = {}

    def lines_of(spec: FileSpec) -> DataFrame:
        size = file_size(spec.path) if fs_exists(spec.path) else whole_file_max_bytes + 1
        return split_fields(read_lines(spark, spec, whole_file_max_bytes, size), spec)

    def finish(role: str, df: DataFrame) -> None:
        spec = layout.files[role]
        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        cf = CheckedFile(role, spec.path.rstrip("/").rsplit("/", 1)[-1], df, _count_reasons(df))
        checked[role] = cf
        log.info(
            "checked %s: %d input rows, %d loaded, rejected by reason %s",
            cf.source, cf.input_rows, cf.counts.get("loaded", 0),
            {k: v for k, v in sorted(cf.counts.items()) if k != "loaded"} or "none",
        )

    f = layout.files
    movie_ids = known_movies
    if "movies" in f:
        movies = check_movies(lines_of(f["movies"]), f["movies"], layout)
        # A movie listed twice keeps its last line: later lines in MovieLens files are corrections.
        finish("movies", reject_duplicates(movies, ["movieId"], [F.col("line").desc()]))
        movie_ids = checked["movies"].loaded().select("movieId")
        if known_movies is not None:
            movie_ids = movie_ids.unionByName(known_movies).distinct()
    if movie_ids is None:
        raise ValueError(f"{layout.root}: no movies file and no known movies to check movie ids against")

    ratings = check_ratings(lines_of(f["ratings"]), f["ratings"], layout, now)
    ratings = reject_unknown(ratings, movie_ids, "movieId", "unknown_movie")
    # Keep the latest rating of a (user, movie); ties go to the later line.
    finish("ratings", reject_duplicates(
        ratings, ["userId", "movieId"], [F.col("rated_at").desc(), F.col("line").desc()]
    ))
    if "tags" in f:
        tags = reject_unknown(check_tags(lines_of(f["tags"]), f["tags"], now), movie_ids, "movieId", "unknown_movie")
        finish("tags", reject_duplicates(
            tags, ["userId", "movieId", "tag"], [F.col("tagged_at").desc(), F.col("line").desc()]
        ))
    if "users" in f:
        finish("users", reject_duplicates(
            check_users(lines_of(f["users"]), f["users"], layout), ["userId"], [F.col("line").desc()]
        ))
    if "links" in f:
        links = reject_unknown(check_links(lines_of(f["links"]), f["links"]), movie_ids, "movieId", "unknown_movie")
        finish("links", reject_duplicates(links, ["movieId"], [F.col("line").desc()]))
    if "genome_tags" in f:
        gt = check_genome_tags(lines_of(f["genome_tags"]), f["genome_tags"])
        finish("genome_tags", reject_duplicates(gt, ["tagId"], [F.col("line").desc()]))
        gs = check_genome_scores(lines_of(f["genome_scores"]), f["genome_scores"])
        gs = reject_unknown(gs, movie_ids, "movieId", "unknown_movie")
        gs = reject_unknown(gs, checked["genome_tags"].loaded().select("tagId"), "tagId", "unknown_tag")
        gs = reject_duplicates(gs, ["movieId", "tagId"], [F.col("line").desc()])
        # The genome table carries the tag text, so analysts need no second join.
        gs = gs.join(checked["genome_tags"].loaded().select("tagId", "tag"), on="tagId", how="left")
        finish("genome_scores", gs)
    return checked


def enforce_threshold(checked: dict[str, CheckedFile], threshold: float) -> None:
    total = sum(c.input_rows for c in checked.values())
    rejected = sum(c.rejected for c in checked.values())
    share = rejected / total if total else 0.0
    if share > threshold:
        worst = max(checked.values(), key=lambda c: c.rejected)
        reasons = {k: v for k, v in worst.counts.items() if k != "loaded"}
        raise IngestError(
            f"{rejected:,} of {total:,} input rows ({share:.1%}) were rejected, above the "
            f"threshold of {threshold:.1%}; no table was changed. Most came from {worst.source}: "
            f"{reasons}. Check the file's format and layout, or raise ingest.reject_threshold."
        )
    if total == 0:
        raise IngestError("the input has no data rows (empty or header-only files)")
