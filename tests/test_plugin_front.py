"""Built-in plugins use only what a third-party plugin can: the plugin front.

Read from the syntax trees of the built-in methods (``plugins/``, installed as
``prunekit_plugins``) and of the outside packages this repository ships as examples (the
GRIFFIN example, the Granite test package): every prunekit import is from ``prunekit.plugin``
(top-level and inside functions), and no plugin reads the recipe (``ctx.recipe``) or dumps
pydantic sections (``model_dump``). The entry points in pyproject.toml follow the documented
split (docs/plugins-reference.md): methods under plugins/, architecture adapters under prunekit/models/,
the engine's own component defaults in the engine.
"""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest
import tomllib

import prunekit
import prunekit.plugin
from prunekit.testing import prunekit_imports

REPO = Path(__file__).resolve().parent.parent  # the checkout (prunekit may be installed)
PLUGIN_FILES = sorted(
    [
        *(REPO / "plugins").rglob("*.py"),
        *(REPO / "examples" / "prunekit-griffin" / "prunekit_griffin").rglob("*.py"),
        *(REPO / "tests" / "plugin_pkgs").rglob("prunekit_*/*.py"),
    ]
)
#: the entry points of the engine's own components: each kind's default, shipped with the
#: engine (calibration statistics, the uniform allocator, the no-op compensator, the local and
#: submitit executors, the built-in corpora and tasks)
ENGINE_DEFAULTS = {
    "calibration": "prunekit.calibration",
    "allocation": "prunekit.pruning.allocation",
    "static": "prunekit.pruning.static",
    "executors": "prunekit.sweep.executors",
    "data": "prunekit.data.builtin",
}


def test_there_are_plugin_files_to_check():
    names = {p.parent.name for p in PLUGIN_FILES}
    assert {
        "pp",
        "flap",
        "llm_pruner",
        "lora_prune",
        "wanda_sp",
        "dense",
        "prunekit_griffin",
        "prunekit_granite",
    } <= names


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_import_only_the_front(path):
    tree = ast.parse(path.read_text())
    bad = [
        f"line {line}: {module}"
        for line, module in prunekit_imports(tree)
        if module != "prunekit.plugin"
    ]
    assert not bad, f"{path.relative_to(REPO)} imports past prunekit.plugin: {bad}"


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_do_not_read_the_recipe(path):
    tree = ast.parse(path.read_text())
    bad = [
        f"line {n.lineno}: .{n.attr}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and (
            n.attr == "model_dump"
            or (n.attr == "recipe" and isinstance(n.value, ast.Name) and n.value.id == "ctx")
        )
    ]
    assert not bad, f"{path.relative_to(REPO)} reads the recipe past the context: {bad}"


def test_every_front_name_resolves():
    for name in [*prunekit.plugin.__all__, *prunekit.plugin._ADAPTER_BASES]:
        assert getattr(prunekit.plugin, name) is not None, name


def test_the_front_imports_no_architecture():
    tree = ast.parse(Path(prunekit.plugin.__file__).read_text())
    modules = [m for _, m in prunekit_imports(tree)]
    assert not [m for m in modules if m.startswith("prunekit.models")], modules


def test_entry_points_follow_the_documented_split():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    points = data["project"]["entry-points"]["prunekit"]
    adapters = {n: m for n, m in points.items() if m.startswith("prunekit.models.")}
    methods = {n: m for n, m in points.items() if m.startswith("prunekit_plugins.")}
    engine = {n: m for n, m in points.items() if n not in adapters and n not in methods}
    assert engine == ENGINE_DEFAULTS
    for module in adapters.values():  # an adapter module registers adapters only
        mod = importlib.import_module(module)
        hooks = {n for n in vars(mod) if n.startswith("prunekit_register_")}
        assert hooks == {"prunekit_register_adapters"}, (module, hooks)
    for name in methods:
        assert (REPO / "plugins" / name / "__init__.py").is_file(), name
    docs = (REPO / "docs" / "plugins-reference.md").read_text()
    for name, module in points.items():  # the docs list every entry point
        assert f"`{module}`" in docs, (
            f"docs/plugins-reference.md does not list the entry point {name} = {module}"
        )


def test_moved_runner_names_warn_and_resolve():
    import prunekit.runner as runner

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from prunekit.runner import model_context, output_problem  # noqa: F401
    assert {
        str(w.message).split(" moved")[0] for w in caught if w.category is DeprecationWarning
    } >= {"prunekit.runner.model_context", "prunekit.runner.output_problem"}
    from prunekit.plan import problem_error as new

    with pytest.warns(DeprecationWarning):
        assert runner.problem_error is new
    with pytest.raises(AttributeError):
        runner.no_such_name  # noqa: B018
