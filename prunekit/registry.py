"""Named components, filled by the registration hooks and resolved once per run.

Each entry records the plugin that registered it. Two components of the same kind and name are
an error that names both plugins (no silent renaming).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prunekit.components import (
    KINDS,
    Allocator,
    CalibrationStatistic,
    Compensator,
    Executor,
    ImportanceMetric,
)
from prunekit.errors import PluginError, RecipeError, did_you_mean

#: engine component kind -> its dedicated registration hook
HOOKS: dict[str, str] = {
    "adapter": "prunekit_register_adapters",
    "statistic": "prunekit_register_statistics",
    "metric": "prunekit_register_metrics",
    "allocator": "prunekit_register_allocators",
    "compensator": "prunekit_register_compensators",
    "method": "prunekit_register_methods",
    "executor": "prunekit_register_executors",
    "corpus": "prunekit_register_corpora",
    "task": "prunekit_register_tasks",
}
assert set(HOOKS) == set(KINDS)
#: fixed keys of a recipe's ``method`` section (in the order messages list them), which no
#: declared kind may take
RESERVED_METHOD_KEYS: tuple[str, ...] = (
    "name",
    "ratio",
    "target",
    "skip_layers",
    "round_to",
    "state",
    "then",
)


@dataclass(frozen=True)
class Kind:
    """A component kind: the engine's, or one a plugin declared (``prunekit_register_kinds``)."""

    name: str
    #: what every component of the kind must be an instance of (checked when built)
    protocol: type | None = None
    description: str = ""
    #: the component a method slot of this kind uses when the method leaves it None
    default: str | None = None
    #: a method slot (recipe key ``method.<kind>``); adapters and methods are not
    slot: bool = True
    #: the plugin that declared it (None: the engine)
    plugin: str | None = None

    def as_dict(self) -> dict:
        return {
            "kind": self.name,
            "plugin": self.plugin,
            "slot": self.slot,
            "default": self.default,
            "description": self.description,
            "protocol": None
            if self.protocol is None
            else f"{self.protocol.__module__}.{self.protocol.__qualname__}",
        }


def engine_kinds() -> dict[str, Kind]:
    return {
        "adapter": Kind(
            "adapter", None, "model adapters (one per architecture family)", slot=False
        ),
        "statistic": Kind("statistic", CalibrationStatistic, "calibration statistics"),
        "metric": Kind("metric", ImportanceMetric, "importance metrics"),
        "allocator": Kind("allocator", Allocator, "allocators (scores -> kept sets)"),
        "compensator": Kind("compensator", Compensator, "compensators (output bias)"),
        "method": Kind("method", None, "pruning methods", slot=False),
        "executor": Kind(
            "executor",
            Executor,
            "sweep executors (where prunekit sweep runs its cells)",
            slot=False,
        ),
        "corpus": Kind("corpus", None, "text corpora (recipe dataset: names)", slot=False),
        "task": Kind("task", None, "multiple-choice tasks (evaluation.tasks names)", slot=False),
    }


#: the kinds whose entries are data descriptions (not factories), and the attribute of each
#: that must equal its registered name
DATA_KINDS: dict[str, str] = {"corpus": "id", "task": "name"}


def protocol_members(protocol: type) -> list[str]:
    """The attributes a :func:`typing.runtime_checkable` Protocol requires (public names)."""
    attrs = getattr(protocol, "__protocol_attrs__", None)  # Python >= 3.12
    if attrs is None:
        attrs = set()
        for base in protocol.__mro__:
            if base is object or base.__name__ in ("Protocol", "Generic"):
                continue
            attrs |= set(getattr(base, "__annotations__", {})) | set(vars(base))
    return sorted(a for a in attrs if not a.startswith("_"))


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

        Slot components and executors take recipe options; adapters and methods report none.
        """
        if self.kind in ("adapter", "method", *DATA_KINDS):
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
        self.kinds: dict[str, Kind] = engine_kinds()

    def add_kind(self, kind: Kind) -> None:
        if not isinstance(kind.name, str) or not kind.name.isidentifier():
            raise PluginError(
                f"plugin {kind.plugin!r} declared a kind named {kind.name!r}; a "
                "kind name is an identifier (it becomes the recipe key "
                "method.<kind>)"
            )
        if kind.name in RESERVED_METHOD_KEYS:
            raise PluginError(
                f"plugin {kind.plugin!r} declared a kind named {kind.name!r}, "
                f"which is a fixed recipe key (method.{kind.name}); rename it"
            )
        first = self.kinds.get(kind.name)
        if first is not None:
            by = f"plugin {first.plugin!r}" if first.plugin else "prunekit itself"
            raise PluginError(
                f"kind {kind.name!r} is declared twice: by {by} and by plugin "
                f"{kind.plugin!r}. Rename one of them, or disable a plugin with "
                f"PRUNEKIT_DISABLE_PLUGINS={kind.plugin}."
            )
        if kind.protocol is not None and not isinstance(kind.protocol, type):
            raise PluginError(
                f"plugin {kind.plugin!r} declared kind {kind.name!r} with protocol "
                f"{kind.protocol!r}, which is not a class"
            )
        self.kinds[kind.name] = kind

    def slot_kinds(self) -> list[str]:
        """The kinds a method can expose as slots: the engine's, then declared ones."""
        return [k.name for k in self.kinds.values() if k.slot]

    def add(self, entry: Entry) -> None:
        if entry.kind not in self.kinds:
            raise PluginError(
                f"plugin {entry.plugin!r} registered a component of unknown kind {entry.kind!r}"
                f"{did_you_mean(entry.kind, self.kinds)}; kinds are: {', '.join(self.kinds)} "
                "(a kind a plugin declares exists only while that plugin is installed)"
            )
        if not isinstance(entry.name, str) or not entry.name:
            raise PluginError(f"plugin {entry.plugin!r} registered a {entry.kind} without a name")
        if entry.kind in DATA_KINDS:
            _check_data_entry(entry)
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
        order = list(self.kinds)
        return iter(sorted(self._entries.values(), key=lambda e: (order.index(e.kind), e.name)))

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
        at = f"{where}: " if where else ""
        try:
            component = entry.factory(**options)
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{at}{kind} {name!r} rejected its options: {exc}") from exc
        protocol = self.kinds[kind].protocol
        if protocol is not None and not isinstance(component, protocol):
            missing = [a for a in protocol_members(protocol) if not hasattr(component, a)]
            raise PluginError(
                f"{at}{kind} {name!r} of plugin {entry.plugin!r} is not a {protocol.__name__}"
                + (f" (it lacks {', '.join(missing)})" if missing else "")
                + f"; a {kind} must implement {protocol.__module__}.{protocol.__qualname__}"
            )
        return component


def _check_data_entry(entry: Entry) -> None:
    """A corpus is a :class:`prunekit.data.DatasetInfo`, a task a
    :class:`prunekit.data.tasks.TaskSpec`, each registered under its own name (checked by
    their fields, so that the registry does not import the data modules that read it)."""
    fields = {
        "corpus": ("id", "splits", "default_split", "calibration_split", "join", "calibration"),
        "task": ("name", "title", "split", "file", "hub", "build"),
    }[entry.kind]
    want = "prunekit.data.DatasetInfo" if entry.kind == "corpus" else "prunekit.data.tasks.TaskSpec"
    missing = [f for f in fields if not hasattr(entry.factory, f)]
    if missing:
        raise PluginError(
            f"plugin {entry.plugin!r} registered {entry.kind} {entry.name!r} as a "
            f"{type(entry.factory).__name__}, which lacks {', '.join(missing)}; "
            f"a {entry.kind} is a {want}"
        )
    own = getattr(entry.factory, DATA_KINDS[entry.kind])
    if own != entry.name:
        raise PluginError(
            f"plugin {entry.plugin!r} registered {entry.kind} {entry.name!r}, whose "
            f"{DATA_KINDS[entry.kind]} is {own!r}; register it under {own!r}"
        )


def _call_hook(impl, hook_name: str, register: Callable[..., None]) -> None:
    try:
        impl.function(**{a: register for a in impl.argnames if a == "register"})
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook_name}: {exc}") from exc


def build_registry(pm) -> Registry:
    """Call every registration hook once and collect the kinds and components, with their
    plugins: declared kinds first, then each engine kind's hook, then
    ``prunekit_register_components``; each hook's implementations in registration order."""
    registry = Registry()
    infos = getattr(pm, "infos", {})

    def is_builtin(plugin_name: str) -> bool:
        info = infos.get(plugin_name)
        return bool(info is not None and info.builtin)

    for impl in pm.hook.prunekit_register_kinds.get_hookimpls():

        def declare(kind, protocol=None, description=None, default=None, _by=impl.plugin_name):
            doc = description or (_doc(protocol) if protocol is not None else "")
            registry.add_kind(Kind(kind, protocol, doc, default, True, _by))

        _call_hook(impl, "prunekit_register_kinds", declare)

    for kind, hook_name in HOOKS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order (pluggy calls them LIFO)

            def register(name, factory, description=None, _kind=kind, _by=impl.plugin_name):
                registry.add(
                    Entry(_kind, name, factory, _by, description or _doc(factory), is_builtin(_by))
                )

            _call_hook(impl, hook_name, register)

    for impl in pm.hook.prunekit_register_components.get_hookimpls():

        def register_any(kind, name, factory, description=None, _by=impl.plugin_name):
            registry.add(
                Entry(kind, name, factory, _by, description or _doc(factory), is_builtin(_by))
            )

        # every kind is declared by now: a plugin can register a component of another
        # plugin's kind only when that plugin is installed (``if "probe" in register.kinds``)
        register_any.kinds = frozenset(registry.kinds)
        _call_hook(impl, "prunekit_register_components", register_any)

    _warn_unknown_hooks(pm)
    return registry


def _warn_unknown_hooks(pm) -> None:
    """A ``prunekit_*`` implementation whose hook prunekit does not define is never called:
    say so (strict mode makes it an error at load time)."""
    for name, caller in vars(pm.hook).items():
        if not name.startswith("prunekit_") or getattr(caller, "spec", True) is not None:
            continue
        plugins = sorted({impl.plugin_name for impl in caller.get_hookimpls()})
        if not plugins:
            continue
        hint = ""
        if name.startswith("prunekit_register_"):
            hint = (
                " Components of a kind that a plugin declares (such as the pp plugin's "
                "probe, fusion and history) are registered with "
                "prunekit_register_components(register): register(kind, name, factory)."
            )
        warnings.warn(
            f"plugin(s) {', '.join(map(repr, plugins))} implement {name}, which is "
            f"not a prunekit hook, so it is never called.{hint}",
            RuntimeWarning,
            stacklevel=3,
        )


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
            raise ModelError(
                f"unknown adapter {name!r}{did_you_mean(name, available)}; "
                f"registered adapters: {', '.join(available) or '(none)'}"
            )
        factory = registry.get("adapter", name).factory
        reason = _unsupported(factory, config)
        if reason:
            raise ModelError(f"adapter {name!r} cannot run this model: {reason}")
        return factory
    near = []  # adapters that serve the model type but not this config: (name, reason)
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
        reason = _unsupported(entry.factory, config)
        if reason and getattr(config, "model_type", None) in getattr(
            entry.factory, "model_types", ()
        ):
            near.append((entry.name, reason))
    model_type = getattr(config, "model_type", None) or type(config).__name__
    if near:
        raise ModelError(
            f"model type {model_type!r} is served by "
            + "; ".join(f"adapter {n!r}, but not this model: {r}" for n, r in near)
            + ". Install a plugin whose adapter runs it, or see docs/plugins-tutorial.md."
        )
    raise ModelError(
        f"no model adapter supports model type {model_type!r}; supported: "
        f"{supported_architectures(registry)}. Install a plugin that registers one "
        f"(prunekit_register_adapters), or see docs/plugins-tutorial.md to write it."
    )


def _unsupported(factory, config: Any) -> str | None:
    """``factory.unsupported(config)`` where the adapter defines it (a third-party adapter
    that is not a :class:`~prunekit.components.ModelAdapter` may not)."""
    check = getattr(factory, "unsupported", None)
    return check(config) if check is not None else None


def resolve_adapter(model, registry: Registry | None = None, name: str | None = None):
    """The adapter (an instance) for a loaded model: see :func:`adapter_class_for`."""
    config = getattr(model, "config", None)
    return adapter_class_for(config, registry, name)(model)
