"""Run `movierec`'s main on several argument lists in one process (one JVM for all of them):
for each, its exit code, what it printed on stderr, and any exception that escaped main.

    python -m tests.cli_runner '[["run", "--warehouse", "..."], ...]'

Prints one line `CASES <json>` at the end. Spark's stop() is a no-op so the cases share a session.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import traceback

from pyspark.sql import SparkSession


def main() -> None:
    SparkSession.stop = lambda self: None  # every case joins the same session
    from movierec_spark import cli

    cli.setup_logging()  # before any case: the root logger's level and its handler on the real stderr
    results = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        # The log records go to the captured stream too: a case's log is part of what it printed.
        handler = logging.StreamHandler(err)
        logging.getLogger().addHandler(handler)
        escaped = None
        with contextlib.redirect_stderr(err):
            try:
                rc = cli.main(argv)
            except SystemExit as e:  # argparse's usage errors
                rc = e.code
            except BaseException:
                rc, escaped = None, traceback.format_exc()
        logging.getLogger().removeHandler(handler)
        results.append({"argv": argv, "rc": rc, "stderr": err.getvalue(), "escaped": escaped})
    print("CASES " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
