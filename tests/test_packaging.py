"""pyproject.toml lists every package (plugins/ installs as prunekit_plugins) and entry point."""

import importlib.metadata as md
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")


def _config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_directory_is_listed():
    packages = set(_config()["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in (("prunekit", "prunekit"), ("plugins", "prunekit_plugins")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found <= packages, f"missing from pyproject packages: {sorted(found - packages)}"


def test_no_top_level_plugins_module_is_installed():
    assert "plugins" not in _config()["tool"]["setuptools"]["package-dir"]


def test_installed_entry_points_match_pyproject():
    declared = _config()["project"]["entry-points"]["prunekit"]
    installed = {ep.name: ep.value for ep in md.entry_points(group="prunekit")}
    for name, value in declared.items():
        assert installed.get(name) == value, f"entry point {name} not installed (reinstall?)"
