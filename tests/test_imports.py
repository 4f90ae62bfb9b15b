"""The package's import graph points down the layers (README, architecture): no module imports,
at module level or inside a function, one that imports it back, and the ground-floor config.py
knows no method. Read from the source with `ast`, so a lazy import hiding a cycle counts."""

from __future__ import annotations

import ast
from pathlib import Path

import instseg_jax

PACKAGE = "instseg_jax"
PACKAGE_DIR = Path(instseg_jax.__file__).resolve().parent


def module_files() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported_names(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    """The dotted names an import statement asks for (for `from a import b`, both a.b and a:
    b may be a module or a name in a), relative imports resolved against the importer."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, dict[str, int]]:
    """{module: {imported module: first line}} over the package's own modules, every import
    statement counted wherever it sits. Importing a.b.c also runs the packages a.b and a unless
    the importer is inside them (then they are already running), so those are edges too."""
    modules = module_files() if modules is None else modules
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _imported_names(node, name, is_package):
                if target not in modules:
                    continue  # not ours, or a name inside a module (its module is listed too)
                running = set(_ancestors(name)) | {name}
                for reached in [*_ancestors(target), target]:
                    if reached in modules and reached not in running:
                        edges.setdefault(reached, node.lineno)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan's
    algorithm, iterative), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, {})))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components, key=lambda c: (-len(c), c))


def describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    """A cycle's modules and the imports that join them (importer:line -> imported)."""
    members = set(component)
    lines = [f"{len(component)} modules: {', '.join(component)}"]
    for name in component:
        for target, line in sorted(graph[name].items()):
            if target in members:
                lines.append(f"  {name}:{line} -> {target}")
    return "\n".join(lines)


def test_the_checker_finds_a_cycle_hidden_in_a_function_and_resolves_relative_imports(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import low\n")
    (package / "sub" / "low.py").write_text("def f():\n    from instseg_jax import high\n")
    (package / "high.py").write_text("from .sub.low import f\n")
    (package / "alone.py").write_text("import instseg_jax.alone\nfrom instseg_jax.sub import low\n")
    modules = {
        PACKAGE: package / "__init__.py",
        f"{PACKAGE}.sub": package / "sub" / "__init__.py",
        f"{PACKAGE}.sub.low": package / "sub" / "low.py",
        f"{PACKAGE}.high": package / "high.py",
        f"{PACKAGE}.alone": package / "alone.py",
    }
    graph = import_graph(modules)
    assert graph[f"{PACKAGE}.high"] == {f"{PACKAGE}.sub": 1, f"{PACKAGE}.sub.low": 1}
    assert graph[f"{PACKAGE}.sub"] == {f"{PACKAGE}.sub.low": 1}  # its own package is running
    assert graph[f"{PACKAGE}.alone"] == {f"{PACKAGE}.sub": 2, f"{PACKAGE}.sub.low": 2}
    cycles = strongly_connected(graph)
    assert cycles == [[f"{PACKAGE}.high", f"{PACKAGE}.sub", f"{PACKAGE}.sub.low"]], cycles


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and f"{PACKAGE}.methods.mask_rcnn" in graph
    cycles = strongly_connected(graph)
    report = "\n".join(describe(component, graph) for component in cycles)
    print(report)
    assert not cycles, f"{len(cycles)} import cycle(s):\n{report}"


def test_config_imports_nothing_above_it():
    """config.py is the ground floor (loading, overrides, validation, base()): nothing it
    reaches, directly or through what it imports, is a method, the builders or the recipes."""
    graph = import_graph()
    reached, frontier = set(), [f"{PACKAGE}.config"]
    while frontier:
        for target in graph[frontier.pop()]:
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    above = (f"{PACKAGE}.methods", f"{PACKAGE}.builders", f"{PACKAGE}.configs")
    upward = sorted(m for m in reached if any(m == a or m.startswith(a + ".") for a in above))
    assert not upward, f"config.py reaches {upward}"


# The package's layers from the ground up (docs/architecture.md, "Layers"): a module imports
# only from a lower layer, or from its own folder. A new top-level module or folder needs a
# place here.
LAYERS = (
    (
        "ops",
        "structures",
        "config",
        "rng",
        "checkpoint",
        "compilation",
        "metrics",
        "hlo_collectives",
    ),
    ("nn", "sharding", "input", "panoptic"),
    ("backbones", "detections"),
    ("methods",),
    ("builders", "configs"),
    ("inference", "workdir"),
    ("evaluate", "predict", "weights", "export", "finetune"),
    ("train", "ops_showcase"),
    ("aot", "demo"),
    ("cli",),
)


def top_level(module: str) -> str:
    """instseg_jax.methods.fcos -> "methods"; instseg_jax -> "" (the package's __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_import_points_down_the_layers():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    graph = import_graph()
    unplaced = sorted({top_level(m) for m in graph} - set(layer) - {""})
    assert not unplaced, f"give {unplaced} a layer in LAYERS (and docs/architecture.md)"
    upward = [
        f"{importer} (layer {layer[top_level(importer)]}) imports {imported} "
        f"(layer {layer[top_level(imported)]})"
        for importer, imports in graph.items()
        for imported in imports
        if top_level(importer)
        and top_level(imported)
        and top_level(importer) != top_level(imported)
        and layer[top_level(imported)] >= layer[top_level(importer)]
    ]
    assert not upward, "\n".join(upward)
