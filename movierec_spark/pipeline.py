"""The pipeline runner: a registry of stages, run in order, every run recorded in `runs`.

A stage is a function `(ctx: RunContext) -> dict | None` registered with `@stage("name")`; it
reads its inputs from Delta tables (or ctx), writes its outputs through `tables`, and returns a
small dict of figures that is logged. Later issues add stages (split, als, content, features,
hybrid, recommend) by registering them; `pipeline.stages` in the config chooses which run.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from pyspark.sql import SparkSession

from . import tables
from .config import Config

log = logging.getLogger(__name__)

StageFn = Callable[["RunContext"], "dict | None"]
STAGES: dict[str, StageFn] = {}


def stage(name: str) -> Callable[[StageFn], StageFn]:
    def register(fn: StageFn) -> StageFn:
        STAGES[name] = fn
        return fn

    return register


class PipelineError(RuntimeError):
    pass


@dataclass
class RunContext:
    spark: SparkSession
    cfg: Config
    run_id: str
    input_path: str | None
    warehouse: str
    results: dict[str, dict] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # In-run memo of what several stages derive from the same tables (the split's cached train
    # and test frames, the bias model): later stages reuse it instead of recomputing it.
    shared: dict[str, object] = field(default_factory=dict)
    # Set by a stage when the rest of the run has nothing to do (an unchanged incremental input).
    stop_reason: str | None = None

    def memo(self, key: str, build: Callable[[], object]):
        if key not in self.shared:
            self.shared[key] = build()
        return self.shared[key]

    def release(self) -> None:
        """Drop the memo and unpersist what it cached (a stage that rewrites its sources calls this)."""
        for value in self.shared.values():
            for obj in value if isinstance(value, tuple) else (value,):
                if hasattr(obj, "unpersist"):
                    obj.unpersist()
        self.shared.clear()


def _point_latest(spark: SparkSession, ctx: RunContext, name: str) -> None:
    """Move the `latest` pointer of `name` to this run, once the run has succeeded."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    row = [(name, ctx.run_id, tables.table_version(spark, ctx.warehouse, name), now)]
    tables.upsert(spark, spark.createDataFrame(row, schema=tables.TABLE_SCHEMAS["latest"]), ctx.warehouse, "latest")
    log.info("latest %s: run %s", name, ctx.run_id)


def new_run_id() -> str:
    now = dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _record_run(spark: SparkSession, ctx: RunContext, started: dt.datetime, status: str,
                error: str | None = None) -> None:
    finished = None if status == "running" else dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    row = [(ctx.run_id, started.replace(tzinfo=None), finished, status, ctx.input_path,
            ctx.cfg.to_json(), ctx.stage_seconds, error)]
    df = spark.createDataFrame(row, schema=tables.TABLE_SCHEMAS["runs"])
    tables.upsert(spark, df, ctx.warehouse, "runs")


def validate_stages(names: list[str]) -> None:
    # Import for the side effect of registering built-in stages.
    from . import stages  # noqa: F401

    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; registered: {sorted(STAGES)}")


def run_pipeline(spark: SparkSession, cfg: Config, input_path: str | None, stages: list[str] | None = None,
                 run_id: str | None = None) -> RunContext:
    """Run the configured stages; record the run (failed runs too) and re-raise on failure."""
    names = stages or cfg.pipeline.stages
    validate_stages(names)
    ctx = RunContext(spark, cfg, run_id or new_run_id(), input_path, cfg.paths.warehouse)
    started = dt.datetime.now(dt.timezone.utc)
    log.info("run %s: stages %s, input %s, warehouse %s", ctx.run_id, names, input_path, ctx.warehouse)
    _record_run(spark, ctx, started, "running")
    current = None
    try:
        for i, name in enumerate(names, 1):
            current = name
            log.info("[%d/%d] stage %s ...", i, len(names), name)
            t0 = time.perf_counter()
            spark.sparkContext.setJobGroup(f"{ctx.run_id}:{name}", f"movierec stage {name}")
            result = STAGES[name](ctx) or {}
            ctx.stage_seconds[name] = round(time.perf_counter() - t0, 3)
            ctx.results[name] = result
            log.info("[%d/%d] stage %s done in %.1f s: %s", i, len(names), name, ctx.stage_seconds[name], result)
            if ctx.stop_reason and i < len(names):
                log.info("%s; skipping %s", ctx.stop_reason, ", ".join(names[i:]))
                ctx.results["skipped"] = {"stages": names[i:], "reason": ctx.stop_reason}
                break
    except BaseException as e:
        if current and current not in ctx.stage_seconds:
            ctx.stage_seconds[current] = round(time.perf_counter() - t0, 3)
        msg = f"{type(e).__name__} in stage {current}: {e}"
        try:
            _record_run(spark, ctx, started, "failed", msg[:4000])
        except Exception:  # the original error matters more than the bookkeeping one
            log.exception("could not record the failed run %s", ctx.run_id)
        raise
    finally:
        ctx.release()
    _record_run(spark, ctx, started, "succeeded")
    if "recommend" in ctx.results:
        _point_latest(spark, ctx, "recommendations")
    total = sum(ctx.stage_seconds.values())
    log.info("run %s succeeded in %.1f s (%s)", ctx.run_id, total,
             ", ".join(f"{k} {v:.1f}s" for k, v in ctx.stage_seconds.items()))
    return ctx
