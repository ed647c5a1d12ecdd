"""How the hybrid GBT's size (hybrid.max_iter, max_depth) is chosen: fits on one run's
out-of-fold features, scored on the hybrid's validation rows only (never on a test part).

    python benchmarks/gbt_settings.py --warehouse WH [--run RUN] [--grid 80x5,150x5,80x6,150x6,75x4@0.2]
                                      [--rows 250000,500000,0] [--subsets all,0.5] [--config conf/scale.yaml]
                                      [--subsamples 0.8,1.0] [--seeds 3]

WH is a warehouse an evaluate or serve run wrote `features` into. Each grid point (trees x
depth, @ the step size when given, the other `hybrid.*` settings as configured) is fitted as the hybrid stage fits it, on
the out-of-fold rows less the validation share, and scored on that share; it prints validation
RMSE / MAE and seconds per point, and the point with the lowest validation RMSE.

`--rows`: each point is also fitted with `hybrid.max_train_rows` at these values (0: every row;
the hash sample the hybrid stage would train on, scored on the same validation rows): how many
out-of-fold rows the GBT needs, a learning curve. The features stage computes features only for
the rows the cap keeps (features.oof_plan), so a lower cap also saves feature passes.

`--subsets`: each point is also fitted with `hybrid.feature_subset` at these values (MLlib's
featureSubsetStrategy: the features each tree node considers).

`--subsamples`: each point is also fitted at these `hybrid.subsample` values (the share of rows
each tree draws). `--seeds N`: every fit N times with GBT seeds seed + 7919 i, to see how far
the learner's own draw moves the figure (the rows and the validation share stay the run's).
"""

from __future__ import annotations

import argparse
import sys
import time

from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.config import load_config
from movierec_spark.evaluation import rating_metrics
from movierec_spark.features import hash_sample
from movierec_spark.hybrid import fit_hybrid, predict_hybrid
from movierec_spark.session import build_spark


def oof_rows(spark, wh: str, run: str, h, seed: int):
    """The run's out-of-fold train feature rows, cached, with `is_val`: the hybrid stage's
    validation share (the rows fit_hybrid leaves out and scores)."""
    return (tables.read_table(spark, wh, "features").where((F.col("run_id") == run) & (F.col("split") == "train"))
            .drop("run_id").withColumn("is_val", hash_sample(["userId", "movieId"], seed + 3, h.validation_fraction))
            .cache())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="run id (default: the latest succeeded run)")
    ap.add_argument("--grid", default="80x5,150x5,80x6,150x6", help="trees x depth[@step] points")
    ap.add_argument("--rows", help="comma-separated hybrid.max_train_rows values (0: all rows); default: the config's")
    ap.add_argument("--subsets", help="comma-separated hybrid.feature_subset values; default: the config's")
    ap.add_argument("--config", help="config file (default: the packaged local.yaml)")
    ap.add_argument("--subsamples", help="comma-separated hybrid.subsample values; default: the config's")
    ap.add_argument("--seeds", type=int, default=1, help="GBT seeds per fit (seed + 7919 i)")
    args = ap.parse_args()
    cfg = load_config(args.config, {"paths.warehouse": args.warehouse, "spark.show_progress": False})
    spark = build_spark(cfg, app_name="movierec-gbt-settings")
    try:
        wh = cfg.paths.warehouse
        run = args.run or (tables.read_table(spark, wh, "runs").where("status = 'succeeded'")
                           .orderBy(F.col("started_at").desc()).first().run_id)
        h, seed = cfg.hybrid, cfg.pipeline.seed
        lo, hi = (float(v) for v in tables.read_table(spark, wh, "ratings").agg(F.min("rating"), F.max("rating")).first())
        rows = oof_rows(spark, wh, run, h, seed)
        got = []
        print(f"run {run}: validation = {h.validation_fraction:.0%} of the out-of-fold train rows")
        caps = [int(v) or None for v in args.rows.split(",")] if args.rows else [h.max_train_rows]
        print(f"{rows.count()} out-of-fold rows, {rows.where('is_val').count()} of them validation")
        subsets = args.subsets.split(",") if args.subsets else [h.feature_subset]
        subsamples = [float(v) for v in args.subsamples.split(",")] if args.subsamples else [h.subsample]
        print("| trees | depth | step | max_train_rows | feature_subset | subsample | seed | validation RMSE | "
              "validation MAE | seconds |\n|---|---|---|---|---|---|---|---|---|---|")
        for point in args.grid.split(","):
            size, _, step = point.partition("@")
            trees, depth = (int(v) for v in size.split("x"))
            step = float(step) if step else h.step_size
            for cap, sub, frac, i in ((c, s, f, i) for c in caps for s in subsets for f in subsamples
                                      for i in range(args.seeds)):
                t0 = time.perf_counter()
                model, _, _ = fit_hybrid(rows, h.model_copy(update={"max_iter": trees, "max_depth": depth,
                                                                    "step_size": step, "max_train_rows": cap,
                                                                    "feature_subset": sub, "subsample": frac}),
                                         seed + 7919 * i)
                val = rating_metrics(predict_hybrid(model, rows.where("is_val"), lo, hi), label_col="label")
                got.append((val["rmse"], trees, depth, step, cap, sub))
                print(f"| {trees} | {depth} | {step:g} | {cap or 'all'} | {sub} | {frac:g} | {seed + 7919 * i} | "
                      f"{val['rmse']:.4f} | {val['mae']:.4f} | {time.perf_counter() - t0:.0f} |", flush=True)
        best = min(got, key=lambda g: g[0])
        print(f"\nlowest validation RMSE: {best[1]} trees, depth {best[2]}, step {best[3]:g}, max_train_rows "
              f"{best[4] or 'all'}, feature_subset {best[5]} ({best[0]:.4f})")
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
