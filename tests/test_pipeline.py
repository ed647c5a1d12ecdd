"""The runner: runs recorded in `runs` (failed ones too), the CLI's errors, the offline default."""

from __future__ import annotations

import socket

import pytest

from movierec_spark import tables
from movierec_spark.cli import default_input, main
from movierec_spark.ingest import IngestError
from movierec_spark.pipeline import PipelineError, run_pipeline

from .conftest import make_config
from .test_ingest import CSV_MOVIES, CSV_RATINGS, write_files


def test_run_records_success_and_failure(spark, tmp_path):
    cfg = make_config(tmp_path / "wh")
    good = write_files(tmp_path / "good", {"movies.csv": CSV_MOVIES, "ratings.csv": CSV_RATINGS})
    ctx = run_pipeline(spark, cfg, str(good), stages=["ingest"], run_id="run-ok")
    assert ctx.results["ingest"]["ratings"] == 4
    bad = write_files(tmp_path / "bad", {"movies.csv": CSV_MOVIES, "ratings.csv": "userId,movieId,rating,timestamp\n1,1,9,1\n"})
    with pytest.raises(IngestError):
        run_pipeline(spark, cfg, str(bad), stages=["ingest"], run_id="run-bad")
    runs = {r.run_id: r for r in tables.read_table(spark, cfg.paths.warehouse, "runs").collect()}
    assert set(runs) == {"run-ok", "run-bad"}
    ok, failed = runs["run-ok"], runs["run-bad"]
    assert ok.status == "succeeded" and ok.error is None and ok.finished_at >= ok.started_at
    assert set(ok.stage_seconds) == {"ingest"} and ok.stage_seconds["ingest"] > 0
    assert ok.input == str(good) and '"reject_threshold": 0.05' in ok.config
    assert failed.status == "failed" and "IngestError in stage ingest" in failed.error
    assert "ingest" in failed.stage_seconds


def test_unknown_stage_fails_before_work(spark, tmp_path):
    cfg = make_config(tmp_path / "wh")
    with pytest.raises(PipelineError, match="unknown stage"):
        run_pipeline(spark, cfg, None, stages=["ingest", "nope"])
    # A fresh run appends its per-run rows: a stage listed twice would write them twice.
    with pytest.raises(PipelineError, match=r"\['split'\] listed more than once"):
        run_pipeline(spark, cfg, None, stages=["ingest", "split", "baselines", "split"])
    assert not tables.table_exists(spark, tables.table_path(cfg.paths.warehouse, "runs"))


def test_cli_config_error_exits_2_without_spark(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark:\n  nope: 1\n")
    assert main(["run", "--config", str(bad), "--warehouse", str(tmp_path / "wh")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'spark.nope'" in err and "Traceback" not in err
    assert main(["ingest", "--input", str(tmp_path / "missing"), "--warehouse", str(tmp_path / "wh")]) == 2
    assert "paths.input: not found" in capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_input_offline_falls_back_to_demo(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MOVIEREC_GROUPLENS_URL", f"http://127.0.0.1:{_closed_port()}/")
    cfg = make_config(tmp_path / "wh", demo__users=50, demo__movies=80, demo__ratings=2000)
    path = default_input(cfg)
    assert path.endswith("demo-42")
    lines = (tmp_path / "data" / "demo-42" / "ratings.csv").read_text().splitlines()
    assert len(lines) == 2001
    assert "GroupLens is unreachable" in caplog.text and "--input" in caplog.text
    # A second call reuses the generated set instead of regenerating it.
    assert default_input(cfg) == path


def _overlap_stages(monkeypatch, log: list, fail: str | None = None):
    """Stand-in stages for the overlap tests: each logs its start and end; content needs
    baselines' result (ctx.wait_for) and recommend needs hybrid's."""
    import threading
    import time

    from movierec_spark import pipeline

    content_started = threading.Event()

    def stage(name, body=None):
        def run(ctx):
            log.append((name, "start", threading.current_thread() is threading.main_thread()))
            if name == fail:
                raise ValueError(f"{name} broke")
            out = body(ctx) if body else {}
            log.append((name, "end"))
            return {"name": name, **(out or {})}
        monkeypatch.setitem(pipeline.STAGES, name, run)

    # baselines returns only once content runs beside it: they overlap, or this times out.
    stage("baselines", lambda ctx: {"beside": content_started.wait(30)})
    stage("als")

    def content(ctx):
        content_started.set()
        ctx.wait_for("baselines")
        return {"saw_baselines": ctx.results.get("baselines", {}).get("name")}
    stage("content", content)

    def hybrid(ctx):
        time.sleep(1.0)
        return {"slept": True}
    stage("hybrid", hybrid)

    def recommend(ctx):
        recommend_started.set()
        before = {s: s in ctx.ended and s not in ctx.results for s in ("features", "hybrid")}
        ctx.wait_for("features")
        ctx.wait_for("hybrid")
        return {"hybrid_ran_beside": before["hybrid"], "features_ran_beside": before["features"],
                "hybrid_then": ctx.results["hybrid"]["slept"], "features_then": "features" in ctx.results}
    stage("recommend", recommend)

    # The stages the wider overlap adds: als_implicit beside baselines and als, recommend beside
    # features (which returns only once recommend runs beside it) and hybrid.
    recommend_started = threading.Event()

    stage("als_implicit")
    stage("features", lambda ctx: {"recommend_beside": recommend_started.wait(30)})


def test_overlapped_stages_run_beside_others_and_are_recorded_in_turn(spark, tmp_path, monkeypatch):
    log: list = []
    _overlap_stages(monkeypatch, log)
    # An evaluate run: a serve run would point `latest` at the (stand-in) recommend stage's table.
    cfg = make_config(tmp_path / "wh", pipeline__mode="evaluate")
    names = ["baselines", "als", "content", "hybrid", "recommend"]
    ctx = run_pipeline(spark, cfg, None, stages=names)
    assert ctx.results["baselines"]["beside"] is True
    assert ctx.results["content"]["saw_baselines"] == "baselines"
    assert ctx.results["recommend"] == {"name": "recommend", "hybrid_ran_beside": True, "hybrid_then": True,
                                        "features_ran_beside": False, "features_then": False}
    # content and hybrid ran off the main thread, the others on it.
    assert {e[0]: e[2] for e in log if e[1] == "start"} == {
        "baselines": True, "als": True, "content": False, "hybrid": False, "recommend": True}
    rows = tables.read_table(spark, cfg.paths.warehouse, "run_stages").where(f"run_id = '{ctx.run_id}'").collect()
    assert {r.stage for r in rows} == set(names)
    run = tables.read_table(spark, cfg.paths.warehouse, "runs").where(f"run_id = '{ctx.run_id}'").first()
    assert run.status == "succeeded" and set(run.stage_seconds) == set(names)
    # Off: every stage in turn on the main thread; recommend finds hybrid already done.
    log.clear()
    seq = make_config(tmp_path / "wh2", pipeline__overlap=[], pipeline__mode="evaluate")
    ctx = run_pipeline(spark, seq, None, stages=["als", "content", "hybrid", "recommend"])
    assert all(e[2] for e in log if e[1] == "start")
    assert ctx.results["recommend"]["hybrid_ran_beside"] is False


def test_the_wider_overlap_runs_implicit_als_and_recommend_in_the_background(spark, tmp_path, monkeypatch):
    log: list = []
    _overlap_stages(monkeypatch, log)
    cfg = make_config(tmp_path / "wh", pipeline__mode="evaluate",
                      pipeline__overlap=["content", "als_implicit", "recommend", "hybrid"])
    names = ["baselines", "als", "als_implicit", "content", "features", "hybrid", "recommend"]
    ctx = run_pipeline(spark, cfg, None, stages=names)
    # baselines returned once content ran beside it; features once recommend did.
    assert ctx.results["baselines"]["beside"] is True
    assert ctx.results["features"]["recommend_beside"] is True
    # recommend started before features and hybrid finished, and waited for both.
    assert ctx.results["recommend"] == {"name": "recommend", "hybrid_ran_beside": True, "features_ran_beside": True,
                                        "hybrid_then": True, "features_then": True}
    # The hybrid ran on the main thread, beside recommend; als_implicit, content and recommend off it.
    assert {e[0]: e[2] for e in log if e[1] == "start"} == {
        "baselines": True, "als": True, "als_implicit": False, "content": False, "features": True,
        "hybrid": True, "recommend": False}
    # A stage is over before the first stage it may not run beside starts.
    order = [e[:2] for e in log]
    assert order.index(("als_implicit", "end")) < order.index(("features", "start"))
    assert order.index(("content", "end")) < order.index(("features", "start"))
    rows = tables.read_table(spark, cfg.paths.warehouse, "run_stages").where(f"run_id = '{ctx.run_id}'").collect()
    assert {r.stage for r in rows} == set(names)


def test_a_failed_stage_stops_the_background_one_and_fails_the_run(spark, tmp_path, monkeypatch):
    log: list = []
    _overlap_stages(monkeypatch, log, fail="baselines")
    cfg = make_config(tmp_path / "wh")
    with pytest.raises(ValueError, match="baselines broke"):
        run_pipeline(spark, cfg, None, stages=["baselines", "als", "content"], run_id="ov-fail")
    run = tables.read_table(spark, cfg.paths.warehouse, "runs").where("run_id = 'ov-fail'").first()
    assert run.status == "failed" and "ValueError in stage baselines" in run.error
    # content waited for baselines, which never finished: it stopped too, and is not recorded.
    stages = {r.stage for r in tables.read_table(spark, cfg.paths.warehouse, "run_stages").collect()} \
        if tables.table_exists(spark, tables.table_path(cfg.paths.warehouse, "run_stages")) else set()
    assert "content" not in stages and ("content", "end") not in log


def test_the_run_log_says_how_much_cpu_the_jvm_used(spark):
    # The run's last log line carries the JVM's CPU and GC seconds beside its wall time: whether
    # a run is CPU-bound is what says which kind of change can make it faster.
    from movierec_spark.pipeline import _usage_text
    from movierec_spark.session import jvm_usage

    before = jvm_usage(spark)
    assert before is not None and before["cpu_s"] > 0 and before["gc_s"] >= 0 and before["scope"] == "JVM"
    spark.range(3_000_000).selectExpr("sum(id * id % 7)").collect()  # some work in the JVM
    after = jvm_usage(spark)
    assert after["cpu_s"] > before["cpu_s"] and after["gc_s"] >= before["gc_s"]
    assert _usage_text({"cpu_s": 100.0, "gc_s": 1.0}, {"cpu_s": 988.0, "gc_s": 23.8, "scope": "JVM"}, 548.0) == \
        "; JVM CPU 888 s (1.62 cores), GC 22.8 s"
    assert _usage_text(before, {"cpu_s": before["cpu_s"] + 5, "gc_s": before["gc_s"], "scope": "driver JVM"},
                       10.0) == "; driver JVM CPU 5 s (0.50 cores), GC 0.0 s"
    assert _usage_text(None, after, 10.0) == ""
