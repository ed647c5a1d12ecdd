"""The pipeline runner: a run's stages in order, every run and finished stage recorded.

A stage is a function `(ctx: RunContext) -> dict | None` listed in `stages.STAGES`; it reads its
inputs from Delta tables (or ctx), writes its outputs through `tables`, and returns a small dict
of figures that is logged and committed to `run_stages`. `pipeline.stages` in the config (or
`--stages`) chooses which run, in order.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import uuid

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from . import tables
from .config import Config
from .context import RunContext
from .redact import redact_text
from .session import jvm_usage
from .stages import STAGES

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    pass


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
    # Secrets never reach the table: the config is redacted, and so are credentials in a URI.
    config = ctx.config_json or ctx.cfg.to_json()
    if ctx.tuned:  # the settings chosen on validation, beside the ones the run was given
        config = json.dumps({**json.loads(config), "tuned": ctx.tuned}, sort_keys=True)
    row = [(ctx.run_id, started.replace(tzinfo=None), finished, status,
            redact_text(ctx.input_path) if ctx.input_path else None, config, ctx.stage_seconds,
            redact_text(error) if error else None, ctx.cfg.pipeline.mode)]
    df = spark.createDataFrame(row, schema=tables.TABLE_SCHEMAS["runs"])
    if ctx.fresh and status == "running":
        tables.append(spark, df, ctx.warehouse, "runs")
    else:
        tables.upsert(spark, df, ctx.warehouse, "runs")


def _record_stage(spark: SparkSession, ctx: RunContext, name: str) -> None:
    """Commit that `name` finished (seconds, result): what a resumed run skips after a crash."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    row = [(ctx.run_id, name, float(ctx.stage_seconds[name]), json.dumps(ctx.results[name], default=str), now)]
    df = spark.createDataFrame(row, schema=tables.TABLE_SCHEMAS["run_stages"])
    if ctx.fresh:
        tables.append(spark, df, ctx.warehouse, "run_stages")
    else:
        tables.replace_where(spark, df, ctx.warehouse, "run_stages", {"run_id": ctx.run_id, "stage": name})


# Sections of the config that may differ when a run is resumed: where Spark runs and with how
# much memory, and where the input is read from, do not change what the stages compute.
# What tuning chose ("tuned") is restored from the finished stage that chose it.
_RESUME_FREE = ("spark", "paths", "tuned")


def _resume_state(spark: SparkSession, cfg: Config, run_id: str) -> tuple[dict, dict]:
    """The recorded run row and its finished stages {stage: (seconds, result)}; refuse a resume
    that would mix two configurations or redo a finished run."""
    wh = cfg.paths.warehouse
    if not tables.table_exists(spark, tables.table_path(wh, "runs")):
        raise PipelineError(f"cannot resume run {run_id}: no runs table in {wh}")
    row = tables.read_table(spark, wh, "runs").where(f"run_id = '{run_id.replace(chr(39), '')}'").first()
    if row is None:
        raise PipelineError(f"cannot resume run {run_id}: it is not in {wh}/runs")
    if row["status"] == "succeeded":
        raise PipelineError(f"run {run_id} already succeeded: nothing to resume (use --run-id {run_id} to redo it)")

    def model_part(js: str) -> dict:
        d = json.loads(js or "{}")
        return {k: v for k, v in d.items() if k not in _RESUME_FREE}

    old, new = model_part(row["config"]), model_part(cfg.to_json())
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise PipelineError(f"cannot resume run {run_id}: its config differs in {diff}; "
                            "resume with the config it started with, or start a new run")
    return row.asDict(), _recorded_stages(spark, wh, run_id)


def _recorded_stages(spark: SparkSession, wh: str, run_id: str) -> dict:
    """{stage: (seconds, result)} of the run's finished stages (one small row each)."""
    done = {}
    if tables.table_exists(spark, tables.table_path(wh, "run_stages")):
        for r in tables.read_table(spark, wh, "run_stages").where(F.col("run_id") == run_id).collect():
            done[r["stage"]] = (r["seconds"], json.loads(r["result"] or "{}"))
    return done


def _check_kind(spark: SparkSession, cfg: Config, run_id: str) -> None:
    """A rerun of stages under an existing run id keeps that run's kind: an evaluate run's split
    has a test part, and serving from it would recommend movies the users rated."""
    wh = cfg.paths.warehouse
    if not tables.table_exists(spark, tables.table_path(wh, "runs")):
        return
    runs = tables.read_table(spark, wh, "runs")
    if "kind" not in runs.columns:  # a warehouse from before runs had kinds
        return
    row = runs.where(F.col("run_id") == run_id).select("kind").first()
    if row is not None and row["kind"] and row["kind"] != cfg.pipeline.mode:
        cmd = "movierec evaluate" if row["kind"] == "evaluate" else "movierec run"
        raise PipelineError(f"run {run_id} is a {row['kind']} run and this is a {cfg.pipeline.mode} run: "
                            f"rerun its stages with `{cmd} --run-id {run_id}` (pipeline.mode={row['kind']})")


# Stages that may run in a background thread (pipeline.overlap): name -> (the stage at whose
# turn it starts, the stages it may run beside). Each is a chain of small Spark jobs, as are the
# stages beside it, and such chains leave the two cores idle between their jobs: content runs
# beside the rating models' tuning, the hybrid's 150-tree GBT beside the ranker's search. On
# request (config.PipelineConfig.overlap) also implicit ALS's tuning beside the rating models',
# and the ranker beside the features passes and the GBT: on ml-latest-small a serve run's tasks
# used about a third of the cores' time, yet with those two it took 458.8 s against 466.4 s
# without (the same hour; within its noise), the stages side by side two to three times as long
# as alone. Their inputs are written before the start stage runs; what runs beside them reads
# nothing they write, except through ctx.wait_for: content's evaluate-run predictions wait for
# baselines (the tuned bias model), recommend for the features stage before it featurises the
# served pairs and for the hybrid model before it rates them. "hybrid" (the GBT beside recommend)
# is the narrower form of "recommend", for runs whose recommend stage cannot start at the
# features stage's turn.
OVERLAP = {"content": ("baselines", ("baselines", "als", "als_implicit")),
           "als_implicit": ("baselines", ("baselines", "als")),
           "recommend": ("features", ("features", "hybrid")),
           "hybrid": ("recommend", ("recommend",))}


# What the stages import when they first run, imported by the main thread before a stage starts
# in the background: two threads importing a package for the first time at once can each see
# it half-initialised (a resumed run's hybrid and recommend stages failed so, with "cannot
# import name 'JavaParams' from partially initialized module 'pyspark.ml.wrapper'").
_STAGE_IMPORTS = ("pyspark.ml", "pyspark.ml.wrapper", "pyspark.ml.classification", "pyspark.ml.evaluation",
                  "pyspark.ml.feature", "pyspark.ml.functions", "pyspark.ml.linalg", "pyspark.ml.recommendation",
                  "pyspark.ml.regression", "pyspark.ml.tuning", "movierec_spark.als", "movierec_spark.baselines",
                  "movierec_spark.content", "movierec_spark.evaluation", "movierec_spark.features",
                  "movierec_spark.hybrid", "movierec_spark.ranker", "movierec_spark.recommend", "movierec_spark.tune")


def _overlap_plan(names: list[str], done: dict, cfg: Config) -> dict[str, str]:
    """{background stage: the stage at whose turn it starts} for this run: stages listed in
    pipeline.overlap whose start stage is in the run and everything between the two may run
    beside it; none that a resume skips, or whose start stage it skips. (Two stages never
    write the same table at once: tables.py takes one write per table at a time.)"""
    plan = {}
    for b in cfg.pipeline.overlap:
        start, beside = OVERLAP[b]
        if b not in names or start not in names or b in done or start in done:
            continue
        i, s = names.index(b), names.index(start)
        if all(n in beside for n in names[min(i, s):max(i, s) + 1] if n != b):
            plan[b] = start
    if "recommend" in plan:  # the hybrid then runs on the main thread, beside recommend anyway
        plan.pop("hybrid", None)
    return plan


def validate_stages(names: list[str]) -> None:
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; registered: {sorted(STAGES)}")
    # A fresh run appends its per-run rows (RunContext.fresh): a stage run twice would write them twice.
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PipelineError(f"stage(s) {repeated} listed more than once; each stage runs once per run")


def _stop_background(spark: SparkSession, ctx: RunContext, running: dict) -> None:
    """On a failed run: wake background stages waiting for a stage that will not finish, cancel
    their jobs, and wait for them, recording the ones that finished (a resume skips those)."""
    for ev in ctx.ended.values():
        ev.set()
    for b, fut in running.items():
        spark.sparkContext.cancelJobGroup(f"{ctx.run_id}:{b}")
    for b, fut in running.items():
        try:
            ctx.results[b] = fut.result()[0]
            _record_stage(spark, ctx, b)
        except BaseException as e:  # the run's own error is the one raised
            log.warning("background stage %s stopped: %s: %s", b, type(e).__name__, str(e)[:300])
    running.clear()
    ctx.pending.clear()


def run_pipeline(spark: SparkSession, cfg: Config, input_path: str | None, stages: list[str] | None = None,
                 run_id: str | None = None, resume: bool = False) -> RunContext:
    """Run the configured stages; record the run (failed runs too) and re-raise on failure.

    Each finished stage is committed to `run_stages`. With `resume`, `run_id` names an
    unfinished run (failed, or killed while 'running'): its finished stages are skipped, their
    recorded results restored, and the run continues under the same id with the same config.
    """
    names = stages or cfg.pipeline.stages
    validate_stages(names)
    started = dt.datetime.now(dt.timezone.utc)
    wall0, usage0 = time.perf_counter(), jvm_usage(spark)
    done: dict = {}
    if resume:
        if not run_id:
            raise PipelineError("resume needs the run id of the run to resume")
        row, done = _resume_state(spark, cfg, run_id)
        input_path = input_path or row["input"]
        started = row["started_at"].replace(tzinfo=dt.timezone.utc)
    if run_id and not resume:
        _check_kind(spark, cfg, run_id)
    ctx = RunContext(spark, cfg, run_id or new_run_id(), input_path, cfg.paths.warehouse, fresh=not run_id,
                     config_json=cfg.to_json())
    carried: set[str] = set()
    if run_id and not resume:
        # A rerun of some stages under an existing id: the other stages' recorded results (the
        # settings tuning chose, the saved models' paths) carry over, as on resume; without
        # them a rerun recommend stage refitted implicit ALS at the untuned settings.
        for name, (secs, result) in _recorded_stages(spark, cfg.paths.warehouse, ctx.run_id).items():
            if name not in names:
                ctx.results[name] = result
                ctx.apply_tuned(result.get("tuned"))
                carried.add(name)
    log.info("run %s: stages %s, input %s, warehouse %s", ctx.run_id, names, redact_text(str(input_path)),
             redact_text(ctx.warehouse))
    _record_run(spark, ctx, started, "running")
    current = None
    plan = _overlap_plan(names, done, cfg)
    ctx.ended.update({n: threading.Event() for n in names})
    running: dict = {}  # background stage -> its future
    pool = None

    def launch(b: str) -> None:
        nonlocal pool
        from concurrent.futures import ThreadPoolExecutor

        from pyspark import inheritable_thread_target

        def body():
            spark.sparkContext.setJobGroup(f"{ctx.run_id}:{b}", f"movierec stage {b}")
            t0 = time.perf_counter()
            try:
                return STAGES[b](ctx) or {}, None
            finally:
                ctx.stage_seconds[b] = round(time.perf_counter() - t0, 3)

        import importlib

        for module in _STAGE_IMPORTS:
            importlib.import_module(module)
        pool = pool or ThreadPoolExecutor(max_workers=len(plan), thread_name_prefix="stage")
        beside = [n for n in OVERLAP[b][1] if n in names and n not in done]
        log.info("[%d/%d] stage %s ... (in the background, beside %s)", names.index(b) + 1, len(names), b,
                 ", ".join(beside))
        running[b] = pool.submit(inheritable_thread_target(spark)(body))
        ctx.pending[b] = lambda: join(b)

    def join(b: str) -> None:
        """Wait for background stage b and record it (its error raised as the run's)."""
        nonlocal current
        fut = running.pop(b, None)
        if fut is None:
            return
        ctx.pending.pop(b, None)
        try:
            result, _ = fut.result()
        except BaseException:
            current = b
            raise
        ctx.results[b] = result
        _record_stage(spark, ctx, b)
        ctx.ended[b].set()
        log.info("[%d/%d] stage %s done in %.1f s (in the background): %s", names.index(b) + 1, len(names), b,
                 ctx.stage_seconds[b], result)

    try:
        for i, name in enumerate(names, 1):
            current = name
            if name in done:
                ctx.stage_seconds[name], ctx.results[name] = done[name]
                ctx.apply_tuned(ctx.results[name].get("tuned"))  # what the stage chose, for the rest
                ctx.ended[name].set()
                log.info("[%d/%d] stage %s: done earlier in this run (%.1f s); skipped on resume",
                         i, len(names), name, ctx.stage_seconds[name])
                continue
            for b in list(running):  # a background stage is over before a stage it may not run beside
                if name not in OVERLAP[b][1]:
                    join(b)
            current = name
            if name in plan:
                if name in ctx.results:  # ran in the background, joined above
                    continue
                if name not in running and names.index(plan[name]) > names.index(name):
                    continue  # starts in the background at its start stage's turn
            for b, start in plan.items():
                if start == name:
                    launch(b)
            log.info("[%d/%d] stage %s ...", i, len(names), name)
            t0 = time.perf_counter()
            spark.sparkContext.setJobGroup(f"{ctx.run_id}:{name}", f"movierec stage {name}")
            result = STAGES[name](ctx) or {}
            ctx.stage_seconds[name] = round(time.perf_counter() - t0, 3)
            ctx.results[name] = result
            _record_stage(spark, ctx, name)
            ctx.ended[name].set()
            log.info("[%d/%d] stage %s done in %.1f s: %s", i, len(names), name, ctx.stage_seconds[name], result)
            if ctx.stop_reason and i < len(names):
                log.info("%s; skipping %s", ctx.stop_reason, ", ".join(names[i:]))
                ctx.results["skipped"] = {"stages": names[i:], "reason": ctx.stop_reason}
                break
        for b in list(running):
            join(b)
    except BaseException as e:
        if current and current not in ctx.stage_seconds:
            ctx.stage_seconds[current] = round(time.perf_counter() - t0, 3)
        msg = f"{type(e).__name__} in stage {current}: {e}"
        _stop_background(spark, ctx, running)
        try:
            _record_run(spark, ctx, started, "failed", msg[:4000])
        except Exception:  # the original error matters more than the bookkeeping one
            log.exception("could not record the failed run %s", ctx.run_id)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        ctx.release()
    _record_run(spark, ctx, started, "succeeded")
    # Only a serve run's outputs are what consumers are served; an evaluate run moves nothing.
    if ctx.serving:
        for stage_name, table in (("recommend", "recommendations"), ("content", "similar_movies")):
            if stage_name in ctx.results and stage_name not in carried:  # run here (or before a resume)
                _point_latest(spark, ctx, table)
    wall = time.perf_counter() - wall0
    log.info("run %s succeeded in %.1f s of wall time in this process (stages, some side by side: %s)%s",
             ctx.run_id, wall, ", ".join(f"{k} {v:.1f}s" for k, v in ctx.stage_seconds.items()),
             _usage_text(usage0, jvm_usage(spark), wall))
    return ctx


def _usage_text(before: dict | None, after: dict | None, wall: float) -> str:
    """'; JVM CPU 888 s (1.62 cores), GC 22.8 s' over the run, or '' when it cannot be read."""
    if not before or not after or wall <= 0:
        return ""
    cpu = after["cpu_s"] - before["cpu_s"]
    return (f"; {after.get('scope', 'JVM')} CPU {cpu:.0f} s ({cpu / wall:.2f} cores), "
            f"GC {after['gc_s'] - before['gc_s']:.1f} s")
