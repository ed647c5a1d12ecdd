"""A bad-input corpus, built here (no data files committed): every case ends in a clear error
that leaves the warehouse untouched, or in rows in `rejects`, with input = loaded + rejected.

(Zip path traversal and zip bombs are in test_download.py: safe_extract refuses them.)
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from movierec_spark import tables
from movierec_spark.ingest import IngestError
from movierec_spark.layouts import LayoutError
from movierec_spark.ingest import ingest_dataset as ingest

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
    # Files saved in a format that is not text: refused by their first bytes, with what to do.
    "gzip_named_csv": ({"ratings.csv": gzip.compress((HEAD + GOOD).encode())},
                       (IngestError, r"ratings file is gzip-compressed: decompress it")),
    "utf16_with_bom": ({"ratings.csv": (HEAD + GOOD).encode("utf-16")}, (IngestError, r"UTF-16 text.*save it as UTF-8")),
    "header_repeated_mid_file": ({"ratings.csv": ratings(HEAD.strip())}, {"non_numeric_id": 1}),
    "mixed_crlf_and_lf": ({"ratings.csv": HEAD + GOOD.replace("703\n", "703\r\n").replace("224\n", "224\r\n")}, {}),
    # int32's largest id loads; one more is bad.
    "ids_beyond_int32": ({"ratings.csv": ratings("2147483647,1,4.0,964982703", "2147483648,1,4.0,964982703",
                                                 "1,2147483648,4.0,964982703")}, {"bad_id": 2}),
    "scientific_notation_rating": ({"ratings.csv": ratings("3,1,4e0,964982703", "3,2,3.5E0,964982703")}, {}),
    # The later line of a movie listed twice is the correction: the earlier one is the duplicate.
    "movies_duplicate_ids_different_titles": ({"movies.csv": MOVIES + "2,Heat II (1996),Action\n"}, {"duplicate": 1}),
    # Above whole_file_max_bytes the file is split across tasks; the bad line keeps its number.
    "large_file_bad_line_near_end": ({"ratings.csv": ratings("3,1,4.0,964982703", "3,2,high,964982703",
                                                             good=GOOD + "".join(f"{100 + i},{1 + i % 3},4.0,964982703\n"
                                                                                 for i in range(40)))},
                                     {"bad_rating": 1}, {"ingest__whole_file_max_bytes": 256}),
}


def _build(root: Path, overrides: dict) -> Path:
    files = {"movies.csv": MOVIES, "ratings.csv": HEAD + GOOD}
    files.update(overrides)
    root.mkdir(parents=True)
    for name, content in files.items():
        if content is not None:
            (root / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return root


def _physical_lines(content: str | bytes | None) -> int:
    """Data lines of a file as the test wrote it (header excluded), counted without the code
    under test: the independent side of input = loaded + rejected."""
    if not content:
        return 0
    data = content if isinstance(content, bytes) else content.encode("utf-8")
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1) - 1


# Cases of the corpus that CI's default run skips for time (each ingest costs about 12 s of
# Delta table commits): the ones another case or tests/test_ingest.py already covers closely.
HEAVY_CASES = {"missing_movies_file", "empty_ratings_file", "header_only_ratings", "extra_column", "utf8_bom",
               "crlf", "quoted_title_comma_quote", "negative_and_future_timestamps"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.heavy) if c in HEAVY_CASES else c
                                  for c in sorted(CASES)])
def test_bad_input_corpus(spark, tmp_path, case):
    files, expected, *extra = CASES[case]
    root = _build(tmp_path / "in", files)
    wh = tmp_path / "wh"
    # Tolerant threshold: each case's few bad rows must land in rejects, not stop the run.
    cfg = make_config(wh, ingest__reject_threshold=0.5, **(extra[0] if extra else {}))
    if isinstance(expected, tuple):
        exc, pattern = expected
        with pytest.raises(exc, match=pattern):
            ingest(spark, make_config(wh) if case == "wrong_delimiter" else cfg, str(root), "bad", now=NOW)
        # Nothing half-written: no data table was created or changed.
        for name in ("movies", "ratings", "rejects"):
            assert not tables.table_exists(spark, tables.table_path(str(wh), name)), name
        return
    summary = ingest(spark, cfg, str(root), "bad", now=NOW)
    got: dict[str, int] = {}
    by_source: dict[str, int] = {}
    if tables.table_exists(spark, tables.table_path(str(wh), "rejects")):
        rejects = tables.read_table(spark, str(wh), "rejects")
        got = {r["reason"]: r["count"] for r in rejects.groupBy("reason").count().collect()}
        by_source = {r["source"]: r["count"] for r in rejects.groupBy("source").count().collect()}
    assert got == {k: v for k, v in expected.items() if v}, case
    # Every line the test wrote is a loaded row (in its table) or a reject (in `rejects`),
    # counted from the files and the tables, not from the code's own counters.
    written = {"movies.csv": MOVIES, "ratings.csv": HEAD + GOOD, **files}
    for source, table in (("movies.csv", "movies"), ("ratings.csv", "ratings")):
        n_loaded = tables.read_table(spark, str(wh), table).count()
        assert n_loaded + by_source.get(source, 0) == _physical_lines(written[source]), (case, source)
        assert summary[source]["loaded"] == n_loaded and summary[source]["rejected"] == by_source.get(source, 0)


def test_quoted_title_survives_exactly(spark, tmp_path):
    root = _build(tmp_path / "in", dict(CASES["quoted_title_comma_quote"][0]))
    cfg = make_config(tmp_path / "wh")
    ingest(spark, cfg, str(root), "q", now=NOW)
    title = tables.read_table(spark, cfg.paths.warehouse, "movies").where("movieId = 4").first()["title"]
    assert title == 'Dr. Strangelove, or: How I "Learned" to Stop Worrying (1964)'


def test_the_bad_line_of_a_large_file_keeps_its_line_number(spark, tmp_path):
    files, _, extra = CASES["large_file_bad_line_near_end"]
    root = _build(tmp_path / "in", files)
    cfg = make_config(tmp_path / "wh", ingest__reject_threshold=0.5, **extra)
    ingest(spark, cfg, str(root), "big", now=NOW)
    line = files["ratings.csv"].splitlines().index("3,2,high,964982703") + 1
    got = tables.read_table(spark, cfg.paths.warehouse, "rejects").select("line", "raw").collect()
    assert [(r.line, r.raw) for r in got] == [(line, "3,2,high,964982703")]


def test_a_zero_byte_zip_is_refused_in_one_line(spark, tmp_path):
    from movierec_spark.download import DownloadError

    (tmp_path / "empty.zip").write_bytes(b"")
    with pytest.raises(DownloadError, match=r"empty\.zip is not a valid zip file"):
        ingest(spark, make_config(tmp_path / "wh"), str(tmp_path / "empty.zip"), "z", now=NOW)


def test_a_zip_with_an_extra_folder_level_is_found(spark, tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "nested.zip", "w") as zf:
        zf.writestr("outer/ml-latest-small/movies.csv", MOVIES)
        zf.writestr("outer/ml-latest-small/ratings.csv", HEAD + GOOD)
    cfg = make_config(tmp_path / "wh")
    summary = ingest(spark, cfg, str(tmp_path / "nested.zip"), "n", now=NOW)
    assert summary["ratings.csv"]["loaded"] == tables.read_table(spark, cfg.paths.warehouse, "ratings").count() == 4


def test_a_directory_where_a_file_is_expected_is_named(spark, tmp_path):
    root = _build(tmp_path / "in", {"movies.csv": None})
    (root / "movies.csv").mkdir()
    with pytest.raises(LayoutError, match=r"movies\.csv: a directory \(or something else\) where the movies\.csv file"):
        ingest(spark, make_config(tmp_path / "wh"), str(root), "d", now=NOW)
    assert not (tmp_path / "wh").exists() or not tables.table_exists(spark, tables.table_path(str(tmp_path / "wh"), "ratings"))


def test_a_symlink_loop_in_the_input_is_ignored_or_named(spark, tmp_path):
    root = _build(tmp_path / "in", {})
    (root / "loop").symlink_to(root / "loop")  # a loop beside the data files: ignored
    cfg = make_config(tmp_path / "wh")
    assert ingest(spark, cfg, str(root), "l", now=NOW)["ratings.csv"]["loaded"] == 4
    other = _build(tmp_path / "in2", {"ratings.csv": None})
    (other / "ratings.csv").symlink_to(other / "ratings.csv")  # the ratings file itself loops
    with pytest.raises(LayoutError, match="no MovieLens ratings file found"):
        ingest(spark, make_config(tmp_path / "wh2"), str(other), "l2", now=NOW)
