"""Named components, filled by the registration hooks and resolved once per run.

Each entry records the plugin that registered it. Two components of the same kind and name are
an error that names both plugins (no silent renaming).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prunekit.components import KINDS
from prunekit.errors import PluginError, RecipeError, did_you_mean

#: component kind -> the registration hook that fills it
HOOKS: dict[str, str] = {
    "adapter": "prunekit_register_adapters",
    "statistic": "prunekit_register_statistics",
    "probe": "prunekit_register_probes",
    "fusion": "prunekit_register_fusions",
    "history": "prunekit_register_histories",
    "metric": "prunekit_register_metrics",
    "allocator": "prunekit_register_allocators",
    "compensator": "prunekit_register_compensators",
    "method": "prunekit_register_methods",
}
assert set(HOOKS) == set(KINDS)


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    description: str = ""
    #: registered by a plugin of the prunekit distribution itself
    builtin: bool = False

    def options(self) -> dict[str, Any]:
        """Keyword options the factory accepts, with their defaults (``...`` = required).

        Only slot components take recipe options; adapters and methods report none.
        """
        if self.kind in ("adapter", "method"):
            return {}
        return factory_options(self.factory)

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "plugin": self.plugin,
            "builtin": self.builtin,
            "description": self.description,
            "options": {k: (None if v is ... else v) for k, v in self.options().items()},
        }


def _target(factory: Callable[..., Any]):
    if inspect.isclass(factory):
        return None if factory.__init__ is object.__init__ else factory.__init__
    return factory


def factory_options(factory: Callable[..., Any]) -> dict[str, Any]:
    target = _target(factory)
    if target is None:  # a class without __init__ takes no options
        return {}
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return {}
    out: dict[str, Any] = {}
    for p in params:
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[p.name] = ... if p.default is p.empty else p.default
    return out


def _accepts_any_keyword(factory: Callable[..., Any]) -> bool:
    target = _target(factory)
    if target is None:
        return False
    try:
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return True


class Registry:
    """All components, by kind and name."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Entry] = {}

    def add(self, entry: Entry) -> None:
        if entry.kind not in KINDS:
            raise PluginError(
                f"plugin {entry.plugin!r} registered a component of unknown kind {entry.kind!r}; "
                f"kinds are: {', '.join(KINDS)}"
            )
        if not isinstance(entry.name, str) or not entry.name:
            raise PluginError(f"plugin {entry.plugin!r} registered a {entry.kind} without a name")
        key = (entry.kind, entry.name)
        if key in self._entries:
            first = self._entries[key]
            raise PluginError(
                f"{entry.kind} {entry.name!r} is registered twice: by plugin {first.plugin!r} and "
                f"by plugin {entry.plugin!r}. Rename one of them, or disable a plugin with "
                f"PRUNEKIT_DISABLE_PLUGINS={entry.plugin}."
            )
        self._entries[key] = entry

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: (KINDS.index(e.kind), e.name)))

    def entries(self, kind: str) -> list[Entry]:
        """The entries of ``kind`` in registration order."""
        return [e for (k, _), e in self._entries.items() if k == kind]

    def names(self, kind: str) -> list[str]:
        return sorted(name for k, name in self._entries if k == kind)

    def get(self, kind: str, name: str, where: str = "") -> Entry:
        """The entry ``(kind, name)``, or a :class:`RecipeError` listing what is available."""
        try:
            return self._entries[(kind, name)]
        except KeyError:
            available = self.names(kind)
            at = f"{where}: " if where else ""
            raise RecipeError(
                f"{at}unknown {kind} {name!r}{did_you_mean(name, available)}; registered "
                f"{kind}s: {', '.join(available) or '(none: is a plugin missing?)'}"
            ) from None

    def check_options(self, kind: str, name: str, options: dict[str, Any], where: str = "") -> None:
        """Raise :class:`RecipeError` if ``options`` has a key the component does not accept."""
        entry = self.get(kind, name, where)
        if _accepts_any_keyword(entry.factory):
            return
        accepted = entry.options()
        at = f"{where}: " if where else ""
        for key in options:
            if key not in accepted:
                raise RecipeError(
                    f"{at}unknown option {key!r} for {kind} {name!r}{did_you_mean(key, accepted)};"
                    f" options: {', '.join(accepted) or '(none)'}"
                )

    def create(self, kind: str, name: str, options: dict[str, Any] | None = None, where: str = ""):
        """Instantiate a component, turning bad options into a :class:`RecipeError`."""
        options = dict(options or {})
        self.check_options(kind, name, options, where)
        entry = self.get(kind, name, where)
        try:
            return entry.factory(**options)
        except (ValueError, TypeError) as exc:
            at = f"{where}: " if where else ""
            raise RecipeError(f"{at}{kind} {name!r} rejected its options: {exc}") from exc


def build_registry(pm) -> Registry:
    """Call every registration hook once and collect the components, with their plugins."""
    registry = Registry()
    infos = getattr(pm, "infos", {})
    for kind, hook_name in HOOKS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order (pluggy calls them LIFO)
            info = infos.get(impl.plugin_name)
            builtin = bool(info is not None and info.builtin)

            def register(name, factory, description=None, _kind=kind, _by=impl.plugin_name,
                         _builtin=builtin):  # fmt: skip
                registry.add(Entry(_kind, name, factory, _by, description or _doc(factory),
                                   _builtin))  # fmt: skip

            kwargs = {"register": register}
            try:
                impl.function(**{a: kwargs[a] for a in impl.argnames if a in kwargs})
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed in {hook_name}: {exc}"
                ) from exc
    return registry


def _doc(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def get_registry(pm=None) -> Registry:
    """The registry of ``pm`` (default: the process-wide plugin manager), built once.

    The registry is cached on the manager and dropped whenever a plugin is (un)registered.
    """
    from prunekit.plugins import get_plugin_manager

    pm = pm or get_plugin_manager()
    registry = getattr(pm, "_prunekit_registry", None)
    if registry is None:
        registry = build_registry(pm)
        pm._prunekit_registry = registry
    return registry


# --------------------------------------------------------------------------------------------
# Model adapters: which one serves a model
# --------------------------------------------------------------------------------------------


def adapter_order(registry: Registry) -> list[Entry]:
    """The order in which adapters are asked whether they support a model.

    Adapters of installed third-party plugins come first, then the built-in ones; each part by
    plugin name, then in registration order. An installed adapter can take over an
    architecture from a built-in one, and the order never depends on load timing.
    """
    # sorted by plugin name (stable: registration order within a plugin), so the order never
    # depends on the order plugins happened to load in
    entries = sorted(registry.entries("adapter"), key=lambda e: e.plugin)
    return [*(e for e in entries if not e.builtin), *(e for e in entries if e.builtin)]


def supported_architectures(registry: Registry) -> str:
    """``name (model types), ...`` of every registered adapter, for error messages."""
    parts = []
    for e in adapter_order(registry):
        types = ", ".join(getattr(e.factory, "model_types", ()) or ())
        parts.append(f"{e.name} ({types})" if types else e.name)
    return "; ".join(parts) or "(none)"


def adapter_class_for(config: Any, registry: Registry | None = None, name: str | None = None):
    """The adapter class serving a model with this Hugging Face ``config``.

    :param name: an adapter name chosen explicitly (recipe ``model.adapter``): used as is.
    :raises ModelError: when no adapter supports the config (the message lists the adapters
        and the model types they serve).
    """
    from prunekit.errors import ModelError

    registry = registry or get_registry()
    if name:
        if ("adapter", name) not in registry:
            available = registry.names("adapter")
            raise ModelError(f"unknown adapter {name!r}{did_you_mean(name, available)}; "
                             f"registered adapters: {', '.join(available) or '(none)'}")  # fmt: skip
        return registry.get("adapter", name).factory
    for entry in adapter_order(registry):
        try:
            supported = entry.factory.supports(config)
        except Exception as exc:  # a plugin's supports() must not break every model
            raise PluginError(
                f"adapter {entry.name!r} of plugin {entry.plugin!r} failed in supports() on "
                f"model type {getattr(config, 'model_type', None)!r}: {exc!r}; fix or disable "
                f"the plugin (PRUNEKIT_DISABLE_PLUGINS={entry.plugin})"
            ) from exc
        if supported:
            return entry.factory
    model_type = getattr(config, "model_type", None) or type(config).__name__
    raise ModelError(
        f"no model adapter supports model type {model_type!r}; supported: "
        f"{supported_architectures(registry)}. Install a plugin that registers one "
        f"(prunekit_register_adapters), or see docs/plugins.md to write it."
    )


def resolve_adapter(model, registry: Registry | None = None, name: str | None = None):
    """The adapter (an instance) for a loaded model: see :func:`adapter_class_for`."""
    config = getattr(model, "config", None)
    return adapter_class_for(config, registry, name)(model)
