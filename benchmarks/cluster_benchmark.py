"""Wall time of the whole pipeline: local[2] against a 2-worker standalone cluster on this machine.

    python benchmarks/cluster_benchmark.py [--input DIR] [--stages a,b]

Both runs are whole processes with the same model settings (conf/local.yaml's): `movierec run
--master local[2]`, then `spark-submit --master spark://127.0.0.1:PORT jobs/pipeline.py` to a
master and two one-core workers started from the pyspark install (the package on --py-files).
On one machine expect overhead, not speed-up: the cluster adds executor start-up, Python
workers per executor and task shipping over RPC. Prints the seconds per stage of both runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def stage_seconds(wh: Path, run_id: str) -> dict:
    from deltalake import DeltaTable

    rows = DeltaTable(str(wh / "runs")).to_pyarrow_table().to_pylist()
    row = next(r for r in rows if r["run_id"] == run_id)
    assert row["status"] == "succeeded", row
    return dict(row["stage_seconds"])


def main() -> int:
    from movierec_spark.config import load_config
    from movierec_spark.session import cached_delta_jars
    from movierec_spark.standalone import StandaloneCluster, package_archive

    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default=str(REPO.parent / "shared" / "datasets" / "ml-latest-small"))
    ap.add_argument("--stages", help="comma-separated stages (default: conf/local.yaml's)")
    args = ap.parse_args()
    local_cfg = load_config(REPO / "conf" / "local.yaml", check_paths=False)
    stages = args.stages or ",".join(local_cfg.pipeline.stages)
    jars = cached_delta_jars(local_cfg)
    if not jars:
        sys.exit("Delta's jars are not cached yet: run `movierec setup` first")
    root = Path(tempfile.mkdtemp(prefix="clusterbench-"))
    # conf/local.yaml's model sections for both; only where Spark runs differs.
    model_sets = []
    for section in ("split", "baseline", "als", "als_implicit", "content", "hybrid", "evaluation", "ingest"):
        for k, v in json.loads(local_cfg.to_json())[section].items():
            model_sets += ["--set", f"{section}.{k}={json.dumps(v)}"]
    common = ["--input", args.input, "--stages", stages, "--run-id", "bench", "--shuffle-partitions", "8", *model_sets]

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "movierec_spark.cli", "run", "--master", "local[2]",
                    "--warehouse", str(root / "local"), *common], cwd=REPO, check=True)
    local_s = time.perf_counter() - t0

    with StandaloneCluster(root / "cluster", workers=2, cores=1, memory="5g") as c:
        app = [str(REPO / "jobs" / "pipeline.py"), "--config", str(REPO / "conf" / "cluster.yaml"),
               "--warehouse", str(root / "cluster-wh"), *common]
        log4j = f"-Dlog4j.configurationFile=file:{REPO / 'conf' / 'log4j2.properties'}"
        cmd = c.submit_command(app, jars, executor_memory="4g", driver_memory="4g",
                               conf={"spark.driver.extraJavaOptions": log4j},
                               py_files=[str(package_archive(c.root))])
        env = {k: v for k, v in c.env.items() if k != "PYTHONPATH"}
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
        cluster_s = time.perf_counter() - t0

    ls, cs = stage_seconds(root / "local", "bench"), stage_seconds(root / "cluster-wh", "bench")
    print(f"\n## Whole pipeline on {args.input}: local[2] vs 2-worker standalone cluster (same machine)")
    print("| stage | local[2] s | cluster s |\n|---|---|---|")
    for name in stages.split(","):
        print(f"| {name} | {ls.get(name, float('nan')):.1f} | {cs.get(name, float('nan')):.1f} |")
    print(f"| **whole process** | **{local_s:.1f}** | **{cluster_s:.1f}** |")
    print(f"cluster / local: {cluster_s / local_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
