"""How the learned ranker's pool, depth and trees are chosen: train_ranker's own validation (users
it does not train on, against their held-out hash fold of train), never a test part.

    python benchmarks/ranker_settings.py --warehouse WH [--run RUN] [--grid 50x4x30,30x4x30,...]
                                         [--out FILE]

WH holds an evaluate run (e.g. `movierec evaluate --set split.method=stratified --set
split.test_ratio=0.25`). Only its train part, similar_movies and the implicit ALS settings it
chose on validation are read. Each grid point (candidate_pool x ranker_max_depth x
ranker_max_iter) trains the ranker as the recommend stage does (train_ranker: fold 0 of train
held out, the candidate models refitted on the rest, `hybrid.ranker_validation_users` of the
users left out of the fit) and prints that share's nDCG@10, recall@10 and seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from lines import Lines  # benchmarks/lines.py (the script's own directory)
from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.config import load_config
from movierec_spark.ranker import train_ranker
from movierec_spark.session import build_spark

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="evaluate run id (default: the latest succeeded evaluate run)")
    ap.add_argument("--grid", default="50x4x30,30x4x30,100x4x30",
                    help="candidate_pool x ranker_max_depth x ranker_max_iter points")
    ap.add_argument("--out", help="append the table to this markdown file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every grid point (e.g. hybrid.ranker_active_days=180)")
    args = ap.parse_args()
    import yaml

    sets = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    cfg = load_config(None, {"paths.warehouse": args.warehouse, "spark.show_progress": False, **sets})
    spark = build_spark(cfg, app_name="movierec-ranker-settings")
    say = Lines(args.out)

    try:
        wh = cfg.paths.warehouse
        row = (tables.read_table(spark, wh, "runs").where("status = 'succeeded' AND kind = 'evaluate'")
               .where(F.lit(args.run is None) | (F.col("run_id") == F.lit(args.run or "")))
               .orderBy(F.col("started_at").desc()).first())
        run = row.run_id
        tuned = (json.loads(row.config).get("tuned") or {}).get("settings", {}).get("als_implicit", {})
        if tuned:
            cfg.als_implicit = cfg.als_implicit.model_copy(update=tuned)
        splits = tables.read_table(spark, wh, "rating_splits").where((F.col("run_id") == run) & (F.col("split") == "train"))
        train = splits.select("userId", "movieId", "rating").cache()
        times = splits.select("userId", "movieId", "rated_at").cache()
        sims = tables.read_table(spark, wh, "similar_movies").where(F.col("run_id") == run).drop("run_id").cache()
        n_items = tables.read_table(spark, wh, "movies").count()
        say(f"Run {run} (warehouse {wh}), {train.count()} train ratings; implicit ALS as the run chose it: {tuned}. "
            f"Validation: {cfg.hybrid.ranker_validation_users:.0%} of users, left out of the ranker's fit, "
            "against their fold-0 movies." + (f" Overrides: {sets}." if sets else ""))
        say()
        say("| candidate_pool | ranker_max_depth | ranker_max_iter | validation nDCG@10 | recall@10 | seconds |\n"
            "|---|---|---|---|---|---|")
        got = []
        for point in args.grid.split(","):
            pool, depth, trees = (int(v) for v in point.split("x"))
            cfg.hybrid = cfg.hybrid.model_copy(update={"candidate_pool": pool, "ranker_max_depth": depth,
                                                       "ranker_max_iter": trees})
            t0 = time.perf_counter()
            _, validation, _ = train_ranker(train, times, sims, cfg, n_items)
            got_m = {m: v for m, k, v in validation if k == 10}
            got.append((got_m["ndcg"], pool, depth, trees))
            say(f"| {pool} | {depth} | {trees} | {got_m['ndcg']:.4f} | {got_m['recall']:.4f} | "
                f"{time.perf_counter() - t0:.0f} |")
        best = max(got)
        say(f"\nHighest validation nDCG@10: pool {best[1]}, depth {best[2]}, {best[3]} trees ({best[0]:.4f}).")
    finally:
        spark.stop()
    say.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
