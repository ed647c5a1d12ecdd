"""How the rating models' defaults are chosen: the bias baseline's shrinkage and the residual ALS's
rank and regularisation, scored by RMSE on a validation fold of an evaluate run's train part.

    python benchmarks/tune_defaults.py --warehouse WH [--run RUN] [--out FILE]
                                       [--item-regs 2,5,10,25] [--user-regs 1,3,5,10]
                                       [--als-ranks 8,12,20,32] [--als-regs 0.05,0.1,0.15,0.25]

WH holds an evaluate run (`movierec evaluate`, random 80/20 by default). Only that run's train
part is read: a hash share of each user's train ratings (tune.validation_ratio, users with at
least tune.min_user_ratings, as the implicit ALS search holds out) is the validation fold, the
rest is fitted. First a grid of (item_reg, user_reg) for the bias baseline, then, on the best
baseline's residuals, a grid of ALS rank x reg_param (max_iter as configured). Each point's
validation RMSE and seconds are printed (and appended to --out, markdown). No test rating is read.
"""

from __future__ import annotations

import argparse
import sys
import time

from lines import Lines  # benchmarks/lines.py (the script's own directory)
from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.als import fit_explicit, predict_explicit
from movierec_spark.baselines import fit_bias
from movierec_spark.config import load_config
from movierec_spark.evaluation import rating_metrics
from movierec_spark.session import build_spark
from movierec_spark.tune import validation_fold


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="evaluate run id (default: the latest succeeded evaluate run)")
    ap.add_argument("--out", help="append the tables to this markdown file")
    ap.add_argument("--item-regs", default="2,5,10,25")
    ap.add_argument("--user-regs", default="1,3,5,10")
    ap.add_argument("--als-ranks", default="8,12,20,32")
    ap.add_argument("--als-regs", default="0.05,0.1,0.15,0.25")
    args = ap.parse_args()
    floats = lambda s: [float(v) for v in s.split(",")]  # noqa: E731
    bias_grid = [(i, u) for i in floats(args.item_regs) for u in floats(args.user_regs)]
    cfg = load_config(None, {"paths.warehouse": args.warehouse, "spark.show_progress": False})
    spark = build_spark(cfg, app_name="movierec-tune-defaults")
    say = Lines(args.out)

    try:
        wh, seed, t = cfg.paths.warehouse, cfg.pipeline.seed, cfg.tune
        run = args.run or (tables.read_table(spark, wh, "runs")
                           .where("status = 'succeeded' AND kind = 'evaluate'")
                           .orderBy(F.col("started_at").desc()).first().run_id)
        lo, hi = (float(v) for v in tables.read_table(spark, wh, "ratings").agg(F.min("rating"), F.max("rating")).first())
        train = (tables.read_table(spark, wh, "rating_splits").where((F.col("run_id") == run) & (F.col("split") == "train"))
                 .select("userId", "movieId", "rating"))
        fit, held = validation_fold(train, seed, t.validation_ratio, t.min_user_ratings)
        fit, held = fit.cache(), held.cache()
        say(f"Run {run} (warehouse {wh}): {fit.count()} fit ratings, {held.count()} validation ratings "
            f"(validation_ratio {t.validation_ratio}, users with >= {t.min_user_ratings} train ratings, seed {seed}).")
        say()
        say("| baseline item_reg | user_reg | validation RMSE | seconds |\n|---|---|---|---|")
        got = []
        for item_reg, user_reg in bias_grid:
            t0 = time.perf_counter()
            bias = fit_bias(fit, cfg.baseline.model_copy(update={"item_reg": item_reg, "user_reg": user_reg}), lo, hi)
            rmse = rating_metrics(bias.predict(held).withColumnRenamed("baseline", "prediction"))["rmse"]
            bias.unpersist()
            got.append((rmse, item_reg, user_reg))
            say(f"| {item_reg:g} | {user_reg:g} | {rmse:.4f} | {time.perf_counter() - t0:.1f} |")
        _, item_reg, user_reg = min(got)
        base = cfg.baseline.model_copy(update={"item_reg": item_reg, "user_reg": user_reg})
        say(f"\nLowest: item_reg {item_reg:g}, user_reg {user_reg:g}.\n")
        bias = fit_bias(fit, base, lo, hi)
        say("| ALS rank | reg_param | validation RMSE (baseline + ALS on its residuals) | seconds |\n|---|---|---|---|")
        got = []
        for rank in (int(v) for v in args.als_ranks.split(",")):
            for reg in floats(args.als_regs):
                t0 = time.perf_counter()
                als_cfg = cfg.als.model_copy(update={"rank": rank, "reg_param": reg, "tune": False, "residual": True})
                model = fit_explicit(fit, bias, als_cfg, seed)
                rmse = rating_metrics(predict_explicit(model, bias, held, True, lo, hi))["rmse"]
                got.append((rmse, rank, reg))
                say(f"| {rank} | {reg:g} | {rmse:.4f} | {time.perf_counter() - t0:.1f} |")
        best = min(got)
        say(f"\nLowest: rank {best[1]}, reg_param {best[2]:g} ({best[0]:.4f}).")
    finally:
        spark.stop()
    say.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
