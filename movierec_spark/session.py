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
from pathlib import Path

from pyspark.sql import SparkSession

from .config import Config, is_uri

log = logging.getLogger(__name__)


class SparkSetupError(RuntimeError):
    pass


def under_spark_submit() -> bool:
    # spark-submit starts the JVM first and hands the Python driver its gateway port.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _manifest(ivy_dir: Path, package: str) -> Path:
    return ivy_dir / ("movierec-jars-" + package.replace(":", "_") + ".txt")


def cached_delta_jars(cfg: Config) -> list[str] | None:
    ivy_dir = Path(os.path.expanduser(cfg.spark.ivy_dir))
    m = _manifest(ivy_dir, cfg.spark.delta_package)
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
        _manifest(ivy_dir, cfg.spark.delta_package).write_text("\n".join(jars.split(",")) + "\n")


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
        # Delta rebuilds table state with 50 tasks by default: pure overhead for small logs.
        "spark.databricks.delta.snapshotPartitions": str(cfg.spark.shuffle_partitions),
        # Ingest decodes small files whole with decode(); Spark 4 raises MALFORMED_CHARACTER_CODING
        # on the first invalid byte, failing the whole file. Replacing it with U+FFFD instead lets
        # ingest reject just that line (reason bad_encoding) and load the rest.
        "spark.sql.legacy.codingErrorAction": "true",
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
        jars = cached_delta_jars(cfg)
        if jars:
            settings["spark.jars"] = ",".join(jars)
        else:
            log.info("resolving %s through Ivy (first run; cached afterwards)", cfg.spark.delta_package)
            settings["spark.jars.packages"] = cfg.spark.delta_package
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
