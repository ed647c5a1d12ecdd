"""Which run answers a query: the `latest` pointer, else the newest succeeded run (serve runs
for recommendations), from the `runs` table."""

from __future__ import annotations

import datetime as dt
from typing import Iterable

from .query_io import (_WRITER, QueryError, _aware, _columns, _distinct, _has_rows, open_table, rows_of, scan,
                       table_exists)

def run_history(warehouse: str) -> list[dict] | None:
    """Runs oldest first (by started_at), or None when there is no runs table."""
    if not table_exists(warehouse, "runs"):
        return None
    rows = rows_of(scan(open_table(warehouse, "runs")))
    far_past = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    return sorted(rows, key=lambda r: (_aware(r["started_at"]) or far_past, r["run_id"]))


SERVE_KINDS = ("serve", None)  # a run with no kind predates serve/evaluate runs: it counts as serve


def _serves(r: dict) -> bool:
    """Whether a runs row may answer for recommendations: a serve run or a legacy one (no kind)."""
    return r.get("kind") in SERVE_KINDS


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


def _latest_pointer(warehouse: str, name: str) -> str | None:
    if not table_exists(warehouse, "latest"):
        return None
    got = rows_of(scan(open_table(warehouse, "latest"), ["run_id"], [("table_name", "=", name)]))
    return got[0]["run_id"] if got else None


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
