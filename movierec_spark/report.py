"""`movierec report`: one offline HTML page with PNG plots of a warehouse, no JVM.

DIR/index.html embeds every plot as a base64 data URI (the page alone is enough: no CDN, no
JavaScript, no remote CSS) and links the same PNG files written beside it. Plots (matplotlib,
Agg backend): model comparison (RMSE/MAE), precision/recall/nDCG at k = 1..20, feature
importances, the rating distribution and seconds per stage across runs. A missing table or an
empty selection replaces its plot with a short note; it never stops the page.

Metrics are the chosen run's test figures when it has them (an evaluate run), else its
validation figures (a serve run has no test part): rows held out of training within the run.
Validation figures are labelled as such wherever they appear - table heading, note, plot
headings, titles and captions - and an evaluate run's validation figures get their own table.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
import os
import time
from dataclasses import dataclass

from . import query as q

log = logging.getLogger(__name__)

RANKING_PLOTTED = (("precision", "Precision@k"), ("recall", "Recall@k"), ("ndcg", "nDCG@k"))
MAX_K = 20
MAX_RUNS = 30
MAX_FEATURES = 30
MMR_PREFIX = "hybrid_mmr"  # metrics' model names of the final lists' MMR re-ranks


@dataclass
class Section:
    key: str
    heading: str
    caption: str = ""
    png: bytes | None = None
    note: str | None = None

    @property
    def filename(self) -> str:
        return f"{self.key}.png"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Data


def _metric_rows(warehouse: str, run: str | None) -> tuple[str | None, list[dict], str | None, str | None]:
    """(run, its rows of the split plotted, how the run was chosen, that split)."""
    if not q.table_exists(warehouse, "metrics"):
        if run is not None:
            raise q.QueryError(f"--run {run}: warehouse {warehouse} has no metrics table to report on")
        return None, [], "no metrics table: run the pipeline's evaluate stage first", None
    run, rows, how = q.load_metrics(warehouse, run)
    split = q.default_split(r["split"] for r in rows)
    return run, [r for r in rows if r["split"] == split], how, split


def _is_validation(split: str | None) -> bool:
    return split == q.VALIDATION


def _split_tag(split: str | None) -> str:
    """' (validation)' after a heading or title of validation figures, else ''."""
    return " (validation)" if _is_validation(split) else ""


def _validation_caption(run: str | None) -> str:
    return (f"VALIDATION figures of run {run}, not test figures: rows held out of training within the run "
            "(the hybrid GBT's held-out out-of-fold rows; the ranker's held-out users), not a test part. ")


def _model_order(models) -> list[str]:
    return sorted(set(models), key=q._model_key)


# --------------------------------------------------------------------------------------------
# Plots


def plot_model_comparison(plt, run: str | None, rows: list[dict], missing: str | None,
                          split: str | None = "test") -> Section:
    s = Section("model_comparison", "Model comparison: rating error" + _split_tag(split))
    if missing:
        s.note = missing
        return s
    vals = {(r["model"], r["metric"]): r["value"] for r in rows
            if r["k"] is None and r["metric"] in ("rmse", "mae") and r["value"] is not None}
    models = _model_order(m for m, _ in vals)
    if not models:
        s.note = f"run {run} has no RMSE/MAE metrics (no rating model was evaluated)"
        return s
    import numpy as np

    x = np.arange(len(models))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(models) + 2), 4))
    for i, (metric, label) in enumerate((("rmse", "RMSE"), ("mae", "MAE"))):
        ys = [vals.get((m, metric), np.nan) for m in models]
        bars = ax.bar(x + (i - 0.5) * 0.38, ys, 0.38, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(x, models, rotation=20, ha="right")
    ax.set_ylabel("error (stars, lower is better)")
    ax.set_title(f"RMSE and MAE per model - run {run}{_split_tag(split)}")
    ax.legend()
    s.png = _png(fig)
    s.caption = ((_validation_caption(run) + "Rating error; lower is better.") if _is_validation(split)
                 else "Held-out rating error per model; lower is better.")
    return s


def plot_ranking(plt, run: str | None, rows: list[dict], missing: str | None, split: str | None = "test") -> Section:
    s = Section("ranking_at_k", "Ranking quality at k = 1..20" + _split_tag(split))
    if missing:
        s.note = missing
        return s
    series: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        if r["k"] is not None and r["k"] <= MAX_K and r["value"] is not None and \
                r["metric"] in dict(RANKING_PLOTTED):
            series.setdefault((r["metric"], r["model"]), {})[r["k"]] = r["value"]
    if not series:
        s.note = f"run {run} has no precision/recall/nDCG at k <= {MAX_K} (no ranking model was evaluated)"
        return s
    # The MMR re-ranks of the final lists have their own plot (plot_diversity).
    models = _model_order(m for _, m in series if not m.startswith(MMR_PREFIX))
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    fig, axes = plt.subplots(1, len(RANKING_PLOTTED), figsize=(12, 3.8))
    for ax, (metric, label) in zip(axes, RANKING_PLOTTED):
        for m in models:
            pts = sorted(series.get((metric, m), {}).items())
            if pts:
                ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", markersize=3,
                        label=m, color=colors[m])
        ax.set_title(label)
        ax.set_xlabel("k")
        ax.set_xlim(0.5, MAX_K + 0.5)
        ax.set_xticks([1, 5, 10, 15, 20])
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Top-N quality per ranking model - run {run}{_split_tag(split)}")
    s.png = _png(fig)
    ks = sorted({k for pts in series.values() for k in pts})
    s.caption = ((_validation_caption(run) if _is_validation(split) else "")
                 + f"Evaluated at k = {', '.join(map(str, ks))}. Higher is better."
                 + (" (Only these k were evaluated: set evaluation.ks to 1..20 for full curves.)"
                    if len(ks) < MAX_K else ""))
    return s


def plot_diversity(plt, run: str | None, rows: list[dict], missing: str | None, split: str | None = "test") -> Section:
    """Accuracy against diversity: the final lists (lambda 0) and their MMR re-ranks
    (evaluation.diversity_sweep), one point per lambda, nDCG@10 against intra-list diversity@10."""
    s = Section("diversity_tradeoff", "Accuracy against diversity (MMR re-rank)" + _split_tag(split))
    if missing:
        s.note = missing
        return s
    vals = {(r["model"], r["metric"]): r["value"] for r in rows if r["k"] == 10 and r["value"] is not None}
    pts = []
    for m in {m for m, _ in vals}:
        lam = 0.0 if m == "hybrid" else float(m[len(MMR_PREFIX):]) if m.startswith(MMR_PREFIX) else None
        if lam is not None and (m, "ndcg") in vals and (m, "diversity") in vals:
            pts.append((lam, vals[(m, "diversity")], vals[(m, "ndcg")], vals.get((m, "coverage"))))
    if len(pts) < 2:
        s.note = (f"run {run} has no MMR re-ranks of its final lists: an evaluate run with "
                  "evaluation.diversity_sweep (e.g. [0.1, 0.2, 0.3, 0.5]) measures the trade-off")
        return s
    pts.sort()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", color="C3")
    for lam, x, y, cov in pts:
        ax.annotate(f"\u03bb={lam:g}" + (f" (cov {cov:.3f})" if cov is not None else ""), (x, y),
                    textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("intra-list diversity@10 (1 - mean content similarity)")
    ax.set_ylabel("nDCG@10")
    ax.set_title(f"Final lists re-ranked by MMR - run {run}{_split_tag(split)}")
    s.png = _png(fig)
    s.caption = ("One point per lambda (evaluation.diversity_sweep): 0 is the run's final lists (the ranker's "
                 "order unless the run set recommend.diversity itself); larger lambdas trade "
                 "nDCG@10 for lists that are less alike. Coverage@10 in brackets.")
    return s


HISTORY_BUCKETS = ((1, 5, "1-5"), (6, 20, "6-20"), (21, 100, "21-100"), (101, None, "> 100"))


def plot_sources(plt, warehouse: str) -> Section:
    """Who is served by what: per user-history bucket (train ratings in the serve run), the
    share of the latest serve run's recommendation rows from each source."""
    s = Section("sources_by_history", "Who is served by what: sources of the final lists")
    if not (q.table_exists(warehouse, "recommendations") and q.table_exists(warehouse, "rating_splits")):
        s.note = "no recommendations (or rating_splits) table: run a serve run (`movierec run`) first"
        return s
    from .query_io import _lit, run_sql

    recs = q.open_table(warehouse, "recommendations")
    hist = q.run_history(warehouse) or []
    present = {r["run_id"] for r in q.rows_of(run_sql(recs, "SELECT DISTINCT run_id FROM t"))}
    serve = [h["run_id"] for h in hist if h["run_id"] in present and h.get("status") == "succeeded"]
    if not serve:
        s.note = "no succeeded serve run has recommendations"
        return s
    run = serve[-1]
    # Bucketed and counted by delta-rs's engine: a handful of rows reach Python, whatever the
    # number of users.
    from deltalake import QueryBuilder

    import pyarrow as pa

    bucket = "CASE " + " ".join(f"WHEN n <= {hi} THEN '{lb}'" for lo, hi, lb in HISTORY_BUCKETS if hi is not None) + \
        f" ELSE '{HISTORY_BUCKETS[-1][2]}' END"
    hist_sql = (f'SELECT "userId", count(*) AS n FROM s WHERE run_id = {_lit(run)} AND split = \'train\' '
                'GROUP BY "userId"')
    sql = (f'SELECT {bucket} AS bucket, r.source AS source, count(*) AS c, count(DISTINCT r."userId") AS u '
           f'FROM r JOIN ({hist_sql}) h ON r."userId" = h."userId" WHERE r.run_id = {_lit(run)} GROUP BY 1, 2')
    users_sql = f"SELECT {bucket} AS bucket, count(*) AS u FROM ({hist_sql}) h GROUP BY 1"

    def query(text):
        qb = QueryBuilder().register("r", recs).register("s", q.open_table(warehouse, "rating_splits"))
        return q.rows_of(pa.RecordBatchReader.from_stream(qb.execute(text)).read_all())

    shares: dict[str, dict[str, int]] = {label: {} for *_, label in HISTORY_BUCKETS}
    for r in query(sql):  # users with no train rating (popular_cold) have no history bucket
        shares[r["bucket"]][r["source"]] = r["c"]
    users = {lb: 0 for *_, lb in HISTORY_BUCKETS}
    users.update({r["bucket"]: r["u"] for r in query(users_sql)})
    labels = [lb for *_, lb in HISTORY_BUCKETS]
    sources = sorted({src for d in shares.values() for src in d})
    if not sources:
        s.note = f"serve run {run} has no recommendation rows for users with train ratings"
        return s
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(labels)
    for i, src in enumerate(sources):
        ys = [shares[lb].get(src, 0) / max(1, sum(shares[lb].values())) for lb in labels]
        ax.bar(labels, ys, bottom=bottom, label=src, color=f"C{i % 10}")
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_xlabel("user's train ratings")
    ax.set_ylabel("share of final rows")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"Source of each served row, by history - serve run {run}")
    s.png = _png(fig)
    pct = {lb: ", ".join(f"{src} {100 * c / sum(shares[lb].values()):.1f}%" for src, c in sorted(shares[lb].items()))
           for lb in labels if shares[lb]}
    s.caption = ("Share of the recommendation rows that each candidate model brought in, per bucket of the "
                 "user's train ratings; users per bucket: " + ", ".join(f"{lb} {users[lb]}" for lb in labels)
                 + ". Shares: " + "; ".join(f"{lb}: {v}" for lb, v in pct.items()) + ".")
    return s


def plot_feature_importances(plt, warehouse: str, run: str | None) -> Section:
    s = Section("feature_importances", "Hybrid model: feature importances")
    if not q.table_exists(warehouse, "feature_importances"):
        s.note = "no feature_importances table: the hybrid stage has not run"
        return s
    rows = q.rows_of(q.scan(q.open_table(warehouse, "feature_importances")))
    if not rows:
        s.note = "the feature_importances table is empty"
        return s
    runs = {r["run_id"] for r in rows}
    used = run if run in runs else None
    if used is None:
        hist = q.run_history(warehouse) or []
        order = [h["run_id"] for h in hist if h["run_id"] in runs]
        used = order[-1] if order else max(runs)
    rows = sorted((r for r in rows if r["run_id"] == used), key=lambda r: r["importance"])[-MAX_FEATURES:]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(rows) + 1)))
    ax.barh([r["feature"] for r in rows], [r["importance"] for r in rows], color="C2")
    ax.set_xlabel("importance (GBT, sums to 1)")
    ax.set_title(f"Feature importances - run {used}")
    ax.grid(axis="y", visible=False)
    s.png = _png(fig)
    s.caption = f"GBT feature importances of run {used}" + (
        f" (run {run} has none; this is the latest run that has)" if run is not None and used != run else "") + "."
    return s


def plot_rating_distribution(plt, warehouse: str) -> Section:
    s = Section("rating_distribution", "Rating distribution")
    if not q.table_exists(warehouse, "ratings"):
        s.note = "no ratings table: run ingest first"
        return s
    # Counted by DataFusion (all cores, only the rating column read): 25M ratings in about a second.
    got = q.run_sql(q.open_table(warehouse, "ratings"),
                    "SELECT rating, COUNT(*) AS n FROM t WHERE rating IS NOT NULL GROUP BY rating")
    counts = dict(zip(got.column("rating").to_pylist(), got.column("n").to_pylist()))
    if not counts:
        s.note = "the ratings table is empty"
        return s
    values = sorted(counts)
    total = sum(counts.values())
    mean = sum(v * c for v, c in counts.items()) / total
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = min((b - a for a, b in zip(values, values[1:])), default=1.0) * 0.8
    bars = ax.bar(values, [counts[v] for v in values], width=width, color="C0")
    ax.bar_label(bars, labels=[f"{counts[v] / total:.0%}" for v in values], fontsize=7, padding=2)
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.set_xlabel("rating (stars)")
    ax.set_ylabel("ratings")
    ax.set_title(f"{total:,} ratings, mean {mean:.2f}")
    s.png = _png(fig)
    s.caption = f"Every rating in the ratings table ({total:,}); labels are shares."
    return s


def plot_stage_seconds(plt, warehouse: str) -> Section:
    s = Section("stage_seconds", "Seconds per stage across runs")
    hist = q.run_history(warehouse)
    if hist is None:
        s.note = "no runs table: no pipeline run has been recorded"
        return s
    hist = [h for h in hist if h.get("stage_seconds")][-MAX_RUNS:]
    if not hist:
        s.note = "no run has recorded stage timings yet"
        return s
    stages: list[str] = []
    for h in hist:
        for name, _ in h["stage_seconds"]:
            if name not in stages:
                stages.append(name)
    import numpy as np

    x = np.arange(len(hist))
    bottom = np.zeros(len(hist))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(hist) + 3), 4.2))
    for i, stage in enumerate(stages):
        ys = np.array([dict(h["stage_seconds"]).get(stage) or 0.0 for h in hist])
        ax.bar(x, ys, 0.7, bottom=bottom, label=stage, color=f"C{i % 10}")
        bottom += ys
    labels = [h["run_id"] if len(h["run_id"]) <= 18 else h["run_id"][:8] + ".." + h["run_id"][-8:] for h in hist]
    labels = [lab + ("" if h["status"] == "succeeded" else f"\n({h['status']})") for lab, h in zip(labels, hist)]
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_title("Wall seconds per stage, oldest run first")
    ax.legend(fontsize=7, ncols=min(4, len(stages)), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    s.png = _png(fig)
    s.caption = f"The last {len(hist)} runs with stage timings; bar height is the run's total stage time."
    return s


# --------------------------------------------------------------------------------------------
# Page

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1180px;
padding:0 1em;color:#222}
h1{margin-bottom:.2em}.meta{color:#666;margin-top:0}
figure{margin:1.5em 0;border-top:1px solid #ddd;padding-top:1em}figure img{max-width:100%;height:auto}
figcaption{color:#555;font-size:.9em}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.6em 1em}
table{border-collapse:collapse;font-size:.85em;margin:1em 0}th,td{padding:.25em .6em;border-bottom:1px solid #eee}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{text-align:left;background:#f6f6f6}
"""


def _metrics_table(warehouse: str, run: str | None) -> str:
    """The run's metrics tables: the plotted split first (test when there is one), then the rest;
    validation figures under a "Validation metrics" heading with a note saying what they are."""
    if run is None:
        return ""
    first = q.metrics(warehouse, run=run)
    splits = sorted({r["split"] for r in q.load_metrics(warehouse, run)[1]})
    parts = [_one_metrics_table(run, first)]
    for split in splits:
        if split != first.meta["split"]:
            parts.append(_one_metrics_table(run, q.metrics(warehouse, run=run, split=split)))
    if not any(s == "test" for s in splits):
        other = q.latest_test_run(warehouse)
        if other is not None:
            parts.append(f'<p class="note">Run {html.escape(other)} has test figures: '
                         f"<code>movierec report --run {html.escape(other)}</code>.</p>")
    return "\n".join(parts)


def _one_metrics_table(run: str, res) -> str:
    split = str(res.meta["split"])
    cols = [c for c in res.columns if any(r.get(c) is not None for r in res.rows)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in res.rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                cells.append(f'<td class="num">{v:.4f}</td>')
            else:
                cells.append(f"<td>{html.escape('' if v is None else str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    title = "Validation metrics" if _is_validation(split) else "Metrics"
    note = (f'<p class="note validation">{html.escape(q.validation_note(run))}.</p>'
            if _is_validation(split) else "")
    return (f'<h2 id="metrics-{html.escape(split)}">{title} of run {html.escape(run)} ({html.escape(split)} split, '
            f"ranking at k = {html.escape(str(res.meta['k']))})</h2>{note}"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def render_html(warehouse: str, run: str | None, how: str | None, sections: list[Section],
                metrics_html: str) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>movierec report - {html.escape(run or 'no run')}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>movierec report</h1>",
        f'<p class="meta">Warehouse <code>{html.escape(str(warehouse))}</code> - '
        f"{html.escape(how or ('run ' + run if run else 'no evaluated run'))} - generated {now}</p>",
        metrics_html,
    ]
    for s in sections:
        parts.append(f'<figure id="{s.key}"><h2>{html.escape(s.heading)}</h2>')
        if s.png is not None:
            b64 = base64.b64encode(s.png).decode("ascii")
            parts.append(f'<img src="data:image/png;base64,{b64}" alt="{html.escape(s.heading)}">')
            parts.append(f"<figcaption>{html.escape(s.caption)} "
                         f'(<a href="{s.filename}">{s.filename}</a>)</figcaption>')
        else:
            parts.append(f'<p class="note">{html.escape(s.note or "nothing to plot")}</p>')
        parts.append("</figure>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p) + "\n"


def write_report(warehouse: str, out_dir: str, run: str | None = None) -> dict:
    """Write out_dir/index.html and its PNGs; returns path, bytes, plots, notes, seconds."""
    t0 = time.perf_counter()
    q.check_warehouse(warehouse)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise q.QueryError(f"--out {out_dir} is a file: give a directory for index.html and the plots",
                           q.EXIT_USAGE)
    plt = _plt()
    run, rows, how, split = _metric_rows(warehouse, run)
    missing = how if run is None else None
    sections = [
        plot_model_comparison(plt, run, rows, missing, split),
        plot_ranking(plt, run, rows, missing, split),
        plot_diversity(plt, run, rows, missing, split),
        plot_sources(plt, warehouse),
        plot_feature_importances(plt, warehouse, run),
        plot_rating_distribution(plt, warehouse),
        plot_stage_seconds(plt, warehouse),
    ]
    os.makedirs(out_dir, exist_ok=True)
    for s in sections:
        path = os.path.join(out_dir, s.filename)
        if s.png is not None:
            with open(path, "wb") as fh:
                fh.write(s.png)
        elif os.path.exists(path):
            os.remove(path)  # a plot from an earlier report that this one no longer has
    page = render_html(warehouse, run, how if run else None, sections, _metrics_table(warehouse, run))
    index = os.path.join(out_dir, "index.html")
    with open(index, "w", encoding="utf-8") as fh:
        fh.write(page)
    info = {"path": index, "bytes": os.path.getsize(index), "plots": sum(s.png is not None for s in sections),
            "notes": sum(s.png is None for s in sections), "seconds": time.perf_counter() - t0,
            "files": [os.path.join(out_dir, s.filename) for s in sections if s.png is not None],
            "run_id": run, "split": split}
    log.debug("report: %s", info)
    return info
