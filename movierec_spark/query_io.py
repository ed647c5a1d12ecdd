"""Reading the output Delta tables without a JVM: delta-rs opens them (time travel included) and
its embedded DataFusion engine answers SQL over them, filters pushed down to prune files, row
groups and pages. Filter values reach the SQL only through `_lit`, which quotes strings and
accepts nothing but str, int and float (QueryBuilder takes no bound parameters)."""

from __future__ import annotations

import datetime as dt
import os
import re
from typing import Any, Sequence

import pyarrow as pa

EXIT_USAGE = 2


EXIT_FAILED = 1


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


def _aware(ts: dt.datetime | None) -> dt.datetime | None:
    if ts is None:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


def _columns(table) -> set[str]:
    return {f.name for f in table.schema().fields}


def _has_rows(table, run: str) -> bool:
    return scan(table, ["run_id"], [("run_id", "=", run)], limit=1).num_rows > 0


def _distinct(table, column: str, where: Where = ()) -> list:
    cond = where_sql(where)
    cond = (cond + " AND " if cond else " WHERE ") + f"{_ident(column)} IS NOT NULL"
    got = run_sql(table, f"SELECT DISTINCT {_ident(column)} AS v FROM t{cond}")
    return got.column("v").to_pylist()
