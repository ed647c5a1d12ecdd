"""The package's shape: no import cycle among its modules, the table contract depends on no model
module, and the query path (JVM-free by design) never loads pyspark."""

from __future__ import annotations

import ast
import subprocess
import sys

from .conftest import REPO

PKG = REPO / "movierec_spark"


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (at any depth in the file: function-level
    imports count, since they run too)."""
    mods = {p.stem for p in PKG.glob("*.py")}
    graph = {}
    for path in PKG.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("movierec_spark."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("movierec_spark.")}
        graph[path.stem] = deps & mods - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert {"stages", "pipeline", "tables", "query"} <= set(graph)  # the walk saw the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_table_contract_and_the_runner_depend_on_no_model_module():
    graph = import_graph()
    models = {"als", "baselines", "content", "features", "hybrid", "ranker", "evaluation", "recommend"}
    assert not graph["tables"] & models, graph["tables"]
    assert not graph["pipeline"] & models, graph["pipeline"]
    assert "stages" in graph["pipeline"] and "pipeline" not in graph["stages"]


def test_importing_query_and_report_loads_no_pyspark():
    code = ("import sys, movierec_spark.query, movierec_spark.report; "
            "print(sorted(m for m in sys.modules if m == 'pyspark' or m.startswith('pyspark.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout
