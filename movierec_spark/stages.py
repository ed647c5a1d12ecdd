"""Built-in pipeline stages. Each is a thin adapter from RunContext to library functions."""

from __future__ import annotations

import logging
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
    """A MovieLens directory, or a GroupLens .zip extracted once (safely) under data_dir. A URI
    (s3a://, abfss://, gs://, hdfs://) names a directory, read where it lies."""
    if is_uri(input_path):
        from .fs import HadoopPath

        p = HadoopPath(input_path, SparkSession.getActiveSession())
        if not p.is_dir():
            raise FileNotFoundError(f"--input {input_path}: not a directory there (an object-store input is a "
                                    "MovieLens directory; a .zip must be local)")
        return p
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
    incremental = cfg.ingest.incremental
    layout = detect_layout(resolve_input(cfg, input_path), partial=incremental)
    known = None
    if incremental:
        if not tables.table_exists(spark, tables.table_path(cfg.paths.warehouse, "movies")):
            raise ValueError(f"--incremental: no movies table in {cfg.paths.warehouse}; ingest a full dataset first")
        known = tables.read_table(spark, cfg.paths.warehouse, "movies").select("movieId")
    checked = check_dataset(spark, layout, cfg.ingest.whole_file_max_bytes, now=now, known_movies=known)
    try:
        enforce_threshold(checked, cfg.ingest.reject_threshold)
        wh = cfg.paths.warehouse
        rejects = None
        for role in INGEST_ORDER:
            if role in checked:
                r = checked[role].rejects(run_id)
                rejects = r if rejects is None else rejects.unionByName(r)
        # No rejects, no commit (an unchanged incremental input leaves every table's version as
        # it was), unless a rerun of this run id must clear rejects it wrote before.
        if sum(c.rejected for c in checked.values()) or _has_run_rows(spark, wh, "rejects", run_id):
            tables.replace_where(spark, rejects, wh, "rejects", {"run_id": run_id})
        else:
            tables.ensure_table(spark, wh, "rejects")  # the table exists (empty) for readers
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


def _has_run_rows(spark, wh: str, name: str, run_id: str) -> bool:
    path = tables.table_path(wh, name)
    return tables.table_exists(spark, path) and not tables.read_table(spark, wh, name).where(
        F.col("run_id") == run_id).isEmpty()


@stage("ingest")
def ingest_stage(ctx: RunContext) -> dict:
    if not ctx.input_path:
        raise ValueError("the ingest stage needs an input path")
    summary = ingest(ctx.spark, ctx.cfg, ctx.input_path, ctx.run_id)
    changed = sum(v.get("inserted", 0) + v.get("updated", 0) for v in summary.values())
    if ctx.cfg.ingest.incremental and changed == 0:
        ctx.stop_reason = "incremental input has no new or changed rows: the outputs are current"
    return {
        "files": len(summary),
        "loaded": sum(v["loaded"] for v in summary.values()),
        "rejected": sum(v["rejected"] for v in summary.values()),
        "changed": changed,
        "ratings": summary.get("ratings.csv", summary.get("ratings.dat", summary.get("u.data", {}))).get("loaded"),
    }


# ---------------------------------------------------------------------------------------------
# Collaborative filtering: split, baselines, ALS


# Intermediates written per run: a stage of run X reads X's rows, never a later run's.
RUN_TABLES = ("rating_splits", "similar_movies", "features")


def _run_table(ctx: RunContext, name: str):
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


def _write_run_table(ctx: RunContext, name: str, df) -> None:
    """Replace this run's rows of a per-run intermediate."""
    tables.replace_where(ctx.spark, df.select(F.lit(ctx.run_id).alias("run_id"), "*"), ctx.warehouse, name,
                         {"run_id": ctx.run_id}, fresh=ctx.fresh)
    ctx.shared.pop(f"source:{name}", None)


def _split_frames(ctx: RunContext):
    """(train, test) as cached (userId, movieId, rating) frames, shared by the run's stages."""
    def build():
        splits = _run_table(ctx, "rating_splits")
        if splits is None:
            raise ValueError(f"run {ctx.run_id} has no rating_splits (nor does any earlier {ctx.cfg.pipeline.mode} "
                             "run): run the split stage in this run first")
        train = splits.where(F.col("split") == "train").select("userId", "movieId", "rating").cache()
        test = splits.where(F.col("split") == "test").select("userId", "movieId", "rating").cache()
        return train, test
    return ctx.memo("splits", build)


def _bias(ctx: RunContext, train):
    """The bias baseline of this run's split, fitted once per run."""
    from .baselines import fit_bias

    return ctx.memo("bias", lambda: fit_bias(train, ctx.cfg.baseline, *_scale(ctx)))


def _scale(ctx: RunContext) -> tuple[float, float]:
    def build():
        row = tables.read_table(ctx.spark, ctx.warehouse, "ratings").agg(F.min("rating"), F.max("rating")).first()
        return float(row[0]), float(row[1])
    return ctx.memo("scale", build)


def _write_predictions(ctx: RunContext, model: str, preds) -> None:
    df = preds.select(F.lit(ctx.run_id).alias("run_id"), F.lit(model).alias("model"),
                      "userId", "movieId", "rating", "prediction")
    tables.replace_where(ctx.spark, df, ctx.warehouse, "predictions", {"run_id": ctx.run_id, "model": model},
                         fresh=ctx.fresh)


def _write_top_n(ctx: RunContext, model: str, recs) -> None:
    because = F.col("because_movieId") if "because_movieId" in recs.columns else F.lit(None).cast("int")
    top = recs.select(F.lit(ctx.run_id).alias("run_id"), F.lit(model).alias("model"), "userId", "rank", "movieId",
                      "score", because.alias("because_movieId"))
    tables.replace_where(ctx.spark, top, ctx.warehouse, "top_n", {"run_id": ctx.run_id, "model": model},
                         fresh=ctx.fresh)


def predefined_split(ctx: RunContext):
    """rating_splits from --train/--test files, checked like ingest; bad rows go to rejects."""
    from .ingest import check_split_files, enforce_threshold
    from .layouts import rating_file_spec

    spark, cfg = ctx.spark, ctx.cfg
    movie_ids = tables.read_table(spark, ctx.warehouse, "movies").select("movieId")
    checked = check_split_files(
        spark, rating_file_spec(cfg.split.train_file), rating_file_spec(cfg.split.test_file), movie_ids,
        (0.5, 5.0, 0.5), cfg.ingest.whole_file_max_bytes)
    try:
        enforce_threshold(checked, cfg.ingest.reject_threshold)
        rejects = checked["train"].rejects(ctx.run_id).unionByName(checked["test"].rejects(ctx.run_id))
        tables.replace_where(spark, rejects, ctx.warehouse, "rejects", {"run_id": ctx.run_id})
        splits = None
        for role, cf in checked.items():
            part = cf.df.where(F.col("reason").isNull()).select(
                "userId", "movieId", "rating", "rated_at", F.lit(role).alias("split"))
            splits = part if splits is None else splits.unionByName(part)
        _write_run_table(ctx, "rating_splits", splits)
    finally:
        for cf in checked.values():
            cf.df.unpersist()
    return {role: cf.counts for role, cf in checked.items()}


@stage("split")
def split_stage(ctx: RunContext) -> dict:
    from .splits import split_ratings

    ctx.release()  # frames derived from an earlier split are stale from here on
    if ctx.cfg.split.train_file:
        return {"method": "predefined", **predefined_split(ctx)}
    ratings = tables.read_table(ctx.spark, ctx.warehouse, "ratings")
    if ctx.serving:
        # A serve run has no test part: every model learns from every rating.
        parts = ratings.select("userId", "movieId", "rating", "rated_at", F.lit("train").alias("split"))
        method = "all ratings (serve run)"
    else:
        parts, method = split_ratings(ratings, ctx.cfg.split, ctx.cfg.pipeline.seed), ctx.cfg.split.method
    _write_run_table(ctx, "rating_splits", parts)
    counts = {r["split"]: r["count"] for r in _run_table(ctx, "rating_splits").groupBy("split").count().collect()}
    return {"method": method, **counts}


@stage("baselines")
def baselines_stage(ctx: RunContext) -> dict:
    from .baselines import global_mean, popularity_top_n

    train, test = _split_frames(ctx)
    mu = global_mean(train)
    if not ctx.serving:  # a serve run has no test part to predict
        _write_predictions(ctx, "global_mean", test.withColumn("prediction", F.lit(mu)))
        bias = _bias(ctx, train)
        _write_predictions(ctx, "bias_baseline", bias.predict(test).withColumnRenamed("baseline", "prediction"))
    _write_top_n(ctx, "popularity", popularity_top_n(train, max(ctx.cfg.evaluation.ks)))
    return {"global_mean": round(mu, 4)}


@stage("als")
def als_stage(ctx: RunContext) -> dict:
    """Explicit ALS on the bias baseline's residuals: predictions, factors, and its top-N."""
    import time

    from .als import factors_frame, fit_explicit, model_with_item_bias, predict_explicit, recommend_unseen

    cfg, spark = ctx.cfg, ctx.spark
    train, test = _split_frames(ctx)
    lo, hi = _scale(ctx)
    out, t = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out[f"{name}_s"] = round(now - t, 2)
        t = now

    bias = _bias(ctx, train) if cfg.als.residual else None
    model = fit_explicit(train, bias, cfg.als, cfg.pipeline.seed)
    lap("fit")

    def predictions() -> None:
        preds = predict_explicit(model, bias, test, cfg.als.residual, lo, hi).cache()
        n_pairs, n_fallback = preds.agg(F.count(F.lit(1)), F.sum(F.col("fallback").cast("int"))).first()
        out["fallbacks"] = int(n_fallback or 0)
        log.info("als: %d of %d test pairs had a user or movie ALS never saw: bias baseline used",
                 out["fallbacks"], n_pairs)
        _write_predictions(ctx, "als", preds)
        preds.unpersist()

    def factors(kind: str):
        return lambda: tables.overwrite(spark, factors_frame(model, kind), ctx.warehouse, f"als_{kind}_factors")

    def top_n() -> None:
        ranker = model_with_item_bias(spark, model, bias) if cfg.als.residual else model
        recs = recommend_unseen(ranker, train, max(cfg.evaluation.ks))
        _write_top_n(ctx, "als", recs)
        recs.unpersist()

    # The three outputs are independent once the model exists. Each is a chain of small jobs
    # and Delta commits whose driver-side latency (log listing, commit files) leaves cores idle,
    # so they run side by side: measured on ml-latest-small, 8.0 s one after another, 7.3 s together.
    jobs = {"user_factors": factors("user"), "item_factors": factors("item")}
    if not ctx.serving:  # a serve run has no test part to predict
        jobs["predict"] = predictions
    # Explicit ALS's lists are for evaluation; a serve run lists them only as candidates.
    if cfg.als.top_n and (not ctx.serving or "als" in cfg.hybrid.candidate_models):
        jobs["top_n"] = top_n
    _concurrently(spark, jobs, out)
    lap("outputs")
    return out


def _concurrently(spark: SparkSession, jobs: dict, out: dict) -> None:
    """Run independent Spark actions from threads; record each one's seconds in out; re-raise the first error."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        out[f"{name}_s"] = round(time.perf_counter() - t0, 2)

    from pyspark import inheritable_thread_target

    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="stage") as pool:
        # Wrapped so the jobs keep the stage's job group (a plain thread starts without it).
        futures = [pool.submit(inheritable_thread_target(spark)(timed), name, fn) for name, fn in jobs.items()]
        for f in futures:
            f.result()


@stage("als_implicit")
def als_implicit_stage(ctx: RunContext) -> dict:
    """Implicit ALS, the collaborative ranking model: top-N lists without train movies."""
    from .als import fit_implicit, recommend_unseen

    cfg = ctx.cfg
    train, _ = _split_frames(ctx)
    model = fit_implicit(train, cfg.als_implicit, cfg.pipeline.seed)
    n = max(cfg.evaluation.ks)
    pool = _implicit_pool(cfg)
    # Scoring every user against every movie is this stage's cost, and it grows with users x
    # movies. The learned ranker wants implicit ALS's longer list (the pool): it is listed here
    # in the same pass, the top n of it go to top_n, and the recommend stage reads the rest
    # instead of scoring everyone again (at 5M ratings that second pass was 45 s).
    recs = recommend_unseen(model, train, max(n, pool or 0))
    _write_top_n(ctx, "als_implicit", recs.where(F.col("rank") <= n))
    out = {"rank": cfg.als_implicit.rank}
    if pool:
        out["pool_path"], out["pool"] = _model_path(ctx, "als_implicit_pool"), pool
        recs.write.mode("overwrite").parquet(out["pool_path"])
    recs.unpersist()
    # Kept for the recommend stage's learned ranker (its score for every candidate).
    out["model_path"] = _model_path(ctx, "als_implicit")
    model.write().overwrite().save(out["model_path"])
    return out


def _pool_length(cfg) -> int:
    """How long a candidate list per model the learned ranker takes: the pool, at least max(ks)."""
    return max(cfg.hybrid.candidate_pool, max(cfg.evaluation.ks))


def _implicit_pool(cfg) -> int | None:
    """How long a list of implicit ALS the als_implicit stage keeps for the learned ranker
    (None: no learned ranker in this run)."""
    h = cfg.hybrid
    if h.ranker != "learned" or "als_implicit" not in h.candidate_models or "recommend" not in cfg.pipeline.stages:
        return None
    return _pool_length(cfg)


@stage("evaluate")
def evaluate_stage(ctx: RunContext) -> dict:
    """Metrics of every model this run predicted or ranked, from the predictions and top_n tables."""
    from .evaluation import evaluate_ranking_model, metrics_frame, rating_metrics

    spark, wh, run = ctx.spark, ctx.warehouse, ctx.run_id
    if ctx.serving:
        log.info("evaluate: a serve run has no test part; its validation metrics come from the hybrid "
                 "and recommend stages (movierec evaluate runs the held-out protocol)")
        return {"skipped": "serve run: no test part"}
    rows_by_model: dict[str, list] = {}
    preds = tables.read_table(spark, wh, "predictions").where(F.col("run_id") == run)
    for model in sorted(r.model for r in preds.select("model").distinct().collect()):
        p = preds.where(F.col("model") == model)
        rows_by_model.setdefault(model, []).extend((m, None, v) for m, v in rating_metrics(p).items())
    if tables.table_exists(spark, tables.table_path(wh, "top_n")):
        train, test = _split_frames(ctx)
        n_items = tables.read_table(spark, wh, "movies").count()
        top = tables.read_table(spark, wh, "top_n").where(F.col("run_id") == run)
        # Intra-list diversity by content similarity once similar_movies exists (pairs beyond
        # each movie's top-K count as dissimilar); by train co-occurrence before that.
        sims = _run_table(ctx, "similar_movies")
        for model in sorted(r.model for r in top.select("model").distinct().collect()):
            recs = top.where(F.col("model") == model).select("userId", "movieId", "rank").cache()
            rows_by_model.setdefault(model, []).extend(evaluate_ranking_model(
                recs, test, train, n_items, ks=tuple(ctx.cfg.evaluation.ks),
                relevance_threshold=ctx.cfg.evaluation.relevance_threshold, similarity=sims))
            recs.unpersist()
    frames = [metrics_frame(spark, run, m, "test", rows) for m, rows in rows_by_model.items()]
    if not frames:
        raise ValueError("nothing to evaluate: run split and a model stage first")
    df = frames[0]
    for f in frames[1:]:
        df = df.unionByName(f)
    tables.replace_where(spark, df, wh, "metrics", {"run_id": run, "split": "test"}, fresh=ctx.fresh)
    out = {}
    for model, rows in rows_by_model.items():
        for metric, k, value in rows:
            log.info("metric %-13s %-10s %-4s %.4f", model, metric, "" if k is None else f"@{k}", value)
        out[model] = {f"{m}@{k}" if k else m: round(v, 4) for m, k, v in rows
                      if (k is None and m in ("rmse", "mae")) or (k == 10 and m in ("precision", "ndcg"))}
    return out


@stage("content")
def content_stage(ctx: RunContext) -> dict:
    """Movie attribute vectors and their top-K cosine neighbours into `similar_movies`; with a
    split, the content user model too (predictions and top-N lists as model 'content')."""
    from .content import content_predict, content_top_n, exact_neighbours, lsh_neighbours, movie_vectors

    spark, wh, c = ctx.spark, ctx.warehouse, ctx.cfg.content
    movies = tables.read_table(spark, wh, "movies")
    vectors = movie_vectors(movies, _optional(ctx, "tags"), _optional(ctx, "genome"), c).cache()
    n = vectors.count()
    empty = vectors.where(~F.col("has_content")).count()
    method = c.method if c.method != "auto" else ("exact" if n <= c.exact_max_movies else "lsh")
    if method == "exact":
        sims = exact_neighbours(vectors, c.k)
    else:
        sims = lsh_neighbours(vectors, c.k, c.lsh_bits, c.lsh_tables, c.lsh_bucket_cap, ctx.cfg.pipeline.seed)
    _write_run_table(ctx, "similar_movies", sims)
    vectors.unpersist()
    log.info("content: %d movies (%d without any attribute: no neighbours), %s neighbours", n, empty, method)
    out = {"movies": n, "without_content": empty, "method": method}
    if _run_table(ctx, "rating_splits") is None:
        log.info("content: no rating_splits for this run, so no content user model (run the split stage first)")
        return out
    train, test = _split_frames(ctx)
    sims = _run_table(ctx, "similar_movies").cache()
    if not ctx.serving:  # a serve run has no test part to predict
        preds = content_predict(test, train, sims, _bias(ctx, train), c.predict_shrink, *_scale(ctx)).cache()
        out["backed_off"] = preds.where(F.col("n_nb") == 0).count()
        _write_predictions(ctx, "content", preds)
        preds.unpersist()
    recs = content_top_n(train, sims, max(ctx.cfg.evaluation.ks), c.user_sources, c.user_neighbours).cache()
    out["users_with_list"] = recs.select("userId").distinct().count()
    _write_top_n(ctx, "content", recs)
    recs.unpersist()
    sims.unpersist()
    return out


@stage("features")
def features_stage(ctx: RunContext) -> dict:
    """Hybrid features: train rows out-of-fold, test rows from the whole train part."""
    from .features import gbt_sample, oof_plan, pair_features

    cfg, spark, wh = ctx.cfg, ctx.spark, ctx.warehouse
    h, seed = cfg.hybrid, cfg.pipeline.seed
    if h.folds < 2:
        raise ValueError(f"hybrid.folds must be >= 2 (got {h.folds}): out-of-fold features need a held-out fold")
    train, test = _split_frames(ctx)
    lo, hi = _scale(ctx)
    movies = tables.read_table(spark, wh, "movies")
    sims = _run_table(ctx, "similar_movies")
    if sims is None:
        log.info("features: no similar_movies (content stage not run): content features are filled")
    fold = F.pmod(F.xxhash64("userId", "movieId", F.lit(seed)), F.lit(h.folds)).cast("int")
    folded = train.withColumn("fold", fold)
    args = (movies, sims, cfg.baseline, cfg.als, cfg.content, h, seed, lo, hi)
    out = {}
    n_train = train.count()
    n_oof, frac = oof_plan(n_train, h)
    keep = F.lit(True) if frac >= 1.0 else gbt_sample(seed, frac)
    if frac < 1.0:
        log.info("features: out-of-fold rows of %d fold(s), a %.1f%% hash sample of them (hybrid.max_train_rows=%d)",
                 n_oof, 100 * frac, h.max_train_rows)
    # Test pairs (and the recommendation candidates, when the hybrid's rating ranks them; the
    # learned ranker builds its own inputs) get features from the whole train part in a pass
    # of their own, or, with test_features 'fold', ride along with fold 0's rows: the same ALS
    # fit and neighbour lists, so one pass fewer and train and test features from fits of
    # the same size.
    test_mode = h.test_features
    if test_mode == "auto":
        test_mode = "fold" if n_oof == 1 and frac < 1.0 else "full"
    # A serve run featurises the recommendation candidates (the hybrid's predicted rating of each
    # served pair) from models fitted on all the ratings, never from a fold's.
    if ctx.serving:
        test_mode = "full"
    cands = _candidates(ctx) if h.ranker == "hybrid" or ctx.serving else None
    pairs = test.withColumn("split", F.lit("test"))
    if cands is not None:
        pairs = pairs.unionByName(cands.select("userId", "movieId", F.lit(None).cast("double").alias("rating"),
                                               F.lit("candidate").alias("split")))
    names = ("test", "candidate") if cands is not None else ("test",)
    out.update(oof_folds=n_oof, oof_fraction=round(frac, 4), test_features=test_mode)

    cached, frames = [], []

    def with_labels(feats, rows, split: str, f: int):
        return (feats.join(rows.select("userId", "movieId", F.col("rating").alias("label")), ["userId", "movieId"])
                .withColumn("split", F.lit(split)).withColumn("fold", F.lit(f)))

    # The passes are independent; hybrid.feature_threads > 1 runs them side by side (on more
    # cores: on 2 cores it measured slower, see config).
    passes = []  # (what, fit rows, keys to featurise, [(split name, labelled rows, fold)])
    for f in range(n_oof):
        rows = folded.where((F.col("fold") == f) & keep)
        shared = f == 0 and test_mode == "fold"
        keys = rows.select("userId", "movieId")
        if shared:
            keys = keys.unionByName(pairs.select("userId", "movieId")).distinct()
        label = [("train", rows, f)] + ([(n, pairs.where(F.col("split") == n), -1) for n in names] if shared else [])
        what = f"fold {f + 1}/{n_oof} (train rows of this fold{' and the test rows' if shared else ''}, " \
               f"from the other {h.folds - 1} folds)"
        passes.append((what, folded.where(F.col("fold") != f), keys, label))
    if test_mode == "full":
        passes.append((f"test rows{' and candidates' if cands is not None else ''}, from the whole train part",
                       train, pairs.select("userId", "movieId").distinct(),
                       [(n, pairs.where(F.col("split") == n), -1) for n in names]))
    threads = h.feature_threads

    def run_pass(p):
        what, fit, keys, _ = p
        log.info("features: %s", what)
        return pair_features(fit, keys, *args)

    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        from pyspark import inheritable_thread_target

        # inheritable_thread_target: the pass's jobs keep this stage's job group (the scale
        # harness and the kill test attribute jobs by it).
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="features") as pool:
            results = list(pool.map(inheritable_thread_target(spark)(run_pass), passes))
    else:
        results = [run_pass(p) for p in passes]
    for p, feats in zip(passes, results):
        cached.append(feats)
        frames += [with_labels(feats, rows, split, f) for split, rows, f in p[3]]
    df = frames[0]
    for p in frames[1:]:
        df = df.unionByName(p)
    _write_run_table(ctx, "features", df)
    for p in cached:
        p.unpersist()
    counts = {r["split"]: r["count"] for r in _run_table(ctx, "features").groupBy("split").count().collect()}
    out.update(counts)
    return out


@stage("hybrid")
def hybrid_stage(ctx: RunContext) -> dict:
    """GBTRegressor over the features: predictions (model 'hybrid') and feature_importances."""
    from .hybrid import fit_hybrid, predict_hybrid

    from .evaluation import rating_metrics
    from .features import hash_sample

    cfg, spark, wh = ctx.cfg, ctx.spark, ctx.warehouse
    h, seed = cfg.hybrid, cfg.pipeline.seed
    lo, hi = _scale(ctx)
    feats = _run_table(ctx, "features")
    if feats is None:
        raise ValueError(f"hybrid: run {ctx.run_id} has no features: run the features stage first")
    rows = feats.where(F.col("split") == "train")
    if h.validation_fraction > 0:
        # Out-of-fold rows the GBT does not train on: early stopping, and the validation figures.
        rows = rows.withColumn("is_val", hash_sample(["userId", "movieId"], seed + 3, h.validation_fraction))
    model, importances, trees = fit_hybrid(rows, h, seed)
    out = {"top_features": [f for f, _ in importances[:5]], "trees": trees}
    if h.validation_fraction > 0:
        val = predict_hybrid(model, rows.where("is_val AND label IS NOT NULL"), lo, hi)
        got = rating_metrics(val, label_col="label")
        _write_validation(ctx, "hybrid", [(m, None, v) for m, v in got.items()], ranking=False)
        out["validation"] = {m: round(v, 4) for m, v in got.items() if m in ("rmse", "mae")}
    if not ctx.serving:
        preds = predict_hybrid(model, feats.where(F.col("split") == "test"), lo, hi).select(
            "userId", "movieId", F.col("label").alias("rating"), "prediction")
        _write_predictions(ctx, "hybrid", preds)
    # Saved for the recommend stage (and for anyone who wants to score pairs later).
    model.write().overwrite().save(_model_path(ctx, "hybrid"))
    imp = spark.createDataFrame([(ctx.run_id, f, float(v)) for f, v in importances],
                                tables.TABLE_SCHEMAS["feature_importances"])
    tables.replace_where(spark, imp, wh, "feature_importances", {"run_id": ctx.run_id}, fresh=ctx.fresh)
    return out


def _write_validation(ctx: RunContext, model: str, rows: list, ranking: bool) -> None:
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


def _learned_scores(ctx: RunContext):
    """(scored, lists, cached, validation): userId, movieId, prediction = the learned ranker's
    probability for this run's candidates; the candidate lists it scored (userId, movieId,
    model, rank, score, because_movieId); the cached frames to unpersist once the output is
    written; and the validation metric rows of its lists (empty when switched off).

    Trained on fold 0 of train (the features stage's hash folds) with candidate models
    refitted on the other folds, so neither the ranker nor its inputs see the test part. A
    hash share of the users (`hybrid.ranker_validation_users`) is left out of its training:
    its ranked lists for them, against their fold-0 movies, are the validation figures.
    """
    from pyspark.ml.recommendation import ALSModel

    from .als import fit_implicit, recommend_unseen
    from .baselines import top_n_per_user
    from .evaluation import evaluate_ranking_model
    from .features import hash_sample
    from .ranker import candidate_lists, fit_ranker, item_neighbours, rank_scores, ranker_features, sample_users

    cfg, spark, wh, run = ctx.cfg, ctx.spark, ctx.warehouse, ctx.run_id
    h = cfg.hybrid
    models, seed = h.candidate_models, cfg.pipeline.seed
    n = max(cfg.evaluation.ks)
    pool = _pool_length(cfg)
    train, _ = _split_frames(ctx)
    times = _run_table(ctx, "rating_splits").where(F.col("split") == "train").select("userId", "movieId", "rated_at")
    sims = _run_table(ctx, "similar_movies")
    fold = F.pmod(F.xxhash64("userId", "movieId", F.lit(seed)), F.lit(h.folds))
    rest, held = train.where(fold != 0).cache(), train.where(fold == 0)

    def knn(fit):
        cap = h.ranker_knn_cap or h.cap_per_user
        return item_neighbours(fit, h.ranker_knn_neighbours, cap, seed).cache() if h.ranker_knn_neighbours else None

    lists, implicit, inner = candidate_lists(rest, sims, models, cfg, n, seed, pool,
                                             users=sample_users(rest, h.ranker_max_users, seed))
    lists = lists.cache()
    nb = knn(rest)
    feats, names = ranker_features(lists, rest, models, pool, implicit, times.where(fold != 0), nb)
    labelled = (feats.join(held.select("userId", "movieId", F.lit(1.0).alias("label")), ["userId", "movieId"], "left")
                .fillna({"label": 0.0}))
    val_share = h.ranker_validation_users
    is_val = hash_sample(["userId"], seed + 4, val_share) if val_share > 0 else F.lit(False)
    model = fit_ranker(labelled.where(~is_val), names, seed, h.ranker_max_iter, h.ranker_max_depth)
    validation = []
    if val_share > 0:
        # The final lists of users the ranker never trained on, scored like every list, against
        # the movies of theirs the candidate models did not see.
        n_eval = max(max(cfg.evaluation.ks), cfg.evaluation.top_n)
        vfeats = feats.where(is_val)
        vlists = top_n_per_user(rank_scores(model, vfeats), n_eval, score=F.col("p"))
        vheld = held.join(vfeats.select("userId").distinct(), "userId", "left_semi")
        n_items = tables.read_table(spark, wh, "movies").count()
        validation = evaluate_ranking_model(vlists, vheld, rest, n_items, ks=tuple(cfg.evaluation.ks),
                                            relevance_threshold=cfg.evaluation.relevance_threshold, similarity=sims)
    for df in (rest, lists, nb, *inner):
        if df is not None:
            df.unpersist()
    model.write().overwrite().save(_model_path(ctx, "ranker"))

    # At recommendation time: the run's own lists, implicit ALS's extended to the pool from the
    # model the als_implicit stage saved (refitted if this run did not save one).
    run_lists = tables.read_table(spark, wh, "top_n").where((F.col("run_id") == run) & F.col("model").isin(models))
    implicit, cached = None, []
    if "als_implicit" in models:
        path = _model_path(ctx, "als_implicit")
        saved = (ctx.results.get("als_implicit") or {}).get("model_path") == path
        implicit = ALSModel.load(path) if saved else fit_implicit(train, cfg.als_implicit, seed)
        listed = ctx.results.get("als_implicit") or {}
        if saved and listed.get("pool_path") and listed.get("pool", 0) >= pool:
            ext = spark.read.parquet(listed["pool_path"]).where(F.col("rank") <= pool)
        else:
            ext = recommend_unseen(implicit, train, pool)
            cached.append(ext)
        ext = ext.select(
            F.lit("als_implicit").alias("model"), "userId", "rank", "movieId", "score",
            F.lit(None).cast("int").alias("because_movieId"))
        run_lists = run_lists.where(F.col("model") != "als_implicit").select(*ext.columns).unionByName(ext)
    run_lists = run_lists.cache()
    nb = knn(train)
    cached += [run_lists, nb]
    run_feats, _ = ranker_features(run_lists, train, models, pool, implicit, times, nb)
    scored = rank_scores(model, run_feats).withColumnRenamed("p", "prediction")
    return scored, run_lists, [c for c in cached if c is not None], validation


def _model_path(ctx: RunContext, name: str) -> str:
    """A model of this run: `<warehouse>/_models/<run_id>/<name>` (maintain prunes old runs')."""
    from .config import join_path

    return join_path(ctx.warehouse, "_models", ctx.run_id, name)


@stage("recommend")
def recommend_stage(ctx: RunContext) -> dict:
    """Final top-N per user: the candidate models' lists ranked by the learned ranker (or the
    hybrid's rating). A serve run writes them to `recommendations`, each with the hybrid's
    predicted rating; an evaluate run to top_n (model 'hybrid'), for the evaluate stage."""
    from pyspark.ml import PipelineModel

    from .baselines import top_n_per_user
    from .hybrid import predict_hybrid

    cfg, spark, wh, run = ctx.cfg, ctx.spark, ctx.warehouse, ctx.run_id
    n, n_eval = cfg.evaluation.top_n, max(max(cfg.evaluation.ks), cfg.evaluation.top_n)
    lo, hi = _scale(ctx)
    lists = tables.read_table(spark, wh, "top_n").where(
        (F.col("run_id") == run) & F.col("model").isin(cfg.hybrid.candidate_models))
    cached, validation = [], []
    if cfg.hybrid.ranker == "learned":
        scored, lists, cached, validation = _learned_scores(ctx)
    else:
        feats = _run_table(ctx, "features")
        feats = feats.where(F.col("split") == "candidate") if feats is not None else None
        if feats is None or feats.isEmpty():
            raise ValueError("recommend: no candidate rows in `features`: with hybrid.ranker=hybrid, run the "
                             f"candidate models ({', '.join(cfg.hybrid.candidate_models)}) and the features "
                             "stage in this run first")
        model = PipelineModel.load(_model_path(ctx, "hybrid"))
        scored = predict_hybrid(model, feats, lo, hi).select("userId", "movieId", "prediction")
    if validation:
        _write_validation(ctx, "hybrid", validation, ranking=True)
    # Which model brought the movie in: the first in candidate_models' order that listed it.
    prio = F.array_position(F.array(*[F.lit(m) for m in cfg.hybrid.candidate_models]), F.col("model"))
    src = (lists
           .groupBy("userId", "movieId")
           .agg(F.min_by(F.struct("model", "because_movieId"), prio).alias("s"),
                F.max("because_movieId").alias("any_because")))
    ranked = top_n_per_user(scored.join(src, ["userId", "movieId"]), n_eval, score=F.col("prediction")).join(
        src, ["userId", "movieId"]).select(
        "userId", "rank", "movieId", "score", F.col("s.model").alias("source"),
        F.coalesce(F.col("s.because_movieId"), F.col("any_because")).alias("because_movieId")).cache()
    users = ranked.select("userId").distinct().count()
    short = ranked.groupBy("userId").agg(F.max("rank").alias("m")).where(F.col("m") < n).count()
    out = {"users": users, "users_short_of_n": short}
    if validation:
        out["validation"] = {f"{m}@{k}": round(v, 4) for m, k, v in validation if k == 10 and m in ("precision", "ndcg")}
    if ctx.serving:
        out.update(_write_recommendations(ctx, ranked, n, lo, hi))
    else:
        # Written last: `ranked` descends from this run's top_n rows, and a write to top_n makes
        # Spark drop every cache that reads it, so anything after it would recompute the whole
        # scoring (at 5M ratings the recommendations write took 115 s doing that).
        _write_top_n(ctx, "hybrid", ranked)
    ranked.unpersist()
    for df in cached:
        df.unpersist()
    return out


def _write_recommendations(ctx: RunContext, ranked, n: int, lo: float, hi: float) -> dict:
    """A serve run's `recommendations`: the top n of the ranked lists with the hybrid's predicted
    rating of each pair, plus popularity lists for users who have ratings but none in this run's
    split (ratings ingested after it), without what they rated."""
    from .baselines import popularity_top_n

    spark, wh, run = ctx.spark, ctx.warehouse, ctx.run_id
    served = ranked.where(F.col("rank") <= n)
    rated = _predicted_ratings(ctx, served, lo, hi)
    if rated is None:
        served = served.withColumn("predicted_rating", F.lit(None).cast("double"))
    else:
        served = served.join(rated, ["userId", "movieId"], "left")
    train, _ = _split_frames(ctx)
    ratings = tables.read_table(spark, wh, "ratings").select("userId", "movieId")
    cold = ratings.join(train.select("userId").distinct(), "userId", "left_anti")
    cold_recs = popularity_top_n(train, n, seen=cold).select(
        "userId", "rank", "movieId", "score", F.lit("popular_cold").alias("source"),
        F.lit(None).cast("int").alias("because_movieId"), F.lit(None).cast("double").alias("predicted_rating"))
    recs = served.select(*cold_recs.columns).unionByName(cold_recs).select(F.lit(run).alias("run_id"), "*")
    tables.replace_where(spark, recs, wh, "recommendations", {"run_id": run}, fresh=ctx.fresh)
    return {"cold_users": cold.select("userId").distinct().count()}


def _predicted_ratings(ctx: RunContext, pairs, lo: float, hi: float):
    """userId, movieId, predicted_rating: the hybrid's rating of `pairs`, from this run's
    candidate features and hybrid model (None, logged, when the run has neither)."""
    from pyspark.ml import PipelineModel

    from .fs import exists
    from .hybrid import predict_hybrid

    feats, path = _run_table(ctx, "features"), _model_path(ctx, "hybrid")
    if feats is None or not exists(path):
        log.warning("recommend: run %s has no %s: recommendations carry no predicted_rating "
                    "(run the features and hybrid stages in the run)", ctx.run_id,
                    "features" if feats is None else "hybrid model")
        return None
    cands = feats.where(F.col("split") == "candidate").join(pairs.select("userId", "movieId"),
                                                           ["userId", "movieId"], "left_semi")
    return predict_hybrid(PipelineModel.load(path), cands, lo, hi).select(
        "userId", "movieId", F.col("prediction").alias("predicted_rating"))


def _candidates(ctx: RunContext):
    """Distinct (userId, movieId) the final lists can hold: this run's top-N lists of the
    candidate models and implicit ALS's longer pool; None when there are none."""
    if not tables.table_exists(ctx.spark, tables.table_path(ctx.warehouse, "top_n")):
        return None
    top = tables.read_table(ctx.spark, ctx.warehouse, "top_n").where(
        (F.col("run_id") == ctx.run_id) & F.col("model").isin(ctx.cfg.hybrid.candidate_models))
    if top.isEmpty():
        return None
    pairs = top.select("userId", "movieId")
    listed = ctx.results.get("als_implicit") or {}
    if listed.get("pool_path") and "als_implicit" in ctx.cfg.hybrid.candidate_models:
        pairs = pairs.unionByName(ctx.spark.read.parquet(listed["pool_path"]).select("userId", "movieId"))
    return pairs.distinct()


def _optional(ctx: RunContext, name: str):
    wh = ctx.warehouse
    return tables.read_table(ctx.spark, wh, name) if tables.table_exists(ctx.spark, tables.table_path(wh, name)) else None
