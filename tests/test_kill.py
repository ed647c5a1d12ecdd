"""Kill anywhere and concurrent readers.

A `movierec run` subprocess is SIGKILLed during each stage's first table write in turn (see
kill_runner.py); after every kill each table must be at a committed version that Spark and
delta-rs read alike, `runs` must not show the run as succeeded, and no per-run table may hold
duplicated rows. `--resume` then continues the run, and the finished run must equal the
uninterrupted session run (`hybrid_run`, same data, config and seed): this is also the
determinism check, across processes (identical split and final lists, factors and
predictions within float tolerance). tests/test_serve.py polls `recommendations` with delta-rs
while a rerun rewrites it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deltalake import DeltaTable as RsTable
from pyspark.sql import functions as F

from movierec_spark import tables

from .conftest import HYBRID_OVERRIDES, HYBRID_STAGES, REPO, cli_settings

# Minutes of whole-system runs: MOVIEREC_HEAVY_TESTS=1 runs them (README, Tests).
pytestmark = pytest.mark.heavy

# Per-run tables and the keys no row may repeat.
RUN_KEYS = {
    "predictions": ["run_id", "model", "userId", "movieId"],
    "top_n": ["run_id", "model", "userId", "rank"],
    "recommendations": ["run_id", "userId", "rank"],
    "metrics": ["run_id", "model", "metric", "k", "split"],
    "feature_importances": ["run_id", "feature"],
    "run_stages": ["run_id", "stage"],
    "rejects": ["run_id", "source", "line", "reason"],
}


# Every stage costs a fresh JVM plus that stage's work again (about 10 minutes for all ten on
# this machine), so the default sweep kills in one stage per kind of write: ingest (MERGE), als
# (overwrites and replaceWhere from concurrent threads), recommend (replaceWhere after the
# ranker's model save). MOVIEREC_KILL_STAGES=all (or a comma list) runs the full sweep.
DEFAULT_KILL_STAGES = ["ingest", "als", "recommend"]


def _kill_stages() -> list[str]:
    want = os.environ.get("MOVIEREC_KILL_STAGES", "")
    if want == "all":
        return list(HYBRID_STAGES)
    names = [s.strip() for s in want.split(",") if s.strip()] or DEFAULT_KILL_STAGES
    unknown = set(names) - set(HYBRID_STAGES)
    assert not unknown, f"MOVIEREC_KILL_STAGES: unknown stages {unknown}"
    return [s for s in HYBRID_STAGES if s in names]


def _movierec(args: list[str], *, kill_stage: str | None = None, marker: Path | None = None,
              wait: bool = True):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if kill_stage:
        env.update(MOVIEREC_KILL_STAGE=kill_stage, MOVIEREC_KILL_MARKER=str(marker))
        cmd = [sys.executable, "-m", "tests.kill_runner", *args]
    else:
        cmd = [sys.executable, "-m", "movierec_spark.cli", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, start_new_session=True)


def _delta_tables(wh: Path) -> list[Path]:
    return sorted(p for p in wh.iterdir() if (p / "_delta_log").is_dir())


def _check_consistent(spark, wh: Path) -> dict[str, int]:
    """Every table reads at its latest committed version, the same in Spark and delta-rs."""
    counts = {}
    for path in _delta_tables(wh):
        rs = RsTable(str(path))
        n_rs = rs.to_pyarrow_table().num_rows
        n_spark = spark.read.format("delta").load(str(path)).count()
        assert n_rs == n_spark, (path.name, n_rs, n_spark)
        keys = RUN_KEYS.get(path.name)
        if keys:
            dup = spark.read.format("delta").load(str(path)).groupBy(*keys).count().where("count > 1")
            assert dup.isEmpty(), f"{path.name}: duplicated rows {dup.limit(3).collect()}"
        counts[path.name] = n_rs
    return counts


def _run_status(spark, wh: Path, run_id: str) -> str | None:
    row = tables.read_table(spark, str(wh), "runs").where(f"run_id = '{run_id}'").first()
    return row.status if row else None


@pytest.fixture(scope="module")
def killed_run(hybrid_run, tmp_path_factory):
    """The hybrid pipeline under run id 'hy', killed once in each chosen stage and resumed each time."""
    spark, cfg, ctx = hybrid_run
    root = tmp_path_factory.mktemp("kill")
    wh = root / "wh"
    base = ["run", "--input", ctx.input_path, "--warehouse", str(wh), "--stages", ",".join(HYBRID_STAGES),
            *cli_settings(**HYBRID_OVERRIDES)]
    outcomes = []
    for i, stage in enumerate(_kill_stages()):
        marker = root / f"killed-{stage}"
        ids = ["--run-id", "hy"] if i == 0 else ["--resume", "hy"]
        t0 = time.perf_counter()
        r = _movierec(base + ids, kill_stage=stage, marker=marker)
        assert r.returncode == -signal.SIGKILL, f"stage {stage}: exit {r.returncode}\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
        what = marker.read_text().split()
        assert what[0] == stage, what
        counts = _check_consistent(spark, wh)
        assert _run_status(spark, wh, "hy") == "running"
        outcomes.append({"stage": stage, "table": what[1], "when": what[2], "seconds": round(time.perf_counter() - t0, 1),
                         "tables": len(counts)})
    r = _movierec(base + ["--resume", "hy"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print("\nkill points:", *outcomes, sep="\n  ")
    return spark, cfg, wh, outcomes


def test_every_kill_left_committed_tables_and_the_resumed_run_finished(killed_run):
    spark, _, wh, outcomes = killed_run
    assert [o["stage"] for o in outcomes] == _kill_stages()
    assert _run_status(spark, wh, "hy") == "succeeded"
    _check_consistent(spark, wh)
    # Each stage was finished exactly once, by whichever process got through it.
    done = tables.read_table(spark, str(wh), "run_stages").where("run_id = 'hy'")
    assert sorted(r.stage for r in done.collect()) == sorted(HYBRID_STAGES)


def test_the_resumed_run_equals_the_uninterrupted_one(killed_run):
    spark, cfg, wh, _ = killed_run
    ref = cfg.paths.warehouse  # hybrid_run: same data, config and seed, never killed

    def rows(w, name, cols, where="true"):
        return [tuple(r) for r in tables.read_table(spark, str(w), name).where(where).select(*cols)
                .orderBy(*cols).collect()]

    split = ["userId", "movieId", "split"]
    assert rows(wh, "rating_splits", split, "run_id = 'hy'") == rows(ref, "rating_splits", split, "run_id = 'hy'")
    for kind, key in (("user", "userId"), ("item", "movieId")):
        a, b = dict(rows(wh, f"als_{kind}_factors", [key, "features"])), dict(rows(ref, f"als_{kind}_factors", [key, "features"]))
        assert a.keys() == b.keys()
        assert all(x == pytest.approx(y, abs=1e-4) for k in a for x, y in zip(a[k], b[k]))
    cols = ["model", "userId", "movieId", "prediction"]
    p1, p2 = rows(wh, "predictions", cols, "run_id = 'hy'"), rows(ref, "predictions", cols, "run_id = 'hy'")
    assert [r[:3] for r in p1] == [r[:3] for r in p2]
    assert all(a[3] == pytest.approx(b[3], abs=1e-6) for a, b in zip(p1, p2))
    # (An evaluate run: its final lists are top_n's model 'hybrid'.)
    rec = ["userId", "rank", "movieId"]
    final = "run_id = 'hy' AND model = 'hybrid'"
    assert rows(wh, "top_n", rec, final) == rows(ref, "top_n", rec, final)
    m = ["model", "metric", "k", "split", "value"]
    m1, m2 = rows(wh, "metrics", m, "run_id = 'hy'"), rows(ref, "metrics", m, "run_id = 'hy'")
    assert [r[:4] for r in m1] == [r[:4] for r in m2]
    assert all(a[4] == pytest.approx(b[4], abs=1e-6, nan_ok=True) for a, b in zip(m1, m2) if a[4] is not None)


def test_resume_refuses_a_finished_unknown_or_reconfigured_run(killed_run, tmp_path):
    from movierec_spark.pipeline import PipelineError, run_pipeline

    spark, cfg, wh, _ = killed_run
    here = cfg.model_copy(update=dict(paths=cfg.paths.model_copy(update=dict(warehouse=str(wh)))))
    with pytest.raises(PipelineError, match="already succeeded"):
        run_pipeline(spark, here, None, ["evaluate"], run_id="hy", resume=True)
    with pytest.raises(PipelineError, match="not in"):
        run_pipeline(spark, here, None, ["evaluate"], run_id="nope", resume=True)
    # An unfinished run resumed with other model settings would mix two configurations.
    tables.upsert(spark, tables.read_table(spark, str(wh), "runs").where("run_id = 'hy'")
                  .withColumn("run_id", F.lit("hy-unfinished")).withColumn("status", F.lit("failed")), str(wh), "runs")
    other = here.model_copy(update=dict(als=here.als.model_copy(update=dict(rank=here.als.rank + 1))))
    with pytest.raises(PipelineError, match=r"config differs in \['als'\]"):
        run_pipeline(spark, other, None, ["evaluate"], run_id="hy-unfinished", resume=True)
