"""Tests for movierec_spark.download against a local HTTP server (no Spark)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import socket
import stat
import struct
import threading
import zipfile
from pathlib import Path

import pytest

from movierec_spark import download
from movierec_spark.download import DATASETS, DownloadError, download_dataset, safe_extract

RATINGS = b"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.0,964981247\n"
MOVIES = b"movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n3,Grumpier Old Men (1995),Comedy|Romance\n"


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]  # set per server by the fixture

    def do_GET(self):  # noqa: N802 - stdlib naming
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, format, *args):  # keep pytest output clean
        pass


class Server:
    def __init__(self, root: Path, url: str, requests: list[str]):
        self.root = root
        self.url = url
        self.requests = requests

    def serve_zip(self, name: str, data: bytes, md5: str | None = "auto") -> None:
        (self.root / name).write_bytes(data)
        if md5 == "auto":
            md5 = f"{hashlib.md5(data).hexdigest()}  {name}\n"
        if md5 is not None:
            (self.root / f"{name}.md5").write_text(md5)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_CountingHandler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Server(root, f"http://127.0.0.1:{httpd.server_address[1]}/", requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def dest(tmp_path):
    # A subdirectory, so escapes into tmp_path are observable.
    d = tmp_path / "data"
    d.mkdir()
    return d


def make_zip(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def small_dataset_zip() -> bytes:
    return make_zip(
        {"ml-latest-small/ratings.csv": RATINGS, "ml-latest-small/movies.csv": MOVIES}
    )


def test_happy_path(server, dest):
    server.serve_zip("ml-latest-small.zip", small_dataset_zip())

    result = download_dataset("ml-latest-small", dest, base_url=server.url, progress=False)

    assert result == dest / "ml-latest-small"
    assert (result / "ratings.csv").read_bytes() == RATINGS
    assert (result / "movies.csv").read_bytes() == MOVIES
    assert sorted(p.name for p in dest.iterdir()) == ["ml-latest-small"]
    assert server.requests == ["/ml-latest-small.zip", "/ml-latest-small.zip.md5"]


def test_bsd_style_md5_and_env_base_url(server, dest, monkeypatch):
    data = small_dataset_zip()
    server.serve_zip(
        "ml-latest-small.zip", data, md5=f"MD5 (ml-latest-small.zip) = {hashlib.md5(data).hexdigest()}\n"
    )
    # Base URL without trailing slash, read from the environment at call time.
    monkeypatch.setenv("MOVIEREC_GROUPLENS_URL", server.url.rstrip("/"))

    result = download_dataset("ml-latest-small", dest, progress=False)

    assert (result / "ratings.csv").read_bytes() == RATINGS


def test_checksum_mismatch_leaves_nothing(server, dest):
    server.serve_zip("ml-latest-small.zip", small_dataset_zip(), md5="0" * 32 + "  ml-latest-small.zip\n")

    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_dataset("ml-latest-small", dest, base_url=server.url, progress=False)

    assert list(dest.iterdir()) == []


def test_missing_md5_still_succeeds(server, dest, caplog):
    server.serve_zip("ml-latest-small.zip", small_dataset_zip(), md5=None)

    with caplog.at_level("WARNING", logger="movierec_spark.download"):
        result = download_dataset("ml-latest-small", dest, base_url=server.url, progress=False)

    assert (result / "ratings.csv").read_bytes() == RATINGS
    assert "no checksum" in caplog.text


def test_zip_404(server, dest):
    with pytest.raises(DownloadError, match="not found at .*ml-1m.zip"):
        download_dataset("ml-1m", dest, base_url=server.url, progress=False)
    assert list(dest.iterdir()) == []


def _symlink_zip(target: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("ml-latest-small/ratings.csv")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, target)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_path_traversal_rejected(server, dest, tmp_path, kind):
    outside = tmp_path / "outside" / "x"
    if kind == "dotdot":
        bad_name, data = "../evil.txt", make_zip({"ml-latest-small/ratings.csv": RATINGS, "../evil.txt": b"pwned"})
    elif kind == "absolute":
        # writestr keeps the leading slash (ZipFile.write would strip it).
        bad_name, data = str(outside), make_zip({str(outside): b"pwned"})
    else:
        bad_name, data = "ml-latest-small/ratings.csv", _symlink_zip(str(outside))
    server.serve_zip("ml-latest-small.zip", data)

    with pytest.raises(DownloadError) as excinfo:
        download_dataset("ml-latest-small", dest, base_url=server.url, progress=False)

    assert bad_name in str(excinfo.value)
    assert not (tmp_path / "evil.txt").exists()
    assert not outside.exists() and not outside.is_symlink()
    assert list(dest.iterdir()) == []


def test_zip_bomb_ratio_rejected(dest, tmp_path):
    zip_path = tmp_path / "bomb.zip"
    zip_path.write_bytes(make_zip({"bomb/zeros.bin": bytes(50 * 2**20)}))

    with pytest.raises(DownloadError, match="compression ratio"):
        safe_extract(zip_path, dest)
    assert list(dest.iterdir()) == []


def test_zip_bomb_total_size_rejected(server, dest):
    # Stored, not deflated, so only the total-size limit can trip.
    data = make_zip(
        {"ml-latest-small/ratings.csv": RATINGS, "ml-latest-small/big.bin": bytes(2 * 2**20)},
        compression=zipfile.ZIP_STORED,
    )
    server.serve_zip("ml-latest-small.zip", data)

    with pytest.raises(DownloadError, match="uncompressed bytes"):
        download_dataset(
            "ml-latest-small", dest, base_url=server.url, progress=False,
            max_uncompressed_bytes=2**20,
        )
    assert list(dest.iterdir()) == []


def _patch_central_sizes(data: bytes, file_size: int) -> bytes:
    """Rewrite every central-directory uncompressed size to `file_size`."""
    out = bytearray(data)
    pos = out.find(b"PK\x01\x02")
    while pos != -1:
        struct.pack_into("<I", out, pos + 24, file_size)
        pos = out.find(b"PK\x01\x02", pos + 4)
    return bytes(out)


def test_lying_header_rejected(dest, tmp_path):
    # Declared 100 bytes, really 512 KiB: slips past the header checks, so
    # it must be caught while extracting.
    data = _patch_central_sizes(make_zip({"x/data.bin": b"a" * 2**19}), 100)
    zip_path = tmp_path / "liar.zip"
    zip_path.write_bytes(data)

    with pytest.raises(DownloadError, match="data.bin"):
        safe_extract(zip_path, dest, max_uncompressed_bytes=2**20)
    assert list(dest.iterdir()) == []


def test_unreachable_server(dest):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now, so connecting is refused

    with pytest.raises(DownloadError, match="--input") as excinfo:
        download_dataset("ml-latest-small", dest, base_url=f"http://127.0.0.1:{port}/", progress=False, timeout=2)

    assert "cannot reach 127.0.0.1" in str(excinfo.value)
    assert list(dest.iterdir()) == []


def test_server_that_never_answers_times_out(dest):
    # Listening but never responding: the timeout fires inside getresponse(),
    # which urllib does not wrap in URLError.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(DownloadError, match="--input"):
            download_dataset(
                "ml-latest-small", dest, base_url=f"http://127.0.0.1:{port}/",
                progress=False, timeout=0.2,
            )
    assert list(dest.iterdir()) == []


def test_unknown_dataset_lists_valid_names(dest):
    with pytest.raises(DownloadError) as excinfo:
        download_dataset("ml-42", dest, base_url="http://127.0.0.1:9/", progress=False)

    message = str(excinfo.value)
    assert "ml-42" in message
    for name in DATASETS:
        assert name in message


def test_already_present_is_not_downloaded(server, dest):
    existing = dest / "ml-latest-small"
    existing.mkdir()
    (existing / "ratings.csv").write_bytes(RATINGS)
    server.serve_zip("ml-latest-small.zip", small_dataset_zip())

    result = download_dataset("ml-latest-small", dest, base_url=server.url, progress=False)

    assert result == existing
    assert server.requests == []


def test_ml_10m_extracts_to_its_own_dir_name(server, dest):
    server.serve_zip("ml-10m.zip", make_zip({"ml-10M100K/ratings.dat": b"1::122::5::838985046\n"}))

    result = download_dataset("ml-10m", dest, base_url=server.url, progress=False)

    assert result == dest / "ml-10M100K"
    assert download_dataset("ml-10m", dest, base_url=server.url, progress=False) == result
    assert server.requests == ["/ml-10m.zip", "/ml-10m.zip.md5"]


def test_progress_bar_only_when_enabled(server, dest, tmp_path, capsys):
    server.serve_zip("ml-latest-small.zip", small_dataset_zip())

    download_dataset("ml-latest-small", dest, base_url=server.url, progress=True)
    err = capsys.readouterr().err
    assert "\r" in err and "100.0%" in err and "MB" in err

    download_dataset("ml-latest-small", tmp_path / "other", base_url=server.url, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_without_content_length():
    stream = io.StringIO()
    bar = download._Progress("x.zip", None, stream)
    bar.update(3 * 2**20)
    bar.close()
    assert "3.0 MB" in stream.getvalue() and "%" not in stream.getvalue()


def test_safe_extract_root_level_files_returns_dest(dest, tmp_path):
    zip_path = tmp_path / "flat.zip"
    zip_path.write_bytes(make_zip({"ratings.csv": RATINGS, "movies.csv": MOVIES}))

    assert safe_extract(zip_path, dest) == dest
    assert (dest / "ratings.csv").read_bytes() == RATINGS
    assert sorted(p.name for p in dest.iterdir()) == ["movies.csv", "ratings.csv"]


def test_safe_extract_refuses_to_overwrite(dest, tmp_path):
    (dest / "ml-latest-small").mkdir()
    zip_path = tmp_path / "d.zip"
    zip_path.write_bytes(small_dataset_zip())

    with pytest.raises(DownloadError, match="already exists"):
        safe_extract(zip_path, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["ml-latest-small"]


_STALL = """
import sys, time
from pathlib import Path
from movierec_spark import download
from movierec_spark.config import load_config
from movierec_spark.ingest import resolve_input

real = download._extract_all
def stall(zf, infos, root, limit):  # write the first entry, then hang mid-extraction
    real(zf, infos[:1], root, limit)
    Path(sys.argv[2]).write_text(str(root))
    time.sleep(600)
download._extract_all = stall
resolve_input(load_config(None, {"paths.data_dir": sys.argv[3], "paths.warehouse": sys.argv[4]}), sys.argv[1])
"""


def test_an_extraction_killed_midway_is_redone_on_the_next_run(tmp_path):
    """A run killed while it extracts leaves a partial directory; the next run removes it and
    extracts the zip whole (it used to reuse the half-extracted directory and fail on layout)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from movierec_spark.config import load_config
    from movierec_spark.ingest import resolve_input

    zip_path = tmp_path / "ml-latest-small.zip"
    zip_path.write_bytes(small_dataset_zip())
    marker, data = tmp_path / "stalled", tmp_path / "data"
    p = subprocess.Popen([sys.executable, "-c", _STALL, str(zip_path), str(marker), str(data), str(tmp_path / "wh")])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the extraction never started"
        os.kill(p.pid, signal.SIGKILL)  # mid-extraction, as a killed run would be
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    left = sorted(x.name for x in (data / ".extracted").iterdir())
    assert len(left) == 1 and ".partial-" in left[0]  # what the kill left: no finished directory
    cfg = load_config(None, {"paths.data_dir": str(data), "paths.warehouse": str(tmp_path / "wh")})
    got = resolve_input(cfg, str(zip_path))
    assert (got / "ratings.csv").read_bytes() == RATINGS and (got / "movies.csv").read_bytes() == MOVIES
    assert [x.name for x in (data / ".extracted").iterdir()] == [got.parent.name]  # the partial one is gone
    assert resolve_input(cfg, str(zip_path)) == got.parent  # reused from now on
