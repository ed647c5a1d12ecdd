"""A run's train part as a MovieLens directory: validation data for choices a run cannot make itself.

    python benchmarks/nested_split.py --warehouse WH --run-id RUN --source DATASET_DIR --out DIR

Writes DIR/ratings.csv (userId,movieId,rating,timestamp) from the `train` rows of RUN's
rating_splits (read with deltalake, no JVM) and copies the source dataset's other files
(movies.csv, tags.csv, links.csv, README.txt). `movierec evaluate --input DIR ...` then splits
that train part again: its test part is carved out of the outer run's train part, so a setting
compared there (two runs differing in it, same seed) is chosen without reading the outer test
part, which is read once, afterwards. Unlike the run's own validation folds, this scores the
whole serving path: models refitted on all of the inner train part, lists served from them.
Not a test: it writes a dataset and prints its counts.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

OTHER_FILES = ("movies.csv", "tags.csv", "links.csv", "README.txt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--source", required=True, help="the dataset the run read (its other files are copied)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        table = DeltaTable(f"{a.warehouse}/rating_splits")
    except TableNotFoundError:
        print(f"{a.warehouse}/rating_splits is not a Delta table: give the warehouse of a run with a split stage",
              file=sys.stderr)
        return 1
    train = table.to_pandas(
        columns=["userId", "movieId", "rating", "rated_at"], filters=[("run_id", "=", a.run_id), ("split", "=", "train")])
    if train.empty:
        print(f"run {a.run_id} has no train rows in {a.warehouse}/rating_splits", file=sys.stderr)
        return 1
    # rated_at is a UTC timestamp (microseconds): back to MovieLens's epoch seconds.
    train["timestamp"] = train.pop("rated_at").astype("int64") // 10**6
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train.sort_values(["userId", "movieId"]).to_csv(out / "ratings.csv", index=False)
    copied = [f for f in OTHER_FILES if (Path(a.source) / f).exists()]
    for f in copied:
        shutil.copy(Path(a.source) / f, out / f)
    print(f"{out}/ratings.csv: {len(train)} train ratings of run {a.run_id} "
          f"({train.userId.nunique()} users, {train.movieId.nunique()} movies); copied {', '.join(copied)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
