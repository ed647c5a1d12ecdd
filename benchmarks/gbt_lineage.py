"""Does the hybrid's GBT fit faster on a materialized input than on a cached one?

    python benchmarks/gbt_lineage.py --warehouse WH [--run RUN] [--order cached,materialized,cached,materialized]

WH is a warehouse an evaluate or serve run wrote `features` into. Each fit is the hybrid
stage's (hybrid.fit_hybrid, the configured trees and depth) on the run's out-of-fold train rows,
their input laid out by features.gbt_input and then either cached (`cached`: the frame keeps its
query, so every tree level's task binary carries the RDD chain back to the last shuffle) or
materialized (`materialized`: a local checkpoint, what gbt_input does now). It prints seconds and
validation RMSE (the hybrid's validation rows: no test part is read) per fit, in the given order;
the first fit of a process pays the JVM's warm-up, so alternate and read the later ones.
"""

from __future__ import annotations

import argparse
import sys
import time

from pyspark.sql import functions as F

import movierec_spark.hybrid as hybrid
from movierec_spark import tables
from movierec_spark.config import load_config
from movierec_spark.evaluation import rating_metrics
from movierec_spark.features import gbt_layout
from movierec_spark.session import build_spark, materialize

from gbt_settings import oof_rows  # benchmarks/gbt_settings.py (the script's own directory)


def layout(df, keep: str):
    out = gbt_layout(df)
    return materialize(out) if keep == "materialized" else out.cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="run id (default: the latest succeeded run)")
    ap.add_argument("--order", default="cached,materialized,cached,materialized")
    ap.add_argument("--config", help="config file (default: the packaged local.yaml)")
    args = ap.parse_args()
    cfg = load_config(args.config, {"paths.warehouse": args.warehouse, "spark.show_progress": False})
    spark = build_spark(cfg, app_name="movierec-gbt-lineage")
    try:
        wh = cfg.paths.warehouse
        run = args.run or (tables.read_table(spark, wh, "runs").where("status = 'succeeded'")
                           .orderBy(F.col("started_at").desc()).first().run_id)
        h, seed = cfg.hybrid, cfg.pipeline.seed
        rows = oof_rows(spark, wh, run, h, seed)
        print(f"run {run}: {rows.count()} out-of-fold rows; {h.max_iter} trees of depth {h.max_depth}")
        print("| fit | input | seconds | validation RMSE |\n|---|---|---|---|")
        for i, keep in enumerate(args.order.split(","), 1):
            if keep not in ("cached", "materialized"):
                raise SystemExit(f"--order: {keep!r} is neither cached nor materialized")
            hybrid.gbt_input = lambda df, keep=keep: layout(df, keep)
            t0 = time.perf_counter()
            model, _, _ = hybrid.fit_hybrid(rows, h, seed)
            dt = time.perf_counter() - t0
            val = rating_metrics(hybrid.predict_hybrid(model, rows.where("is_val"), 0.5, 5.0), label_col="label")
            print(f"| {i} | {keep} | {dt:.1f} | {val['rmse']:.4f} |", flush=True)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
