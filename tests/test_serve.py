"""Serve runs and evaluate runs: what users are served is learned from all their ratings and never
repeats one; an evaluate run leaves the served output alone; a run's stages read that run's own
intermediates."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from chispa import assert_df_equality
from deltalake import DeltaTable as RsTable
from pyspark.sql import functions as F

from movierec_spark import query, tables
from movierec_spark.pipeline import PipelineError, run_pipeline

from .conftest import FEW_RATINGS, HYBRID_MODELS, NEW_MOVIE, cli_settings, make_config


def _recs(spark, wh, run="sv"):
    return tables.read_table(spark, wh, "recommendations").where(F.col("run_id") == run)


def test_a_serve_run_learns_from_every_rating_and_serves_none_of_them(serve_run):
    spark, cfg, ctx = serve_run
    wh = cfg.paths.warehouse
    n = cfg.evaluation.top_n
    ratings = tables.read_table(spark, wh, "ratings")
    splits = tables.read_table(spark, wh, "rating_splits").where("run_id = 'sv'")
    # No test part: the split is every rating, as train.
    assert splits.where("split != 'train'").isEmpty()
    assert_df_equality(splits.select("userId", "movieId", "rating"), ratings.select("userId", "movieId", "rating"),
                       ignore_row_order=True)
    recs = _recs(spark, wh)
    # Zero overlap with what the user rated, for every user.
    assert recs.join(ratings, ["userId", "movieId"], "inner").isEmpty()
    # Every user gets n movies, ranked 1..n, one movie once; on this 150-movie catalog a few
    # users rated (nearly) everything: they get every movie they did not rate, or nothing.
    # (The catalog the models rank: movies with ratings. The fixture's one unrated movie reaches
    # a list only through its new-movie slot, test_a_movie_nobody_rated_reaches_...)
    n_movies = ratings.select("movieId").distinct().count()
    want = ratings.groupBy("userId").agg(F.least(F.lit(n), n_movies - F.count(F.lit(1))).alias("want"))
    got = recs.groupBy("userId").agg(F.count(F.lit(1)).alias("c"), F.max("rank").alias("m"),
                                     F.countDistinct("movieId").alias("d"))
    assert want.where(f"want = {n}").count() > 0.8 * want.count()
    both = want.join(got, "userId", "full").fillna({"c": 0})
    short = both.where(f"want IS NULL OR c < want OR c > least({n}, want + {cfg.recommend.new_movie_slots})")
    assert short.isEmpty(), short.collect()
    assert got.where("m != c OR d != c").isEmpty()
    # Nothing was held out, so nobody is "cold" and the evaluation outputs were not written.
    assert ctx.results["recommend"]["cold_users"] == 0
    assert tables.read_table(spark, wh, "runs").where("run_id = 'sv'").first().kind == "serve"
    assert not tables.table_exists(spark, tables.table_path(wh, "predictions"))


@pytest.mark.parametrize("user", sorted(FEW_RATINGS))
def test_a_user_with_one_or_two_ratings_gets_n_unseen_movies(serve_run, user):
    spark, cfg, _ = serve_run
    got = _recs(spark, cfg.paths.warehouse).where(F.col("userId") == user).orderBy("rank").collect()
    rated = {m for m, _ in FEW_RATINGS[user]}
    assert [r["rank"] for r in got] == list(range(1, cfg.evaluation.top_n + 1))
    assert not rated & {r.movieId for r in got}


def test_users_with_few_ratings_are_served_by_the_new_user_blend(serve_run):
    spark, cfg, ctx = serve_run
    # FEW_RATINGS' users (1 and 2 ratings) are new users (recommend.new_user_max_ratings 5):
    # their lists lead with the fused popularity picks, named by a list that holds them.
    assert ctx.results["recommend"]["new_users"] >= len(FEW_RATINGS)
    got = _recs(spark, cfg.paths.warehouse).where(F.col("userId").isin(*FEW_RATINGS))
    assert got.where("source IS NULL").isEmpty()
    assert got.where("rank = 1 AND source = 'popularity'").count() >= 1


def test_a_movie_nobody_rated_reaches_a_fan_of_its_original_through_content(serve_run):
    spark, cfg, _ = serve_run
    wh = cfg.paths.warehouse
    # Its sequel title and genres make it a content neighbour of movie 2 ...
    sims = tables.read_table(spark, wh, "similar_movies").where("run_id = 'sv' AND movieId = 2")
    assert sims.where(f"similar_movieId = {NEW_MOVIE} AND rank = 1").count() == 1
    # ... so user 100002, who gave movie 2 five stars, gets it in their content list ...
    content = tables.read_table(spark, wh, "top_n").where("run_id = 'sv' AND model = 'content' AND userId = 100002")
    assert content.where(f"movieId = {NEW_MOVIE} AND because_movieId = 2").count() == 1
    # ... and, with recommend.new_movie_slots = 1, in the final list's last position.
    got = _recs(spark, wh).where(f"userId = 100002 AND movieId = {NEW_MOVIE}").collect()
    assert [(r["rank"], r.source, r.because_movieId) for r in got] == [(cfg.evaluation.top_n, "content", 2)]
    # Nobody's list has more than the one slot's worth of unrated movies.
    ratings = tables.read_table(spark, wh, "ratings").select("movieId").distinct()
    unrated = _recs(spark, wh).join(ratings, "movieId", "left_anti")
    assert unrated.groupBy("userId").count().where("count > 1").isEmpty()


def test_served_rows_carry_the_hybrids_predicted_rating(serve_run):
    spark, cfg, _ = serve_run
    recs = _recs(spark, cfg.paths.warehouse)
    # The hybrid's rating of each served pair, on the dataset's scale, next to the ranker's score.
    assert recs.where("predicted_rating IS NULL").isEmpty()
    lo, hi = tables.read_table(spark, cfg.paths.warehouse, "ratings").agg(F.min("rating"), F.max("rating")).first()
    assert recs.where(f"predicted_rating < {lo} OR predicted_rating > {hi}").isEmpty()
    # It is a rating, not the ranker's probability: it varies and is mostly above the probabilities.
    # (Over movies with ratings: the hybrid rates a new movie from its content alone.)
    rated = tables.read_table(spark, cfg.paths.warehouse, "ratings").select("movieId").distinct()
    stats = recs.join(rated, "movieId", "left_semi").agg(
        F.stddev("predicted_rating"), F.avg("predicted_rating"), F.max("score")).first()
    assert stats[0] > 0 and stats[1] > 1.5 and stats[2] <= 1.0


def test_a_serve_run_reports_validation_figures_not_test_ones(serve_run):
    spark, cfg, ctx = serve_run
    m = {(r.model, r.metric, r.k): (r.value, r.split) for r in
         tables.read_table(spark, cfg.paths.warehouse, "metrics").where("run_id = 'sv'").collect()}
    assert {split for _, split in m.values()} == {"validation"}
    rmse, _ = m[("hybrid", "rmse", None)]
    ndcg, _ = m[("hybrid", "ndcg", 10)]
    assert 0.5 < rmse < 1.2 and 0.0 < ndcg <= 1.0
    assert ctx.results["hybrid"]["validation"]["rmse"] == pytest.approx(rmse, abs=1e-4)
    # The GBT stopped on its validation rows or at its cap.
    assert 1 <= ctx.results["hybrid"]["trees"] <= cfg.hybrid.max_iter


def test_a_rerun_of_recommend_serves_newer_users_and_leaves_other_pointers_alone(serve_run, tmp_path):
    import datetime as dt

    spark, cfg, _ = serve_run
    shutil.copytree(cfg.paths.warehouse, tmp_path / "wh")
    wh = str(tmp_path / "wh")
    # A newer serve run ("newer") serves similar_movies ...
    row = [("similar_movies", "newer", 0, dt.datetime(2030, 1, 1))]
    tables.upsert(spark, spark.createDataFrame(row, schema=tables.TABLE_SCHEMAS["latest"]), wh, "latest")
    # ... and a user who rated two movies after sv's split arrives in `ratings`.
    late = [(200001, 1, 5.0, dt.datetime(2017, 9, 1)), (200001, 2, 4.0, dt.datetime(2017, 9, 2))]
    tables.append(spark, spark.createDataFrame(late, schema=tables.TABLE_SCHEMAS["ratings"]), wh, "ratings")
    # Rerunning sv's recommend stage carries sv's other stages' results along (its tuned
    # settings, its models) but points consumers only at what it wrote itself.
    again = make_config(tmp_path / "wh", recommend__new_movie_slots=1, **HYBRID_MODELS)
    ctx = run_pipeline(spark, again, None, stages=["recommend"], run_id="sv")
    assert "content" in ctx.results and ctx.results["recommend"]["cold_users"] == 1
    latest = {r.table_name: r.run_id for r in tables.read_table(spark, wh, "latest").collect()}
    assert latest == {"similar_movies": "newer", "recommendations": "sv"}
    # The newer user gets n popular_cold movies they did not rate.
    got = _recs(spark, wh).where("userId = 200001").collect()
    assert sorted(r["rank"] for r in got) == list(range(1, cfg.evaluation.top_n + 1))
    assert {r.source for r in got} == {"popular_cold"} and not {1, 2} & {r.movieId for r in got}


@pytest.fixture(scope="module")
def after_evaluate_runs(serve_run, tmp_path_factory):
    """The serve warehouse copied, then an evaluate run 'ev' and a second one 'ev2' (another
    seed, so another split; its split and baselines alone) started after the serve run; ev's metrics
    as first written."""
    spark, cfg, _ = serve_run
    root = tmp_path_factory.mktemp("after")
    shutil.copytree(cfg.paths.warehouse, root / "wh")
    wh = str(root / "wh")
    version = tables.table_version(spark, wh, "recommendations")
    user = sorted(FEW_RATINGS)[0]
    before = query.recs(wh, user)
    stages = ["split", "baselines", "evaluate"]
    ev = make_config(root / "wh", pipeline__mode="evaluate", **HYBRID_MODELS)
    run_pipeline(spark, ev, None, stages=stages, run_id="ev")
    metrics = tables.read_table(spark, wh, "metrics").where("run_id = 'ev'").cache()
    metrics.count()
    # ev2 writes a split and models of its own, which the rerun of ev's evaluate below must not
    # read; its own evaluate stage is asserted by nothing.
    ev2 = make_config(root / "wh", pipeline__mode="evaluate", pipeline__seed=7, **HYBRID_MODELS)
    run_pipeline(spark, ev2, None, stages=stages[:-1], run_id="ev2")
    return spark, wh, version, user, before, ev, metrics


def test_an_evaluate_run_leaves_the_served_output_alone(after_evaluate_runs):
    spark, wh, version, user, before, _, _ = after_evaluate_runs
    assert tables.table_version(spark, wh, "recommendations") == version
    latest = {r.table_name: r.run_id for r in tables.read_table(spark, wh, "latest").collect()}
    assert latest == {"recommendations": "sv", "similar_movies": "sv"}
    after = query.recs(wh, user)
    assert (after.meta["run_id"], after.rows) == (before.meta["run_id"], before.rows)
    kinds = {r.run_id: r.kind for r in tables.read_table(spark, wh, "runs").collect()}
    assert kinds == {"sv": "serve", "ev": "evaluate", "ev2": "evaluate"}
    assert _recs(spark, wh, "ev").isEmpty()


def test_a_rerun_of_evaluate_reads_its_own_runs_split(after_evaluate_runs):
    spark, wh, _, _, _, ev, first = after_evaluate_runs
    splits = tables.read_table(spark, wh, "rating_splits")
    a, b = (splits.where(f"run_id = '{r}' AND split = 'test'").select("userId", "movieId") for r in ("ev", "ev2"))
    assert a.exceptAll(b).count() > 0  # the two runs hold out different ratings
    run_pipeline(spark, ev, None, stages=["evaluate"], run_id="ev")
    again = tables.read_table(spark, wh, "metrics").where("run_id = 'ev'")
    cols = ["model", "metric", "k", "split", "value"]
    assert_df_equality(again.select(*cols), first.select(*cols), ignore_row_order=True, ignore_nullable=True,
                       allow_nan_equality=True)
    # A rerun under a run id keeps that run's kind.
    serve = make_config(Path(wh), **HYBRID_MODELS)
    with pytest.raises(PipelineError, match="run ev is a evaluate run"):
        run_pipeline(spark, serve, None, stages=["evaluate"], run_id="ev")


@pytest.mark.heavy
def test_a_reader_polling_recommendations_during_a_rewrite_sees_whole_versions(serve_run, tmp_path):
    """Rerun the recommend stage of run 'sv' with N = 5 instead of 10 while delta-rs polls the
    table: every read must show run 'sv' with exactly 10 or exactly 5 movies for every user
    (one version, whole), never a mix, a gap or an error."""
    from .test_kill import _movierec

    spark, cfg, _ = serve_run
    wh = tmp_path / "wh"
    shutil.copytree(cfg.paths.warehouse, wh)
    path = str(wh / "recommendations")
    users = {r.userId for r in _recs(spark, str(wh)).select("userId").distinct().collect()}
    # A user who rated (nearly) the whole 150-movie catalog gets fewer than N: min(N, unrated).
    n_movies = tables.read_table(spark, str(wh), "movies").count()
    unrated = {r.userId: n_movies - r.c for r in
               tables.read_table(spark, str(wh), "ratings").groupBy("userId").agg(F.count(F.lit(1)).alias("c"))
               .collect()}
    want = {n: {u: min(n, unrated[u]) for u in users} for n in (5, 10)}
    # Ranked by the hybrid's rating (the run's candidate features and model): the rewrite is what
    # is tested, not the ranker, and this way it takes seconds instead of a ranker's training.
    p = _movierec(["run", "--warehouse", str(wh), "--stages", "recommend", "--run-id", "sv",
                   *cli_settings(**HYBRID_MODELS), "--set", "evaluation.top_n=5", "--set", "hybrid.ranker=hybrid"],
                  wait=False)
    seen: dict[int, set[int]] = {}
    polls = 0
    try:
        while True:
            finished = p.poll() is not None
            t = RsTable(path)
            data = t.to_pyarrow_table(columns=["run_id", "userId", "rank"]).to_pylist()
            per_user: dict[int, list[int]] = {}
            for r in data:
                if r["run_id"] == "sv":
                    per_user.setdefault(r["userId"], []).append(r["rank"])
            sizes = {u: len(v) for u, v in per_user.items()}
            assert set(per_user) == users, f"version {t.version()}: users missing"
            whole = [n for n in (5, 10) if sizes == want[n]]
            assert whole, f"version {t.version()}: list sizes {sorted(set(sizes.values()))} are neither N=5 nor N=10"
            assert all(sorted(v) == list(range(1, len(v) + 1)) for v in per_user.values())
            seen.setdefault(whole[0], set()).add(t.version())
            polls += 1
            if finished:
                break
            time.sleep(0.2)  # the reader must not starve the writer of the 2 cores
    finally:
        if p.poll() is None:
            p.kill()
        out = p.communicate()[0]
    assert p.returncode == 0, out[-3000:]
    print(f"\n{polls} polls; versions seen by list size: {seen}")
    assert 10 in seen and 5 in seen  # the reader was there before and after the rewrite


def test_served_pairs_are_rated_from_features_of_the_whole_train_part(serve_run):
    # With the learned ranker the features stage featurises no candidates: the recommend stage
    # rates the pairs it serves, from the whole train part, with the neighbour lists the features
    # stage kept. The same rating as features computed from scratch for those pairs (their own
    # co-rating self-joins) through the run's hybrid model.
    from pyspark.ml import PipelineModel

    from movierec_spark.context import model_path, rating_scale
    from movierec_spark.features import pair_features
    from movierec_spark.hybrid import predict_hybrid
    from movierec_spark.stages import _feature_inputs

    spark, cfg, ctx = serve_run
    wh = cfg.paths.warehouse
    feats = tables.read_table(spark, wh, "features").where("run_id = 'sv'")
    assert feats.where("split != 'train'").isEmpty() and not feats.isEmpty()
    assert (Path(ctx.results["features"]["neighbours_path"]) / "user").is_dir()
    recs = _recs(spark, wh)
    train = tables.read_table(spark, wh, "rating_splits").where("run_id = 'sv' AND split = 'train'").select(
        "userId", "movieId", "rating", "rated_at")
    args, users = _feature_inputs(ctx)
    fresh = pair_features(train, recs.select("userId", "movieId"), *args, users=users)
    want = predict_hybrid(PipelineModel.load(model_path(ctx, "hybrid")), fresh, *rating_scale(ctx))
    got = recs.join(want.select("userId", "movieId", "prediction"), ["userId", "movieId"], "left")
    assert got.count() == recs.count()
    assert got.where("prediction IS NULL OR abs(prediction - predicted_rating) > 1e-6").isEmpty()
    fresh.unpersist()
