"""Settings chosen on validation data carved from the train part, never on a test part.

A setting chosen by its score on a test split is an optimistic figure there and a guess
everywhere else (implicit ALS's old defaults, picked on ml-latest-small's test split, reached
nDCG@10 0.396 on another MovieLens release where rank 10 / reg 0.1 / alpha 1 reached 0.464).
So a run picks them itself, on its own train part:

- the validation fold: per user, a hash share (`tune.validation_ratio`) of their train ratings,
  for users with at least `tune.min_user_ratings` of them (a light user keeps every rating in
  the fit part, as the serving model would);
- implicit ALS: each candidate setting is fitted on the rest of train and scored by nDCG@10 of
  its top-10 unseen lists against the held-out movies (the metric the final lists are judged
  by); a coordinate search: rank, then reg_param, then alpha and confidence together, each
  list tried with the others held at the best so far (about thirteen fits, memoised, each
  logged with its time; a step's candidates are fitted side by side, `tune.parallelism`).
  Alpha and confidence go together because they are one knob: rating
  confidence is 1 + alpha x rating, so at the same alpha it weighs a rating about 3.5 times
  what binary's 1 + alpha does, and a sweep of confidence at the alpha binary chose compared
  binary with a much larger effective alpha (on ml-latest-small's stratified train part it
  scored rating at alpha 5 below binary, 0.1676 against 0.1783 validation nDCG@10, while
  rating at alpha 1 scored 0.1818);
- the rating models (the bias baseline's shrinkage, the residual ALS's rank and reg_param): each
  candidate fitted on the fit part and scored by RMSE on the held-out ratings: the baseline's
  whole item_reg x user_reg grid side by side (one fit's Spark jobs), then on the chosen
  baseline's residuals a coordinate search over ALS's rank, then reg_param (about six fits);
- a later serve run on the same warehouse reuses the newest run's choice while its train part's
  size is within `tune.reuse_max_change` of the one it was chosen on (an evaluate run always
  chooses on its own train part: a serve run's choice saw its test ratings).

The choice is recorded with the run (`runs.config`, key "tuned": every tuned section's
settings) and with the stage that made it (baselines: the rating models; als_implicit).
"""

from __future__ import annotations

import itertools
import json
import logging
import time

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from . import tables
from .config import Config

log = logging.getLogger(__name__)

IMPLICIT_KEYS = ("rank", "reg_param", "alpha", "confidence")
# The coordinate search's steps: each step tries every combination of its keys' lists.
SEARCH = (("rank",), ("reg_param",), ("alpha", "confidence"))


def validation_fold(train: DataFrame, seed: int, ratio: float, min_user_ratings: int) -> tuple[DataFrame, DataFrame]:
    """(fit, held): a hash share `ratio` of each user's train ratings held out, for users with at
    least `min_user_ratings` train ratings; every other rating is in `fit`."""
    from pyspark.sql import Window

    from .features import hash_sample

    n_u = F.count(F.lit(1)).over(Window.partitionBy("userId"))
    marked = train.withColumn("_held", (n_u >= min_user_ratings) & hash_sample(["userId", "movieId"], seed + 7, ratio))
    return marked.where(~F.col("_held")).drop("_held"), marked.where(F.col("_held")).drop("_held")


def should_tune(cfg: Config, n_train: int) -> bool:
    t = cfg.tune
    return t.enabled is True or (t.enabled == "auto" and n_train <= t.max_ratings)


def reusable(spark: SparkSession, warehouse: str, n_train: int, max_change: float) -> dict | None:
    """The newest succeeded run's tuned settings when its train size is within `max_change` of
    `n_train` (None otherwise, or when no run tuned). Reads the runs table's newest rows only."""
    if max_change <= 0 or not tables.table_exists(spark, tables.table_path(warehouse, "runs")):
        return None
    rows = (tables.read_table(spark, warehouse, "runs").where("status = 'succeeded' AND config LIKE '%\"tuned\"%'")
            .orderBy(F.col("finished_at").desc()).select("config").limit(1).collect())
    if not rows:
        return None
    tuned = json.loads(rows[0]["config"]).get("tuned") or {}
    n = tuned.get("ratings") or 0
    if not n or abs(n_train - n) / n > max_change:
        return None
    return tuned


def coordinate_search(start: dict, steps: tuple[tuple[str, ...], ...], grids: dict[str, list],
                      evaluate, higher: bool = True, parallelism: int = 1, better=None
                      ) -> tuple[dict, object, list[dict]]:
    """(best, its score, trials): from `start`, each step tries every combination of its keys'
    grid values with the other keys held at the best so far, and keeps a candidate only when it
    scores strictly better (so ties keep the earlier one, in grid order). `evaluate(setting)`
    returns (score, trial record); `better(candidate's score, best's score)` decides when given
    (a score may then be any object), else the higher (or lower) number wins. A step's
    candidates depend only on the steps before it, so they are evaluated side by side in up to
    `parallelism` threads; every setting is evaluated once, and the choice is the one a
    one-at-a-time search makes (each fit is seeded)."""
    if better is None:
        def better(a, b):
            return a > b if higher else a < b

    from concurrent.futures import ThreadPoolExecutor

    scores: dict[tuple, float] = {}
    trials: list[dict] = []

    def key(setting: dict) -> tuple:
        return tuple(sorted(setting.items()))

    def run(cands: list[dict]) -> None:
        todo = list({key(c): c for c in cands if key(c) not in scores}.values())
        if not todo:
            return
        if parallelism > 1 and len(todo) > 1:
            from pyspark import inheritable_thread_target

            # Wrapped so the fits' jobs keep the stage's job group (a plain thread starts without it).
            session = SparkSession.getActiveSession()
            target = inheritable_thread_target(session)(evaluate) if session is not None else evaluate
            with ThreadPoolExecutor(min(parallelism, len(todo)), thread_name_prefix="tune") as pool:
                results = list(pool.map(target, todo))
        else:
            results = [evaluate(c) for c in todo]
        for c, (value, trial) in zip(todo, results):
            scores[key(c)] = value
            trials.append(trial)

    best = dict(start)
    for i, keys in enumerate(steps):
        cands = [{**best, **dict(zip(keys, values))} for values in itertools.product(*(grids[k] for k in keys))]
        run(([best] if i == 0 else []) + cands)
        best_score = scores[key(best)]
        for c in cands:
            s = scores[key(c)]
            if key(c) != key(best) and better(s, best_score):
                best, best_score = c, s
    if not steps:
        run([best])
    return best, scores[key(best)], trials


def trial_iters(cfg: Config) -> dict:
    """The ALS settings a tuning candidate is fitted with beyond its own: tune.trial_max_iter."""
    return {"max_iter": cfg.tune.trial_max_iter} if cfg.tune.trial_max_iter else {}


def tune_implicit(train: DataFrame, cfg: Config, seed: int) -> tuple[dict, list[dict]]:
    """(best, trials): implicit ALS's rank, reg_param, alpha and confidence chosen by nDCG@10 on
    a validation fold of `train`; trials holds every setting tried with its score and seconds."""
    from .als import fit_implicit, ndcg_users, unseen_ndcg

    t = cfg.tune
    fit_part, held = validation_fold(train, seed, t.validation_ratio, t.min_user_ratings)
    fit_part, held = fit_part.cache(), held.cache()
    log.info("tune: implicit ALS on %d fit ratings, %d held out (validation fold of train)",
             fit_part.count(), held.count())
    # Who is scored, what they rated and what they hold out: the same for every candidate.
    users = ndcg_users(fit_part, held).cache()

    def score(setting: dict) -> tuple[float, dict]:
        t0 = time.perf_counter()
        model = fit_implicit(fit_part, cfg.als_implicit.model_copy(update={**setting, **trial_iters(cfg)}), seed)
        ndcg, n_users = unseen_ndcg(model, users, 10)
        if n_users == 0:
            raise ValueError("tune: no user has a held-out rating in the validation fold")
        trial = {**setting, **trial_iters(cfg), "ndcg@10": round(ndcg, 4), "seconds": round(time.perf_counter() - t0, 1)}
        log.info("tune: implicit ALS %s: validation nDCG@10 %.4f (%.1f s)", setting, ndcg, trial["seconds"])
        return ndcg, trial

    start = {k: getattr(cfg.als_implicit, k) for k in IMPLICIT_KEYS}
    grids = {"rank": t.implicit_ranks, "reg_param": t.implicit_reg_params, "alpha": t.implicit_alphas,
             "confidence": t.implicit_confidences}
    try:
        best, best_score, trials = coordinate_search(start, SEARCH, grids, score, higher=True,
                                                     parallelism=t.parallelism)
    finally:
        fit_part.unpersist()
        held.unpersist()
        users.unpersist()
    log.info("tune: implicit ALS chose %s (validation nDCG@10 %.4f) after %d fits", best, best_score, len(trials))
    return best, trials


def tune_rating_models(train: DataFrame, cfg: Config, seed: int, lo: float, hi: float) -> tuple[dict, list[dict]]:
    """(best, trials): the bias baseline's item_reg x user_reg grid (every point, fitted side by
    side: baselines.bias_grid_rmse), then the residual ALS's rank and reg_param on the chosen
    baseline's residuals (a coordinate search), chosen by RMSE on a validation fold of `train`
    (the one tune_implicit holds out); best = {"baseline": {...}, "als": {...}}; trials holds
    every point with its RMSE and seconds."""
    from .als import fit_explicit, predict_explicit
    from .baselines import bias_grid_rmse, fit_bias
    from .evaluation import rmse

    t = cfg.tune
    fit_part, held = validation_fold(train, seed, t.validation_ratio, t.min_user_ratings)
    fit_part, held = fit_part.select("userId", "movieId", "rating").cache(), held.cache()
    trials: list[dict] = []
    bias = None
    try:
        t0 = time.perf_counter()
        items = sorted({cfg.baseline.item_reg, *t.baseline_item_regs})
        users = sorted({cfg.baseline.user_reg, *t.baseline_user_regs})
        grid = [(i, u) for i in items for u in users]
        got = bias_grid_rmse(fit_part, held, grid, cfg.baseline.iterations, lo, hi)
        secs = round(time.perf_counter() - t0, 1)
        for (i, u), e in zip(grid, got):
            trials.append({"model": "baseline", "item_reg": i, "user_reg": u, "rmse": round(e, 4)})
        log.info("tune: baseline, %d settings side by side in %.1f s: %s", len(grid), secs,
                 ", ".join(f"({i:g}, {u:g}) {e:.4f}" for (i, u), e in zip(grid, got)))
        item_reg, user_reg = min(zip(got, grid))[1]
        base = {"item_reg": item_reg, "user_reg": user_reg}
        # The ALS candidates fit the residuals of the baseline chosen above.
        bias = fit_bias(fit_part, cfg.baseline.model_copy(update=base), lo, hi)

        def als_rmse(setting: dict) -> tuple[float, dict]:
            t0 = time.perf_counter()
            als_cfg = cfg.als.model_copy(update={**setting, **trial_iters(cfg), "tune": False, "residual": True})
            e = rmse(predict_explicit(fit_explicit(fit_part, bias, als_cfg, seed), bias, held, True, lo, hi))
            trial = {"model": "als", **setting, **trial_iters(cfg), "rmse": round(e, 4),
                     "seconds": round(time.perf_counter() - t0, 1)}
            log.info("tune: als %s: validation RMSE %.4f (%.1f s)", setting, e, trial["seconds"])
            return e, trial

        start = {k: getattr(cfg.als, k) for k in ("rank", "reg_param")}
        als, _, als_trials = coordinate_search(start, (("rank",), ("reg_param",)),
                                               {"rank": t.als_ranks, "reg_param": t.als_reg_params}, als_rmse,
                                               higher=False, parallelism=t.parallelism)
        trials += als_trials
    finally:
        if bias is not None:
            bias.unpersist()
        fit_part.unpersist()
        held.unpersist()
    best = {"baseline": base, "als": als}
    log.info("tune: rating models chose %s after %d fits", best, len(trials))
    return best, trials


def _reused(ctx, n_train: int, section: str) -> dict | None:
    """The newest run's tuned settings when a serve run may reuse them and they hold `section`."""
    if not ctx.serving:
        return None
    reused = reusable(ctx.spark, ctx.warehouse, n_train, ctx.cfg.tune.reuse_max_change)
    return reused if reused and section in reused.get("settings", {}) else None


def choose_rating_models(ctx, train: DataFrame, lo: float, hi: float) -> dict:
    """The baselines stage's tuning step: the baseline's shrinkage and the residual ALS's rank
    and reg_param for the rest of the run (ctx.cfg); returns what the stage result records."""
    cfg = ctx.cfg
    n_train = train.count()
    if not should_tune(cfg, n_train) or not cfg.tune.rating_models:
        return {}
    reused = _reused(ctx, n_train, "baseline")
    if reused:
        settings = {s: reused["settings"][s] for s in ("baseline", "als") if s in reused["settings"]}
        log.info("tune: reusing run %s's rating-model choice %s", reused.get("run_id"), settings)
        tuned = {"settings": settings, "ratings": reused.get("ratings"), "run_id": reused.get("run_id")}
        ctx.apply_tuned(tuned)
        return {"tuned": tuned, "tune": {"reused_from": reused.get("run_id")}}
    t0 = time.perf_counter()
    best, trials = tune_rating_models(train, cfg, cfg.pipeline.seed, lo, hi)
    tuned = {"settings": best, "ratings": n_train, "run_id": ctx.run_id}
    ctx.apply_tuned(tuned)
    return {"tuned": tuned, "tune": {"fits": len(trials), "seconds": round(time.perf_counter() - t0, 1),
                                     "trials": trials}}


def choose_implicit(ctx, train: DataFrame) -> dict:
    """The als_implicit stage's tuning step: applies the chosen settings to the run (ctx.cfg)
    and returns what the stage result records ({} when tuning is off for this run)."""
    cfg = ctx.cfg
    n_train = train.count()
    if not should_tune(cfg, n_train):
        log.info("tune: off for %d train ratings (tune.enabled=%s, max_ratings=%d): the config's settings",
                 n_train, cfg.tune.enabled, cfg.tune.max_ratings)
        return {}
    # Only a serve run reuses: an evaluate run's choice must come from its own train part (a
    # serve run's choice saw every rating, so also what an evaluate run holds out as test).
    reused = _reused(ctx, n_train, "als_implicit")
    if reused:
        log.info("tune: reusing run %s's choice %s (train size %d then, %d now)", reused.get("run_id"),
                 reused["settings"]["als_implicit"], reused.get("ratings", 0), n_train)
        tuned = {"settings": {"als_implicit": reused["settings"]["als_implicit"]},
                 "ratings": reused.get("ratings"), "run_id": reused.get("run_id")}
        ctx.apply_tuned(tuned)
        return {"tuned": tuned, "tune": {"reused_from": reused.get("run_id")}}
    t0 = time.perf_counter()
    best, trials = tune_implicit(train, cfg, cfg.pipeline.seed)
    tuned = {"settings": {"als_implicit": best}, "ratings": n_train, "run_id": ctx.run_id}
    ctx.apply_tuned(tuned)
    return {"tuned": tuned, "tune": {"fits": len(trials), "seconds": round(time.perf_counter() - t0, 1),
                                     "trials": trials}}


def ranker_search(ctx, train: DataFrame) -> tuple[bool, dict, int | None]:
    """(search, reused, n_train): whether the recommend stage chooses the learned ranker's pool
    and depth on its validation users (tuning on for this run, tune.ranker, validation users
    held out), the stage record of a reused choice (applied to ctx.cfg already) when a later
    serve run reuses the newest run's, and train's size when it was counted (for the record of
    a choice made here)."""
    cfg = ctx.cfg
    if not cfg.tune.ranker or cfg.hybrid.ranker_validation_users <= 0:
        return False, {}, None
    n_train = train.count()
    if not should_tune(cfg, n_train):
        return False, {}, n_train
    reused = _reused(ctx, n_train, "hybrid")
    if reused:
        tuned = {"settings": {"hybrid": reused["settings"]["hybrid"]}, "ratings": reused.get("ratings"),
                 "run_id": reused.get("run_id")}
        log.info("tune: reusing run %s's ranker choice %s", reused.get("run_id"), tuned["settings"]["hybrid"])
        ctx.apply_tuned(tuned)
        return False, {"tuned": tuned, "tune": {"reused_from": reused.get("run_id")}}, n_train
    return True, {}, n_train
