"""Collaborative-filtering benchmark on MovieLens (not a test: prints figures).

    python benchmarks/cf_benchmark.py [--input ../shared/datasets/ml-latest-small] [--tune]

1. random 80/20 (seed 42): RMSE / MAE of global_mean, bias_baseline, als, content;
2. per-user stratified 75/25: precision / recall / ndcg / map / coverage / diversity @10 of
   popularity, als, als_implicit, content;
3. the als stage's wall time against a plain ALS.fit + recommendForAllUsers with the same
   parameters, in the same Spark session, as a ratio.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from pyspark.ml.recommendation import ALS
from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.cli import setup_logging
from movierec_spark.config import load_config
from movierec_spark.pipeline import run_pipeline
from movierec_spark.session import build_spark


def metric_table(spark, wh, run_id, models, metrics, k):
    m = tables.read_table(spark, wh, "metrics").where(F.col("run_id") == run_id)
    rows = m.where(F.col("model").isin(models) & F.col("metric").isin(metrics)
                   & (F.col("k").isNull() if k is None else (F.col("k") == k))).collect()
    got = {(r.model, r.metric): r.value for r in rows}
    head = "| model | " + " | ".join(metrics) + " |"
    print(head)
    print("|" + "---|" * (len(metrics) + 1))
    for model in models:
        print(f"| {model} | " + " | ".join(f"{got.get((model, x), float('nan')):.4f}" for x in metrics) + " |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default=str(REPO.parent / "shared" / "datasets" / "ml-latest-small"))
    ap.add_argument("--tune", action="store_true", help="tune explicit ALS on train (TrainValidationSplit)")
    ap.add_argument("--set", action="append", default=[], help="config overrides KEY=VALUE")
    args = ap.parse_args()
    setup_logging()
    logging.getLogger("movierec_spark").setLevel(logging.WARNING)
    from movierec_spark.cli import parse_set

    wh = Path(tempfile.mkdtemp(prefix="cfbench-")) / "warehouse"
    base = {"paths.warehouse": str(wh), "paths.input": args.input, "spark.show_progress": False,
            "als.tune": args.tune, "pipeline.mode": "evaluate", **parse_set(args.set)}
    cfg = load_config(None, base)
    spark = build_spark(cfg, app_name="cf-benchmark")
    # Fresh run ids, as `movierec run` mints them (per-run rows are appended, not replaceWhere'd).
    run_pipeline(spark, cfg, args.input, stages=["ingest"])

    print(f"\n## Random 80/20, seed {cfg.pipeline.seed}: rating prediction on {args.input}")
    ctx = run_pipeline(spark, cfg, args.input, stages=["split", "baselines", "als", "als_implicit", "content", "evaluate"])
    metric_table(spark, cfg.paths.warehouse, ctx.run_id, ["global_mean", "bias_baseline", "als", "content"], ["rmse", "mae"], None)
    print(f"(als fell back to the bias baseline for {ctx.results['als']['fallbacks']} test pairs)")

    scfg = load_config(None, {**base, "split.method": "stratified", "split.test_ratio": 0.25})
    print("\n## Per-user stratified 75/25: top-10 ranking (all held-out movies relevant)")
    ctx = run_pipeline(spark, scfg, args.input, stages=["split", "baselines", "als", "als_implicit", "content", "evaluate"])
    metric_table(spark, cfg.paths.warehouse, ctx.run_id, ["popularity", "als", "als_implicit", "content"],
                 ["precision", "recall", "ndcg", "map", "coverage", "diversity"], 10)
    als_seconds = ctx.stage_seconds["als"]

    # Plain Spark ALS example, same parameters and data, same session: once as the example is
    # written (MLlib's default 10 blocks), once with the block count the stage uses.
    from movierec_spark.als import als_blocks

    train = (tables.read_table(spark, cfg.paths.warehouse, "rating_splits")
             .where(f"split = 'train' AND run_id = '{ctx.run_id}'")
             .select("userId", "movieId", "rating").cache())
    train.count()
    a = cfg.als

    def plain(blocks=None):
        t0 = time.perf_counter()
        als = ALS(rank=a.rank, maxIter=a.max_iter, regParam=a.reg_param, userCol="userId", itemCol="movieId",
                  ratingCol="rating", coldStartStrategy="drop", seed=cfg.pipeline.seed)
        if blocks:
            als.setNumUserBlocks(blocks).setNumItemBlocks(blocks)
        als.fit(train).recommendForAllUsers(max(cfg.evaluation.ks)).write.format("noop").mode("overwrite").save()
        return time.perf_counter() - t0

    example, same_blocks = plain(), plain(als_blocks(a))
    print("\n## als stage vs plain ALS.fit + recommendForAllUsers (same params, same session)")
    print(f"als stage (explicit ALS on bias residuals, test predictions, factors, exact seen-excluded top-N, Delta writes): {als_seconds:.1f} s")
    print(f"  breakdown: {ctx.results['als']}")
    print(f"plain ALS example (default 10 blocks): {example:.1f} s; ratio {als_seconds / example:.2f}")
    print(f"plain ALS with the stage's {als_blocks(a)} blocks: {same_blocks:.1f} s; ratio {als_seconds / same_blocks:.2f}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
