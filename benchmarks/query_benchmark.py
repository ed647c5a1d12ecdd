"""Whole-process timings of `movierec query recs` and `movierec report` (not a test: prints figures).

    python benchmarks/query_benchmark.py [--calls 20] [--ratings 25000000] [--keep DIR]
    python benchmarks/query_benchmark.py --warehouse W [--warehouse W2 ...]   (real pipeline output)

Builds warehouses with delta-rs (no Spark) in the contract's schemas:
1. large: recommendations for 160,000 users x 10 (one run) in two layouts - `shuffled`, several
   files each holding every user range, as a Spark write of hash-partitioned rows leaves it (no
   file can be pruned), and `sorted` by userId, as after OPTIMIZE ZORDER BY userId; plus 62,000
   movies, three runs, metrics and `--ratings` ratings for the report;
2. small: ml-latest-small's shape: 610 users x 10, 9,742 movies, 100,836 ratings.
Then times `--calls` whole `movierec query recs` processes for random users (median, max), a
few `query similar --title` calls, and one `movierec report` (page size, render time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from deltalake import WriterProperties, write_deltalake

REPO = Path(__file__).resolve().parent.parent

from movierec_spark.tables import arrow_schema

GENRES = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western"]
RUNS = [("20240501-0900-a1", 1, "succeeded"), ("20240502-0900-b2", 2, "failed"),
        ("20240503-0900-c3", 3, "succeeded")]
LATEST = RUNS[-1][0]
# About eight files for 1.6M shuffled rows (~22 MB of Parquet).
TARGET_FILE_BYTES = 2 * 1024 * 1024


def metric_rows(run: str, shift: float = 0.0) -> list[dict]:
    """A run's metrics as the evaluate stage writes them: rating metrics of four models, ranking
    metrics at k = 1..20 of three."""
    rows = [{"run_id": run, "model": m, "metric": metric, "k": None, "value": v + shift, "split": "test"}
            for m, rmse in (("global_mean", 1.04), ("bias_baseline", 0.90), ("als", 0.87), ("hybrid", 0.85))
            for metric, v in (("rmse", rmse), ("mae", rmse * 0.77))]
    rows += [{"run_id": run, "model": m, "metric": metric, "k": k, "value": base * f(k) + shift, "split": "test"}
             for m, base in (("popularity", 0.05), ("als_implicit", 0.12), ("hybrid", 0.15)) for k in range(1, 21)
             for metric, f in (("precision", lambda k: 1.5 - k / 40), ("recall", lambda k: k / 10),
                               ("ndcg", lambda k: 1.2))]
    return rows


def write(wh: Path, name: str, data: pa.Table | list, **kw) -> None:
    schema = arrow_schema(name)
    if isinstance(data, list):
        data = pa.Table.from_pylist(data, schema=schema)
    write_deltalake(str(wh / name), data.cast(schema), mode="append", **kw)


def movies_table(n: int, rng: np.random.Generator) -> pa.Table:
    ids = np.arange(1, n + 1, dtype=np.int32)
    years = rng.integers(1920, 2024, n).astype(np.int32)
    titles = [f"Movie {i} ({y})" if i % 7 else f"Movie {i}, The ({y})" for i, y in zip(ids, years)]
    genres = [list(rng.choice(GENRES, size=1 + i % 3, replace=False)) for i in range(n)]
    return pa.table({"movieId": ids, "title": titles, "year": years, "genres": genres})


def recs_table(users: int, movies: int, k: int, rng: np.random.Generator) -> pa.Table:
    n = users * k
    movie_ids = rng.integers(1, movies + 1, n, dtype=np.int32)
    content = rng.random(n) < 0.2
    because = pa.array(np.where(content, rng.integers(1, movies + 1, n), 0).astype(np.int32), mask=~content)
    return pa.table({
        "run_id": pa.array([LATEST] * n),
        "userId": np.repeat(np.arange(1, users + 1, dtype=np.int32), k),
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), users),
        "movieId": movie_ids,
        "score": np.round(5 - np.tile(np.arange(k), users) * 0.1 + rng.random(n) * 0.05, 4),
        "source": np.where(content, "content", "hybrid"),
        "because_movieId": because,
        "predicted_rating": np.round(2.5 + rng.random(n) * 2.5, 3),
    })


def ratings_batches(count: int, users: int, movies: int, rng: np.random.Generator, chunk: int = 2_000_000):
    schema = arrow_schema("ratings")
    stars = np.arange(1, 11) / 2
    weights = np.array([1, 3, 2, 7, 5, 20, 13, 27, 9, 13], dtype=float)
    t0 = int(dt.datetime(2015, 1, 1, tzinfo=dt.timezone.utc).timestamp() * 1e6)
    for start in range(0, count, chunk):
        m = min(chunk, count - start)
        yield pa.record_batch({
            "userId": rng.integers(1, users + 1, m, dtype=np.int32),
            "movieId": rng.integers(1, movies + 1, m, dtype=np.int32),
            "rating": rng.choice(stars, m, p=weights / weights.sum()),
            "rated_at": pa.array(t0 + rng.integers(0, 3 * 10**14, m), pa.timestamp("us", tz="UTC")),
        }, schema=schema)


def build(wh: Path, users: int, movies: int, ratings: int, layout: str, seed: int = 42) -> Path:
    rng = np.random.default_rng(seed)
    wh.mkdir(parents=True, exist_ok=True)
    write(wh, "movies", movies_table(movies, rng))
    recs = recs_table(users, movies, 10, rng)
    if layout == "shuffled":
        # Eight files, each with users from the whole id range, in no order.
        recs = recs.take(rng.permutation(recs.num_rows))
        write(wh, "recommendations", recs, target_file_size=TARGET_FILE_BYTES,
              writer_properties=WriterProperties(max_row_group_size=1 << 20))
    else:
        write(wh, "recommendations", recs, writer_properties=WriterProperties(max_row_group_size=1 << 17))
    n = movies * 10
    write(wh, "similar_movies", pa.table({
        "run_id": pa.array([LATEST] * n),
        "movieId": np.repeat(np.arange(1, movies + 1, dtype=np.int32), 10),
        "similar_movieId": rng.integers(1, movies + 1, n, dtype=np.int32),
        "rank": np.tile(np.arange(1, 11, dtype=np.int32), movies),
        "similarity": np.tile(np.linspace(0.9, 0.5, 10), movies)}))
    write(wh, "runs", [{"run_id": r, "started_at": dt.datetime(2024, 5, d, 9, tzinfo=dt.timezone.utc),
                        "finished_at": dt.datetime(2024, 5, d, 9, 40, tzinfo=dt.timezone.utc), "status": s,
                        "input": "generated", "config": "{}", "error": None if s != "failed" else "killed",
                        "kind": "serve",
                        "stage_seconds": [("ingest", 120.0 + d), ("split", 30.0), ("als", 600.0 + 10 * d),
                                          ("content", 200.0), ("features", 150.0), ("hybrid", 300.0),
                                          ("recommend", 90.0), ("evaluate", 240.0)]}
                       for r, d, s in RUNS])
    write(wh, "metrics", metric_rows(RUNS[0][0], 0.05) + metric_rows(LATEST))
    write(wh, "feature_importances", [{"run_id": LATEST, "feature": f, "importance": v} for f, v in
                                      zip(["als", "UAvg", "MAvg", "GAvg", "sur1", "sur2", "smr1", "smr2"],
                                          [0.35, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.02])])
    schema = arrow_schema("ratings")
    write_deltalake(str(wh / "ratings"), pa.RecordBatchReader.from_batches(
        schema, ratings_batches(ratings, users, movies, rng)), mode="append")
    return wh


def movierec_cmd() -> list[str]:
    script = Path(sys.executable).parent / "movierec"
    return [str(script)] if script.exists() else [sys.executable, "-m", "movierec_spark.cli"]


def time_recs(wh: Path, users: int, calls: int, seed: int = 7) -> list[float]:
    rng = np.random.default_rng(seed)
    times = []
    for user in rng.integers(1, users + 1, calls):
        t0 = time.perf_counter()
        p = subprocess.run(movierec_cmd() + ["query", "recs", "--warehouse", str(wh), "--user", str(user)],
                           capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if p.returncode != 0 or "rank" not in p.stdout:
            raise SystemExit(f"query failed for user {user}: {p.returncode} {p.stderr}")
    return times


def time_existing(warehouses: list[str], calls: int) -> int:
    """Median whole-process `query recs` time on warehouses the pipeline wrote (real outputs)."""
    from deltalake import DeltaTable

    for wh in warehouses:
        recs = DeltaTable(str(Path(wh) / "recommendations")).to_pyarrow_table(columns=["userId"])
        users = np.unique(recs.column("userId").to_numpy())
        rng = np.random.default_rng(7)
        times = []
        for user in rng.choice(users, calls):
            t0 = time.perf_counter()
            p = subprocess.run(movierec_cmd() + ["query", "recs", "--warehouse", wh, "--user", str(user)],
                               capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if p.returncode != 0 or "rank" not in p.stdout:
                raise SystemExit(f"query failed for user {user}: {p.returncode} {p.stderr}")
        print(f"{wh}: {recs.num_rows:,} recommendation rows, {len(users):,} users; {calls} x `movierec query recs`: "
              f"median {statistics.median(times):.3f} s, max {max(times):.3f} s (load {os.getloadavg()[0]:.2f})")
    return 0


def time_similar(wh: Path, movies: int, calls: int, seed: int = 11) -> list[float]:
    rng = np.random.default_rng(seed)
    times = []
    for movie in rng.integers(1, movies + 1, calls):
        t0 = time.perf_counter()
        p = subprocess.run(movierec_cmd() + ["query", "similar", "--warehouse", str(wh), "--title", f"movie {movie}"],
                           capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if p.returncode != 0 or "similarity" not in p.stdout:
            raise SystemExit(f"similar failed for movie {movie}: {p.returncode} {p.stderr}")
    return times


def time_report(wh: Path, out: Path) -> str:
    t0 = time.perf_counter()
    p = subprocess.run(movierec_cmd() + ["report", "--warehouse", str(wh), "--out", str(out)],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"report failed: {p.stderr}")
    m = re.search(r"\((\d+) KB, (\d+) plots, (\d+) notes, ([\d.]+) s\)", p.stdout)
    return f"page {m.group(1)} KB, {m.group(2)} plots, render {m.group(4)} s, whole process {wall:.1f} s"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--users", type=int, default=160_000)
    ap.add_argument("--movies", type=int, default=62_000)
    ap.add_argument("--ratings", type=int, default=25_000_000, help="ratings rows of the large warehouse")
    ap.add_argument("--keep", help="build the warehouses under this directory and keep them")
    ap.add_argument("--warehouse", action="append", default=[],
                    help="time an existing warehouse the pipeline wrote instead (repeatable; users drawn "
                         "from its recommendations)")
    args = ap.parse_args()
    if args.warehouse:
        return time_existing(args.warehouse, args.calls)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="querybench-"))
    cases = [
        (f"{args.users:,} users x 10, shuffled files", args.users, args.movies, args.ratings, "shuffled"),
        (f"{args.users:,} users x 10, sorted by userId", args.users, args.movies, 100_000, "sorted"),
        ("ml-latest-small size: 610 users x 10", 610, 9_742, 100_836, "shuffled"),
    ]
    base = [time.perf_counter()]
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        base.append(time.perf_counter() - t0)
    print(f"python start-up alone: median {statistics.median(base[1:]):.3f} s; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    try:
        for i, (label, users, movies, ratings, layout) in enumerate(cases):
            wh = root / f"wh{i}"
            t0 = time.perf_counter()
            if not (wh / "recommendations").exists():
                build(wh, users, movies, ratings, layout)
            built = time.perf_counter() - t0
            times = time_recs(wh, users, args.calls)
            print(f"{label}: {args.calls} x `movierec query recs`: median {statistics.median(times):.3f} s, "
                  f"max {max(times):.3f} s (built in {built:.1f} s; load {os.getloadavg()[0]:.2f})")
            if i != 1:
                times = time_similar(wh, movies, max(1, args.calls // 4))
                print(f"  {len(times)} x `movierec query similar --title`: median {statistics.median(times):.3f} s, "
                      f"max {max(times):.3f} s ({movies:,} movies)")
            if layout == "shuffled":
                print(f"  report ({ratings:,} ratings): {time_report(wh, root / f'report{i}')}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
