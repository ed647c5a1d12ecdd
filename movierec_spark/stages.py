"""Built-in pipeline stages. Each is a thin adapter from RunContext to library functions."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from . import tables
from .config import Config, is_uri
from .download import safe_extract
from .ingest import REASONS, check_dataset, enforce_threshold
from .layouts import detect_layout
from .pipeline import RunContext, stage

log = logging.getLogger(__name__)

INGEST_ORDER = ["movies", "ratings", "tags", "users", "links", "genome_tags", "genome_scores"]


def resolve_input(cfg: Config, input_path: str) -> Path:
    """A MovieLens directory, or a GroupLens .zip extracted once (safely) under data_dir."""
    p = Path(input_path)
    if p.is_dir():
        return p
    if p.suffix.lower() == ".zip" and p.is_file():
        st = p.stat()
        dest = Path(cfg.paths.data_dir).resolve() / ".extracted" / f"{p.stem}-{st.st_size}-{int(st.st_mtime)}"
        if dest.is_dir() and any(dest.iterdir()):
            log.info("reusing %s extracted at %s", p.name, dest)
            return dest
        dest.mkdir(parents=True, exist_ok=True)
        return safe_extract(p, dest, max_uncompressed_bytes=cfg.ingest.max_uncompressed_bytes)
    raise FileNotFoundError(f"--input {input_path}: not a directory or a .zip file")


def ingest(spark: SparkSession, cfg: Config, input_path: str, run_id: str, now: int | None = None) -> dict:
    """Ingest a MovieLens dataset into the warehouse. Returns per-file counts.

    All files are checked (and counted) before any table is touched, so a rejected share above
    the threshold leaves the warehouse exactly as it was.
    """
    if is_uri(input_path):
        raise NotImplementedError("object-store input is not supported yet; pass a local path")
    layout = detect_layout(resolve_input(cfg, input_path))
    checked = check_dataset(spark, layout, cfg.ingest.whole_file_max_bytes, now=now)
    try:
        enforce_threshold(checked, cfg.ingest.reject_threshold)
        wh = cfg.paths.warehouse
        rejects = None
        for role in INGEST_ORDER:
            if role in checked:
                r = checked[role].rejects(run_id)
                rejects = r if rejects is None else rejects.unionByName(r)
        tables.replace_where(spark, rejects, wh, "rejects", "run_id", run_id)
        summary = {}
        for role in INGEST_ORDER:
            if role not in checked:
                continue
            cf = checked[role]
            name = {"genome_scores": "genome"}.get(role, role)
            stats = tables.upsert(spark, cf.loaded(), wh, name)
            summary[cf.source] = {
                "input": cf.input_rows,
                "loaded": cf.counts.get("loaded", 0),
                "rejected": cf.rejected,
                **stats,
            }
        unknown = {k for c in checked.values() for k in c.counts if k != "loaded" and k not in REASONS}
        assert not unknown, f"reason codes outside REASONS: {unknown}"
        return summary
    finally:
        for cf in checked.values():
            cf.df.unpersist()


@stage("ingest")
def ingest_stage(ctx: RunContext) -> dict:
    if not ctx.input_path:
        raise ValueError("the ingest stage needs an input path")
    summary = ingest(ctx.spark, ctx.cfg, ctx.input_path, ctx.run_id)
    return {
        "files": len(summary),
        "loaded": sum(v["loaded"] for v in summary.values()),
        "rejected": sum(v["rejected"] for v in summary.values()),
        "ratings": summary.get("ratings.csv", summary.get("ratings.dat", summary.get("u.data", {}))).get("loaded"),
    }
