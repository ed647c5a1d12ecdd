"""spark-submit entry point: the als_implicit stage alone (--run-id RUN adds it to an earlier run)."""

import sys

from movierec_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "--stages", "als_implicit", *sys.argv[1:]]))
