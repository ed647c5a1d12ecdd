"""Scale harness: the whole pipeline at 1M, 5M and 25M generated ratings, per stage.

    python benchmarks/scale_benchmark.py [--sizes 1M,5M,25M] [--work DIR] [--config conf/scale.yaml]
                                         [--set KEY=VALUE ...] [--plain-als] [--out DIR]

For each size it generates an ml-25m-shaped dataset with `movierec generate` (users and movies in
ml-25m's proportions: 162,541 users and 59,047 rated movies for 25M ratings; reused when the
same parameters were generated before), runs `movierec run` on it in its own process with a
Spark event log, and records per pipeline stage:
- wall seconds (the pipeline's own per-stage log line);
- peak RSS of the JVM (in local mode the driver is also the only executor) and of the Python
  driver, sampled from /proc every 0.5 s and attributed to the stage running at the time;
- peak JVM heap, shuffle read and write bytes, memory and disk spill, from Spark's event log
  (task end events, attributed through the job group the pipeline sets per stage);
and the whole process's wall time. `small` is ml-latest-small itself (../shared/datasets), run with
--small-config (conf/local.yaml), for the side-by-side ratio; it is left out of the growth fit.

With --plain-als it also runs the plain Spark ALS example on each size's train part, in a
process of its own (ALS.fit + recommendForAllUsers(10), `als.*` parameters, MLlib's default
blocks), so the whole pipeline's cost shows as a multiple of what a user would otherwise run.

Writes scale.csv, scale.md (markdown table with the fitted growth exponent per stage: the slope
of log seconds against log ratings, least squares) and scale.png (log-log plot) into --out.
Not a test: it prints figures. Never run it next to another Spark job on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from measure import tree_rss

ML25M_USERS_PER_RATING = 162_541 / 25_000_095
ML25M_MOVIES_PER_RATING = 59_047 / 25_000_095
SMALL = REPO.parent / "shared" / "datasets" / "ml-latest-small"
STAGE_DONE = re.compile(r"stage (\w+) done in ([\d.]+) s")
MB = 1024 * 1024


def parse_size(text: str) -> tuple[str, int]:
    if text == "small":
        return text, 100_836
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", text)
    if not m:
        raise SystemExit(f"--sizes: cannot read {text!r} (e.g. 1M, 250k, small)")
    mult = {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
    return text, int(float(m.group(1)) * mult)


def generate(work: Path, label: str, ratings: int, seed: int) -> Path:
    """An ml-25m-shaped dataset of `ratings` ratings, reused if generated with the same parameters."""
    users = max(50, round(ratings * ML25M_USERS_PER_RATING))
    movies = max(100, round(ratings * ML25M_MOVIES_PER_RATING))
    params = {"users": users, "movies": movies, "ratings": ratings, "seed": seed}
    out = work / f"data-{label}"
    marker = out / ".params.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        print(f"[{label}] reusing {out} ({users} users x {movies} movies)", flush=True)
        return out
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "movierec_spark.cli", "generate", "--out", str(out), "--users", str(users),
                    "--movies", str(movies), "--ratings", str(ratings), "--seed", str(seed), "--overwrite"],
                   check=True, cwd=REPO)
    marker.write_text(json.dumps(params))
    print(f"[{label}] generated {ratings} ratings ({users} users x {movies} movies) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return out


def write_config(base: Path, dest: Path, events: Path) -> Path:
    """The run's config: `base` plus an uncompressed event log with per-stage executor metrics."""
    import yaml

    data = yaml.safe_load(base.read_text())
    spark = data.setdefault("spark", {})
    if spark.get("log4j_config") and not Path(spark["log4j_config"]).is_absolute():
        spark["log4j_config"] = str(REPO / spark["log4j_config"])
    conf = spark.setdefault("conf", {}) or {}
    conf.update({"spark.eventLog.enabled": "true", "spark.eventLog.dir": events.as_uri(),
                 "spark.eventLog.compress": "false", "spark.eventLog.logStageExecutorMetrics": "true",
                 # Task ends without the SQL accumulators: a third of the log's size.
                 "spark.eventLog.includeTaskMetricsAccumulators": "false"})
    spark["conf"] = conf
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


class Sampler(threading.Thread):
    """Peak RSS of the JVM and the Python driver in the process tree, per pipeline stage."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            tree = tree_rss(self.pid)
            java = max((r for n, r in tree.values() if n == "java"), default=0)
            py = max((r for n, r in tree.values() if n.startswith("python") or n == "movierec"), default=0)
            self.samples.append((time.time(), java, py))
            self.stop.wait(0.5)

    def peak(self, t0: float, t1: float) -> tuple[float, float]:
        inside = [(j, p) for t, j, p in self.samples if t0 <= t <= t1]
        return (max((j for j, _ in inside), default=0) / MB, max((p for _, p in inside), default=0) / MB)


def run_pipeline(label: str, data: Path, work: Path, base_cfg: Path, sets: list[str]) -> dict:
    wh, events = work / f"wh-{label}", work / f"events-{label}"
    for d in (wh, events):
        shutil.rmtree(d, ignore_errors=True)
    events.mkdir(parents=True)
    cfg = write_config(base_cfg, work / f"conf-{label}.yaml", events)
    cmd = [sys.executable, "-m", "movierec_spark.cli", "run", "--input", str(data), "--warehouse", str(wh),
           "--config", str(cfg), "--run-id", f"scale-{label}"]
    for s in sets:
        cmd += ["--set", s]
    log_path = work / f"run-{label}.log"
    print(f"[{label}] {' '.join(cmd[2:])}  (log: {log_path})", flush=True)
    stages: list[dict] = []
    t0 = time.time()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=logf, text=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        for line in proc.stderr:
            logf.write(line)
            m = STAGE_DONE.search(line)
            if m:
                now = time.time()
                stages.append({"stage": m.group(1), "seconds": float(m.group(2)), "end": now})
                print(f"[{label}] {m.group(1)}: {float(m.group(2)):.1f} s", flush=True)
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"[{label}] movierec run failed (exit {rc}); see {log_path}")
    for s in stages:
        s["jvm_rss_mb"], s["python_rss_mb"] = sampler.peak(s["end"] - s["seconds"], s["end"])
    total = {"stage": "total", "seconds": round(wall, 1), "end": time.time()}
    total["jvm_rss_mb"], total["python_rss_mb"] = sampler.peak(t0, time.time())
    # Saved before the event log is read, so --report-only can redo the rest.
    (work / f"result-{label}.json").write_text(json.dumps({"stages": stages, "total": total}))
    return add_event_metrics(label, work, {"stages": stages, "total": total})


def add_event_metrics(label: str, work: Path, res: dict) -> dict:
    stages, total = res["stages"], res["total"]
    spark_metrics = event_log_metrics(work / f"events-{label}")
    for s in stages:
        s.update(spark_metrics.get(s["stage"], {}))
    for key in ("heap_mb", "shuffle_read_mb", "shuffle_write_mb", "spill_mb", "tasks"):
        total[key] = sum(s.get(key, 0) for s in stages) if key != "heap_mb" else max(
            (s.get(key, 0) for s in stages), default=0)
    return {"stages": stages, "total": total}


def event_log_metrics(events: Path) -> dict[str, dict]:
    """Per pipeline stage (from the job group `RUN:STAGE`): peak JVM heap, shuffle and spill."""
    stage_of_spark_stage: dict[int, str] = {}
    out: dict[str, dict] = {}
    # Spark 4 writes a rolling log: a directory eventlog_v2_APP/ of events_N_APP files.
    files = [f for f in events.rglob("*") if f.is_file() and not f.name.startswith((".", "appstatus"))]
    files.sort(key=lambda f: (str(f.parent), int(f.name.split("_")[1]) if f.name.startswith("events_") else 0))
    for f in files:
        with open(f) as fh:
            for line in fh:
                ev = json.loads(line)
                kind = ev.get("Event")
                if kind == "SparkListenerJobStart":
                    group = (ev.get("Properties") or {}).get("spark.jobGroup.id", "")
                    name = group.split(":", 1)[1] if ":" in group else "(outside stages)"
                    for sid in ev.get("Stage IDs", []):
                        stage_of_spark_stage.setdefault(sid, name)
                elif kind == "SparkListenerTaskEnd":
                    name = stage_of_spark_stage.get(ev.get("Stage ID"), "(outside stages)")
                    m = ev.get("Task Metrics") or {}
                    rd, wr = m.get("Shuffle Read Metrics") or {}, m.get("Shuffle Write Metrics") or {}
                    acc = out.setdefault(name, {"heap_mb": 0.0, "shuffle_read_mb": 0.0, "shuffle_write_mb": 0.0,
                                                "spill_mb": 0.0, "tasks": 0})
                    acc["tasks"] += 1
                    acc["shuffle_read_mb"] += (rd.get("Remote Bytes Read", 0) + rd.get("Local Bytes Read", 0)) / MB
                    acc["shuffle_write_mb"] += wr.get("Shuffle Bytes Written", 0) / MB
                    acc["spill_mb"] += (m.get("Memory Bytes Spilled", 0) + m.get("Disk Bytes Spilled", 0)) / MB
                    heap = (ev.get("Task Executor Metrics") or {}).get("JVMHeapMemory", 0)
                    acc["heap_mb"] = max(acc["heap_mb"], heap / MB)
                elif kind == "SparkListenerStageExecutorMetrics":
                    name = stage_of_spark_stage.get(ev.get("Stage ID"), "(outside stages)")
                    heap = (ev.get("Executor Metrics") or {}).get("JVMHeapMemory", 0)
                    acc = out.setdefault(name, {"heap_mb": 0.0, "shuffle_read_mb": 0.0, "shuffle_write_mb": 0.0,
                                                "spill_mb": 0.0, "tasks": 0})
                    acc["heap_mb"] = max(acc["heap_mb"], heap / MB)
    return out


PLAIN = """
import sys, time
from pyspark.ml.recommendation import ALS
from movierec_spark.config import load_config
from movierec_spark.session import build_spark
from movierec_spark import tables
cfg = load_config(sys.argv[1], {"paths.warehouse": sys.argv[2], "spark.show_progress": False})
spark = build_spark(cfg, app_name="plain-als")
train = tables.read_table(spark, cfg.paths.warehouse, "rating_splits").where("split = 'train'").select(
    "userId", "movieId", "rating").cache()
train.count()
a = cfg.als
t0 = time.perf_counter()
als = ALS(rank=a.rank, maxIter=a.max_iter, regParam=a.reg_param, userCol="userId", itemCol="movieId",
          ratingCol="rating", coldStartStrategy="drop", seed=cfg.pipeline.seed)
als.fit(train).recommendForAllUsers(10).write.format("noop").mode("overwrite").save()
print(f"PLAIN_ALS_SECONDS {time.perf_counter() - t0:.1f}")
spark.stop()
"""


def plain_als(label: str, work: Path, base_cfg: Path) -> float:
    """The plain Spark ALS example on this size's persisted train part (its own process)."""
    res = subprocess.run([sys.executable, "-c", PLAIN, str(base_cfg), str(work / f"wh-{label}")], cwd=REPO,
                         capture_output=True, text=True)
    m = re.search(r"PLAIN_ALS_SECONDS ([\d.]+)", res.stdout)
    if res.returncode != 0 or not m:
        raise SystemExit(f"[{label}] plain ALS failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return float(m.group(1))


def exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x (None with fewer than two sizes)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def report(results: dict, out: Path, plain: dict[str, float]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    labels = list(results)
    rows = []
    for label in labels:
        r = results[label]
        for s in r["stages"] + [r["total"]]:
            rows.append({"size": label, "ratings": r["ratings"], "stage": s["stage"], "seconds": s["seconds"],
                         "jvm_rss_mb": round(s.get("jvm_rss_mb", 0)), "python_rss_mb": round(s.get("python_rss_mb", 0)),
                         "heap_mb": round(s.get("heap_mb", 0)), "shuffle_read_mb": round(s.get("shuffle_read_mb", 0), 1),
                         "shuffle_write_mb": round(s.get("shuffle_write_mb", 0), 1),
                         "spill_mb": round(s.get("spill_mb", 0), 1), "tasks": s.get("tasks", 0)})
    with open(out / "scale.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    grown = [lb for lb in labels if lb != "small"]
    stage_names = [s["stage"] for s in results[labels[-1]]["stages"]] + ["total"]
    secs = {(r["size"], r["stage"]): r for r in rows}
    exps = {st: exponent([results[lb]["ratings"] for lb in grown],
                         [secs[(lb, st)]["seconds"] for lb in grown if (lb, st) in secs]) for st in stage_names}
    lines = ["| stage | " + " | ".join(f"{lb} s" for lb in labels) + " | exponent | "
             + " | ".join(f"{lb} JVM RSS / heap MB | {lb} shuffle r/w MB | {lb} spill MB" for lb in labels) + " |",
             "|---" * (2 + 4 * len(labels)) + "|"]
    for st in stage_names:
        cells = [f"{secs[(lb, st)]['seconds']:.1f}" if (lb, st) in secs else "" for lb in labels]
        e = exps[st]
        mem = []
        for lb in labels:
            r = secs.get((lb, st))
            mem += ([f"{r['jvm_rss_mb']} / {r['heap_mb']}", f"{r['shuffle_read_mb']:.0f} / {r['shuffle_write_mb']:.0f}",
                     f"{r['spill_mb']:.0f}"] if r else ["", "", ""])
        lines.append(f"| {st} | " + " | ".join(cells) + f" | {'' if e is None else f'{e:.2f}'} | " + " | ".join(mem) + " |")
    md = ["# Scale benchmark", "",
          "Generated ml-25m-shaped data (`movierec generate`), one `movierec run` per size on this machine; "
          "exponent = slope of log seconds on log ratings over the generated sizes "
          f"({', '.join(grown)}).", ""] + lines
    if plain:
        md += ["", "| size | whole pipeline s | plain ALS fit + recommendForAllUsers s | ratio |", "|---|---|---|---|"]
        for lb, p in plain.items():
            tot = results[lb]["total"]["seconds"]
            md.append(f"| {lb} | {tot:.1f} | {p:.1f} | {tot / p:.1f} |")
    (out / "scale.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)

    if not grown:
        return  # ml-latest-small alone: nothing to plot against size
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(9, 6))
    xs = [results[lb]["ratings"] for lb in grown]
    for st in stage_names:
        ys = [secs[(lb, st)]["seconds"] for lb in grown if (lb, st) in secs]
        if len(ys) != len(xs):
            continue
        e = exps[st]
        ax.plot(xs, ys, marker="o", lw=2.5 if st == "total" else 1.2,
                label=f"{st} (exponent {e:.2f})" if e is not None else st)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ratings")
    ax.set_ylabel("seconds")
    ax.set_title("movierec run: seconds per stage against ratings (log-log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    print(f"wrote {out / 'scale.csv'}, {out / 'scale.md'}, {out / 'scale.png'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1M,5M,25M", help="comma-separated: small, 1M, 250k, 25M ...")
    ap.add_argument("--work", default="/tmp/movierec-scale", help="datasets, warehouses, event logs, run logs")
    ap.add_argument("--config", default=str(REPO / "conf" / "scale.yaml"))
    ap.add_argument("--small-config", default=str(REPO / "conf" / "local.yaml"), help="config for the size 'small'")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE for every run")
    ap.add_argument("--plain-als", action="store_true", help="also time the plain Spark ALS example per size")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", help="where scale.csv/.md/.png go (default: --work)")
    ap.add_argument("--report-only", action="store_true",
                    help="no runs: rebuild the tables from --work's saved results and event logs")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results, plain = {}, {}
    for text in args.sizes.split(","):
        label, ratings = parse_size(text.strip())
        if args.report_only:
            res = add_event_metrics(label, work, json.loads((work / f"result-{label}.json").read_text()))
            res["ratings"] = ratings
            results[label] = res
            saved = work / f"plain-{label}.txt"
            if saved.is_file():
                plain[label] = float(saved.read_text())
            continue
        data = SMALL if label == "small" else generate(work, label, ratings, args.seed)
        # ml-latest-small runs on the config made for it: scale.yaml's 48 shuffle partitions
        # cost it (measured: 649.9 s for the whole run against 364.3 s with conf/local.yaml).
        conf = Path(args.small_config if label == "small" else args.config)
        res = run_pipeline(label, data, work, conf, args.set)
        res["ratings"] = ratings
        results[label] = res
        print(f"[{label}] whole run {res['total']['seconds']:.1f} s, peak JVM RSS {res['total']['jvm_rss_mb']:.0f} MB",
              flush=True)
        if args.plain_als:
            plain[label] = plain_als(label, work, conf)
            (work / f"plain-{label}.txt").write_text(str(plain[label]))
            print(f"[{label}] plain ALS example: {plain[label]:.1f} s", flush=True)
        report(results, Path(args.out or work), plain)
    if args.report_only:
        report(results, Path(args.out or work), plain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
