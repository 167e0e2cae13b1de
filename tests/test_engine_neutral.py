"""The engine is architecture-neutral: the adapters own every architecture detail.

Read from the imports (top-level and inside functions) of the engine's modules: none imports an
architecture module (``prunekit.models.<anything but kit>``) or a built-in plugin; and the house
has no import circle.
"""

import ast
from pathlib import Path

import pytest

import prunekit

ROOT = Path(prunekit.__file__).parent
ENGINE = sorted(
    [
        *ROOT.glob("pruning/*.py"),
        *ROOT.glob("evaluation/*.py"),
        *ROOT.glob("export/*.py"),
        *ROOT.glob("data/*.py"),
        *ROOT.glob("sweep/*.py"),
        *ROOT.glob("loading/*.py"),
        *(
            ROOT / f"{name}.py"
            for name in (
                "runner",
                "plan",
                "context",
                "views",
                "timing",
                "plugin",
                "stages",
                "devices",
                "calibration",
                "components",
                "registry",
                "ratios",
                "rows",
                "recipe",
                "recovery",
                "cli",
            )
        ),
    ]
)
#: architecture-neutral modules under prunekit.models
NEUTRAL_MODELS = {"prunekit.models", "prunekit.models.kit"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: str(p.relative_to(ROOT)))
def test_engine_module_imports_no_architecture(path):
    bad = sorted(
        name
        for name in _imports(path)
        if (
            name.startswith("prunekit.models.")
            and not any(
                name == m or name.startswith(m + ".") for m in NEUTRAL_MODELS - {"prunekit.models"}
            )
        )
        or name.startswith(("prunekit_plugins", "transformers.models."))
    )
    assert not bad, f"{path.relative_to(ROOT)} imports architecture or plugin modules: {bad}"


def test_components_and_allocation_do_not_import_each_other():
    assert not any(n.startswith("prunekit.pruning") for n in _imports(ROOT / "components.py"))


MODELLING = sorted(ROOT.glob("models/pruned_*.py"))


@pytest.mark.parametrize("path", MODELLING, ids=lambda p: p.name)
def test_saved_modelling_files_import_only_torch_and_transformers(path):
    """They are copied into checkpoints and run with trust_remote_code where prunekit is not
    installed."""
    import sys

    roots = {name.split(".")[0] for name in _imports(path)}
    allowed = {"torch", "transformers", "__future__", *sys.stdlib_module_names}
    assert roots <= allowed, f"{path.name} imports {sorted(roots - allowed)}"


def _module_graph() -> dict[str, set[str]]:
    """prunekit module -> the prunekit modules it imports (top-level and inside functions),
    leaving out type-only imports (``if TYPE_CHECKING:``) and the lazy public API of a
    package's ``__getattr__``."""
    mods = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p

    class Visitor(ast.NodeVisitor):
        def __init__(self) -> None:
            self.out: set[str] = set()

        def visit_If(self, node):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                self.generic_visit(node)

        def visit_FunctionDef(self, node):
            if node.name != "__getattr__":
                self.generic_visit(node)

        def visit_ImportFrom(self, node):
            if node.level == 0 and node.module in mods:
                self.out.add(node.module)
                self.out.update(
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if f"{node.module}.{a.name}" in mods
                )

        def visit_Import(self, node):
            self.out.update(a.name for a in node.names if a.name in mods)

    graph = {}
    for name, path in mods.items():
        v = Visitor()
        v.visit(ast.parse(path.read_text()))
        graph[name] = v.out - {name}
    return graph


def test_no_import_circle():
    graph = _module_graph()
    assert "prunekit.loading" in graph and "prunekit.devices" in graph
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = path[path.index(node) :] + [node]
            pytest.fail(f"import circle: {' -> '.join(cycle)}")
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
