"""The run's context: what a stage is given (session, config, run id, warehouse, a memo shared
by the run's stages) and the run-scoped reads and writes every stage uses."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from . import tables
from .config import Config

log = logging.getLogger(__name__)


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
    # A freshly minted run id cannot have rows yet: its bookkeeping rows and its per-run outputs
    # (predictions, top_n, metrics, ...) are blind appends (about 1 s cheaper per write than a
    # MERGE or replaceWhere on this machine).
    fresh: bool = False
    # Settings chosen on validation in this run (tune.py): {"settings": {section: {key: value}},
    # "ratings": train ratings they were chosen on, "run_id": the run that chose them}. Applied
    # to `cfg`, and recorded beside the run's config in `runs` (key "tuned").
    tuned: dict = field(default_factory=dict)
    # The config the run was started with (JSON, redacted): what `runs` records and a resume
    # compares, whatever tuning changed in `cfg` since.
    config_json: str = ""
    # Stages running in the background (pipeline.py, pipeline.overlap): name -> a call that
    # waits for the stage and records it. wait_for() joins them; `ended` holds an Event per
    # stage of the run, set once it finished (or the run failed), for a background stage that
    # needs a stage the run's main thread is still on.
    pending: dict[str, Callable[[], None]] = field(default_factory=dict)
    ended: dict[str, threading.Event] = field(default_factory=dict)
    _memo_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def wait_for(self, stage: str) -> None:
        """Return once `stage` of this run has finished: at once when it is done or not part of
        the run; a background stage is joined (its error raised here); a stage the main thread
        runs is waited for (raises if it did not succeed)."""
        join = self.pending.get(stage)
        if join is not None:
            join()
            return
        ev = self.ended.get(stage)
        if ev is None or stage in self.stage_seconds and stage in self.results:
            return
        ev.wait()
        if stage not in self.results:
            raise RuntimeError(f"stage {stage} did not finish; this stage needs it")

    def apply_tuned(self, tuned: dict) -> None:
        """Run the rest of the run with the tuned settings (a stage's, or restored on resume)."""
        if not tuned:
            return
        # Several stages tune (baselines: the rating models; als_implicit; recommend: the
        # ranker), some side by side (pipeline.overlap): the run keeps all, one update at a time.
        with self._memo_lock:
            settings = {**(self.tuned or {}).get("settings", {}), **tuned.get("settings", {})}
            self.tuned = {**(self.tuned or {}), **tuned, "settings": settings}
            for section, values in tuned.get("settings", {}).items():
                updated = getattr(self.cfg, section).model_copy(update=values)
                self.cfg = self.cfg.model_copy(update={section: updated})

    @property
    def serving(self) -> bool:
        """A serve run: no test part, every model learns from all the ratings, and the run
        writes `recommendations` (an evaluate run writes predictions, top_n and metrics)."""
        return self.cfg.pipeline.mode == "serve"

    def memo(self, key: str, build: Callable[[], object]):
        # Locked: two stages running side by side build (and cache) a shared frame once.
        with self._memo_lock:
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


# Intermediates written per run: a stage of run X reads X's rows, never a later run's.
RUN_TABLES = ("rating_splits", "similar_movies", "features")


def run_table(ctx: RunContext, name: str):
    """This run's rows of a per-run intermediate (without run_id), or None when there are none.

    A run that wrote none of its own (e.g. `--stages features` under a new run id) reads the
    newest run's rows of the same kind, and says so: a serve run never reads an evaluate run's
    split, whose test part its models must learn from.
    """
    def source():
        spark, wh = ctx.spark, ctx.warehouse
        if not tables.table_exists(spark, tables.table_path(wh, name)):
            return None
        df = tables.read_table(spark, wh, name)
        if "run_id" not in df.columns:  # a warehouse from before intermediates had run ids
            return None
        if not df.where(F.col("run_id") == ctx.run_id).isEmpty():
            return ctx.run_id
        # One row per run that wrote the table: small whatever the data.
        present = [r[0] for r in df.select("run_id").distinct().collect() if r[0] is not None]
        runs = tables.read_table(spark, wh, "runs")
        row = (runs.where(F.col("run_id").isin(present) & (F.col("kind") == ctx.cfg.pipeline.mode))
               .orderBy(F.col("started_at").desc(), F.col("run_id").desc()).select("run_id").first()) if present else None
        if row is None:
            return None
        log.info("run %s wrote no %s: reading run %s's (the newest %s run that did)",
                 ctx.run_id, name, row[0], ctx.cfg.pipeline.mode)
        return row[0]

    src = ctx.memo(f"source:{name}", source)
    if src is None:
        return None
    return tables.read_table(ctx.spark, ctx.warehouse, name).where(F.col("run_id") == src).drop("run_id")


def write_run_table(ctx: RunContext, name: str, df) -> None:
    """Replace this run's rows of a per-run intermediate."""
    tables.replace_where(ctx.spark, df.select(F.lit(ctx.run_id).alias("run_id"), "*"), ctx.warehouse, name,
                         {"run_id": ctx.run_id}, fresh=ctx.fresh)
    ctx.shared.pop(f"source:{name}", None)


def split_frames(ctx: RunContext):
    """(train, test) as cached (userId, movieId, rating) frames, shared by the run's stages."""
    def build():
        splits = run_table(ctx, "rating_splits")
        if splits is None:
            raise ValueError(f"run {ctx.run_id} has no rating_splits (nor does any earlier {ctx.cfg.pipeline.mode} "
                             "run): run the split stage in this run first")
        train = splits.where(F.col("split") == "train").select("userId", "movieId", "rating").cache()
        test = splits.where(F.col("split") == "test").select("userId", "movieId", "rating").cache()
        return train, test
    return ctx.memo("splits", build)


def bias_model(ctx: RunContext, train):
    """The bias baseline of this run's split, fitted once per run."""
    from .baselines import fit_bias

    return ctx.memo("bias", lambda: fit_bias(train, ctx.cfg.baseline, *rating_scale(ctx)))


def rating_scale(ctx: RunContext) -> tuple[float, float]:
    def build():
        row = tables.read_table(ctx.spark, ctx.warehouse, "ratings").agg(F.min("rating"), F.max("rating")).first()
        return float(row[0]), float(row[1])
    return ctx.memo("scale", build)


def write_predictions(ctx: RunContext, model: str, preds) -> None:
    df = preds.select(F.lit(ctx.run_id).alias("run_id"), F.lit(model).alias("model"),
                      "userId", "movieId", "rating", "prediction")
    tables.replace_where(ctx.spark, df, ctx.warehouse, "predictions", {"run_id": ctx.run_id, "model": model},
                         fresh=ctx.fresh)


def write_top_n(ctx: RunContext, model: str, recs) -> None:
    because = F.col("because_movieId") if "because_movieId" in recs.columns else F.lit(None).cast("int")
    top = recs.select(F.lit(ctx.run_id).alias("run_id"), F.lit(model).alias("model"), "userId", "rank", "movieId",
                      "score", because.alias("because_movieId"))
    tables.replace_where(ctx.spark, top, ctx.warehouse, "top_n", {"run_id": ctx.run_id, "model": model},
                         fresh=ctx.fresh)


def write_validation(ctx: RunContext, model: str, rows: list, ranking: bool) -> None:
    """Metrics rows with split 'validation': figures on rows held out inside the run (a serve
    run's only quality signal). Rating rows (k null) and ranking rows are replaced apart, as
    the hybrid and recommend stages write them."""
    from .evaluation import metrics_frame

    lit = tables.sql_literal
    cond = (f"run_id = {lit(ctx.run_id)} AND model = {lit(model)} AND split = 'validation' "
            f"AND k IS {'NOT ' if ranking else ''}NULL")
    df = metrics_frame(ctx.spark, ctx.run_id, model, "validation", rows)
    tables.replace_where(ctx.spark, df, ctx.warehouse, "metrics", cond, fresh=ctx.fresh)
    for metric, k, value in rows:
        log.info("validation %-8s %-10s %-4s %.4f", model, metric, "" if k is None else f"@{k}", value)


def model_path(ctx: RunContext, name: str) -> str:
    """A model of this run: `<warehouse>/_models/<run_id>/<name>` (maintain prunes old runs')."""
    from .config import join_path

    return join_path(ctx.warehouse, "_models", ctx.run_id, name)


def optional_table(ctx: RunContext, name: str):
    wh = ctx.warehouse
    return tables.read_table(ctx.spark, wh, name) if tables.table_exists(ctx.spark, tables.table_path(wh, name)) else None
