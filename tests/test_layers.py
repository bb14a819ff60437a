"""The package's layers: imports go one way down, with no cycle (function-level imports included).

CLI → commands (bench, compare, cluster_report) → tasks / engine / models → data, weights, recipe
→ methods (detection, fusion, cluster, distill) → ops and the leaves (hub, measure, files, errors).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dfx"
METHODS = ("dfx.detection", "dfx.fusion", "dfx.cluster", "dfx.distill", "dfx.ops")
LEAVES = ("dfx.errors", "dfx.files", "dfx.measure", "dfx.hub")
ABOVE_METHODS = ("dfx.cli", "dfx.tasks", "dfx.engine", "dfx.recipe", "dfx.models", "dfx.bench", "dfx.compare",
                 "dfx.cluster_report", "dfx.data_check", "dfx.data", "dfx.weights")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every dfx module ``path`` imports, at any depth of the file (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dfx"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dfx") and not node.level:
            for alias in node.names:  # `from dfx.x import y`: y may be a module of package dfx.x
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else node.module)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_methods_import_nothing_above_them():
    offending = {name: sorted(m for m in deps if within(m, ABOVE_METHODS))
                 for name, deps in graph().items() if within(name, METHODS)}
    offending = {k: v for k, v in offending.items() if v}
    assert not offending, f"method modules importing tasks, engine, CLI, recipes or data: {offending}"


def test_leaves_import_no_other_dfx_module():
    edges = graph()
    offending = {name: sorted(edges[name] - set(LEAVES)) for name in LEAVES if edges[name] - set(LEAVES)}
    assert not offending, offending


def test_the_checker_sees_lazy_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from dfx.engine import trainer\n    import dfx.recipe\n")
    assert imports_of(sample) == {"dfx.engine.trainer", "dfx.recipe"}
