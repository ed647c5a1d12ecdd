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

    python benchmarks/ranker_settings.py --warehouse WH --seeds 5 [--fits 0.8x30@0.1,1.0x30@0.1,0.8x30@0.1+3]

How much the ranker's own random draw moves it: the candidate lists and features are built
once (train_ranker at the configured pool and depth), then each fit variant (subsampling rate
x trees @ step, `+K`: the probabilities of K fits with different seeds averaged) is fitted with
`--seeds` GBT seeds (the first is the pipeline's own) and scored on the same validation users.
Implicit ALS's own top 10 on those users is printed beside it. Only the GBT's seed varies: the
folds and the validation users stay the pipeline's.
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
    ap.add_argument("--seeds", type=int, default=0, help="GBT seeds per fit variant (0: the grid instead)")
    ap.add_argument("--fits", default="0.8x30@0.1,1.0x30@0.1,0.8x60@0.05,0.8x30@0.1+3",
                    help="with --seeds: subsample x trees @ step [+K averaged seeds] variants")
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
        if args.seeds:
            seed_spread(train, times, sims, cfg, n_items, args.seeds, args.fits.split(","), say)
            return 0
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


def seed_spread(train, times, sims, cfg, n_items: int, seeds: int, fits: list[str], say) -> None:
    """The --seeds mode: train_ranker builds the features once; its search step is replaced by
    this probe, which fits every variant with every seed on the same rows."""
    import statistics

    from movierec_spark import ranker
    from movierec_spark.baselines import top_n_per_user
    from movierec_spark.evaluation import user_ndcg

    h, base = cfg.hybrid, cfg.pipeline.seed

    def ndcg(scores, vheld) -> float:
        lists = top_n_per_user(scores, 10, score=F.col("p"))
        return user_ndcg(lists, vheld, 10, cfg.evaluation.relevance_threshold).agg(F.avg("ndcg")).first()[0] or 0.0

    def probe(feats, labelled, is_val, vheld, names, cfg_, pool):
        vfeats = feats.where(is_val)
        own = ndcg(vfeats.select("userId", "movieId", (-F.col("als_implicit_rank")).alias("p")), vheld)
        say(f"Validation users: {vheld.select('userId').distinct().count()}; implicit ALS's own top 10 there: "
            f"nDCG@10 {own:.4f}. Pool {pool}, depth {h.ranker_max_depth}; seeds {base} + 7919 i.")
        say()
        say("| fit (subsample x trees @ step, +K averaged) | nDCG@10 mean | sd | min | max | per seed | s per fit |\n"
            "|---|---|---|---|---|---|---|")
        first = None
        for spec in fits:
            shape, _, avg = spec.partition("+")
            sub, _, rest = shape.partition("x")
            trees, _, step = rest.partition("@")
            k = int(avg or 1)
            got, t0 = [], time.perf_counter()
            for i in range(seeds):
                models = [ranker.fit_ranker(labelled.where(~is_val), names, base + 7919 * (i * k + j), int(trees),
                                            h.ranker_max_depth, float(sub), float(step)) for j in range(k)]
                first = first or models[0]
                parts = [ranker.rank_scores(m, vfeats) for m in models]
                scores = parts[0] if k == 1 else _union(parts).groupBy("userId", "movieId").agg(F.avg("p").alias("p"))
                got.append(ndcg(scores, vheld))
            per_fit = (time.perf_counter() - t0) / (seeds * k)
            say(f"| {spec} | {statistics.mean(got):.4f} | {statistics.stdev(got) if len(got) > 1 else 0:.4f} | "
                f"{min(got):.4f} | {max(got):.4f} | {' '.join(f'{g:.4f}' for g in got)} | {per_fit:.1f} |")
        return {"candidate_pool": pool, "ranker_max_depth": h.ranker_max_depth}, first, []

    ranker.choose_ranker = probe
    ranker.train_ranker(train, times, sims, cfg, n_items, search=True)


def _union(frames):
    out = frames[0]
    for f in frames[1:]:
        out = out.unionByName(f)
    return out


if __name__ == "__main__":
    sys.exit(main())
