"""Dependencies point one way: core <- stages <- orchestration (ARCHITECTURE.md).

An AST walk over every import statement (those inside functions too), followed transitively through the
project's own modules: a stage may reach only stages and the core (pipeline.core, .checkpoints, .quality);
the core never reaches a stage or the orchestration.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

CORE = ("pipeline.core", "pipeline.checkpoints", "pipeline.quality")  # what stages may import


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("pipeline", "stages") for p in (REPO / top).rglob("*.py")}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (`from a import b` counts b when b is a module of a)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports(path, name, set(modules)) for name, path in modules.items()}


def reach(g: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module reachable from `start`, each with the chain of imports that reaches it."""
    chains, todo = {start: [start]}, [start]
    while todo:
        current = todo.pop()
        for nxt in g[current]:
            if nxt not in chains:
                chains[nxt] = chains[current] + [nxt]
                todo.append(nxt)
    return chains


def layer(name: str) -> str:
    if name.startswith("stages"):
        return "stages"
    if name.startswith(CORE):
        return "core"
    return "orchestration"


ALLOWED = {"core": {"core"}, "stages": {"core", "stages"}}


def violations(g: dict[str, set[str]]) -> list[str]:
    out = []
    for name in sorted(g):
        if layer(name) == "orchestration" or name == "pipeline":
            continue
        for reached, chain in reach(g, name).items():
            if reached != "pipeline" and layer(reached) not in ALLOWED[layer(name)]:
                out.append(f"{layer(name)} {name} reaches {layer(reached)} {reached}: {' -> '.join(chain)}")
    return out


def test_dependencies_point_one_way():
    assert violations(graph()) == []


def test_the_layers_are_what_the_walk_sees():
    g = graph()
    assert "pipeline.core.context" in g["stages.base"]
    assert "pipeline.core.schema" in g["stages.registry"]
    assert "stages.registry" in g["pipeline.guard"]  # orchestration may import stages


@pytest.mark.parametrize(
    "module, bad",
    [
        ("stages.stream.bounded", "pipeline.runner"),  # a stage importing the orchestration directly
        ("stages.verify", "pipeline.isolate"),
        ("pipeline.core.context", "stages.base"),  # the core importing a stage
        ("pipeline.checkpoints.synthetic", "pipeline.report.runs"),  # the core importing orchestration
    ],
)
def test_the_check_fails_when_a_layer_is_crossed(module, bad):
    g = graph()
    g[module] = g[module] | {bad}
    assert any(f"{module} reaches" in v and bad in v for v in violations(g))


def test_the_check_sees_a_crossing_through_other_modules():
    g = graph()
    g["pipeline.core.dtypes"] = g["pipeline.core.dtypes"] | {"pipeline.plan.step"}  # core -> orchestration
    found = [v for v in violations(g) if v.startswith("stages stages.stream.bounded reaches orchestration")]
    assert found and "pipeline.core.dtypes -> pipeline.plan.step" in found[0]
