"""The prunekit hook specifications: the public contract for plugin authors.

A plugin is a module (or object) with functions marked ``@prunekit.hookimpl`` whose names are
the hooks below, exposed under the ``prunekit`` entry-point group::

    # pyproject.toml of a third-party package
    [project.entry-points.prunekit]
    my_plugin = "my_package.prunekit_plugin"

Registration hooks follow the register-callback pattern: the engine passes a ``register``
callable and the plugin calls it once per component. Plugins never touch the registry, so
validation, provenance (which plugin registered what) and name collisions are handled in one
place. Every registration hook is called **once**, when the registry is built; no hook is ever
called per batch: components are resolved once per run and the hot loop calls plain objects.

Compatibility: hooks may gain arguments in later versions, never lose or rename them; an
implementation may accept fewer arguments than the spec (pluggy passes only the ones it names).

The component protocols a factory must produce are documented in :mod:`prunekit.components`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    RegisterFn = Callable[..., None]

PROJECT = "prunekit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# --------------------------------------------------------------------------------------------
# Registration hooks: new kinds, any component, and one per kind the engine declares
# --------------------------------------------------------------------------------------------


@hookspec
def prunekit_register_kinds(register: RegisterFn) -> None:
    """Declare component kinds beyond the engine's (adapter, statistic, metric, allocator,
    compensator, method), e.g. the ``pp`` plugin's ``probe``, ``fusion`` and ``history``.

    :param register: call ``register(kind, protocol=None, description=None, default=None)``.
        ``protocol`` is a :func:`typing.runtime_checkable` Protocol class (or any class) that
        every component of the kind must be an instance of: ``validate`` checks it and names
        the component and its plugin when it is not. ``default`` names the component a method
        slot of this kind uses when the method leaves it ``None``. A declared kind is a method
        slot (recipe key ``method.<kind>``). Declaring a kind twice is an error naming both
        plugins.

    Components of a declared kind are registered with :func:`prunekit_register_components`.
    Called once, when the registry is built, before any component is registered.
    """


@hookspec
def prunekit_register_components(register: RegisterFn) -> None:
    """Register components of any kind, the engine's or one a plugin declared.

    :param register: call ``register(kind, name, factory, description=None)``; ``factory``
        is what the kind's dedicated hook would take (``factory(**options)`` for slot kinds,
        the class for adapters and methods). ``register.kinds`` is the set of kinds declared
        (the engine's and every installed plugin's), so a component of another plugin's kind
        can be registered only when that plugin is there::

            if "probe" in register.kinds:  # declared by the pp plugin
                register("probe", "input_norm", InputNormProbe)

    Called once, when the registry is built, after the per-kind hooks below.
    """


@hookspec
def prunekit_register_adapters(register: RegisterFn) -> None:
    """Register model adapters (one class per architecture family).

    :param register: call ``register(name, adapter_class, description=None)``. The class
        implements :class:`prunekit.components.ModelAdapter`; its ``supports(config)``
        classmethod decides from the Hugging Face config alone whether it serves a model, so
        ``validate`` resolves the adapter before any weight loads.

    Resolution is deterministic: adapters of third-party plugins are asked first, then the
    built-in ones, each part by plugin name, then in registration order; the first whose
    ``supports`` is true serves the model, so an installed adapter can take over an
    architecture from a built-in one. A recipe can name one explicitly (``model.adapter``). When none supports the
    model, ``validate`` fails with the list of adapters and the model types they serve.

    Called once, when the registry is built.
    """


@hookspec
def prunekit_register_statistics(register: RegisterFn) -> None:
    """Register calibration statistics.

    :param register: call ``register(name, factory, description=None)``; ``factory(**options)``
        returns a :class:`prunekit.components.CalibrationStatistic`.

    Called once, when the registry is built.
    """


@hookspec
def prunekit_register_metrics(register: RegisterFn) -> None:
    """Register importance metrics (scores for attention heads and MLP channels).

    :param register: call ``register(name, factory, description=None)``; ``factory(**options)``
        returns a :class:`prunekit.components.ImportanceMetric`.

    Called once, when the registry is built.
    """


@hookspec
def prunekit_register_allocators(register: RegisterFn) -> None:
    """Register allocators (scores and a ratio -> kept heads and channels per layer).

    :param register: call ``register(name, factory, description=None)``; ``factory(**options)``
        returns a :class:`prunekit.components.Allocator`.

    Called once, when the registry is built.
    """


@hookspec
def prunekit_register_compensators(register: RegisterFn) -> None:
    """Register compensators (what replaces the output of removed channels, e.g. a bias).

    :param register: call ``register(name, factory, description=None)``; ``factory(**options)``
        returns a :class:`prunekit.components.Compensator`.

    Called once, when the registry is built.
    """


@hookspec
def prunekit_register_methods(register: RegisterFn) -> None:
    """Register pruning methods.

    :param register: call ``register(name, method_class, description=None)``. The class
        subclasses :class:`prunekit.components.Method`: it declares its component slots with
        default component names, and turns a loaded model into a pruned one.

    Called once, when the registry is built.
    """


@hookspec
def prunekit_register_executors(register: RegisterFn) -> None:
    """Register sweep executors: where ``prunekit sweep`` runs its cells (this machine, a
    Slurm cluster through submitit, or any other engine).

    :param register: call ``register(name, factory, description=None)``; ``factory(**options)``
        (the options of the recipe's ``sweep.executor`` section) returns a
        :class:`prunekit.components.Executor`.

    Called once, when the registry is built.
    """


@hookspec
def prunekit_register_corpora(register: RegisterFn) -> None:
    """Register text corpora: what a recipe names with ``dataset:`` in ``calibration``,
    ``evaluation.perplexity`` and ``recovery`` (the built-in ``wikitext2``, ``ptb`` and ``c4``
    are registered this way).

    :param register: call ``register(name, info, description=None)`` with a
        :class:`prunekit.data.DatasetInfo` whose ``id`` is ``name``: its splits (a file
        under a data directory and/or a Hugging Face hub source each), default and
        calibration splits, and how rows are joined.

    Called once, when the registry is built.
    """


@hookspec
def prunekit_register_tasks(register: RegisterFn) -> None:
    """Register multiple-choice tasks: what a recipe names in ``evaluation.tasks`` (the seven
    built-in commonsense tasks are registered this way).

    :param register: call ``register(name, spec, description=None)`` with a
        :class:`prunekit.data.tasks.TaskSpec` whose ``name`` is ``name``: where its split
        lives (a file under a data directory, the hub) and how a record becomes a
        :class:`~prunekit.data.tasks.Question`.

    Called once, when the registry is built.
    """


# --------------------------------------------------------------------------------------------
# Run observers
# --------------------------------------------------------------------------------------------


@hookspec
def prunekit_run_started(recipe: Any, output_dir: str) -> None:
    """Observe the start of a run.

    :param recipe: the validated :class:`prunekit.recipe.Recipe` of the run.
    :param output_dir: the directory the run writes into.

    Called once per ``apply``, after validation and before the model is loaded.
    """


@hookspec
def prunekit_result_ready(result: dict, output_dir: str) -> None:
    """Observe a finished run's results.

    :param result: the content of ``results.json`` (a JSON-serialisable dict).
    :param output_dir: the directory holding ``results.json`` and the other outputs.

    Called once per ``apply``, after every output has been written.
    """
