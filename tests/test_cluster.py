"""A real multi-process Spark standalone cluster: a master and 2 workers on 127.0.0.1, started
with spark-class from the pyspark install; the pipeline spark-submitted to it exactly as README
says (entry point jobs/pipeline.py, the package on --py-files, conf/cluster.yaml), compared with
a local[2] run of the same stages; a submit without --config, from a directory with no conf/, on
the defaults packaged in the --py-files zip; and a worker SIGKILLed while a job runs.

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
import yaml
from pyspark.sql import functions as F

from movierec_spark import tables

from .conftest import REPO, cli_settings, make_config

# Minutes of whole-system runs: MOVIEREC_HEAVY_TESTS=1 runs them (README, Tests).
pytestmark = pytest.mark.heavy

STAGES = ["ingest", "split", "baselines", "als"]
# The worker-loss run starts from a copy of the first cluster run's ingested warehouse.
LOSS_STAGES = ["split", "als"]
# Both runs: the same model settings (checked below through the config each run recorded).
# Evaluate runs: what is compared is the held-out test part's predictions (a serve run has none).
OVERRIDES = dict(als__rank=10, als__max_iter=8, spark__shuffle_partitions=4, pipeline__mode="evaluate")


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


def _submit(cluster, spark, ml_small: Path, wh: Path, run_id: str, stages: list[str] = STAGES,
            packaged_defaults: Path | None = None) -> subprocess.Popen:
    """spark-submit jobs/pipeline.py with conf/cluster.yaml and the test settings, from the repo
    root as README runs it (conf paths in the config are relative to it); or, given
    `packaged_defaults` (an empty directory), with no --config and no settings, from that
    directory: the driver finds no conf/ and reads the defaults packaged in the --py-files zip."""
    from movierec_spark.session import cached_delta_jars
    from movierec_spark.standalone import package_archive

    jars = cached_delta_jars(make_config(wh))
    assert jars, "Delta jars are resolved by the session fixture first"
    config = ["--config", str(REPO / "conf" / "cluster.yaml")] if packaged_defaults is None else []
    settings = cli_settings(**OVERRIDES) if packaged_defaults is None else []
    app = [str(REPO / "jobs" / "pipeline.py"), *config, "--input", str(ml_small), "--warehouse", str(wh),
           "--stages", ",".join(stages), "--run-id", run_id, *settings]
    log4j = f"-Dlog4j.configurationFile=file:{REPO / 'conf' / 'log4j2.properties'}"
    # A zip of the package alone (modules and package data), with no conf/ beside it.
    cmd = cluster.submit_command(app, jars, conf={"spark.driver.extraJavaOptions": log4j},
                                 py_files=[str(package_archive(cluster.root))])
    # The driver imports the package from --py-files, not from this checkout.
    env = {k: v for k, v in cluster.env.items() if k != "PYTHONPATH"}
    cwd = REPO
    if packaged_defaults is not None:
        cwd = packaged_defaults
        # Where the packaged log4j2 file is extracted to (not the user's ~/.cache).
        env["XDG_CACHE_HOME"] = str(packaged_defaults / "cache")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _outputs(spark, wh: Path, run_id: str) -> dict:
    def table(name):
        return tables.read_table(spark, str(wh), name)

    splits = table("rating_splits")
    if "run_id" in splits.columns:  # one split per run: the worker-loss run's warehouse holds two
        splits = splits.where(F.col("run_id") == run_id)
    split = {r.split: r["count"] for r in splits.groupBy("split").count().collect()}
    err = F.col("prediction") - F.col("rating")
    metrics = {r.model: (r.n, r.rmse, r.mae) for r in table("predictions").where(f"run_id = '{run_id}'")
               .groupBy("model").agg(F.count(F.lit(1)).alias("n"), F.sqrt(F.avg(err * err)).alias("rmse"),
                                     F.avg(F.abs(err)).alias("mae")).collect()}
    run = table("runs").where(f"run_id = '{run_id}'").first()
    cfg = {k: v for k, v in json.loads(run.config).items() if k not in ("spark", "paths")}
    return {
        "counts": {**{n: table(n).count() for n in ("movies", "ratings", "tags", "links", "als_user_factors",
                                                    "als_item_factors")}, "rating_splits": splits.count()},
        "split": split,
        "split_rows": splits.select("userId", "movieId", "split"),
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


def test_spark_submit_without_config_uses_the_packaged_defaults(cluster, spark, tmp_path):
    """`spark-submit --py-files <package zip> jobs/pipeline.py --input ... --warehouse ...` from a
    directory without conf/: the defaults come from the zip's movierec_spark/conf/local.yaml and its
    log4j2 file is extracted to a real file. Ingest of a small generated set: what is tested is
    the loading."""
    from movierec_spark.generate import generate_dataset

    data = tmp_path / "gen"
    want = generate_dataset(data, users=30, movies=50, ratings=600, seed=4)
    work = tmp_path / "cwd"
    work.mkdir()
    p = _submit(cluster, spark, data, tmp_path / "wh", "cl-defaults", ["ingest"], packaged_defaults=work)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-5000:]
    assert not (work / "conf").exists()
    assert f"config from {cluster.root / 'movierec_spark.zip' / 'movierec_spark' / 'conf' / 'local.yaml'}" in out
    run = tables.read_table(spark, str(tmp_path / "wh"), "runs").where("run_id = 'cl-defaults'").first()
    assert run.status == "succeeded"
    recorded = json.loads(run.config)
    defaults = yaml.safe_load((REPO / "movierec_spark" / "conf" / "local.yaml").read_text(encoding="utf-8"))
    assert recorded["als"] == {**recorded["als"], **defaults["als"]}
    assert recorded["spark"]["shuffle_partitions"] == defaults["spark"]["shuffle_partitions"]
    log4j = Path(recorded["spark"]["log4j_config"])
    assert log4j.is_relative_to(work / "cache") and log4j.is_file()
    assert log4j.read_bytes() == (REPO / "movierec_spark" / "conf" / "log4j2.properties").read_bytes()
    wh = str(tmp_path / "wh")
    assert tables.read_table(spark, wh, "movies").count() == want["movies"]
    rejected = tables.read_table(spark, wh, "rejects").where("source = 'ratings.csv'").count()
    assert tables.read_table(spark, wh, "ratings").count() + rejected == want["ratings"]


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
