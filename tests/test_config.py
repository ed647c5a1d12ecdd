import os
from pathlib import Path

import pytest

from movierec_spark.cli import _parse_set
from movierec_spark.config import ConfigError, load_config


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
        if os.access(ro, os.W_OK):  # root ignores mode bits
            pytest.skip("running as a user that can write anywhere")
        with pytest.raises(ConfigError, match="paths.warehouse"):
            load_config(None, {"paths.warehouse": str(ro / "wh")})
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
    assert _parse_set(["ingest.reject_threshold=0.1", "spark.master=local[2]"]) == {
        "ingest.reject_threshold": 0.1,
        "spark.master": "local[2]",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        _parse_set(["oops"])


def test_cluster_config_is_valid(tmp_path):
    cfg = load_config(Path(__file__).parent.parent / "conf" / "cluster.yaml",
                      {"paths.warehouse": str(tmp_path / "wh")})
    assert cfg.spark.shuffle_partitions == 64


def test_set_spark_conf_key_keeps_its_dots(tmp_path):
    """Spark's keys are dotted: --set spark.conf.<key>=v sets that one key, as a string."""
    o = _parse_set(["spark.conf.spark.hadoop.fs.s3a.endpoint=http://127.0.0.1:9000",
                    "spark.conf.spark.hadoop.fs.s3a.path.style.access=true", "spark.packages=[\"g:a:1\"]"])
    cfg = load_config(None, {"paths.warehouse": str(tmp_path / "wh"), **o})
    assert cfg.spark.conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:9000"
    assert cfg.spark.conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert cfg.spark.packages == ["g:a:1"]


def test_jar_manifest_is_per_package_set(tmp_path):
    from movierec_spark.session import _manifest, _packages

    plain = load_config(None, {"paths.warehouse": str(tmp_path / "wh")})
    s3 = load_config(None, {"paths.warehouse": str(tmp_path / "wh"), "spark.packages": ["org.apache.hadoop:hadoop-aws:3.5.0"]})
    assert _packages(plain) == [plain.spark.delta_package]
    assert _packages(s3) == [s3.spark.delta_package, "org.apache.hadoop:hadoop-aws:3.5.0"]
    # The Delta-only manifest keeps its old name, so existing caches stay valid.
    assert _manifest(tmp_path, _packages(plain)).name == "movierec-jars-" + plain.spark.delta_package.replace(":", "_") + ".txt"
    assert _manifest(tmp_path, _packages(s3)) != _manifest(tmp_path, _packages(plain))


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
