"""spark-submit entry point: ingest a MovieLens dataset into Delta tables.

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0 \
        --py-files dist/movierec_spark-*.whl jobs/ingest.py --input DIR --warehouse DIR
"""

import sys

from movierec_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
