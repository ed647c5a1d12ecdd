"""spark-submit entry point: the ingest stage alone (--run-id RUN adds it to an earlier run)."""

import sys

from movierec_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "--stages", "ingest", *sys.argv[1:]]))
