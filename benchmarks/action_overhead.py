"""The fixed cost of one Spark job on this machine: what a run of thousands of small jobs pays per job.

    python benchmarks/action_overhead.py [--repeats 30] [--out FILE.md]

In the pipeline's own session (conf/local.yaml's settings, a throwaway warehouse), on a cached
1,000-row frame in 2 partitions, so the work is nothing and the time is the job's fixed cost:
- a JVM RDD count (one stage, no SQL: what an MLlib tree level or ALS step pays at least);
- a DataFrame count (the partial and final aggregation: with adaptive execution on, each query
  stage is submitted as a job of its own) with AQE on and off;
- a DataFrame group-by collected (a shuffle, as most of the pipeline's queries have);
- planning alone (the executed plan of that group-by, no job).
Each is timed `--repeats` times after 5 warm-up calls; the table gives the median in ms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pyspark.sql import functions as F

from movierec_spark.config import load_config
from movierec_spark.session import build_spark


def median_ms(f, repeats: int) -> float:
    for _ in range(5):
        f()
    xs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        xs.append(time.perf_counter() - t0)
    return 1000 * statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", help="write the table (markdown) here too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as wh:
        cfg = load_config(None, {"paths.warehouse": wh, "spark.show_progress": False})
        spark = build_spark(cfg, app_name="action-overhead")
        try:
            df = spark.range(1000, numPartitions=2).cache()
            df.count()
            jrdd = df._jdf.rdd().cache()
            jrdd.count()

            def grouped():
                return df.groupBy((F.col("id") % 4).alias("k")).count()

            rows = [("JVM RDD count (1 stage, no SQL)", median_ms(lambda: jrdd.count(), args.repeats))]
            aqe = spark.conf.get("spark.sql.adaptive.enabled")
            for on in ("true", "false"):
                spark.conf.set("spark.sql.adaptive.enabled", on)
                rows += [(f"DataFrame count, AQE {on}", median_ms(lambda: df.count(), args.repeats)),
                         (f"DataFrame group-by collect, AQE {on}", median_ms(lambda: grouped().collect(), args.repeats))]
            spark.conf.set("spark.sql.adaptive.enabled", aqe)
            rows.append(("planning the group-by alone (no job)",
                         median_ms(lambda: grouped()._jdf.queryExecution().executedPlan(), args.repeats)))
            lines = [f"shuffle partitions {spark.conf.get('spark.sql.shuffle.partitions')}, {args.repeats} calls each",
                     "", "| action on a cached 1,000-row frame | median ms |", "|---|---|"]
            lines += [f"| {name} | {ms:.0f} |" for name, ms in rows]
            print("\n".join(lines))
            if args.out:
                Path(args.out).write_text("\n".join(lines) + "\n")
        finally:
            spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
