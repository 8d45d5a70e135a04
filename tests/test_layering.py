"""The package's layering, read from the source (every import, also those inside functions): the ground
(errors, devices, limits, report, signals, format/) imports nothing above it, and no module reaches itself back
through its imports (an import loop makes the order of module loading matter)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder in the repository -> package it installs as (pyproject.toml's wheel.packages)
PACKAGES = {"esparse": "esparse", "converter": "esparse.converter", "python_api": "esparse.python_api",
            "ft_plugin": "esparse.ft_plugin"}
GROUND = ("esparse.errors", "esparse.devices", "esparse.limits", "esparse.report", "esparse.signals",
          "esparse.format")
ABOVE = ("esparse.converter", "esparse.python_api", "esparse.ft_plugin", "esparse.cli", "esparse.demo",
         "esparse.assets")


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((pkg, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports, wherever the import statement is."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import mod`` imports the module; ``from mod import name`` the module itself
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_the_ground_imports_nothing_above_it():
    bad = [(m, t) for m, ts in _graph().items() if m.startswith(GROUND) for t in ts if t.startswith(ABOVE)]
    assert not bad, bad


def test_no_import_loop():
    edges = _graph()
    loops, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                loops.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not loops, "\n".join(" -> ".join(c) for c in loops)
