"""`movierec ...` that SIGKILLs its own process during one stage's first table write (tests only).

    MOVIEREC_KILL_STAGE=als MOVIEREC_KILL_MARKER=/tmp/m python -m tests.kill_runner run ...

The kill is a real SIGKILL (no cleanup, no `finally`, no run bookkeeping), aimed at the worst
moment: a watcher thread fires as soon as the write has put a new data file into the table's
directory, i.e. after Spark started writing and before Delta committed. If the write commits
before the watcher sees a file (tiny writes can), the process is killed right after the commit
instead, before anything else is recorded. The marker file says which of the two happened and
which table was being written.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path


def _files(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {str(p) for p in path.rglob("*.parquet") if "_delta_log" not in p.parts}


def install(stage: str, marker: str) -> None:
    import importlib

    from movierec_spark import pipeline, tables

    importlib.import_module("movierec_spark.stages")  # registers the stages

    current = {"stage": None}
    background: set[str] = set()  # stages running off the main thread (pipeline.overlap)

    def kill(how: str, table: str) -> None:
        Path(marker).write_text(f"{stage} {table} {how}\n")
        # The whole process group: this Python driver and its JVM, which would otherwise notice
        # the driver gone and shut down through its hooks (a gentler death than a crash).
        os.killpg(os.getpgrp(), signal.SIGKILL)

    for name, fn in list(pipeline.STAGES.items()):
        def wrapped(ctx, _fn=fn, _name=name):
            # The run's main thread's stage, and the stages running in the background beside it
            # (pipeline.overlap): the kill comes at the first write while the chosen stage runs,
            # whichever stage's write that is (the stage's own writes may come from its threads).
            if threading.current_thread() is threading.main_thread():
                current["stage"] = _name
                return _fn(ctx)
            background.add(_name)
            try:
                return _fn(ctx)
            finally:
                background.discard(_name)
        pipeline.STAGES[name] = wrapped

    def hook(real):
        def write(spark, df, warehouse, name, *args, **kwargs):
            if current["stage"] != stage and stage not in background:
                return real(spark, df, warehouse, name, *args, **kwargs)
            path = Path(tables.table_path(warehouse, name))
            before = _files(path)
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    if _files(path) - before:
                        kill("mid-write", name)
                    time.sleep(0.002)

            threading.Thread(target=watch, daemon=True).start()
            real(spark, df, warehouse, name, *args, **kwargs)
            done.set()
            kill("after-commit", name)

        return write

    for fn in ("upsert", "replace_where", "overwrite"):
        setattr(tables, fn, hook(getattr(tables, fn)))


if __name__ == "__main__":
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # a group of our own (and our JVM's) to kill, never the caller's
    install(os.environ["MOVIEREC_KILL_STAGE"], os.environ["MOVIEREC_KILL_MARKER"])
    from movierec_spark.cli import main

    sys.exit(main(sys.argv[1:]))
