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

import datetime as dt
from typing import Any, Iterable

import pyarrow as pa

# The reading, run choice, title matching and rendering live in their own modules; their public
# names are re-exported here, the one import the CLI, the report and readers need.
from .query_io import (EXIT_FAILED, EXIT_USAGE, QueryError, Where, _aware, _columns, _distinct,  # noqa: F401
                       _has_rows, _iso, check_warehouse, open_table, parse_as_of, rows_of, run_sql, scan,
                       table_exists, table_path, where_sql)
from .query_runs import (SERVE_KINDS, _latest_pointer, _newest_run, _pick_run, _serves,  # noqa: F401
                         _similar_run, _unknown_run, run_history)
from .render import FORMATS, Result, format_table, render  # noqa: F401
from .titles import match_title  # noqa: F401

# Orders for the model comparison; names not listed follow alphabetically.
MODEL_ORDER = ("global_mean", "bias_baseline", "popularity", "als", "als_implicit", "content", "hybrid")
RATING_METRICS = ("rmse", "mae", "mape", "r2")
RANKING_METRICS = ("precision", "recall", "ndcg", "map", "hit_rate", "mrr", "coverage", "novelty", "diversity")


# --------------------------------------------------------------------------------------------
# Opening and scanning tables


# --------------------------------------------------------------------------------------------
# Runs


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


# --------------------------------------------------------------------------------------------
# similar


def _rating_counts(warehouse: str, ids: list[int]) -> dict[int, int] | None:
    if not table_exists(warehouse, "ratings"):
        return None
    got = run_sql(open_table(warehouse, "ratings"),
                  'SELECT "movieId" AS m, COUNT(*) AS n FROM t' + where_sql([("movieId", "in", ids)]) + ' GROUP BY "movieId"')
    return dict(zip(got.column("m").to_pylist(), got.column("n").to_pylist()))


def _label(m: dict) -> str:
    return f"{m['title']} [movieId {m['movieId']}]"


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


def _redacted(text: str | None) -> str | None:
    """Credentials in a URI hidden (rows written before runs redacted them)."""
    from .redact import redact_text

    return redact_text(text) if text else text


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
                    "stage_seconds": stages, "input": _redacted(r.get("input")), "error": _redacted(r.get("error"))})
    notes = []
    if any(r["kind"] is None for r in out):
        notes.append("a run with no kind predates serve/evaluate runs; it counts as a serve run")
    return Result("runs", ["run_id", "kind", "status", "started_at", "seconds", "stage_seconds", "input", "error"],
                  out, {"runs": len(out)}, notes)


# --------------------------------------------------------------------------------------------
# Output


