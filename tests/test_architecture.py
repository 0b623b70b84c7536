"""Architecture checks (issues 12, 20): every module imports alone, no import cycle (type-only imports included), no
module over ~400 lines without a reason in its docstring, no function over 80 lines; no test module imports another
(what several share lives in ``conftest.py`` or ``helpers.py``)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

PACKAGE = "torch_singlora"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE
MAX_LINES = 400
LONG_MODULE_REASON = "Long module:"  # a module over MAX_LINES says why in its docstring, after this marker
# Known debts, each being paid by its owner (issue 12; see /work/notes/COORDINATION.md); nothing new may join.
# Remove an entry once it is fixed.
KNOWN_LONG: dict[str, str] = {  # over MAX_LINES without a reason today
}
MAX_FUNCTION_LINES = 80
KNOWN_LONG_FUNCTIONS: dict[str, str] = {  # "<module>.<function>" over MAX_FUNCTION_LINES today
}
KNOWN_CYCLES: dict[tuple[str, str], str] = {  # (importer, imported) edges that close a cycle today
}


def module_names() -> list[str]:
    """Every module of the package, by dotted name (packages by their ``__init__``)."""
    names = []
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def path_of(name: str) -> Path:
    base = SOURCE.parent.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def import_alone(name: str) -> str | None:
    """Import ``name`` with none of the package loaded (its own modules run again, in its import order); then put
    the package's modules back as they were, so the rest of the test session keeps its classes. The error, or None."""
    ours = {m: sys.modules.pop(m) for m in list(sys.modules) if m == PACKAGE or m.startswith(PACKAGE + ".")}
    try:
        importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001 - any failure is the finding
        return f"{type(exc).__name__}: {exc}"
    finally:
        for m in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[m]
        sys.modules.update(ours)
    return None


def preload_third_party(names: list[str]) -> None:
    """Import here, once, the third-party names the modules import at module level (so each fork re-runs only the
    package's own code): ``import x`` and ``from x import y`` (``y`` fetched, for lazily loading packages)."""
    for name in names:
        for node in ast.parse(path_of(name).read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                targets = [(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module, attribute in targets:
                if module.split(".")[0] in (PACKAGE, "__future__"):
                    continue
                try:
                    loaded = importlib.import_module(module)
                    if attribute is not None:
                        getattr(loaded, attribute, None)
                except Exception:  # noqa: BLE001 - a missing extra: the fork's import will report it
                    pass


def test_each_module_imports_alone() -> None:
    """Each module imported first, with none of the package loaded (third-party libraries are imported once
    beforehand: what is tested is the package's own import order)."""
    names = module_names()
    preload_third_party(names)
    failures = {name: error for name in names if (error := import_alone(name))}
    assert not failures


def imports_of(name: str) -> set[str]:
    """Modules of the package that ``name`` imports anywhere (module level, inside functions, or under
    ``if TYPE_CHECKING:``: a circle of type hints is still a circle between the modules);
    ``from . import x`` counts as importing the submodule ``x`` when there is one."""
    tree = ast.parse(path_of(name).read_text(encoding="utf-8"))
    package = name if path_of(name).name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    known = set(module_names())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle() -> None:
    """The package's import graph (function-level and type-only imports included: a cycle hidden inside a function
    or behind ``TYPE_CHECKING`` is still a cycle) is a DAG. A package's ``__init__`` importing its own submodules is not a cycle by itself."""
    graph = {name: imports_of(name) for name in module_names()}
    for name, imported in graph.items():  # a submodule importing its package means "the names it re-exports"
        graph[name] = {m for m in imported if not name.startswith(m + ".") and (name, m) not in KNOWN_CYCLES}
    assert find_cycle(graph) is None


def test_no_module_over_the_size_limit_without_a_reason() -> None:
    over = {}
    for name in module_names():
        path = path_of(name)
        lines = len(path.read_text(encoding="utf-8").splitlines())
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if lines > MAX_LINES and LONG_MODULE_REASON not in docstring and name not in KNOWN_LONG:
            over[name] = lines
    assert not over, f"over {MAX_LINES} lines with no '{LONG_MODULE_REASON} <why>' in the docstring: split them"


def long_functions(name: str) -> dict[str, int]:
    """``{"<module>.<function>": lines}`` of the functions (methods and nested ones included) of module ``name``
    longer than ``MAX_FUNCTION_LINES``, from the ``def`` line to the last line of the body."""
    tree = ast.parse(path_of(name).read_text(encoding="utf-8"))
    return {f"{name}.{node.name}": node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES}


def test_long_functions_finds_one(tmp_path, monkeypatch) -> None:
    lines = ["class C:", "    def method(self):"] + [f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES)]
    (tmp_path / "long.py").write_text("\n".join(lines) + "\n")  # the def line + 80: one over
    monkeypatch.setattr(sys.modules[__name__], "path_of", lambda name: tmp_path / "long.py")
    assert long_functions("m") == {"m.method": MAX_FUNCTION_LINES + 1}


def test_no_function_over_the_size_limit() -> None:
    found = {f: n for name in module_names() for f, n in long_functions(name).items()}
    over = {f: n for f, n in found.items() if f not in KNOWN_LONG_FUNCTIONS}
    assert not over, f"over {MAX_FUNCTION_LINES} lines: split them into named steps"
    paid = sorted(set(KNOWN_LONG_FUNCTIONS) - set(found))
    assert not paid, f"{paid} are no longer over {MAX_FUNCTION_LINES} lines: remove them from KNOWN_LONG_FUNCTIONS"


def test_no_test_module_imports_another() -> None:
    tests = Path(__file__).resolve().parent
    own = {path.stem for path in tests.glob("test_*.py")}
    found: list[str] = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            found += [f"{path.stem} imports {name}" for name in names if name.split(".")[0] in own]
    assert not found
