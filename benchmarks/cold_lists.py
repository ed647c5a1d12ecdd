"""The serve run's cold-user lists (users with ratings but none in the run's train part), the old way and now.

    python benchmarks/cold_lists.py --warehouse WH [--run RUN] [--config conf/scale.yaml] [--repeat 2]

WH is a warehouse with `ratings` and a run's `rating_splits`. Each way computes the cold users
and their popularity lists (top 10, the new-user window of the config) and the count of those
users, one after the other in one process, `--repeat` times each, alone on the machine:

- `old`: as the recommend stage did until now, after its wait for the hybrid model:
  recommend.cold_user_lists (its lists written to Spark's noop sink, as the `recommendations`
  write read them), then a count of its users (a second pass over every rating);
- `new`: recommend.materialized_cold_lists (the cold users' ratings kept, counted; their lists
  only when there are some), which the stage now runs before that wait.

Prints seconds and the process tree's CPU seconds of each, and the cold users each found (they
must agree).
"""

from __future__ import annotations

import time

from content_top_n import open_run, run_args, tree_cpu
from pyspark.sql import functions as F

from movierec_spark import recommend, tables
from movierec_spark.session import release


def main() -> int:
    ap = run_args(__doc__)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    cfg, spark = open_run(args, "movierec-cold-lists")
    try:
        wh, r, n = cfg.paths.warehouse, cfg.recommend, cfg.evaluation.top_n
        run = args.run or (tables.read_table(spark, wh, "runs").where("status = 'succeeded'")
                           .orderBy(F.col("started_at").desc()).first().run_id)
        window = r.new_user_window_days if r.new_user_max_ratings > 0 else None
        train = tables.read_table(spark, wh, "rating_splits").where(
            (F.col("run_id") == run) & (F.col("split") == "train")).select("userId", "movieId", "rated_at")
        ratings = tables.read_table(spark, wh, "ratings").select("userId", "movieId", "rated_at")

        def old() -> int:
            users, lists = recommend.cold_user_lists(ratings, train, n, window)
            lists.write.format("noop").mode("overwrite").save()
            return users.count()

        def new() -> int:
            users, lists = recommend.materialized_cold_lists(ratings, train, n, window)
            if lists is not None:
                release(lists)
            return users

        print(f"run {run}, top {n}, new-user window {window} days\n")
        print("| way | seconds | CPU seconds (process tree) | cold users |\n|---|---|---|---|", flush=True)
        for _ in range(args.repeat):
            for name, way in (("old", old), ("new", new)):
                cpu0, t0 = tree_cpu(), time.perf_counter()
                users = way()
                print(f"| {name} | {time.perf_counter() - t0:.1f} | {tree_cpu() - cpu0:.1f} | {users} |", flush=True)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
