"""What a query answers (`Result`) and how it is printed: an aligned table, JSON or CSV."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .query_io import EXIT_USAGE, QueryError, _iso

FORMATS = ("table", "json", "csv")


@dataclass
class Result:
    """A query's answer: rows (dicts in `columns` order), facts about it, and notes for people."""

    query: str
    columns: list[str]
    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


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
