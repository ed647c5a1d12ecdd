"""One Spark+Delta session for the whole test run: local[2], 2 shuffle partitions, UI off."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from movierec_spark.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
ML_SMALL = SHARED / "datasets" / "ml-latest-small"

TEST_OVERRIDES = {
    "spark.master": "local[2]",
    "spark.shuffle_partitions": 2,
    # 4g: the hybrid module builds broadcast joins late in a long session (2g ran out in CI).
    "spark.driver_memory": "4g",
    "spark.ui_enabled": False,
    "spark.show_progress": False,
    # Tuning fits about ten models per run: tests/test_tune.py runs it; the other pipelines in
    # the suite use the config's settings (CI's time budget).
    "tune.enabled": False,
    # The GBT's size of before (80 trees of depth 5, not 150 of depth 4): every tree level is a
    # Spark job, and the suite's runs check behaviour, not RMSE (CI's time budget).
    "hybrid.max_iter": 80,
    "hybrid.max_depth": 5,
}


def make_config(warehouse: Path, **overrides) -> Config:
    o = dict(TEST_OVERRIDES)
    o["paths.warehouse"] = str(warehouse)
    o["paths.data_dir"] = str(warehouse.parent / "data")
    o.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, o)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from movierec_spark.session import build_spark

    logging.getLogger("py4j").setLevel(logging.WARNING)
    cfg = make_config(tmp_path_factory.mktemp("session") / "warehouse")
    session = build_spark(cfg, app_name="movierec-tests")
    yield session
    # Stop cleanly: a JVM left running at interpreter exit has aborted the process (exit 134).
    session.stop()


@pytest.fixture
def cfg(tmp_path) -> Config:
    return make_config(tmp_path / "warehouse")


@pytest.fixture(scope="session")
def ml_small() -> Path:
    if not (ML_SMALL / "ratings.csv").is_file():
        pytest.skip(f"{ML_SMALL} not present")
    return ML_SMALL


@pytest.fixture(scope="session")
def ml_small_wh(spark, tmp_path_factory, ml_small):
    """ml-latest-small ingested once per session (read-only for its users): (cfg, summary)."""
    from movierec_spark.ingest import ingest_dataset

    cfg = make_config(tmp_path_factory.mktemp("ml-small") / "wh")
    return cfg, ingest_dataset(spark, cfg, str(ml_small), "r1")


# The hybrid suite's pipeline: a small generated set, small models, every stage.
HYBRID_STAGES = ["ingest", "split", "baselines", "als", "als_implicit", "content", "features", "hybrid",
                 "recommend", "evaluate"]
HYBRID_DATA = dict(users=80, movies=150, ratings=5_000, seed=9)
# Small models: every GBT tree level and every candidate is Spark jobs, and this pipeline runs
# several times in the suite (hybrid, serve and kill runs), which is CI's time budget.
HYBRID_MODELS = dict(als__rank=6, als__max_iter=6, als_implicit__rank=6, als_implicit__max_iter=6,
                     hybrid__folds=2, hybrid__max_iter=10, hybrid__neighbours=10, content__k=10,
                     hybrid__ranker_max_iter=10, hybrid__candidate_pool=20, hybrid__ranker_knn_neighbours=10)
# The hybrid suite's run is an evaluate run (held-out test part); `serve_run` is the same
# pipeline as a serve run.
HYBRID_OVERRIDES = dict(HYBRID_MODELS, pipeline__mode="evaluate")


def cli_settings(**overrides) -> list[str]:
    """The test config as `movierec run` arguments: a subprocess run computes what the session does."""
    o = dict(TEST_OVERRIDES)
    o.update({k.replace("__", "."): v for k, v in overrides.items()})
    out = []
    for k, v in o.items():
        out += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return out


@pytest.fixture(scope="session")
def hybrid_run(spark, tmp_path_factory):
    """The whole pipeline once per session (run id 'hy'); the hybrid and kill suites read it."""
    from movierec_spark.generate import generate_dataset
    from movierec_spark.pipeline import run_pipeline

    # Start from an empty cache: earlier modules' cached frames would crowd this long pipeline.
    spark.catalog.clearCache()
    root = tmp_path_factory.mktemp("hybrid")
    generate_dataset(root / "gen", **HYBRID_DATA)
    cfg = make_config(root / "wh", **HYBRID_OVERRIDES)
    ctx = run_pipeline(spark, cfg, str(root / "gen"), stages=HYBRID_STAGES, run_id="hy")
    return spark, cfg, ctx


# Users the serve fixture adds to the generated set: one with a single rating, one with two.
FEW_RATINGS = {100001: [(1, 4.0)], 100002: [(2, 5.0), (3, 3.5)]}
NEW_MOVIE = 100000  # the serve fixture's unrated sequel of movie 2


@pytest.fixture(scope="session")
def serve_run(spark, tmp_path_factory):
    """The whole pipeline as a serve run (run id 'sv') on the hybrid suite's data plus two users
    with one and two ratings; its own warehouse."""
    from movierec_spark.generate import generate_dataset
    from movierec_spark.pipeline import run_pipeline

    spark.catalog.clearCache()
    root = tmp_path_factory.mktemp("serve")
    generate_dataset(root / "gen", **HYBRID_DATA)
    with open(root / "gen" / "ratings.csv", "a", encoding="utf-8") as f:
        for user, rows in FEW_RATINGS.items():
            for movie, rating in rows:
                f.write(f"{user},{movie},{rating},1500000000\n")
    # A new movie nobody rated: the sequel of movie 2 (which user 100002 loved), same genres.
    movies = (root / "gen" / "movies.csv").read_text(encoding="utf-8").splitlines()
    genres = next(line for line in movies if line.startswith("2,")).rsplit(",", 1)[1]
    movies = [f"2,Moonlit Harbor (2009),{genres}" if line.startswith("2,") else line for line in movies]
    movies.append(f"{NEW_MOVIE},Moonlit Harbor II (2011),{genres}")
    (root / "gen" / "movies.csv").write_text("\n".join(movies) + "\n", encoding="utf-8")
    cfg = make_config(root / "wh", recommend__new_movie_slots=1, **HYBRID_MODELS)
    assert cfg.pipeline.mode == "serve"  # the default
    # Every stage whose output reaches recommendations (explicit ALS's factors do not; the
    # evaluate stage has nothing to do in a serve run): the suite's time is CI's budget.
    stages = [s for s in HYBRID_STAGES if s not in ("als", "evaluate")]
    ctx = run_pipeline(spark, cfg, str(root / "gen"), stages=stages, run_id="sv")
    return spark, cfg, ctx


def pytest_collection_modifyitems(config, items):
    """Tests marked `heavy` (minutes each: a standalone cluster, the kill-and-resume sweep, the
    S3 pipeline) run when MOVIEREC_HEAVY_TESTS=1; the default run stays within CI's budget."""
    if os.environ.get("MOVIEREC_HEAVY_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="heavy (minutes): run with MOVIEREC_HEAVY_TESTS=1 (README, Tests)")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)
