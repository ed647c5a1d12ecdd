"""`movierec maintain`: compaction, Z-ordering and VACUUM of the warehouse's Delta tables.

Never run implicitly by a write: compaction rewrites files (a new table version) and VACUUM
deletes the files old versions need, so both are the operator's call, scheduled apart from
the pipeline. Per table:
- OPTIMIZE: small files bin-packed; `recommendations` Z-ordered by userId, so a service's
  lookup of one user reads few files (data skipping on per-file min/max of userId).
- VACUUM with a retention of at least 168 hours (Delta's default safety margin): files that
  a version younger than that still references are kept, so `--as-of` time travel within the
  retention window and readers in the middle of a query keep working.
Before that, the same retention prunes old runs (`prune_runs`): a run that finished more than
`retain_hours` ago and that no row of `latest` points at loses its saved models
(`<warehouse>/_models/<run_id>`) and its rows of the per-run intermediates (similar_movies,
rating_splits, features; a table written before those had a run_id column is left alone). Its
runs, metrics and other output rows stay. Only directories named after a run of `runs` are
removed, never a legacy model directory (`_models/<name>` holding a saved model's `metadata`).
"""

from __future__ import annotations

import contextlib
import logging
import time

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from . import tables
from .config import join_path

log = logging.getLogger(__name__)

# Delta refuses shorter retentions unless its safety check is switched off; so do we.
MIN_RETAIN_HOURS = 168.0
ZORDER = {"recommendations": ["userId"], "top_n": ["userId"], "predictions": ["userId"]}


# Per-run intermediates whose old runs' rows are deleted (when the table has a run_id column).
PRUNED_TABLES = ("similar_movies", "rating_splits", "features")
MODELS_DIR = "_models"


class MaintainError(ValueError):
    pass


class MaintainRows(list):
    """maintain()'s rows, one dict per table (a plain list as before), with `pruned`: what
    prune_runs removed (see there), or None when pruning did not run."""

    pruned: dict | None = None


class _HadoopFs:
    """Listing and recursive delete on the warehouse's filesystem (local, s3a://, abfss://, ...)
    through the Hadoop FileSystem API of the session's JVM: the one Spark saved the models with."""

    def __init__(self, spark: SparkSession, uri: str):
        sc = spark.sparkContext
        self._jvm = sc._jvm
        self._root = self._jvm.org.apache.hadoop.fs.Path(uri)
        self._fs = self._root.getFileSystem(sc._jsc.hadoopConfiguration())

    def _path(self, uri: str):
        return self._jvm.org.apache.hadoop.fs.Path(uri)

    def exists(self, uri: str) -> bool:
        return bool(self._fs.exists(self._path(uri)))

    def child_dirs(self, uri: str) -> dict[str, str]:
        """name -> full path of the directories directly under `uri` ({} when it does not exist)."""
        if not self.exists(uri):
            return {}
        return {st.getPath().getName(): st.getPath().toString()
                for st in self._fs.listStatus(self._path(uri)) if st.isDirectory()}

    def delete(self, uri: str) -> bool:
        return bool(self._fs.delete(self._path(uri), True))


# VACUUM lists and diffs a table's files with this many tasks; Spark's default (10000) made the
# VACUUM of a one-file table run 100,066 tasks (201 s on a busy 2-core machine; 89 tasks and
# 13 s with the cores' count).
_LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"


@contextlib.contextmanager
def _listing_parallelism(spark: SparkSession):
    """Within the block, list with as many tasks as the cluster has cores, unless the user set it."""
    if spark.sparkContext.getConf().contains(_LISTING_PARALLELISM):
        yield
        return
    before = spark.conf.get(_LISTING_PARALLELISM)
    spark.conf.set(_LISTING_PARALLELISM, str(max(2, spark.sparkContext.defaultParallelism)))
    try:
        yield
    finally:
        spark.conf.set(_LISTING_PARALLELISM, before)


def _columns(spark: SparkSession, path: str) -> set[str]:
    return set(spark.read.format("delta").load(path).columns)


def prune_runs(spark: SparkSession, warehouse: str, retain_hours: float, row_tables=PRUNED_TABLES,
               models: bool = True) -> dict:
    """Remove what runs older than `retain_hours` left behind, except runs `latest` points at.

    A run is old when its `finished_at` is more than `retain_hours` ago (a running run has none:
    never old). For each old run not named by any row of `latest`: its model directory
    `<warehouse>/_models/<run_id>` (when `models`) and its rows of `row_tables` that have a
    run_id column. Returns {"runs": old runs something was removed from, "model_dirs": paths
    removed, "rows": {table: rows deleted}, "kept": old runs kept because `latest` points at
    them, "retain_hours": retain_hours}.
    """
    out = {"runs": [], "model_dirs": [], "rows": {}, "kept": [], "retain_hours": retain_hours}
    runs_path = tables.table_path(warehouse, "runs")
    if not tables.table_exists(spark, runs_path):
        return out
    # Ages from epoch seconds: no time zone enters the comparison.
    age_hours = (F.lit(time.time()) - F.col("finished_at").cast("double")) / 3600.0
    old = {r[0] for r in spark.read.format("delta").load(runs_path)
           .where(F.col("finished_at").isNotNull() & (age_hours > float(retain_hours)))
           .select("run_id").distinct().collect()}
    latest_path = tables.table_path(warehouse, "latest")
    pointed = set()
    if tables.table_exists(spark, latest_path):
        pointed = {r[0] for r in spark.read.format("delta").load(latest_path).select("run_id").distinct().collect()}
    out["kept"] = sorted(old & pointed)
    expired = sorted(old - pointed)
    if not expired:
        return out
    touched = set()
    if models:
        fs = _HadoopFs(spark, warehouse)
        for name, path in sorted(fs.child_dirs(join_path(warehouse, MODELS_DIR)).items()):
            if name not in expired:
                continue
            if fs.exists(join_path(path, "metadata")):
                # A model saved straight under _models (before per-run model directories) whose
                # name happens to be a run id: not a run's directory.
                log.warning("prune: %s looks like a saved model, not a run's models: kept", path)
                continue
            if fs.delete(path):
                out["model_dirs"].append(path)
                touched.add(name)
                log.info("prune: removed models of run %s (%s)", name, path)
    for name in row_tables:
        path = tables.table_path(warehouse, name)
        if not tables.table_exists(spark, path) or "run_id" not in _columns(spark, path):
            continue
        cond = F.col("run_id").isin(expired)
        present = {r[0]: r[1] for r in spark.read.format("delta").load(path).where(cond)
                   .groupBy("run_id").count().collect()}
        if not present:
            continue
        DeltaTable.forPath(spark, path).delete(cond)
        out["rows"][name] = sum(present.values())
        touched |= set(present)
        log.info("prune: deleted %s rows of %s (runs %s)", f"{out['rows'][name]:,}", name, ", ".join(sorted(present)))
    out["runs"] = sorted(touched)
    if out["kept"]:
        log.info("prune: kept runs %s older than %g hours: table `latest` points at them",
                 ", ".join(out["kept"]), retain_hours)
    return out


def warehouse_tables(spark: SparkSession, warehouse: str) -> list[str]:
    """Names of the contract's tables that exist in the warehouse."""
    return [n for n in tables.TABLE_SCHEMAS if tables.table_exists(spark, tables.table_path(warehouse, n))]


def maintain(spark: SparkSession, warehouse: str, retain_hours: float = MIN_RETAIN_HOURS,
             only: list[str] | None = None, vacuum: bool = True, prune: bool | None = None) -> MaintainRows:
    """Prune old runs, then OPTIMIZE (Z-ORDER where listed) and VACUUM each table.

    One dict of figures per table (`pruned_rows`: rows of old runs deleted from it); the list's
    `pruned` attribute is prune_runs' answer. `prune` defaults to `vacuum` (`--no-vacuum`,
    "compact only", deletes nothing); with `only`, just those tables' rows are pruned and no
    model directory is removed.
    """
    if retain_hours < MIN_RETAIN_HOURS:
        raise MaintainError(f"--retain-hours {retain_hours:g} is below the safe minimum of {MIN_RETAIN_HOURS:g} "
                            "hours: readers and --as-of time travel could lose files they need")
    present = warehouse_tables(spark, warehouse)
    if not present:
        raise MaintainError(f"no movierec tables under {warehouse}: is it a warehouse the pipeline wrote?")
    names = present
    if only:
        unknown = sorted(set(only) - set(present))
        if unknown:
            raise MaintainError(f"not tables of {warehouse}: {', '.join(unknown)} (present: {', '.join(present)})")
        names = [n for n in present if n in only]
    out = MaintainRows()
    if vacuum if prune is None else prune:
        out.pruned = prune_runs(spark, warehouse, retain_hours,
                                row_tables=[n for n in PRUNED_TABLES if n in names], models=not only)
    deleted = (out.pruned or {}).get("rows", {})
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        dt = DeltaTable.forPath(spark, tables.table_path(warehouse, name))
        before = dt.detail().select("numFiles").first()[0]
        opt = dt.optimize()
        metrics = opt.executeZOrderBy(*ZORDER[name]) if name in ZORDER else opt.executeCompaction()
        m = metrics.select("metrics.numFilesAdded", "metrics.numFilesRemoved").first()
        removed = None
        if vacuum:
            with _listing_parallelism(spark):
                dt.vacuum(retain_hours)
            # VACUUM logs START/END commits with the number of deleted files.
            last = dt.history(1).select("operation", "operationMetrics").first()
            if last and last[0] == "VACUUM END":
                removed = int((last[1] or {}).get("numDeletedFiles", 0))
        after = dt.detail().select("numFiles").first()[0]
        row = {"table": name, "files_before": before, "files_after": after, "added": m[0], "removed": m[1],
               "zorder": ",".join(ZORDER.get(name, [])), "vacuumed": removed,
               "pruned_rows": deleted.get(name, 0), "seconds": round(time.perf_counter() - t0, 2)}
        log.info("[%d/%d] %s: %s", i, len(names), name, row)
        out.append(row)
    return out
