"""Input paths on any Hadoop filesystem (s3a://, abfss://, gs://, hdfs://) as well as local ones.

Ingest reads the data files with Spark, which already understands every scheme on its
classpath; only layout detection (which files are there, sniffing the small movies file's
encoding) and file sizes look at the input from the driver. `as_path` gives those few calls a
`pathlib.Path` for local paths and a `HadoopPath` (the same small surface, over the Hadoop
FileSystem API through the running SparkSession's JVM) for URIs, so a dataset in a bucket is
read where it lies instead of being copied to the driver first.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import is_uri


class HadoopPath:
    """The part of pathlib.Path that layout detection uses, on a Hadoop filesystem URI."""

    def __init__(self, uri: str, spark=None):
        from pyspark.sql import SparkSession

        self.uri = uri.rstrip("/")
        # The active session is per thread: a worker thread (a stage run beside another, a
        # search's trial) has none, so fall back to the process's session.
        self._spark = spark or SparkSession.getActiveSession() or SparkSession._instantiatedSession
        if self._spark is None:
            raise RuntimeError(f"{uri}: reading an object-store path needs a running SparkSession")
        sc = self._spark.sparkContext
        self._jpath = sc._jvm.org.apache.hadoop.fs.Path(self.uri)
        self._fs = self._jpath.getFileSystem(sc._jsc.hadoopConfiguration())

    def __truediv__(self, name: str) -> "HadoopPath":
        return HadoopPath(f"{self.uri}/{name}", self._spark)

    def __str__(self) -> str:
        return self.uri

    __fspath__ = __str__

    def __repr__(self) -> str:
        return f"HadoopPath({self.uri!r})"

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return os.path.splitext(self.name)[1]

    def _status(self):
        from py4j.protocol import Py4JJavaError

        try:
            return self._fs.getFileStatus(self._jpath)
        except Py4JJavaError as e:  # FileNotFoundException: not there
            if "FileNotFoundException" in str(e.java_exception.getClass().getName()):
                return None
            raise

    def exists(self) -> bool:
        return self._status() is not None

    def is_file(self) -> bool:
        st = self._status()
        return st is not None and st.isFile()

    def is_dir(self) -> bool:
        st = self._status()
        return st is not None and st.isDirectory()

    def iterdir(self):
        for st in self._fs.listStatus(self._jpath):
            yield HadoopPath(st.getPath().toString(), self._spark)

    def size(self) -> int:
        return int(self._fs.getFileStatus(self._jpath).getLen())

    def read_bytes(self) -> bytes:
        # Only small files go through here (a movies file to sniff its encoding, u.genre).
        stream = self._fs.open(self._jpath)
        try:
            return bytes(self._spark.sparkContext._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()


def read_head(path: str, n: int) -> bytes:
    """The first `n` bytes of a file (to sniff its format before Spark reads it)."""
    p = as_path(path)
    if isinstance(p, HadoopPath):
        stream = p._fs.open(p._jpath)
        try:
            buf = bytearray()
            while len(buf) < n:
                b = stream.read()
                if b < 0:
                    break
                buf.append(b)
            return bytes(buf)
        finally:
            stream.close()
    with open(p, "rb") as f:
        return f.read(n)


def as_path(path):
    """pathlib.Path for a local path, HadoopPath for a URI (s3a://, abfss://, gs://, file:/...)."""
    if isinstance(path, (Path, HadoopPath)):
        return path
    return HadoopPath(str(path)) if is_uri(str(path)) else Path(path)


def file_size(path: str) -> int:
    p = as_path(path)
    return p.size() if isinstance(p, HadoopPath) else os.path.getsize(p)


def exists(path: str) -> bool:
    return as_path(path).exists()
