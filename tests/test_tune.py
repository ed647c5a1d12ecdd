"""Settings chosen on validation carved from train: the fold, the search, what runs record and reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chispa import assert_df_equality

from movierec_spark import tables
from movierec_spark.config import load_config
from movierec_spark.tune import validation_fold

from .conftest import make_config

# A grid of 3 distinct points (the start point is in it): the search's logic, at CI's cost.
SMALL_GRID = dict(tune__implicit_ranks=[4, 6], tune__implicit_reg_params=[0.1], tune__implicit_alphas=[1.0],
                  tune__implicit_confidences=["binary", "rating"], als_implicit__rank=6, als_implicit__max_iter=5,
                  als_implicit__reg_param=0.1, als_implicit__alpha=1.0,
                  # The rating models' search: a 2 x 2 baseline grid side by side, then 3 residual ALS fits.
                  tune__baseline_item_regs=[0.5], tune__baseline_user_regs=[10.0], tune__als_ranks=[4],
                  tune__als_reg_params=[0.3], als__rank=6, als__max_iter=5)


def test_validation_fold_holds_out_a_share_of_each_heavy_users_ratings(spark):
    rows = [(1, m, 4.0) for m in range(100)] + [(2, m, 3.0) for m in range(3)]
    train = spark.createDataFrame(rows, "userId int, movieId int, rating double")
    fit, held = validation_fold(train, 42, 0.2, 5)
    assert_df_equality(fit.unionByName(held), train, ignore_row_order=True)
    assert held.join(fit, ["userId", "movieId"]).isEmpty()
    # User 2 has 3 ratings (< 5): every one stays in the fit part.
    assert held.where("userId = 2").isEmpty()
    assert 10 <= held.count() <= 30  # about 20 of user 1's 100


@pytest.fixture(scope="module")
def tuned_runs(spark, tmp_path_factory):
    """On one warehouse: a serve run that tunes, a second serve run on the same ratings, and an
    evaluate run."""
    from movierec_spark.generate import generate_dataset
    from movierec_spark.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("tune")
    generate_dataset(root / "gen", users=50, movies=100, ratings=2_000, seed=3)
    wh = root / "wh"
    stages = ["ingest", "split", "baselines", "als_implicit"]
    # pipeline.stages without recommend: als_implicit lists no candidate pool for the ranker.
    serve = make_config(wh, tune__enabled="auto", pipeline__stages=stages, **SMALL_GRID)
    first = run_pipeline(spark, serve, str(root / "gen"), stages=stages, run_id="t1")
    # No split of its own: a run without rating_splits reads the newest serve run's (t1's).
    second = run_pipeline(spark, serve, str(root / "gen"), stages=["baselines", "als_implicit"], run_id="t2")
    ev = make_config(wh, tune__enabled=True, pipeline__mode="evaluate", pipeline__stages=stages, **SMALL_GRID)
    third = run_pipeline(spark, ev, str(root / "gen"), stages=stages[1:], run_id="t3")
    return serve, first, second, third


# The three runs behind these two tests took 73 s on 2 cores (each tunes or reuses, then fits).
# They run by default: the choice on validation is what every other figure rests on, and CI's
# run (about 12 minutes) has room for them.
def test_a_run_records_its_choice_and_uses_it(spark, tuned_runs):
    serve, first, _, _ = tuned_runs
    res = first.results["als_implicit"]
    chosen = res["tuned"]["settings"]["als_implicit"]
    # The search: start (6, 0.1, 1.0, binary), then rank 4, then confidence rating, each list
    # tried with the best so far: 3 distinct fits (the repeated start point is not refitted).
    trials = res["tune"]["trials"]
    assert {(t["rank"], t["confidence"]) for t in trials} == {(6, "binary"), (4, "binary"), (chosen["rank"], "rating")}
    top = max(trials, key=lambda t: t["ndcg@10"])
    assert chosen == {k: top[k] for k in ("rank", "reg_param", "alpha", "confidence")}
    assert all(0 <= t["ndcg@10"] <= 1 and t["seconds"] >= 0 for t in trials)
    assert res["tune"]["fits"] == 3 and res["tuned"]["run_id"] == "t1" and res["tuned"]["ratings"] == first.results["split"]["train"]
    # The run went on with the chosen settings ...
    assert {k: getattr(first.cfg.als_implicit, k) for k in chosen} == chosen
    assert res["rank"] == chosen["rank"]
    # ... and `runs` keeps both: the config it was given, and what tuning chose.
    row = tables.read_table(spark, serve.paths.warehouse, "runs").where("run_id = 't1'").first()
    config = json.loads(row["config"])
    assert config["tuned"]["settings"]["als_implicit"] == chosen
    assert config["als_implicit"]["rank"] == 6  # as given


def test_a_later_serve_run_reuses_the_choice_and_an_evaluate_run_does_not(tuned_runs):
    _, first, second, third = tuned_runs
    chosen = first.results["als_implicit"]["tuned"]["settings"]["als_implicit"]
    assert second.results["als_implicit"]["tune"] == {"reused_from": "t1"}
    # The rating models' choice too, and the run goes on with it.
    assert second.results["baselines"]["tune"] == {"reused_from": "t1"}
    rating = first.results["baselines"]["tuned"]["settings"]
    assert second.results["baselines"]["tuned"]["settings"] == rating
    assert second.cfg.baseline.item_reg == rating["baseline"]["item_reg"] and second.cfg.als.rank == rating["als"]["rank"]
    assert second.results["als_implicit"]["tuned"]["settings"]["als_implicit"] == chosen
    assert {k: getattr(second.cfg.als_implicit, k) for k in chosen} == chosen
    # The serve run's choice saw every rating, the evaluate run's test part too: it tunes anew
    # on its own train part (80% of the ratings).
    ev = third.results["als_implicit"]
    assert "reused_from" not in ev["tune"] and ev["tune"]["fits"] == 3
    assert ev["tuned"]["ratings"] == third.results["split"]["train"]


def test_a_rerun_of_some_stages_keeps_the_choice_its_run_made(spark, tuned_runs):
    from movierec_spark.pipeline import run_pipeline

    serve, _, _, third = tuned_runs
    chosen = third.results["als_implicit"]["tuned"]["settings"]["als_implicit"]
    ev = make_config(Path(serve.paths.warehouse), tune__enabled=True, pipeline__mode="evaluate",
                     pipeline__stages=["split", "als_implicit"], **SMALL_GRID)
    # Rerunning the split under t3's id: the later stages (a recommend stage, say) would run
    # with what t3's als_implicit stage chose, and find its saved model, not refit the config's.
    again = run_pipeline(spark, ev, None, stages=["split"], run_id="t3")
    assert {k: getattr(again.cfg.als_implicit, k) for k in chosen} == chosen
    assert again.results["als_implicit"]["model_path"] == third.results["als_implicit"]["model_path"]


def test_tune_setting_is_validated(tmp_path):
    from movierec_spark.config import ConfigError

    with pytest.raises(ConfigError):
        load_config(None, {"paths.warehouse": str(tmp_path / "wh"), "tune.enabled": "sometimes"})
    assert load_config(None, {"paths.warehouse": str(tmp_path / "wh")}).tune.enabled == "auto"


def test_the_rating_models_are_tuned_on_the_same_fold_and_recorded_with_the_rest(spark, tuned_runs):
    serve, first, _, third = tuned_runs
    for run in (first, third):
        res = run.results["baselines"]
        chosen, trials = res["tuned"]["settings"], res["tune"]["trials"]
        assert res["tune"]["fits"] == 7 and set(chosen) == {"baseline", "als"}
        # The baseline's whole grid (the config's values and the lists), then ALS's coordinate
        # search, which only moves to a better point: the choice is each model's lowest RMSE, the
        # ALS candidates fitted on the chosen baseline's residuals.
        base = {(t["item_reg"], t["user_reg"]) for t in trials if t["model"] == "baseline"}
        assert base == {(0.5, 5.0), (0.5, 10.0), (2.0, 5.0), (2.0, 10.0)}
        for model, keys, n in (("baseline", ("item_reg", "user_reg"), 4), ("als", ("rank", "reg_param"), 3)):
            mine = [t for t in trials if t["model"] == model]
            assert len(mine) == n and all(t["rmse"] > 0 for t in mine)
            top = min(mine, key=lambda t: t["rmse"])
            assert chosen[model] == {k: top[k] for k in keys}
            # The run went on with them.
            assert {k: getattr(getattr(run.cfg, model), k) for k in keys} == chosen[model]
    # The evaluate run chose on its own train part.
    assert third.results["baselines"]["tuned"]["run_id"] == "t3"
    # `runs` keeps every tuned section, the rating models' and implicit ALS's.
    row = tables.read_table(spark, serve.paths.warehouse, "runs").where("run_id = 't1'").first()
    assert set(json.loads(row["config"])["tuned"]["settings"]) == {"baseline", "als", "als_implicit"}


def test_trial_fits_take_tune_trial_max_iter_and_the_choice_is_the_settings(spark):
    import random

    from movierec_spark.tune import tune_implicit

    rng = random.Random(5)
    # 40 users, 30 of 60 movies each (binary confidence: which movies, not the ratings, matter).
    rows = [(u, m, float(rng.choice([1, 2, 3, 4, 5]))) for u in range(1, 41) for m in rng.sample(range(1, 61), 30)]
    train = spark.createDataFrame(rows, "userId int, movieId int, rating double").cache()
    one = dict(tune__implicit_ranks=[6], tune__implicit_reg_params=[0.1], tune__implicit_alphas=[1.0],
               tune__implicit_confidences=["binary"], als_implicit__rank=6, als_implicit__reg_param=0.1,
               als_implicit__alpha=1.0)

    def search(max_iter: int, trial_max_iter: int | None):
        cfg = make_config(Path("/nonexistent"), tune__trial_max_iter=trial_max_iter, als_implicit__max_iter=max_iter, **one)
        return tune_implicit(train, cfg, 42)

    try:
        best, trials = search(5, 2)
        # The candidate was fitted with 2 iterations, not the model's 5, and says so: its score is
        # what the same search scores for a model of 2 iterations; the choice holds settings only.
        assert best == {"rank": 6, "reg_param": 0.1, "alpha": 1.0, "confidence": "binary"}
        assert len(trials) == 1 and trials[0]["max_iter"] == 2
        (_, [two]), (_, [five]) = search(2, None), search(5, None)
        assert "max_iter" not in two
        assert trials[0]["ndcg@10"] == two["ndcg@10"] != five["ndcg@10"]
    finally:
        train.unpersist()


def test_the_baseline_grid_side_by_side_equals_a_fit_per_setting(spark):
    import numpy as np
    from pyspark.sql import functions as F

    from movierec_spark.baselines import bias_grid_rmse, fit_bias
    from movierec_spark.config import BaselineConfig

    rng = np.random.default_rng(5)
    rows = [(u, m, float(rng.integers(1, 11)) / 2) for u in range(30) for m in range(25) if rng.random() < 0.5]
    df = spark.createDataFrame(rows, "userId int, movieId int, rating double")
    fit, held = df.where(F.pmod(F.col("userId") + F.col("movieId"), F.lit(5)) != 0), \
        df.where(F.pmod(F.col("userId") + F.col("movieId"), F.lit(5)) == 0)
    grid = [(0.5, 1.0), (2.0, 5.0), (25.0, 10.0)]
    got = bias_grid_rmse(fit, held, grid, 2, 0.5, 5.0)
    for (i, u), e in zip(grid, got):
        b = fit_bias(fit, BaselineConfig(item_reg=i, user_reg=u, iterations=2), 0.5, 5.0)
        want = b.predict(held).agg(F.sqrt(F.avg((F.col("rating") - F.col("baseline")) ** 2))).first()[0]
        assert e == pytest.approx(want, abs=1e-12)
    assert len(set(got)) == 3  # the settings differ


def test_the_search_fitted_side_by_side_chooses_what_one_at_a_time_chooses():
    import threading

    from movierec_spark.tune import coordinate_search

    # A score with ties and a better point only reachable through the first step's choice.
    table = {(10, 0.1): 0.30, (20, 0.1): 0.35, (32, 0.1): 0.35, (20, 0.01): 0.33, (20, 0.3): 0.36,
             (10, 0.01): 0.9, (10, 0.3): 0.25}
    calls, names = [], set()

    def evaluate(s):
        calls.append((s["rank"], s["reg"]))
        names.add(threading.current_thread().name)
        v = table[(s["rank"], s["reg"])]
        return v, {**s, "score": v}

    grids = {"rank": [10, 20, 32], "reg": [0.01, 0.1, 0.3]}
    steps = (("rank",), ("reg",))
    one = coordinate_search({"rank": 20, "reg": 0.1}, steps, grids, evaluate, higher=True, parallelism=1)
    seq_calls, calls[:] = list(calls), []
    side = coordinate_search({"rank": 20, "reg": 0.1}, steps, grids, evaluate, higher=True, parallelism=4)
    # rank 32 ties rank 20 (the start stays), then reg 0.3 wins; (10, 0.01) is never a candidate.
    assert one[:2] == side[:2] == ({"rank": 20, "reg": 0.3}, 0.36)
    # Every distinct setting once, trials in the same order either way.
    assert sorted(calls) == sorted(seq_calls) == sorted(set(seq_calls)) and len(seq_calls) == 5
    assert [t["score"] for t in one[2]] == [t["score"] for t in side[2]]
    assert any(n.startswith("tune") for n in names)
    # Lower is better for an RMSE: rank 10 (0.30), then reg 0.3 at rank 10 (0.25).
    low = coordinate_search({"rank": 20, "reg": 0.1}, steps, grids, evaluate, higher=False, parallelism=3)
    assert low[:2] == ({"rank": 10, "reg": 0.3}, 0.25)
    # A `better` rule (the ranker's: a gain beyond the noise) replaces the comparison: a bar no
    # gain clears keeps the start, and every candidate is still evaluated once.
    calls[:] = []
    kept = coordinate_search({"rank": 20, "reg": 0.1}, steps, grids, evaluate, parallelism=2,
                             better=lambda cand, best: cand - best > 1.0)
    assert kept[:2] == ({"rank": 20, "reg": 0.1}, 0.35) and len(calls) == 5
    margin = coordinate_search({"rank": 20, "reg": 0.1}, steps, grids, evaluate, parallelism=2,
                               better=lambda cand, best: cand - best > 0.005)
    assert margin[:2] == ({"rank": 20, "reg": 0.3}, 0.36)  # +0.01 clears 0.005


def test_the_ranker_search_keeps_a_challenger_only_beyond_the_noise(hybrid_run):
    from pyspark.sql import functions as F

    from movierec_spark.context import run_table, split_frames
    from movierec_spark.ranker import train_ranker

    spark, cfg, ctx = hybrid_run
    train, _ = split_frames(ctx)
    times = run_table(ctx, "rating_splits").where(F.col("split") == "train").select("userId", "movieId", "rated_at")
    sims = run_table(ctx, "similar_movies")

    def search(z: float, pools=(20, 40)):
        c = cfg.model_copy(update={
            "hybrid": cfg.hybrid.model_copy(update={"candidate_pool": 30, "ranker_max_iter": 3}),
            "tune": cfg.tune.model_copy(update={"ranker_pools": list(pools), "ranker_depths": [3], "ranker_z": z})})
        return train_ranker(train, times, sims, c, 150, search=True)

    model, validation, tune = search(0.0)
    trials, chosen = tune["trials"], tune["settings"]["hybrid"]
    # Pool 40 is longer than the lists (30): skipped. Pools 30 and 20 at depth 4, then depth 3.
    assert [(t["candidate_pool"], t["ranker_max_depth"]) for t in trials[:2]] == [(30, 4), (20, 4)]
    assert len(trials) == 3 and trials[2]["ranker_max_depth"] == 3
    # Each challenger carries its paired gain over the setting it met, and was kept iff it gained
    # (the recorded gain is rounded; `kept` is the decision on the unrounded one).
    pool_kept = trials[1]["kept"]
    assert pool_kept == (trials[1]["gain"] > 0) or trials[1]["gain"] == 0
    assert trials[1]["over"] == [30, 4]
    assert chosen["candidate_pool"] == (20 if pool_kept else 30) == trials[2]["candidate_pool"]
    assert trials[2]["over"] == [chosen["candidate_pool"], 4]
    assert chosen["ranker_max_depth"] == (3 if trials[2]["kept"] else 4)
    assert all(t["se"] >= 0 and t["users"] > 0 for t in trials[1:])
    assert model.stages[-1].getMaxDepth() == chosen["ranker_max_depth"]
    assert {m for m, _, _ in validation} >= {"ndcg", "precision"}
    # (A bar no gain clears keeps the start: the search's `better` rule, in the test above.)
