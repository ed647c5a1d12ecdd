"""The one place a SparkSession is built.

Run directly (python, the `movierec` CLI, tests) it sets local defaults: master from config
(local[*]), Delta's extension and catalog, driver memory, shuffle partitions, warehouse and
checkpoint directories and a quiet log4j2 config. Under spark-submit the JVM already exists with
what was submitted (master, --packages, memory), so only settings that can still be applied are
added, and nothing the user submitted is overridden.

Delta's jars: the first direct run resolves the Maven coordinate through Ivy into a project-owned
cache and records the resolved jar list beside it; later runs put those jar files on the classpath
directly, so they start offline and skip Ivy's ~40 s resolution.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from .config import Config, is_uri
from .redact import SECRET_KEY_PATTERN

log = logging.getLogger(__name__)


class SparkSetupError(RuntimeError):
    pass


def under_spark_submit() -> bool:
    # spark-submit starts the JVM first and hands the Python driver its gateway port.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def jar_packages(cfg: Config) -> list[str]:
    """Delta's coordinate first, then spark.packages (object-store connectors), de-duplicated."""
    out = [cfg.spark.delta_package]
    for p in cfg.spark.packages:
        if p not in out:
            out.append(p)
    return out


def jar_manifest(ivy_dir: Path, packages: list[str]) -> Path:
    # One manifest per package set: adding hadoop-aws resolves once more (its own jar list),
    # and dropping it again goes back to the Delta-only list.
    return ivy_dir / ("movierec-jars-" + "+".join(p.replace(":", "_") for p in packages) + ".txt")


def cached_delta_jars(cfg: Config) -> list[str] | None:
    """The resolved jar files of Delta (and spark.packages) from an earlier run, or None."""
    ivy_dir = Path(os.path.expanduser(cfg.spark.ivy_dir))
    m = jar_manifest(ivy_dir, jar_packages(cfg))
    if not m.is_file():
        return None
    jars = [j for j in m.read_text().split() if j]
    if jars and all(Path(j.removeprefix("file://")).is_file() for j in jars):
        return jars
    return None


def _record_delta_jars(spark: SparkSession, cfg: Config) -> None:
    jars = spark.sparkContext.getConf().get("spark.jars", "")
    ivy_dir = Path(os.path.expanduser(cfg.spark.ivy_dir))
    if jars and "delta-spark" in jars:
        jar_manifest(ivy_dir, jar_packages(cfg)).write_text("\n".join(jars.split(",")) + "\n")


# What each object store needs on the classpath (hadoop-client 3.5.0 ships with pyspark 4.2; the
# connector's version must match it). The schemes Hadoop itself serves need nothing.
STORE_PACKAGES = {
    "s3a": "org.apache.hadoop:hadoop-aws:3.5.0",
    "abfs": "org.apache.hadoop:hadoop-azure:3.5.0",
    "abfss": "org.apache.hadoop:hadoop-azure:3.5.0",
    "gs": "com.google.cloud.bigdataoss:gcs-connector:hadoop3-2.2.26 (shaded jar)",
}


def check_filesystems(spark: SparkSession, paths: list[str | None]) -> None:
    """Fail at start, with the package to add, when a path's scheme has no Hadoop filesystem."""
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    for path in paths:
        if not path or "://" not in path:
            continue
        scheme = path.split("://", 1)[0].lower()
        try:
            jvm.org.apache.hadoop.fs.FileSystem.getFileSystemClass(scheme, conf)
        except Exception as e:  # UnsupportedFileSystemException, or ClassNotFound for the connector
            need = STORE_PACKAGES.get(scheme)
            hint = (f"add spark.packages: [\"{need.split(' ')[0]}\"] to the config (or --packages to "
                    "spark-submit) and the store's credentials (README, 'Object storage')"
                    if need else "no Hadoop filesystem is known for it")
            raise SparkSetupError(f"{path}: cannot use {scheme}:// here: {hint}. "
                                  f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None


def build_spark(cfg: Config, app_name: str | None = None) -> SparkSession:
    """Build (or join) the SparkSession for this process from the config."""
    name = app_name or cfg.spark.app_name
    b = SparkSession.builder.appName(name)
    submitted = under_spark_submit()
    # Settings valid both ways: SQL/Delta settings only apply if the user did not submit them.
    settings = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.adaptive.enabled": "true",
        # Spill-friendly defaults for ALS and wide joins on a small machine.
        "spark.serializer": "org.apache.spark.serializer.KryoSerializer",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        # Delta rebuilds a table's state (before an overwrite or replaceWhere, for instance) with
        # 50 tasks by default. Our logs are checkpointed every 10 commits and hold at most a few
        # thousand file actions, so 2 tasks do it: measured on ml-latest-small, the als stage's
        # four small writes took 10.7-12.4 s with 8 partitions and 9.0-9.8 s with 2 (or 1).
        "spark.databricks.delta.snapshotPartitions": "2",
        # Ingest decodes small files whole with decode(); Spark 4 raises MALFORMED_CHARACTER_CODING
        # on the first invalid byte, failing the whole file. Replacing it with U+FFFD instead lets
        # ingest reject just that line (reason bad_encoding) and load the rest.
        "spark.sql.legacy.codingErrorAction": "true",
        # Spark's UI, event log and error messages hide the same keys our logs and tables do.
        "spark.redaction.regex": SECRET_KEY_PATTERN,
        # Checkpoint files (materialize on a cluster, ALS's) are deleted once Spark drops them.
        "spark.cleaner.referenceTracking.cleanCheckpoints": "true",
    }
    if not is_uri(cfg.paths.warehouse):
        settings["spark.sql.warehouse.dir"] = str(Path(cfg.paths.warehouse) / "_spark_sql")
    if not submitted:
        log4j = cfg.spark.log4j_config
        settings.update(
            {
                "spark.master": cfg.spark.master,
                "spark.driver.memory": cfg.spark.driver_memory,
                "spark.ui.enabled": str(cfg.spark.ui_enabled).lower(),
                "spark.ui.showConsoleProgress": str(cfg.spark.show_progress).lower(),
                "spark.driver.extraJavaOptions": f"-Dlog4j.configurationFile=file:{log4j}",
                "spark.executor.extraJavaOptions": f"-Dlog4j.configurationFile=file:{log4j}",
                "spark.jars.ivy": os.path.expanduser(cfg.spark.ivy_dir),
            }
        )
        if not os.environ.get("PYSPARK_PYTHON"):
            # Python workers (mapInArrow) run this interpreter, whose environment has pyarrow and
            # numpy, not whatever `python3` is first on PATH. PySpark reads the variable (not
            # spark.pyspark.python) when it creates the context.
            os.environ["PYSPARK_PYTHON"] = sys.executable
        jars = cached_delta_jars(cfg)
        if jars:
            settings["spark.jars"] = ",".join(jars)
        else:
            packages = jar_packages(cfg)
            log.info("resolving %s through Ivy (first run; cached afterwards)", ", ".join(packages))
            settings["spark.jars.packages"] = ",".join(packages)
    settings.update(cfg.spark.conf)
    if submitted:
        # What was submitted wins: only fill in settings the user left unset.
        from pyspark import SparkConf, SparkContext

        SparkContext._ensure_initialized()
        given = {k for k, _ in SparkConf().getAll()}
        settings = {k: v for k, v in settings.items() if k not in given}
    for k, v in settings.items():
        b = b.config(k, v)
    try:
        spark = b.getOrCreate()
    except Exception as e:  # the JVM gateway dies with a long Ivy trace when jars are missing
        msg = str(e)
        if submitted:
            raise
        raise SparkSetupError(
            "could not start Spark with Delta Lake "
            f"({cfg.spark.delta_package}): {msg.splitlines()[0] if msg else type(e).__name__}.\n"
            "Delta's jars are fetched from Maven Central once and cached in "
            f"{cfg.spark.ivy_dir}. Connect to the internet once and run `movierec setup`, "
            "or copy that cache from a machine that has it, or set spark.conf "
            "spark.jars to local Delta jar files. If the error says 'download failed' for a "
            "jar, a stray pom in ~/.m2 may be shadowing it: remove that directory from ~/.m2."
        ) from e
    if not submitted and not cached_delta_jars(cfg):
        _record_delta_jars(spark, cfg)
    check_filesystems(spark, [cfg.paths.warehouse, cfg.paths.input, cfg.checkpoint_dir])
    spark.sparkContext.setCheckpointDir(cfg.checkpoint_dir)
    if submitted:
        # Delta's extension is a static setting: if it was not submitted, say so clearly now
        # rather than fail later with an obscure "not a Delta table".
        ext = spark.conf.get("spark.sql.extensions", "") or ""
        if "DeltaSparkSessionExtension" not in ext:
            raise SparkSetupError(
                "spark-submit without Delta: add --packages "
                f"{cfg.spark.delta_package} --conf spark.sql.extensions="
                "io.delta.sql.DeltaSparkSessionExtension --conf spark.sql.catalog.spark_catalog="
                "org.apache.spark.sql.delta.catalog.DeltaCatalog"
            )
    log.info(
        "Spark %s up: master=%s, shuffle partitions=%s, submitted=%s",
        spark.version,
        spark.sparkContext.master,
        spark.conf.get("spark.sql.shuffle.partitions"),
        submitted,
    )
    return spark


def materialize(df):
    """`df` computed now, as a frame whose plan is its result: a checkpoint, not a cache.

    A cached frame keeps its whole plan, and every query built on it plans (and looks up in the
    cache) that plan again. The features stage's results carry plans of thousands of nodes:
    on ml-latest-small, writing them spent 14 s of driver time with no job running, and the
    stage took 92.8 s with cached results against 70.6 s with checkpointed ones. In local mode
    the checkpoint is kept in the block manager (memory, spilling to disk); on a cluster it is
    written to the checkpoint directory, so losing an executor does not lose it. Give it back
    with `release` (a cluster's checkpoint files are deleted by Spark's cleaner once the frame
    is garbage-collected: spark.cleaner.referenceTracking.cleanCheckpoints)."""
    if df.sparkSession.sparkContext.master.startswith("local"):
        return df.localCheckpoint(eager=True)
    return df.checkpoint(eager=True)


def release(df) -> None:
    """Unpersist `df`, and the blocks of the checkpoint behind it when it came from
    `materialize` (a checkpointed frame has no cache entry for unpersist() to drop)."""
    df.unpersist()
    try:
        plan = df._jdf.queryExecution().logical()
        if plan.nodeName() == "LogicalRDD":
            plan.rdd().unpersist(False)
    except Exception as e:  # e.g. no JVM handles (Spark Connect): the blocks stay until Spark's cleaner
        log.warning("release: could not free a materialized frame's blocks: %s", e)


def run_concurrently(spark: SparkSession, jobs: dict, out: dict) -> None:
    """Run independent Spark actions (name -> callable) from threads, all at once; record each
    one's seconds in `out` as '<name>_s'; re-raise the first error. Worth it for chains of small
    jobs and Delta commits whose driver-side latency leaves the cores idle."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from pyspark import inheritable_thread_target

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        out[f"{name}_s"] = round(time.perf_counter() - t0, 2)

    with ThreadPoolExecutor(max_workers=max(1, len(jobs)), thread_name_prefix="stage") as pool:
        # Wrapped so the jobs keep the stage's job group (a plain thread starts without it).
        futures = [pool.submit(inheritable_thread_target(spark)(timed), name, fn) for name, fn in jobs.items()]
        for f in futures:
            f.result()


def jvm_usage(spark: SparkSession) -> dict | None:
    """{"cpu_s", "gc_s", "scope"}: CPU seconds used so far by this process's JVM (in local mode
    the driver and the executor: all of Spark's work; on a cluster the driver's alone, scope
    "driver JVM") and its garbage collectors' seconds; None where
    they cannot be read (no /proc, a JVM on another host, Spark Connect).

    Against the run's wall time they say whether it was CPU-bound (an ml-latest-small evaluate
    run used 1.62-1.81 of 2 cores) and, against the event log's task CPU, how much went outside
    the tasks. They are no steadier than wall time on this shared machine: the same evaluate run
    used 888 CPU seconds in one hour and 1,322 in another. Read from /proc: the JVM's own
    OperatingSystemMXBean.getProcessCpuTime is not reachable through py4j on Java 17."""
    try:
        mf = spark.sparkContext._jvm.java.lang.management.ManagementFactory
        pid = int(mf.getRuntimeMXBean().getPid())
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (name)": state is field 3
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime (fields 14, 15)
        gc = sum(b.getCollectionTime() for b in mf.getGarbageCollectorMXBeans()) / 1000.0
        # On a cluster this is the driver alone: the executors' JVMs are elsewhere.
        scope = "JVM" if spark.sparkContext.master.startswith("local") else "driver JVM"
        return {"cpu_s": cpu, "gc_s": gc, "scope": scope}
    except Exception:  # not Linux, no local JVM, no py4j: the log line goes without it
        return None
