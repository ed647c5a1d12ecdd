"""The hybrid's features of a serve run's served pairs, with the bias baseline refitted (before) and given (now).

    python benchmarks/served_features.py --warehouse WH [--run RUN] [--config conf/scale.yaml] [--repeat 2]

WH is a warehouse a serve run kept its tables and models in: `rating_splits`, `recommendations`
(the served pairs), `similar_movies`, the als stage's factor tables and the features stage's
whole-train neighbour lists (`_models/<run>/neighbours`). The recommend stage featurises the
served pairs from the whole train part (features.pair_features); its residual ALS model is the
als stage's (rebuilt here from `als_user_factors` / `als_item_factors`). Two ways, alternated
`--repeat` times in one process, alone on the machine:

- `refit`: pair_features fits the bias baseline of the train part itself (a global mean, a
  cached copy of every rating, two alternating iterations of two aggregations), as it did;
- `given`: it takes the run's bias baseline (fitted once per run, context.bias_model: fitted
  here untimed, as the run has it by then).

Prints each call's seconds and the process tree's CPU seconds, then how far the two ways'
features are apart (the bias sums run over differently partitioned copies of the same ratings).
"""

from __future__ import annotations

import time

from content_top_n import open_run, run_args, tree_cpu
from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.als import als_model_from_factors
from movierec_spark.baselines import fit_bias
from movierec_spark.features import pair_features
from movierec_spark.session import release


def main() -> int:
    ap = run_args(__doc__)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    cfg, spark = open_run(args, "movierec-served-features")
    try:
        wh = cfg.paths.warehouse
        run = args.run or (tables.read_table(spark, wh, "runs").where("status = 'succeeded'")
                           .orderBy(F.col("started_at").desc()).first().run_id)

        def of_run(name: str):
            return tables.read_table(spark, wh, name).where(F.col("run_id") == run).drop("run_id")

        splits = of_run("rating_splits").where(F.col("split") == "train")
        train = splits.select("userId", "movieId", "rating", "rated_at")
        pairs = of_run("recommendations").where(F.col("source") != "popular_cold").select("userId", "movieId").distinct()
        lo, hi = (float(x) for x in tables.read_table(spark, wh, "ratings").agg(F.min("rating"), F.max("rating")).first())
        uf = tables.read_table(spark, wh, "als_user_factors").select(F.col("userId").alias("id"), "features")
        itf = tables.read_table(spark, wh, "als_item_factors").select(F.col("movieId").alias("id"), "features")
        als = als_model_from_factors(uf, itf, cfg.als.rank, "userId", "movieId")
        nb_path = f"{wh}/_models/{run}/neighbours"
        nb = {"user_nb": spark.read.parquet(f"{nb_path}/user"), "movie_nb": spark.read.parquet(f"{nb_path}/movie")}
        feat_args = (tables.read_table(spark, wh, "movies"), of_run("similar_movies"), cfg.baseline, cfg.als,
                     cfg.content, cfg.hybrid, cfg.pipeline.seed, lo, hi, None)
        # The run's bias model, fitted on the split's cached train part as context.bias_model does.
        split_train = splits.select("userId", "movieId", "rating").cache()
        bias = fit_bias(split_train, cfg.baseline, lo, hi)
        print(f"run {run}: {pairs.count()} served pairs, {split_train.count()} train ratings "
              "(the run's bias model fitted untimed)\n", flush=True)
        print("| way | seconds | CPU seconds (process tree) |\n|---|---|---|", flush=True)
        kept: dict = {}
        for _ in range(args.repeat):
            for name, given in (("refit", None), ("given", bias)):
                cpu0, t0 = tree_cpu(), time.perf_counter()
                feats = pair_features(train, pairs, *feat_args, als_model=als, bias=given, **nb)
                print(f"| {name} | {time.perf_counter() - t0:.1f} | {tree_cpu() - cpu0:.1f} |", flush=True)
                if name in kept:
                    release(feats)
                else:
                    kept[name] = feats
        a, b = kept["refit"], kept["given"]
        cols = [c for c, t in a.dtypes if c not in ("userId", "movieId") and t in ("double", "float", "int", "bigint")]
        j = a.alias("a").join(b.alias("b"), ["userId", "movieId"], "full")
        row = j.agg(F.count(F.lit(1)).alias("rows"),
                    F.count(F.when(F.col("a.GAvg").isNull() | F.col("b.GAvg").isNull(), 1)).alias("one_side"),
                    F.greatest(*[F.max(F.abs(F.col(f"a.{c}") - F.col(f"b.{c}"))) for c in cols]).alias("diff")).first()
        print(f"\n{row.rows} feature rows, {row.one_side} on one side only, largest difference of any feature "
              f"{row.diff}", flush=True)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
