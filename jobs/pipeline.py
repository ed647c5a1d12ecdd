"""spark-submit entry point: the whole pipeline (`movierec run`)."""

import sys

from movierec_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
