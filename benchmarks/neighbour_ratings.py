"""The hybrid's neighbour-rating features (sur, smr, csmr and their kNN sums): the Spark joins
against numpy per partition (gather.neighbour_ratings, features.GATHER).

    python benchmarks/neighbour_ratings.py --warehouse WH [--run RUN] [--methods join,numpy] [--config conf/scale.yaml]

WH is a warehouse a serve run kept its neighbour lists in (`_models/<run>/neighbours`, the
whole train part's user and movie lists) with its `rating_splits` and `similar_movies`. The
pairs are every train rating (what the out-of-fold passes featurise, once each); their
residuals here are the rating less the global mean (the cost does not depend on the values).
Each method's features are timed from cached inputs, written to parquet (no collect), then
compared: rows, and the largest difference of any column. One method at a time, alone on the
machine.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from pyspark.sql import functions as F

from movierec_spark import features, tables
from movierec_spark.config import load_config
from movierec_spark.gather import neighbour_ratings
from movierec_spark.session import build_spark

COLS = {"sur": ["sur1", "sur2", "sur3", "sur4", "sur5", "n_sur", "_knn_user", "knn_user_n"],
        "smr": ["smr1", "smr2", "smr3", "smr4", "smr5", "n_smr", "_knn_item", "knn_item_n"],
        "csmr": ["csmr1", "csmr2", "csmr3", "csmr4", "csmr5", "n_csmr", "content_sim", "_cres"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="run id (default: the latest succeeded run)")
    ap.add_argument("--methods", default="join,numpy")
    ap.add_argument("--config", help="config file (default: the packaged local.yaml)")
    args = ap.parse_args()
    cfg = load_config(args.config, {"paths.warehouse": args.warehouse, "spark.show_progress": False})
    spark = build_spark(cfg, app_name="movierec-neighbour-ratings")
    out = tempfile.mkdtemp(prefix="neighbour-ratings-")
    try:
        wh, h, c = cfg.paths.warehouse, cfg.hybrid, cfg.content
        run = args.run or (tables.read_table(spark, wh, "runs").where("status = 'succeeded'")
                           .orderBy(F.col("started_at").desc()).first().run_id)
        train = (tables.read_table(spark, wh, "rating_splits").where((F.col("run_id") == run) & (F.col("split") == "train"))
                 .select("userId", "movieId", F.col("rating").cast("double").alias("r")))
        mean = train.agg(F.avg("r")).first()[0]
        resid = train.withColumn("res", F.col("r") - F.lit(mean)).cache()
        keys = resid.select("userId", "movieId").cache()
        unb = spark.read.parquet(f"{wh}/_models/{run}/neighbours/user").select("userId", "nb", "sim").cache()
        mnb = spark.read.parquet(f"{wh}/_models/{run}/neighbours/movie").select("movieId", "nb", "sim").cache()
        cnb = (tables.read_table(spark, wh, "similar_movies").where(F.col("run_id") == run)
               .select("movieId", F.col("similar_movieId").alias("nb"), F.col("similarity").alias("sim"),
                       (F.col("rank") <= c.user_neighbours).alias("near")).cache())
        print(f"run {run}: {resid.count()} train ratings (the pairs), list rows: {unb.count()} user, "
              f"{mnb.count()} movie, {cnb.count()} content (cached untimed)", flush=True)
        print("| method | seconds |\n|---|---|")
        paths = {}
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            paths[method] = f"{out}/{method}"
            if method == "join":
                sur = features._top_ratings(keys.join(unb, "userId").join(
                    resid.select(F.col("userId").alias("nb"), "movieId", "r", "res"), ["nb", "movieId"]),
                    "sur", "n_sur", "knn_user", h.knn_shrink)
                rated = resid.select("userId", F.col("movieId").alias("nb"), "r", "res")
                smr = features._top_ratings(keys.join(mnb, "movieId").join(rated, ["userId", "nb"]),
                                            "smr", "n_smr", "knn_item", h.knn_shrink)
                csmr = features._content_ratings(keys.join(cnb, "movieId").join(rated, ["userId", "nb"]),
                                                 c.predict_shrink)
                for name, df in (("sur", sur), ("smr", smr), ("csmr", csmr)):
                    df.write.parquet(f"{paths[method]}/{name}")
            else:
                sur = neighbour_ratings(keys, resid, [unb], "movieId", ["sur"], [h.knn_shrink])
                item = neighbour_ratings(keys, resid, [mnb, cnb], "userId", ["smr", "csmr"],
                                         [h.knn_shrink, c.predict_shrink])
                sur.write.parquet(f"{paths[method]}/sur")
                item.write.parquet(f"{paths[method]}/item")
            print(f"| {method} | {time.perf_counter() - t0:.1f} |", flush=True)
        if len(paths) == 2 and set(paths) == {"join", "numpy"}:
            got = {"sur": spark.read.parquet(f"{paths['numpy']}/sur").select(
                "userId", "movieId", *COLS["sur"][:6], F.col("sur_knn").alias("_knn_user"),
                F.col("sur_cnt").alias("knn_user_n"))}
            item = spark.read.parquet(f"{paths['numpy']}/item")
            got["smr"] = item.where("smr_cnt > 0").select("userId", "movieId", *COLS["smr"][:6],
                                                          F.col("smr_knn").alias("_knn_item"),
                                                          F.col("smr_cnt").alias("knn_item_n"))
            got["csmr"] = item.where("csmr_cnt > 0").select("userId", "movieId", *COLS["csmr"][:6],
                                                            F.col("csmr_near").alias("content_sim"),
                                                            F.col("csmr_knn").alias("_cres"))
            for name, cols in COLS.items():
                a = got[name].select("userId", "movieId", *[F.col(x).alias(f"a_{x}") for x in cols])
                b = spark.read.parquet(f"{paths['join']}/{name}").select(
                    "userId", "movieId", *[F.col(x).alias(f"b_{x}") for x in cols])
                j = a.join(b, ["userId", "movieId"], "full")
                row = j.agg(F.count(F.lit(1)).alias("rows"),
                            F.sum(F.when(F.col(f"a_{cols[-1]}").isNull() | F.col(f"b_{cols[-1]}").isNull(), 1)
                                  .otherwise(0)).alias("one_side"),
                            F.greatest(*[F.max(F.abs(F.col(f"a_{x}") - F.col(f"b_{x}"))) for x in cols]).alias("diff"),
                            F.sum(F.when(F.greatest(*[(F.col(f"a_{x}").isNull() != F.col(f"b_{x}").isNull()).cast("int")
                                                       for x in cols]) > 0, 1).otherwise(0)).alias("null_mismatch")
                            ).first()
                print(f"{name}: {row.rows} rows, {row.one_side} on one side only, {row.null_mismatch} with a null on "
                      f"one side only, largest difference {row.diff}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
