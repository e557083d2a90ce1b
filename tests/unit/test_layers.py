"""The layout's promises, checked on the source: what each top-level package may import, no import cycles,
and a torch-free core (also checked by importing it in a fresh interpreter).

Layers, from the bottom: `asyncopd` (the core: contracts, runtime, client) < `asyncopd.ml` (torch code) <
`asyncopd.tools` (CLI, local stack, bench); each service uses the core (and `asyncopd.ml` if it hosts a
model), never another service, never the tooling; the coordinator never `asyncopd.ml`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("rollout", "teacher", "learner", "coordinator")
HEAVY = ("torch", "transformers", "vllm", "deepspeed", "numpy", "safetensors")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    paths = [*ROOT.joinpath("asyncopd").rglob("*.py"), *ROOT.joinpath("services").rglob("*.py")]
    return {module_name(p): p for p in paths if "/v1/" not in str(p)}  # generated stubs import only protobuf


MODULES = source_modules()


def imports_of(path: Path) -> set[str]:
    """Every module an import statement names, at any depth (lazy imports count: they are still a
    dependency), resolved to project modules where they are one (`from pkg import mod`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
    return out


GRAPH = {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def layer(module: str) -> str:
    for prefix in ("asyncopd.ml", "asyncopd.tools", *(f"services.{s}" for s in SERVICES)):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    if module == "services":
        return "services"
    assert module == "asyncopd" or module.startswith("asyncopd."), module
    return "asyncopd"


ALLOWED = {
    "asyncopd": {"asyncopd"},
    "asyncopd.ml": {"asyncopd", "asyncopd.ml"},
    "asyncopd.tools": {"asyncopd", "asyncopd.ml", "asyncopd.tools"},
    "services": set(),
    **{f"services.{s}": {"asyncopd", "asyncopd.ml", f"services.{s}"} for s in ("rollout", "teacher", "learner")},
    "services.coordinator": {"asyncopd", "services.coordinator"},
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_its_layer_allows(package):
    wrong = sorted(f"{m} imports {dep}" for m, deps in GRAPH.items() if layer(m) == package
                   for dep in deps if layer(dep) not in ALLOWED[package])
    assert not wrong, wrong


def test_the_core_names_no_torch_side_package():
    wrong = sorted(f"{m} imports {dep}" for m, path in MODULES.items() if layer(m) == "asyncopd"
                   for dep in imports_of(path) if dep.split(".")[0] in HEAVY)
    assert not wrong, wrong


def test_there_are_no_import_cycles():
    """Tarjan's strongly connected components over the project's module graph: every one is a single
    module."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_lazy_imports_and_layers():
    """The graph is not vacuous: a lazy import inside a function is an edge, layers resolve as intended."""
    assert "services.coordinator.pools.kubernetes" in GRAPH["services.coordinator.pools"]
    assert "asyncopd.ml.engines" in GRAPH["asyncopd.ml.engine_service"]
    assert layer("asyncopd.records") == "asyncopd" and layer("services.learner.ranks") == "services.learner"


def test_importing_the_core_and_the_coordinator_loads_no_torch():
    core = sorted(m for m in MODULES if layer(m) in ("asyncopd", "services.coordinator") and not m.endswith("__main__"))
    code = (f"import sys; import {', '.join(core)}; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
