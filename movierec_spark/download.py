"""Download and safely extract GroupLens MovieLens datasets.

Only the standard library is used so the download step works before (and
without) a Spark session.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, TextIO

logger = logging.getLogger(__name__)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/"
BASE_URL_ENV = "MOVIEREC_GROUPLENS_URL"

DATASETS: dict[str, str] = {
    "ml-latest-small": "ml-latest-small.zip",
    "ml-latest": "ml-latest.zip",
    "ml-100k": "ml-100k.zip",
    "ml-1m": "ml-1m.zip",
    "ml-10m": "ml-10m.zip",
    "ml-20m": "ml-20m.zip",
    "ml-25m": "ml-25m.zip",
    "ml-32m": "ml-32m.zip",
}

# Top-level directory inside each zip; ml-10m is the odd one out.
DATASET_DIRS: dict[str, str] = {name: name for name in DATASETS}
DATASET_DIRS["ml-10m"] = "ml-10M100K"

# The file whose presence means "this dataset is already fully extracted".
RATINGS_FILES: dict[str, str] = {
    "ml-latest-small": "ratings.csv",
    "ml-latest": "ratings.csv",
    "ml-100k": "u.data",
    "ml-1m": "ratings.dat",
    "ml-10m": "ratings.dat",
    "ml-20m": "ratings.csv",
    "ml-25m": "ratings.csv",
    "ml-32m": "ratings.csv",
}

DEFAULT_MAX_UNCOMPRESSED_BYTES = 4 * 2**30
# Real MovieLens CSVs compress ~5x; 200x only happens with padding/bombs.
MAX_COMPRESSION_RATIO = 200
RATIO_CHECK_MIN_BYTES = 2**20
_CHUNK = 2**20
_MD5_MAX_BYTES = 4096
_INPUT_HINT = "pass --input with a local MovieLens directory or zip"


class DownloadError(Exception):
    """A dataset could not be downloaded, verified or extracted."""


def _resolve_base_url(base_url: str | None) -> str:
    url = base_url or os.environ.get(BASE_URL_ENV) or GROUPLENS_URL
    # Without the trailing slash urljoin-style concatenation would drop the
    # last path segment of a mirror URL.
    return url if url.endswith("/") else url + "/"


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _open_url(url: str, timeout: float):
    """urlopen with network failures mapped to DownloadError.

    HTTPError is re-raised untouched so callers can treat 404 specially.
    """
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError:
        raise
    except urllib.error.URLError as exc:
        raise DownloadError(
            f"cannot reach {_host(url)} ({exc.reason}): {_INPUT_HINT}"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        # getresponse() errors (timeouts, RemoteDisconnected) escape urllib's
        # URLError wrapping, so they need their own branch.
        raise DownloadError(f"cannot reach {_host(url)} ({exc!r}): {_INPUT_HINT}") from exc
    except ValueError as exc:
        raise DownloadError(f"invalid download URL {url!r}: {exc}") from exc


class _Progress:
    """Single-line text progress bar redrawn in place with carriage returns."""

    _WIDTH = 30

    def __init__(self, label: str, total: int | None, stream: TextIO) -> None:
        self.label = label
        self.total = total if total and total > 0 else None
        self.stream = stream
        self.done = 0
        self._last_draw = 0.0
        self._last_pct = -1

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.total:
            pct = min(100, self.done * 100 // self.total)
            # Redraw per whole percent, not per chunk, to keep stderr small.
            if pct == self._last_pct:
                return
            self._last_pct = pct
        elif now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self._draw()

    def _draw(self) -> None:
        mb = self.done / 2**20
        if self.total:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * self._WIDTH)
            bar = "#" * filled + "-" * (self._WIDTH - filled)
            line = f"\r{self.label} [{bar}] {frac * 100:5.1f}% {mb:.1f}/{self.total / 2**20:.1f} MB"
        else:
            line = f"\r{self.label} {mb:.1f} MB"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        self._draw()
        self.stream.write("\n")
        self.stream.flush()


def _stream_to_file(
    response, out: BinaryIO, url: str, progress: bool, label: str
) -> str:
    """Copy the response body to `out` in chunks; return its md5 hex digest."""
    length_header = response.headers.get("Content-Length")
    try:
        expected = int(length_header) if length_header is not None else None
    except ValueError:
        expected = None
    bar = _Progress(label, expected, sys.stderr) if progress else None
    md5 = hashlib.md5()
    received = 0
    try:
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(
                    f"download from {_host(url)} interrupted ({exc!r}): {_INPUT_HINT}"
                ) from exc
            if not chunk:
                break
            out.write(chunk)
            md5.update(chunk)
            received += len(chunk)
            if bar:
                bar.update(len(chunk))
    finally:
        if bar:
            bar.close()
    # http.client's read(amt) returns b"" on a short body instead of raising,
    # so a dropped connection would otherwise look like a complete download.
    if expected is not None and received != expected:
        raise DownloadError(
            f"download of {url} incomplete: got {received} of {expected} bytes; retry or {_INPUT_HINT}"
        )
    return md5.hexdigest()


def _fetch_md5(url: str, timeout: float) -> str | None:
    """Return the published md5 for `url`, or None if it is unavailable."""
    md5_url = url + ".md5"
    try:
        with _open_url(md5_url, timeout) as resp:
            text = resp.read(_MD5_MAX_BYTES).decode("ascii", "replace")
    except urllib.error.HTTPError as exc:
        logger.warning(
            "no checksum at %s (HTTP %s); continuing without verification", md5_url, exc.code
        )
        return None
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"cannot reach {_host(md5_url)} ({exc!r}): {_INPUT_HINT}") from exc
    # GroupLens has used both "<hex>  file.zip" and BSD "MD5 (file.zip) = <hex>".
    match = re.search(r"\b([0-9a-fA-F]{32})\b", text)
    if not match:
        logger.warning("unrecognised checksum file %s; continuing without verification", md5_url)
        return None
    return match.group(1).lower()


def download_dataset(
    name: str,
    dest: str | Path,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES,
) -> Path:
    """Download MovieLens dataset `name` into `dest` and return its directory.

    The base URL comes from `base_url`, else $MOVIEREC_GROUPLENS_URL, else
    GROUPLENS_URL. An already-extracted dataset is returned without any
    network access.
    """
    if name not in DATASETS:
        raise DownloadError(
            f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}"
        )
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / DATASET_DIRS[name]
    ratings = target / RATINGS_FILES[name]
    if ratings.is_file():
        logger.info("dataset %s already present at %s; skipping download", name, target)
        return target
    if target.exists():
        # Extraction is atomic, so this was not left by us; don't delete it.
        raise DownloadError(
            f"{target} exists but has no {RATINGS_FILES[name]}; remove it and retry"
        )

    zip_name = DATASETS[name]
    url = _resolve_base_url(base_url) + zip_name
    logger.info("downloading %s from %s", name, url)
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{zip_name}.", suffix=".part")
    tmp_zip = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = _open_url(url, timeout)
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise DownloadError(
                        f"dataset {name!r} not found at {url} (HTTP 404); check the name "
                        f"or the {BASE_URL_ENV} mirror, or {_INPUT_HINT}"
                    ) from exc
                raise DownloadError(
                    f"downloading {url} failed: HTTP {exc.code} {exc.reason}"
                ) from exc
            with response:
                actual_md5 = _stream_to_file(response, out, url, progress, zip_name)

        expected_md5 = _fetch_md5(url, timeout)
        if expected_md5 is not None:
            if actual_md5 != expected_md5:
                raise DownloadError(
                    f"checksum mismatch for {url}: expected md5 {expected_md5}, got "
                    f"{actual_md5}; the download was deleted, retry or {_INPUT_HINT}"
                )
            logger.info("md5 verified for %s", zip_name)

        extracted = safe_extract(tmp_zip, dest, max_uncompressed_bytes=max_uncompressed_bytes)
    finally:
        tmp_zip.unlink(missing_ok=True)

    if extracted != target:
        logger.warning(
            "%s extracted to %s, expected %s; it will be re-downloaded next time",
            zip_name, extracted, target,
        )
    logger.info("dataset %s ready at %s", name, extracted)
    return extracted


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    # Unix mode bits live in the high 16 bits of external_attr.
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_entries(
    infos: list[zipfile.ZipInfo], root: Path, max_uncompressed_bytes: int
) -> None:
    total = 0
    for info in infos:
        name = info.filename
        parts = name.split("/")
        if (
            name.startswith("/")
            or "\\" in name
            or "\x00" in name
            or re.match(r"^[A-Za-z]:", name)
            or ".." in parts
        ):
            raise DownloadError(f"refusing unsafe path in zip entry {name!r}")
        if _is_symlink(info):
            raise DownloadError(f"refusing symlink zip entry {name!r}")
        resolved = (root / name).resolve()
        if resolved != root and root not in resolved.parents:
            raise DownloadError(f"zip entry {name!r} would extract outside {root}")
        if info.file_size > RATIO_CHECK_MIN_BYTES:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > MAX_COMPRESSION_RATIO:
                raise DownloadError(
                    f"zip entry {name!r} has compression ratio {ratio:.0f} "
                    f"(limit {MAX_COMPRESSION_RATIO}); refusing a likely zip bomb"
                )
        total += info.file_size
        if total > max_uncompressed_bytes:
            raise DownloadError(
                f"zip declares more than {max_uncompressed_bytes} uncompressed bytes "
                f"(at entry {name!r}); refusing a likely zip bomb"
            )


def _top_level_dir(infos: list[zipfile.ZipInfo]) -> str | None:
    """Name of the single directory everything lives under, else None."""
    tops = set()
    for info in infos:
        parts = [p for p in info.filename.split("/") if p not in ("", ".")]
        if len(parts) == 1 and not info.is_dir():
            return None  # a file at the root
        if parts:
            tops.add(parts[0])
    return tops.pop() if len(tops) == 1 else None


def safe_extract(
    zip_path: str | Path,
    dest: str | Path,
    max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES,
) -> Path:
    """Extract `zip_path` into `dest`, refusing path traversal and zip bombs.

    Everything is extracted into a temporary directory inside `dest` first and
    then renamed into place, so a failure leaves `dest` unchanged. Returns the
    zip's single top-level directory under `dest`, or `dest` itself if the zip
    has files at its root. Existing files are never overwritten.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise DownloadError(f"{zip_path} is not a valid zip file: {exc}") from exc

    with zf:
        # macOS resource-fork noise is never part of a dataset.
        infos = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]
        if not infos:
            raise DownloadError(f"{zip_path} contains no files")
        tmp_root = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
        try:
            root = tmp_root.resolve()
            _check_entries(infos, root, max_uncompressed_bytes)
            _extract_all(zf, infos, root, max_uncompressed_bytes)
            return _move_into_place(tmp_root, dest, _top_level_dir(infos))
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)


def _extract_all(
    zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], root: Path, limit: int
) -> None:
    written_total = 0
    for info in infos:
        target = root / info.filename
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        try:
            with zf.open(info) as src, open(target, "xb") as out:
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    written_total += len(chunk)
                    # Headers can lie; count what is really produced.
                    if written > info.file_size or written_total > limit:
                        raise DownloadError(
                            f"zip entry {info.filename!r} expands beyond its declared "
                            f"size or the {limit}-byte limit; refusing a likely zip bomb"
                        )
                    out.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            raise DownloadError(f"corrupt zip entry {info.filename!r}: {exc}") from exc
        except FileExistsError as exc:
            raise DownloadError(f"duplicate zip entry {info.filename!r}") from exc


def _move_into_place(tmp_root: Path, dest: Path, top: str | None) -> Path:
    if top is not None:
        target = dest / top
        if target.exists():
            raise DownloadError(f"{target} already exists; remove it or extract elsewhere")
        os.replace(tmp_root / top, target)
        return target
    items = sorted(tmp_root.iterdir())
    clashes = [p.name for p in items if (dest / p.name).exists()]
    if clashes:
        raise DownloadError(
            f"extracting into {dest} would overwrite {', '.join(clashes)}; "
            "remove them or extract elsewhere"
        )
    for item in items:
        os.replace(item, dest / item.name)
    return dest
