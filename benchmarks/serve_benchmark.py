"""A serve run and an evaluate run on the same data, as whole `movierec` processes, side by side.

    python benchmarks/serve_benchmark.py [--input ../shared/datasets/ml-latest-small] [--work DIR]
                                         [--set KEY=VALUE ...] [--plain-als] [--again] [--report-only]

Runs `movierec run` (serve: every rating, writes recommendations) and then `movierec evaluate`
(held-out test part: the configured split, random 80/20 by default) into one fresh warehouse,
one at a time, and prints and writes to benchmarks/results/serve-evaluate-<data>.md:
- seconds per stage of each run (from `runs.stage_seconds`) and each process's wall time;
- how many served rows are movies the user rated (must be 0), and users served;
- the serve run's validation metrics next to the evaluate run's test (and validation) metrics;
- whether `recommendations` and `latest` stayed as the serve run left them through the evaluate run;
- with --again, a second serve run (run id serve2) on the same warehouse and data right after the
  first: what a recurring serve run costs once a run has tuned (it reuses that choice, and ingest
  finds nothing new);
- with --plain-als, the plain Spark ALS example as a whole process beside them (issue 22's yardstick:
  a script that reads ratings.csv, fits ALS rank 10 / 10 iterations / reg 0.1 and writes
  recommendForAllUsers(10) as parquet), and each run's wall time over it.
Tables are read back with delta-rs (no JVM).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

from deltalake import DeltaTable

REPO = Path(__file__).resolve().parent.parent
SMALL = REPO.parent / "shared" / "datasets" / "ml-latest-small"


def movierec(cmd: str, data: str, wh: Path, run_id: str, sets: list[str]) -> float:
    args = [sys.executable, "-m", "movierec_spark.cli", cmd, "--input", data, "--warehouse", str(wh),
            "--run-id", run_id]
    for s in sets:
        args += ["--set", s]
    print("$", " ".join(args[2:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(args, cwd=REPO, check=True)
    return time.perf_counter() - t0


# The plain Spark ALS example as its own process: local[*], the same driver memory, MLlib's
# defaults otherwise (10 blocks). Timed from process start to exit, like the movierec runs.
PLAIN = """
import sys
from pyspark.ml.recommendation import ALS
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master("local[*]").appName("plain-als").config("spark.driver.memory", "6g")
         .config("spark.ui.enabled", "false").getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
ratings = spark.read.csv(sys.argv[1] + "/ratings.csv", header=True, inferSchema=True)
model = ALS(rank=10, maxIter=10, regParam=0.1, userCol="userId", itemCol="movieId", ratingCol="rating",
            coldStartStrategy="drop", seed=42).fit(ratings)
model.recommendForAllUsers(10).write.mode("overwrite").parquet(sys.argv[2])
spark.stop()
"""


def plain_als(data: str, work: Path) -> float:
    print("$ plain ALS example on", data, flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", PLAIN, data, str(work / "plain-als-recs")], cwd=REPO, check=True)
    return time.perf_counter() - t0


def table(wh: Path, name: str):
    return DeltaTable(str(wh / name))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(SMALL))
    ap.add_argument("--work", default="/tmp/movierec-serve-bench")
    ap.add_argument("--set", action="append", default=[], help="config override for both runs")
    ap.add_argument("--plain-als", action="store_true",
                    help="also time the plain Spark ALS example as a whole process (needs ratings.csv in --input)")
    ap.add_argument("--again", action="store_true",
                    help="a second serve run after the first, reusing its tuned settings (column 'serve again')")
    ap.add_argument("--report-only", action="store_true",
                    help="no runs: report the warehouse and wall times (wall.json) a previous call left in --work")
    args = ap.parse_args()
    work = Path(args.work)
    wh = work / "wh"
    walls = work / "wall.json"
    if args.report_only:
        wall = json.loads(walls.read_text())
        recs_version = wall["recommendations_version"]
    else:
        if wh.exists():
            import shutil

            shutil.rmtree(wh)
        work.mkdir(parents=True, exist_ok=True)
        wall = {"serve": movierec("run", args.input, wh, "serve", args.set)}
        if args.again:
            walls.write_text(json.dumps(wall))
            wall["serve2"] = movierec("run", args.input, wh, "serve2", args.set)
        recs_version = wall["recommendations_version"] = table(wh, "recommendations").version()
        walls.write_text(json.dumps(wall))
        wall["evaluate"] = movierec("evaluate", args.input, wh, "evaluate", args.set)
        walls.write_text(json.dumps(wall))
        if args.plain_als:
            wall["plain_als"] = plain_als(args.input, work)
            walls.write_text(json.dumps(wall))

    runs = {r["run_id"]: r for r in table(wh, "runs").to_pyarrow_table().to_pylist()}
    for r in runs.values():  # delta-rs reads a map column as (key, value) pairs
        r["stage_seconds"] = dict(r["stage_seconds"] or [])
    latest = {r["table_name"]: r["run_id"] for r in table(wh, "latest").to_pyarrow_table().to_pylist()}
    # What is served: the rows of the run `latest` points to (the table keeps every serve run's).
    recs = [r for r in table(wh, "recommendations").to_pyarrow_table().to_pylist()
            if r["run_id"] == latest.get("recommendations")]
    rated = {(r["userId"], r["movieId"]) for r in
             table(wh, "ratings").to_pyarrow_table(columns=["userId", "movieId"]).to_pylist()}
    overlap = sum((r["userId"], r["movieId"]) in rated for r in recs)
    users = {r["userId"] for r in recs}
    rated_users = {u for u, _ in rated}
    no_pred = sum(r["predicted_rating"] is None for r in recs)
    metrics = table(wh, "metrics").to_pyarrow_table().to_pylist()

    def metric(run: str, split: str, model: str, name: str, k=None):
        got = [m["value"] for m in metrics if (m["run_id"], m["split"], m["model"], m["metric"], m["k"])
               == (run, split, model, name, k)]
        return f"{got[0]:.4f}" if got else ""

    order = ["ingest", "split", "baselines", "als", "als_implicit", "content", "features", "hybrid", "recommend",
             "evaluate"]
    again = "serve2" in runs
    seen = [*runs["serve"]["stage_seconds"], *runs["evaluate"]["stage_seconds"]]
    stages = sorted(dict.fromkeys(seen), key=lambda s: (order.index(s) if s in order else len(order), s))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    lines = [f"# Serve and evaluate runs on {Path(args.input).name}",
             "",
             f"{dt.date.today()}, `python benchmarks/serve_benchmark.py --input {args.input}"
             + "".join(f" --set {s}" for s in args.set) + (" --again" if again else "")
             + (" --plain-als" if wall.get("plain_als") else "") + "`, one process per run, one at a time, at commit "
             + commit + (" with uncommitted changes" if dirty else "") + ".",
             "",
             *(["| stage | serve run (s) | serve again, reusing its tuning (s) | evaluate run (s) |",
                "|---|---|---|---|"] if again else ["| stage | serve run (s) | evaluate run (s) |", "|---|---|---|"])]

    def row(label: str, values: list) -> str:
        cells = [v if isinstance(v, str) else "" if v is None else f"{v:.1f}" for v in values]
        return "| " + " | ".join([label, *(cells if again else [cells[0], cells[2]])]) + " |"

    names = ["serve", "serve2", "evaluate"]
    secs = {n: runs[n]["stage_seconds"] if n in runs else {} for n in names}
    for s in stages:
        lines.append(row(s, [secs[n].get(s) for n in names]))
    lines += [row("sum of stages", [sum(secs[n].values()) if secs[n] else None for n in names]),
              row("whole process (wall)", [wall.get(n) for n in names]),
              *([row("plain ALS example, whole process (wall)", [wall["plain_als"], None, None]),
                 row("run / plain ALS example", [f"{wall[n] / wall['plain_als']:.1f}x" if wall.get(n) else None
                                                 for n in names])] if wall.get("plain_als") else []),
              *([f"\nWall times: {wall['note']}."] if wall.get("note") else []),
              "",
              f"Served rows (run {latest.get('recommendations')}): {len(recs):,} for {len(users):,} of {len(rated_users):,} users who rated; "
              f"**{overlap} of them a movie the user rated**; {no_pred} without a predicted_rating.",
              f"Through the evaluate run `recommendations` stayed at version {recs_version}: "
              f"{table(wh, 'recommendations').version() == recs_version}; `latest`: {latest}.",
              "",
              "| hybrid | serve run, validation | evaluate run, validation | evaluate run, test |",
              "|---|---|---|---|"]
    for name, k in (("rmse", None), ("mae", None), ("precision", 10), ("recall", 10), ("ndcg", 10), ("map", 10)):
        label = name if k is None else f"{name}@{k}"
        lines.append(f"| {label} | {metric('serve', 'validation', 'hybrid', name, k)} | "
                     f"{metric('evaluate', 'validation', 'hybrid', name, k)} | "
                     f"{metric('evaluate', 'test', 'hybrid', name, k)} |")
    lines += ["", "Test rows of the other models (evaluate run):", "",
              "| model | rmse | ndcg@10 |", "|---|---|---|"]
    for model in ("global_mean", "bias_baseline", "als", "content", "popularity", "als_implicit"):
        lines.append(f"| {model} | {metric('evaluate', 'test', model, 'rmse')} | "
                     f"{metric('evaluate', 'test', model, 'ndcg', 10)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = REPO / "benchmarks" / "results" / f"serve-evaluate-{Path(args.input).name}.md"
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0 if overlap == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
