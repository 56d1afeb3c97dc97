"""No import cycles inside detr_jax, counting imports inside functions (DESIGN.md: a
function-level import that dodges a cycle is a cycle)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "detr_jax"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the detr_jax modules it imports anywhere in its body}."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from pkg import sub` depends on pkg.sub when that is a module
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_function_level_cycle():
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(graph) == [["a", "b"]]
    tree = ast.parse("def f():\n    from detr_jax import train\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))  # ast.walk sees inside functions


def test_no_import_cycles_in_detr_jax():
    graph = import_graph()
    assert "detr_jax.train.trainer" in graph and "detr_jax.models.detr" in graph["detr_jax.models"]
    assert cycles(graph) == []


def test_model_files_do_not_read_the_config_package():
    """A module never reads the config; `models.build_model` is where config meets modules."""
    graph = import_graph()
    for module, imports in graph.items():
        if module.startswith("detr_jax.models"):
            assert not any(m.startswith("detr_jax.config") for m in imports), (module, imports)
