"""Do tuning candidates need every ALS iteration? The searches' choices at fewer trial iterations.

    python benchmarks/tune_iters.py --warehouse WH [--run RUN] [--iters 15,10,8] [--out FILE.md]

WH holds a run's split (e.g. `movierec evaluate --stages ingest,split`). For each count in
--iters (tune.trial_max_iter), the script runs both searches the pipeline runs on that run's
train part, exactly as the stages do: the rating models' (baselines stage: the bias grid, then
the residual ALS's rank and reg_param) and implicit ALS's (als_implicit stage). It prints each
search's choice, its validation score, its fits and seconds. Only validation folds carved from
train are read: no test rating.

A count whose choices equal the full count's gives the same run output (the final models are
fitted with their own max_iter) for less tuning time; where a choice differs, the table says so
and the count is not a free saving.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.cli import parse_set, setup_logging
from movierec_spark.config import load_config
from movierec_spark.session import build_spark
from movierec_spark.tune import tune_implicit, tune_rating_models


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="the run whose split to use (default: the greatest run id)")
    ap.add_argument("--iters", default="15,10,8", help="trial ALS iterations to compare, in this order")
    ap.add_argument("--out", help="write the table (markdown) here too")
    ap.add_argument("--set", action="append", default=[], help="config overrides")
    args = ap.parse_args()
    setup_logging()
    cfg = load_config(None, {"paths.warehouse": args.warehouse, "spark.show_progress": False, **parse_set(args.set)})
    spark = build_spark(cfg, app_name="tune-iters")
    rows = []
    try:
        splits = tables.read_table(spark, args.warehouse, "rating_splits")
        run = args.run or splits.agg(F.max("run_id")).first()[0]
        train = (splits.where((F.col("run_id") == run) & (F.col("split") == "train"))
                 .select("userId", "movieId", "rating").cache())
        n, lo, hi = train.agg(F.count(F.lit(1)), F.min("rating"), F.max("rating")).first()
        seed = cfg.pipeline.seed
        for iters in [int(x) for x in args.iters.split(",")]:
            c = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"trial_max_iter": iters})})
            t0 = time.perf_counter()
            rating, r_trials = tune_rating_models(train, c, seed, lo, hi)
            r_s = time.perf_counter() - t0
            als_rmse = min(t["rmse"] for t in r_trials if t["model"] == "als")
            t0 = time.perf_counter()
            implicit, i_trials = tune_implicit(train, c, seed)
            i_s = time.perf_counter() - t0
            ndcg = max(t["ndcg@10"] for t in i_trials)
            rows.append((iters, rating, als_rmse, len(r_trials), r_s, implicit, ndcg, len(i_trials), i_s))
            print(f"trial_max_iter {iters}: rating models {rating} (ALS validation RMSE {als_rmse:.4f}, "
                  f"{len(r_trials)} fits, {r_s:.1f} s); implicit {implicit} (validation nDCG@10 {ndcg:.4f}, "
                  f"{len(i_trials)} fits, {i_s:.1f} s)", flush=True)
        train.unpersist()
    finally:
        spark.stop()
    ref = rows[[r[0] for r in rows].index(max(r[0] for r in rows))]
    lines = [f"Run {run}'s train part ({n:,} ratings), seed {seed}.", "",
             "| trial iterations | rating models chosen | ALS val RMSE | fits | s | implicit ALS chosen "
             "| val nDCG@10 | fits | s | same choices as the most iterations |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for it, rating, e, rf, rs, imp, nd, nf, ns in rows:
        same = "yes" if (rating, imp) == (ref[1], ref[5]) else "**no**"
        lines.append(f"| {it} | {rating} | {e:.4f} | {rf} | {rs:.1f} | {imp} | {nd:.4f} | {nf} | {ns:.1f} | {same} |")
    out = "\n".join(lines)
    print(out)
    if args.out:
        Path(args.out).write_text(f"# Tuning candidates at fewer ALS iterations\n\n{out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
