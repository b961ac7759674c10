"""Static import rules (read from the source with `ast`, nothing imported): no module import cycle
in drifting_policy/, envs/, image_gen/ (imports inside functions count: a lazy import still ties
two modules together), and the deployment package depends one way."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("drifting_policy", "envs", "image_gen")


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module of PACKAGES (package __init__ as the package)."""
    out = {}
    for pkg in PACKAGES:
        for file in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(file.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = file
    return out


def imports_of(name: str, file: Path, modules: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its body (the deepest existing module of
    each imported name; `from pkg import mod` counts pkg.mod when it is a module)."""
    is_package = file.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                found.add(".".join(parts))
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, file, set(files)) for name, file in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_lazy_imports_are_resolved(tmp_path):
    file = tmp_path / "x.py"
    file.write_text("from . import sibling\nfrom .sub import thing\n"
                    "def f():\n    import pkg.other.deep\n")
    modules = {"pkg.mod", "pkg.sibling", "pkg.sub", "pkg.other"}
    assert imports_of("pkg.mod", file, modules) == {"pkg.sibling", "pkg.sub", "pkg.other"}


def test_no_module_import_cycles():
    assert cycles(import_graph()) == []


def test_envs_import_no_drifting_policy_code():
    graph = import_graph()
    offending = {m: sorted(t for t in ts if t.startswith("drifting_policy"))
                 for m, ts in graph.items() if m.startswith("envs")}
    assert {m: ts for m, ts in offending.items() if ts} == {}


def test_deploy_depends_one_way():
    """contract <- protocol <- predictors <- server / control_loop <- robot, run; nothing outside
    drifting_policy.deploy imports it except the CLI, eval and bench (device and entry points)."""
    graph = import_graph()
    order = ["contract", "protocol", "graph", "predictors", "export", "server", "control_loop",
             "robot", "run"]
    rank = {f"drifting_policy.deploy.{m}": i for i, m in enumerate(order)}
    for module, targets in graph.items():
        for target in targets & set(rank):
            if module in rank:
                assert rank[target] < rank[module], f"{module} imports {target}"
            else:
                assert module in {"drifting_policy.cli", "drifting_policy.eval",
                                  "drifting_policy.bench"}, f"{module} imports {target}"
    assert "drifting_policy.deploy.control_loop" not in graph["drifting_policy.deploy.server"]
    assert "drifting_policy.deploy.server" not in graph["drifting_policy.deploy.control_loop"]
    assert set(graph["drifting_policy.deploy.robot"]) & set(rank) == set()  # structural Robot
