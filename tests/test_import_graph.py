"""The package's import graph: no import circle between its own modules, counting imports inside functions too (a lazy
import that dodges a circle at import time still ties two modules to each other), and every name imported from the
module that defines it."""

import ast
from pathlib import Path

import stpp_hf

PACKAGE_DIR = Path(stpp_hf.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in its body. A package's ``__init__`` is not counted as
    an import of its children (importing ``a.b`` runs ``a/__init__`` first, by Python's rules, not the code's)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package_of(path).split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules)
    found.discard(module_name(path))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) for path in paths}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "stpp_hf.training.run_layout" in graph["stpp_hf.training.run_record"]
    assert "stpp_hf.models.deeplab.label_presets" in graph["stpp_hf.data.sources.pascal"]


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_inside_the_package():
    graph = import_graph()
    # packages re-export their children: drop a child's imports of its own package's __init__
    graph = {
        name: {target for target in targets if not name.startswith(target + ".")} for name, targets in graph.items()
    }
    assert circles(graph) == []


def defined_names(path: Path) -> set[str]:
    """The names ``path`` defines at module level (functions, classes, assignments, in ``if`` / ``try`` too), not
    those it imports."""
    names, pending = set(), list(ast.parse(path.read_text(encoding="utf-8")).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):
            pending += node.body + node.orelse + getattr(node, "finalbody", [])
            pending += [statement for handler in getattr(node, "handlers", []) for statement in handler.body]
    return names


def borrowed_imports(path: Path, module_paths: dict[str, Path]) -> list[str]:
    """``from <module> import <name>`` in ``path`` where ``<module>`` is one of the package's modules (not a
    package, whose ``__init__`` gathers its children's names) that does not define ``<name>`` itself."""
    borrowed = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if node.level:
            anchor = package_of(path).split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            module = ".".join(anchor + ([module] if module else []))
        source = module_paths.get(module)
        if source is None or source.name == "__init__.py":
            continue
        defined = defined_names(source)
        borrowed += [f"{module}.{alias.name}" for alias in node.names if alias.name not in defined]
    return borrowed


def test_names_are_imported_from_the_module_that_owns_them():
    """One owner per object: the package, its tests, benchmarks and examples import a name from the module that
    defines it, not through a module that imported it in turn."""
    module_paths = {module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}
    repo = PACKAGE_DIR.parent
    paths = [*PACKAGE_DIR.rglob("*.py"), *(repo / "tests").glob("*.py"), *(repo / "benchmarks").glob("*.py"),
             *(repo / "examples").rglob("*.py")]  # fmt: skip
    borrowed = {path.relative_to(repo).as_posix(): borrowed_imports(path, module_paths) for path in paths}
    assert {path: names for path, names in borrowed.items() if names} == {}


def test_a_borrowed_import_is_found(tmp_path):
    module_paths = {module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}
    borrower = tmp_path / "borrower.py"
    borrower.write_text("from stpp_hf.training.trainer import convert_sync_batchnorm, train_stage\n")
    assert borrowed_imports(borrower, module_paths) == ["stpp_hf.training.trainer.convert_sync_batchnorm"]
