"""User mistakes end in one line and an exit code, never a traceback; secrets given as config
never reach a log line or a table. Every case runs `movierec`'s real main, in one subprocess
(one JVM) through tests/cli_runner.py, which reports any exception that escaped it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from deltalake import DeltaTable

from .conftest import REPO, TEST_OVERRIDES

MOVIES = "movieId,title,genres\n1,Toy Story (1995),Animation\n2,Heat (1995),Action\n3,Up (2009),Animation\n"
HEAD = "userId,movieId,rating,timestamp\n"
# Rated in July 2000 (964982703 = 2000-07-30).
RATINGS = HEAD + "1,1,4.0,964982703\n1,2,3.5,964981247\n2,1,0.5,964982224\n2,3,5.0,964983815\n3,2,4.0,964983000\n"
SECRET = "s3cr3t-Do-Not-Log-7Q"
ACCESS = "AKIA-EXAMPLE-ACCESS-42"


def _settings() -> list[str]:
    out = []
    for k, v in TEST_OVERRIDES.items():
        out += ["--set", f"{k.replace('__', '.')}={str(v).lower() if isinstance(v, bool) else v}"]
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    data = root / "data"
    data.mkdir()
    (data / "movies.csv").write_text(MOVIES)
    (data / "ratings.csv").write_text(RATINGS)
    (root / "header_only.csv").write_text(HEAD)
    (root / "test.csv").write_text(HEAD + "1,3,4.0,964983000\n")
    common = ["--input", str(data), *_settings()]
    wh = str(root / "wh-secret")
    # The split cases reuse the first case's ingested warehouse (an ingest costs seconds).
    split = [*_settings(), "--warehouse", wh, "--stages", "split"]
    argvs = {
        # A run with object-store keys given as Spark conf: it succeeds, and the keys stay inside.
        "secrets": ["run", *common, "--warehouse", wh, "--stages", "ingest,split,baselines", "--run-id", "sec",
                    "--set", f"spark.conf.spark.hadoop.fs.s3a.secret.key={SECRET}",
                    "--set", f"spark.conf.spark.hadoop.fs.s3a.access.key={ACCESS}"],
        "empty_train": ["evaluate", *split, "--set", "split.method=temporal_global", "--set", "split.cutoff=2000-01-01"],
        "empty_test": ["evaluate", *split, "--set", "split.method=temporal_global", "--set", "split.cutoff=2030-01-01"],
        "train_file_no_rows": ["evaluate", *split, "--train", str(root / "header_only.csv"),
                               "--test", str(root / "test.csv")],
        "read_only_warehouse": ["run", *common, "--warehouse", "/proc/movierec-warehouse"],
        "unknown_stage": ["run", *common, "--warehouse", str(root / "wh4"), "--stages", "ingest,nope"],
        "resume_unknown_run": ["run", *common, "--warehouse", wh, "--resume", "no-such-run"],
    }
    p = subprocess.run([sys.executable, "-m", "tests.cli_runner", json.dumps(list(argvs.values()))],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("CASES ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    got = dict(zip(argvs, json.loads(lines[-1][len("CASES "):])))
    # What the process printed, without the runner's own report (which repeats the arguments).
    printed = "\n".join(ln for ln in p.stdout.splitlines() if not ln.startswith("CASES ")) + p.stderr
    return root, got, printed


@pytest.mark.parametrize("case, rc, message", [
    ("empty_train", 1, "split: the train part is empty (split.method=temporal_global, split.cutoff=2000-01-01)"),
    ("empty_test", 1, "split: the test part is empty (split.method=temporal_global, split.cutoff=2030-01-01)"),
    ("train_file_no_rows", 1, "split: the train part is empty (--train "),
    ("read_only_warehouse", 2, "paths.warehouse: cannot create or write /proc/movierec-warehouse"),
    ("unknown_stage", 2, "unknown stage(s) ['nope']"),
    ("resume_unknown_run", 2, "cannot resume run no-such-run: it is not in"),
])
def test_a_user_mistake_ends_in_one_line_and_an_exit_code(cases, case, rc, message):
    _, got, _ = cases
    r = got[case]
    assert r["escaped"] is None, r["escaped"]
    assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
    errors = [ln for ln in r["stderr"].splitlines() if ln.startswith("movierec: error:")]
    assert len(errors) == 1 and message in errors[0], r["stderr"][-3000:]
    assert r["rc"] == rc


def test_secrets_given_as_config_reach_no_log_and_no_table(cases):
    root, got, output = cases
    r = got["secrets"]
    assert r["rc"] == 0 and r["escaped"] is None, r["stderr"][-3000:]
    assert "config from" in r["stderr"] and "*********(redacted)" in r["stderr"]  # the line is there, redacted
    for secret in (SECRET, ACCESS):  # the Python log (captured per case) and the JVM's output
        assert secret not in r["stderr"], [ln for ln in r["stderr"].splitlines() if secret in ln][:3]
        assert secret not in output, [ln for ln in output.splitlines() if secret in ln][:3]
    seen = 0
    for log_dir in (root / "wh-secret").glob("*/_delta_log"):
        t = DeltaTable(str(log_dir.parent)).to_pyarrow_table()
        seen += t.num_rows
        text = json.dumps(t.to_pylist(), default=str)
        assert SECRET not in text and ACCESS not in text, log_dir.parent.name
    runs = [r for r in DeltaTable(str(root / "wh-secret" / "runs")).to_pyarrow_table().to_pylist() if r["run_id"] == "sec"]
    conf = json.loads(runs[0]["config"])["spark"]["conf"]
    assert conf["spark.hadoop.fs.s3a.secret.key"] == conf["spark.hadoop.fs.s3a.access.key"] == "*********(redacted)"
    assert seen > 0
    # Nor do the raw files of any table (the Delta log and Parquet bytes).
    for f in Path(root / "wh-secret").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert SECRET.encode() not in data and ACCESS.encode() not in data, f
