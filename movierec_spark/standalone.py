"""A Spark standalone cluster on this machine, started from the pyspark install (tests, benchmarks).

    with StandaloneCluster(Path("/tmp/c"), workers=2) as c:
        subprocess.run(c.submit_command(["jobs/pipeline.py", ...], jars=[...]), env=c.env)

Every daemon binds 127.0.0.1 (`--host` and SPARK_LOCAL_IP; without them a worker binds a
non-loopback address), on free ports. Each daemon gets its own process group, so stopping it
(or SIGKILLing it, to simulate a lost machine) also ends the executors it launched. The start is
bounded; the daemons are stopped on exit whatever happened, also after a failed start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


class StandaloneError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


class StandaloneCluster:
    def __init__(self, root: Path, workers: int = 2, cores: int = 1, memory: str = "3g",
                 start_timeout: float = 90.0) -> None:
        self.root, self.n_workers, self.cores, self.memory = Path(root), workers, cores, memory
        self.start_timeout = start_timeout
        self.home = spark_home()
        self.env = dict(os.environ, SPARK_HOME=str(self.home), SPARK_LOCAL_IP="127.0.0.1",
                        SPARK_LOG_DIR=str(self.root / "logs"), PYSPARK_PYTHON=sys.executable,
                        PYSPARK_DRIVER_PYTHON=sys.executable)
        self.port, self.ui_port = free_port(), free_port()
        self.url, self.ui = f"spark://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.ui_port}"
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []

    def _daemon(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "wb") as log:
            p = subprocess.Popen([str(self.home / "bin" / "spark-class"), *args], env=self.env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def alive_workers(self) -> int:
        """ALIVE workers the master reports (-1 while the master does not answer)."""
        try:
            with urllib.request.urlopen(f"{self.ui}/json/", timeout=2) as r:
                state = json.load(r)
        except OSError:
            return -1
        return sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE")

    def start(self) -> "StandaloneCluster":
        if not (self.home / "bin" / "spark-class").exists():
            raise StandaloneError(f"no bin/spark-class in the pyspark install at {self.home}")
        self.root.mkdir(parents=True, exist_ok=True)
        self._daemon("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                     "--port", str(self.port), "--webui-port", str(self.ui_port))
        self.workers = [
            self._daemon(f"worker{i}", "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                         "--webui-port", str(free_port()), "--cores", str(self.cores), "--memory", self.memory,
                         "--work-dir", str(self.root / f"work{i}"), self.url)
            for i in range(1, self.n_workers + 1)]
        deadline = time.monotonic() + self.start_timeout
        while self.alive_workers() < self.n_workers:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                logs = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}"
                                 for f in sorted(self.root.glob("*.log")))
                raise StandaloneError(f"standalone cluster did not come up in {self.start_timeout:.0f} s:\n{logs}")
            time.sleep(0.5)
        return self

    def kill_worker(self, i: int = 0) -> None:
        """SIGKILL worker i and the executors it launched: a lost machine."""
        w = self.workers[i]
        os.killpg(w.pid, signal.SIGKILL)
        w.wait(timeout=30)

    def stop(self) -> None:
        for p in reversed(self.procs):
            _stop(p)

    def __enter__(self) -> "StandaloneCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit_command(self, app: list[str], jars: list[str], cores: int | None = None,
                       executor_memory: str = "2g", driver_memory: str = "2g",
                       conf: dict[str, str] | None = None, py_files: list[str] | None = None) -> list[str]:
        """spark-submit of `app` (script and its arguments) to this cluster with Delta's jars."""
        cmd = [str(self.home / "bin" / "spark-submit"), "--master", self.url, "--jars", ",".join(jars),
               "--driver-memory", driver_memory, "--executor-memory", executor_memory,
               "--total-executor-cores", str(cores or self.n_workers * self.cores)]
        for k, v in {**DELTA_CONF, **(conf or {})}.items():
            cmd += ["--conf", f"{k}={v}"]
        if py_files:
            cmd += ["--py-files", ",".join(py_files)]
        return cmd + app


def package_archive(dest: Path) -> Path:
    """The movierec_spark package as a --py-files zip (what the wheel ships, without a build step):
    its modules and its package data (conf/: the default config and log4j2 file)."""
    import zipfile

    pkg = Path(__file__).resolve().parent
    out = Path(dest) / "movierec_spark.zip"
    files = [*pkg.rglob("*.py"), *pkg.glob("conf/*.yaml"), *pkg.glob("conf/*.properties")]
    with zipfile.ZipFile(out, "w") as z:
        for f in sorted(files):
            z.write(f, f.relative_to(pkg.parent).as_posix())
    return out


def _stop(p: subprocess.Popen) -> None:
    """SIGTERM the daemon's process group (the daemon and the executors it launched), then SIGKILL."""
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=15)
