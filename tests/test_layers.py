"""A lower layer never imports a higher one: pruners/ < mllm_adapters/ < benchmarks/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: package -> the packages above it, which it must not import
ABOVE = {"pruners": ("mllm_adapters", "benchmarks"), "mllm_adapters": ("benchmarks",)}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_lower_layers_import_nothing_above_them(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for mod in imported_modules(path):
            if mod.split(".")[0] in ABOVE[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Repository modules ``module`` imports when it is first imported (module-level statements; imports
    inside functions and under ``if TYPE_CHECKING`` run later or never and cannot form a cycle)."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        for n in node.body if isinstance(node, ast.Try) else [node]:
            if isinstance(n, ast.Import):
                names.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - (n.level - 1)] + ([base] if base else []))
                names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in n.names)
    out = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def test_no_import_cycles():
    """No two repository modules import each other at module level, directly or through others."""
    files = {_module_name(p): p for pkg in ("pruners", "mllm_adapters", "benchmarks") for p in (ROOT / pkg).rglob("*.py")}
    graph = {m: _top_level_imports(p, m, set(files)) for m, p in files.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[str] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)
