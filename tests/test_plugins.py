import importlib.metadata as md
import json
import sys
import types

import pytest
import torch

import prunekit
from prunekit import plugins as plugins_mod
from prunekit.cli import main
from prunekit.errors import PluginError
from prunekit.registry import build_registry, get_registry
from prunekit.testing import isolated_plugin_manager


def test_builtin_plugins_load_through_entry_points():
    pm = plugins_mod.new_plugin_manager(strict=True)
    assert {"dense", "llama", "calibration"} <= set(pm.infos)
    for name in ("dense", "llama", "calibration"):
        assert pm.infos[name].builtin and pm.infos[name].error is None
    registry = build_registry(pm)
    assert ("method", "dense") in registry
    assert registry.get("method", "dense").plugin == "dense"
    assert registry.get("adapter", "llama").plugin == "llama"


def _fake_entry_points(monkeypatch, extra):
    real = md.entry_points

    def entry_points(group=None, **kw):
        eps = list(real(group=group, **kw)) if group else real(**kw)
        return [*eps, *extra] if group == plugins_mod.ENTRY_POINT_GROUP else eps

    monkeypatch.setattr(plugins_mod.md, "entry_points", entry_points)


def test_broken_plugin_is_isolated(monkeypatch):
    broken = md.EntryPoint("broken", "prunekit_no_such_module_xyz", "prunekit")
    _fake_entry_points(monkeypatch, [broken])
    with pytest.warns(RuntimeWarning, match="broken"):
        pm = plugins_mod.new_plugin_manager(strict=False)
    assert pm.infos["broken"].error and "prunekit_no_such_module_xyz" in pm.infos["broken"].error
    assert ("method", "dense") in build_registry(pm)  # the others still load


def test_cli_prints_prunekit_warnings_as_messages(monkeypatch, capsys):
    """The command line shows prunekit's own warnings as ``warning: ...`` lines (no file, line
    or source line); warnings from other code keep Python's format."""
    import warnings

    from prunekit.cli import _warning_printer

    broken = md.EntryPoint("broken", "prunekit_no_such_module_xyz", "prunekit")
    _fake_entry_points(monkeypatch, [broken])
    monkeypatch.setattr(plugins_mod, "_PM", None)  # the next command loads the entry points
    before = warnings.showwarning
    assert main(["plugins"]) == 0
    assert warnings.showwarning is before  # main() puts the previous printer back
    err = capsys.readouterr().err
    assert "warning: plugin 'broken' (prunekit_no_such_module_xyz" in err
    assert "RuntimeWarning" not in err and "warnings.warn" not in err

    shown = []
    show = _warning_printer(lambda *args: shown.append(args))
    show(UserWarning("from torch"), UserWarning, "/elsewhere/torch/nn.py", 7)
    assert shown and shown[0][2:4] == ("/elsewhere/torch/nn.py", 7)
    show(RuntimeWarning("ours"), RuntimeWarning, prunekit.__file__, 1)
    assert len(shown) == 1 and capsys.readouterr().err == "warning: ours\n"


def test_broken_plugin_is_fatal_in_strict_mode(monkeypatch):
    broken = md.EntryPoint("broken", "prunekit_no_such_module_xyz", "prunekit")
    _fake_entry_points(monkeypatch, [broken])
    monkeypatch.setenv("PRUNEKIT_STRICT", "1")
    with pytest.raises(PluginError, match="broken.*failed to load"):
        plugins_mod.new_plugin_manager()


def test_plugin_raising_at_import_is_reported(monkeypatch):
    module = types.ModuleType("prunekit_test_raiser")
    monkeypatch.setitem(sys.modules, "prunekit_test_raiser", None)  # import raises ImportError
    _fake_entry_points(monkeypatch, [md.EntryPoint("raiser", "prunekit_test_raiser", "prunekit")])
    with pytest.warns(RuntimeWarning):
        pm = plugins_mod.new_plugin_manager(strict=False)
    assert pm.infos["raiser"].error
    del module


def test_disabled_plugin_is_skipped(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_DISABLE_PLUGINS", "dense")
    pm = plugins_mod.new_plugin_manager()
    assert "dense" not in pm.infos
    assert ("method", "dense") not in build_registry(pm)


class _DuplicateDense:
    @prunekit.hookimpl
    def prunekit_register_methods(self, register):
        from prunekit_plugins.dense import Dense

        register("dense", Dense)


def test_duplicate_component_names_both_plugins():
    with isolated_plugin_manager() as pm:
        pm.register_plugin(_DuplicateDense(), "my-dense-copy")
        with pytest.raises(PluginError) as err:
            build_registry(pm)
    assert "'dense'" in str(err.value) and "my-dense-copy" in str(err.value)


def test_third_party_component_registers_and_records_its_plugin(prunekit_pm):
    class ConstMetric:
        """Score every unit 1."""

        def __init__(self, value: float = 1.0):
            self.value = value

        def prepare(self, layer, group):
            return lambda stats: torch.full((layer.units(group),), self.value)

    class ThirdParty:
        @prunekit.hookimpl
        def prunekit_register_metrics(self, register):
            register("const", ConstMetric)

    prunekit_pm.register_plugin(ThirdParty(), "third-party")
    registry = get_registry(prunekit_pm)
    entry = registry.get("metric", "const")
    assert entry.plugin == "third-party" and entry.options() == {"value": 1.0}
    assert registry.create("metric", "const", {"value": 2.0}).value == 2.0
    with pytest.raises(prunekit.PrunekitError, match="did you mean 'value'"):
        registry.create("metric", "const", {"valeu": 2.0})


def test_registration_hooks_are_called_once_per_registry(prunekit_pm):
    calls = []

    class Counting:
        @prunekit.hookimpl
        def prunekit_register_metrics(self, register):
            calls.append(1)

    prunekit_pm.register_plugin(Counting(), "counting")
    get_registry(prunekit_pm)
    get_registry(prunekit_pm)
    assert calls == [1]


def test_cli_plugins_lists_builtins(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert "method:dense" in rows["dense"]["components"]
    assert rows["dense"]["builtin"]


def test_cli_components_filters_by_kind(capsys):
    assert main(["components", "method"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "sq_mean" not in out
    assert main(["components", "metrik"]) == 2
    assert "did you mean 'metric'" in capsys.readouterr().err


def test_every_hookspec_is_documented():
    from pathlib import Path

    from prunekit import hookspecs

    doc = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    for name in dir(hookspecs):
        if name.startswith("prunekit_"):
            import inspect

            args = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
            assert f"{name}({args})" in doc, f"{name}({args}) missing from docs/plugins.md"
