"""`movierec report` on small delta-rs warehouses: no Spark, no JVM."""

from __future__ import annotations

import base64
import re

from movierec_spark import cli, report
from tests.test_query import build_warehouse

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ["model_comparison", "ranking_at_k", "feature_importances", "rating_distribution", "stage_seconds"]


def embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_renders_every_plot_as_valid_png_embedded_and_beside(tmp_path, capsys):
    import matplotlib.image as mpimg

    wh = build_warehouse(tmp_path)
    out = tmp_path / "report"
    code = cli.main(["report", "--warehouse", str(wh), "--out", str(out)])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert str(out / "index.html") in printed and "5 plots" in printed and " KB" in printed

    page = (out / "index.html").read_text(encoding="utf-8")
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == sorted(f"{p}.png" for p in PLOTS)
    images = embedded_images(page)
    assert len(images) == len(PLOTS)
    for name in PLOTS:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert f'href="{name}.png"' in page  # the page references the file beside it
        assert data in images  # ... and embeds the very same image
        img = mpimg.imread(out / f"{name}.png")
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200
    # Self-contained: nothing fetched from anywhere.
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert re.search(r"<link[^>]+stylesheet", page) is None
    # The default run is the latest succeeded run with metrics; its comparison table is on the page.
    assert "Metrics of run run-a" in page and "0.8700" in page  # als rmse


def test_report_missing_tables_become_notes(tmp_path, capsys):
    from tests.test_query import write_table

    wh = tmp_path / "warehouse"
    write_table(wh, "ratings", [])
    out = tmp_path / "r"
    info = report.write_report(str(wh), str(out))
    page = (out / "index.html").read_text(encoding="utf-8")
    assert info["plots"] == 0 and info["notes"] == 7
    assert "no metrics table" in page and "no feature_importances table" in page
    assert "the ratings table is empty" in page and "no runs table" in page
    assert list(out.glob("*.png")) == []


def test_report_explicit_run_and_errors(tmp_path, capsys):
    wh = build_warehouse(tmp_path)
    info = report.write_report(str(wh), str(tmp_path / "b"), run="run-b")
    page = (tmp_path / "b" / "index.html").read_text(encoding="utf-8")
    assert info["run_id"] == "run-b" and "Metrics of run run-b" in page and "0.9700" in page
    # run-b has no feature importances: the latest run that has them is plotted, and said so.
    assert "run run-b has none" in page

    code = cli.main(["report", "--warehouse", str(wh), "--out", str(tmp_path / "c"), "--run", "nope"])
    _, err = capsys.readouterr()
    assert code == cli.EXIT_FAILED and "no run 'nope' in metrics" in err and "Traceback" not in err
    code = cli.main(["report", "--warehouse", str(tmp_path / "none"), "--out", str(tmp_path / "d")])
    _, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE and "does not exist" in err


def test_report_out_must_be_a_directory(tmp_path, capsys):
    wh = build_warehouse(tmp_path)
    target = tmp_path / "file"
    target.write_text("x")
    code = cli.main(["report", "--warehouse", str(wh), "--out", str(target)])
    _, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE and "is a file" in err


def test_report_of_a_serve_only_warehouse_labels_validation_figures(tmp_path, capsys):
    from tests.test_query import MOVIES, run_row, validation_rows, write_table

    wh = tmp_path / "warehouse"
    write_table(wh, "movies", [{"movieId": m, "title": t, "year": y, "genres": g} for m, t, y, g in MOVIES])
    write_table(wh, "runs", [run_row("serve-1", 1), run_row("serve-2", 2)])
    write_table(wh, "metrics", validation_rows("serve-1") + validation_rows("serve-2"))
    out = tmp_path / "r"
    code = cli.main(["report", "--warehouse", str(wh), "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    page = (out / "index.html").read_text(encoding="utf-8")
    assert '<h2 id="metrics-validation">Validation metrics of run serve-2 (validation split, ranking at k = 10)' \
        in page
    assert 'id="metrics-test"' not in page and "Metrics of run" not in page
    assert "VALIDATION figures, not test figures: run serve-2&#x27;s metrics on rows it held out of training" in page
    assert "0.8100" in page and "0.6200" in page  # the hybrid's validation RMSE and MAE
    assert "<h2>Model comparison: rating error (validation)</h2>" in page
    assert "<h2>Ranking quality at k = 1..20 (validation)</h2>" in page
    assert page.count("VALIDATION figures of run serve-2, not test figures") == 2  # both plot captions
    assert (out / "model_comparison.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (out / "ranking_at_k.png").read_bytes().startswith(PNG_SIGNATURE)
    info = report.write_report(str(wh), str(tmp_path / "r2"), run="serve-1")
    assert info["run_id"] == "serve-1" and info["split"] == "validation"


def test_report_of_an_evaluate_run_shows_test_figures_and_labelled_validation_ones(tmp_path):
    from tests.test_query import metric_rows, run_row, validation_rows, write_table

    wh = build_warehouse(tmp_path)
    write_table(wh, "runs", [run_row("eval-1", 20, kind="evaluate"), run_row("serve-1", 21)])
    write_table(wh, "metrics", metric_rows("eval-1") + validation_rows("eval-1") + validation_rows("serve-1"))
    info = report.write_report(str(wh), str(tmp_path / "e"), run="eval-1")
    page = (tmp_path / "e" / "index.html").read_text(encoding="utf-8")
    assert info["split"] == "test"
    test_at = page.index('<h2 id="metrics-test">Metrics of run eval-1 (test split')
    val_at = page.index('<h2 id="metrics-validation">Validation metrics of run eval-1 (validation split')
    assert test_at < val_at
    assert "0.8700" in page[test_at:val_at] and "0.8100" in page[val_at:]  # als test rmse; hybrid validation rmse
    assert "VALIDATION figures, not test figures" in page[val_at:]
    assert "VALIDATION" not in page[:val_at]
    assert "<h2>Model comparison: rating error</h2>" in page  # the plots are of the test figures
    # The default run (the serve run, newest) has validation figures only; the page points at the test ones.
    info = report.write_report(str(wh), str(tmp_path / "d"))
    page = (tmp_path / "d" / "index.html").read_text(encoding="utf-8")
    assert info["run_id"] == "serve-1" and info["split"] == "validation"
    assert "Run eval-1 has test figures: <code>movierec report --run eval-1</code>" in page


def test_report_plots_the_diversity_tradeoff_and_who_is_served_by_what(tmp_path):
    from tests.test_query import utc, write_table

    wh = build_warehouse(tmp_path)
    # run-a, the latest succeeded serve run with recommendations: user 1 has 3 train ratings
    # (bucket 1-5), user 2 has 30 (21-100), user 7 has 150 (> 100).
    write_table(wh, "rating_splits", [
        {"run_id": "run-a", "userId": u, "movieId": m, "rating": 4.0, "rated_at": utc(1), "split": "train"}
        for u, n in ((1, 3), (2, 30), (7, 150)) for m in range(1000, 1000 + n)])
    # run-a's final lists at lambda 0 and two MMR re-ranks of them.
    write_table(wh, "metrics", [
        {"run_id": "run-a", "model": m, "metric": metric, "k": 10, "value": v, "split": "test"}
        for m, metric, v in (("hybrid", "diversity", 0.50), ("hybrid_mmr0.2", "ndcg", 0.17),
                             ("hybrid_mmr0.2", "diversity", 0.62), ("hybrid_mmr0.5", "ndcg", 0.12),
                             ("hybrid_mmr0.5", "diversity", 0.80))])
    out = tmp_path / "r"
    info = report.write_report(str(wh), str(out), run="run-a")
    page = (out / "index.html").read_text(encoding="utf-8")
    assert info["plots"] == 7
    for name in ("diversity_tradeoff", "sources_by_history"):
        assert (out / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "One point per lambda" in page
    # User 1's list is two hybrid picks and a content one; users 2 and 7 are all hybrid.
    assert "users per bucket: 1-5 1, 6-20 0, 21-100 1, &gt; 100 1" in page
    assert "1-5: content 33.3%, hybrid 66.7%; 21-100: hybrid 100.0%; &gt; 100: hybrid 100.0%" in page
    # Without MMR rows the trade-off plot says how to get them.
    info = report.write_report(str(wh), str(tmp_path / "b"), run="run-b")
    assert "evaluation.diversity_sweep" in (tmp_path / "b" / "index.html").read_text(encoding="utf-8")
