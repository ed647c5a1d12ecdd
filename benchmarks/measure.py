"""Run a command and report its wall time and peak memory, the Spark driver JVM included.

    python benchmarks/measure.py -- movierec run --stages ingest --input DIR --warehouse DIR

`/usr/bin/time` only sees the Python process; the driver JVM (in local mode also the executor)
is a child that pyspark starts, so this samples the RSS of every process in the tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def tree_rss(root: int) -> dict[int, tuple[str, int]]:
    """pid -> (command name, RSS bytes) for root and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[str, int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                parts = fh.read().rsplit(")", 1)
            name = parts[0].split("(", 1)[1]
            fields = parts[1].split()
            ppid, rss_pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
        info[int(d)] = (name, rss_pages * os.sysconf("SC_PAGE_SIZE"))
    out, stack = {}, [root]
    while stack:
        p = stack.pop()
        if p in info:
            out[p] = info[p]
        stack.extend(children.get(p, []))
    return out


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv)
    peak_total = peak_java = peak_python = 0
    while proc.poll() is None:
        tree = tree_rss(proc.pid)
        peak_total = max(peak_total, sum(r for _, r in tree.values()))
        peak_java = max(peak_java, max((r for n, r in tree.values() if n == "java"), default=0))
        peak_python = max(peak_python, max((r for n, r in tree.values() if n.startswith("python") or n == "movierec"), default=0))
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    mb = 1024 * 1024
    print(f"MEASURE wall={wall:.1f}s exit={proc.returncode} peak_driver_jvm_rss={peak_java / mb:.0f}MB "
          f"peak_python_rss={peak_python / mb:.0f}MB peak_tree_rss={peak_total / mb:.0f}MB", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
