"""The learned ranker's features of a serve run's lists (ranker.ranker_features), part by part.

    python benchmarks/ranker_features.py --warehouse WH [--run RUN] [--parts base,implicit,times,active,knn,all]
        [--sample-users N]

WH is a warehouse a serve run kept its models in (`_models/<run>`: the implicit ALS model, its
pool list and the ranker's kNN table) beside `rating_splits` and `top_n`. The candidate lists
are the ones the recommend stage scores (implicit ALS's top `hybrid.candidate_pool`, the content
and popularity top-N). The train part, the lists and the kNN table are cached untimed; then each
part's features are computed alone and written to Spark's noop sink, one after the other in one
process: `base` (the lists' ranks and scores, user and movie counts and means), `base` plus one
input each (`implicit`: the implicit ALS score; `times`: the time features; `active`: the time
features with the movie's ratings around the user's active time; `knn`: the item-kNN scores),
and `all` (what the recommend stage computes). What a part adds is its time less base's. Alone
on the machine.

`--sample-users N`: the lists of a hash sample of about N users only (ranker.sample_users, as the
ranker's training lists are at hybrid.ranker_max_users), each part timed twice: without and with
the sample's predicate passed as ranker_features' `users` (the user-side statistics then read
only the sampled users' rows); the two give the same rows (checked: a count of the rows on one
side only).
"""

from __future__ import annotations

import argparse
import time

from pyspark.ml.recommendation import ALSModel
from pyspark.sql import functions as F

from movierec_spark import ranker, tables
from movierec_spark.config import load_config
from movierec_spark.session import build_spark


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="run id (default: the latest succeeded run)")
    ap.add_argument("--parts", default="base,implicit,times,active,knn,all")
    ap.add_argument("--config", help="config file (default: the packaged local.yaml)")
    ap.add_argument("--sample-users", type=int, help="lists of a hash sample of about N users, timed without and with the predicate")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", help="config override, as movierec's --set")
    args = ap.parse_args()
    cfg = load_config(args.config, {"paths.warehouse": args.warehouse, "spark.show_progress": False,
                                    **dict(kv.split("=", 1) for kv in args.set)})
    spark = build_spark(cfg, app_name="movierec-ranker-features")
    try:
        wh, h = cfg.paths.warehouse, cfg.hybrid
        run = args.run or (tables.read_table(spark, wh, "runs").where("status = 'succeeded'")
                           .orderBy(F.col("started_at").desc()).first().run_id)
        splits = tables.read_table(spark, wh, "rating_splits").where((F.col("run_id") == run) & (F.col("split") == "train"))
        train = splits.select("userId", "movieId", "rating").cache()
        times = splits.select("userId", "movieId", "rated_at")
        models = f"{wh}/_models/{run}"
        implicit = ALSModel.load(f"{models}/als_implicit")
        pool = ranker.pool_length(cfg)
        ext = spark.read.parquet(f"{models}/als_implicit_pool").where(F.col("rank") <= pool).select(
            F.lit("als_implicit").alias("model"), "userId", "rank", "movieId", "score")
        rest = (tables.read_table(spark, wh, "top_n").where((F.col("run_id") == run) & F.col("model").isin(
            [m for m in h.candidate_models if m != "als_implicit"])).select("model", "userId", "rank", "movieId", "score"))
        lists = ext.unionByName(rest)
        users = ranker.sample_users(train, args.sample_users, cfg.pipeline.seed) if args.sample_users else None
        lists = (lists if users is None else lists.where(users)).cache()
        nb = spark.read.parquet(f"{models}/ranker_neighbours").where(F.col("p") == 1).drop("p").cache()
        print(f"run {run}: {lists.count()} list rows, {train.count()} train ratings, {nb.count()} kNN rows "
              "(cached, untimed)", flush=True)
        inputs = {"base": (None, None, None, 0), "implicit": (implicit, None, None, 0),
                  "times": (None, times, None, 0), "active": (None, times, None, h.ranker_active_days),
                  "knn": (None, None, nb, 0), "all": (implicit, times, nb, h.ranker_active_days)}
        if users is None:
            print("| part | seconds |\n|---|---|")
        else:
            print("| part | seconds, all users' statistics | seconds, the sample's | rows on one side only |\n|---|---|---|---|")
        for part in args.parts.split(","):
            got = []
            for filt in [None] if users is None else [None, users]:
                t0 = time.perf_counter()
                feats, _ = ranker.ranker_features(lists, train, h.candidate_models, pool, *inputs[part], users=filt)
                feats.write.format("noop").mode("overwrite").save()
                got.append((f"{time.perf_counter() - t0:.1f}", feats))
            if users is not None:
                a, b = got[0][1], got[1][1]
                got.append((str(a.exceptAll(b).count() + b.exceptAll(a).count()), None))
            print(f"| {part} | " + " | ".join(t for t, _ in got) + " |", flush=True)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
