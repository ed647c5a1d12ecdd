"""The features stage's neighbour lists (features.fold_neighbours) on a run's train part: time and rows.

    python benchmarks/fold_neighbours.py --warehouse WH [--run RUN] [--config conf/scale.yaml] [--no-hold] --out DIR
    python benchmarks/fold_neighbours.py --compare DIR_A DIR_B

WH is a warehouse a run kept its `rating_splits` in. The first form reads that run's train part,
caches it as the features stage does (untimed), then computes the user and the movie lists as
compute_passes does in a serve run (the out-of-fold passes oof_plan gives and the whole train
part; the movies' lists with the learned ranker's item-kNN passes), each written to parquet in
DIR, and prints the seconds of each and the CPU seconds of the process tree (from /proc).
`--no-hold`: without fold_neighbours' `hold` (each side of the self-join computes the capped
sample itself, as before); `--hold-movies`: the movie lists hold theirs too; `--uncached`: the
self-joins read the Delta table instead of the cached train part (exchanges over it are
reused). One process at a time, alone on the machine. The second form compares two outputs:
rows on one side only, rank disagreements, the largest similarity difference.
"""

from __future__ import annotations

import time

from content_top_n import open_run, run_args, tree_cpu
from pyspark.sql import functions as F

from movierec_spark import tables

KINDS = ("user", "movie")


def compare(spark, a: str, b: str) -> None:
    for kind in KINDS:
        keys = ["p", "userId" if kind == "user" else "movieId", "nb"]
        x = spark.read.parquet(f"{a}/{kind}").select(*keys, F.col("sim").alias("a_sim"), F.col("rank").alias("a_rank"))
        y = spark.read.parquet(f"{b}/{kind}").select(*keys, F.col("sim").alias("b_sim"), F.col("rank").alias("b_rank"))
        row = x.join(y, keys, "full").agg(
            F.count(F.lit(1)).alias("rows"),
            F.count(F.when(F.col("a_rank").isNull() | F.col("b_rank").isNull(), 1)).alias("one_side"),
            F.count(F.when(F.col("a_rank") != F.col("b_rank"), 1)).alias("rank_diff"),
            F.max(F.abs(F.col("a_sim") - F.col("b_sim"))).alias("sim_diff")).first()
        print(f"{kind}: {row.rows} rows in all, {row.one_side} on one side only, {row.rank_diff} at another rank, "
              f"largest similarity difference {row.sim_diff}")


def main() -> int:
    ap = run_args(__doc__)
    ap.add_argument("--no-hold", action="store_true", help="each side of the self-join samples on its own (as before)")
    ap.add_argument("--hold-movies", action="store_true", help="the movie lists hold their sample too")
    ap.add_argument("--uncached", action="store_true", help="the self-joins read the Delta table, not the cache")
    args = ap.parse_args()
    cfg, spark = open_run(args, "movierec-fold-neighbours")
    try:
        if args.compare:
            compare(spark, *args.compare)
            return 0
        if not (args.warehouse and args.out):
            ap.error("--warehouse and --out are required unless --compare")
        from movierec_spark.features import fold_neighbours, oof_plan, with_folds

        wh, h, seed = cfg.paths.warehouse, cfg.hybrid, cfg.pipeline.seed
        run = args.run or (tables.read_table(spark, wh, "runs").where("status = 'succeeded'")
                           .orderBy(F.col("started_at").desc()).first().run_id)
        train = (tables.read_table(spark, wh, "rating_splits").where((F.col("run_id") == run) & (F.col("split") == "train"))
                 .select("userId", "movieId", "rating", "rated_at").cache())
        n_train = train.count()
        n_oof, _ = oof_plan(n_train, h)
        outs = list(range(n_oof)) + [None]
        print(f"run {run}: {n_train} train ratings (cached, untimed); passes leaving out folds {outs}", flush=True)
        folded = with_folds(train, seed, h.folds)
        if args.uncached:
            folded = with_folds(tables.read_table(spark, wh, "rating_splits").where(
                (F.col("run_id") == run) & (F.col("split") == "train")).select("userId", "movieId", "rating", "rated_at"),
                seed, h.folds)
        total_cpu0, total0 = tree_cpu(), time.perf_counter()
        for kind in KINDS:
            # As compute_passes: the user lists hold their sample, the movie lists do not (--hold-movies: they do too).
            hold: list | None = None if args.no_hold or (kind == "movie" and not args.hold_movies) else []
            cpu0, t0 = tree_cpu(), time.perf_counter()
            if kind == "user":
                nb = fold_neighbours(folded, "userId", "movieId", outs, h.neighbours, h.min_common, h.cap_per_movie,
                                     seed, hold=hold)
            else:
                nb = fold_neighbours(folded, "movieId", "userId", outs, h.neighbours, h.min_common, h.cap_per_user,
                                     seed, cooccur=([0, None], h.ranker_knn_neighbours), hold=hold)
            for df in hold or []:
                df.count()  # filled by one job, as compute_passes does
            nb.write.mode("overwrite").parquet(f"{args.out}/{kind}")
            for df in hold or []:
                df.unpersist()
            print(f"{kind} lists: {time.perf_counter() - t0:.1f} s, CPU {tree_cpu() - cpu0:.1f} s, "
                  f"{spark.read.parquet(f'{args.out}/{kind}').count()} rows", flush=True)
        print(f"both: {time.perf_counter() - total0:.1f} s, CPU {tree_cpu() - total_cpu0:.1f} s "
              f"({'no hold' if args.no_hold else 'hold' + (' (movies too)' if args.hold_movies else ' (users)')}"
              f"{', uncached' if args.uncached else ''})")
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
