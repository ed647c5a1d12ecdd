"""Surprise's SVD and SVD++ on the pipeline's own split, beside the pipeline's figures (issue 23).

What it measures: test RMSE / MAE and fit seconds of scikit-surprise's SVD and SVD++ trained on
the train part of one evaluate run's `rating_splits` and scored on that run's test part (the same
rows the pipeline's models were scored on), printed in one markdown table next to the pipeline's
own test RMSE / MAE for that run from `metrics`. So "beats SVD++" is a measurement on the same
pairs, not a figure quoted from elsewhere.

Settings: Surprise's defaults, random_state 42 (SVD: 100 factors, 20 epochs, lr 0.005, reg 0.02;
SVD++: 20 factors, 20 epochs, lr 0.007, reg 0.02). With --tune a small grid per algorithm is
also scored on a validation share carved out of the TRAIN part (a hash of (userId, movieId,
seed) puts 20% of train pairs there), the lowest validation RMSE is chosen, that setting is
refitted on the whole train part and scored on test once. The test part chooses nothing.

It reads the warehouse JVM-free (deltalake + pandas): no Spark, no import of the project, so it
can run beside a pipeline and in its own venv. Install (a separate venv, so the project's venv
and pyproject.toml stay without Surprise):

    python3 -m venv /tmp/surprise-venv
    /tmp/surprise-venv/bin/pip install scikit-surprise deltalake pandas pyarrow

What worked (Python 3.11, 2026-12): scikit-surprise 1.1.5 comes as a prebuilt manylinux wheel
built against numpy 2, so no compiler or Cython is needed. Do not pin numpy<2: Surprise 1.1.5
runs on numpy 2 (same predictions as on numpy 1.26 on a toy fit), while pyarrow 26, which
deltalake reads with, refuses to load under numpy 1.

Run (after an evaluate run has written WH, e.g. `movierec evaluate`):

    /tmp/surprise-venv/bin/python benchmarks/surprise_benchmark.py --warehouse WH [--run-id RUN]
        [--tune] [--out benchmarks/results/surprise-DATASET.md]

Measured on ml-latest-small (80k train ratings, one core): the defaults run in about 30 s (SVD++'s
fit about 25 s); --tune (36 SVD and 12 SVD++ validation fits, then two refits) in about 11 minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

import surprise
from surprise import SVD, Dataset, Reader, SVDpp

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

RANDOM_STATE = 42
VALIDATION_RATIO = 0.2

# Pipeline models whose test RMSE / MAE are shown, in this order (any other model with test
# rmse rows in the run follows them).
PIPELINE_MODELS = ["global_mean", "bias_baseline", "als", "content", "hybrid"]
# The stages (runs.stage_seconds) behind those models: shown as context only (Spark wall time
# of a whole stage, its writes and top-N lists included), not a fit time comparable with Surprise's.
PIPELINE_STAGES = ["baselines", "als", "content", "features", "hybrid"]

# Small grids around the defaults (the defaults are one point of each), so a tuned row can only
# win by a setting the validation share prefers.
# SVD fits in about a second, so its grid is wider; an SVD++ fit takes 20-100 s here.
GRIDS = {
    "SVD": [dict(n_factors=f, n_epochs=e, lr_all=lr, reg_all=reg)
            for f, e, lr, reg in itertools.product([50, 100, 200], [20, 40], [0.005, 0.01], [0.02, 0.05, 0.1])],
    "SVD++": [dict(n_factors=f, n_epochs=e, lr_all=0.007, reg_all=reg)
              for f, e, reg in itertools.product([20, 50], [20, 40], [0.02, 0.05, 0.1])],
}
ALGOS = {"SVD": SVD, "SVD++": SVDpp}
DEFAULTS = {"SVD": dict(n_factors=100, n_epochs=20, lr_all=0.005, reg_all=0.02),
            "SVD++": dict(n_factors=20, n_epochs=20, lr_all=0.007, reg_all=0.02)}


# ----------------------------------------------------------------------------- reading

def read_table(warehouse: Path, name: str, run_id: str | None = None) -> pd.DataFrame:
    path = warehouse / name
    try:
        dt_ = DeltaTable(str(path))
    except TableNotFoundError:
        raise SystemExit(f"no Delta table {path}: is {warehouse} a pipeline warehouse?") from None
    # Filter at the scan: rating_splits holds every run's rows.
    filters = [("run_id", "=", run_id)] if run_id is not None else None
    return dt_.to_pandas(filters=filters)


def pick_run(runs: pd.DataFrame, run_id: str | None) -> pd.Series:
    """The asked run (which must be a succeeded evaluate run) or the latest such run."""
    ok = runs[(runs["kind"] == "evaluate") & (runs["status"] == "succeeded")]
    if run_id is not None:
        hit = runs[runs["run_id"] == run_id]
        if hit.empty:
            raise SystemExit(f"run {run_id} is not in the runs table")
        if run_id not in set(ok["run_id"]):
            row = hit.iloc[0]
            raise SystemExit(f"run {run_id} is kind={row['kind']} status={row['status']}; "
                             "need a succeeded evaluate run (a serve run has no test part)")
        return hit.iloc[0]
    if ok.empty:
        raise SystemExit("no succeeded evaluate run in the warehouse")
    return ok.sort_values(["finished_at", "started_at"]).iloc[-1]


def describe_split(config: dict) -> str:
    split, seed = config.get("split", {}), config.get("pipeline", {}).get("seed")
    method = split.get("method")
    if split.get("train_file") and split.get("test_file"):
        return f"predefined ({split['train_file']} / {split['test_file']})"
    text = f"{method}, test_ratio {split.get('test_ratio')}, seed {seed}"
    if method == "temporal_user":
        text = f"{method}, last_n {split.get('last_n')}"
    elif method == "temporal_global" and split.get("cutoff"):
        text = f"{method}, cutoff {split['cutoff']}"
    return text


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, check=True,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    # An uncommitted benchmark (or other change) is said, so the commit alone is not over-read.
    return f"{head} (+ uncommitted changes)" if dirty else head


# ----------------------------------------------------------------------------- splitting

def hash_unit(user: np.ndarray, movie: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per (user, movie, seed): splitmix64's finaliser on the pair.

    A pure function of the pair, like the pipeline's splitters (not the same hash: this share
    only needs to be fixed and independent of row order, not equal to the pipeline's folds).
    """
    with np.errstate(over="ignore"):
        x = (user.astype(np.uint64) << np.uint64(32)) | movie.astype(np.uint64)
        x ^= np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def check_pipeline_pairs(warehouse: Path, run_id: str, test: pd.DataFrame, models: list[str], got: dict) -> str:
    """A sentence saying whether the pipeline's rows were scored on the very pairs scored here.

    The run's `predictions` rows per model must be the test pairs, each once, and the RMSE
    recomputed from them must equal `metrics`' (same formula); otherwise the comparison is not
    like for like and the sentence says which model differs.
    """
    try:
        pred = read_table(warehouse, "predictions", run_id)
    except SystemExit:
        return "(No `predictions` table: the pipeline's test pairs were not checked against these.)"
    want = test[["userId", "movieId"]].drop_duplicates()
    bad = []
    for m in models:
        p = pred[pred["model"] == m]
        same = len(p) == len(want) and len(p.merge(want, on=["userId", "movieId"])) == len(want)
        rmse = float(np.sqrt(np.mean((p["prediction"] - p["rating"]) ** 2))) if len(p) else float("nan")
        if not same or not abs(rmse - got[(m, "rmse")]) < 1e-6:
            bad.append(f"{m} ({len(p):,} rows, recomputed RMSE {rmse:.4f})")
    if bad:
        return f"NOT the same pairs for: {', '.join(bad)}; those rows are not like for like."
    return (f"Same pairs: for each pipeline model the run's `predictions` rows are exactly these {len(want):,} "
            "test pairs, and the RMSE recomputed from them equals `metrics`.")


def trainset(df: pd.DataFrame, scale: tuple[float, float]):
    # Sorted so the SGD visits ratings in one fixed order whatever order the Delta scan returned:
    # with random_state fixed, that makes the figures reproduce exactly.
    rows = df.sort_values(["userId", "movieId"])[["userId", "movieId", "rating"]]
    return Dataset.load_from_df(rows, Reader(rating_scale=scale)).build_full_trainset()


# ----------------------------------------------------------------------------- fitting

def score(algo, pairs: pd.DataFrame) -> tuple[float, float, float]:
    """(rmse, mae, seconds) over every pair; predictions clipped to the rating scale (predict's
    default), and an unseen user or movie falls back to the mean plus the known biases."""
    t0 = time.perf_counter()
    est = np.fromiter((algo.predict(u, i).est for u, i in zip(pairs["userId"].tolist(), pairs["movieId"].tolist())),
                      dtype=np.float64, count=len(pairs))
    seconds = time.perf_counter() - t0
    err = est - pairs["rating"].to_numpy(dtype=np.float64)
    return float(np.sqrt(np.mean(err ** 2))), float(np.mean(np.abs(err))), seconds


def fit(name: str, params: dict, ts) -> tuple[object, float]:
    algo = ALGOS[name](random_state=RANDOM_STATE, **params)
    t0 = time.perf_counter()
    algo.fit(ts)
    return algo, time.perf_counter() - t0


def fmt_params(p: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in p.items())


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", required=True, type=Path, help="the pipeline's Delta warehouse")
    ap.add_argument("--run-id", help="a succeeded evaluate run (default: the latest one)")
    ap.add_argument("--out", type=Path, help="markdown file (default: benchmarks/results/surprise-DATASET.md)")
    ap.add_argument("--tune", action="store_true",
                    help="also choose a small grid per algorithm on a validation share of train")
    args = ap.parse_args()
    started = time.perf_counter()

    runs = read_table(args.warehouse, "runs")
    run = pick_run(runs, args.run_id)
    run_id = run["run_id"]
    config = json.loads(run["config"]) if run["config"] else {}
    seed = int(config.get("pipeline", {}).get("seed", RANDOM_STATE))
    data = str(run["input"] or config.get("paths", {}).get("input", "unknown"))
    dataset = Path(data.rstrip("/")).name or "data"

    splits = read_table(args.warehouse, "rating_splits", run_id)
    train = splits[splits["split"] == "train"].reset_index(drop=True)
    test = splits[splits["split"] == "test"].reset_index(drop=True)
    if train.empty or test.empty:
        raise SystemExit(f"run {run_id}: {len(train)} train and {len(test)} test rows; need both")
    # The scale Surprise clips to comes from the data it learns from, not a constant.
    scale = (float(train["rating"].min()), float(train["rating"].max()))
    cold = (~test["userId"].isin(set(train["userId"])) | ~test["movieId"].isin(set(train["movieId"]))).sum()

    metrics = read_table(args.warehouse, "metrics", run_id)
    metrics = metrics[(metrics["split"] == "test") & metrics["metric"].isin(["rmse", "mae"]) & metrics["k"].isna()]
    got = {(r.model, r.metric): r.value for r in metrics.itertuples()}
    models = [m for m in PIPELINE_MODELS if (m, "rmse") in got]
    models += sorted({m for m, x in got if x == "rmse"} - set(models))

    coverage = check_pipeline_pairs(args.warehouse, run_id, test, models, got)

    rows = []  # (model, source, rmse, mae, fit seconds or None)
    for m in models:
        rows.append((m, "pipeline", got[(m, "rmse")], got.get((m, "mae"), float("nan")), None))

    full = trainset(train, scale)
    notes = []
    for name in ALGOS:
        print(f"fitting {name} (defaults) on {len(train):,} train ratings ...", file=sys.stderr, flush=True)
        algo, secs = fit(name, DEFAULTS[name], full)
        rmse, mae, psecs = score(algo, test)
        rows.append((f"{name} (defaults)", f"surprise {surprise.__version__}", rmse, mae, secs))
        notes.append(f"{name} (defaults) predicted the {len(test):,} test pairs in {psecs:.2f} s")

    grid_rows = []  # (algo, params, val rmse, val mae, fit seconds, chosen)
    if args.tune:
        unit = hash_unit(train["userId"].to_numpy(), train["movieId"].to_numpy(), seed)
        held = unit < VALIDATION_RATIO
        fit_part, val_part = train[~held], train[held]
        fit_ts = trainset(fit_part, scale)
        for name, grid in GRIDS.items():
            scored = []
            for params in grid:
                print(f"validation: {name} {fmt_params(params)} ...", file=sys.stderr, flush=True)
                algo, secs = fit(name, params, fit_ts)
                rmse, mae, _ = score(algo, val_part)
                scored.append((params, rmse, mae, secs))
            # Lowest validation RMSE; a tie keeps the earlier grid point.
            best = min(range(len(scored)), key=lambda j: (scored[j][1], j))
            for j, (params, rmse, mae, secs) in enumerate(scored):
                grid_rows.append((name, params, rmse, mae, secs, j == best))
            chosen = scored[best][0]
            print(f"fitting {name} (validation choice) on the whole train part ...", file=sys.stderr, flush=True)
            algo, secs = fit(name, chosen, full)
            rmse, mae, _ = score(algo, test)
            rows.append((f"{name} (tuned: {fmt_params(chosen)})", f"surprise {surprise.__version__}", rmse, mae, secs))

    # ------------------------------------------------------------------ the table
    stage_seconds = run["stage_seconds"]
    stage_seconds = dict(stage_seconds) if stage_seconds is not None else {}
    lines = [
        f"# Surprise SVD / SVD++ beside the pipeline, {dataset}",
        "",
        f"- data: `{data}` (the run's input)",
        f"- split: {describe_split(config)}; the run's own `rating_splits` rows: "
        f"{len(train):,} train, {len(test):,} test ({cold:,} test pairs with a user or movie unseen in train)",
        f"- run: `{run_id}` (evaluate, {run['status']}, finished {pd.Timestamp(run['finished_at']):%Y-%m-%d %H:%M:%S} UTC)",
        f"- commit: {git_commit()}; date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d}",
        f"- scikit-surprise {surprise.__version__}, numpy {np.__version__}, Python {platform.python_version()}; "
        f"random_state {RANDOM_STATE}; rating scale {scale} (train min/max); every test pair predicted, "
        "clipped to the scale",
        f"- command: `{' '.join([sys.executable, *sys.argv])}`",
        "",
        "Test figures, each scored once. Pipeline rows are the run's `metrics` (split test); "
        "Surprise rows were fitted on the same train part and scored on the same test pairs here.",
        "",
        "| model | source | RMSE | MAE | fit seconds |",
        "|---|---|---|---|---|",
    ]
    for model, source, rmse, mae, secs in rows:
        lines.append(f"| {model} | {source} | {rmse:.4f} | {mae:.4f} | {'-' if secs is None else f'{secs:.1f}'} |")
    lines.append("")
    stage_text = ", ".join(f"{s} {stage_seconds[s]:.1f} s" for s in PIPELINE_STAGES if s in stage_seconds)
    if stage_text:
        lines.append(f"Pipeline stage wall times of that run, for context only (a whole Spark stage with "
                     f"its writes and top-N lists, not a fit): {stage_text}.")
    lines.append(coverage)
    lines.append("Surprise fit seconds: one process, one core; " + "; ".join(notes) + ".")
    if args.tune:
        lines += [
            "",
            f"## Validation (--tune): {len(fit_part):,} fit ratings, {len(val_part):,} held out "
            f"(hash of userId, movieId, seed {seed} < {VALIDATION_RATIO}, inside train)",
            "",
            "Each point fitted on the fit ratings, scored on the held-out ones; the lowest validation RMSE "
            "is chosen and only that setting is refitted on the whole train part and scored on test (above).",
            "",
            "| algorithm | setting | validation RMSE | validation MAE | fit seconds | |",
            "|---|---|---|---|---|---|",
        ]
        for name, params, rmse, mae, secs, chosen in grid_rows:
            tag = "chosen" if chosen else ("defaults" if params == DEFAULTS[name] else "")
            if chosen and params == DEFAULTS[name]:
                tag = "chosen (defaults)"
            lines.append(f"| {name} | {fmt_params(params)} | {rmse:.4f} | {mae:.4f} | {secs:.1f} | {tag} |")
    lines += ["", f"Total wall time of this benchmark: {time.perf_counter() - started:.0f} s."]

    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or RESULTS / f"surprise-{dataset}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
