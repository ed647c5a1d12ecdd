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
from deltalake import DeltaTable, Field, write_deltalake

from movierec_spark import cli, query

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------
# Helpers shared with test_report.py and benchmarks/query_benchmark.py


LEGACY_MISSING = {
    "runs": ["kind"],
    "recommendations": ["predicted_rating"],
    "similar_movies": ["run_id"],
    "rating_splits": ["run_id"],
    "features": ["run_id"],
}


def arrow_schema(name: str, legacy: bool = False) -> pa.Schema:
    """The contract's schema of `name`; `legacy`: as written before serve/evaluate runs."""
    from movierec_spark.tables import arrow_schema as contract

    drop = set(LEGACY_MISSING.get(name, [])) if legacy else set()
    full = contract(name)
    return pa.schema([f for f in full if f.name not in drop])


def write_table(warehouse: Path, name: str, rows: list[dict] | pa.Table, mode: str = "append",
                legacy: bool = False) -> None:
    schema = arrow_schema(name, legacy)
    data = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    write_deltalake(str(Path(warehouse) / name), data.cast(schema), mode=mode)


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

# (run_id, started day, status, kind): run-a is the latest succeeded run with recommendations;
# run-c is later but failed; run-d (an evaluate run) succeeded later still and wrote no
# recommendations; and "run-c" is the largest run_id, which is what a warehouse without a runs
# table falls back to.
RUNS = [("run-b", 1, "succeeded", "serve"), ("run-a", 2, "succeeded", "serve"), ("run-c", 3, "failed", "serve"),
        ("run-d", 4, "succeeded", "evaluate")]

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
                        "because_movieId": 1 if movie == 2 else None,
                        "predicted_rating": round(4.5 - rank / 4, 2)})
    return out


def run_row(run: str, day: int, status: str = "succeeded", kind: str | None = "serve",
            finished: dt.datetime | None = None) -> dict:
    return {"run_id": run, "started_at": utc(day), "status": status, "kind": kind,
            "finished_at": finished if finished is not None else utc(day, 13) if status != "running" else None,
            "input": "data/ml-latest-small", "config": "{}",
            "stage_seconds": [("ingest", 30.0 + day), ("als", 60.5), ("evaluate", 12.25)],
            "error": "boom: executor lost\nat line 2" if status == "failed" else None}


def latest_rows(**pointers: str) -> list[dict]:
    """`latest` rows: table name -> run id."""
    return [{"table_name": t, "run_id": r, "table_version": 0, "updated_at": utc(28)} for t, r in pointers.items()]


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


def build_warehouse(root: Path, runs: bool = True, ratings: bool = True, legacy: bool = False) -> Path:
    """The shared small warehouse; `legacy`: tables as written before serve/evaluate runs (no
    runs.kind, recommendations.predicted_rating or similar_movies.run_id)."""
    wh = root / "warehouse"
    write_table(wh, "movies", [{"movieId": m, "title": t, "year": y, "genres": g} for m, t, y, g in MOVIES])
    if ratings:
        counts = {3598: 5, 1411: 2, 2571: 4, 1: 3}
        rows = [{"userId": u, "movieId": m, "rating": float(1 + (u + m) % 9) / 2, "rated_at": utc(1)}
                for m, c in counts.items() for u in range(1, c + 1)]
        write_table(wh, "ratings", rows)
    # Three versions of recommendations: 0 = run-b, 1 = + run-a, 2 = + run-c.
    for run in ("run-b", "run-a", "run-c"):
        write_table(wh, "recommendations", rec_rows(run), legacy=legacy)
        time.sleep(0.02)  # distinct commit timestamps for --as-of
    write_table(wh, "similar_movies", similar_rows("run-a"), legacy=legacy)
    write_table(wh, "metrics", metric_rows("run-b", 0.1) + metric_rows("run-a"))
    write_table(wh, "feature_importances", [
        {"run_id": "run-a", "feature": f, "importance": v}
        for f, v in (("als_prediction", 0.41), ("UAvg", 0.22), ("MAvg", 0.18), ("sur1", 0.1), ("GAvg", 0.09))
    ])
    if runs:
        write_table(wh, "runs", [run_row(r, d, s, k) for r, d, s, k in RUNS], legacy=legacy)
    return wh


def similar_rows(run: str, neighbours=((6365, 0.91), (6934, 0.88), (293, 0.42), (1, 0.05))) -> list[dict]:
    return [{"run_id": run, "movieId": 2571, "similar_movieId": s, "rank": r, "similarity": v}
            for r, (s, v) in enumerate(neighbours, 1)] + \
        [{"run_id": run, "movieId": 3598, "similar_movieId": 1411, "rank": 1, "similarity": 0.97}]


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
    assert pa.schema(schema).field("kind").type == pa.string()
    rec = pa.schema(DeltaTable(str(wh / "recommendations")).schema().to_arrow())
    assert rec.names[:6] == ["run_id", "userId", "rank", "movieId", "score", "source"]
    assert set(rec.names) == {"run_id", "userId", "rank", "movieId", "score", "source", "because_movieId",
                              "predicted_rating"}
    assert rec.field("userId").type == pa.int32() and rec.field("predicted_rating").type == pa.float64()
    sim = pa.schema(DeltaTable(str(wh / "similar_movies")).schema().to_arrow())
    assert "run_id" in sim.names
    assert "predicted_rating" not in arrow_schema("recommendations", legacy=True).names


def test_recs_default_run_is_latest_succeeded_with_recommendations(wh):
    r = query.recs(str(wh), 1)
    assert r.meta["run_id"] == "run-a"  # not run-c (failed), not run-d (no recommendations)
    assert [x["rank"] for x in r.rows] == [1, 2, 3]
    assert [x["movieId"] for x in r.rows] == [6365, 2571, 2]
    assert titles(r) == ["Matrix Reloaded, The (2003)", "Matrix, The (1999)", "Jumanji (1995)"]
    assert r.rows[2]["source"] == "content" and r.rows[2]["because_title"] == "Toy Story (1995)"
    assert r.rows[0]["genres"] == ["Action", "Sci-Fi"]
    assert r.rows[0]["score"] == pytest.approx(4.9)
    assert "latest succeeded run" in r.notes[0] and "(newer evaluate runs skipped)" in r.notes[0]  # run-d


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


# ------------------------------------------------------------------------------------------
# serve and evaluate runs


def kinds_warehouse(root: Path, runs: list[dict], recs: dict[str, dict[int, list[int]]] | None = None,
                    latest: dict[str, str] | None = None) -> Path:
    """movies, runs, recommendations (run -> user -> movieIds) and optionally `latest`."""
    wh = root / "warehouse"
    write_table(wh, "movies", [{"movieId": m, "title": t, "year": y, "genres": g} for m, t, y, g in MOVIES])
    write_table(wh, "runs", runs)
    rows = []
    for run, users in (recs or {}).items():
        for user, movies in users.items():
            rows += [{"run_id": run, "userId": user, "rank": i, "movieId": m, "score": 1.0 / i, "source": "hybrid",
                      "because_movieId": None, "predicted_rating": 4.0} for i, m in enumerate(movies, 1)]
    if rows:
        write_table(wh, "recommendations", rows)
    if latest:
        write_table(wh, "latest", latest_rows(**latest))
    return wh


def test_recs_never_answers_from_an_evaluate_run(tmp_path):
    # The evaluate run is the newest succeeded run and (against the contract, say from a buggy
    # writer) even has rows in recommendations: the serve run still answers.
    runs = [run_row("legacy", 1, kind=None), run_row("serve-1", 2), run_row("eval-1", 3, kind="evaluate")]
    recs = {"legacy": {1: [1]}, "serve-1": {1: [2571, 6365]}, "eval-1": {1: [527]}}
    wh = kinds_warehouse(tmp_path / "a", runs, recs)
    r = query.recs(str(wh), 1)
    assert r.meta["run_id"] == "serve-1" and [x["movieId"] for x in r.rows] == [2571, 6365]
    assert "latest succeeded run with recommendations (newer evaluate runs skipped)" in r.notes[0]
    # With the `latest` pointer the pointed serve run answers, whatever is newer.
    wh = kinds_warehouse(tmp_path / "b", runs, recs, latest={"recommendations": "serve-1"})
    r = query.recs(str(wh), 1)
    assert r.meta["run_id"] == "serve-1" and "table `latest`" in r.notes[0]
    # A run with no kind (written before serve/evaluate runs) counts as serve; evaluate still not.
    wh = kinds_warehouse(tmp_path / "c", [runs[0], runs[2]], {"legacy": recs["legacy"], "eval-1": recs["eval-1"]})
    r = query.recs(str(wh), 1)
    assert r.meta["run_id"] == "legacy" and [x["movieId"] for x in r.rows] == [1]
    # --run still reads an evaluate run's rows when asked by name.
    assert [x["movieId"] for x in query.recs(str(wh), 1, run="eval-1").rows] == [527]
    # Only evaluate rows: say so rather than serve them.
    wh = kinds_warehouse(tmp_path / "d", [runs[2]], {"eval-1": recs["eval-1"]})
    with pytest.raises(query.QueryError, match=r"rows of evaluate runs only \(eval-1\).*serve run"):
        query.recs(str(wh), 1)


def test_recs_shows_predicted_rating(wh, tmp_path, capsys):
    r = query.recs(str(wh), 1)
    assert r.columns[4:6] == ["score", "predicted_rating"]
    assert [x["predicted_rating"] for x in r.rows] == [4.25, 4.0, 3.75]
    code, out, _ = run_cli(capsys, "query", "recs", "--warehouse", wh, "--user", 1, "--format", "json")
    assert code == 0 and [x["predicted_rating"] for x in json.loads(out)["rows"]] == [4.25, 4.0, 3.75]
    code, out, _ = run_cli(capsys, "query", "recs", "--warehouse", wh, "--user", 1)
    header = next(x for x in out.splitlines() if x.startswith("rank"))
    assert header.split()[4:6] == ["score", "predicted_rating"]
    assert "4.2500" in out
    # A table written before the column existed: the column is there, empty.
    old = build_warehouse(tmp_path, legacy=True)
    r = query.recs(str(old), 1)
    assert r.meta["run_id"] == "run-a" and "predicted_rating" in r.columns
    assert [x["predicted_rating"] for x in r.rows] == [None, None, None]
    assert [x["score"] for x in r.rows] == [4.9, 4.8, 4.7]


def two_runs_of_similar(root: Path, latest: dict[str, str] | None = None, legacy_rows: bool = False) -> Path:
    """similar_movies rows of an older serve run, a newer serve run and a newest evaluate run."""
    wh = root / "warehouse"
    write_table(wh, "movies", [{"movieId": m, "title": t, "year": y, "genres": g} for m, t, y, g in MOVIES])
    write_table(wh, "runs", [run_row("old", 1), run_row("new", 2), run_row("eval", 3, kind="evaluate"),
                             run_row("broken", 4, status="failed")])
    if legacy_rows:  # rows from before the column existed read as null run_id
        write_table(wh, "similar_movies", pa.Table.from_pylist(
            [{"movieId": 2571, "similar_movieId": 3, "rank": 1, "similarity": 0.5}],
            schema=arrow_schema("similar_movies", legacy=True)), legacy=True)
        DeltaTable(str(wh / "similar_movies")).alter.add_columns(
            [Field("run_id", "string", nullable=True)])
    write_table(wh, "similar_movies", similar_rows("old", [(6934, 0.8), (1, 0.2)]))
    write_table(wh, "similar_movies", similar_rows("new", [(6365, 0.91), (293, 0.42)]))
    write_table(wh, "similar_movies", similar_rows("eval", [(527, 0.99)]))
    write_table(wh, "similar_movies", similar_rows("broken", [(29, 0.99)]))
    if legacy_rows:
        assert DeltaTable(str(wh / "similar_movies")).to_pyarrow_table().column("run_id").null_count == 1
    if latest:
        write_table(wh, "latest", latest_rows(**latest))
    return wh


def test_similar_reads_only_the_pointed_runs_rows(tmp_path, capsys):
    wh = two_runs_of_similar(tmp_path / "a", latest={"similar_movies": "old", "recommendations": "old"})
    r = query.similar(str(wh), movie=2571)
    assert [x["movieId"] for x in r.rows] == [6934, 1] and [x["rank"] for x in r.rows] == [1, 2]
    assert r.meta["run_id"] == "old"
    assert "neighbours from run old: the current similar_movies (table `latest`)" in r.notes
    code, out, _ = run_cli(capsys, "query", "similar", "--warehouse", wh, "--title", "matrix")
    assert code == 0 and "# neighbours from run old" in out and "Matrix Revolutions" in out
    assert "Reloaded" not in out
    # No pointer: the newest succeeded serve run present (not the newer evaluate or failed run).
    wh = two_runs_of_similar(tmp_path / "b")
    r = query.similar(str(wh), movie=2571)
    assert r.meta["run_id"] == "new" and [x["movieId"] for x in r.rows] == [6365, 293]
    assert "neighbours from run new: the latest succeeded serve run with similar_movies" in r.notes
    # A pointer to a run with no rows there: the same fallback, and the note says so.
    wh = two_runs_of_similar(tmp_path / "d", latest={"similar_movies": "gone"})
    r = query.similar(str(wh), movie=2571)
    assert r.meta["run_id"] == "new" and "(table `latest` names run gone, which has no rows there)" in r.notes[-1]
    # Rows written before the column existed (null run_id) are not mixed in either.
    wh = two_runs_of_similar(tmp_path / "c", legacy_rows=True)
    assert [x["movieId"] for x in query.similar(str(wh), movie=2571).rows] == [6365, 293]


def test_similar_on_a_legacy_table_reads_every_row(tmp_path):
    wh = build_warehouse(tmp_path, legacy=True)
    r = query.similar(str(wh), movie=2571)
    assert [x["movieId"] for x in r.rows] == [6365, 6934, 293, 1]
    assert r.meta["run_id"] is None and not any("neighbours from run" in n for n in r.notes)


def validation_rows(run: str) -> list[dict]:
    """A serve run's metrics: the hybrid's validation RMSE/MAE and ranking metrics only."""
    rows = [{"run_id": run, "model": "hybrid", "metric": m, "k": None, "value": v, "split": "validation"}
            for m, v in (("rmse", 0.81), ("mae", 0.62))]
    rows += [{"run_id": run, "model": "hybrid", "metric": m, "k": k, "value": v * k / 10, "split": "validation"}
             for k in (5, 10) for m, v in (("precision", 0.3), ("ndcg", 0.4))]
    return rows


def test_metrics_default_to_validation_for_a_serve_run_and_say_so(tmp_path, capsys):
    wh = tmp_path / "warehouse"
    write_table(wh, "runs", [run_row("eval-1", 1, kind="evaluate"), run_row("serve-1", 2)])
    write_table(wh, "metrics", metric_rows("eval-1") + validation_rows("eval-1") + validation_rows("serve-1"))
    r = query.metrics(str(wh))
    assert r.meta["run_id"] == "serve-1" and r.meta["split"] == "validation"
    assert r.columns == ["model", "rmse", "mae", "precision@10", "ndcg@10"]
    assert r.rows == [{"model": "hybrid", "rmse": 0.81, "mae": 0.62, "precision@10": 0.3, "ndcg@10": 0.4}]
    assert any(n.startswith("VALIDATION figures, not test figures: run serve-1's metrics on rows it held out "
                            "of training within the run") and "not on a held-out test part" in n for n in r.notes)
    assert "run eval-1 has test figures: --run eval-1" in r.notes
    code, out, _ = run_cli(capsys, "query", "metrics", "--warehouse", wh)
    assert code == 0 and "# VALIDATION figures, not test figures" in out and "0.8100" in out
    code, out, _ = run_cli(capsys, "query", "metrics", "--warehouse", wh, "--format", "json")
    doc = json.loads(out)
    assert doc["split"] == "validation" and any("VALIDATION" in n for n in doc["notes"])
    # An evaluate run: test figures by default, its validation figures on request, labelled.
    r = query.metrics(str(wh), run="eval-1")
    assert r.meta["split"] == "test" and r.rows[0]["model"] == "global_mean"
    assert any("also has validation figures" in n for n in r.notes)
    assert not any("VALIDATION" in n for n in r.notes)
    r = query.metrics(str(wh), run="eval-1", split="validation")
    assert r.meta["split"] == "validation" and [x["model"] for x in r.rows] == ["hybrid"]
    assert r.rows[0]["rmse"] == 0.81 and any("VALIDATION figures" in n for n in r.notes)
    code, out, _ = run_cli(capsys, "query", "metrics", "--warehouse", wh, "--run", "eval-1", "--split", "validation",
                           "--format", "csv")
    assert code == 0 and list(csv.DictReader(io.StringIO(out)))[0]["rmse"] == "0.81"
    with pytest.raises(query.QueryError, match="run serve-1 has metrics for validation"):
        query.metrics(str(wh), split="test")


def test_runs_show_their_kind(wh, tmp_path, capsys):
    r = query.runs(str(wh))
    assert r.columns[:3] == ["run_id", "kind", "status"]
    assert [(x["run_id"], x["kind"]) for x in r.rows] == [("run-b", "serve"), ("run-a", "serve"), ("run-c", "serve"),
                                                         ("run-d", "evaluate")]
    assert r.notes == []
    code, out, _ = run_cli(capsys, "query", "runs", "--warehouse", wh)
    assert next(x for x in out.splitlines() if x.startswith("run-d")).split()[1:3] == ["evaluate", "succeeded"]
    old = query.runs(str(build_warehouse(tmp_path, legacy=True)))
    assert [x["kind"] for x in old.rows] == [None] * 4
    assert "predates serve/evaluate runs" in old.notes[0]
