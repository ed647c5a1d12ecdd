"""The pipeline's stages: adapters that read a run's inputs, call library functions and write
the outputs through `tables`. `STAGES` is the registry the runner executes, in the order given."""

from __future__ import annotations

import logging
import time
from typing import Callable

from pyspark.sql import functions as F

from . import tables
from .context import (RunContext, bias_model, model_path, optional_table, rating_scale, run_table, split_frames,
                      write_predictions, write_run_table, write_top_n, write_validation)

log = logging.getLogger(__name__)


def ingest_stage(ctx: RunContext) -> dict:
    from .ingest import ingest_dataset

    if not ctx.input_path:
        raise ValueError("the ingest stage needs an input path")
    summary = ingest_dataset(ctx.spark, ctx.cfg, ctx.input_path, ctx.run_id)
    changed = sum(v.get("inserted", 0) + v.get("updated", 0) for v in summary.values())
    if ctx.cfg.ingest.incremental and changed == 0:
        ctx.stop_reason = "incremental input has no new or changed rows: the outputs are current"
    ratings = next((summary[f] for f in ("ratings.csv", "ratings.dat", "u.data") if f in summary), {})
    return {
        "files": len(summary),
        "loaded": sum(v["loaded"] for v in summary.values()),
        "rejected": sum(v["rejected"] for v in summary.values()),
        "changed": changed,
        "ratings": ratings.get("loaded"),
    }


def split_stage(ctx: RunContext) -> dict:
    from .splits import check_predefined_split, predefined_parts, serve_split, split_ratings

    ctx.release()  # frames derived from an earlier split are stale from here on
    cfg, spark, wh = ctx.cfg, ctx.spark, ctx.warehouse
    if cfg.split.train_file:
        movies = tables.read_table(spark, wh, "movies").select("movieId")
        checked = check_predefined_split(spark, cfg.split, movies, cfg.ingest.whole_file_max_bytes)
        try:
            from .ingest import enforce_threshold

            enforce_threshold(checked, cfg.ingest.reject_threshold)
            parts, rejects = predefined_parts(checked, ctx.run_id)
            tables.replace_where(spark, rejects, wh, "rejects", {"run_id": ctx.run_id})
            write_run_table(ctx, "rating_splits", parts)
        finally:
            for cf in checked.values():
                cf.df.unpersist()
        counts = {role: cf.counts for role, cf in checked.items()}
        _check_parts(ctx, *(counts[r].get("loaded", 0) for r in ("train", "test")),
                     f"--train {cfg.split.train_file} / --test {cfg.split.test_file}")
        return {"method": "predefined", **counts}
    ratings = tables.read_table(spark, wh, "ratings")
    if ctx.serving:  # no test part: every model learns from every rating
        parts, method = serve_split(ratings), "all ratings (serve run)"
    else:
        parts, method = split_ratings(ratings, cfg.split, cfg.pipeline.seed), cfg.split.method
    write_run_table(ctx, "rating_splits", parts)
    counts = {r["split"]: r["count"] for r in run_table(ctx, "rating_splits").groupBy("split").count().collect()}
    how = f"split.method={method}" + (f", split.cutoff={cfg.split.cutoff}" if method == "temporal_global" else "")
    _check_parts(ctx, counts.get("train", 0), counts.get("test", 0), how)
    return {"method": method, **counts}


def _check_parts(ctx: RunContext, train: int, test: int, how: str) -> None:
    """An empty train part (or an evaluate run's empty test part) stops the run with one line."""
    if not train:
        raise ValueError(f"split: the train part is empty ({how}): no model can learn from it"
                         + ("; is the warehouse's ratings table empty?" if ctx.serving else
                            "; choose a split that leaves ratings before the test part"))
    if not ctx.serving and not test:
        raise ValueError(f"split: the test part is empty ({how}): an evaluate run needs held-out ratings "
                         "(a later split.cutoff, a larger split.test_ratio, or a --test file with rows)")


def baselines_stage(ctx: RunContext) -> dict:
    from .baselines import global_mean, popularity_top_n
    from .tune import choose_rating_models

    train, test = split_frames(ctx)
    # May change ctx.cfg.baseline and ctx.cfg.als for the rest of the run (before the bias model
    # is fitted and memoised below).
    tuned = choose_rating_models(ctx, train, *rating_scale(ctx))
    mu = global_mean(train)
    if not ctx.serving:  # a serve run has no test part to predict
        write_predictions(ctx, "global_mean", test.withColumn("prediction", F.lit(mu)))
        preds = bias_model(ctx, train).predict(test).withColumnRenamed("baseline", "prediction")
        write_predictions(ctx, "bias_baseline", preds)
    write_top_n(ctx, "popularity", popularity_top_n(train, max(ctx.cfg.evaluation.ks)))
    return {"global_mean": round(mu, 4), **tuned}


def als_stage(ctx: RunContext) -> dict:
    """Explicit ALS on the bias baseline's residuals: predictions, factors, and its top-N."""
    from .als import factors_frame, fit_explicit, model_with_item_bias, predict_explicit, recommend_unseen
    from .session import run_concurrently

    cfg, spark = ctx.cfg, ctx.spark
    train, test = split_frames(ctx)
    lo, hi = rating_scale(ctx)
    t0 = time.perf_counter()
    bias = bias_model(ctx, train) if cfg.als.residual else None
    model = fit_explicit(train, bias, cfg.als, cfg.pipeline.seed)
    # The features stage's whole-train pass fits this same model (same ratings, bias, settings
    # and seed): it takes this one instead.
    ctx.shared["als_model"] = model
    out = {"fit_s": round(time.perf_counter() - t0, 2)}

    def predictions() -> None:
        preds = predict_explicit(model, bias, test, cfg.als.residual, lo, hi).cache()
        n_pairs, n_fallback = preds.agg(F.count(F.lit(1)), F.sum(F.col("fallback").cast("int"))).first()
        out["fallbacks"] = int(n_fallback or 0)
        log.info("als: %d of %d test pairs had a user or movie ALS never saw: bias baseline used",
                 out["fallbacks"], n_pairs)
        write_predictions(ctx, "als", preds)
        preds.unpersist()

    def factors(kind: str) -> Callable[[], None]:
        return lambda: tables.overwrite(spark, factors_frame(model, kind), ctx.warehouse, f"als_{kind}_factors")

    def top_n() -> None:
        ranker = model_with_item_bias(spark, model, bias) if cfg.als.residual else model
        recs = recommend_unseen(ranker, train, max(cfg.evaluation.ks))
        write_top_n(ctx, "als", recs)
        recs.unpersist()

    # The outputs are independent once the model exists; each is a chain of small jobs and
    # Delta commits, so they run side by side (ml-latest-small: 8.0 s in turn, 7.3 s together).
    jobs = {"user_factors": factors("user"), "item_factors": factors("item")}
    if not ctx.serving:  # a serve run has no test part to predict
        jobs["predict"] = predictions
    # Explicit ALS's lists are for evaluation; a serve run lists them only as candidates.
    if cfg.als.top_n and (not ctx.serving or "als" in cfg.hybrid.candidate_models):
        jobs["top_n"] = top_n
    t0 = time.perf_counter()
    run_concurrently(spark, jobs, out)
    out["outputs_s"] = round(time.perf_counter() - t0, 2)
    return out


def als_implicit_stage(ctx: RunContext) -> dict:
    """Implicit ALS, the collaborative ranking model: top-N lists without train movies."""
    from .als import fit_implicit, recommend_unseen
    from .ranker import implicit_pool
    from .tune import choose_implicit

    train, _ = split_frames(ctx)
    tuned = choose_implicit(ctx, train)  # may change ctx.cfg.als_implicit for the rest of the run
    cfg = ctx.cfg
    model = fit_implicit(train, cfg.als_implicit, cfg.pipeline.seed)
    n, pool = max(cfg.evaluation.ks), implicit_pool(cfg)
    # Scoring every user against every movie is this stage's cost: the learned ranker's longer
    # list (the pool) is listed in the same pass; its top n go to top_n, and the recommend stage
    # reads the rest instead of scoring everyone again (at 5M ratings that second pass was 45 s).
    recs = recommend_unseen(model, train, max(n, pool or 0))
    write_top_n(ctx, "als_implicit", recs.where(F.col("rank") <= n))
    out = {"rank": cfg.als_implicit.rank, **tuned}
    if pool:
        out["pool_path"], out["pool"] = model_path(ctx, "als_implicit_pool"), pool
        recs.write.mode("overwrite").parquet(out["pool_path"])
    recs.unpersist()
    out["model_path"] = model_path(ctx, "als_implicit")  # the ranker scores every candidate with it
    model.write().overwrite().save(out["model_path"])
    return out


def content_stage(ctx: RunContext) -> dict:
    """Movie attribute vectors and their top-K cosine neighbours into `similar_movies`; with a
    split, the content user model too (predictions and top-N lists as model 'content')."""
    from .content import content_predict, content_top_n, movie_neighbours, movie_vectors, neighbour_method

    spark, c = ctx.spark, ctx.cfg.content
    movies = tables.read_table(spark, ctx.warehouse, "movies")
    has_split = run_table(ctx, "rating_splits") is not None
    # Ties among equal similarities go to the movie with more train ratings (never a test one).
    pop = split_frames(ctx)[0].groupBy("movieId").agg(F.count(F.lit(1)).alias("n")) if has_split else None
    vectors = movie_vectors(movies, optional_table(ctx, "tags"), optional_table(ctx, "genome"), c, pop).cache()
    # One job for both figures (it also fills the cache the neighbour search reads).
    n, empty = vectors.agg(F.count(F.lit(1)), F.count(F.when(~F.col("has_content"), 1))).first()
    method = neighbour_method(c.method, n, c.exact_max_movies)
    write_run_table(ctx, "similar_movies", movie_neighbours(vectors, c, method, ctx.cfg.pipeline.seed))
    vectors.unpersist()
    log.info("content: %d movies (%d without any attribute: no neighbours), %s neighbours", n, empty, method)
    out = {"movies": n, "without_content": empty, "method": method}
    if not has_split:
        log.info("content: no rating_splits for this run, so no content user model (run the split stage first)")
        return out
    train, test = split_frames(ctx)
    sims = run_table(ctx, "similar_movies").cache()
    if not ctx.serving:  # a serve run has no test part to predict
        ctx.wait_for("baselines")  # the bias model at the settings its tuning chose (content may run beside it)
        preds = content_predict(test, train, sims, bias_model(ctx, train), c.predict_shrink,
                                *rating_scale(ctx)).cache()
        out["backed_off"] = preds.where(F.col("n_nb") == 0).count()
        write_predictions(ctx, "content", preds)
        preds.unpersist()
    recs = content_top_n(train, sims, max(ctx.cfg.evaluation.ks), c.user_sources, c.user_neighbours).cache()
    out["users_with_list"] = recs.select("userId").distinct().count()
    write_top_n(ctx, "content", recs)
    recs.unpersist()
    sims.unpersist()
    return out


def features_stage(ctx: RunContext) -> dict:
    """Hybrid features: train rows out-of-fold, test rows (and, with the hybrid ranker, the
    candidates) from the whole train part; a serve run with the learned ranker keeps the whole
    train part's neighbour lists for the pairs its recommend stage serves."""
    from .features import compute_passes, labelled_rows, plan_passes, with_folds

    cfg, spark = ctx.cfg, ctx.spark
    h = cfg.hybrid
    if h.folds < 2:
        raise ValueError(f"hybrid.folds must be >= 2 (got {h.folds}): out-of-fold features need a held-out fold")
    split_frames(ctx)  # its clear error when the run has no split
    # With their rating times (the time features), cached for the stage's passes.
    splits = run_table(ctx, "rating_splits")
    train, test = [splits.where(F.col("split") == s).select("userId", "movieId", "rating", "rated_at").cache()
                   for s in ("train", "test")]
    # Candidates are featurised here only when the hybrid ranks them. With the learned ranker a
    # serve run rates only the pairs it serves, in the recommend stage once the ranker has chosen
    # them (at 1M ratings about 300,000 candidates for 60,000 served pairs): this stage keeps the
    # whole train part's neighbour lists for that.
    cands = _candidates(ctx) if h.ranker == "hybrid" else None
    served_later = ctx.serving and cands is None
    passes, out = plan_passes(train, test, cands, h, cfg.pipeline.seed, train.count(),
                              whole_fit=ctx.serving and cands is not None, test_rows=not ctx.serving)
    args, users = _feature_inputs(ctx)
    folded = with_folds(train, cfg.pipeline.seed, h.folds) if h.shared_neighbours else None
    whole_nb: dict | None = {} if served_later else None
    # The learned ranker's item-kNN tables from this stage's movie self-join, when they sample
    # each user's ratings as the movie lists do (the same cap), for the recommend stage.
    ranker_nb: dict | None = ({} if h.ranker == "learned" and h.ranker_knn_neighbours and folded is not None
                              and "recommend" in cfg.pipeline.stages
                              and (h.ranker_knn_cap or h.cap_per_user) == h.cap_per_user else None)
    results = compute_passes(spark, passes, args, h.feature_threads, folded,
                             whole_als=ctx.shared.get("als_model") if cfg.als.residual else None,
                             whole_bias=(bias_model(ctx, split_frames(ctx)[0])
                                         if any(p.fold_out is None for p in passes) else None),
                             batched=h.batched_passes, users=users, whole_nb=whole_nb, ranker_nb=ranker_nb)
    write_run_table(ctx, "features", labelled_rows(passes, results))
    from .session import release

    if whole_nb:
        path = model_path(ctx, "neighbours")
        for kind, df in whole_nb.items():
            df.write.mode("overwrite").parquet(f"{path}/{kind}")
            release(df)
        out["neighbours_path"] = path
    if ranker_nb:
        path = model_path(ctx, "ranker_neighbours")
        ranker_nb["table"].write.mode("overwrite").parquet(path)
        release(ranker_nb["table"])
        out["ranker_neighbours"] = {"path": path, "neighbours": h.ranker_knn_neighbours,
                                    "cap": h.cap_per_user, "folds": h.folds}
    # Once each: a batched result stands for every out-of-fold pass (a second release of its
    # checkpoint makes the block manager warn about blocks already gone).
    for df in {id(d): d for d in results + [train, test]}.values():
        release(df)
    out.update({r["split"]: r["count"] for r in run_table(ctx, "features").groupBy("split").count().collect()})
    return out


def _feature_inputs(ctx: RunContext) -> tuple[tuple, object]:
    """(args, users): pair_features' positional arguments after the pairs (movies, similar
    movies, the model sections, seed, rating scale, implicit ALS's settings) and the users table
    when the GBT may take the demographics (None otherwise)."""
    from .hybrid import model_features

    cfg, h = ctx.cfg, ctx.cfg.hybrid
    sims = run_table(ctx, "similar_movies")
    if sims is None:
        log.info("features: no similar_movies (content stage not run): content features are filled")
    args = (tables.read_table(ctx.spark, ctx.warehouse, "movies"), sims, cfg.baseline, cfg.als, cfg.content, h,
            cfg.pipeline.seed, *rating_scale(ctx),
            # Implicit ALS's score costs an ALS fit per pass: only when the GBT takes it.
            cfg.als_implicit if "implicit" in model_features(h) else None)
    # Demographics where the layout has them (ml-100k, ml-1m) and the GBT may take them.
    users = optional_table(ctx, "users") if h.demographics != "off" and "demo" in _groups_taken(h) else None
    if users is not None:
        log.info("features: user demographics (gender, age, occupation) from the users table")
    return args, users


def _groups_taken(h) -> set[str]:
    """The feature groups of which the GBT may take at least one column."""
    from .hybrid import model_features

    cols = set(model_features(h))
    return {g for g, members in tables.FEATURE_GROUPS.items() if cols & set(members)}


def hybrid_stage(ctx: RunContext) -> dict:
    """GBTRegressor over the features: predictions (model 'hybrid'), validation figures and
    feature_importances."""
    from .evaluation import rating_metrics
    from .features import hash_sample
    from .hybrid import predict_hybrid

    cfg, spark = ctx.cfg, ctx.spark
    h, seed = cfg.hybrid, cfg.pipeline.seed
    lo, hi = rating_scale(ctx)
    feats = run_table(ctx, "features")
    if feats is None:
        raise ValueError(f"hybrid: run {ctx.run_id} has no features: run the features stage first")
    rows = feats.where(F.col("split") == "train")
    if h.validation_fraction > 0:
        # Out-of-fold rows the GBT does not train on: early stopping, and the validation figures.
        rows = rows.withColumn("is_val", hash_sample(["userId", "movieId"], seed + 3, h.validation_fraction))
    model, importances, trees, demo = _fit_with_demographics(rows, h, seed, lo, hi)
    out = {"top_features": [f for f, _ in importances[:5]], "trees": trees, **demo}
    if h.validation_fraction > 0:
        got = rating_metrics(predict_hybrid(model, rows.where("is_val AND label IS NOT NULL"), lo, hi),
                             label_col="label")
        write_validation(ctx, "hybrid", [(m, None, v) for m, v in got.items()], ranking=False)
        out["validation"] = {m: round(v, 4) for m, v in got.items() if m in ("rmse", "mae")}
    if not ctx.serving:
        preds = predict_hybrid(model, feats.where(F.col("split") == "test"), lo, hi).select(
            "userId", "movieId", F.col("label").alias("rating"), "prediction")
        write_predictions(ctx, "hybrid", preds)
    model.write().overwrite().save(model_path(ctx, "hybrid"))  # the recommend stage rates served pairs
    imp = spark.createDataFrame([(ctx.run_id, f, float(v)) for f, v in importances],
                                tables.TABLE_SCHEMAS["feature_importances"])
    tables.replace_where(spark, imp, ctx.warehouse, "feature_importances", {"run_id": ctx.run_id}, fresh=ctx.fresh)
    return out


def _fit_with_demographics(rows, h, seed: int, lo: float, hi: float):
    """fit_hybrid's (model, importances, trees) and what the stage records of the demographic
    features: without any in the rows, the GBT leaves them out (constant columns); with them and
    hybrid.demographics auto, it is fitted with and without them and the group stays only where it
    lowers the RMSE on the validation rows by hybrid.demographics_min_gain or more."""
    from .evaluation import rating_metrics
    from .hybrid import fit_hybrid, model_features, predict_hybrid

    cols = model_features(h)
    demo = [c for c in tables.FEATURE_GROUPS["demo"] if c in cols]
    if not demo:
        return (*fit_hybrid(rows, h, seed, cols), {})
    without = [c for c in cols if c not in demo]
    if rows.where((F.col("u_age") >= 0) | (F.col("u_male") >= 0)).isEmpty():
        return (*fit_hybrid(rows, h, seed, without), {})
    if h.demographics == "on" or "is_val" not in rows.columns:
        return (*fit_hybrid(rows, h, seed, cols), {"demographics": {"kept": True}})
    val = rows.where("is_val AND label IS NOT NULL").cache()
    fits, rmse = {}, {}
    for name, use in (("with", cols), ("without", without)):
        fits[name] = fit_hybrid(rows, h, seed, use)
        rmse[name] = rating_metrics(predict_hybrid(fits[name][0], val, lo, hi), label_col="label")["rmse"]
    val.unpersist()
    keep = rmse["with"] <= rmse["without"] - h.demographics_min_gain
    log.info("hybrid: validation RMSE %.4f with the demographic features, %.4f without: %s", rmse["with"],
             rmse["without"], "kept" if keep else "left out")
    return (*fits["with" if keep else "without"],
            {"demographics": {"kept": keep, **{f"rmse_{k}": round(v, 4) for k, v in rmse.items()}}})


def recommend_stage(ctx: RunContext) -> dict:
    """Final top-N per user: the candidate models' lists ranked by the learned ranker (or the
    hybrid's rating). A serve run writes them to `recommendations`, each with the hybrid's
    predicted rating; an evaluate run to top_n (model 'hybrid'), for the evaluate stage."""
    from .recommend import final_lists
    from .session import materialize, release

    cfg = ctx.cfg
    n, n_eval = cfg.evaluation.top_n, max(max(cfg.evaluation.ks), cfg.evaluation.top_n)
    cached, validation, tuned = [], [], {}
    if cfg.hybrid.ranker == "learned":
        scored, lists, cached, validation, tuned = _learned_scores(ctx)
        cfg = ctx.cfg  # with the ranker's pool and depth when they were chosen here
    else:
        scored, lists = _hybrid_scores(ctx)
    if validation:
        write_validation(ctx, "hybrid", validation, ranking=True)
    new = None
    if cfg.recommend.new_user_max_ratings > 0:
        from .recommend import blend_new_users

        times = run_table(ctx, "rating_splits").where(F.col("split") == "train").select(
            "userId", "movieId", "rated_at")
        # Scored once: the blend reads the scores twice (the new users' and everyone else's), and
        # Spark 4.2 reuses no exchange over cached data (SPARK-58767), so each read recomputed
        # the ranker's features from the (cached) train part. Cached, not checkpointed: a
        # columnar cache of every candidate's score is a fraction of the rows' heap size.
        scored = scored.cache()
        scored.count()
        cached.append(scored)
        scored, lists, new = blend_new_users(scored, lists, times, cfg, n_eval)
    # Materialized (a checkpoint): the counts and the write below read it, and it no longer
    # hangs on this run's top_n rows, which the evaluate run's write replaces.
    r = cfg.recommend
    sims = run_table(ctx, "similar_movies") if r.diversity > 0 else None
    if r.diversity > 0 and sims is None:
        log.warning("recommend: recommend.diversity=%s needs similar_movies (the content stage): lists "
                    "keep the ranker's order", r.diversity)
    deep = n_eval * r.diversity_pool if sims is not None else n_eval
    ranked = materialize(final_lists(scored, lists, cfg.hybrid.candidate_models, deep))
    if sims is not None:
        from .recommend import mmr_rerank

        # Diversity on request: the top n_eval re-picked by maximal marginal relevance.
        pool, ranked = ranked, materialize(mmr_rerank(ranked, sims, r.diversity, n_eval, r.near_duplicate))
        cached.append(pool)
    if r.new_movie_slots > 0:
        from .recommend import new_movie_slots

        rated = run_table(ctx, "rating_splits").where(F.col("split") == "train").select("movieId").distinct()
        cached.append(ranked)
        ranked = materialize(new_movie_slots(ranked, lists, rated, r.new_movie_slots, n, n_eval))
    # The stage record's user counts in one job over the lists (they were two).
    users, short = (ranked.groupBy("userId").agg(F.max("rank").alias("m"))
                    .agg(F.count(F.lit(1)), F.count(F.when(F.col("m") < n, 1))).first())
    out = {"users": users, "new_users": 0 if new is None else new.count(), "users_short_of_n": short}
    if validation:
        out["validation"] = {f"{m}@{k}": round(v, 4) for m, k, v in validation if k == 10 and m in ("precision", "ndcg")}
    out.update(tuned)
    if ctx.serving:
        out.update(_write_recommendations(ctx, ranked, n))
    else:
        # Written last: `ranked` descends from this run's top_n rows, and a write to top_n makes
        # Spark drop every cache that reads it (at 5M ratings, 115 s of recomputing the scoring).
        write_top_n(ctx, "hybrid", ranked)
    for df in [ranked, *cached]:
        release(df)
    return out


def _run_lists(ctx: RunContext):
    """This run's top-N lists of the candidate models (model, userId, rank, movieId, score, because_movieId)."""
    return tables.read_table(ctx.spark, ctx.warehouse, "top_n").where(
        (F.col("run_id") == ctx.run_id) & F.col("model").isin(ctx.cfg.hybrid.candidate_models))


def _hybrid_scores(ctx: RunContext):
    """(scored, lists): the candidates ranked by the hybrid's predicted rating."""
    from pyspark.ml import PipelineModel

    from .hybrid import predict_hybrid

    ctx.wait_for("features")  # this stage may have started beside it (pipeline.overlap)
    feats = run_table(ctx, "features")
    feats = feats.where(F.col("split") == "candidate") if feats is not None else None
    if feats is None or feats.isEmpty():
        raise ValueError("recommend: no candidate rows in `features`: with hybrid.ranker=hybrid, run the "
                         f"candidate models ({', '.join(ctx.cfg.hybrid.candidate_models)}) and the features "
                         "stage in this run first")
    ctx.wait_for("hybrid")  # the hybrid stage may be running beside this one
    model = PipelineModel.load(model_path(ctx, "hybrid"))
    scored = predict_hybrid(model, feats, *rating_scale(ctx)).select("userId", "movieId", "prediction")
    return scored, _run_lists(ctx)


def _learned_scores(ctx: RunContext):
    """(scored, lists, cached, validation, tuned): the learned ranker (trained here, saved with
    the run) scores this run's candidate lists, implicit ALS's extended to the pool from the
    model the als_implicit stage saved (refitted if this run saved none). With tuning on, the
    ranker's pool and depth are chosen on its validation users first (or reused, like every
    tuned setting, by a later serve run); tuned is what the stage result records ({} if not)."""
    from pyspark.ml.recommendation import ALSModel

    from .als import fit_implicit, recommend_unseen
    from .fs import exists
    from .ranker import pool_length, ranker_neighbours, serving_scores, train_ranker
    from .tune import ranker_search

    spark = ctx.spark
    train, _ = split_frames(ctx)
    search, tuned, n_train = ranker_search(ctx, train)
    cfg = ctx.cfg
    h, seed = cfg.hybrid, cfg.pipeline.seed
    times = run_table(ctx, "rating_splits").where(F.col("split") == "train").select("userId", "movieId", "rated_at")
    sims = run_table(ctx, "similar_movies")
    n_items = tables.read_table(spark, ctx.warehouse, "movies").count() if h.ranker_validation_users > 0 else 0
    # The kNN tables of the ranker's training part and of the whole train part: from the features
    # stage's movie self-join when it kept them for these settings, else from one self-join here.
    kept = (ctx.results.get("features") or {}).get("ranker_neighbours") or {}
    if kept and kept == {"path": kept.get("path"), "neighbours": h.ranker_knn_neighbours,
                         "cap": h.ranker_knn_cap or h.cap_per_user, "folds": h.folds} and exists(kept["path"]):
        nb_cached = spark.read.parquet(kept["path"]).cache()
        rest_nb, nb = nb_cached.where(F.col("p") == 0).drop("p"), nb_cached.where(F.col("p") == 1).drop("p")
    else:
        rest_nb, nb, nb_cached = ranker_neighbours(train, h, seed)
    t0 = time.perf_counter()
    model, validation, tune = train_ranker(train, times, sims, cfg, n_items, search=search, item_nb=rest_nb)
    if tune:
        tuned = {"tuned": {"settings": tune["settings"], "ratings": n_train, "run_id": ctx.run_id},
                 "tune": {"fits": len(tune["trials"]), "seconds": round(time.perf_counter() - t0, 1),
                          "trials": tune["trials"]}}
        ctx.apply_tuned(tuned["tuned"])
        cfg = ctx.cfg
        h = cfg.hybrid
    pool = pool_length(cfg)
    model.write().overwrite().save(model_path(ctx, "ranker"))

    lists, implicit, cached = _run_lists(ctx), None, []
    if "als_implicit" in h.candidate_models:
        listed = ctx.results.get("als_implicit") or {}
        saved = listed.get("model_path") == model_path(ctx, "als_implicit")
        implicit = ALSModel.load(listed["model_path"]) if saved else fit_implicit(train, cfg.als_implicit, seed)
        if saved and listed.get("pool_path") and listed.get("pool", 0) >= pool:
            ext = spark.read.parquet(listed["pool_path"]).where(F.col("rank") <= pool)
        else:
            ext = recommend_unseen(implicit, train, pool)
            cached.append(ext)
        ext = ext.select(F.lit("als_implicit").alias("model"), "userId", "rank", "movieId", "score",
                         F.lit(None).cast("int").alias("because_movieId"))
        lists = lists.where(F.col("model") != "als_implicit").select(*ext.columns).unionByName(ext)
    from .session import materialize

    lists = materialize(lists)
    cached += [df for df in (lists, nb_cached) if df is not None]
    scored = serving_scores(model, lists, train, times, nb, implicit, cfg)
    return scored, lists, cached, validation, tuned


def _write_recommendations(ctx: RunContext, ranked, n: int) -> dict:
    """A serve run's `recommendations`: the top n of the ranked lists with the hybrid's predicted
    rating of each pair, plus popularity lists for users who have ratings but none in this run's
    split (ratings ingested after it), without what they rated."""
    from .session import release

    spark, wh, run = ctx.spark, ctx.warehouse, ctx.run_id
    # The cold users' lists first: they need no model, and _predicted_ratings waits for the
    # hybrid stage running beside this one. Computed after that wait, finding the cold users
    # (every rating's user against the train part's) and their lists were about 85 task seconds
    # at 25M ratings on the run's critical path, once the hybrid model was done.
    n_cold, cold_recs = _cold_lists(ctx, n)
    served = ranked.where(F.col("rank") <= n)
    rated, feats = _predicted_ratings(ctx, served)
    served = (served.withColumn("predicted_rating", F.lit(None).cast("double")) if rated is None
              else served.join(rated, ["userId", "movieId"], "left")).select(*RECOMMENDATION_COLUMNS)
    recs = served if cold_recs is None else served.unionByName(cold_recs.select(*RECOMMENDATION_COLUMNS))
    tables.replace_where(spark, recs.select(F.lit(run).alias("run_id"), "*"), wh, "recommendations", {"run_id": run},
                         fresh=ctx.fresh)
    for df in (feats, cold_recs):
        if df is not None:
            release(df)
    return {"cold_users": n_cold}


# A `recommendations` row without its run_id.
RECOMMENDATION_COLUMNS = tables.TABLE_SCHEMAS["recommendations"].fieldNames()[1:]


def _cold_lists(ctx: RunContext, n: int):
    """recommend.materialized_cold_lists of this run: its ratings against its train part."""
    from .recommend import materialized_cold_lists

    times = run_table(ctx, "rating_splits").where(F.col("split") == "train").select("userId", "movieId", "rated_at")
    r = ctx.cfg.recommend
    return materialized_cold_lists(tables.read_table(ctx.spark, ctx.warehouse, "ratings").select(
        "userId", "movieId", "rated_at"), times, n, r.new_user_window_days if r.new_user_max_ratings > 0 else None)


def _predicted_ratings(ctx: RunContext, pairs):
    """(userId, movieId, predicted_rating: the hybrid's rating of `pairs` from this run's hybrid
    model, None, logged, when the run has no features or no model; the features frame it
    materialized for them, to `release` once used, or None). With the learned ranker the pairs
    are featurised here (_served_features); with the hybrid ranker the features stage did."""
    from pyspark.ml import PipelineModel

    from .fs import exists
    from .hybrid import predict_hybrid

    # This stage may have started beside the features and hybrid stages (pipeline.overlap).
    ctx.wait_for("features")
    feats, own = run_table(ctx, "features"), None
    if feats is not None and ctx.cfg.hybrid.ranker != "hybrid":
        # The learned ranker chose the pairs: their features from the whole train part, here.
        feats = own = _served_features(ctx, pairs)
    elif feats is not None:
        feats = feats.where(F.col("split") == "candidate").join(pairs.select("userId", "movieId"),
                                                               ["userId", "movieId"], "left_semi")
    ctx.wait_for("hybrid")  # the hybrid stage may be running beside this one
    path = model_path(ctx, "hybrid")
    if feats is None or not exists(path):
        log.warning("recommend: run %s has no %s: recommendations carry no predicted_rating "
                    "(run the features and hybrid stages in the run)", ctx.run_id,
                    "features" if feats is None else "hybrid model")
        return None, own
    return predict_hybrid(PipelineModel.load(path), feats, *rating_scale(ctx)).select(
        "userId", "movieId", F.col("prediction").alias("predicted_rating")), own


def _served_features(ctx: RunContext, pairs):
    """The hybrid's features of `pairs` (userId, movieId) from the whole train part (materialized):
    with the neighbour lists the features stage kept (computed here when it kept none), the als
    stage's model (refitted when this process has none, as on a resume) and the run's bias
    baseline (context.bias_model)."""
    from .features import pair_features
    from .fs import exists

    cfg = ctx.cfg
    train = run_table(ctx, "rating_splits").where(F.col("split") == "train").select(
        "userId", "movieId", "rating", "rated_at")
    args, users = _feature_inputs(ctx)
    path = (ctx.results.get("features") or {}).get("neighbours_path")
    nb = {}
    if path and exists(f"{path}/user") and exists(f"{path}/movie"):
        nb = {"user_nb": ctx.spark.read.parquet(f"{path}/user"), "movie_nb": ctx.spark.read.parquet(f"{path}/movie")}
    else:
        log.info("recommend: no saved neighbour lists of the whole train part: computed for the served pairs")
    als = ctx.shared.get("als_model") if cfg.als.residual else None
    log.info("recommend: the hybrid's features of the served pairs, from the whole train part")
    # The run's bias baseline (fitted once per run; the als stage's model learned on its
    # residuals), not a second fit of the same ratings: at 25M ratings a global mean, a cached
    # copy of every rating and four aggregations.
    return pair_features(train, pairs.select("userId", "movieId").distinct(), *args, als_model=als, users=users,
                         bias=bias_model(ctx, split_frames(ctx)[0]), **nb)


def _candidates(ctx: RunContext):
    """Distinct (userId, movieId) the final lists can hold: this run's top-N lists of the
    candidate models and implicit ALS's longer pool; None when there are none."""
    if not tables.table_exists(ctx.spark, tables.table_path(ctx.warehouse, "top_n")):
        return None
    top = _run_lists(ctx)
    if top.isEmpty():
        return None
    pairs = top.select("userId", "movieId")
    listed = ctx.results.get("als_implicit") or {}
    if listed.get("pool_path") and "als_implicit" in ctx.cfg.hybrid.candidate_models:
        pairs = pairs.unionByName(ctx.spark.read.parquet(listed["pool_path"]).select("userId", "movieId"))
    return pairs.distinct()


def evaluate_stage(ctx: RunContext) -> dict:
    """Metrics of every model this run predicted or ranked, from the predictions and top_n tables."""
    from .evaluation import evaluate_run, log_metrics

    if ctx.serving:
        log.info("evaluate: a serve run has no test part; its validation metrics come from the hybrid "
                 "and recommend stages (movierec evaluate runs the held-out protocol)")
        return {"skipped": "serve run: no test part"}
    spark, wh, run = ctx.spark, ctx.warehouse, ctx.run_id
    preds = tables.read_table(spark, wh, "predictions").where(F.col("run_id") == run)
    top = (tables.read_table(spark, wh, "top_n").where(F.col("run_id") == run)
           if tables.table_exists(spark, tables.table_path(wh, "top_n")) else None)
    train, test = split_frames(ctx) if top is not None else (None, None)
    n_items = tables.read_table(spark, wh, "movies").count() if top is not None else 0
    # Intra-list diversity by content similarity once similar_movies exists (pairs beyond each
    # movie's top-K count as dissimilar); by train co-occurrence before that.
    sims = run_table(ctx, "similar_movies")
    sweep = ctx.cfg.evaluation.diversity_sweep
    if top is not None and sweep and sims is not None:
        from .recommend import mmr_rerank

        # The final lists re-ordered by MMR at each lambda: the accuracy / diversity trade-off.
        final = top.where(F.col("model") == "hybrid").drop("model")
        n = max(ctx.cfg.evaluation.ks)
        for name, lam in {f"hybrid_mmr{lam:g}": lam for lam in sweep}.items():  # one model per name
            top = top.unionByName(mmr_rerank(final, sims, lam, n, ctx.cfg.recommend.near_duplicate)
                                  .withColumn("model", F.lit(name)).select(*top.columns))
        # Cached (released with the run's memo): each model's metrics read its rows, and the
        # re-ranks are pandas functions.
        top = ctx.memo("evaluate:top_with_mmr", lambda: top.cache())
    df, rows_by_model = evaluate_run(spark, run, preds, top, train, test, n_items, ctx.cfg.evaluation, sims)
    if df is None:
        raise ValueError("nothing to evaluate: run split and a model stage first")
    tables.replace_where(spark, df, wh, "metrics", {"run_id": run, "split": "test"}, fresh=ctx.fresh)
    return log_metrics(rows_by_model)


# The registry: stage name -> adapter, in the order a full run takes them.
STAGES: dict[str, Callable[[RunContext], dict | None]] = {
    "ingest": ingest_stage,
    "split": split_stage,
    "baselines": baselines_stage,
    "als": als_stage,
    "als_implicit": als_implicit_stage,
    "content": content_stage,
    "features": features_stage,
    "hybrid": hybrid_stage,
    "recommend": recommend_stage,
    "evaluate": evaluate_stage,
}
