"""The package's import graph, read from the source (nothing is imported): project imports sit at the top
of each module, the graph they make has no cycle, and the math layer imports nothing above it."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ddim_jax"
# The math: schedules, the forward process, samplers, solvers, guidance, the analytic oracle, distillation targets.
MATH = {"ddim_jax.schedules", "ddim_jax.diffusion", "ddim_jax.sampling", "ddim_jax.solvers", "ddim_jax.guidance",
        "ddim_jax.conditioning",
        "ddim_jax.oracle", "ddim_jax.concat", "ddim_jax.distillation"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(name: str) -> str:
    """The project module an imported name resolves to (``ddim_jax.x.y`` -> the longest module prefix)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(tree: ast.AST, module: str):
    """``(node, target)`` for each project import in ``tree``; relative imports resolved against ``module``."""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "ddim_jax":
                yield node, _target(name)


def _inside_functions(tree: ast.AST) -> set[int]:
    return {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for sub in ast.walk(node) if sub is not node}


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules its import statements execute: the target, and the packages above it
    (their ``__init__`` runs first), except the importer's own packages."""
    graph = {}
    for module, path in MODULES.items():
        edges = set()
        for _, target in _imports(ast.parse(path.read_text()), module):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if not (module == name or module.startswith(name + ".")):
                    edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_project_import_inside_a_function():
    """Function-local imports are for optional heavy dependencies (torch, tensorflow), never the project's:
    one hides a cycle from this graph and from the reader."""
    found = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        local = _inside_functions(tree)
        found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {target}"
                  for node, target in _imports(tree, module) if id(node) in local]
    assert not found, "\n".join(found)


def test_the_import_graph_has_no_cycle():
    assert find_cycle(_graph()) is None, " -> ".join(find_cycle(_graph()))


def test_the_math_imports_nothing_above_it():
    graph = _graph()
    for module in MATH:
        assert graph[module] <= MATH | {"ddim_jax"}, (module, graph[module] - MATH)


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"c"}}, ["c", "c"]),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
])
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_a_function_local_project_import_is_found(tmp_path):
    tree = ast.parse("import os\n\ndef f():\n    from ddim_jax import models\n    import torch\n")
    local = _inside_functions(tree)
    assert [t for node, t in _imports(tree, "ddim_jax.files") if id(node) in local] == ["ddim_jax.models"]
