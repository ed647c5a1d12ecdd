import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from movierec_spark.cli import parse_set
from movierec_spark.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
PACKAGED = REPO / "movierec_spark" / "conf"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_load_and_cli_overrides_win(tmp_path):
    cfg = load_config(None, {"paths.warehouse": str(tmp_path / "wh"), "spark.shuffle_partitions": 3})
    assert cfg.spark.shuffle_partitions == 3
    assert cfg.paths.warehouse == str((tmp_path / "wh").resolve())
    assert cfg.ingest.reject_threshold == 0.05
    assert Path(cfg.spark.log4j_config).is_file()
    assert cfg.checkpoint_dir.endswith("/wh/_checkpoints")


def test_unknown_key_is_named(tmp_path):
    p = write(tmp_path, "spark:\n  driver_memroy: 4g\n")
    with pytest.raises(ConfigError, match=r"unknown key 'spark.driver_memroy'.*driver_memory"):
        load_config(p)


def test_an_unquoted_yaml_date_is_the_cutoff_it_reads_as(tmp_path):
    cfg = load_config(write(tmp_path, "split:\n  method: temporal_global\n  cutoff: 2018-01-01\n"), check_paths=False)
    assert cfg.split.cutoff == "2018-01-01"


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'sparkk'"):
        load_config(write(tmp_path, "sparkk: {}\n"))


@pytest.mark.parametrize(
    "text, match",
    [
        ("spark:\n  shuffle_partitions: many\n", "spark.shuffle_partitions: expected an integer"),
        ("spark:\n  shuffle_partitions: true\n", "expected an integer"),
        ("ingest:\n  reject_threshold: high\n", "ingest.reject_threshold: expected a number"),
        ("ingest:\n  reject_threshold: 1.5\n", "within 0..1"),
        ("pipeline:\n  stages: ingest\n", "pipeline.stages: expected a list"),
        ("spark:\n  driver_memory: lots\n", "driver_memory must look like"),
        ("spark:\n  driver_memory: 256m\n", "driver_memory 256m is too little"),
        ("spark:\n  driver_memory: 64t\n", "more than this machine's"),
        ("- a\n- b\n", "top level must be a mapping"),
        # Checked when the config loads, not when the stage starts minutes later.
        ("split:\n  cutoff: '2018/01/01'\n", "split.cutoff must be an ISO date"),
        ("hybrid:\n  folds: 1\n", "hybrid.folds must be >= 2"),
    ],
)
def test_wrong_types_rejected(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_missing_input_path_rejected(tmp_path):
    with pytest.raises(ConfigError, match="paths.input: not found"):
        load_config(None, {"paths.input": str(tmp_path / "nope"), "paths.warehouse": str(tmp_path)})


def test_unwritable_warehouse_rejected(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        # Root ignores mode bits, not /proc: there the probe's mkdir fails for anyone.
        target = ro / "wh" if not os.access(ro, os.W_OK) else Path("/proc/movierec-wh")
        with pytest.raises(ConfigError, match="paths.warehouse: cannot create or write"):
            load_config(None, {"paths.warehouse": str(target)})
        with pytest.raises(ConfigError, match="is a file, not a directory"):
            load_config(None, {"paths.warehouse": str(write(tmp_path, "x") / "wh")})
    finally:
        ro.chmod(0o700)


def test_warehouse_that_is_a_file_rejected(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        load_config(None, {"paths.warehouse": str(f)})


def test_yaml_cannot_construct_objects(tmp_path):
    p = write(tmp_path, "spark:\n  master: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_set_flag_parses_yaml_scalars():
    assert parse_set(["ingest.reject_threshold=0.1", "spark.master=local[2]"]) == {
        "ingest.reject_threshold": 0.1,
        "spark.master": "local[2]",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["oops"])


def test_cluster_config_is_valid(tmp_path):
    cfg = load_config(Path(__file__).parent.parent / "conf" / "cluster.yaml",
                      {"paths.warehouse": str(tmp_path / "wh")})
    assert cfg.spark.shuffle_partitions == 64


def test_set_spark_conf_key_keeps_its_dots(tmp_path):
    """Spark's keys are dotted: --set spark.conf.<key>=v sets that one key, as a string."""
    o = parse_set(["spark.conf.spark.hadoop.fs.s3a.endpoint=http://127.0.0.1:9000",
                    "spark.conf.spark.hadoop.fs.s3a.path.style.access=true", "spark.packages=[\"g:a:1\"]"])
    cfg = load_config(None, {"paths.warehouse": str(tmp_path / "wh"), **o})
    assert cfg.spark.conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:9000"
    assert cfg.spark.conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert cfg.spark.packages == ["g:a:1"]


def test_jar_manifest_is_per_package_set(tmp_path):
    from movierec_spark.session import jar_manifest, jar_packages

    plain = load_config(None, {"paths.warehouse": str(tmp_path / "wh")})
    s3 = load_config(None, {"paths.warehouse": str(tmp_path / "wh"), "spark.packages": ["org.apache.hadoop:hadoop-aws:3.5.0"]})
    assert jar_packages(plain) == [plain.spark.delta_package]
    assert jar_packages(s3) == [s3.spark.delta_package, "org.apache.hadoop:hadoop-aws:3.5.0"]
    # The Delta-only manifest keeps its old name, so existing caches stay valid.
    assert jar_manifest(tmp_path, jar_packages(plain)).name == "movierec-jars-" + plain.spark.delta_package.replace(":", "_") + ".txt"
    assert jar_manifest(tmp_path, jar_packages(s3)) != jar_manifest(tmp_path, jar_packages(plain))


def test_als_candidate_needs_its_top_n(tmp_path):
    with pytest.raises(ConfigError, match="als.top_n"):
        load_config(None, {"paths.warehouse": str(tmp_path / "wh"), "als.top_n": False,
                           "hybrid.candidate_models": ["als", "popularity"]})
    with pytest.raises(ConfigError, match="feature_threads"):
        load_config(None, {"paths.warehouse": str(tmp_path / "wh"), "hybrid.feature_threads": 0})


def test_scale_config_is_valid(tmp_path):
    cfg = load_config(Path(__file__).resolve().parent.parent / "conf" / "scale.yaml",
                      {"paths.warehouse": str(tmp_path / "wh")})
    assert cfg.als.top_n is False and "als" not in cfg.hybrid.candidate_models


# ---------------------------------------------------------------------------------------------
# The defaults are package data (movierec_spark/conf/), so they travel with the wheel.


def test_default_config_is_the_packaged_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no conf/ here: nothing may come from the working directory
    cfg = load_config(None, {"paths.warehouse": str(tmp_path / "wh")})
    assert cfg.source == str(PACKAGED / "local.yaml")
    packaged = yaml.safe_load((PACKAGED / "local.yaml").read_text(encoding="utf-8"))
    assert cfg.pipeline.stages == packaged["pipeline"]["stages"]
    assert cfg.als.rank == packaged["als"]["rank"]
    for section, values in packaged.items():
        for key, value in values.items():
            if (section, key) not in {("spark", "log4j_config"), ("paths", "warehouse"), ("paths", "data_dir")}:
                assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    assert packaged["spark"]["log4j_config"] == "conf/log4j2.properties"
    assert cfg.spark.log4j_config == str(PACKAGED / "log4j2.properties")


def test_repo_conf_links_to_the_packaged_defaults():
    """docs, docker/ and tests name conf/local.yaml and conf/log4j2.properties: links, one copy."""
    for name in ("local.yaml", "log4j2.properties"):
        link = REPO / "conf" / name
        assert link.is_symlink() and os.readlink(link) == f"../movierec_spark/conf/{name}"
        assert link.resolve() == (PACKAGED / name).resolve()


def test_log4j_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A relative path of the user's: against the working directory.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "log4j2.properties").write_text("rootLogger.level = info\n")
    cfg = load_config(write(tmp_path, "spark:\n  log4j_config: mine/log4j2.properties\n"),
                      {"paths.warehouse": str(tmp_path / "wh")})
    assert cfg.spark.log4j_config == str(tmp_path / "mine" / "log4j2.properties")
    # The default name: a conf/log4j2.properties of the working directory's own wins.
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "log4j2.properties").write_text("rootLogger.level = warn\n")
    cfg = load_config(None, {"paths.warehouse": str(tmp_path / "wh")})
    assert cfg.spark.log4j_config == str(tmp_path / "conf" / "log4j2.properties")
    with pytest.raises(ConfigError, match="spark.log4j_config: file not found: nope.properties"):
        load_config(None, {"paths.warehouse": str(tmp_path / "wh"), "spark.log4j_config": "nope.properties"})


def _build_wheel(dest: Path) -> Path:
    """`pip wheel` of a copy of what the wheel is made of (as docker/Dockerfile's builder): the
    build writes nothing into the checkout."""
    src = dest / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, src / f)
    shutil.copytree(REPO / "movierec_spark", src / "movierec_spark",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dest / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    if r.returncode and "Installing build dependencies: finished with status 'error'" in out:
        pytest.skip(f"cannot install the build backend (offline?): {out[-1500:]}")
    assert r.returncode == 0, out[-5000:]
    (wheel,) = (dest / "dist").glob("movierec_spark-*.whl")
    return wheel


@pytest.fixture(scope="module", params=["wheel", "zip"])
def package_archive(request, tmp_path_factory) -> Path:
    """The package as spark-submit's --py-files gets it: the built wheel, or the zip that
    tests/test_cluster.py submits (standalone.package_archive). Nothing beside it."""
    dest = tmp_path_factory.mktemp(request.param)
    if request.param == "wheel":
        return _build_wheel(dest)
    from movierec_spark.standalone import package_archive

    return package_archive(dest)


def test_archive_ships_the_defaults(package_archive):
    with zipfile.ZipFile(package_archive) as z:
        names = set(z.namelist())
        for name in ("local.yaml", "log4j2.properties"):
            assert z.read(f"movierec_spark/conf/{name}") == (PACKAGED / name).read_bytes()
    modules = {f"movierec_spark/{p.relative_to(REPO / 'movierec_spark').as_posix()}"
               for p in (REPO / "movierec_spark").rglob("*.py")}
    assert modules <= names
    # The wheel and the zip hold the same package files.
    assert {n for n in names if n.startswith("movierec_spark/")} == modules | {
        "movierec_spark/conf/local.yaml", "movierec_spark/conf/log4j2.properties"}


LOAD_FROM_ARCHIVE = """
import json, os, sys
archive, repo = sys.argv[1], sys.argv[2]
# Only the archive: not the checkout (nor the editable install's finder that maps to it); the
# environment's site-packages stay (for yaml), even when the venv is inside the checkout.
def in_checkout(p):
    p = os.path.realpath(p)
    return p == repo or p.startswith(repo + os.sep) and not p.startswith(os.path.realpath(sys.prefix) + os.sep)
sys.path[:] = [archive] + [p for p in sys.path if p and not in_checkout(p)]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
from movierec_spark import config
cfg = config.load_config(None)
print(json.dumps({"module": config.__file__, "source": cfg.source, "log4j": cfg.spark.log4j_config,
                  "stages": cfg.pipeline.stages, "rank": cfg.als.rank, "warehouse": cfg.paths.warehouse}))
"""


def test_defaults_load_from_the_archive(package_archive, tmp_path):
    """What `spark-submit --py-files movierec_spark-*.whl jobs/pipeline.py` does without --config:
    the package imported from the archive, in a directory without conf/, and no checkout around."""
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "-I", "-c", LOAD_FROM_ARCHIVE, str(package_archive), str(REPO)],
                       cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-5000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["module"] == str(package_archive / "movierec_spark" / "config.py")
    assert got["source"] == str(package_archive / "movierec_spark" / "conf" / "local.yaml")
    packaged = yaml.safe_load((PACKAGED / "local.yaml").read_text(encoding="utf-8"))
    assert got["stages"] == packaged["pipeline"]["stages"] and got["rank"] == packaged["als"]["rank"]
    assert got["warehouse"] == str(work / "warehouse")
    # log4j gets a real file (-Dlog4j.configurationFile=file:...): extracted from the archive.
    log4j = Path(got["log4j"])
    assert log4j.is_file() and log4j.is_relative_to(tmp_path / "cache" / "movierec")
    assert log4j.read_bytes() == (PACKAGED / "log4j2.properties").read_bytes()
    assert list(work.iterdir()) == []
