"""Do JVM flags (the JIT, the collector) make a small Spark workload cheaper? One process per run.

    python benchmarks/jvm_flags.py [--input ../shared/datasets/ml-latest-small]
        [--order default,c1,parallel,c1+parallel,default,c1+parallel]

Each run is a fresh `python` process (so a fresh JVM: the flags reach it through
JDK_JAVA_OPTIONS, read by the `java` launcher Spark starts) doing the same work: three implicit
ALS tuning trials on the validation fold of ratings.csv (fit, then validation nDCG@10 the way
tune.py scores it), then a 30-tree depth-4 GBT on per-user and per-movie statistics. It prints
wall seconds, the JVM's CPU seconds, those of its JIT compiler threads (from /proc) and GC
seconds, per run, in the given order: alternate the variants, the machine's speed drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLAGS = {
    "default": "",
    "c1": "-XX:TieredStopAtLevel=1",
    "parallel": "-XX:+UseParallelGC",
    "c1+parallel": "-XX:TieredStopAtLevel=1 -XX:+UseParallelGC",
}


def jit_seconds(pid: int) -> float:
    """CPU seconds of the JVM's JIT compiler threads ("C2 CompilerThread0", "C1 CompilerThre...")."""
    from jvm_threads import sample  # benchmarks/jvm_threads.py (the script's own directory)

    return sum(s for name, s in sample(pid).values() if "CompilerThre" in name)


def child(data: str) -> None:
    t0 = time.perf_counter()
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.regression import GBTRegressor
    from pyspark.sql import functions as F

    from movierec_spark.als import fit_implicit, ndcg_users, unseen_ndcg
    from movierec_spark.config import load_config
    from movierec_spark.session import build_spark, jvm_usage
    from movierec_spark.tune import validation_fold

    cfg = load_config(None, {"spark.show_progress": False})
    spark = build_spark(cfg, app_name="movierec-jvm-flags")
    try:
        ratings = (spark.read.csv(f"{data}/ratings.csv", header=True, inferSchema=True)
                   .select("userId", "movieId", "rating"))
        fit, held = validation_fold(ratings, cfg.pipeline.seed, cfg.tune.validation_ratio, cfg.tune.min_user_ratings)
        fit = fit.cache()
        users = ndcg_users(fit, held).cache()
        for setting in ({}, {"rank": 10}, {"alpha": 1.0, "confidence": "rating"}):
            model = fit_implicit(fit, cfg.als_implicit.model_copy(update=setting), cfg.pipeline.seed)
            ndcg, _ = unseen_ndcg(model, users, 10)
        u = fit.groupBy("userId").agg(F.avg("rating").alias("ua"), F.count(F.lit(1)).alias("un"))
        m = fit.groupBy("movieId").agg(F.avg("rating").alias("ma"), F.count(F.lit(1)).alias("mn"))
        rows = VectorAssembler(inputCols=["ua", "un", "ma", "mn"], outputCol="x").transform(
            fit.join(u, "userId").join(m, "movieId")).select("x", "rating").localCheckpoint()
        GBTRegressor(featuresCol="x", labelCol="rating", maxIter=30, maxDepth=4, seed=1).fit(rows)
        use = jvm_usage(spark) or {"cpu_s": float("nan"), "gc_s": float("nan")}
        pid = int(spark.sparkContext._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getPid())
        print("RESULT " + json.dumps({"wall": time.perf_counter() - t0, "cpu": use["cpu_s"], "jit": jit_seconds(pid),
                                      "gc": use["gc_s"], "ndcg": ndcg}), flush=True)
    finally:
        spark.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(REPO.parent / "shared" / "datasets" / "ml-latest-small"))
    ap.add_argument("--order", default="default,c1,parallel,c1+parallel,default,c1+parallel")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.input)
        return 0
    order = args.order.split(",")
    unknown = [v for v in order if v not in FLAGS]
    if unknown:
        raise SystemExit(f"--order: unknown variant(s) {unknown}; known: {', '.join(FLAGS)}")
    print("| run | flags | wall s | JVM CPU s | JIT threads CPU s | GC s | validation nDCG@10 |\n|---|---|---|---|---|---|---|")
    for i, v in enumerate(order, 1):
        env = dict(os.environ, JDK_JAVA_OPTIONS=FLAGS[v])
        out = subprocess.run([sys.executable, __file__, "--child", "--input", args.input], env=env, cwd=REPO,
                             capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"run {i} ({v}) failed")
        r = json.loads(line[len("RESULT "):])
        print(f"| {i} | {v} `{FLAGS[v]}` | {r['wall']:.1f} | {r['cpu']:.1f} | {r['jit']:.1f} | {r['gc']:.1f} | "
              f"{r['ndcg']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
