"""How new users' lists are built: the candidate sources and their blend, scored on simulated new
users carved from an evaluate run's train part (never its test part).

    python benchmarks/cold_start.py --warehouse WH [--run RUN] [--keep 3] [--ratio 0.2] [--out FILE]

Validation: a hash share `--ratio` of the train part's users with more than `--keep` + 4 train
ratings keep only their `--keep` earliest ratings (the `cold_users` split's protocol, inside
train); the rest of theirs is held out. Every other train rating is fitted. Each source lists
50 unseen movies per simulated new user from the fitted part: popularity, content (the run's
similar_movies), content re-weighted by popularity, item-kNN (co-occurrence cosine) and implicit
ALS (the run's tuned settings). Blends are reciprocal-rank fusions: sum of w_s / (60 + rank_s).
Prints nDCG@10 and recall@10 over the simulated users for each source and blend.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from lines import Lines  # benchmarks/lines.py (the script's own directory)
from pyspark.sql import Window
from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.als import fit_implicit, recommend_unseen
from movierec_spark.baselines import popularity_top_n, top_n_per_user
from movierec_spark.config import load_config
from movierec_spark.content import content_top_n
from movierec_spark.evaluation import ranking_metrics
from movierec_spark.features import hash_sample
from movierec_spark.ranker import item_neighbours
from movierec_spark.recommend import RRF_K
from movierec_spark.session import build_spark

N = 50
BLENDS = {  # name: {source: weight}
    "pop+pop_time60": {"popularity": 1.0, "pop_time60": 1.0},
    "pop+pop_time365": {"popularity": 1.0, "pop_time365": 1.0},
    "pop+2 pop_time": {"popularity": 1.0, "pop_time": 2.0},
    "pop+pop_time+content_pop/4": {"popularity": 1.0, "pop_time": 1.0, "content_pop": 0.25},
    "pop+pop_time+content/4": {"popularity": 1.0, "pop_time": 1.0, "content": 0.25},
    "pop+pop_time+implicit/2": {"popularity": 1.0, "pop_time": 1.0, "als_implicit": 0.5},
    "pop+pop_time+implicit": {"popularity": 1.0, "pop_time": 1.0, "als_implicit": 1.0},
    "pop+cond_pop": {"popularity": 1.0, "cond_pop": 1.0},
    "pop+pop_time": {"popularity": 1.0, "pop_time": 1.0},
    "cond_pop+pop_time": {"cond_pop": 1.0, "pop_time": 1.0},
    "pop+cond_pop+implicit": {"popularity": 1.0, "cond_pop": 1.0, "als_implicit": 1.0},
    "pop_time+cond_pop+implicit": {"pop_time": 1.0, "cond_pop": 1.0, "als_implicit": 1.0},
    "pop+content": {"popularity": 1.0, "content": 1.0},
    "pop+content_pop": {"popularity": 1.0, "content_pop": 1.0},
    "pop+knn": {"popularity": 1.0, "knn": 1.0},
    "pop+implicit": {"popularity": 1.0, "als_implicit": 1.0},
    "pop+knn+content_pop": {"popularity": 1.0, "knn": 1.0, "content_pop": 1.0},
    "pop+knn+content_pop/2": {"popularity": 1.0, "knn": 1.0, "content_pop": 0.5},
    "pop+implicit+content_pop/2": {"popularity": 1.0, "als_implicit": 1.0, "content_pop": 0.5},
    "pop+knn+implicit": {"popularity": 1.0, "knn": 1.0, "als_implicit": 1.0},
    "pop+knn+implicit+content_pop/2": {"popularity": 1.0, "knn": 1.0, "als_implicit": 1.0, "content_pop": 0.5},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run", help="evaluate run id (default: the latest succeeded evaluate run)")
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--out", help="append the table to this markdown file")
    args = ap.parse_args()
    cfg = load_config(None, {"paths.warehouse": args.warehouse, "spark.show_progress": False})
    spark = build_spark(cfg, app_name="movierec-cold-start")
    say = Lines(args.out)
    try:
        wh, seed = cfg.paths.warehouse, cfg.pipeline.seed
        runs = tables.read_table(spark, wh, "runs").where("status = 'succeeded' AND kind = 'evaluate'")
        row = (runs.where(F.col("run_id") == args.run) if args.run else runs).orderBy(F.col("started_at").desc()).first()
        run, run_cfg = row.run_id, json.loads(row.config)
        imp = cfg.als_implicit.model_copy(update=(run_cfg.get("tuned") or {}).get("settings", {}).get("als_implicit", {}))
        train = (tables.read_table(spark, wh, "rating_splits").where((F.col("run_id") == run) & (F.col("split") == "train"))
                 .select("userId", "movieId", "rating", "rated_at"))
        sims = tables.read_table(spark, wh, "similar_movies").where(F.col("run_id") == run).drop("run_id").cache()
        n_u = F.count(F.lit(1)).over(Window.partitionBy("userId"))
        order = F.row_number().over(Window.partitionBy("userId").orderBy("rated_at", "movieId"))
        marked = (train.withColumn("cold", (n_u > args.keep + 4) & hash_sample(["userId"], seed + 11, args.ratio))
                  .withColumn("held", F.col("cold") & (order > args.keep)))
        fit = marked.where(~F.col("held")).select("userId", "movieId", "rating").cache()
        held = marked.where("held").select("userId", "movieId", "rating").cache()
        users = held.select("userId").distinct().cache()
        say(f"Run {run} (warehouse {wh}): {users.count()} simulated new users keep their {args.keep} earliest "
            f"train ratings; {held.count()} of their ratings held out; {fit.count()} fitted ratings")
        own = fit.join(users, "userId", "left_semi")
        t0 = time.perf_counter()
        lists = {"popularity": popularity_top_n(fit, N, seen=own)}
        content = content_top_n(own, sims, 200, cfg.content.user_sources, cfg.content.user_neighbours)
        lists["content"] = content.where(F.col("rank") <= N)
        n_i = fit.groupBy("movieId").agg(F.log1p(F.count(F.lit(1))).alias("ln"))
        lists["content_pop"] = top_n_per_user(content.join(n_i, "movieId").select(
            "userId", "movieId", (F.col("score") * F.col("ln")).alias("s")), N, score=F.col("s"))
        nb = item_neighbours(fit, 50, cfg.hybrid.cap_per_user, seed)
        knn = (own.select("userId", F.col("movieId").alias("nb")).join(nb, "nb")
               .groupBy("userId", "movieId").agg(F.sum("sim").alias("s"))
               .join(own, ["userId", "movieId"], "left_anti"))
        lists["knn"] = top_n_per_user(knn, N, score=F.col("s"))
        # Conditional popularity: sum over the user's movies j of P(i | j) = co-raters / raters of j
        # (each rater's movies capped at cap_per_user by a hash, as the co-rating joins are).
        cap = cfg.hybrid.cap_per_user
        capped = fit.withColumn("o", F.row_number().over(Window.partitionBy("userId").orderBy(
            F.xxhash64("userId", "movieId", F.lit(seed))))).where(F.col("o") <= cap).select("userId", "movieId")
        n_j = fit.groupBy("movieId").agg(F.count(F.lit(1)).alias("n_j"))
        hist = own.select(F.col("userId").alias("u"), F.col("movieId").alias("j")).join(
            n_j.withColumnRenamed("movieId", "j"), "j")
        raters = capped.select(F.col("userId").alias("v"), F.col("movieId").alias("j"))
        cond = (hist.join(raters, "j").join(capped.select(F.col("userId").alias("v"), "movieId"), "v")
                .groupBy(F.col("u").alias("userId"), "movieId").agg(F.sum(1.0 / F.col("n_j")).alias("s"))
                .join(own, ["userId", "movieId"], "left_anti"))
        lists["cond_pop"] = top_n_per_user(cond, N, score=F.col("s"))
        # Popularity when the user was active: ratings of each movie within 180 days of the
        # user's first rating.
        first = marked.where(~F.col("held")).join(users, "userId", "left_semi").groupBy("userId").agg(
            F.min("rated_at").alias("t0"))
        tfit = marked.where(~F.col("held")).select("movieId", "rated_at")
        for days in (60, 180, 365):
            near = (first.join(tfit, F.abs(F.unix_timestamp("rated_at") - F.unix_timestamp("t0")) <= days * 86400)
                    .groupBy("userId", "movieId").agg(F.count(F.lit(1)).cast("double").alias("s"))
                    .join(own, ["userId", "movieId"], "left_anti"))
            lists["pop_time" + ("" if days == 180 else str(days))] = top_n_per_user(near, N, score=F.col("s"))
        lists["als_implicit"] = recommend_unseen(fit_implicit(fit, imp, seed), fit, N, users=users)
        lists = {k: v.select("userId", "movieId", "rank").cache() for k, v in lists.items()}
        for v in lists.values():
            v.count()
        say(f"Sources listed in {time.perf_counter() - t0:.1f} s (implicit ALS {imp.rank}/{imp.reg_param}/"
            f"{imp.alpha}/{imp.confidence})")
        say()
        say("| list | nDCG@10 | recall@10 |")
        say("|---|---|---|")

        def show(name, recs):
            got = {(m, k): v for m, k, v in ranking_metrics(recs, held, ks=(10,))}
            say(f"| {name} | {got[('ndcg', 10)]:.4f} | {got[('recall', 10)]:.4f} |")

        for name, recs in lists.items():
            show(name, recs)
        for name, weights in BLENDS.items():
            fused = None
            for src, w in weights.items():
                part = lists[src].select("userId", "movieId", (F.lit(w) / (F.lit(RRF_K) + F.col("rank"))).alias("s"))
                fused = part if fused is None else fused.unionByName(part)
            fused = fused.groupBy("userId", "movieId").agg(F.sum("s").alias("s"))
            show(name, top_n_per_user(fused, 10, score=F.col("s")))
    finally:
        say.save()
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
