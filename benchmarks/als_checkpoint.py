"""What do MLlib ALS's lineage checkpoints cost a short fit? The same fits with and without them.

    python benchmarks/als_checkpoint.py [--input DIR] [--rounds 4] [--out FILE.md]

DIR holds a MovieLens ratings.csv (default: ../shared/datasets/ml-latest-small). With a
checkpoint directory set (the pipeline always sets one), MLlib's ALS writes its item factors to
it every `checkpointInterval` iterations: explicit ALS at iterations 0 and 10 of 15, each a
counting job and a write; implicit ALS at iteration 10. The checkpoints only cut the lineage
(against a stack overflow in long fits); they change no factor. The script fits the pipeline's
explicit model (residual of the bias baseline, the configured rank and reg_param) and its
implicit model on every rating, alternating checkpointInterval 10 and -1 (off) in one warm
process, and prints each fit's seconds and the largest difference between the two settings'
factors (0: the same model).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pyspark.sql import functions as F

from movierec_spark.als import _als, implicit_confidence, with_residual
from movierec_spark.baselines import fit_bias
from movierec_spark.cli import parse_set, setup_logging
from movierec_spark.config import load_config
from movierec_spark.session import build_spark


def factors(model):
    """Both factor tables as {(side, id): features}: small on ml-latest-small (16k rows)."""
    out = {}
    for side, df in (("u", model.userFactors), ("i", model.itemFactors)):
        out.update({(side, r.id): r.features for r in df.collect()})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/ml-latest-small"))
    ap.add_argument("--rounds", type=int, default=4, help="fits per model and setting")
    ap.add_argument("--out", help="write the table (markdown) here too")
    ap.add_argument("--set", action="append", default=[], help="config overrides")
    args = ap.parse_args()
    setup_logging()
    # A throwaway warehouse: its _checkpoints dir is where MLlib writes, never the checkout's ./warehouse.
    scratch = tempfile.TemporaryDirectory()
    cfg = load_config(None, {"paths.warehouse": scratch.name, "spark.show_progress": False, **parse_set(args.set)})
    spark = build_spark(cfg, app_name="als-checkpoint")
    lines = []
    try:
        ratings = (spark.read.option("header", True).csv(f"{args.input}/ratings.csv")
                   .select(F.col("userId").cast("int"), F.col("movieId").cast("int"),
                           F.col("rating").cast("double")).cache())
        n = ratings.count()
        seed = cfg.pipeline.seed
        bias = fit_bias(ratings, cfg.baseline, 0.5, 5.0)
        data = {"explicit": with_residual(ratings, bias).select("userId", "movieId", "residual").cache(),
                "implicit": implicit_confidence(ratings, cfg.als_implicit).cache()}
        for d in data.values():
            d.count()
        print(f"{n} ratings; explicit rank {cfg.als.rank} x {cfg.als.max_iter} iterations, implicit rank "
              f"{cfg.als_implicit.rank} x {cfg.als_implicit.max_iter}; checkpoint dir {spark.sparkContext.getCheckpointDir()}")
        seconds: dict[tuple, list[float]] = {}
        models: dict[tuple, object] = {}
        # A first fit of each kind warms the JVM and is not counted.
        for kind in ("explicit", "implicit"):
            _als(cfg.als if kind == "explicit" else cfg.als_implicit, seed,
                 "residual" if kind == "explicit" else "confidence", kind == "implicit").fit(data[kind])
        for r in range(args.rounds):
            for kind in ("explicit", "implicit"):
                order = (10, -1) if r % 2 == 0 else (-1, 10)
                for interval in order:
                    als = _als(cfg.als if kind == "explicit" else cfg.als_implicit, seed,
                               "residual" if kind == "explicit" else "confidence", kind == "implicit")
                    als.setCheckpointInterval(interval)
                    t0 = time.perf_counter()
                    model = als.fit(data[kind])
                    model.userFactors.count()  # inside the timing: any factor work the fit left lazy
                    dt = time.perf_counter() - t0
                    seconds.setdefault((kind, interval), []).append(dt)
                    models[(kind, interval)] = model
                    print(f"round {r + 1}: {kind} checkpointInterval {interval:>3}: {dt:.2f} s", flush=True)
        lines += ["| model | checkpointInterval 10: median s | off (-1): median s | saved per fit s | largest factor difference |",
                  "|---|---|---|---|---|"]
        for kind in ("explicit", "implicit"):
            a, b = factors(models[(kind, 10)]), factors(models[(kind, -1)])
            diff = max(max(abs(x - y) for x, y in zip(a[k], b[k])) for k in a) if a.keys() == b.keys() else float("nan")
            on, off = statistics.median(seconds[(kind, 10)]), statistics.median(seconds[(kind, -1)])
            lines.append(f"| {kind} | {on:.2f} ({', '.join(f'{x:.2f}' for x in seconds[(kind, 10)])}) | "
                         f"{off:.2f} ({', '.join(f'{x:.2f}' for x in seconds[(kind, -1)])}) | {on - off:.2f} | {diff:.3g} |")
        print("\n".join(lines))
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
    finally:
        spark.stop()
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
