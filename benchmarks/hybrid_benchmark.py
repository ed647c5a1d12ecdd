"""Hybrid benchmark on MovieLens (not a test: prints figures).

    python benchmarks/hybrid_benchmark.py [--input ../shared/datasets/ml-latest-small] [--set KEY=VALUE ...]

Runs the whole pipeline (conf/local.yaml's stages) twice in one Spark session:
1. random 80/20 (seed 42): RMSE / MAE / MAPE of global_mean, bias_baseline, als, content, hybrid;
2. per-user stratified 75/25: precision / recall / ndcg / map / coverage / novelty / diversity
   @10 of popularity, als_implicit, content and hybrid (the final recommendations);
and prints the seconds of every stage and of each whole run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from movierec_spark.cli import parse_set, setup_logging
from movierec_spark.config import load_config
from movierec_spark.pipeline import run_pipeline
from movierec_spark.session import build_spark

from cf_benchmark import metric_table


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default=str(REPO.parent / "shared" / "datasets" / "ml-latest-small"))
    ap.add_argument("--config", default=str(REPO / "conf" / "local.yaml"))
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--only", choices=["random", "stratified"], help="run one of the two protocols")
    args = ap.parse_args()
    setup_logging()
    # Stage progress stays visible (INFO): these runs take minutes.
    wh = str(Path(tempfile.mkdtemp(prefix="hybridbench-")) / "warehouse")
    # The held-out protocol: evaluate runs.
    base = {"paths.warehouse": wh, "spark.show_progress": False, "pipeline.mode": "evaluate", **parse_set(args.set)}
    cfg = load_config(args.config, base)
    spark = build_spark(cfg, app_name="hybrid-benchmark")
    stages = cfg.pipeline.stages
    protocols = [("random", {}), ("stratified", {"split.method": "stratified", "split.test_ratio": 0.25})]
    for name, extra in protocols:
        if args.only and name != args.only:
            continue
        c = load_config(args.config, {**base, **extra})
        t0 = time.perf_counter()
        # A fresh run id, as `movierec run` mints it (per-run rows are appended).
        ctx = run_pipeline(spark, c, args.input, stages=stages)
        wall = time.perf_counter() - t0
        print(f"\n## {name} split ({c.split.method}, test ratio {c.split.test_ratio}, seed {c.pipeline.seed}) on {args.input}")
        metric_table(spark, wh, ctx.run_id, ["global_mean", "bias_baseline", "als", "content", "hybrid"], ["rmse", "mae", "mape"], None)
        print()
        metric_table(spark, wh, ctx.run_id, ["popularity", "als_implicit", "content", "hybrid"],
                     ["precision", "recall", "ndcg", "map", "coverage", "novelty", "diversity"], 10)
        print("\nseconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in ctx.stage_seconds.items()))
        print(f"whole run: {wall:.1f} s (stages sum {sum(ctx.stage_seconds.values()):.1f} s)")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
