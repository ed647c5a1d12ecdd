"""Where a run's JVM spends its CPU: Java Flight Recorder samples, grouped by thread and by work.

    jcmd <driver pid> JFR.start settings=profile dumponexit=true filename=RUN.jfr   # while it runs
    python benchmarks/jfr_profile.py RUN.jfr [--top 25]

Spark's event log counts only the work inside tasks (its CPU time per task). In local mode the
driver, the scheduler, query planning, code generation and the garbage collector share the same
two cores, and on ml-latest-small they use more CPU than the tasks do. This reads the recording's
execution samples (`jfr print --events jdk.ExecutionSample`: a Java thread's stack every 10-20 ms
while it runs Java code) and prints the share of samples per thread group (task threads, the
DAG scheduler, driver threads that run the Python side's calls, ...), then, per group, what the
samples were doing (by the most telling frame on the stack: Catalyst's optimizer, analysis or
planning, Janino compiling generated code, Delta's log, serialization, MLlib's trees, ...), and
the top frames. GC pauses come from jdk.GarbageCollection events (their sum of pauses), and the
process's CPU use over the recording from jdk.CPULoad (the JVM's user + system share of the
machine's cores).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys

# The first match wins, searched from the top of the stack (innermost) to its root: a sample is
# counted under the innermost kind of work it was doing (Janino called by the planner is codegen).
KINDS = [
    ("codegen compile (Janino)", ("org.codehaus.janino.", "org.codehaus.commons.compiler.")),
    ("codegen source (Catalyst)", ("org.apache.spark.sql.catalyst.expressions.codegen.", "WholeStageCodegenExec.doCodeGen")),
    ("serialization", ("org.apache.spark.serializer.", "java.io.ObjectOutputStream", "java.io.ObjectInputStream",
                       "com.esotericsoftware.kryo.", "org.apache.spark.util.ClosureCleaner")),
    ("parquet / delta io", ("org.apache.parquet.", "io.delta.", "org.apache.spark.sql.delta.")),
    ("optimizer", ("org.apache.spark.sql.catalyst.optimizer.", "org.apache.spark.sql.execution.adaptive.AQEOptimizer")),
    ("analysis", ("org.apache.spark.sql.catalyst.analysis.",)),
    ("physical planning", ("org.apache.spark.sql.execution.SparkStrategies", "org.apache.spark.sql.catalyst.planning.",
                           "org.apache.spark.sql.execution.QueryExecution", "org.apache.spark.sql.execution.adaptive.")),
    ("tree nodes (any phase)", ("org.apache.spark.sql.catalyst.trees.", "org.apache.spark.sql.catalyst.plans.")),
    ("MLlib trees", ("org.apache.spark.ml.tree.",)),
    ("MLlib ALS", ("org.apache.spark.ml.recommendation.",)),
    ("shuffle / storage", ("org.apache.spark.shuffle.", "org.apache.spark.storage.", "org.apache.spark.util.collection.")),
    ("generated code", ("GeneratedClass", "org.apache.spark.sql.execution.")),
    ("scheduler", ("org.apache.spark.scheduler.",)),
    ("py4j", ("py4j.",)),
]


def thread_group(name: str) -> str:
    if name.startswith("Executor task launch worker"):
        return "task threads"
    for prefix, group in (("dag-scheduler", "DAG scheduler"), ("Thread-", "driver threads (py4j calls)"),
                          ("main", "driver threads (py4j calls)"), ("broadcast-exchange", "broadcast exchange"),
                          ("shuffle-", "shuffle io"), ("spark-listener", "listeners"),
                          ("element-tracking-store", "listeners"), ("heartbeat", "heartbeat"),
                          ("dispatcher", "rpc"), ("executor-heartbeater", "heartbeat"),
                          ("context-cleaner", "cleaner")):
        if name.startswith(prefix):
            return group
    return "other: " + re.sub(r"[-\s]?\d+.*$", "", name)


def kind(frames: list[str]) -> str:
    for f in frames:
        for label, needles in KINDS:
            if any(n in f for n in needles):
                return label
    return "other"


def samples(path: str):
    """(thread name, frames innermost first) per execution sample."""
    text = subprocess.run(["jfr", "print", "--events", "jdk.ExecutionSample", "--stack-depth", "96", path],
                          check=True, capture_output=True, text=True).stdout
    for block in text.split("jdk.ExecutionSample {")[1:]:
        m = re.search(r'sampledThread = "(.*?)" \(javaThreadId', block)
        stack = block.split("stackTrace = [", 1)[-1].split("\n  ]", 1)[0]
        frames = [re.sub(r"\s+line: \d+.*$", "", f.strip()) for f in stack.splitlines()
                  if f.strip() and f.strip() != "..."]
        yield (m.group(1) if m else "?"), frames


def events(path: str, name: str) -> str:
    return subprocess.run(["jfr", "print", "--events", name, path], check=True, capture_output=True, text=True).stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recording")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    by_group: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    top: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    n = 0
    for thread, frames in samples(args.recording):
        g = thread_group(thread)
        n += 1
        by_group[g] += 1
        by_kind[g][kind(frames)] += 1
        if frames:
            top[g][frames[0]] += 1
    if not n:
        print("no execution samples in the recording")
        return 1
    gc = events(args.recording, "jdk.GarbageCollection")
    pauses = [float(v) * (1e-3 if unit == "ms" else 1e-6 if unit == "us" else 1.0)
              for v, unit in re.findall(r"sumOfPauses = ([\d.]+) (ms|s|us)", gc)]
    load = events(args.recording, "jdk.CPULoad")
    user = [float(v) for v in re.findall(r"jvmUser = ([\d.]+)%", load)]
    system = [float(v) for v in re.findall(r"jvmSystem = ([\d.]+)%", load)]
    print(f"{n} execution samples; {len(pauses)} garbage collections, {sum(pauses):.1f} s of pauses")
    if user:
        print(f"JVM CPU over the recording: {sum(user) / len(user):.0f}% user + {sum(system) / len(system):.0f}% system "
              f"of the machine (mean of {len(user)} one-second samples)")
    print("\n| thread group | samples | share |\n|---|---|---|")
    for g, c in by_group.most_common():
        print(f"| {g} | {c} | {c / n:.1%} |")
    for g, c in by_group.most_common(4):
        print(f"\n## {g}: what the samples were doing\n\n| work | samples | share of the group |\n|---|---|---|")
        for k, ck in by_kind[g].most_common():
            print(f"| {k} | {ck} | {ck / c:.1%} |")
        print("\n| top frame | samples |\n|---|---|")
        for f, cf in top[g].most_common(args.top):
            print(f"| `{f}` | {cf} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
