"""Where a pipeline run's time went, from its Spark event log: per pipeline stage, then per query.

    python benchmarks/event_profile.py EVENTS_DIR [--stage NAME ...] [--top N] [--out FILE.md]

EVENTS_DIR is a run's `spark.eventLog.dir` (the scale harness keeps one per size in
/tmp/movierec-scale/events-<size>; any run takes `--set 'spark.conf={"spark.eventLog.enabled":
"true", "spark.eventLog.dir": "file:///DIR", "spark.eventLog.compress": "false"}'`). Prints:
- per pipeline stage (the job group `RUN:STAGE` the pipeline sets): Spark jobs, stages and tasks,
  task seconds (launch to finish, summed over tasks: on 2 cores, wall time can be at most half of
  it once both are busy), executor run and CPU seconds, task deserialization, shuffle read and
  written, spill;
- for each `--stage` (default: the three with the most task seconds), its heaviest queries (SQL
  executions, the operators their plans hold) and its heaviest Spark stages (task seconds, tasks,
  shuffle, the operators they run, or the RDD call site for MLlib's own jobs);
- per pipeline stage, its jobs over time: span, seconds with a job of it running and without,
  mean job duration.
Task seconds overlap when stages run side by side (pipeline.overlap) or a stage runs jobs in
threads; they measure work, not the critical path. Not a test: it reads a log and prints figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

MB = 1024 * 1024
# Plan operators worth naming in a query's summary (the rest are projections, filters, exchanges).
OPERATORS = ("SortMergeJoin", "BroadcastHashJoin", "ShuffledHashJoin", "BroadcastNestedLoopJoin", "Window",
             "WindowGroupLimit", "HashAggregate", "ObjectHashAggregate", "SortAggregate", "MapInArrow",
             "FlatMapGroupsInPandas", "ArrowEvalPython", "BatchEvalPython", "Generate")


def log_files(events: Path) -> list[Path]:
    """The log's files in write order (Spark 4 rolls a log over events_N_APP files)."""
    files = [f for f in events.rglob("*") if f.is_file() and not f.name.startswith((".", "appstatus"))]

    def order(f: Path):
        m = re.match(r"events_(\d+)_", f.name)
        return str(f.parent), int(m.group(1)) if m else 0

    return sorted(files, key=order)


def new_totals() -> dict:
    return collections.defaultdict(float)


def read_log(events: Path) -> dict:
    group_of_job: dict[int, str] = {}
    exec_of_job: dict[int, str | None] = {}
    job_of_stage: dict[int, int] = {}
    root: dict[str, str] = {}
    queries: dict[str, dict] = {}
    stage_info: dict[int, dict] = {}
    per_group: dict[str, dict] = collections.defaultdict(new_totals)
    per_stage: dict[int, dict] = collections.defaultdict(new_totals)
    spans: dict[int, list] = {}  # job -> [submitted, completed] (ms)
    for f in log_files(events):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                ev = json.loads(line)
                kind = ev.get("Event", "")
                if kind == "SparkListenerJobStart":
                    props = ev.get("Properties") or {}
                    group = props.get("spark.jobGroup.id") or ""
                    job = ev["Job ID"]
                    group_of_job[job] = group.split(":", 1)[1] if ":" in group else "(outside stages)"
                    exec_of_job[job] = props.get("spark.sql.execution.id")
                    per_group[group_of_job[job]]["jobs"] += 1
                    spans[job] = [ev.get("Submission Time"), None]
                    for sid in ev.get("Stage IDs", []):
                        job_of_stage.setdefault(sid, job)
                elif kind == "SparkListenerJobEnd" and ev["Job ID"] in spans:
                    spans[ev["Job ID"]][1] = ev.get("Completion Time")
                elif kind.endswith("SQLExecutionStart"):
                    xid = str(ev["executionId"])
                    if ev.get("rootExecutionId") is not None and str(ev["rootExecutionId"]) != xid:
                        root[xid] = str(ev["rootExecutionId"])
                    plan = ev.get("physicalPlanDescription", "") or ""
                    ops = collections.Counter()
                    for op in OPERATORS:
                        ops[op] = len(re.findall(r"[-:] " + re.escape(op) + r"\b", plan.split("\n\n")[0]))
                    action = (ev.get("details") or "").split("\n", 1)[0]
                    action = re.sub(r"^org\.apache\.spark\.sql\.(classic\.)?", "", action)
                    queries[xid] = {"action": action[:60], "ops": {k: v for k, v in ops.items() if v}}
                elif kind == "SparkListenerStageCompleted":
                    si = ev["Stage Info"]
                    scopes = []
                    for rdd in si.get("RDD Info", []):
                        if rdd.get("Scope"):
                            name = json.loads(rdd["Scope"])["name"].split(" (")[0]
                            if name not in scopes:
                                scopes.append(name)
                    stage_info[si["Stage ID"]] = {"name": si.get("Stage Name", "")[:60], "tasks": si.get("Number of Tasks", 0),
                                                  "scopes": scopes}
                    job = job_of_stage.get(si["Stage ID"])
                    per_group[group_of_job.get(job, "(outside stages)")]["stages"] += 1
                elif kind == "SparkListenerTaskEnd":
                    sid = ev.get("Stage ID")
                    job = job_of_stage.get(sid)
                    info, m = ev.get("Task Info") or {}, ev.get("Task Metrics") or {}
                    rd, wr = m.get("Shuffle Read Metrics") or {}, m.get("Shuffle Write Metrics") or {}
                    got = {"tasks": 1,
                           "task_s": (info.get("Finish Time", 0) - info.get("Launch Time", 0)) / 1000,
                           "run_s": m.get("Executor Run Time", 0) / 1000,
                           "cpu_s": m.get("Executor CPU Time", 0) / 1e9,
                           "deser_s": m.get("Executor Deserialize Time", 0) / 1000,
                           "gc_s": m.get("JVM GC Time", 0) / 1000,
                           "read_mb": (rd.get("Remote Bytes Read", 0) + rd.get("Local Bytes Read", 0)) / MB,
                           "write_mb": wr.get("Shuffle Bytes Written", 0) / MB,
                           "spill_mb": (m.get("Memory Bytes Spilled", 0) + m.get("Disk Bytes Spilled", 0)) / MB}
                    for acc in (per_group[group_of_job.get(job, "(outside stages)")], per_stage[sid]):
                        for k, v in got.items():
                            acc[k] += v
    return {"group_of_job": group_of_job, "exec_of_job": exec_of_job, "job_of_stage": job_of_stage, "root": root,
            "queries": queries, "stage_info": stage_info, "per_group": per_group, "per_stage": per_stage,
            "spans": {j: v for j, v in spans.items() if v[0] is not None and v[1] is not None}}


def busy_seconds(intervals: list) -> float:
    """Seconds covered by the union of (start, end) intervals in ms: time with at least one job running."""
    total, cur = 0, None
    for a, b in sorted(intervals):
        if cur is None or a > cur[1]:
            total += 0 if cur is None else cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return (total + (0 if cur is None else cur[1] - cur[0])) / 1000


def timeline(log: dict) -> list[str]:
    """Per pipeline stage: from its first job's submission to its last job's end (span), the time
    with at least one of its jobs running (busy) and without (the driver planning, running
    Python, committing to Delta, or waiting), and its jobs' mean duration: at small scale a run's
    time is its job count times that, not its data."""
    per: dict[str, list] = collections.defaultdict(list)
    for job, iv in log["spans"].items():
        per[log["group_of_job"].get(job, "(outside stages)")].append(iv)
    lines = ["| pipeline stage | jobs | span s | busy s | no job running s | mean job ms |", "|---|---|---|---|---|---|"]
    for name, ivs in sorted(per.items(), key=lambda kv: -busy_seconds(kv[1])):
        span = (max(b for _, b in ivs) - min(a for a, _ in ivs)) / 1000
        busy = busy_seconds(ivs)
        mean = sum(b - a for a, b in ivs) / len(ivs)
        lines.append(f"| {name} | {len(ivs)} | {span:.1f} | {busy:.1f} | {span - busy:.1f} | {mean:.0f} |")
    every = [iv for ivs in per.values() for iv in ivs]
    if every:
        span = (max(b for _, b in every) - min(a for a, _ in every)) / 1000
        lines.append(f"| whole run | {len(every)} | {span:.1f} | {busy_seconds(every):.1f} | "
                     f"{span - busy_seconds(every):.1f} | {sum(b - a for a, b in every) / len(every):.0f} |")
    return lines


def report(log: dict, stages: list[str], top: int) -> str:
    g = log["per_group"]
    lines = ["| pipeline stage | jobs | Spark stages | tasks | task s | run s | CPU s | deserialize s | "
             "shuffle read MB | shuffle written MB | spill MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(g, key=lambda k: -g[k]["task_s"])
    for name in order + ["total"]:
        t = g[name] if name != "total" else {k: sum(g[n][k] for n in g) for k in
                                              ("jobs", "stages", "tasks", "task_s", "run_s", "cpu_s", "deser_s",
                                               "read_mb", "write_mb", "spill_mb")}
        lines.append(f"| {name} | {t['jobs']:.0f} | {t['stages']:.0f} | {t['tasks']:.0f} | {t['task_s']:.1f} | "
                     f"{t['run_s']:.1f} | {t['cpu_s']:.1f} | {t['deser_s']:.1f} | {t['read_mb']:.0f} | "
                     f"{t['write_mb']:.0f} | {t['spill_mb']:.0f} |")
    lines += ["", "## Jobs over time (stages side by side overlap; a job's duration includes waiting for a core)", ""]
    lines += timeline(log)
    for name in stages or order[:3]:
        sids = [s for s, j in log["job_of_stage"].items() if log["group_of_job"].get(j) == name and s in log["per_stage"]]
        by_query: dict[str, dict] = collections.defaultdict(new_totals)
        for s in sids:
            x = log["exec_of_job"].get(log["job_of_stage"][s])
            x = log["root"].get(x, x) if x is not None else "(no query: RDD jobs)"
            for k, v in log["per_stage"][s].items():
                by_query[x][k] += v
        lines += ["", f"## {name}: heaviest queries", "",
                  "| query | task s | CPU s | shuffle written MB | action | operators in its plan |", "|---|---|---|---|---|---|"]
        for x, t in sorted(by_query.items(), key=lambda kv: -kv[1]["task_s"])[:top]:
            q = log["queries"].get(x, {})
            ops = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in q.get("ops", {}).items())
            lines.append(f"| {x} | {t['task_s']:.1f} | {t['cpu_s']:.1f} | {t['write_mb']:.0f} | "
                         f"{q.get('action', '')} | {ops} |")
        lines += ["", f"## {name}: heaviest Spark stages", "",
                  "| Spark stage | query | tasks | task s | CPU s | shuffle read MB | written MB | runs |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in sorted(sids, key=lambda s: -log["per_stage"][s]["task_s"])[:top]:
            t, info = log["per_stage"][s], log["stage_info"].get(s, {})
            x = log["exec_of_job"].get(log["job_of_stage"][s])
            x = log["root"].get(x, x) if x is not None else ""
            scopes = [c for c in info.get("scopes", []) if c not in ("WholeStageCodegen", "AQEShuffleRead", "Exchange")]
            what = " ".join(scopes[:8]) if x else info.get("name", "")
            lines.append(f"| {s} | {x} | {t['tasks']:.0f} | {t['task_s']:.1f} | {t['cpu_s']:.1f} | {t['read_mb']:.0f} | "
                         f"{t['write_mb']:.0f} | {what} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("events", type=Path, help="the run's spark.eventLog.dir")
    ap.add_argument("--stage", action="append", default=[], help="pipeline stage to break down (repeatable)")
    ap.add_argument("--top", type=int, default=12, help="queries and Spark stages listed per stage")
    ap.add_argument("--out", type=Path, help="also write the report here")
    args = ap.parse_args()
    if not args.events.is_dir():
        print(f"event_profile: {args.events} is not a directory (a run's spark.eventLog.dir)", file=sys.stderr)
        return 2
    text = report(read_log(args.events), args.stage, args.top)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
