"""The learned ranker's item-kNN tables: their own co-occurrence self-join in the recommend stage
(ranker.ranker_neighbours) beside the features stage's movie self-join, against both from the
movie self-join alone (features.fold_neighbours with `cooccur`).

    python benchmarks/ranker_knn_merge.py --warehouse WH [--run RUN] [--config conf/scale.yaml]

WH holds a run's `rating_splits`. The movie lists are computed for the passes a serve run's
features stage has there (out-of-fold folds per features.oof_plan, plus the whole train part).
Each way's tables are written to parquet (no collect) from a cached train part, timed, then
compared: the movie lists and the ranker tables must be the same rows. Alone on the machine.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from pyspark.sql import functions as F

from movierec_spark import features, ranker, tables
from movierec_spark.config import load_config
from movierec_spark.session import build_spark


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="run id (default: the latest succeeded run)")
    ap.add_argument("--config", help="config file (default: the packaged local.yaml)")
    args = ap.parse_args()
    cfg = load_config(args.config, {"paths.warehouse": args.warehouse, "spark.show_progress": False})
    spark = build_spark(cfg, app_name="movierec-ranker-knn-merge")
    out = tempfile.mkdtemp(prefix="ranker-knn-merge-")
    try:
        wh, h, seed = cfg.paths.warehouse, cfg.hybrid, cfg.pipeline.seed
        run = args.run or (tables.read_table(spark, wh, "runs").where("status = 'succeeded'")
                           .orderBy(F.col("started_at").desc()).first().run_id)
        train = (tables.read_table(spark, wh, "rating_splits").where((F.col("run_id") == run) & (F.col("split") == "train"))
                 .select("userId", "movieId", "rating").cache())
        n = train.count()
        folded = features.with_folds(train, seed, h.folds).cache()
        folded.count()
        n_oof, _ = features.oof_plan(n, h)
        outs = [*range(n_oof), None]
        print(f"run {run}: {n} train ratings; movie lists of passes {outs}, top {h.neighbours}, cap {h.cap_per_user}; "
              f"ranker tables top {h.ranker_knn_neighbours}, cap {h.ranker_knn_cap or h.cap_per_user}", flush=True)
        print("| way | seconds |\n|---|---|", flush=True)
        t0 = time.perf_counter()
        features.fold_neighbours(folded, "movieId", "userId", outs, h.neighbours, h.min_common, h.cap_per_user,
                                 seed).write.parquet(f"{out}/two/movie")
        rest, whole, cached = ranker.ranker_neighbours(train, h, seed)
        cached.write.parquet(f"{out}/two/ranker")
        cached.unpersist()
        print(f"| two self-joins (movie lists, then the ranker's) | {time.perf_counter() - t0:.1f} |", flush=True)
        t0 = time.perf_counter()
        merged = features.fold_neighbours(folded, "movieId", "userId", outs, h.neighbours, h.min_common,
                                          h.cap_per_user, seed, cooccur=([0, None], h.ranker_knn_neighbours)).cache()
        merged.where(F.col("p") < len(outs)).write.parquet(f"{out}/one/movie")
        merged.where(F.col("p") >= len(outs)).select((F.col("p") - len(outs)).cast("int").alias("p"), "movieId", "nb",
                                                    "sim").write.parquet(f"{out}/one/ranker")
        merged.unpersist()
        print(f"| one self-join (cooccur) | {time.perf_counter() - t0:.1f} |", flush=True)
        for name in ("movie", "ranker"):
            a, b = spark.read.parquet(f"{out}/two/{name}"), spark.read.parquet(f"{out}/one/{name}")
            print(f"{name}: {a.count()} rows against {b.count()}; only in one: "
                  f"{a.exceptAll(b).count() + b.exceptAll(a).count()}", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
