"""How `hybrid.validation_tol` was chosen: GBT fits on one run's out-of-fold features, scored on
the validation rows only (never on a test part).

    python benchmarks/gbt_stopping.py --warehouse WH [--run RUN] [--tols 0.001,0.0001,0] [--config conf/scale.yaml]

WH is a warehouse an evaluate or serve run wrote `features` into (for example the one
benchmarks/serve_benchmark.py leaves in /tmp/movierec-serve-bench/wh). For each tolerance (and
for no early stopping: all `hybrid.max_iter` trees) it fits the hybrid GBT exactly as the hybrid
stage does (same validation rows: a hash of user, movie and seed) and prints the trees kept,
validation RMSE and the fit's seconds.
"""

from __future__ import annotations

import argparse
import time

from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.config import load_config
from movierec_spark.evaluation import rating_metrics
from movierec_spark.features import hash_sample
from movierec_spark.hybrid import fit_hybrid, predict_hybrid
from movierec_spark.session import build_spark


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="run id (default: the one run in features, else the first)")
    ap.add_argument("--tols", default="0.001,0.0001,0")
    ap.add_argument("--config", help="config file (default: the packaged local.yaml); its hybrid section sets the GBT")
    args = ap.parse_args()
    cfg = load_config(args.config, {"paths.warehouse": args.warehouse, "spark.show_progress": False})
    spark = build_spark(cfg, app_name="movierec-gbt-stopping")
    try:
        feats = tables.read_table(spark, cfg.paths.warehouse, "features")
        run = args.run or sorted(r[0] for r in feats.select("run_id").distinct().collect())[0]
        h, seed = cfg.hybrid, cfg.pipeline.seed
        rows = (feats.where((F.col("run_id") == run) & (F.col("split") == "train")).drop("run_id")
                .withColumn("is_val", hash_sample(["userId", "movieId"], seed + 3, h.validation_fraction)).cache())
        print(f"run {run}: {rows.count():,} out-of-fold rows, {rows.where('is_val').count():,} for validation")
        print(f"{'validation_tol':>15} {'trees':>6} {'val rmse':>9} {'val mae':>8} {'fit s':>7}")
        for tol in [float(t) for t in args.tols.split(",")] + [None]:
            if tol is None:  # no early stopping: train on the same rows, all max_iter trees
                data, hc = rows.where(~F.col("is_val")).drop("is_val"), h
            else:
                data, hc = rows, h.model_copy(update=dict(validation_tol=tol))
            t0 = time.perf_counter()
            model, _, trees = fit_hybrid(data, hc, seed)
            secs = time.perf_counter() - t0
            m = rating_metrics(predict_hybrid(model, rows.where("is_val")), label_col="label")
            label = "none" if tol is None else f"{tol:g}"
            print(f"{label:>15} {trees:>6} {m['rmse']:>9.4f} {m['mae']:>8.4f} {secs:>7.1f}", flush=True)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
