"""The hybrid's feature ablation: which feature groups earn their place, judged on validation rows.

    python benchmarks/feature_ablation.py --warehouse WH [--run RUN] [--without G,...] [--out FILE.md]

WH is a warehouse an evaluate run wrote `features` into (e.g. `movierec evaluate --set
paths.warehouse=WH`). On that run's features it fits the hybrid GBT exactly as the hybrid stage
does (`hybrid.*` settings, the same out-of-fold rows, the same validation rows: a hash of user,
movie and seed) once with every group, once without each of issue 23's groups (knn, day, time,
implicit: tables.FEATURE_GROUPS) and once without all of them, and prints validation RMSE / MAE
and, for the same fits, the test part's. A group is kept when leaving it out raises the
*validation* RMSE; the test column is reported, not used to choose. `--without` starts from
every group less those (backward elimination: the next round after dropping a group).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.config import load_config
from movierec_spark.evaluation import rating_metrics
from movierec_spark.features import hash_sample
from movierec_spark.hybrid import fit_hybrid, predict_hybrid
from movierec_spark.session import build_spark
from movierec_spark.tables import FEATURE_GROUPS

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="run id (default: the latest succeeded evaluate run)")
    ap.add_argument("--out", help="also write the table to this markdown file (appended to)")
    ap.add_argument("--without", default="", help="groups left out of every fit (the start of this round)")
    args = ap.parse_args()
    cfg = load_config(None, {"paths.warehouse": args.warehouse, "spark.show_progress": False})
    spark = build_spark(cfg, app_name="movierec-feature-ablation")
    try:
        wh = cfg.paths.warehouse
        run = args.run or (tables.read_table(spark, wh, "runs")
                           .where("kind = 'evaluate' AND status = 'succeeded'")
                           .orderBy(F.col("started_at").desc()).first().run_id)
        feats = tables.read_table(spark, wh, "features").where(F.col("run_id") == run).drop("run_id")
        h, seed = cfg.hybrid, cfg.pipeline.seed
        lo, hi = (float(v) for v in tables.read_table(spark, wh, "ratings").agg(F.min("rating"), F.max("rating")).first())
        # The hybrid stage's validation rows (hybrid.validation_fraction of the out-of-fold rows).
        rows = (feats.where(F.col("split") == "train")
                .withColumn("is_val", hash_sample(["userId", "movieId"], seed + 3, h.validation_fraction)).cache())
        test = feats.where(F.col("split") == "test").cache()
        start = [g for g in args.without.split(",") if g]
        unknown = [g for g in start if g not in FEATURE_GROUPS]
        if unknown:
            raise SystemExit(f"--without: unknown group(s) {unknown}; groups: {', '.join(FEATURE_GROUPS)}")
        rest = [g for g in FEATURE_GROUPS if g not in start]
        head = "all features" + (f" less {', '.join(start)}" if start else "")
        variants = [(head, start)] + [(f"{head}, without {g}", start + [g]) for g in rest]
        if not start:
            variants.append(("without all four (before issue 23)", list(FEATURE_GROUPS)))
        out = []
        for name, excluded in variants:
            hc = h.model_copy(update={"exclude_features": excluded})
            t0 = time.perf_counter()
            model, imp, trees = fit_hybrid(rows, hc, seed)
            val = rating_metrics(predict_hybrid(model, rows.where("is_val"), lo, hi), label_col="label")
            tst = rating_metrics(predict_hybrid(model, test, lo, hi), label_col="label")
            secs = time.perf_counter() - t0
            out.append((name, val["rmse"], val["mae"], tst["rmse"], tst["mae"], secs, [f for f, _ in imp[:5]]))
            print(f"{name}: validation RMSE {val['rmse']:.4f}, test RMSE {tst['rmse']:.4f} ({secs:.0f} s)", flush=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        base = out[0][1]
        lines = [f"# Hybrid feature ablation (run {run}, commit {commit}, {date.today()})", "",
                 f"`python benchmarks/feature_ablation.py --warehouse {args.warehouse}`: GBT settings as the hybrid "
                 f"stage ({h.max_iter} trees, depth {h.max_depth}); validation = the hybrid's "
                 f"{h.validation_fraction:.0%} hash share of the out-of-fold train rows (what chooses); test = the "
                 "run's test part (reported, never used to choose).", "",
                 "| features | validation RMSE | change | validation MAE | test RMSE | test MAE | top 5 importances |",
                 "|---|---|---|---|---|---|---|"]
        for name, vr, vm, tr, tm, _, top in out:
            lines.append(f"| {name} | {vr:.4f} | {vr - base:+.4f} | {vm:.4f} | {tr:.4f} | {tm:.4f} | {', '.join(top)} |")
        text = "\n".join(lines) + "\n"
        print("\n" + text)
        if args.out:
            with open(args.out, "a") as f:
                f.write(("\n" if f.tell() else "") + text)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
