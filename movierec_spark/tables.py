"""The table contract (README's table section mirrors this) and the one set of Delta writers.

Writers:
- `upsert`: MERGE only the rows that are new or changed, keyed; a rerun on the same data
  commits nothing, so downstream readers see no new versions.
- `replace_partition`: idempotent per-run rewrite (replaceWhere on run_id).
- `overwrite`: full replacement of a derived table.
Tables are created first with an explicit schema, a comment and properties, so a reader of an
empty warehouse sees the contract rather than an inferred schema.
"""

from __future__ import annotations

import logging
import threading

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from .config import join_path

log = logging.getLogger(__name__)

I, L, D, S = T.IntegerType(), T.LongType(), T.DoubleType(), T.StringType()
TS = T.TimestampType()


def _schema(*cols: tuple[str, T.DataType, bool]) -> T.StructType:
    return T.StructType([T.StructField(n, t, nullable) for n, t, nullable in cols])


TABLE_SCHEMAS: dict[str, T.StructType] = {
    "movies": _schema(("movieId", I, False), ("title", S, False), ("year", I, True),
                      ("genres", T.ArrayType(S, True), False)),
    "ratings": _schema(("userId", I, False), ("movieId", I, False), ("rating", D, False),
                       ("rated_at", TS, False)),
    "tags": _schema(("userId", I, False), ("movieId", I, False), ("tag", S, False), ("tagged_at", TS, False)),
    "users": _schema(("userId", I, False), ("gender", S, True), ("age", I, True),
                     ("occupation", S, True), ("zip", S, True)),
    "links": _schema(("movieId", I, False), ("imdbId", S, True), ("tmdbId", I, True)),
    "genome": _schema(("movieId", I, False), ("tagId", I, False), ("tag", S, True), ("relevance", D, False)),
    "genome_tags": _schema(("tagId", I, False), ("tag", S, False)),
    "rejects": _schema(("run_id", S, False), ("source", S, False), ("line", L, True), ("raw", S, True),
                       ("reason", S, False)),
    # One row per ingest: what was ingested, so a different dataset is never merged into this one.
    "sources": _schema(("run_id", S, False), ("ingested_at", TS, False), ("mode", S, False), ("layout", S, False),
                       ("source", S, True), ("files", S, False), ("fingerprint", S, False)),
    # One row per finished stage of a run, written as the stage ends: progress of a running run
    # and what `movierec run --resume` skips after a crash.
    "run_stages": _schema(("run_id", S, False), ("stage", S, False), ("seconds", D, False), ("result", S, True),
                          ("finished_at", TS, False)),
    "runs": _schema(("run_id", S, False), ("started_at", TS, False), ("finished_at", TS, True),
                    ("status", S, False), ("input", S, True), ("config", S, True),
                    ("stage_seconds", T.MapType(S, D), True), ("error", S, True),
                    # serve (learned from every rating, writes recommendations) or evaluate
                    # (held-out test part); null in rows written before runs had kinds.
                    ("kind", S, True)),
    # Per-run intermediates (rating_splits, similar_movies, features) carry the run that wrote
    # them: a later stage of run X reads X's rows, never a later run's.
    "rating_splits": _schema(("run_id", S, False), ("userId", I, False), ("movieId", I, False),
                             ("rating", D, False), ("rated_at", TS, True), ("split", S, False)),
    "predictions": _schema(("run_id", S, False), ("model", S, False), ("userId", I, False), ("movieId", I, False),
                           ("rating", D, True), ("prediction", D, False)),
    "als_user_factors": _schema(("userId", I, False), ("features", T.ArrayType(T.FloatType(), True), False)),
    "als_item_factors": _schema(("movieId", I, False), ("features", T.ArrayType(T.FloatType(), True), False)),
    "similar_movies": _schema(("run_id", S, False), ("movieId", I, False), ("similar_movieId", I, False),
                              ("rank", I, False), ("similarity", D, False)),
    "metrics": _schema(("run_id", S, False), ("model", S, False), ("metric", S, False), ("k", I, True),
                       ("value", D, True), ("split", S, False)),
    "top_n": _schema(("run_id", S, False), ("model", S, False), ("userId", I, False), ("rank", I, False),
                     ("movieId", I, False), ("score", D, True), ("because_movieId", I, True)),
    # Final lists of serve runs: source says which model brought the movie in; because_movieId
    # is the watched movie behind a content-sourced pick (null otherwise); predicted_rating is
    # the GBT hybrid's predicted rating of the pair (score is the ranker's).
    "recommendations": _schema(("run_id", S, False), ("userId", I, False), ("rank", I, False),
                               ("movieId", I, False), ("score", D, True), ("source", S, False),
                               ("because_movieId", I, True), ("predicted_rating", D, True)),
    "feature_importances": _schema(("run_id", S, False), ("feature", S, False), ("importance", D, False)),
    # The one place consumers look for the current output: per table, the run whose rows are
    # current and the table version that run's write produced (for time travel).
    "latest": _schema(("table_name", S, False), ("run_id", S, False), ("table_version", L, False),
                      ("updated_at", TS, False)),
}

# The hybrid's feature columns: part of the `features` table's contract, so defined here (the
# features module computes them; see its docstring for what each one is).
NB = 5  # the article's five neighbours
SUR = [f"sur{i}" for i in range(1, NB + 1)]
SMR = [f"smr{i}" for i in range(1, NB + 1)]
CSMR = [f"csmr{i}" for i in range(1, NB + 1)]
FEATURES = (["GAvg", "UAvg", "MAvg", "u_n", "m_n", "u_std", "m_std"] + SUR + ["n_sur"] + SMR + ["n_smr"]
            + CSMR + ["n_csmr", "baseline", "als", "content", "content_sim", "genre_aff"]
            # Issue 23's groups (features.py says what each is): kNN baselines, the rating day,
            # time, and implicit ALS's score of the pair. New columns: tables written before
            # them get them added (null) on their next write.
            + ["knn_item", "knn_item_n", "knn_user", "knn_user_n", "day_res", "day_n", "u_days", "u_tdev", "m_age",
               "implicit",
               # User demographics (ml-100k, ml-1m): -1 / 0 where the layout has none.
               "u_age", "u_male", "demo_res", "occ_res"])
# The hybrid's feature groups (benchmarks/feature_ablation.py leaves each out in turn;
# hybrid.exclude_features takes these names or single columns).
FEATURE_GROUPS = {
    "knn": ["knn_item", "knn_item_n", "knn_user", "knn_user_n"],
    "day": ["day_res", "day_n"],
    "time": ["u_days", "u_tdev", "m_age"],
    "implicit": ["implicit"],
    "demo": ["u_age", "u_male", "demo_res", "occ_res"],
}


def _features_schema() -> T.StructType:
    return _schema(("run_id", S, False), ("userId", I, False), ("movieId", I, False),
                   *[(f, D, True) for f in FEATURES],
                   ("label", D, True), ("split", S, False), ("fold", I, False))


TABLE_SCHEMAS["features"] = _features_schema()

TABLE_KEYS: dict[str, list[str]] = {
    "movies": ["movieId"],
    "ratings": ["userId", "movieId"],
    "tags": ["userId", "movieId", "tag"],
    "users": ["userId"],
    "links": ["movieId"],
    "genome": ["movieId", "tagId"],
    "genome_tags": ["tagId"],
    "runs": ["run_id"],
    "latest": ["table_name"],
}

TABLE_COMMENTS = {
    "movies": "MovieLens movies: year parsed from the title, genres as an array (empty when none listed)",
    "ratings": "Explicit ratings, one per (userId, movieId): the latest when the input repeated a pair",
    "tags": "User tag applications",
    "users": "User demographics (ml-1m, ml-100k only)",
    "links": "IMDb and TMDb ids per movie",
    "genome": "Tag genome relevance per (movie, tag) (ml-20m and later)",
    "genome_tags": "Tag genome vocabulary",
    "rejects": "Input rows that were not loaded, with source file, line, raw text and reason",
    "sources": "One row per ingest: mode (full, replace, incremental), layout, files and sizes, and the fingerprint that tells datasets apart",
    "runs": "One row per pipeline run: kind (serve/evaluate), status, input, config JSON, seconds per stage",
    "run_stages": "One row per finished stage of a run (seconds, result JSON): progress, and what --resume skips",
    "rating_splits": "Per run: the train/test split every model stage reads (deterministic per seed; a serve run's is all train)",
    "predictions": "Held-out rating predictions per run and model",
    "als_user_factors": "Explicit ALS user factors of the latest run",
    "als_item_factors": "Explicit ALS movie factors of the latest run",
    "similar_movies": "Per run: top-K content neighbours per movie by cosine of genre/tag/genome/year vectors",
    "metrics": "Metrics per run, model, metric and k; split 'test' (evaluate runs) or 'validation' (held out inside the run)",
    "top_n": "Evaluation top-N lists per run and ranking model (train movies excluded)",
    "recommendations": "Final top-N per user of serve runs (learned from all ratings, never a rated movie); rows of one run replaced together",
    "features": "Per run: hybrid model inputs per (user, movie): train rows out-of-fold (fold = the held-out fold), test and candidate rows from all of train",
    "feature_importances": "GBT feature importances of the hybrid model per run",
    "latest": "Pointer to the current output: per table, the latest succeeded run's run_id and the table version it wrote",
}

PROPERTIES = {
    "delta.appendOnly": "false",
    "movierec.contract": "v1",
}


def table_path(warehouse: str, name: str) -> str:
    return join_path(warehouse, name)


def table_exists(spark: SparkSession, path: str) -> bool:
    return DeltaTable.isDeltaTable(spark, path)


# Stages writing side by side (pipeline.overlap) may both find a table missing: one creates it.
_CREATE_LOCK = threading.Lock()
_WRITE_LOCKS: dict[str, threading.RLock] = {}
_LOCKS_LOCK = threading.Lock()


def _one_writer(fn):
    """One write at a time per table in this process: stages running side by side (pipeline.
    overlap) write the same tables (top_n, predictions, metrics), and two concurrent Delta
    transactions that both replace rows of a table without partitions can fail each other
    (ConcurrentAppendException), whatever their predicates."""
    import functools

    @functools.wraps(fn)
    def locked(spark, df, warehouse, name, *args, **kwargs):
        path = table_path(warehouse, name)
        with _LOCKS_LOCK:
            lock = _WRITE_LOCKS.setdefault(path, threading.RLock())
        with lock:
            return fn(spark, df, warehouse, name, *args, **kwargs)
    return locked


def ensure_table(spark: SparkSession, warehouse: str, name: str, schema: T.StructType | None = None,
                 partition_by: list[str] | None = None) -> str:
    """Create the table with its contract schema, comment and properties if it does not exist."""
    path = table_path(warehouse, name)
    schema = schema or TABLE_SCHEMAS[name]
    if table_exists(spark, path):
        _add_missing_columns(spark, path, name, schema)
        return path
    with _CREATE_LOCK:
        if table_exists(spark, path):
            return path
        b = DeltaTable.createIfNotExists(spark).location(path).addColumns(schema)
        if name in TABLE_COMMENTS:
            b = b.comment(TABLE_COMMENTS[name])
        for k, v in PROPERTIES.items():
            b = b.property(k, v)
        if partition_by:
            b = b.partitionedBy(*partition_by)
        b.execute()
        log.info("created table %s", path)
    return path


def _add_missing_columns(spark: SparkSession, path: str, name: str, schema: T.StructType) -> None:
    """Columns the contract added since the table was created, added (nullable, so rows written
    before read as null) before the first write that carries them: MERGE and plain appends do
    not evolve a schema by themselves."""
    have = {f.name for f in spark.read.format("delta").load(path).schema.fields}
    missing = [f for f in schema.fields if f.name not in have]
    if missing:
        cols = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
        spark.sql(f"ALTER TABLE delta.`{path}` ADD COLUMNS ({cols})")
        log.info("%s: added contract column(s) %s", name, ", ".join(f.name for f in missing))


def conform(df: DataFrame, name: str, schema: T.StructType | None = None) -> DataFrame:
    """Select the contract's columns, in order, cast to the contract's types."""
    schema = schema or TABLE_SCHEMAS[name]
    return df.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in schema.fields])


@_one_writer
def upsert(spark: SparkSession, df: DataFrame, warehouse: str, name: str, keys: list[str] | None = None,
           delete_missing: bool = False) -> dict:
    """MERGE new and changed rows by key; commit nothing when nothing changed.

    `delete_missing`: the table becomes `df` exactly, in one commit: rows whose key is not in
    `df` are deleted too (MERGE ... WHEN NOT MATCHED BY SOURCE DELETE); unchanged rows are not
    rewritten. Returns {"inserted": n, "updated": n[, "deleted": n]} (zeros when nothing changed).
    """
    keys = keys or TABLE_KEYS[name]
    path = ensure_table(spark, warehouse, name)
    src = conform(df, name)
    dt = DeltaTable.forPath(spark, path)
    if delete_missing:
        return _replace_rows(dt, src, name, keys)
    if _never_written(dt):
        # A fresh table: a plain append, no join against nothing.
        src.write.format("delta").mode("append").save(path)
        m = dt.history(1).select("operationMetrics").first()[0] or {}
        stats = {"inserted": int(m.get("numOutputRows", 0)), "updated": 0}
        log.info("%s: created with %s rows", name, f"{stats['inserted']:,}")
        return stats
    target = spark.read.format("delta").load(path)
    # Rows identical to what is stored are dropped first, so an unchanged rerun has no commit.
    cols = src.columns
    def same(c: str):
        # Maps have no equality in Spark SQL; their JSON form does.
        if isinstance(src.schema[c].dataType, T.MapType):
            return F.to_json(src[c]).eqNullSafe(F.to_json(target[c]))
        return src[c].eqNullSafe(target[c])

    changed = src.join(target, on=[same(c) for c in cols], how="left_anti")
    if changed.isEmpty():
        log.info("%s: no new or changed rows; no commit", name)
        return {"inserted": 0, "updated": 0}
    cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
    (dt.alias("t").merge(changed.alias("s"), cond)
     .whenMatchedUpdateAll()
     .whenNotMatchedInsertAll()
     .execute())
    m = dt.history(1).select("operationMetrics").first()[0] or {}
    stats = {"inserted": int(m.get("numTargetRowsInserted", 0)), "updated": int(m.get("numTargetRowsUpdated", 0))}
    log.info("%s: merged %s", name, stats)
    return stats


def _never_written(dt: DeltaTable) -> bool:
    """Whether the table's only commit is its creation (ensure_table's, which adds no file).

    Read from the newest commit's history entry, not from dt.detail()'s numFiles: detail builds
    the table's whole snapshot, about 0.8 s per call on a warm session here (5.7 s on the first),
    against 0.16 s for one history entry; each run and each ingest asks it of several tables."""
    last = dt.history(1).select("version", "operation").first()
    return last is not None and last["version"] == 0 and last["operation"] in ("CREATE TABLE", "CREATE OR REPLACE TABLE")


def _replace_rows(dt: DeltaTable, src: DataFrame, name: str, keys: list[str]) -> dict:
    def differs(c: str) -> str:
        # Maps have no equality in Spark SQL; their JSON form does.
        if isinstance(src.schema[c].dataType, T.MapType):
            return f"NOT (to_json(t.`{c}`) <=> to_json(s.`{c}`))"
        return f"NOT (t.`{c}` <=> s.`{c}`)"

    cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
    changed = " OR ".join(differs(c) for c in src.columns if c not in keys) or "FALSE"
    (dt.alias("t").merge(src.alias("s"), cond)
     .whenMatchedUpdateAll(condition=changed)
     .whenNotMatchedInsertAll()
     .whenNotMatchedBySourceDelete()
     .execute())
    m = dt.history(1).select("operation", "operationMetrics").first()
    m = (m[1] or {}) if m[0] == "MERGE" else {}
    stats = {"inserted": int(m.get("numTargetRowsInserted", 0)), "updated": int(m.get("numTargetRowsUpdated", 0)),
             "deleted": int(m.get("numTargetRowsDeleted", 0))}
    log.info("%s: replaced: %s", name, stats)
    return stats


@_one_writer
def replace_where(spark: SparkSession, df: DataFrame, warehouse: str, name: str, where: dict[str, str] | str,
                  schema: T.StructType | None = None, partition_by: list[str] | None = None,
                  fresh: bool = False) -> None:
    """Rewrite only the rows matching `where` (e.g. a run's rows of one model): idempotent reruns.

    `fresh`: the caller knows no row can match yet (its run id was just minted), so the rows
    are appended. Same result, without the scan for matching files replaceWhere makes: on
    ml-latest-small a 12k-row top_n write took 2.0 s with replaceWhere and 0.6 s appended.
    """
    path = ensure_table(spark, warehouse, name, schema, partition_by)
    w = conform(df, name, schema).write.format("delta")
    if fresh:
        w = w.mode("append")
    else:
        cond = where if isinstance(where, str) else " AND ".join(
            f"`{c}` = {sql_literal(v)}" for c, v in where.items())
        w = w.mode("overwrite").option("replaceWhere", cond)
    # Columns the contract added since the table was created (nullable) are merged in.
    w.option("mergeSchema", "true").save(path)


def sql_literal(v) -> str:
    """A SQL string literal with quotes doubled (run ids and model names in conditions)."""
    return "'" + str(v).replace("'", "''") + "'"


@_one_writer
def append(spark: SparkSession, df: DataFrame, warehouse: str, name: str) -> None:
    """Blind append: only for rows whose key cannot be in the table yet (e.g. a new run id)."""
    path = ensure_table(spark, warehouse, name)
    conform(df, name).write.format("delta").mode("append").save(path)


@_one_writer
def overwrite(spark: SparkSession, df: DataFrame, warehouse: str, name: str,
              schema: T.StructType | None = None) -> None:
    path = ensure_table(spark, warehouse, name, schema)
    conform(df, name, schema).write.format("delta").mode("overwrite").save(path)


def table_version(spark: SparkSession, warehouse: str, name: str) -> int:
    return int(DeltaTable.forPath(spark, table_path(warehouse, name)).history(1).select("version").first()[0])


def read_table(spark: SparkSession, warehouse: str, name: str) -> DataFrame:
    path = table_path(warehouse, name)
    if not table_exists(spark, path):
        raise FileNotFoundError(f"table '{name}' not found at {path}: run the pipeline first")
    return spark.read.format("delta").load(path)


# ----------------------------------------------------------------------------- the contract in Arrow

def arrow_type(t):
    """Spark SQL type -> the pyarrow type delta-rs writes as the same Delta type."""
    import pyarrow as pa

    if isinstance(t, T.IntegerType):
        return pa.int32()
    if isinstance(t, T.LongType):
        return pa.int64()
    if isinstance(t, T.DoubleType):
        return pa.float64()
    if isinstance(t, T.FloatType):
        return pa.float32()
    if isinstance(t, T.StringType):
        return pa.string()
    if isinstance(t, T.TimestampType):
        # Spark's TimestampType is Delta's `timestamp` (UTC instants); a zone-less pyarrow
        # timestamp would become `timestamp_ntz` instead.
        return pa.timestamp("us", tz="UTC")
    if isinstance(t, T.ArrayType):
        return pa.list_(arrow_type(t.elementType))
    if isinstance(t, T.MapType):
        return pa.map_(arrow_type(t.keyType), arrow_type(t.valueType))
    raise TypeError(f"no pyarrow type for {t}")


# Columns the serve/evaluate contract added: tables written before it lack them.


def arrow_schema(name: str):
    """The contract's schema of table `name` as a pyarrow schema (what a JVM-free writer such as
    delta-rs must write for Spark to read the same table)."""
    import pyarrow as pa

    return pa.schema([pa.field(f.name, arrow_type(f.dataType), f.nullable) for f in TABLE_SCHEMAS[name].fields])
