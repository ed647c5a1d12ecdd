"""Content neighbours benchmark (not a test: prints figures).

    python benchmarks/content_benchmark.py [--warehouse W | --input DIR] [--no-exact] [--top-n] [--set KEY=VALUE]

Builds the movie vectors of an ingested warehouse (or ingests --input into a temporary one),
times the exact top-K (numpy block products over all pairs) and the LSH path (SimHash bands
from BucketedRandomProjectionLSH, exact cosine on candidates), and prints recall@K of LSH
against exact (tie-aware). --no-exact skips the all-pairs yardstick on large catalogs. --top-n also
times the content user model's lists (content_top_n, top 10) on the train part of the warehouse's
latest run, from the LSH neighbours. Run it with PYTHONPATH set to another checkout to time that
commit's code with the same script.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from movierec_spark import tables
from movierec_spark.cli import parse_set, setup_logging
from movierec_spark.config import load_config
from movierec_spark.content import exact_neighbours, lsh_neighbours, movie_vectors, neighbour_recall
from movierec_spark.pipeline import run_pipeline
from movierec_spark.session import build_spark


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default=str(REPO.parent / "shared" / "datasets" / "ml-latest-small"))
    ap.add_argument("--warehouse", help="an already ingested warehouse (skips ingest)")
    ap.add_argument("--no-exact", action="store_true")
    ap.add_argument("--top-n", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    setup_logging()
    wh = args.warehouse or str(Path(tempfile.mkdtemp(prefix="contentbench-")) / "warehouse")
    cfg = load_config(None, {"paths.warehouse": wh, "spark.show_progress": False, **parse_set(args.set)})
    spark = build_spark(cfg, app_name="content-benchmark")
    if not args.warehouse:
        run_pipeline(spark, cfg, args.input, stages=["ingest"], run_id="ingest")
    c = cfg.content
    opt = lambda n: tables.read_table(spark, wh, n) if tables.table_exists(spark, tables.table_path(wh, n)) else None  # noqa: E731

    def timed(label, build):
        t0 = time.perf_counter()
        df = build().cache()
        rows = df.count()
        print(f"{label}: {time.perf_counter() - t0:.1f} s, {rows:,} rows", flush=True)
        return df

    v = timed("movie vectors", lambda: movie_vectors(tables.read_table(spark, wh, "movies"), opt("tags"), opt("genome"), c))
    print(f"  width {len(v.first().features):,}")
    approx = timed(f"lsh top-{c.k} (bits {c.lsh_bits}, tables {c.lsh_tables}, cap {c.lsh_bucket_cap})",
                   lambda: lsh_neighbours(v, c.k, c.lsh_bits, c.lsh_tables, c.lsh_bucket_cap, cfg.pipeline.seed))
    if args.top_n:
        from pyspark.sql import functions as F

        from movierec_spark.content import content_top_n

        splits = tables.read_table(spark, wh, "rating_splits")
        run = splits.agg(F.max("run_id")).first()[0]
        train = splits.where((F.col("run_id") == run) & (F.col("split") == "train")).select(
            "userId", "movieId", "rating").cache()
        print(f"run {run}: {train.count():,} train ratings", flush=True)
        timed(f"content_top_n (top 10, {c.user_sources} sources x {c.user_neighbours} neighbours)",
              lambda: content_top_n(train, approx, 10, c.user_sources, c.user_neighbours))
    if not args.no_exact:
        exact = timed(f"exact top-{c.k}", lambda: exact_neighbours(v, c.k))
        for k in sorted({10, c.k}):
            ex_k, ap_k = exact.where(f"rank <= {k}"), approx.where(f"rank <= {k}")
            print(f"recall@{k} of lsh against exact: {neighbour_recall(ap_k, ex_k, k):.4f}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
