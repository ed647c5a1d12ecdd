"""`movierec maintain`: compaction, Z-ordering and VACUUM of the warehouse's Delta tables.

Never run implicitly by a write: compaction rewrites files (a new table version) and VACUUM
deletes the files old versions need, so both are the operator's call, scheduled apart from
the pipeline. Per table:
- OPTIMIZE: small files bin-packed; `recommendations` Z-ordered by userId, so a service's
  lookup of one user reads few files (data skipping on per-file min/max of userId).
- VACUUM with a retention of at least 168 hours (Delta's default safety margin): files that
  a version younger than that still references are kept, so `--as-of` time travel within the
  retention window and readers in the middle of a query keep working.
"""

from __future__ import annotations

import logging
import time

from delta.tables import DeltaTable
from pyspark.sql import SparkSession

from . import tables

log = logging.getLogger(__name__)

# Delta refuses shorter retentions unless its safety check is switched off; so do we.
MIN_RETAIN_HOURS = 168.0
ZORDER = {"recommendations": ["userId"], "top_n": ["userId"], "predictions": ["userId"]}


class MaintainError(ValueError):
    pass


def warehouse_tables(spark: SparkSession, warehouse: str) -> list[str]:
    """Names of the contract's tables that exist in the warehouse."""
    return [n for n in tables.TABLE_SCHEMAS if tables.table_exists(spark, tables.table_path(warehouse, n))]


def maintain(spark: SparkSession, warehouse: str, retain_hours: float = MIN_RETAIN_HOURS,
             only: list[str] | None = None, vacuum: bool = True) -> list[dict]:
    """OPTIMIZE (Z-ORDER where listed) and VACUUM each table; one dict of figures per table."""
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
    out = []
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        dt = DeltaTable.forPath(spark, tables.table_path(warehouse, name))
        before = dt.detail().select("numFiles").first()[0]
        opt = dt.optimize()
        metrics = opt.executeZOrderBy(*ZORDER[name]) if name in ZORDER else opt.executeCompaction()
        m = metrics.select("metrics.numFilesAdded", "metrics.numFilesRemoved").first()
        removed = None
        if vacuum:
            dt.vacuum(retain_hours)
            # VACUUM logs START/END commits with the number of deleted files.
            last = dt.history(1).select("operation", "operationMetrics").first()
            if last and last[0] == "VACUUM END":
                removed = int((last[1] or {}).get("numDeletedFiles", 0))
        after = dt.detail().select("numFiles").first()[0]
        row = {"table": name, "files_before": before, "files_after": after, "added": m[0], "removed": m[1],
               "zorder": ",".join(ZORDER.get(name, [])), "vacuumed": removed,
               "seconds": round(time.perf_counter() - t0, 2)}
        log.info("[%d/%d] %s: %s", i, len(names), name, row)
        out.append(row)
    return out
