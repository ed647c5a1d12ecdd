"""MovieLens files -> validated Delta tables, with every bad row accounted for in `rejects`.

The flow per file: read physical lines with their line numbers (`read_lines`), split them into raw
string fields (`split_fields`), type and check them (`check_<role>`), which adds a `reason` column:
null for a good row, a reason code for a rejected one. Nothing is filtered silently, so for every
file, input rows = loaded rows + rejected rows.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from . import tables
from .config import Config, is_uri
from .download import safe_extract
from .fs import exists as fs_exists
from .fs import file_size, read_head
from .layouts import ML100K_ITEM_FIXED, FileSpec, Layout, detect_layout
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
        # A line's number is the lines in earlier partitions (partitions of one file follow file
        # order) plus its position in its own partition. monotonically_increasing_id numbers the
        # rows of a partition consecutively from that partition's first id, so the position is
        # mid - min(mid): no bit layout assumed, one grouped pass, one row per partition on the driver.
        offsets = (
            text.groupBy("pid").agg(F.count(F.lit(1)).alias("count"), F.min("mid").alias("base"))
            .select(
                "pid", "base",
                (F.sum("count").over(Window.orderBy("pid").rowsBetween(Window.unboundedPreceding, -1)))
                .alias("offset"),
            )
            .fillna(0, ["offset"])
        )
        lines = text.join(F.broadcast(offsets), on="pid", how="inner").select(
            (F.col("offset") + (F.col("mid") - F.col("base")) + 1).cast("long").alias("line"),
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


# Formats a MovieLens text file is sometimes saved in by mistake, by their first bytes.
_NOT_TEXT = (
    (b"\x1f\x8b", "gzip-compressed: decompress it (gunzip) first"),
    (b"PK\x03\x04", "a zip archive: pass the .zip itself as --input, or extract it"),
    (b"\xff\xfe", "UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8"),
)


def sniff_format(spec: FileSpec) -> None:
    """Refuse, with one line saying what to do, a file that is not text at all: every line of it
    would be rejected, and the reject threshold would report a symptom, not the cause."""
    if not fs_exists(spec.path):
        return
    head = read_head(spec.path, 4)
    for magic, what in _NOT_TEXT:
        if head.startswith(magic):
            raise IngestError(f"{spec.path}: the {spec.role} file is {what}")


def check_dataset(spark: SparkSession, layout: Layout, whole_file_max_bytes: int, now: int | None = None,
                  known_movies: DataFrame | None = None) -> dict[str, CheckedFile]:
    """Read and check every file of the layout; DataFrames are persisted and counted.

    `known_movies` (movieId; the warehouse's movies in an incremental run) also count as known
    movies, and stand in for the movies file when the layout has none.
    """

    now = int(now if now is not None else time.time())
    checked: dict[str, CheckedFile] = {}

    def lines_of(spec: FileSpec) -> DataFrame:
        sniff_format(spec)
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


# ---------------------------------------------------------------------------------------------
# Orchestration: resolve the input, check every file, then write the tables

INGEST_ORDER = ["movies", "ratings", "tags", "users", "links", "genome_tags", "genome_scores"]


def resolve_input(cfg: Config, input_path: str) -> Path:
    """A MovieLens directory, or a GroupLens .zip extracted once (safely) under data_dir. A URI
    (s3a://, abfss://, gs://, hdfs://) names a directory, read where it lies.

    A zip is extracted into `<dest>.partial-<pid>` and renamed to `<dest>` when complete, so
    `<dest>` exists only whole: a run killed mid-extraction leaves a partial directory, which
    the next run removes before extracting again.
    """
    if is_uri(input_path):
        from .fs import HadoopPath

        p = HadoopPath(input_path, SparkSession.getActiveSession())
        if not p.is_dir():
            raise FileNotFoundError(f"--input {input_path}: not a directory there (an object-store input is a "
                                    "MovieLens directory; a .zip must be local)")
        return p
    p = Path(input_path)
    if p.is_dir():
        return p
    if p.suffix.lower() == ".zip" and p.is_file():
        st = p.stat()
        dest = Path(cfg.paths.data_dir).resolve() / ".extracted" / f"{p.stem}-{st.st_size}-{int(st.st_mtime)}"
        if dest.is_dir() and any(not c.name.startswith(".extract-") for c in dest.iterdir()):
            log.info("reusing %s extracted at %s", p.name, dest)
            return dest
        if dest.is_dir():  # an older release's half extraction (only its temporary directory)
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in dest.parent.glob(f"{dest.name}.partial-*"):
            if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
                log.info("removing %s: an extraction that did not finish", stale)
                shutil.rmtree(stale, ignore_errors=True)
        tmp = dest.parent / f"{dest.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        root = safe_extract(p, tmp, max_uncompressed_bytes=cfg.ingest.max_uncompressed_bytes)
        os.rename(tmp, dest)
        return dest / root.relative_to(tmp)
    raise FileNotFoundError(f"--input {input_path}: not a directory or a .zip file")


def _pid_alive(pid: str) -> bool:
    """Whether the process that named a partial extraction is still running (it may be extracting)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid()


def ingest_dataset(spark: SparkSession, cfg: Config, input_path: str, run_id: str, now: int | None = None) -> dict:
    """Ingest a MovieLens dataset into the warehouse (writes its tables and `rejects`). Returns
    per-file counts.

    All files are checked (and counted) before any table is touched, so a rejected share above
    the threshold leaves the warehouse exactly as it was.
    """
    incremental, replace, wh = cfg.ingest.incremental, cfg.ingest.replace, cfg.paths.warehouse
    layout = detect_layout(resolve_input(cfg, input_path), partial=incremental)
    source = source_fingerprint(layout, input_path)
    if not incremental:
        check_same_source(spark, wh, source, replace)
    known = None
    if incremental:
        if not tables.table_exists(spark, tables.table_path(cfg.paths.warehouse, "movies")):
            raise ValueError(f"--incremental: no movies table in {cfg.paths.warehouse}; ingest a full dataset first")
        known = tables.read_table(spark, cfg.paths.warehouse, "movies").select("movieId")
    checked = check_dataset(spark, layout, cfg.ingest.whole_file_max_bytes, now=now, known_movies=known)
    try:
        enforce_threshold(checked, cfg.ingest.reject_threshold)
        rejects = None
        for role in INGEST_ORDER:
            if role in checked:
                r = checked[role].rejects(run_id)
                rejects = r if rejects is None else rejects.unionByName(r)
        # No rejects, no commit (an unchanged incremental input leaves every table's version as
        # it was), unless a rerun of this run id must clear rejects it wrote before.
        if sum(c.rejected for c in checked.values()) or _has_run_rows(spark, wh, "rejects", run_id):
            tables.replace_where(spark, rejects, wh, "rejects", {"run_id": run_id})
        else:
            tables.ensure_table(spark, wh, "rejects")  # the table exists (empty) for readers
        # Each file's table is written on its own (a MERGE or an append and its Delta commit):
        # side by side, since a small table's write is mostly driver-side latency that leaves the
        # cores idle (ml-latest-small's five tables: about 8 s one after another).
        from .session import run_concurrently

        stats: dict[str, dict] = {}

        def write(role: str):
            def run():
                cf = checked[role]
                stats[role] = tables.upsert(spark, cf.loaded(), wh, TABLE_OF_ROLE.get(role, role), delete_missing=replace)
            return run

        roles = [role for role in INGEST_ORDER if role in checked]
        run_concurrently(spark, {role: write(role) for role in roles}, {})
        summary = {}
        for role in roles:
            cf = checked[role]
            summary[cf.source] = {
                "input": cf.input_rows,
                "loaded": cf.counts.get("loaded", 0),
                "rejected": cf.rejected,
                **stats[role],
            }
        if replace:  # a table the new dataset does not have holds nothing of it
            for role in INGEST_ORDER:
                name = TABLE_OF_ROLE.get(role, role)
                path = tables.table_path(wh, name)
                if role not in checked and tables.table_exists(spark, path):
                    from delta.tables import DeltaTable

                    DeltaTable.forPath(spark, path).delete()
                    log.info("%s: emptied (the replacing dataset has no %s file)", name, role)
        # Recorded when it says something new: an unchanged rerun commits nothing anywhere.
        if replace or any(v.get("inserted") or v.get("updated") or v.get("deleted") for v in summary.values()) \
                or not _recorded(spark, wh, source):
            record_source(spark, wh, source, run_id, "incremental" if incremental else "replace" if replace else "full")
        unknown = {k for c in checked.values() for k in c.counts if k != "loaded" and k not in REASONS}
        assert not unknown, f"reason codes outside REASONS: {unknown}"
        return summary
    finally:
        for cf in checked.values():
            cf.df.unpersist()


TABLE_OF_ROLE = {"genome_scores": "genome"}


@dataclass(frozen=True)
class Source:
    """What an ingest read: its layout, files with sizes, and a fingerprint of them (with a
    content hash of the ratings file) that tells two datasets apart wherever they are stored."""
    layout: str
    path: str
    files: dict
    fingerprint: str

    def describe(self) -> str:
        names = ", ".join(f"{n} ({s:,} bytes)" for n, s in sorted(self.files.items()))
        return f"{self.path} [{self.layout} layout: {names}]"


def source_fingerprint(layout: Layout, input_path: str) -> Source:
    """The fingerprint of a dataset: layout, file names and sizes, and the SHA-256 of the ratings
    file's bytes (of a local file; on an object store its name and size stand for it)."""
    import hashlib
    import json

    from .redact import redact_text

    files = {os.path.basename(spec.path): file_size(spec.path) for spec in layout.files.values()}
    h = hashlib.sha256(json.dumps([layout.name, sorted(files.items())]).encode())
    ratings = layout.files.get("ratings")
    if ratings is not None and os.path.isfile(ratings.path):
        with open(ratings.path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return Source(layout.name, redact_text(str(input_path)), files, h.hexdigest()[:32])


def check_same_source(spark: SparkSession, wh: str, source: Source, replace: bool) -> None:
    """A plain ingest into a warehouse that holds another dataset is refused: merged by key, two
    datasets' colliding ids would mix and the old rows would stay. `replace` lifts it."""
    if replace or not tables.table_exists(spark, tables.table_path(wh, "ratings")):
        return
    if tables.read_table(spark, wh, "ratings").isEmpty():
        return
    prev = None
    if tables.table_exists(spark, tables.table_path(wh, "sources")):
        prev = (tables.read_table(spark, wh, "sources").where(F.col("mode") != "incremental")
                .orderBy(F.col("ingested_at").desc()).first())
    from .redact import redact_text

    if prev is None:
        log.warning("warehouse %s has ratings but no record of their source (written before ingest recorded "
                    "sources): ingesting %s into it as the same dataset", redact_text(wh), source.describe())
        return
    if prev["fingerprint"] != source.fingerprint:
        import json

        old = Source(prev["layout"], prev["source"] or "?", json.loads(prev["files"]), prev["fingerprint"])
        raise IngestError(
            f"warehouse {redact_text(wh)} holds another dataset: {old.describe()}, ingested by run {prev['run_id']}; "
            f"this input is {source.describe()}. Pass --replace to replace it, --incremental to add this input's "
            "rows to it, or use another --warehouse")


def _recorded(spark: SparkSession, wh: str, source: Source) -> bool:
    path = tables.table_path(wh, "sources")
    return tables.table_exists(spark, path) and not tables.read_table(spark, wh, "sources").where(
        F.col("fingerprint") == source.fingerprint).isEmpty()


def record_source(spark: SparkSession, wh: str, source: Source, run_id: str, mode: str) -> None:
    import datetime as dt
    import json

    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    row = [(run_id, now, mode, source.layout, source.path, json.dumps(source.files, sort_keys=True),
            source.fingerprint)]
    tables.append(spark, spark.createDataFrame(row, schema=tables.TABLE_SCHEMAS["sources"]), wh, "sources")


def _has_run_rows(spark, wh: str, name: str, run_id: str) -> bool:
    path = tables.table_path(wh, name)
    return tables.table_exists(spark, path) and not tables.read_table(spark, wh, name).where(
        F.col("run_id") == run_id).isEmpty()
