"""`movierec query` on small warehouses written with delta-rs: no Spark, no JVM.

The tables are written with pyarrow schemas converted from tables.TABLE_SCHEMAS (importing
pyspark.sql.types starts no JVM), so the readers see exactly the contract's types.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from movierec_spark import cli, query

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------
# Helpers shared with test_report.py and benchmarks/query_benchmark.py


def arrow_type(t) -> pa.DataType:
    """Spark SQL type -> the pyarrow type delta-rs writes as the same Delta type."""
    from pyspark.sql import types as T

    if isinstance(t, T.IntegerType):
        return pa.int32()
    if isinstance(t, T.LongType):
        return pa.int64()
    if isinstance(t, T.DoubleType):
        return pa.float64()
    if isinstance(t, T.FloatType):
        return pa.float32()
    if isinstance(t, T.StringType):
        return pa.string()
    if isinstance(t, T.TimestampType):
        # Spark's TimestampType is Delta's `timestamp` (UTC instants); a zone-less pyarrow
        # timestamp would become `timestamp_ntz` instead.
        return pa.timestamp("us", tz="UTC")
    if isinstance(t, T.ArrayType):
        return pa.list_(arrow_type(t.elementType))
    if isinstance(t, T.MapType):
        return pa.map_(arrow_type(t.keyType), arrow_type(t.valueType))
    raise TypeError(f"no pyarrow type for {t}")


def arrow_schema(name: str) -> pa.Schema:
    from movierec_spark.tables import TABLE_SCHEMAS

    return pa.schema([pa.field(f.name, arrow_type(f.dataType), f.nullable) for f in TABLE_SCHEMAS[name].fields])


def write_table(warehouse: Path, name: str, rows: list[dict] | pa.Table, mode: str = "append") -> None:
    data = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=arrow_schema(name))
    write_deltalake(str(Path(warehouse) / name), data.cast(arrow_schema(name)), mode=mode)


def utc(day: int, hour: int = 12) -> dt.datetime:
    return dt.datetime(2024, 5, day, hour, tzinfo=dt.timezone.utc)


MOVIES = [
    (1, "Toy Story (1995)", 1995, ["Adventure", "Animation", "Children"]),
    (2, "Jumanji (1995)", 1995, ["Adventure", "Children", "Fantasy"]),
    (3, "Toy Story 2 (1999)", 1999, ["Adventure", "Animation", "Children"]),
    (29, "City of Lost Children, The (Cité des enfants perdus, La) (1995)", 1995, ["Fantasy", "Sci-Fi"]),
    (293, "Léon: The Professional (a.k.a. The Professional) (Léon) (1994)", 1994, ["Action", "Crime"]),
    (527, "Schindler's List (1993)", 1993, ["Drama", "War"]),
    (1411, "Hamlet (1996)", 1996, ["Crime", "Drama"]),
    (2571, "Matrix, The (1999)", 1999, ["Action", "Sci-Fi", "Thriller"]),
    (3598, "Hamlet (2000)", 2000, ["Crime", "Drama"]),
    (6365, "Matrix Reloaded, The (2003)", 2003, ["Action", "Sci-Fi"]),
    (6934, "Matrix Revolutions, The (2003)", 2003, ["Action", "Sci-Fi"]),
]

# (run_id, started day, status): run-a is the latest succeeded run with recommendations; run-c
# is later but failed; run-d succeeded later still but wrote no recommendations; and "run-c" is
# the largest run_id, which is what a warehouse without a runs table falls back to.
RUNS = [("run-b", 1, "succeeded"), ("run-a", 2, "succeeded"), ("run-c", 3, "failed"), ("run-d", 4, "succeeded")]

RECS = {  # run -> user -> movieIds in rank order
    "run-b": {1: [2571, 1, 3], 2: [527, 1411]},
    "run-a": {1: [6365, 2571, 2], 2: [3, 1], 7: [29]},
    "run-c": {1: [527], 2: [293]},
}


def rec_rows(run: str) -> list[dict]:
    out = []
    for user, movies in RECS[run].items():
        for rank, movie in enumerate(movies, 1):
            out.append({"run_id": run, "userId": user, "rank": rank, "movieId": movie,
                        "score": round(5.0 - rank / 10, 2), "source": "content" if movie == 2 else "hybrid",
                        "because_movieId": 1 if movie == 2 else None})
    return out


def metric_rows(run: str, shift: float = 0.0) -> list[dict]:
    rows = []
    for model, rmse in (("global_mean", 1.04), ("bias_baseline", 0.90), ("als", 0.87), ("hybrid", 0.85)):
        rows.append({"run_id": run, "model": model, "metric": "rmse", "k": None, "value": rmse + shift, "split": "test"})
        rows.append({"run_id": run, "model": model, "metric": "mae", "k": None, "value": rmse * 0.77, "split": "test"})
    for model, base in (("popularity", 0.05), ("als_implicit", 0.12), ("hybrid", 0.15)):
        for k in range(1, 21):
            for metric, v in (("precision", base * (1.5 - k / 40)), ("recall", base * k / 10), ("ndcg", base * 1.2)):
                rows.append({"run_id": run, "model": model, "metric": metric, "k": k, "value": v + shift,
                             "split": "test"})
    return rows


def build_warehouse(root: Path, runs: bool = True, ratings: bool = True) -> Path:
    wh = root / "warehouse"
    write_table(wh, "movies", [{"movieId": m, "title": t, "year": y, "genres": g} for m, t, y, g in MOVIES])
    if ratings:
        counts = {3598: 5, 1411: 2, 2571: 4, 1: 3}
        rows = [{"userId": u, "movieId": m, "rating": float(1 + (u + m) % 9) / 2, "rated_at": utc(1)}
                for m, c in counts.items() for u in range(1, c + 1)]
        write_table(wh, "ratings", rows)
    # Three versions of recommendations: 0 = run-b, 1 = + run-a, 2 = + run-c.
    for run in ("run-b", "run-a", "run-c"):
        write_table(wh, "recommendations", rec_rows(run))
        time.sleep(0.02)  # distinct commit timestamps for --as-of
    write_table(wh, "similar_movies", [
        {"movieId": 2571, "similar_movieId": s, "rank": r, "similarity": v}
        for r, (s, v) in enumerate([(6365, 0.91), (6934, 0.88), (293, 0.42), (1, 0.05)], 1)
    ] + [{"movieId": 3598, "similar_movieId": 1411, "rank": 1, "similarity": 0.97}])
    write_table(wh, "metrics", metric_rows("run-b", 0.1) + metric_rows("run-a"))
    write_table(wh, "feature_importances", [
        {"run_id": "run-a", "feature": f, "importance": v}
        for f, v in (("als_prediction", 0.41), ("UAvg", 0.22), ("MAvg", 0.18), ("sur1", 0.1), ("GAvg", 0.09))
    ])
    if runs:
        write_table(wh, "runs", [
            {"run_id": r, "started_at": utc(d), "finished_at": utc(d, 13) if s != "running" else None, "status": s,
             "input": "data/ml-latest-small", "config": "{}",
             "stage_seconds": [("ingest", 30.0 + d), ("als", 60.5), ("evaluate", 12.25)],
             "error": "boom: executor lost\nat line 2" if s == "failed" else None}
            for r, d, s in RUNS
        ])
    return wh


@pytest.fixture(scope="module")
def wh(tmp_path_factory) -> Path:
    return build_warehouse(tmp_path_factory.mktemp("query"))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def titles(result: query.Result) -> list[str]:
    return [r["title"] for r in result.rows]


# ------------------------------------------------------------------------------------------
# recs


def test_schema_helper_matches_the_contract(wh):
    schema = DeltaTable(str(wh / "runs")).schema().to_arrow()
    assert pa.schema(schema).field("stage_seconds").type == pa.map_(pa.string(), pa.float64())
    rec = pa.schema(DeltaTable(str(wh / "recommendations")).schema().to_arrow())
    assert rec.names == ["run_id", "userId", "rank", "movieId", "score", "source", "because_movieId"]
    assert rec.field("userId").type == pa.int32()


def test_recs_default_run_is_latest_succeeded_with_recommendations(wh):
    r = query.recs(str(wh), 1)
    assert r.meta["run_id"] == "run-a"  # not run-c (failed), not run-d (no recommendations)
    assert [x["rank"] for x in r.rows] == [1, 2, 3]
    assert [x["movieId"] for x in r.rows] == [6365, 2571, 2]
    assert titles(r) == ["Matrix Reloaded, The (2003)", "Matrix, The (1999)", "Jumanji (1995)"]
    assert r.rows[2]["source"] == "content" and r.rows[2]["because_title"] == "Toy Story (1995)"
    assert r.rows[0]["genres"] == ["Action", "Sci-Fi"]
    assert r.rows[0]["score"] == pytest.approx(4.9)
    assert "latest succeeded run" in r.notes[0]


def test_recs_explicit_run_and_top_n(wh):
    r = query.recs(str(wh), 1, run="run-b", n=2)
    assert r.meta["run_id"] == "run-b"
    assert titles(r) == ["Matrix, The (1999)", "Toy Story (1995)"]


def test_recs_without_runs_table_falls_back_to_largest_run_id(tmp_path):
    wh = build_warehouse(tmp_path, runs=False)
    r = query.recs(str(wh), 2)
    assert r.meta["run_id"] == "run-c"
    assert [x["movieId"] for x in r.rows] == [293]
    assert "no runs table" in r.notes[0]


def test_recs_as_of_version_reads_the_older_rows(wh):
    r = query.recs(str(wh), 1, as_of="0")
    # Version 0 holds only run-b: the default rule lands on it.
    assert r.meta["run_id"] == "run-b" and r.meta["table_version"] == 0
    assert [x["movieId"] for x in r.rows] == [2571, 1, 3]
    # User 7 first appears with run-a (version 1).
    with pytest.raises(query.QueryError, match="no user 7 in run run-b"):
        query.recs(str(wh), 7, as_of=0)
    assert [x["movieId"] for x in query.recs(str(wh), 7, as_of=1).rows] == [29]
    with pytest.raises(query.QueryError, match=r"no run 'run-a' in recommendations as of version 0"):
        query.recs(str(wh), 1, run="run-a", as_of=0)


def test_recs_as_of_timestamp(wh):
    hist = {h["version"]: h["timestamp"] for h in DeltaTable(str(wh / "recommendations")).history()}
    at_v1 = dt.datetime.fromtimestamp(hist[1] / 1000, dt.timezone.utc)
    r = query.recs(str(wh), 7, as_of=at_v1.isoformat(timespec="milliseconds").replace("+00:00", "Z"))
    assert r.meta["table_version"] == 1 and r.meta["run_id"] == "run-a"
    with pytest.raises(query.QueryError, match="did not exist yet"):
        query.recs(str(wh), 1, as_of="2001-01-01T00:00:00")
    with pytest.raises(query.QueryError, match="expected a table version"):
        query.recs(str(wh), 1, as_of="yesterday")
    with pytest.raises(query.QueryError, match=r"has versions 0\.\.2"):
        query.recs(str(wh), 1, as_of=9)


def test_recs_cli_table_json_csv(wh, capsys):
    code, out, err = run_cli(capsys, "query", "recs", "--warehouse", wh, "--user", 1)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("# run run-a")
    header = next(i for i, x in enumerate(lines) if x.startswith("rank"))
    assert "Matrix Reloaded, The (2003)" in lines[header + 2] and "Matrix, The (1999)" in lines[header + 3]
    assert lines[header + 2].split()[0] == "1"

    code, out, _ = run_cli(capsys, "query", "recs", "--warehouse", wh, "--user", 1, "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["run_id"] == "run-a" and doc["user"] == 1
    assert [r["movieId"] for r in doc["rows"]] == [6365, 2571, 2]
    assert doc["rows"][1]["title"] == "Matrix, The (1999)" and doc["rows"][0]["because_movieId"] is None

    code, out, err = run_cli(capsys, "query", "recs", "--warehouse", wh, "--user", 2, "--format", "csv",
                             "--run", "run-b")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["title"] for r in rows] == ["Schindler's List (1993)", "Hamlet (1996)"]
    assert rows[0]["rank"] == "1" and float(rows[0]["score"]) == pytest.approx(4.9)
    assert "run run-b" in err  # notes go to stderr with csv, keeping stdout parseable


def test_unknown_user_run_and_missing_warehouse_are_one_line_errors(wh, tmp_path, capsys):
    code, out, err = run_cli(capsys, "query", "recs", "--warehouse", wh, "--user", 999999)
    assert code == cli.EXIT_FAILED and out == ""
    assert err.strip() == "movierec: error: no user 999999 in run run-a's recommendations (userIds 1..7, 3 users)"

    code, _, err = run_cli(capsys, "query", "recs", "--warehouse", wh, "--user", 1, "--run", "nope")
    assert code == cli.EXIT_FAILED
    assert "no run 'nope' in recommendations (runs there: run-a, run-b, run-c)" in err
    assert len(err.strip().splitlines()) == 1

    code, _, err = run_cli(capsys, "query", "recs", "--warehouse", tmp_path / "nowhere", "--user", 1)
    assert code == cli.EXIT_USAGE and "warehouse" in err and "does not exist" in err
    assert len(err.strip().splitlines()) == 1

    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "query", "similar", "--warehouse", tmp_path / "empty", "--movie", 1)
    assert code == cli.EXIT_FAILED and "no movies table in warehouse" in err and "run the pipeline" in err


def test_errors_in_a_separate_process_have_no_traceback_and_no_pyspark(wh, tmp_path):
    cases = [
        (["recs", "--warehouse", wh, "--user", "999999"], 1, "no user 999999"),
        (["recs", "--warehouse", wh, "--user", "1", "--run", "nope"], 1, "no run 'nope'"),
        (["recs", "--warehouse", tmp_path / "missing", "--user", "1"], 2, "does not exist"),
        (["similar", "--warehouse", wh, "--title", "no such film"], 1, "no movie title matches"),
        (["similar", "--warehouse", wh, "--movie", "424242"], 1, "no movie 424242"),
        (["metrics", "--warehouse", wh, "--run", "nope"], 1, "no run 'nope' in metrics"),
        (["recs", "--warehouse", wh, "--user", "1", "--as-of", "soon"], 2, "--as-of 'soon'"),
    ]
    for argv, code, msg in cases:
        p = subprocess.run([sys.executable, "-m", "movierec_spark.cli", "query", *map(str, argv)],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert p.returncode == code, (argv, p.stderr)
        assert msg in p.stderr and "Traceback" not in p.stderr, (argv, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    # The whole query path stays clear of Spark, and of pandas (0.2 s of start-up).
    probe = ("import sys; from movierec_spark import cli; rc = cli.main(['query', 'recs', '--warehouse', "
             f"{str(wh)!r}, '--user', '1', '--format', 'json']); "
             "sys.exit(rc or ('pyspark' in sys.modules) * 3 or ('pandas' in sys.modules) * 4)")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["rows"][0]["movieId"] == 6365


# ------------------------------------------------------------------------------------------
# similar


@pytest.mark.parametrize("text, movie_id, tier", [
    ("Toy Story", 1, "exact"),                      # not Toy Story 2: exact beats prefix
    ("toy story (1995)", 1, "exact"),
    ("TOY STORY 2", 3, "exact"),
    ("matrix", 2571, "exact"),                      # "Matrix, The (1999)"
    ("The Matrix", 2571, "exact"),
    ("the matrix!", 2571, "exact"),
    ("Matrix Rev", 6934, "prefix"),
    ("schindlers list", 527, "exact"),              # apostrophe ignored
    ("city of lost children", 29, "exact"),         # alternative title in parentheses ignored
    ("leon the professional", 293, "exact"),        # accents and colon ignored
    ("lost child", 29, "substring"),
    ("hamlet (1996)", 1411, "exact"),               # the year picks among equals
])
def test_forgiving_title_match(wh, text, movie_id, tier):
    movies = DeltaTable(str(wh / "movies")).to_pyarrow_table()
    ids, got_tier = query.match_title(movies, text)
    assert got_tier == tier
    assert ids == [movie_id]


def test_similar_by_title_returns_neighbours_with_titles(wh):
    r = query.similar(str(wh), title="matrix")
    assert r.meta["movieId"] == 2571 and r.meta["match"] == "exact"
    assert [x["movieId"] for x in r.rows] == [6365, 6934, 293, 1]
    assert titles(r)[:2] == ["Matrix Reloaded, The (2003)", "Matrix Revolutions, The (2003)"]
    assert [x["similarity"] for x in r.rows][:2] == [0.91, 0.88]
    assert "'matrix' matched Matrix, The (1999) [movieId 2571] (exact match)" in r.notes[0]
    assert [x["movieId"] for x in query.similar(str(wh), movie=2571, k=2).rows] == [6365, 6934]


def test_ambiguous_title_picks_the_most_rated_and_says_so(wh):
    r = query.similar(str(wh), title="Hamlet")
    # Hamlet (2000) has 5 ratings, Hamlet (1996) 2: the higher movieId wins on ratings.
    assert r.meta["movieId"] == 3598 and r.meta["candidates"] == 2
    assert "chose Hamlet (2000) [movieId 3598], the most rated (5 ratings)" in r.notes[0]
    assert "Hamlet (1996) [movieId 1411] 2 ratings" in r.notes[0]
    assert titles(r) == ["Hamlet (1996)"]


def test_ambiguous_title_without_ratings_picks_lowest_movie_id(tmp_path):
    wh = build_warehouse(tmp_path, ratings=False)
    r = query.similar(str(wh), title="hamlet")
    assert r.meta["movieId"] == 1411 and "lowest movieId" in r.notes[0]
    assert r.rows == []
    assert "has no neighbours" in r.notes[-1]


def test_similar_cli_formats(wh, capsys):
    code, out, _ = run_cli(capsys, "query", "similar", "--warehouse", wh, "--title", "Toy Story", "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["movieId"] == 1 and doc["title"] == "Toy Story (1995)" and doc["rows"] == []
    code, out, _ = run_cli(capsys, "query", "similar", "--warehouse", wh, "--movie", 2571, "--format", "csv", "-n", 3)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [int(r["movieId"]) for r in rows] == [6365, 6934, 293]
    assert rows[0]["genres"] == "Action|Sci-Fi"
    code, out, _ = run_cli(capsys, "query", "similar", "--warehouse", wh, "--title", "the matrix")
    assert code == 0 and "# 'the matrix' matched Matrix, The (1999)" in out and "0.9100" in out


# ------------------------------------------------------------------------------------------
# metrics and runs


def test_metrics_model_comparison(wh):
    r = query.metrics(str(wh))
    assert r.meta["run_id"] == "run-a" and r.meta["k"] == 10  # run-b is older; run-c/d have no metrics
    assert r.columns[:3] == ["model", "rmse", "mae"]
    assert {"precision@10", "recall@10", "ndcg@10"} <= set(r.columns)
    assert "precision@5" not in r.columns
    by_model = {x["model"]: x for x in r.rows}
    assert [x["model"] for x in r.rows] == ["global_mean", "bias_baseline", "popularity", "als", "als_implicit",
                                            "hybrid"]
    assert by_model["als"]["rmse"] == pytest.approx(0.87)
    assert by_model["als"]["precision@10"] is None
    assert by_model["hybrid"]["precision@10"] == pytest.approx(0.15 * 1.25)
    assert query.metrics(str(wh), run="run-b").rows[3]["rmse"] == pytest.approx(0.97)
    assert "precision@20" in query.metrics(str(wh), k="all").columns
    with pytest.raises(query.QueryError, match="has ranking metrics at k = 1, 2"):
        query.metrics(str(wh), k=50)


def test_metrics_and_runs_cli(wh, capsys):
    code, out, _ = run_cli(capsys, "query", "metrics", "--warehouse", wh, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and rows[0]["model"] == "global_mean" and float(rows[0]["rmse"]) == pytest.approx(1.04)
    assert rows[0]["precision@10"] == ""

    code, out, _ = run_cli(capsys, "query", "runs", "--warehouse", wh, "--format", "json")
    doc = json.loads(out)
    assert code == 0 and [r["run_id"] for r in doc["rows"]] == ["run-b", "run-a", "run-c", "run-d"]
    first = doc["rows"][0]
    assert first["status"] == "succeeded" and first["seconds"] == 3600.0
    assert first["started_at"] == "2024-05-01T12:00:00Z"
    assert first["stage_seconds"] == {"ingest": 31.0, "als": 60.5, "evaluate": 12.25}

    code, out, _ = run_cli(capsys, "query", "runs", "--warehouse", wh)
    failed = next(x for x in out.splitlines() if x.startswith("run-c"))
    assert "failed" in failed and "ingest=33.00 als=60.50 evaluate=12.25" in failed
    assert "boom: executor lost" in failed and "at line 2" not in out


def test_runs_without_runs_table(tmp_path, capsys):
    wh = build_warehouse(tmp_path, runs=False)
    code, _, err = run_cli(capsys, "query", "runs", "--warehouse", wh)
    assert code == cli.EXIT_FAILED and "no runs table in warehouse" in err


def test_sql_filters_are_quoted_and_pushed_down(wh):
    t = DeltaTable(str(wh / "recommendations"))
    got = query.scan(t, ["userId", "rank", "movieId"], [("run_id", "=", "run-a"), ("userId", "in", [1, 7])],
                     order_by=["userId", "rank"])
    assert got.to_pylist() == [{"userId": 1, "rank": 1, "movieId": 6365}, {"userId": 1, "rank": 2, "movieId": 2571},
                               {"userId": 1, "rank": 3, "movieId": 2}, {"userId": 7, "rank": 1, "movieId": 29}]
    assert got.schema.field("userId").type == pa.int32()
    # Strings come back as the contract's plain types, not DataFusion's views.
    assert query.scan(t, ["run_id"], limit=1).schema.field("run_id").type == pa.string()
    assert query.scan(DeltaTable(str(wh / "movies")), ["genres"], limit=1).schema.field("genres").type == \
        pa.list_(pa.field("element", pa.string()))
    for hostile in ("it's", "a' OR '1'='1", 'x"y', "back\\slash'"):
        assert query.scan(t, ["run_id"], [("run_id", "=", hostile)]).num_rows == 0
    assert query.scan(t, None, [("userId", "in", [])]).num_rows == 0
    with pytest.raises(TypeError):
        query.where_sql([("userId", "=", object())])


def test_rows_of_keeps_timestamps_in_utc(wh):
    rows = query.rows_of(query.scan(DeltaTable(str(wh / "runs")), ["run_id", "started_at"], order_by=["started_at"]))
    assert rows[0] == {"run_id": "run-b", "started_at": utc(1)}
    assert rows[0]["started_at"].tzinfo is not None
