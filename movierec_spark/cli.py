"""`movierec` command line. Subcommands parse flags, load the config, build Spark once, call the
library and stop Spark; user-facing errors are one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import yaml

from .config import Config, ConfigError, load_config

log = logging.getLogger("movierec")

EXIT_USAGE = 2
EXIT_FAILED = 1


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # py4j logs every gateway call at INFO.
    logging.getLogger("py4j").setLevel(logging.WARNING)


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set ingest.reject_threshold=0.1")
        k, v = item.split("=", 1)
        # YAML scalars, so `--set spark.shuffle_partitions=4` is an int; safe_load builds no objects.
        out[k.strip()] = yaml.safe_load(v)
    return out


def _add_common(p: argparse.ArgumentParser, need_input: bool = False) -> None:
    p.add_argument("--config", help="pipeline config YAML (default: the packaged movierec_spark/conf/local.yaml)")
    p.add_argument("--input", required=need_input, help="MovieLens directory or GroupLens .zip")
    p.add_argument("--warehouse", help="Delta warehouse directory or URI (overrides paths.warehouse)")
    p.add_argument("--master", help="Spark master (overrides spark.master; ignored under spark-submit)")
    p.add_argument("--driver-memory", help="e.g. 6g (overrides spark.driver_memory)")
    p.add_argument("--shuffle-partitions", type=int, help="overrides spark.shuffle_partitions")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override any config key, e.g. --set ingest.reject_threshold=0.1 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true")


def _add_replace(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replace", action="store_true",
                   help="--input is another dataset than the warehouse holds: replace it (tables become the "
                        "input exactly; a plain ingest of a different source is refused)")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {
        "paths.input": getattr(args, "input", None),
        "paths.warehouse": getattr(args, "warehouse", None),
        "spark.master": getattr(args, "master", None),
        "spark.driver_memory": getattr(args, "driver_memory", None),
        "spark.shuffle_partitions": getattr(args, "shuffle_partitions", None),
        "split.train_file": getattr(args, "train", None),
        "split.test_file": getattr(args, "test", None),
        "ingest.incremental": True if getattr(args, "incremental", False) else None,
        "ingest.replace": True if getattr(args, "replace", False) else None,
    }
    overrides.update(parse_set(getattr(args, "set", [])))
    # `movierec evaluate`, and a predefined test part (--train/--test), run the held-out protocol.
    if getattr(args, "command", None) == "evaluate":
        overrides["pipeline.mode"] = "evaluate"
    elif getattr(args, "train", None) and "pipeline.mode" not in overrides:
        overrides["pipeline.mode"] = "evaluate"
    cfg = load_config(getattr(args, "config", None), overrides)
    log.info("config from %s: %s", cfg.source, cfg.to_json())
    return cfg


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="movierec", description="MovieLens recommender on Spark + Delta Lake")
    sub = ap.add_subparsers(dest="command", required=True)

    for name, what in (("run", "serve run: learn from every rating and write the recommendations `latest` "
                                "points at (stages from pipeline.stages)"),
                       ("evaluate", "evaluate run: hold out a test part (split.* or --train/--test) and write "
                                     "predictions, top_n and metrics; never touches recommendations")):
        p = sub.add_parser(name, help=what)
        _add_common(p)
        p.add_argument("--stages", help="comma-separated stages to run instead of pipeline.stages")
        ids = p.add_mutually_exclusive_group()
        ids.add_argument("--run-id", help="rerun under a given run id (idempotent per-run outputs)")
        ids.add_argument("--resume", metavar="RUN_ID",
                         help="continue an unfinished (failed or killed) run: skip its finished stages, same config")
        p.add_argument("--train", help="predefined training ratings file (u1.base, .dat, CSV); needs --test; "
                                       "implies an evaluate run")
        p.add_argument("--test", help="predefined test ratings file; replaces the configured splitter")
        p.add_argument("--incremental", action="store_true",
                       help="--input holds new and changed rows only: MERGE them into the warehouse, retrain, "
                            "rewrite outputs; stop after ingest when nothing changed")
        _add_replace(p)

    p = sub.add_parser("ingest", help="ingest a MovieLens dataset into Delta tables")
    _add_common(p, need_input=True)
    _add_replace(p)

    p = sub.add_parser("download", help="download a GroupLens MovieLens zip and extract it")
    p.add_argument("name", help="ml-latest-small, ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-32m, ml-latest")
    p.add_argument("--dest", default="data", help="directory to extract into (default: data)")
    p.add_argument("--base-url", help="mirror URL (default: GroupLens; env MOVIEREC_GROUPLENS_URL)")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("generate", help="write a synthetic MovieLens-shaped CSV dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--movies", type=int, required=True)
    p.add_argument("--ratings", type=int, required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("setup", help="resolve and cache Delta's jars (needs Maven Central once)")
    p.add_argument("--config")
    p.add_argument("--store", action="append", default=[], choices=["s3a", "abfss", "gs"],
                   help="also resolve this object store's connector (added to spark.packages)")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("maintain", help="OPTIMIZE (Z-ORDER recommendations by userId) and VACUUM the warehouse")
    p.add_argument("--warehouse", required=True)
    p.add_argument("--config")
    p.add_argument("--retain-hours", type=float, default=168.0,
                   help="VACUUM keeps files younger versions need for this long (>= 168, the default)")
    p.add_argument("--tables", help="comma-separated tables (default: every table of the warehouse)")
    p.add_argument("--no-vacuum", action="store_true", help="compact only")
    p.add_argument("-v", "--verbose", action="store_true")

    _add_query_parsers(sub)
    return ap


def _add_query_parsers(sub) -> None:
    """`query` and `report`: read the output tables with delta-rs, no Spark and no JVM."""
    q = sub.add_parser("query", help="answer from the output tables without a JVM (recs, similar, metrics, runs)")
    qs = q.add_subparsers(dest="query", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--warehouse", default="warehouse", help="Delta warehouse directory (default: warehouse)")
        p.add_argument("--format", choices=("table", "json", "csv"), default="table")
        p.add_argument("-v", "--verbose", action="store_true")

    p = qs.add_parser("recs", help="a user's recommendations with titles (latest succeeded run by default)")
    common(p)
    p.add_argument("--user", type=int, required=True, help="userId")
    p.add_argument("--run", help="run_id (default: the latest succeeded run with recommendations)")
    p.add_argument("--as-of", metavar="VERSION|TIMESTAMP",
                   help="time travel: a Delta version of the recommendations table or an ISO timestamp")
    p.add_argument("-n", type=int, help="only the top N")

    p = qs.add_parser("similar", help="content neighbours of a movie, by title (forgiving) or id")
    common(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--title", help="title text: case, punctuation, articles and the year do not matter")
    g.add_argument("--movie", type=int, help="movieId")
    p.add_argument("-n", "-k", dest="k", type=int, default=10, help="how many neighbours (default 10)")

    p = qs.add_parser("metrics", help="model comparison: one row per model, one column per metric")
    common(p)
    p.add_argument("--run", help="run_id (default: the latest run with metrics)")
    p.add_argument("-k", help="ranking metrics at this k (default 10; 'all' for every k)")
    p.add_argument("--split", help="evaluation split (default: test)")

    p = qs.add_parser("runs", help="every run: status, start, duration, seconds per stage")
    common(p)

    p = sub.add_parser("report", help="write an offline HTML report with plots (no JVM)")
    p.add_argument("--warehouse", default="warehouse", help="Delta warehouse directory (default: warehouse)")
    p.add_argument("--out", required=True, help="directory for index.html and the PNG plots")
    p.add_argument("--run", help="run_id (default: the latest run with metrics)")
    p.add_argument("-v", "--verbose", action="store_true")


def default_input(cfg: Config) -> str:
    """data/ml-latest-small, downloaded when missing; offline, a generated demo set."""
    from .download import DownloadError, download_dataset
    from .generate import generate_dataset

    data_dir = Path(cfg.paths.data_dir)
    local = data_dir / "ml-latest-small"
    if (local / "ratings.csv").is_file():
        return str(local.resolve())
    try:
        return str(download_dataset("ml-latest-small", data_dir).resolve())
    except DownloadError as e:
        demo = data_dir / f"demo-{cfg.pipeline.seed}"
        log.warning(
            "no --input given and GroupLens is unreachable (%s). Pass --input PATH to use a "
            "MovieLens copy you have; running on a generated MovieLens-shaped demo set at %s "
            "instead.", e, demo,
        )
        if not (demo / "ratings.csv").is_file():
            generate_dataset(demo, users=cfg.demo.users, movies=cfg.demo.movies,
                             ratings=cfg.demo.ratings, seed=cfg.pipeline.seed, overwrite=True)
        return str(demo.resolve())


def cmd_run(args: argparse.Namespace, stages: list[str] | None = None) -> int:
    from .pipeline import run_pipeline, validate_stages
    from .session import build_spark

    cfg = config_from_args(args)
    names = stages or ([s.strip() for s in args.stages.split(",")] if getattr(args, "stages", None) else None)
    validate_stages(names or cfg.pipeline.stages)
    resume = getattr(args, "resume", None)
    # A resumed run reads the input it was started with (recorded in `runs`) unless given one.
    # Only ingest reads it: a run of later stages needs no input (and must not download one).
    input_path = cfg.paths.input or (default_input(cfg) if "ingest" in (names or cfg.pipeline.stages) and not resume
                                     else None)
    spark = build_spark(cfg)
    try:
        run_pipeline(spark, cfg, input_path, names, run_id=resume or getattr(args, "run_id", None),
                     resume=bool(resume))
    finally:
        spark.stop()
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .download import download_dataset

    path = download_dataset(args.name, args.dest, base_url=args.base_url, progress=sys.stderr.isatty())
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_dataset

    t0 = time.perf_counter()
    counts = generate_dataset(args.out, users=args.users, movies=args.movies, ratings=args.ratings,
                              seed=args.seed, overwrite=args.overwrite)
    log.info("generated %s in %s in %.1f s", counts, args.out, time.perf_counter() - t0)
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    from .session import STORE_PACKAGES, build_spark, cached_delta_jars

    cfg = load_config(args.config)
    for store in args.store:
        pkg = STORE_PACKAGES[store].split(" ")[0]
        if pkg not in cfg.spark.packages:
            cfg.spark.packages.append(pkg)
    spark = build_spark(cfg, app_name="movierec-setup")
    spark.stop()
    jars = cached_delta_jars(cfg) or []
    extra = f" (with {', '.join(cfg.spark.packages)})" if cfg.spark.packages else ""
    print(f"Delta jars cached{extra}: {len(jars)} files in {cfg.spark.ivy_dir}")
    return 0 if jars else EXIT_FAILED


def cmd_maintain(args: argparse.Namespace) -> int:
    from .maintain import maintain
    from .session import build_spark

    cfg = load_config(args.config, {"paths.warehouse": args.warehouse})
    if not Path(cfg.paths.warehouse).exists() and "://" not in args.warehouse:
        raise FileNotFoundError(f"warehouse not found: {args.warehouse}")
    spark = build_spark(cfg, app_name="movierec-maintain")
    try:
        rows = maintain(spark, cfg.paths.warehouse, args.retain_hours,
                        only=[t.strip() for t in args.tables.split(",")] if args.tables else None,
                        vacuum=not args.no_vacuum)
    finally:
        spark.stop()
    print(f"{'table':<22}{'files before':>13}{'after':>7}{'vacuumed':>10}  z-order")
    for r in rows:
        print(f"{r['table']:<22}{r['files_before']:>13}{r['files_after']:>7}{str(r['vacuumed']):>10}  {r['zorder']}")
    p = getattr(rows, "pruned", None)
    if p is not None:
        print(f"pruned runs finished over {p['retain_hours']:g} h ago: {', '.join(p['runs']) or 'none'}; "
              f"model dirs removed: {len(p['model_dirs'])}; rows deleted: "
              + (", ".join(f"{t} {n:,}" for t, n in p["rows"].items()) or "none")
              + (f"; kept because `latest` points at them: {', '.join(p['kept'])}" if p["kept"] else ""))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from . import query as q

    if args.query == "recs":
        result = q.recs(args.warehouse, args.user, run=args.run, as_of=args.as_of, n=args.n)
    elif args.query == "similar":
        result = q.similar(args.warehouse, title=args.title, movie=args.movie, k=args.k)
    elif args.query == "metrics":
        result = q.metrics(args.warehouse, run=args.run, k=args.k, split=args.split)
    else:
        result = q.runs(args.warehouse)
    out, err = q.render(result, args.format)
    sys.stderr.write(err)
    sys.stdout.write(out)
    sys.stdout.flush()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    info = write_report(args.warehouse, args.out, run=args.run)
    print(f"wrote {info['path']} ({info['bytes'] / 1024:.0f} KB, {info['plots']} plots, "
          f"{info['notes']} notes, {info['seconds']:.1f} s)")
    return 0


def _main_jvm_free(args: argparse.Namespace) -> int:
    """query and report: pyarrow and delta-rs only, so none of the Spark modules is imported."""
    from deltalake.exceptions import DeltaError

    from .query import QueryError

    try:
        return cmd_query(args) if args.command == "query" else cmd_report(args)
    except QueryError as e:
        print(f"movierec: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # `movierec query ... | head`: the reader left; nothing to report, and nothing to flush
        # into the closed pipe at exit either.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (DeltaError, OSError, ValueError) as e:
        # Unreadable table files and the like: one line, no traceback.
        print(f"movierec: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("movierec: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    if args.command in ("query", "report"):
        return _main_jvm_free(args)
    from .download import DownloadError
    from .ingest import IngestError
    from .layouts import LayoutError
    from .pipeline import PipelineError
    from .session import SparkSetupError

    try:
        if args.command in ("run", "evaluate", "ingest"):
            return cmd_run(args, ["ingest"] if args.command == "ingest" else None)
        return {"download": cmd_download, "generate": cmd_generate, "setup": cmd_setup,
                "maintain": cmd_maintain}[args.command](args)
    except (ConfigError, PipelineError) as e:
        _error(e)
        return EXIT_USAGE
    except (IngestError, LayoutError, DownloadError, SparkSetupError, FileNotFoundError, ValueError) as e:
        # (MaintainError is a ValueError.)
        _error(e)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("movierec: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure we did not foresee: one line here, the trace in the log
        log.debug("uncaught error", exc_info=True)
        _error(e, f"{type(e).__name__}: ", " (run with --verbose for the trace)")
        return EXIT_FAILED


def _error(e: BaseException, prefix: str = "", suffix: str = "") -> None:
    """One line on stderr: the error's first line, credentials in URIs hidden."""
    from .redact import redact_text

    text = str(e).strip()
    if getattr(e, "java_exception", None) is not None:  # py4j: its first line names the call, not the error
        try:
            text = str(e.java_exception.toString())
        except Exception:
            pass
    text = text.splitlines()[0] if text else type(e).__name__
    print(f"movierec: error: {prefix}{redact_text(text)}{suffix}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
