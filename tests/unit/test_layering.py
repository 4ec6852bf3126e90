"""The layering, read from the source with ast (nothing is imported): the shared library imports
neither app, the two apps do not import each other, the planner is plain numbers, and the
library does not lean on its own tooling.

Legitimate ways across that are not imports, and so not flagged: coinfer/tools/launcher.py starts
the apps as processes (`python -m edge_server.cli`), coinfer/settings_docs.py reads the apps'
settings classes by name to generate docs/configuration.md; benchmarks/ and tests/ may import
anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _modules(package: str) -> dict[str, Path]:
    """Dotted name -> file, for every .py under a top-level package."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved); with
    top_level_only, not those inside functions (lazy imports that run only when called)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return names


def _offenders(package: str, forbidden: tuple[str, ...], exempt: tuple[str, ...] = ()) -> list[str]:
    """'file imports name' for each import of a forbidden module (or one under it), outside the
    exempt paths (prefixes relative to the repository)."""
    bad = []
    for module, path in _modules(package).items():
        if exempt and str(path.relative_to(REPO)).startswith(exempt):
            continue
        for name in sorted(_imports(path, module)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    return bad


def test_the_shared_library_imports_neither_app():
    assert _offenders("coinfer", ("device_agent", "edge_server")) == []


def test_the_apps_do_not_import_each_other():
    assert _offenders("device_agent", ("edge_server",)) == []
    assert _offenders("edge_server", ("device_agent",)) == []


def test_the_library_does_not_import_its_tooling():
    """Only the `coinfer` CLI (which runs the tools) and the tools themselves import coinfer.tools."""
    assert _offenders("coinfer", ("coinfer.tools",), exempt=("coinfer/cli.py", "coinfer/tools/")) == []


def test_planning_needs_no_torch_and_no_model():
    """What coinfer.planning loads at import, followed through the library's own modules: no torch,
    no model, no app; so `coinfer plan`, the agent's planner and the tests price cuts from numbers."""
    library = _modules("coinfer")
    seen, todo, outside = set(), [m for m in library if m.startswith("coinfer.planning")], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in _imports(library[module], module, top_level_only=True):
            if name in library:
                todo.append(name)
            elif not name.startswith("coinfer."):
                outside.add(name.split(".")[0])
    assert not {m for m in seen if m.startswith(("coinfer.model", "coinfer.profile", "coinfer.tools"))}
    assert not outside & {"torch", "device_agent", "edge_server", "numpy", "safetensors"}
