"""Plugin manager: discovery of the ``prunekit`` entry points, isolation, strict mode.

Discovery is separate from registration: entry points are loaded lazily (on the first call of
:func:`get_plugin_manager`), one at a time, each in its own ``try``. A plugin that fails to
import is reported (warning + :attr:`PluginInfo.error`) and the others still load, unless
strict mode is on (``PRUNEKIT_STRICT=1`` or ``prunekit --strict``), which makes it fatal.

Environment switches:

* ``PRUNEKIT_STRICT=1``: a plugin that fails to load is an error.
* ``PRUNEKIT_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry point (tests register what they need).
* ``PRUNEKIT_DISABLE_PLUGINS=a,b``: skip the named entry points (also ``--disable-plugin``).
* ``PRUNEKIT_TRACE_PLUGINS=1``: print every hook call and its result (pluggy monitoring).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import pluggy

from prunekit import hookspecs
from prunekit.errors import PluginError, PrunekitError, storage_error, storage_failure

ENTRY_POINT_GROUP = "prunekit"
BUILTIN_DISTRIBUTION = "prunekit"


@dataclass
class PluginInfo:
    """What was discovered for one entry point (or one plugin registered by hand)."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    error: str | None = None
    hooks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "error": self.error,
            "hooks": self.hooks,
        }


class PrunekitPluginManager(pluggy.PluginManager):
    """A :class:`pluggy.PluginManager` that remembers what it discovered and what failed."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._prunekit_registry = None

    def register(self, plugin, name=None):  # noqa: D102 - invalidates the cached registry
        self._prunekit_registry = None
        return super().register(plugin, name=name)

    def unregister(self, plugin=None, name=None):  # noqa: D102
        self._prunekit_registry = None
        self.infos.pop(name or self.get_name(plugin) or "", None)
        return super().unregister(plugin=plugin, name=name)

    def register_plugin(self, plugin: object, name: str, **info) -> None:
        """Register ``plugin`` under ``name`` and record its :class:`PluginInfo`."""
        self.register(plugin, name=name)
        module = getattr(plugin, "__name__", type(plugin).__module__)
        self.infos[name] = PluginInfo(name=name, module=module, **info)
        self.infos[name].hooks = sorted(
            h.name for h in self.get_hookcallers(plugin) or [] if h.name.startswith("prunekit_")
        )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def strict_from_env() -> bool:
    return _env_flag("PRUNEKIT_STRICT")


def load_entry_points(
    pm: PrunekitPluginManager, strict: bool = False, disabled: set[str] | None = None
) -> None:
    """Load every ``prunekit`` entry point into ``pm``, isolating the ones that fail."""
    disabled = set(disabled or ())
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in disabled or pm.has_plugin(ep.name):
            continue
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        info = {
            "distribution": dist_name,
            "version": dist.version if dist is not None else None,
            "builtin": dist_name == BUILTIN_DISTRIBUTION,
        }
        try:
            plugin = ep.load()
            pm.register_plugin(plugin, ep.name, **info)
        except Exception as exc:  # one broken plugin must not break the others
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            message = (
                f"plugin {ep.name!r} ({ep.value}, distribution {dist_name or '?'}) failed to "
                f"load: {detail}"
            )
            if strict:
                raise PluginError(
                    message + "\nStrict mode is on (PRUNEKIT_STRICT=1 or --strict); fix or "
                    f"uninstall the plugin, or skip it with PRUNEKIT_DISABLE_PLUGINS={ep.name}."
                ) from exc
            warnings.warn(
                message + " (skipped; set PRUNEKIT_STRICT=1 to make this fatal)",
                RuntimeWarning,
                stacklevel=2,
            )
            pm.infos[ep.name] = PluginInfo(name=ep.name, module=ep.value, error=detail, **info)
    if strict:
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"{exc} (a hook implementation whose name matches no prunekit hook: check its "
                "spelling against prunekit.hookspecs)"
            ) from exc


_PM: PrunekitPluginManager | None = None


def new_plugin_manager(
    strict: bool | None = None, disabled: set[str] | None = None, autoload: bool | None = None
) -> PrunekitPluginManager:
    """Build a fresh plugin manager with every (non-disabled) entry point loaded."""
    strict = strict_from_env() if strict is None else strict
    if autoload is None:
        autoload = not _env_flag("PRUNEKIT_DISABLE_PLUGIN_AUTOLOAD")
    env_disabled = {s.strip() for s in os.environ.get("PRUNEKIT_DISABLE_PLUGINS", "").split(",")}
    disabled = (set(disabled or ()) | env_disabled) - {""}
    pm = PrunekitPluginManager()
    if _env_flag("PRUNEKIT_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda s: sys.stderr.write(s))
        pm.enable_tracing()
    if autoload:
        load_entry_points(pm, strict=strict, disabled=disabled)
    return pm


def get_plugin_manager() -> PrunekitPluginManager:
    """The process-wide plugin manager, created (and entry points loaded) on first use."""
    global _PM
    if _PM is None:
        _PM = new_plugin_manager()
    return _PM


def set_plugin_manager(pm: PrunekitPluginManager | None) -> PrunekitPluginManager | None:
    """Replace the process-wide manager (``None`` resets it); returns the previous one."""
    global _PM
    previous, _PM = _PM, pm
    return previous


def _plugin_of_module(module: str, infos: dict[str, PluginInfo]) -> PluginInfo | None:
    best = None
    for info in infos.values():
        if info.error is None and (module == info.module or module.startswith(info.module + ".")):
            if best is None or len(info.module) > len(best.module):
                best = info
    return best


def blame(exc: BaseException, pm: PrunekitPluginManager | None = None):
    """``(plugin info, "file:line")`` of the innermost traceback frame of ``exc`` that runs
    a registered plugin's code, or None."""
    pm = pm or get_plugin_manager()
    infos = getattr(pm, "infos", {})
    frames = list(traceback.walk_tb(exc.__traceback__))
    for frame, lineno in reversed(frames):
        info = _plugin_of_module(frame.f_globals.get("__name__", ""), infos)
        if info is not None:
            return info, f"{frame.f_code.co_filename}:{lineno}"
    return None


@contextlib.contextmanager
def plugin_faults(
    pm: PrunekitPluginManager | None = None, stage: str = "the run"
) -> Iterator[None]:
    """Turn an unexpected exception raised inside a plugin's code (a component, an adapter,
    a method) into a :class:`PluginError` naming the plugin, its distribution and version,
    and where it raised. prunekit's own user-facing errors, interrupts and out-of-memory
    errors pass through unchanged."""
    try:
        yield
    except PluginError:
        raise
    except Exception as exc:
        if (
            isinstance(exc, (PrunekitError, MemoryError))
            or type(exc).__name__ == "OutOfMemoryError"
        ):
            raise
        reason = storage_failure(exc)
        if reason is not None:  # a full disk is the machine's, not the plugin's fault
            raise storage_error(reason, stage) from exc
        found = blame(exc, pm)
        if found is None:
            raise
        info, where = found
        dist = f"distribution {info.distribution or '?'} {info.version or ''}".rstrip()
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        report = (
            "a prunekit bug: please report it"
            if info.builtin
            else f"report it to the plugin's authors, or disable the plugin with "
            f"PRUNEKIT_DISABLE_PLUGINS={info.name}"
        )
        raise PluginError(
            f"plugin {info.name!r} ({dist}) failed during {stage}: {detail} "
            f"(raised at {where}); {report}"
        ) from exc
