"""The engine is architecture-neutral: the adapters own every architecture detail.

Read from the imports (top-level and inside functions) of the engine's modules: none imports an
architecture module (``prunekit.models.<anything but loading and kit>``) or a built-in plugin.
"""

import ast
from pathlib import Path

import pytest

import prunekit

ROOT = Path(prunekit.__file__).parent
ENGINE = sorted([*ROOT.glob("pruning/*.py"), *ROOT.glob("evaluation/*.py"),
                 *ROOT.glob("export/*.py"), ROOT / "runner.py",
                 ROOT / "calibration.py", ROOT / "components.py", ROOT / "registry.py",
                 ROOT / "ratios.py", ROOT / "rows.py"])  # fmt: skip
#: architecture-neutral modules under prunekit.models
NEUTRAL_MODELS = {"prunekit.models", "prunekit.models.loading", "prunekit.models.kit"}


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
        name for name in _imports(path)
        if (name.startswith("prunekit.models.") and not any(
            name == m or name.startswith(m + ".") for m in NEUTRAL_MODELS - {"prunekit.models"}))
        or name.startswith(("prunekit_plugins", "transformers.models."))
    )  # fmt: skip
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
