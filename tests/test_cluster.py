"""A real multi-process Spark standalone cluster: a master and 2 workers on 127.0.0.1, started
with spark-class from the pyspark install; the pipeline spark-submitted to it exactly as README
says (entry point jobs/pipeline.py, the package on --py-files, conf/cluster.yaml), compared with
a local[2] run of the same stages; and a worker SIGKILLed while a job runs.

The stages are the distributed core (ingest, split, baselines, ALS; the worker-loss run redoes
split and ALS on a copy of the first run's warehouse) on ml-latest-small, so the suite stays a few minutes; the whole pipeline goes through
the same entry point. Metrics are computed here from the predictions tables.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from movierec_spark import tables

from .conftest import REPO, cli_settings, make_config

STAGES = ["ingest", "split", "baselines", "als"]
# The worker-loss run starts from a copy of the first cluster run's ingested warehouse.
LOSS_STAGES = ["split", "als"]
# Both runs: the same model settings (checked below through the config each run recorded).
OVERRIDES = dict(als__rank=10, als__max_iter=8, spark__shuffle_partitions=4)


@pytest.fixture(scope="module")
def cluster(spark, tmp_path_factory):
    """Master + 2 one-core workers; torn down whatever happens (also on a failed start)."""
    from movierec_spark.standalone import StandaloneCluster, StandaloneError

    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("no Java")
    c = StandaloneCluster(tmp_path_factory.mktemp("cluster"), workers=2, cores=1, memory="3g")
    try:
        with c:
            yield c
    except StandaloneError as e:
        pytest.fail(str(e))


def _submit(cluster, spark, ml_small: Path, wh: Path, run_id: str, stages: list[str] = STAGES) -> subprocess.Popen:
    from movierec_spark.session import cached_delta_jars
    from movierec_spark.standalone import package_archive

    jars = cached_delta_jars(make_config(wh))
    assert jars, "Delta jars are resolved by the session fixture first"
    app = [str(REPO / "jobs" / "pipeline.py"), "--config", str(REPO / "conf" / "cluster.yaml"),
           "--input", str(ml_small), "--warehouse", str(wh), "--stages", ",".join(stages), "--run-id", run_id,
           *cli_settings(**OVERRIDES)]
    log4j = f"-Dlog4j.configurationFile=file:{REPO / 'conf' / 'log4j2.properties'}"
    cmd = cluster.submit_command(app, jars, conf={"spark.driver.extraJavaOptions": log4j},
                                 py_files=[str(package_archive(cluster.root))])
    # The driver imports the package from --py-files, not from this checkout.
    env = {k: v for k, v in cluster.env.items() if k != "PYTHONPATH"}
    # From the repo root, as README runs it (conf paths in the config are relative to it).
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _outputs(spark, wh: Path, run_id: str) -> dict:
    def table(name):
        return tables.read_table(spark, str(wh), name)

    split = {r.split: r["count"] for r in table("rating_splits").groupBy("split").count().collect()}
    err = F.col("prediction") - F.col("rating")
    metrics = {r.model: (r.n, r.rmse, r.mae) for r in table("predictions").where(f"run_id = '{run_id}'")
               .groupBy("model").agg(F.count(F.lit(1)).alias("n"), F.sqrt(F.avg(err * err)).alias("rmse"),
                                     F.avg(F.abs(err)).alias("mae")).collect()}
    run = table("runs").where(f"run_id = '{run_id}'").first()
    cfg = {k: v for k, v in json.loads(run.config).items() if k not in ("spark", "paths")}
    return {
        "counts": {n: table(n).count() for n in ("movies", "ratings", "tags", "links", "rating_splits",
                                                 "als_user_factors", "als_item_factors")},
        "split": split,
        "split_rows": table("rating_splits").select("userId", "movieId", "split"),
        "metrics": metrics,
        "status": run.status,
        "config": cfg,
    }


@pytest.fixture(scope="module")
def local_run(spark, ml_small, tmp_path_factory):
    from movierec_spark.pipeline import run_pipeline

    wh = tmp_path_factory.mktemp("cluster-local") / "wh"
    spark.catalog.clearCache()
    t0 = time.perf_counter()
    run_pipeline(spark, make_config(wh, **OVERRIDES), str(ml_small), stages=STAGES, run_id="cl")
    seconds = time.perf_counter() - t0
    return wh, _outputs(spark, wh, "cl"), seconds


def _assert_same(spark, got: dict, want: dict) -> None:
    assert got["status"] == "succeeded"
    assert got["config"] == want["config"]  # same model settings, whatever the Spark settings
    assert got["counts"] == want["counts"]
    assert got["split"] == want["split"]
    assert got["split_rows"].exceptAll(want["split_rows"]).isEmpty()
    assert got["metrics"] and got["metrics"].keys() <= want["metrics"].keys()
    for model, (n, rmse, mae) in got["metrics"].items():
        assert n == want["metrics"][model][0], model  # every test pair predicted, as locally
        assert (rmse, mae) == pytest.approx(want["metrics"][model][1:], abs=2e-3), model


@pytest.fixture(scope="module")
def submitted(cluster, spark, ml_small, tmp_path_factory):
    wh = tmp_path_factory.mktemp("cluster-run") / "wh"
    t0 = time.perf_counter()
    p = _submit(cluster, spark, ml_small, wh, "cl")
    out = p.communicate(timeout=900)[0]
    return wh, p.returncode, out, time.perf_counter() - t0


def test_spark_submit_to_a_standalone_cluster_matches_local(submitted, cluster, spark, local_run):
    _, want, local_s = local_run
    wh, code, out, cluster_s = submitted
    assert code == 0, out[-5000:]
    assert f"master={cluster.url}" in out and "submitted=True" in out
    _assert_same(spark, _outputs(spark, wh, "cl"), want)
    print(f"\nstages {STAGES} on ml-latest-small: local[2] in-process {local_s:.1f} s, "
          f"2-worker standalone cluster via spark-submit {cluster_s:.1f} s")


def test_the_job_survives_losing_a_worker(submitted, cluster, spark, ml_small, local_run, tmp_path):
    """SIGKILL one worker (and the executor it launched) once the ALS stage starts: the job
    finishes on the remaining worker, with the same outputs."""
    _, want, _ = local_run
    assert submitted[1] == 0, "the first cluster run failed"
    shutil.copytree(submitted[0], tmp_path / "wh")
    p = _submit(cluster, spark, ml_small, tmp_path / "wh", "cl-loss", LOSS_STAGES)
    lines, killed = [], None
    try:
        for line in p.stdout:
            lines.append(line)
            if killed is None and "stage als ..." in line:
                cluster.kill_worker(0)
                killed = time.perf_counter()
        p.wait(timeout=900)
    finally:
        if p.poll() is None:
            p.kill()
    out = "".join(lines)
    assert killed is not None, out[-5000:]
    assert p.returncode == 0, out[-5000:]
    assert cluster.alive_workers() == 1
    got = _outputs(spark, tmp_path / "wh", "cl-loss")
    assert set(got["metrics"]) == {"als"}
    _assert_same(spark, got, want)
