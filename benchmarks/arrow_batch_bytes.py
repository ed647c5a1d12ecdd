"""What Spark 4's Arrow byte limit per batch costs a mapInArrow over rows with list columns.

    python benchmarks/arrow_batch_bytes.py [--rows 1000000] [--width 20] [--repeats 3]

Since Spark 4.1 (SPARK-51316) an Arrow batch sent to Python is also cut at
`spark.sql.execution.arrow.maxBytesPerBatch` (64 MB by default), and the writer checks the
batch's size after every row (ArrowWriter.sizeInBytes), which for a list or struct column calls
the vector's setValueCount on every row. A Java Flight Recorder profile of an ml-latest-small
evaluate run (benchmarks/jfr_profile.py) found 2% of all the JVM's samples there. At Int.MaxValue
(2147483647) the check is off and batches are cut at `maxRecordsPerBatch` rows (10,000) only.

This times one mapInArrow (a Python function that returns each batch's row count) over `--rows`
rows of (id, a list of `--width` ints, a struct of two doubles) at both settings, alternating.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

LIMIT = "spark.sql.execution.arrow.maxBytesPerBatch"


def count_rows(batches):
    import pyarrow as pa

    for b in batches:
        yield pa.RecordBatch.from_pydict({"n": [b.num_rows]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--width", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers need this venv's pyarrow
    spark = (SparkSession.builder.master("local[*]").appName("movierec-arrow-batch-bytes")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false").getOrCreate())
    try:
        rows = (spark.range(args.rows, numPartitions=2)
                .select("id", F.sequence(F.lit(1), F.lit(args.width)).alias("xs"),
                        F.struct((F.col("id") * 0.5).alias("a"), (F.col("id") * 2.0).alias("b")).alias("s"))
                .cache())
        rows.count()
        print(f"{args.rows} rows, a list of {args.width} ints and a struct of two doubles each, 2 partitions")
        print("| run | maxBytesPerBatch | seconds | rows seen |\n|---|---|---|---|")
        for i in range(args.repeats):
            for limit in ("64m", str(2**31 - 1)):
                spark.conf.set(LIMIT, limit)
                t0 = time.perf_counter()
                seen = rows.mapInArrow(count_rows, "n long").agg(F.sum("n")).first()[0]
                print(f"| {i + 1} | {limit} | {time.perf_counter() - t0:.2f} | {seen} |", flush=True)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
