"""Where a Spark JVM's CPU goes, thread by thread, read from /proc until it exits.

    python benchmarks/jvm_threads.py --pid PID [--every 1] [--out threads.json]
    python benchmarks/jvm_threads.py --report threads.json

Java Flight Recorder (jfr_profile.py) samples Java threads only: the JIT compiler threads, the
garbage collectors' and the VM's own threads never appear in it. Linux counts every thread's CPU
in /proc/PID/task/TID/stat, so this samples those counters every `--every` seconds (a thread's
last reading stands once it ends) and, when the process exits (or at Ctrl-C), prints CPU seconds
per thread group: task threads ("Executor task launch worker"), C2 and C1 compiler threads, GC
threads, the DAG scheduler, the py4j threads that carry the driver's calls ("Thread-N"), and so on.
Linux truncates thread names to 15 characters; digits are folded so that numbered threads group.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time


def sample(pid: int) -> dict[str, tuple[str, float]]:
    """{tid: (thread name, CPU seconds so far)} for every live thread of `pid`."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended between listdir and open
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    return out


def group(name: str) -> str:
    return re.sub(r"[#\-]?\d+", "#", name)


def report(seen: dict[str, tuple[str, float]], top: int = 20) -> str:
    cpu: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    for name, s in seen.values():
        cpu[group(name)] += s
        threads[group(name)] += 1
    total = sum(cpu.values()) or 1.0
    lines = [f"{total:.0f} CPU seconds over {len(seen)} threads", "",
             "| thread group | threads | CPU s | share |", "|---|---|---|---|"]
    for g, s in cpu.most_common(top):
        lines.append(f"| {g} | {threads[g]} | {s:.1f} | {100 * s / total:.1f}% |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pid", type=int, help="the JVM to follow (e.g. pgrep -f SparkSubmit)")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between readings")
    ap.add_argument("--out", help="keep the readings here (JSON), rewritten at every reading")
    ap.add_argument("--report", metavar="JSON", help="print the table of readings kept earlier")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f)))
        return 0
    if not args.pid:
        ap.error("--pid or --report")
    if not os.path.isdir(f"/proc/{args.pid}"):
        print(f"no process {args.pid} (this reads Linux's /proc)", file=sys.stderr)
        return 2
    seen: dict[str, tuple[str, float]] = {}
    try:
        while os.path.isdir(f"/proc/{args.pid}"):
            try:
                seen.update(sample(args.pid))
            except OSError:  # the process ended mid-reading
                break
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(seen, f)
            time.sleep(args.every)
    except KeyboardInterrupt:
        pass
    print(report(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
