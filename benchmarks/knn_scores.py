"""The learned ranker's item-kNN features at serving time: the Spark join against numpy per
partition (ranker.knn_scores, ranker.KNN).

    python benchmarks/knn_scores.py --warehouse WH [--run RUN] [--methods join,numpy] [--config conf/scale.yaml]

WH is a warehouse a serve run saved its rating splits and implicit ALS pool into
(`_models/<run>/als_implicit_pool`). The candidates are what the recommend stage scores for
every user: implicit ALS's pool and the popularity list (hybrid.candidate_pool long; content
left out, it needs the similarity table), and the item-kNN table is the one the stage serves
from (ranker_neighbours over the whole train part), built and cached first, untimed. Each
method's scores are timed from that point, written to parquet (no collect), and the two
compared: rows, and the largest difference of knn and knn_n. One method at a time, alone on
the machine.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from pyspark.sql import functions as F

from movierec_spark import ranker, tables
from movierec_spark.baselines import popularity_top_n
from movierec_spark.config import load_config
from movierec_spark.session import build_spark


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="run id (default: the latest succeeded run)")
    ap.add_argument("--methods", default="join,numpy")
    ap.add_argument("--config", help="config file (default: the packaged local.yaml)")
    args = ap.parse_args()
    cfg = load_config(args.config, {"paths.warehouse": args.warehouse, "spark.show_progress": False})
    spark = build_spark(cfg, app_name="movierec-knn-scores")
    out = tempfile.mkdtemp(prefix="knn-scores-")
    try:
        wh, h = cfg.paths.warehouse, cfg.hybrid
        run = args.run or (tables.read_table(spark, wh, "runs").where("status = 'succeeded'")
                           .orderBy(F.col("started_at").desc()).first().run_id)
        train = (tables.read_table(spark, wh, "rating_splits").where((F.col("run_id") == run) & (F.col("split") == "train"))
                 .select("userId", "movieId", "rating").cache())
        pool = spark.read.parquet(f"{wh}/_models/{run}/als_implicit_pool").where(F.col("rank") <= h.candidate_pool)
        cands = (pool.select("userId", "movieId")
                 .unionByName(popularity_top_n(train, h.candidate_pool).select("userId", "movieId"))
                 .distinct().cache())
        t0 = time.perf_counter()
        _, nb, _ = ranker.ranker_neighbours(train, h, cfg.pipeline.seed)
        n_nb = nb.count()
        print(f"run {run}: {train.count()} train ratings, {cands.count()} candidates, "
              f"{n_nb} neighbour rows ({time.perf_counter() - t0:.1f} s to build, untimed)", flush=True)
        print("| method | seconds | rows |\n|---|---|---|")
        paths = {}
        for method in args.methods.split(","):
            ranker.KNN = method
            t0 = time.perf_counter()
            paths[method] = f"{out}/{method}"
            ranker.knn_scores(cands, train.select("userId", "movieId"), nb).write.parquet(paths[method])
            secs = time.perf_counter() - t0
            rows = spark.read.parquet(paths[method]).count()
            print(f"| {method} | {secs:.1f} | {rows} |", flush=True)
        if len(paths) == 2:
            a, b = (spark.read.parquet(p).select("userId", "movieId", F.col("knn").alias(f"k{i}"), F.col("knn_n").alias(f"n{i}"))
                    for i, p in enumerate(paths.values()))
            both, dk, dn = (a.join(b, ["userId", "movieId"], "full")
                            .agg(F.count(F.col("k0") + F.col("k1")), F.max(F.abs(F.col("k0") - F.col("k1"))),
                                 F.max(F.abs(F.col("n0") - F.col("n1")))).first())
            print(f"rows in both: {both}; largest |knn| difference {dk}; largest |knn_n| difference {dn}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
