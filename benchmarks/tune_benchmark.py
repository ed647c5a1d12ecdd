"""Implicit ALS chosen on validation against the best grid point measured on test.

    python benchmarks/tune_benchmark.py --warehouse WH [--run RUN] [--out FILE] [--set tune.implicit_ranks=[10,20]]

WH holds an evaluate run's split (for example `movierec evaluate --set split.method=stratified
--set split.test_ratio=0.25`). The script runs the tune search on that run's train part exactly
as the als_implicit stage does (validation fold carved from train), then fits every point of
the grid (tune.implicit_ranks x implicit_reg_params x implicit_alphas x implicit_confidences)
on the whole train part and scores nDCG@10 on the test part. It prints the chosen setting's test
nDCG@10 beside the best grid point's: the grid's test scores choose nothing, they only say how
much the validation choice leaves on the table.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.als import fit_implicit, recommend_unseen
from movierec_spark.cli import parse_set, setup_logging
from movierec_spark.config import load_config
from movierec_spark.evaluation import ranking_metrics
from movierec_spark.session import build_spark
from movierec_spark.tune import IMPLICIT_KEYS, tune_implicit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="the evaluate run whose split to use (default: the newest)")
    ap.add_argument("--out", help="write the table (markdown) here too")
    ap.add_argument("--set", action="append", default=[], help="config overrides (the grid's lists)")
    args = ap.parse_args()
    setup_logging()
    cfg = load_config(None, {"paths.warehouse": args.warehouse, "spark.show_progress": False, **parse_set(args.set)})
    spark = build_spark(cfg, app_name="tune-benchmark")
    try:
        splits = tables.read_table(spark, args.warehouse, "rating_splits")
        run = args.run or splits.agg(F.max("run_id")).first()[0]
        rows = splits.where(F.col("run_id") == run)
        train = rows.where("split = 'train'").select("userId", "movieId", "rating").cache()
        test = rows.where("split = 'test'").select("userId", "movieId", "rating").cache()
        seed = cfg.pipeline.seed
        t0 = time.perf_counter()
        chosen, trials = tune_implicit(train, cfg, seed)
        search_s = time.perf_counter() - t0

        def test_ndcg(setting: dict) -> float:
            model = fit_implicit(train, cfg.als_implicit.model_copy(update=setting), seed)
            recs = recommend_unseen(model, train, 10)
            v = next(x for m, k, x in ranking_metrics(recs, test, ks=(10,)) if m == "ndcg")
            recs.unpersist()
            return v

        t = cfg.tune
        grid = [dict(zip(IMPLICIT_KEYS, p)) for p in itertools.product(
            t.implicit_ranks, t.implicit_reg_params, t.implicit_alphas, t.implicit_confidences)]
        scores = []
        for g in grid:
            scores.append((test_ndcg(g), g))
            print(f"grid {g}: test nDCG@10 {scores[-1][0]:.4f}", flush=True)
        best_v, best = max(scores, key=lambda s: s[0])
        chosen_v = next(v for v, g in scores if g == chosen)
        default = {k: getattr(cfg.als_implicit, k) for k in IMPLICIT_KEYS}
        default_v = next((v for v, g in scores if g == default), None)
        lines = ["| implicit ALS setting | how chosen | test nDCG@10 |", "|---|---|---|",
                 f"| {chosen} | validation fold of train ({len(trials)} fits, {search_s:.0f} s) | {chosen_v:.4f} |",
                 f"| {best} | best of {len(grid)} grid points on test (for comparison only) | {best_v:.4f} |"]
        if default_v is not None:
            lines.append(f"| {default} | the config's values, untuned | {default_v:.4f} |")
        out = "\n".join(lines) + f"\n\nGap to the best grid point: {best_v - chosen_v:.4f} (run {run})."
        print(out)
        if args.out:
            Path(args.out).write_text(f"# Implicit ALS: validation choice against the test grid\n\n{out}\n")
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
