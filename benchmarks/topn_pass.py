"""How als.recommend_unseen lists every user's top-n unseen movies: MLlib (recommendForAllUsers,
then recommendForUserSubset buckets for heavy raters) against numpy per partition
(als.top_unseen_numpy), als.LISTING.

    python benchmarks/topn_pass.py --warehouse WH [--run RUN] [--n 20,100] [--config conf/scale.yaml]

WH is a warehouse a run of the als_implicit stage saved its model into
(`_models/<run>/als_implicit`). For each n, the lists of every train user are computed once per
method (als.LISTING), each timed from a clean cache and written to parquet (no
collect), and the two sets of lists compared: users, rows, and the share of (user, rank) slots
holding the same movie (float32 ties aside, 1.0). One method at a time, on this machine alone.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from pyspark.ml.recommendation import ALSModel
from pyspark.sql import functions as F

from movierec_spark import als as A
from movierec_spark import tables
from movierec_spark.config import load_config
from movierec_spark.session import build_spark


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="run id (default: the latest succeeded run)")
    ap.add_argument("--n", default="20", help="comma-separated list lengths")
    ap.add_argument("--methods", default="mllib,numpy")
    ap.add_argument("--config", help="config file (default: the packaged local.yaml)")
    args = ap.parse_args()
    cfg = load_config(args.config, {"paths.warehouse": args.warehouse, "spark.show_progress": False})
    spark = build_spark(cfg, app_name="movierec-topn-pass")
    out = tempfile.mkdtemp(prefix="topn-pass-")
    try:
        wh = cfg.paths.warehouse
        run = args.run or (tables.read_table(spark, wh, "runs").where("status = 'succeeded'")
                           .orderBy(F.col("started_at").desc()).first().run_id)
        model = ALSModel.load(f"{wh}/_models/{run}/als_implicit")
        train = (tables.read_table(spark, wh, "rating_splits").where((F.col("run_id") == run) & (F.col("split") == "train"))
                 .select("userId", "movieId", "rating").cache())
        print(f"run {run}: {train.count()} train ratings, rank {model.rank}")
        print("| n | listing | seconds | users | rows |\n|---|---|---|---|---|")
        for n in (int(v) for v in args.n.split(",")):
            paths = {}
            for method in args.methods.split(","):
                A.LISTING = method
                spark.catalog.clearCache()
                train.cache().count()
                t0 = time.perf_counter()
                recs = A.recommend_unseen(model, train, n)
                paths[method] = f"{out}/{method}-{n}"
                recs.write.mode("overwrite").parquet(paths[method])
                secs = time.perf_counter() - t0
                got = spark.read.parquet(paths[method])
                users, rows = got.agg(F.countDistinct("userId"), F.count(F.lit(1))).first()
                print(f"| {n} | {method} | {secs:.1f} | {users} | {rows} |", flush=True)
                recs.unpersist()
            if len(paths) == 2:
                a, b = (spark.read.parquet(p).select("userId", "rank", F.col("movieId").alias(k))
                        for k, p in zip(("a", "b"), paths.values()))
                same, total = (a.join(b, ["userId", "rank"], "full")
                               .agg(F.sum((F.col("a") == F.col("b")).cast("int")), F.count(F.lit(1))).first())
                print(f"n={n}: {same} of {total} (user, rank) slots hold the same movie ({same / total:.6f})")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
