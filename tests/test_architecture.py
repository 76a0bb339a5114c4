"""The house rules of docs/architecture.md, checked on the code (by reading it, nothing runs):
no library module imports a command-line module, no import cycle between modules, and no
function longer than 80 lines in the libraries."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pfc_ds", "data_pipelines")
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _is_command(path: Path) -> bool:
    """A module run by ``python -m``: it has a ``main()`` (or is a ``__main__``)."""
    return path.name == "__main__.py" or "\ndef main(" in path.read_text()


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, at any depth of its code (lazy imports too); a
    ``from package import submodule`` counts as the submodule, not the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module
            subs = {f"{module}.{a.name}" for a in node.names} & modules.keys()
            found |= subs or {module}
    return {m for m in found if m in modules and m != name}


def test_no_library_imports_a_command_line_module():
    modules = _modules()
    commands = {m for m, p in modules.items() if _is_command(p)}
    wrong = [
        f"{m} -> {dep}"
        for m, p in modules.items()
        if m not in commands
        for dep in _imports(m, p, modules)
        if dep in commands
    ]
    assert not wrong, wrong


def test_no_import_cycles_between_modules():
    modules = _modules()
    edges = {m: _imports(m, p, modules) for m, p in modules.items()}
    # A package's __init__ re-exporting its submodules is not a dependency of theirs on it.
    for m, p in modules.items():
        if p.name == "__init__.py":
            for dep in list(edges):
                if dep.startswith(m + "."):
                    edges[dep].discard(m)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for dep in sorted(edges[m]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_function_longer_than_80_lines():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert not long, long


def test_the_trainer_module_stays_thin():
    assert len((ROOT / "pfc_ds/train/loop.py").read_text().splitlines()) <= 400
