"""Answers from the output Delta tables without a JVM: `movierec query recs|similar|metrics|runs`.

Reads through delta-rs (`deltalake`) and pyarrow only, and never imports pyspark. Each read is a
SQL query on delta-rs's embedded DataFusion engine (`run_sql`): the filters are pushed down to
prune files by their Delta min/max statistics and row groups and pages by their Parquet
statistics; deletion vectors and time travel are applied by delta-rs. `recs` also stays clear of
pandas, which pyarrow's dataset and scalar APIs import (0.2 s of start-up): a whole `movierec
query recs` process answers in about a third of a second.

`recs` is the one place for the latest recommendations: without `--run` it answers from the run
the `latest` table points at (the last succeeded serve run); without that pointer, from the
latest serve run (by `runs.started_at`; a run with no `kind` predates serve/evaluate runs and
counts as serve) that succeeded and has rows in `recommendations` - never an evaluate run; with
no `runs` table, from the largest run_id present. `--as-of` reads the recommendations table as of
a Delta version (an int) or a timestamp (ISO 8601, UTC when no offset is given): time travel.

`similar` reads one run's rows of `similar_movies` (the `latest` pointer's run, else the newest
succeeded run present); `metrics` shows a run's test figures when it has them, else its
validation figures, labelled as such: rows held out of training within the run, not a test part.

Every user-fixable problem (missing warehouse or table, unknown user, run, movie or title) is a
`QueryError`: one line saying what was wrong and what to do, with an exit code for the CLI.
"""

from __future__ import annotations

import array
import csv
import datetime as dt
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

EXIT_USAGE = 2
EXIT_FAILED = 1

FORMATS = ("table", "json", "csv")

# Orders for the model comparison; names not listed follow alphabetically.
MODEL_ORDER = ("global_mean", "bias_baseline", "popularity", "als", "als_implicit", "content", "hybrid")
RATING_METRICS = ("rmse", "mae", "mape", "r2")
RANKING_METRICS = ("precision", "recall", "ndcg", "map", "hit_rate", "mrr", "coverage", "novelty", "diversity")

# Which stage writes each table, for "run X first" hints.
_WRITER = {
    "recommendations": "the recommend stage",
    "movies": "ingest",
    "ratings": "ingest",
    "similar_movies": "the content stage",
    "metrics": "the evaluate stage",
    "runs": "any pipeline run",
    "feature_importances": "the hybrid stage",
}


class QueryError(Exception):
    """A problem the user can fix; `str(e)` is the whole one-line message."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Result:
    """A query's answer: rows (dicts in `columns` order), facts about it, and notes for people."""

    query: str
    columns: list[str]
    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Opening and scanning tables


def _is_uri(path: str) -> bool:
    return "://" in str(path)


def table_path(warehouse: str, name: str) -> str:
    w = str(warehouse)
    return f"{w.rstrip('/')}/{name}" if _is_uri(w) else os.path.join(w, name)


def check_warehouse(warehouse: str) -> None:
    if not warehouse:
        raise QueryError("no warehouse given: pass --warehouse DIR (the directory `movierec run` wrote)",
                         EXIT_USAGE)
    if not _is_uri(warehouse) and not os.path.isdir(warehouse):
        raise QueryError(f"warehouse {warehouse} does not exist: pass --warehouse DIR, the directory "
                         "`movierec run` wrote (default ./warehouse)", EXIT_USAGE)


def table_exists(warehouse: str, name: str) -> bool:
    path = table_path(warehouse, name)
    if not _is_uri(path):
        return os.path.isdir(os.path.join(path, "_delta_log"))
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(path)


def open_table(warehouse: str, name: str, as_of: int | dt.datetime | None = None):
    """The DeltaTable `<warehouse>/<name>` (optionally time-travelled); QueryError when missing."""
    from deltalake import DeltaTable

    check_warehouse(warehouse)
    path = table_path(warehouse, name)
    if not table_exists(warehouse, name):
        raise QueryError(f"no {name} table in warehouse {warehouse} (looked for {path}): "
                         f"run the pipeline ({_WRITER.get(name, 'movierec run')}) first")
    try:
        table = DeltaTable(path)
    except Exception as e:  # delta-rs raises its own errors for corrupt or unreadable logs
        raise QueryError(f"cannot read table {name} at {path}: {_first_line(e)}") from None
    if as_of is not None:
        _time_travel(table, name, as_of)
    return table


def _time_travel(table, name: str, as_of: int | dt.datetime) -> None:
    latest = table.version()
    if isinstance(as_of, int):
        if as_of < 0 or as_of > latest:
            raise QueryError(f"--as-of {as_of}: table {name} has versions 0..{latest}", EXIT_USAGE)
        try:
            table.load_as_version(as_of)
        except Exception as e:
            raise QueryError(f"--as-of {as_of}: version {as_of} of {name} cannot be read "
                             f"({_first_line(e)}); its log may have been cleaned up") from None
        return
    # delta-rs quietly answers the oldest version for a timestamp before the table existed.
    history = table.history()
    first = min((h["timestamp"] for h in history if "timestamp" in h), default=None)
    if first is not None and as_of.timestamp() * 1000 < first:
        created = dt.datetime.fromtimestamp(first / 1000, dt.timezone.utc)
        raise QueryError(f"--as-of {_iso(as_of)}: table {name} did not exist yet (its oldest "
                         f"readable version is from {_iso(created)})", EXIT_USAGE)
    try:
        table.load_as_version(as_of)
    except Exception as e:
        raise QueryError(f"--as-of {_iso(as_of)}: {_first_line(e)}") from None


def parse_as_of(text: str | int | None) -> int | dt.datetime | None:
    """A Delta version (int) or an ISO 8601 timestamp (UTC if it has no offset)."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip()
    if re.fullmatch(r"\d+", s):
        return int(s)
    try:
        ts = dt.datetime.fromisoformat(s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s)
    except ValueError:
        raise QueryError(f"--as-of {text!r}: expected a table version (e.g. 3) or an ISO timestamp "
                         "(e.g. 2024-05-01T12:00:00Z)", EXIT_USAGE) from None
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


Where = Sequence[tuple[str, str, Any]]


def run_sql(table, sql: str) -> pa.Table:
    """Run `sql` over `table` (registered as `t`) with delta-rs's DataFusion engine.

    DataFusion prunes files by their Delta statistics and row groups and pages by their Parquet
    statistics, applies deletion vectors, and reads the version the DeltaTable was loaded at.
    The answer comes back in the contract's plain Arrow types (no string_view).
    """
    from deltalake import QueryBuilder

    reader = QueryBuilder().register("t", table).execute(sql)
    # from_stream, not pa.table(): the latter probes for pandas and importing it costs 0.2 s.
    got = pa.RecordBatchReader.from_stream(reader).read_all()
    return got.cast(pa.schema([f.with_type(_plain(f.type)) for f in got.schema]))


def _plain(t: pa.DataType) -> pa.DataType:
    if t == pa.string_view():
        return pa.string()
    if t == pa.binary_view():
        return pa.binary()
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return pa.list_(t.value_field.with_type(_plain(t.value_type)))
    if pa.types.is_map(t):
        return pa.map_(t.key_field.with_type(_plain(t.key_type)), t.item_field.with_type(_plain(t.item_type)))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_plain(f.type)) for f in t])
    return t


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(v: Any) -> str:
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"unsupported filter value {v!r}")
    return repr(v)


def where_sql(where: Where) -> str:
    """` WHERE a = 1 AND b IN (2, 3)` from (column, '=' | 'in', value) triples ('' for none)."""
    conds = []
    for col, op, value in where:
        if op == "in":
            values = list(value)
            conds.append(f"{_ident(col)} IN ({', '.join(_lit(v) for v in values)})" if values else "FALSE")
        elif op == "=":
            conds.append(f"{_ident(col)} = {_lit(value)}")
        else:
            raise ValueError(f"unsupported filter operator {op!r}")
    return f" WHERE {' AND '.join(conds)}" if conds else ""


def scan(table, columns: Sequence[str] | None = None, where: Where = (), order_by: Sequence[str] = (),
         limit: int | None = None) -> pa.Table:
    """Rows of `table` matching every (column, '=' | 'in', value) in `where`."""
    cols = ", ".join(_ident(c) for c in columns) if columns else "*"
    sql = f"SELECT {cols} FROM t{where_sql(where)}"
    if order_by:
        sql += " ORDER BY " + ", ".join(_ident(c) for c in order_by)
    if limit is not None:
        sql += f" LIMIT {max(int(limit), 0)}"
    return run_sql(table, sql)


def rows_of(t: pa.Table) -> list[dict]:
    """`t.to_pylist()`, with zoned timestamps as aware UTC datetimes.

    pyarrow converts zoned timestamps through its pandas shim (importing pandas: 0.2 s), so
    they are read as naive UTC and given the zone here.
    """
    zoned = [f.name for f in t.schema if pa.types.is_timestamp(f.type) and f.type.tz]
    for name in zoned:
        i = t.schema.get_field_index(name)
        t = t.set_column(i, name, t.column(name).cast(pa.timestamp(t.schema.field(name).type.unit)))
    rows = t.to_pylist()
    for r in rows:
        for name in zoned:
            if r[name] is not None:
                r[name] = r[name].replace(tzinfo=dt.timezone.utc)
    return rows


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _iso(ts: dt.datetime | None) -> str | None:
    if ts is None:
        return None
    if ts.tzinfo is not None:
        ts = ts.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return ts.isoformat(timespec="seconds") + "Z"
    return ts.isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Runs


def run_history(warehouse: str) -> list[dict] | None:
    """Runs oldest first (by started_at), or None when there is no runs table."""
    if not table_exists(warehouse, "runs"):
        return None
    rows = rows_of(scan(open_table(warehouse, "runs")))
    far_past = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    return sorted(rows, key=lambda r: (_aware(r["started_at"]) or far_past, r["run_id"]))


def _aware(ts: dt.datetime | None) -> dt.datetime | None:
    if ts is None:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


SERVE_KINDS = ("serve", None)  # a run with no kind predates serve/evaluate runs: it counts as serve


def _serves(r: dict) -> bool:
    """Whether a runs row may answer for recommendations: a serve run or a legacy one (no kind)."""
    return r.get("kind") in SERVE_KINDS


def _columns(table) -> set[str]:
    return {f.name for f in table.schema().fields}


def _pick_run(history: list[dict] | None, present: set[str], what: str, warehouse: str) -> tuple[str, str]:
    """The latest succeeded run among `present` (run ids with rows), with a note on how chosen."""
    if not present:
        raise QueryError(f"the {what} table in {warehouse} has no rows: run the pipeline "
                         f"({_WRITER.get(what, 'movierec run')}) first")
    if history is None:
        run = max(present)
        return run, f"run {run}: the largest run_id in {what} (no runs table)"
    for status in ("succeeded", None):
        for r in reversed(history):
            if r["run_id"] in present and (r["status"] == "succeeded") == (status is not None):
                how = "latest succeeded run" if status else f"latest run ({r['status']}; none succeeded)"
                return r["run_id"], f"run {r['run_id']}: the {how} with {what}"
    run = max(present)
    return run, f"run {run}: the largest run_id in {what} (not in the runs table)"


def _unknown_run(run: str, present: Iterable[str], what: str) -> QueryError:
    known = sorted(present)
    shown = ", ".join(known[-5:]) + (f" (and {len(known) - 5} older)" if len(known) > 5 else "")
    return QueryError(f"no run {run!r} in {what}" + (f" (runs there: {shown})" if known else " (it is empty)")
                      + "; `movierec query runs` lists the runs")


# --------------------------------------------------------------------------------------------
# Movies


def _movie_info(warehouse: str, ids: Iterable[int]) -> dict[int, dict]:
    ids = sorted({int(i) for i in ids if i is not None})
    if not ids or not table_exists(warehouse, "movies"):
        return {}
    t = scan(open_table(warehouse, "movies"), ["movieId", "title", "genres"], [("movieId", "in", ids)])
    return {r["movieId"]: r for r in rows_of(t)}


# --------------------------------------------------------------------------------------------
# recs


def _latest_pointer(warehouse: str, name: str) -> str | None:
    if not table_exists(warehouse, "latest"):
        return None
    got = rows_of(scan(open_table(warehouse, "latest"), ["run_id"], [("table_name", "=", name)]))
    return got[0]["run_id"] if got else None


def recs(warehouse: str, user: int, run: str | None = None, as_of: int | str | dt.datetime | None = None,
         n: int | None = None) -> Result:
    """A user's recommendations, titles included, by rank; the latest succeeded run by default."""
    user = int(user)
    if n is not None and n < 1:
        raise QueryError(f"-n {n}: give at least 1 (or leave it out for the whole list)", EXIT_USAGE)
    as_of = parse_as_of(as_of) if not isinstance(as_of, dt.datetime) else _aware(as_of)
    table = open_table(warehouse, "recommendations", as_of)
    # predicted_rating (the hybrid GBT's rating) is in tables written since serve/evaluate runs.
    has_pred = "predicted_rating" in _columns(table)
    cols = ["run_id", "userId", "rank", "movieId", "score"] + (["predicted_rating"] if has_pred else []) + \
        ["source", "because_movieId"]
    note = None
    rows: pa.Table | None = None
    if run is None and as_of is None:
        # The pipeline's pointer to the current recommendations, when it has one.
        run = _latest_pointer(warehouse, "recommendations")
        if run is not None:
            note = f"run {run}: the current recommendations (table `latest`)"
    if run is None:
        history = run_history(warehouse)
        if history is None:
            present = set(_distinct(table, "run_id"))
            run, note = _pick_run(None, present, "recommendations", warehouse)
        else:
            # Newest first: the first candidate with any rows is the answer, so probing it with
            # the user's filter usually settles both questions in one pruned read. Evaluate runs
            # never answer: they learned without their test part and write no recommendations.
            serving = [r for r in history if _serves(r)]
            for status in ("succeeded", None):
                cands = [r for r in reversed(serving) if (r["status"] == "succeeded") == (status is not None)]
                for r in cands:
                    got = scan(table, cols, [("run_id", "=", r["run_id"]), ("userId", "=", user)], ["rank"], n)
                    if got.num_rows or _has_rows(table, r["run_id"]):
                        run, rows = r["run_id"], got
                        how = "latest succeeded run" if status else f"latest run ({r['status']}; none succeeded)"
                        note = f"run {run}: the {how} with recommendations"
                        started = history.index(r)
                        if any(not _serves(h) for h in history[started + 1:]):
                            note += " (newer evaluate runs skipped)"
                        break
                if run is not None:
                    break
            if run is None:  # no serve run in the runs table has recommendations
                evaluate = {r["run_id"] for r in history if not _serves(r)}
                present = set(_distinct(table, "run_id"))
                if present and present <= evaluate:
                    raise QueryError(f"recommendations in {warehouse} has rows of evaluate runs only "
                                     f"({', '.join(sorted(present))}): run `movierec run` (a serve run) "
                                     "first, or pass --run RUN_ID")
                run, note = _pick_run(history, present - evaluate, "recommendations", warehouse)
    if rows is None:
        rows = scan(table, cols, [("run_id", "=", run), ("userId", "=", user)], ["rank"], n)
        if rows.num_rows == 0 and not _has_rows(table, run):
            raise _unknown_run(run, _distinct(table, "run_id"), "recommendations"
                               + (f" as of {_as_of_text(as_of)}" if as_of is not None else ""))
    if rows.num_rows == 0:
        users = rows_of(run_sql(table, 'SELECT MIN("userId") AS lo, MAX("userId") AS hi, '
                                       'COUNT(DISTINCT "userId") AS n FROM t' + where_sql([("run_id", "=", run)])))[0]
        raise QueryError(f"no user {user} in run {run}'s recommendations (userIds "
                         f"{users['lo']}..{users['hi']}, {users['n']:,} users)")
    data = rows_of(rows)
    movies = _movie_info(warehouse, [r["movieId"] for r in data] + [r["because_movieId"] for r in data])
    out = []
    for r in data:
        m = movies.get(r["movieId"], {})
        b = movies.get(r["because_movieId"], {}) if r["because_movieId"] is not None else {}
        out.append({"rank": r["rank"], "movieId": r["movieId"], "title": m.get("title"),
                    "genres": m.get("genres"), "score": r["score"], "predicted_rating": r.get("predicted_rating"),
                    "source": r["source"],
                    "because_movieId": r["because_movieId"], "because_title": b.get("title")})
    meta = {"user": user, "run_id": run, "table_version": table.version()}
    if as_of is not None:
        meta["as_of"] = _as_of_text(as_of)
    notes = [note or f"run {run}"]
    if as_of is not None:
        notes.append(f"recommendations as of {_as_of_text(as_of)} (table version {table.version()})")
    if data and not movies:
        notes.append("no movies table: titles are missing")
    return Result("recs", ["rank", "movieId", "title", "genres", "score", "predicted_rating", "source",
                           "because_movieId", "because_title"], out, meta, notes)


def _as_of_text(as_of: int | dt.datetime) -> str:
    return f"version {as_of}" if isinstance(as_of, int) else _iso(as_of)


def _has_rows(table, run: str) -> bool:
    return scan(table, ["run_id"], [("run_id", "=", run)], limit=1).num_rows > 0


def _distinct(table, column: str, where: Where = ()) -> list:
    cond = where_sql(where)
    cond = (cond + " AND " if cond else " WHERE ") + f"{_ident(column)} IS NOT NULL"
    got = run_sql(table, f"SELECT DISTINCT {_ident(column)} AS v FROM t{cond}")
    return got.column("v").to_pylist()


# --------------------------------------------------------------------------------------------
# similar

# "(1995)", and the "(2007-2013)" of series; RE2 (pyarrow) takes no \u escapes, hence the literal dash.
_YEAR_RE = r"\s*\(\s*(\d{4})(?:\s*[-" + "\u2013" + r"]\s*\d{0,4})?\s*\)\s*$"
# MovieLens moves articles to the end: "Matrix, The", "Cité des enfants perdus, La".
_ARTICLES = ("the", "a", "an", "les", "la", "le", "l'", "il", "el", "der", "die", "das", "los", "las",
             "lo", "gli", "i", "un", "une", "o", "os", "as", "det", "den", "de", "het", "en")
_TRAILING_ARTICLE = r",\s*(?:" + "|".join(re.escape(a) for a in _ARTICLES) + r")\s*$"
_LEADING_ARTICLE = r"^(?:the|a|an)\s+"


def _norm(arr: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Comparable title keys (full, main): lower case; accents, year, articles, punctuation gone.

    `main` also drops a trailing parenthesised alternative title ("Léon (Professional, The)").
    """
    s = pc.utf8_lower(pc.replace_substring_regex(pc.utf8_normalize(arr, form="NFKD"), r"\p{Mn}", ""))
    s = pc.utf8_trim_whitespace(pc.replace_substring_regex(s, _YEAR_RE, ""))

    def finish(x):
        x = pc.replace_substring_regex(pc.utf8_trim_whitespace(x), _TRAILING_ARTICLE, "")
        x = pc.replace_substring(pc.replace_substring_regex(x, _LEADING_ARTICLE, ""), "&", "and")
        return pc.replace_substring_regex(x, r"[^\p{L}\p{N}]+", "")

    return finish(s), finish(pc.replace_substring_regex(s, r"\s*\(.*\)$", ""))


def _str_array(values: list[str]) -> pa.Array:
    """A string array built from raw buffers: pa.array() would import pandas (0.2 s) to probe it."""
    data = [v.encode("utf-8") for v in values]
    offsets = [0]
    for d in data:
        offsets.append(offsets[-1] + len(d))
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(array.array("i", offsets).tobytes()),
                                       pa.py_buffer(b"".join(data)))


def match_title(movies: pa.Table, text: str) -> tuple[list[int], str]:
    """Movie ids matching `text` in the best tier (exact, prefix, substring), and the tier.

    A year in the text ("Toy Story (1995)") narrows the candidates when any have that year.
    """
    m = re.search(_YEAR_RE, text)
    year = int(m.group(1)) if m else None
    key = _norm(_str_array([text]))[0].to_pylist()[0]
    if not key:
        raise QueryError(f"--title {text!r}: nothing left to match after dropping punctuation and "
                         "articles; give more of the title or --movie ID", EXIT_USAGE)
    full, main = (a.to_pylist() for a in _norm(movies.column("title")))
    ids = movies.column("movieId").to_pylist()
    years = movies.column("year").to_pylist() if "year" in movies.column_names else [None] * len(ids)
    tiers = (
        ("exact", lambda f, m: f == key or m == key),
        ("prefix", lambda f, m: f.startswith(key) or m.startswith(key)),
        ("substring", lambda f, m: key in f),
    )
    for tier, hit in tiers:
        found = [(i, y) for i, f, m, y in zip(ids, full, main, years) if f is not None and hit(f, m)]
        if not found:
            continue
        same_year = [i for i, y in found if y == year]
        return (same_year if year is not None and same_year else [i for i, _ in found]), tier
    return [], ""


def _rating_counts(warehouse: str, ids: list[int]) -> dict[int, int] | None:
    if not table_exists(warehouse, "ratings"):
        return None
    got = run_sql(open_table(warehouse, "ratings"),
                  'SELECT "movieId" AS m, COUNT(*) AS n FROM t' + where_sql([("movieId", "in", ids)]) + ' GROUP BY "movieId"')
    return dict(zip(got.column("m").to_pylist(), got.column("n").to_pylist()))


def _label(m: dict) -> str:
    return f"{m['title']} [movieId {m['movieId']}]"


def _newest_run(history: list[dict] | None, present: set[str], serve_first: bool = True) -> tuple[str, str]:
    """The newest run among `present`: succeeded serve (or legacy) runs first (`serve_first`),
    then any succeeded run, then any run; (run_id, how it was chosen)."""
    tiers = (("the latest succeeded serve run", lambda r: r["status"] == "succeeded" and _serves(r)),
             ("the latest succeeded run", lambda r: r["status"] == "succeeded"),
             ("the latest run (none succeeded)", lambda r: True))
    for how, ok in tiers[0 if serve_first else 1:]:
        for r in reversed(history or []):
            if r["run_id"] in present and ok(r):
                return r["run_id"], how
    return max(present), ("the largest run_id" + (" (no runs table)" if history is None else
                                                  " (not in the runs table)"))


def _similar_run(warehouse: str, table) -> tuple[str | None, str | None]:
    """Which run's rows of similar_movies to read, and a note saying so.

    The `latest` pointer's run; else the newest succeeded run present (serve runs first). A table
    written before similar_movies had a run_id column (or holding only such rows) is read whole.
    """
    if "run_id" not in _columns(table):
        return None, None
    pointed = _latest_pointer(warehouse, "similar_movies")
    if pointed is not None and _has_rows(table, pointed):
        return pointed, f"neighbours from run {pointed}: the current similar_movies (table `latest`)"
    present = set(_distinct(table, "run_id"))
    if not present:
        return None, None
    run, how = _newest_run(run_history(warehouse), present)
    note = f"neighbours from run {run}: {how} with similar_movies"
    if pointed is not None:
        note += f" (table `latest` names run {pointed}, which has no rows there)"
    return run, note


def similar(warehouse: str, title: str | None = None, movie: int | None = None, k: int = 10) -> Result:
    """Content neighbours of a movie given by id or by a forgiving title match, from one run's rows."""
    if (title is None) == (movie is None):
        raise QueryError("give exactly one of --title TEXT or --movie ID", EXIT_USAGE)
    mt = open_table(warehouse, "movies")
    st = open_table(warehouse, "similar_movies")
    notes: list[str] = []
    meta: dict[str, Any] = {}
    if movie is not None:
        movie = int(movie)
        got = rows_of(scan(mt, ["movieId", "title"], [("movieId", "=", movie)]))
        if not got:
            r = rows_of(run_sql(mt, 'SELECT MIN("movieId") AS lo, MAX("movieId") AS hi, COUNT(*) AS n FROM t'))[0]
            raise QueryError(f"no movie {movie} in movies ({r['n']:,} movies, movieIds "
                             f"{r['lo']}..{r['hi']}); --title TEXT finds one by name")
        chosen = got[0]
        meta["match"] = "movieId"
    else:
        cols = ["movieId", "title", "year"]
        catalog = scan(mt, [c for c in cols if c in {f.name for f in mt.schema().fields}])
        ids, tier = match_title(catalog, title)
        if not ids:
            raise QueryError(f"no movie title matches {title!r} ({catalog.num_rows:,} movies searched "
                             "ignoring case, punctuation, articles and the year); try fewer words or --movie ID")
        by_id = {r["movieId"]: r for r in rows_of(scan(mt, ["movieId", "title"], [("movieId", "in", ids)]))}
        counts = _rating_counts(warehouse, ids) if len(ids) > 1 else None
        if counts is not None:
            ranked = sorted(ids, key=lambda i: (-counts.get(i, 0), i))
        else:
            ranked = sorted(ids)
        chosen = by_id[ranked[0]]
        meta.update(match=tier, query=title, candidates=len(ids))
        if len(ids) == 1:
            notes.append(f"{title!r} matched {_label(chosen)} ({tier} match)")
        else:
            why = (f"the most rated ({counts.get(chosen['movieId'], 0):,} ratings)" if counts is not None
                   else "the lowest movieId (no ratings table to rank by)")
            others = "; ".join(_label(by_id[i]) + (f" {counts.get(i, 0):,} ratings" if counts is not None else "")
                               for i in ranked[1:6])
            more = f" and {len(ids) - 6} more" if len(ids) > 6 else ""
            notes.append(f"{title!r} matched {len(ids)} titles ({tier} match); chose {_label(chosen)}, {why}; "
                         f"others: {others}{more}. Pass --movie ID to pick another")
    meta.update(movieId=chosen["movieId"], title=chosen["title"])
    run, run_note = _similar_run(warehouse, st)
    meta["run_id"] = run
    if run_note:
        notes.append(run_note)
    where = [("movieId", "=", chosen["movieId"])] + ([("run_id", "=", run)] if run is not None else [])
    nb = rows_of(scan(st, ["similar_movieId", "rank", "similarity"], where, ["rank"], k))
    info = _movie_info(warehouse, [r["similar_movieId"] for r in nb])
    rows = [{"rank": r["rank"], "movieId": r["similar_movieId"],
             "title": info.get(r["similar_movieId"], {}).get("title"),
             "genres": info.get(r["similar_movieId"], {}).get("genres"),
             "similarity": r["similarity"]} for r in nb]
    if not rows:
        notes.append(f"{_label(chosen)} has no neighbours in similar_movies (a movie with no genres, tags "
                     "or year has none)")
    return Result("similar", ["rank", "movieId", "title", "genres", "similarity"], rows, meta, notes)


# --------------------------------------------------------------------------------------------
# metrics


def _model_key(m: str) -> tuple:
    return (MODEL_ORDER.index(m), m) if m in MODEL_ORDER else (len(MODEL_ORDER), m)


def _metric_key(name: str, k: int | None) -> tuple:
    order = RATING_METRICS + RANKING_METRICS
    return (k is not None, order.index(name) if name in order else len(order), name, k or 0)


def load_metrics(warehouse: str, run: str | None = None) -> tuple[str, list[dict], str | None]:
    """(run_id, that run's metric rows, how the run was chosen) - the latest run with metrics by default."""
    table = open_table(warehouse, "metrics")
    rows = rows_of(scan(table))
    present = {r["run_id"] for r in rows}
    note = None
    if run is None:
        run, note = _pick_run(run_history(warehouse), present, "metrics", warehouse)
    elif run not in present:
        raise _unknown_run(run, present, "metrics")
    return run, [r for r in rows if r["run_id"] == run], note


VALIDATION = "validation"


def default_split(splits: Iterable[str]) -> str:
    """'test' when the run has test figures, else 'validation', else the first split there is."""
    splits = sorted(set(splits))
    return "test" if "test" in splits else VALIDATION if VALIDATION in splits else splits[0]


def validation_note(run: str) -> str:
    """What validation figures are, in one line: they must never pass for test figures."""
    return (f"VALIDATION figures, not test figures: run {run}'s metrics on rows it held out of training "
            "within the run (the hybrid GBT's held-out out-of-fold rows; the ranker's held-out users), "
            "not on a held-out test part")


def latest_test_run(warehouse: str) -> str | None:
    """The latest run (succeeded first) with test metrics, or None."""
    present = set(_distinct(open_table(warehouse, "metrics"), "run_id", [("split", "=", "test")]))
    if not present:
        return None
    return _newest_run(run_history(warehouse), present, serve_first=False)[0]


def metrics(warehouse: str, run: str | None = None, k: int | str | None = None,
            split: str | None = None) -> Result:
    """Model comparison: one row per model, one column per metric (ranking metrics at k).

    The run's test figures by default; a run without them (a serve run) shows its validation
    figures, with a note saying plainly what they are.
    """
    chosen_by_default = run is None
    run, rows, note = load_metrics(warehouse, run)
    splits = sorted({r["split"] for r in rows})
    if split is None:
        split = default_split(splits)
    elif split not in splits:
        raise QueryError(f"--split {split}: run {run} has metrics for {', '.join(splits)}", EXIT_USAGE)
    notes = [note] if note else []
    if split == VALIDATION:
        notes.append(validation_note(run))
        if "test" not in splits and chosen_by_default:
            other = latest_test_run(warehouse)
            if other is not None and other != run:
                notes.append(f"run {other} has test figures: --run {other}")
    elif VALIDATION in splits:
        notes.append(f"{split} figures; run {run} also has validation figures (rows held out of training "
                     "within the run): --split validation")
    rows = [r for r in rows if r["split"] == split]
    ks = sorted({r["k"] for r in rows if r["k"] is not None})
    if k is None:
        k = 10 if 10 in ks or not ks else ks[-1]
    elif k != "all":
        try:
            k = int(k)
        except ValueError:
            raise QueryError(f"-k {k!r}: expected a number or 'all'", EXIT_USAGE) from None
        if ks and k not in ks:
            raise QueryError(f"-k {k}: run {run} has ranking metrics at k = {', '.join(map(str, ks))}",
                             EXIT_USAGE)
    keep = [r for r in rows if r["k"] is None or k == "all" or r["k"] == k]
    names = sorted({(r["metric"], r["k"]) for r in keep}, key=lambda t: _metric_key(*t))
    columns = ["model"] + [m if kk is None else f"{m}@{kk}" for m, kk in names]
    table: dict[str, dict] = {}
    for r in keep:
        col = r["metric"] if r["k"] is None else f"{r['metric']}@{r['k']}"
        table.setdefault(r["model"], {"model": r["model"]})[col] = r["value"]
    out = [{c: table[m].get(c) for c in columns} for m in sorted(table, key=_model_key)]
    meta = {"run_id": run, "split": split, "k": k}
    return Result("metrics", columns, out, meta, notes)


# --------------------------------------------------------------------------------------------
# runs


def runs(warehouse: str) -> Result:
    """Every run, oldest first: status, start, duration and seconds per stage."""
    history = run_history(warehouse)
    if history is None:
        check_warehouse(warehouse)
        raise QueryError(f"no runs table in warehouse {warehouse}: run the pipeline (movierec run) first")
    out = []
    for r in history:
        start, end = _aware(r["started_at"]), _aware(r.get("finished_at"))
        stages = r.get("stage_seconds")
        stages = dict(stages) if stages else {}
        out.append({"run_id": r["run_id"], "kind": r.get("kind"), "status": r["status"], "started_at": start,
                    "seconds": (end - start).total_seconds() if start and end else None,
                    "stage_seconds": stages, "input": r.get("input"), "error": r.get("error")})
    notes = []
    if any(r["kind"] is None for r in out):
        notes.append("a run with no kind predates serve/evaluate runs; it counts as a serve run")
    return Result("runs", ["run_id", "kind", "status", "started_at", "seconds", "stage_seconds", "input", "error"],
                  out, {"runs": len(out)}, notes)


# --------------------------------------------------------------------------------------------
# Output


def _cell(v: Any, text: bool) -> Any:
    """A value for csv/table (text=True) or json (text=False)."""
    if isinstance(v, dt.datetime):
        return _iso(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v) if text else None
    if isinstance(v, dict):
        if text:
            return " ".join(f"{k}={_num(x)}" for k, x in v.items())
        return {k: _cell(x, False) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return "|".join(str(x) for x in v) if text else [_cell(x, False) for x in v]
    if v is None:
        return "" if text else None
    return v


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def _table_cell(v: Any) -> str:
    if isinstance(v, float):
        # Metrics keep four decimals; seconds and other large values one.
        return (f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}") if math.isfinite(v) else str(v)
    s = str(_cell(v, True))
    s = s.splitlines()[0] if s else s
    return s if len(s) <= 80 else s[:77] + "..."


def render(result: Result, fmt: str = "table") -> tuple[str, str]:
    """(stdout text, stderr text). Notes go to stdout only in the table format."""
    if fmt == "json":
        doc = {"query": result.query, **{k: _cell(v, False) for k, v in result.meta.items()},
               "notes": result.notes,
               "rows": [{c: _cell(r.get(c), False) for c in result.columns} for r in result.rows]}
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n", ""
    notes = "".join(f"# {n}\n" for n in result.notes)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(result.columns)
        for r in result.rows:
            w.writerow([_cell(r.get(c), True) for c in result.columns])
        return buf.getvalue(), notes
    if fmt != "table":
        raise QueryError(f"--format {fmt}: expected one of {', '.join(FORMATS)}", EXIT_USAGE)
    return notes + format_table(result.columns, result.rows), ""


def format_table(columns: list[str], rows: list[dict]) -> str:
    """Aligned plain text; numbers right-aligned."""
    cells = [[_table_cell(r.get(c)) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) and rows
               for c in columns]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [line(list(columns)), line(["-" * w for w in widths])] + [line(r) for r in cells]
    if not rows:
        out.append("(no rows)")
    return "\n".join(out) + "\n"
