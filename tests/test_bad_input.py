"""A bad-input corpus, built here (no data files committed): every case ends in a clear error
that leaves the warehouse untouched, or in rows in `rejects`, with input = loaded + rejected.

(Zip path traversal and zip bombs are in test_download.py: safe_extract refuses them.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from delta.tables import DeltaTable

from movierec_spark import tables
from movierec_spark.ingest import IngestError
from movierec_spark.layouts import LayoutError
from movierec_spark.stages import ingest

from .conftest import make_config

NOW = 1_700_000_000
MOVIES = "movieId,title,genres\n1,Toy Story (1995),Animation\n2,Heat (1995),Action\n3,Up (2009),Animation\n"
HEAD = "userId,movieId,rating,timestamp\n"
GOOD = "1,1,4.0,964982703\n1,2,3.5,964981247\n2,1,0.5,964982224\n2,3,5.0,964983815\n"


def ratings(*bad: str, good: str = GOOD) -> str:
    return HEAD + good + "".join(b + "\n" for b in bad)


# name -> (files, expected): expected is {reason: count} of rejected rows, or
# (exception type, message pattern) for a clear error.
CASES = {
    # A file cut off mid-line, without its final newline.
    "truncated": ({"ratings.csv": HEAD + GOOD + "3,2"}, {"wrong_column_count": 1}),
    "missing_ratings_file": ({"ratings.csv": None}, (LayoutError, "no MovieLens ratings file found")),
    "missing_movies_file": ({"movies.csv": None}, (LayoutError, "ratings.csv without movies.csv")),
    "empty_ratings_file": ({"ratings.csv": ""}, {}),
    "header_only_ratings": ({"ratings.csv": HEAD}, {}),
    "everything_empty": ({"ratings.csv": HEAD, "movies.csv": "movieId,title,genres\n"},
                         (IngestError, "no data rows")),
    "wrong_delimiter": ({"ratings.csv": HEAD.replace(",", ";") + GOOD.replace(",", ";")},
                        (IngestError, r"ratings\.csv.*wrong_column_count")),
    "extra_column": ({"ratings.csv": ratings("3,2,4.0,964982703,surplus")}, {"wrong_column_count": 1}),
    "missing_column": ({"ratings.csv": ratings("3,2,964982703")}, {"wrong_column_count": 1}),
    "utf8_bom": ({"ratings.csv": "\ufeff" + HEAD + GOOD}, {}),
    "crlf": ({"ratings.csv": (HEAD + GOOD).replace("\n", "\r\n")}, {}),
    "non_utf8_title": ({"movies.csv": MOVIES.encode() + b"4,Caf\xe9 (1999),Drama\n"}, {"bad_encoding": 1}),
    "quoted_title_comma_quote": (
        {"movies.csv": MOVIES + '4,"Dr. Strangelove, or: How I ""Learned"" to Stop Worrying (1964)",Comedy\n'}, {}),
    # A line break inside quotes: lines are physical lines (exact line numbers in rejects), so both
    # halves are rejected as malformed (unbalanced quotes) rather than guessed back together.
    "quoted_title_newline": ({"movies.csv": MOVIES + '4,"Two\nLines (1999)",Comedy\n'}, {"malformed": 2}),
    "negative_zero_huge_ids": ({"ratings.csv": ratings("-1,1,4.0,964982703", "0,1,4.0,964982703",
                                                       "1,99999999999,4.0,964982703")}, {"bad_id": 3}),
    "nan_inf_empty_offscale": ({"ratings.csv": ratings("3,1,NaN,964982703", "3,2,inf,964982703", "3,3,,964982703",
                                                       "4,1,6.0,964982703", "4,2,-1.0,964982703")},
                               {"bad_rating": 3, "rating_off_scale": 2}),
    "negative_and_future_timestamps": ({"ratings.csv": ratings("3,1,4.0,-5", "3,2,4.0,4102444800")},
                                       {"bad_timestamp": 2}),
    "duplicate_rows": ({"ratings.csv": ratings("1,1,4.0,964982703", "1,1,4.0,964982703")}, {"duplicate": 2}),
    "unknown_movie": ({"ratings.csv": ratings("3,404,4.0,964982703")}, {"unknown_movie": 1}),
}


def _build(root: Path, overrides: dict) -> Path:
    files = {"movies.csv": MOVIES, "ratings.csv": HEAD + GOOD}
    files.update(overrides)
    root.mkdir(parents=True)
    for name, content in files.items():
        if content is not None:
            (root / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return root


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_corpus(spark, tmp_path, case):
    files, expected = CASES[case]
    root = _build(tmp_path / "in", files)
    wh = tmp_path / "wh"
    # Tolerant threshold: each case's few bad rows must land in rejects, not stop the run.
    cfg = make_config(wh, ingest__reject_threshold=0.5)
    if isinstance(expected, tuple):
        exc, pattern = expected
        with pytest.raises(exc, match=pattern):
            ingest(spark, make_config(wh) if case == "wrong_delimiter" else cfg, str(root), "bad", now=NOW)
        # Nothing half-written: no data table was created or changed.
        for name in ("movies", "ratings", "rejects"):
            assert not tables.table_exists(spark, tables.table_path(str(wh), name)), name
        return
    summary = ingest(spark, cfg, str(root), "bad", now=NOW)
    for source, s in summary.items():
        assert s["input"] == s["loaded"] + s["rejected"], (case, source, s)
    got: dict[str, int] = {}
    if tables.table_exists(spark, tables.table_path(str(wh), "rejects")):
        for r in tables.read_table(spark, str(wh), "rejects").groupBy("reason").count().collect():
            got[r["reason"]] = r["count"]
    assert got == {k: v for k, v in expected.items() if v}, case
    # Loaded rows are exactly what the tables hold.
    n_ratings = tables.read_table(spark, str(wh), "ratings").count() if "ratings.csv" in summary else 0
    assert n_ratings == summary.get("ratings.csv", {}).get("loaded", 0)
    for name in ("movies", "ratings"):
        path = tables.table_path(str(wh), name)
        if tables.table_exists(spark, path):
            assert DeltaTable.forPath(spark, path).history(1).first()["version"] >= 0


def test_quoted_title_survives_exactly(spark, tmp_path):
    root = _build(tmp_path / "in", dict(CASES["quoted_title_comma_quote"][0]))
    cfg = make_config(tmp_path / "wh")
    ingest(spark, cfg, str(root), "q", now=NOW)
    title = tables.read_table(spark, cfg.paths.warehouse, "movies").where("movieId = 4").first()["title"]
    assert title == 'Dr. Strangelove, or: How I "Learned" to Stop Worrying (1964)'
