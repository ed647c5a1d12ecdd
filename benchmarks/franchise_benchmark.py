"""Does "similar movies" know a film's sequel? Franchise recall@10 of the content neighbours.

    python benchmarks/franchise_benchmark.py [--input DIR] [--weights 0,0.5,1,1.5,2] [--out FILE]

Ingests ml-latest-small (or --input) into a temporary warehouse, then for each title weight
builds the movie vectors (genres, tags, decade, and title words at that weight) and the exact
top-10 neighbours of the films in tests/fixtures/franchise_pairs.csv (75 film -> sequel pairs), and
prints the share of pairs whose sequel is in the film's top 10, plus Star Wars' and Toy Story's
lists. Row "before": title weight 0 and ties by id, what the content model was before titles
counted; the other rows break ties by the number of ratings. The pairs are the test's pairs
(tests/test_content.py), so the figure is a spec check, not a setting chosen on a rating split.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
from pyspark.sql import functions as F

from movierec_spark import tables
from movierec_spark.cli import setup_logging
from movierec_spark.config import load_config
from movierec_spark.content import exact_neighbours, franchise_recall, movie_vectors
from movierec_spark.ingest import ingest_dataset
from movierec_spark.session import build_spark

REPO = Path(__file__).resolve().parent.parent
SHOW = {260: "Star Wars: Episode IV", 1: "Toy Story"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(REPO.parent / "shared" / "datasets" / "ml-latest-small"))
    ap.add_argument("--weights", default="0,0.5,1,1.5,2")
    ap.add_argument("--out", help="write the table (markdown) here too")
    args = ap.parse_args()
    setup_logging()
    wh = str(Path(tempfile.mkdtemp(prefix="franchise-")) / "warehouse")
    cfg = load_config(None, {"paths.warehouse": wh, "spark.show_progress": False})
    spark = build_spark(cfg, app_name="franchise-benchmark")
    try:
        ingest_dataset(spark, cfg, args.input, "ingest")
        movies = tables.read_table(spark, wh, "movies").cache()
        tags = tables.read_table(spark, wh, "tags")
        pairs = spark.createDataFrame(pd.read_csv(REPO / "tests" / "fixtures" / "franchise_pairs.csv")[["movieId", "sequelId"]])
        pop = tables.read_table(spark, wh, "ratings").groupBy("movieId").agg(F.count(F.lit(1)).alias("n"))
        sources = pairs.select("movieId").union(spark.createDataFrame([(m,) for m in SHOW], "movieId int"))
        settings = [("before", 0.0, None)] + [(f"title {w:g}", w, pop) for w in map(float, args.weights.split(","))]
        lines = ["| content | franchise recall@10 | Star Wars IV's top 10 has Empire | seconds |", "|---|---|---|---|"]
        lists = {}
        for label, w, p in settings:
            t0 = time.perf_counter()
            c = cfg.content.model_copy(update={"title_weight": w})
            sims = exact_neighbours(movie_vectors(movies, tags, None, c, p), 10, sources=sources).cache()
            r = franchise_recall(sims, pairs, 10)
            sw = [x.similar_movieId for x in sims.where("movieId = 260").orderBy("rank").collect()]
            # Titles of the shown movies' ten neighbours only (20 rows to the driver, not the catalog).
            named = sims.where(F.col("movieId").isin(list(SHOW))).join(
                movies.select(F.col("movieId").alias("similar_movieId"), "title"), "similar_movieId")
            lists[label] = {m: [x.title for x in named.where(f"movieId = {m}").orderBy("rank").collect()]
                            for m in SHOW}
            secs = time.perf_counter() - t0
            lines.append(f"| {label} | {r:.3f} | {'yes' if 1196 in sw else 'no'} | {secs:.1f} |")
            print(lines[-1], flush=True)
            sims.unpersist()
        out = "\n".join(lines)
        for m, name in SHOW.items():
            out += f"\n\n{name}'s top 10:\n\n| rank | " + " | ".join(lists) + " |\n|---|" + "---|" * len(lists)
            for i in range(10):
                out += f"\n| {i + 1} | " + " | ".join(v[m][i] if i < len(v[m]) else "" for v in lists.values()) + " |"
        print(out)
        if args.out:
            Path(args.out).write_text(f"# Franchise recall of similar_movies\n\n`python benchmarks/franchise_benchmark.py "
                                      f"--input {args.input}`\n\n{out}\n")
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
