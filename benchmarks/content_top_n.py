"""The content user model's lists (content.content_top_n) on a run's train part: time and rows.

    python benchmarks/content_top_n.py --warehouse WH [--run RUN] [--config conf/scale.yaml] --out DIR
    python benchmarks/content_top_n.py --compare DIR_A DIR_B

WH is a warehouse a run kept its `rating_splits` and `similar_movies` in. The first form reads
that run's train part and neighbour lists, caches them (untimed), then times content_top_n at
the stage's settings (n = the largest evaluation k, content.user_sources, user_neighbours),
written to parquet in DIR, and prints the seconds, the rows, and the CPU seconds of the process tree (the JVM and its
Python workers, from /proc). Run it once per checkout (PYTHONPATH=<checkout>), one at a time, alone
on the machine. The second form compares two outputs: rows on one side only, rank or because
movie disagreements, and the largest score difference.
"""

from __future__ import annotations

import argparse
import time

from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.config import load_config
from movierec_spark.session import build_spark


def tree_cpu() -> float:
    """CPU seconds of this process's descendants (the JVM, its Python workers, and their waited-for children)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    kids: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(d))
        times[int(d)] = sum(int(x) for x in fields[11:15]) / tick
    total, todo = 0.0, list(kids.get(os.getpid(), []))
    while todo:
        p = todo.pop()
        total += times.get(p, 0.0)
        todo += kids.get(p, [])
    return total


def compare(spark, a: str, b: str) -> None:
    x = spark.read.parquet(a).select("userId", "movieId", *[F.col(c).alias(f"a_{c}") for c in ("rank", "score", "because_movieId")])
    y = spark.read.parquet(b).select("userId", "movieId", *[F.col(c).alias(f"b_{c}") for c in ("rank", "score", "because_movieId")])
    j = x.join(y, ["userId", "movieId"], "full")
    row = j.agg(F.count(F.lit(1)).alias("rows"),
                F.count(F.when(F.col("a_rank").isNull() | F.col("b_rank").isNull(), 1)).alias("one_side"),
                F.count(F.when(F.col("a_rank") != F.col("b_rank"), 1)).alias("rank_diff"),
                F.count(F.when(F.col("a_because_movieId") != F.col("b_because_movieId"), 1)).alias("because_diff"),
                F.max(F.abs(F.col("a_score") - F.col("b_score"))).alias("score_diff")).first()
    print(f"{row.rows} rows in all, {row.one_side} on one side only, {row.rank_diff} at another rank, "
          f"{row.because_diff} with another because movie, largest score difference {row.score_diff}")


def run_args(doc: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark that reads a run's tables and writes or compares outputs."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--warehouse")
    ap.add_argument("--run", help="run id (default: the latest succeeded run)")
    ap.add_argument("--config", help="config file (default: the packaged local.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", help="config override, as movierec's --set")
    ap.add_argument("--out", help="where the lists are written (parquet)")
    ap.add_argument("--compare", nargs=2, metavar="DIR")
    return ap


def open_run(args, app_name: str):
    """(cfg, spark) for run_args' arguments."""
    overrides = {"spark.show_progress": False, **dict(kv.split("=", 1) for kv in args.set)}
    if args.warehouse:
        overrides["paths.warehouse"] = args.warehouse
    cfg = load_config(args.config, overrides)
    return cfg, build_spark(cfg, app_name=app_name)


def main() -> int:
    ap = run_args(__doc__)
    args = ap.parse_args()
    cfg, spark = open_run(args, "movierec-content-top-n")
    try:
        if args.compare:
            compare(spark, *args.compare)
            return 0
        if not (args.warehouse and args.out):
            ap.error("--warehouse and --out are required unless --compare")
        from movierec_spark.content import content_top_n

        wh, c = cfg.paths.warehouse, cfg.content
        run = args.run or (tables.read_table(spark, wh, "runs").where("status = 'succeeded'")
                           .orderBy(F.col("started_at").desc()).first().run_id)
        train = (tables.read_table(spark, wh, "rating_splits").where((F.col("run_id") == run) & (F.col("split") == "train"))
                 .select("userId", "movieId", "rating").cache())
        sims = tables.read_table(spark, wh, "similar_movies").where(F.col("run_id") == run).cache()
        print(f"run {run}: {train.count()} train ratings, {sims.count()} neighbour rows (cached, untimed)", flush=True)
        n = max(cfg.evaluation.ks)
        cpu0, t0 = tree_cpu(), time.perf_counter()
        content_top_n(train, sims, n, c.user_sources, c.user_neighbours).write.mode("overwrite").parquet(args.out)
        secs = time.perf_counter() - t0
        cpu = tree_cpu() - cpu0
        rows = spark.read.parquet(args.out).count()
        print(f"content_top_n: {secs:.1f} s, {rows} rows (n {n}, sources {c.user_sources}, neighbours "
              f"{c.user_neighbours}); CPU {cpu:.1f} s (JVM and Python workers)")
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
