"""Object storage for real: input and warehouse on a local S3-compatible server (moto) over s3a://.

`movierec run` (its own JVM, with hadoop-aws resolved through Ivy like Delta's jars) reads a
MovieLens directory from a bucket and writes its Delta tables and model files to another
prefix; delta-rs (no JVM) and `movierec query` then read them back from S3. Skipped when moto
is not installed or hadoop-aws cannot be resolved from Maven Central.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from movierec_spark.session import STORE_PACKAGES

from .conftest import REPO, cli_settings

moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed (pip install -e '.[test]')")

HADOOP_AWS = STORE_PACKAGES["s3a"]
BUCKET = "movierec"
KEY = "testing"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hadoop_aws_jars(tmp_path: Path) -> None:
    """Resolve hadoop-aws once into the project's Ivy cache (a no-op once it is there)."""
    from movierec_spark.config import load_config
    from movierec_spark.session import cached_delta_jars

    if cached_delta_jars(load_config(None, {"spark.packages": [HADOOP_AWS]})):
        return
    p = subprocess.run([sys.executable, "-m", "movierec_spark.cli", "setup", "--store", "s3a"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        pytest.skip(f"{HADOOP_AWS} did not resolve from Maven Central: {p.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; yields (endpoint, boto3 client)."""
    import boto3

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=KEY,
                              region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client
    finally:
        server.stop()


def _env(endpoint: str) -> dict:
    # delta-rs (and so `movierec query`) takes the endpoint and credentials from the environment.
    return {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": KEY, "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"}


def _s3a_conf(endpoint: str) -> list[str]:
    conf = {
        "fs.s3a.endpoint": endpoint,
        "fs.s3a.endpoint.region": "us-east-1",
        "fs.s3a.path.style.access": "true",
        "fs.s3a.connection.ssl.enabled": "false",
        "fs.s3a.aws.credentials.provider": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
        "fs.s3a.access.key": KEY,
        "fs.s3a.secret.key": KEY,
    }
    out = []
    for k, v in conf.items():
        out += ["--set", f"spark.conf.spark.hadoop.{k}={v}"]
    return out


def _run(args: list[str], env: dict, timeout: int = 480) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "movierec_spark.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.heavy
def test_pipeline_reads_and_writes_s3(s3, tmp_path):
    from deltalake import DeltaTable

    from movierec_spark.generate import generate_dataset

    _hadoop_aws_jars(tmp_path)
    endpoint, client = s3
    data = tmp_path / "gen"
    counts = generate_dataset(data, users=40, movies=80, ratings=2_000, seed=5)
    for f in data.iterdir():
        if f.is_file():
            client.upload_file(str(f), BUCKET, f"input/{f.name}")
    wh = f"s3a://{BUCKET}/wh"
    env = _env(endpoint)
    p = _run(["evaluate", "--input", f"s3a://{BUCKET}/input", "--warehouse", wh, "--run-id", "s3",
              "--stages", "ingest,split,baselines,als_implicit,evaluate",
              "--set", f"spark.packages=[\"{HADOOP_AWS}\"]", *_s3a_conf(endpoint),
              *cli_settings(paths__data_dir=str(tmp_path / "data"), als_implicit__rank=4, als_implicit__max_iter=3)],
             env)
    assert p.returncode == 0, p.stderr[-3000:]

    # Everything landed in the bucket, nothing beside the test's temp dir.
    keys = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="wh/")
            for o in page.get("Contents", [])}
    assert any(k.startswith("wh/ratings/_delta_log/") for k in keys)
    assert any(k.startswith("wh/_models/s3/als_implicit/") for k in keys)  # MLlib's writer on s3a too

    # Read back without a JVM, straight from S3.
    opts = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": KEY, "AWS_REGION": "us-east-1"}
    ratings = DeltaTable(f"{wh}/ratings", storage_options=opts).to_pyarrow_table()
    rejects = DeltaTable(f"{wh}/rejects", storage_options=opts).to_pyarrow_table()
    assert ratings.num_rows + rejects.num_rows == counts["ratings"]
    assert ratings.num_rows > 0.9 * counts["ratings"]
    splits = DeltaTable(f"{wh}/rating_splits", storage_options=opts).to_pyarrow_table()
    assert splits.num_rows == ratings.num_rows
    preds = DeltaTable(f"{wh}/predictions", storage_options=opts).to_pyarrow_table().to_pydict()
    n_test = sum(1 for s in splits.column("split").to_pylist() if s == "test")
    assert preds["model"].count("bias_baseline") == n_test

    q = _run(["query", "metrics", "--warehouse", wh, "--run", "s3", "--format", "csv"], env, timeout=120)
    assert q.returncode == 0, q.stderr
    assert "bias_baseline" in q.stdout and "rmse" in q.stdout


def test_missing_connector_is_a_clear_error(tmp_path):
    """s3a:// without hadoop-aws on the classpath: one line naming the package, no Java trace."""
    p = _run(["run", "--warehouse", "s3a://nowhere/wh", "--stages", "split",
              *cli_settings(paths__data_dir=str(tmp_path / "data"))], dict(os.environ), timeout=300)
    assert p.returncode != 0
    assert HADOOP_AWS in p.stderr and "spark.packages" in p.stderr
    assert "Traceback" not in p.stderr
