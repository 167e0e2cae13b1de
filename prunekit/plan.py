"""``validate(recipe) -> Plan``: everything about a run that can be checked before weights load.

The recipe against the registry (the method, its options and component slots), the model's
config (its adapter, depth and context), the data (every corpus and task located, its size
bounded), the recovery section and the output location. A :class:`Plan` is what
:func:`prunekit.runner.run_plan` executes; nothing here loads weights or runs a model.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from prunekit.budgets import BudgetError, cost_model, fmt, macs_seq_len, solve_counts
from prunekit.components import Method, MethodSettings, ModelAdapter
from prunekit.data import eval_windows, locate_calibration_corpus, locate_corpus, sequence_bos
from prunekit.data.reading import check_head, max_tokens
from prunekit.data.tasks import JsonlTask, expand_task_names, locate_task
from prunekit.errors import DataError, ModelError, StateError, did_you_mean
from prunekit.evaluation.zeroshot import AVERAGE_KEY
from prunekit.host import check_host, meta_model
from prunekit.loading import local_checkpoint_problem, peek_config, resolve_device
from prunekit.recipe import LoadedRecipe, Recipe, load_recipe
from prunekit.recovery import check_target_modules
from prunekit.registry import RESERVED_METHOD_KEYS, adapter_class_for, get_registry
from prunekit.views import RunView


@dataclass
class Plan:
    """A validated run: the method class, its components (built once) and the data sources."""

    loaded: LoadedRecipe
    method_cls: type[Method]
    components: dict[str, Any]
    component_info: dict[str, dict]
    settings: MethodSettings
    num_layers: int | None
    #: the adapter serving the model, when its config could be read before loading
    adapter_cls: type[ModelAdapter] | None = None
    calibration_source: Any = None
    perplexity_sources: list = field(default_factory=list)
    #: the recovery corpus (``recovery:``), located at validate
    recovery_source: Any = None
    #: (label, TaskConfig, TaskSource | JsonlTask) per evaluated task, groups expanded
    tasks: list = field(default_factory=list)
    #: the model's context in tokens (:func:`model_context`), None when its config is unknown
    context: int | None = None
    #: what plugins read of the recipe (:class:`~prunekit.views.RunView`)
    run: RunView | None = None
    #: lm-eval's task index for ``evaluation.lm_eval`` (built at validate, reused to evaluate)
    lm_eval_manager: Any = None
    #: the host-dependent checks not made because the run happens elsewhere (``here=False``)
    elsewhere: list[str] = field(default_factory=list)
    #: the plan of ``method.then``: the method applied to this one's result
    then: Plan | None = None
    #: the fraction of the dense decoder MACs the model this plan prunes keeps (below 1 for a
    #: ``method.then`` stage, set when it runs): its ``macs`` target counts against the dense
    #: model (:class:`~prunekit.budgets.CostModel`'s ``macs_scale``)
    macs_scale: float = 1.0

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe


def _requirement(req: str | tuple[str, ...]) -> tuple[str, ...]:
    return (req,) if isinstance(req, str) else tuple(req)


#: the ``key.path`` a problem string starts with (``method.start``, ``recovery.target_modules``)
_KEY_PATH = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*")


def problem_error(loaded, problem: str):
    """The error for a method's ``"key.path: message"`` problem string, located at that key;
    a problem that names no key (a third-party method may write one) is located at
    ``method`` with its whole text, never cut at its first colon."""
    key, sep, message = problem.partition(": ")
    if not sep or not message.strip() or not _KEY_PATH.fullmatch(key):
        key, message = "method", problem
    return loaded.error(key, message)


def unmet_needs(
    method_cls: type[Method],
    method_entry,
    components: dict[str, Any],
    info: dict[str, dict],
    registry,
) -> str | None:
    """The first requirement (``needs``) of the method or a slot component that nothing in
    the run provides (``provides`` of the method and its statistic), as ``"key.path:
    message"``; None when all are met or a provider declares nothing (then nothing is
    known)."""
    statistic = components.get("statistic")
    provided = set(method_cls.provides)
    if statistic is not None:
        stat_provides = getattr(statistic, "provides", None)
        if stat_provides is None:
            return None
        provided |= set(stat_provides)
    stat_desc = (
        f"method.statistic {info['statistic']['name']!r} (plugin "
        f"{info['statistic']['plugin']!r}) provides "
        f"{', '.join(getattr(statistic, 'provides', ())) or 'nothing'}; "
        if statistic is not None
        else "the method has no statistic slot; "
    )
    method_desc = (
        f"method {method_cls.name!r} (plugin {method_entry.plugin!r}) provides "
        f"{', '.join(method_cls.provides) or 'nothing'}"
    )
    method_key = "method.statistic" if "statistic" in method_cls.slots else "method.name"
    needers = [
        (
            method_key,
            f"method {method_cls.name!r} (plugin {method_entry.plugin!r})",
            method_cls.needs,
        )
    ]
    for slot, component in components.items():
        needs = getattr(component, "needs", ())
        if needs:
            needers.append(
                (
                    f"method.{slot}",
                    f"{slot} {info[slot]['name']!r} (plugin {info[slot]['plugin']!r})",
                    needs,
                )
            )
    for key, who, needs in needers:
        for req in needs:
            alternatives = _requirement(req)
            if provided.intersection(alternatives):
                continue
            wanted = " or ".join(repr(a) for a in alternatives)
            candidates = sorted(
                e.name
                for e in registry.entries("statistic")
                if set(getattr(e.factory, "provides", ()) or ()).intersection(alternatives)
            )
            fix = (
                f"choose a statistic that provides it ({', '.join(candidates)})"
                if candidates and "statistic" in method_cls.slots
                else "choose another component for this slot, or a method that provides it"
            )
            return (
                f"{key}: {who} needs {wanted}, which this run does not provide: "
                f"{stat_desc}{method_desc}. {fix[0].upper()}{fix[1:]}."
            )
    return None


def _model_adapter(
    loaded: LoadedRecipe, registry, model=None
) -> tuple[type | None, int | None, Any]:
    """(adapter class, decoder layer count, config) of the recipe's model, without loading
    weights; ``(None, None, None)`` for a hub model whose config is not cached (not checked
    offline)."""
    m = loaded.recipe.model
    try:
        config = model.config if model is not None else peek_config(m.id)
    except ModelError as exc:
        raise loaded.error(("model", "id"), str(exc)) from None
    if config is None and not m.adapter:
        return None, None, None
    try:
        adapter_cls = adapter_class_for(config, registry, m.adapter)
    except ModelError as exc:
        raise loaded.error(("model", "adapter" if m.adapter else "id"), str(exc)) from None
    if model is not None:
        return adapter_cls, adapter_cls(model).num_layers, config
    # a supported architecture, but is the directory complete? (after the adapter: an
    # unsupported model is the first thing to hear about)
    problem = local_checkpoint_problem(m.id)
    if problem:
        raise loaded.error(("model", "id"), problem)
    layers = getattr(config, "num_hidden_layers", None)
    return adapter_cls, int(layers) if layers is not None else None, config


def model_context(config) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings``, transformers' name
    for it on every architecture, of the text model for a composite config); None when the
    config states none."""
    if config is None:
        return None
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        config = config.get_text_config()
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _check_context(loaded: LoadedRecipe, method_cls: type[Method], context: int | None) -> None:
    """Every window the run feeds the model fits its context: past it, learned positions
    (OPT) fail with an IndexError in the middle of calibration and rotary ones silently
    leave the lengths the model was trained on, so both are refused here, before weights
    load."""
    if context is None:
        return
    r = loaded.recipe
    lengths: list[tuple[tuple, int]] = []
    if method_cls.uses_calibration:
        lengths.append((("calibration", "seq_len"), r.calibration.seq_len))
    lengths += [
        (("evaluation", "perplexity", i, "seq_len"), p.seq_len)
        for i, p in enumerate(r.evaluation.perplexity)
    ]
    lengths += [
        (("evaluation", "tasks", i, "max_length"), t.max_length)
        for i, t in enumerate(r.evaluation.tasks)
    ]
    if r.recovery is not None:
        lengths.append((("recovery", "seq_len"), r.recovery.seq_len))
    for key, n in lengths:
        if n > context:
            raise loaded.error(
                key,
                f"{n} tokens is longer than the model's context "
                f"({context} positions, max_position_embeddings of "
                f"{r.model.id}); use at most {context}",
            )


def validate(
    loaded: LoadedRecipe | str | os.PathLike | dict,
    overrides=(),
    registry=None,
    check_files: bool = True,
    model=None,
    check_output: bool = True,
    here: bool = True,
) -> Plan:
    """Check a recipe against the registry, the method, the model, the data files and the
    output location.

    :param model: an already loaded model (``prunekit.prune``): its depth is used and
        ``model.id`` is not looked up.
    :param check_output: check that ``output.dir`` can be written (off for ``prunekit.prune``,
        which writes nothing).
    :param here: the run happens on this machine (``apply``, ``bench``, ``generate``, a sweep
        cell): what depends on the host (its devices) is checked too. False (``prunekit
        validate``, a sweep submitted to other machines): those checks are not made, and
        :attr:`Plan.elsewhere` says which, to be made first where the run happens.
    """
    if not isinstance(loaded, LoadedRecipe):
        loaded = load_recipe(loaded, overrides)
    recipe = loaded.recipe
    registry = registry or get_registry()
    entry = registry.get("method", recipe.method.name, where=loaded.where(("method", "name")))
    method_cls: type[Method] = entry.factory
    if (
        method_cls.default_skip_layers is not None
        and "skip_layers" not in recipe.method.model_fields_set
    ):
        recipe.method.skip_layers = list(method_cls.default_skip_layers)
    settings = _method_settings(loaded, registry, method_cls)
    components, component_info = _components(loaded, registry, entry, method_cls)
    run = RunView.of(recipe, registry.slot_kinds())

    # the device (one this machine has), the model (its adapter, from its config), and what
    # depends on its depth
    elsewhere: list[str] = []
    device = None
    if model is None:
        try:
            device = resolve_device(recipe.model.device)
        except ModelError as exc:
            if here:
                raise loaded.error(("model", "device"), str(exc)) from None
            elsewhere.append(
                f"model.device {recipe.model.device!r}: not on this machine ({exc}); it is "
                "checked where the recipe runs (apply, bench, generate and every sweep cell "
                "check it first, before any weight loads)"
            )
    adapter_cls, num_layers, config = _model_adapter(loaded, registry, model)
    if model is None and here and device is not None:
        problems, notes = check_host(recipe, config, device)
        if problems:
            raise loaded.error(*problems[0])
        for note in notes:
            warnings.warn(f"model.id: {note}", stacklevel=2)
    elif model is None and not here:
        elsewhere.append(
            "memory for the weights and free disk for output.save_model: checked where the "
            "recipe runs, before any weight loads"
        )
    context = model_context(config)
    _check_context(loaded, method_cls, context)
    _check_depth(loaded, method_cls, num_layers, run)
    for problem in [
        *method_cls.check_recipe(run, num_layers),
        *method_cls.check_components(components),
    ]:
        raise problem_error(loaded, problem)

    if method_cls.removes_layers and adapter_cls is not None and not adapter_cls.removes_layers:
        raise loaded.error(
            ("method", "name"),
            f"method {recipe.method.name!r} removes whole decoder layers, and adapter "
            f"{adapter_cls.name!r} cannot (it does not declare ModelAdapter.removes_layers); "
            "use a width method (heads and channels) with this architecture",
        )
    missing = (
        [g for g in method_cls.drops_sublayers if g not in adapter_cls.sublayers]
        if (adapter_cls is not None)
        else []
    )
    if missing:
        raise loaded.error(
            ("method", "name"),
            f"method {recipe.method.name!r} drops whole "
            f"{'/'.join({'attn': 'attention', 'mlp': 'MLP'}.get(g, g) for g in missing)} "
            "sublayers, and "
            f"adapter {adapter_cls.name!r} cannot (its ModelAdapter.sublayers is "
            f"{list(adapter_cls.sublayers)}); use a width or depth method with this architecture",
        )
    _check_target(loaded, entry, method_cls, components, settings, adapter_cls, config, model)
    _check_timing(loaded)
    if recipe.data_dir and not Path(recipe.data_dir).is_dir():
        raise loaded.error(("data_dir",), f"directory {recipe.data_dir!r} does not exist")
    plan = Plan(
        loaded,
        method_cls,
        components,
        component_info,
        settings,
        num_layers,
        adapter_cls,
        context=context,
        run=run,
        elsewhere=elsewhere,
    )
    if check_files:
        _locate_data(loaded, plan)
    if recipe.recovery is not None:
        _check_recovery(loaded, plan, check_files, device if here and model is None else None)
    if check_output:  # the output location is checked from here too (a login node shares it)
        problem = output_problem(recipe.output_dir())
        if problem:
            raise loaded.error(("output", "dir"), problem)
    if recipe.method.then is not None:
        plan.then = _then_plan(loaded, method_cls, registry, check_files, model, here)
    return plan


@dataclass
class StageRecipe(LoadedRecipe):
    """The recipe of a ``method.then`` stage: the run's recipe with ``method`` replaced by the
    stage's; messages about its ``method.*`` keys point at ``method.then.*``."""

    prefix: tuple = ("method", "then")

    def where(self, key_path: tuple | str) -> str:
        if isinstance(key_path, str):
            key_path = tuple(int(p) if p.isdigit() else p for p in key_path.split("."))
        if key_path and key_path[0] == "method":
            key_path = (*self.prefix, *key_path[1:])
        return super().where(key_path)


def _then_plan(loaded: LoadedRecipe, method_cls, registry, check_files, model, here) -> Plan:
    """Validate ``method.then`` as a recipe of its own: the run's data, model and evaluation
    windows (its ``target`` counts MACs at the same length), no recovery, no tasks."""
    recipe = loaded.recipe
    where = ("method", "then")
    if method_cls.dynamic:
        raise loaded.error(
            where,
            f"method {recipe.method.name!r} is dynamic: it decides per batch and leaves no "
            "smaller model for another method to prune; put the dynamic method in "
            "method.then, after a static one",
        )
    sub = recipe.model_copy(deep=True)
    sub.method = recipe.method.then.model_copy(deep=True)
    sub.recovery = None
    sub.evaluation.tasks = []
    sub.evaluation.lm_eval = None
    prefix = (*loaded.prefix, "then") if isinstance(loaded, StageRecipe) else where
    stage = StageRecipe(
        recipe=sub,
        path=loaded.path,
        lines=loaded.lines,
        overrides=loaded.overrides,
        raw=loaded.raw,
        prefix=prefix,
    )
    then = validate(
        stage, registry=registry, check_files=check_files, model=model, check_output=False,
        here=here,
    )  # fmt: skip
    if then.method_cls.dynamic and recipe.output.save_model:
        # a dynamic method saves its state for the dense model it wraps, not the smaller
        # model the stages before it made: what was saved would not reload as this run
        raise stage.error(
            ("method", "name"),
            f"method {then.recipe.method.name!r} is dynamic and follows a static method: its "
            "saved state would not describe the smaller model it runs on; set "
            "output.save_model: false (evaluation and timing still run)",
        )
    return then


def _method_settings(loaded: LoadedRecipe, registry, method_cls: type[Method]) -> MethodSettings:
    """The method's settings: its own options (declared in ``option_defaults``; an unknown key
    is refused with the keys it takes) over their defaults."""
    m = loaded.recipe.method
    slot_kinds = registry.slot_kinds()
    allowed_options = dict(method_cls.option_defaults)
    method_options = {k: v for k, v in m.options.items() if k not in slot_kinds}
    for key in method_options:
        if key not in allowed_options:
            candidates = [*RESERVED_METHOD_KEYS, *method_cls.slots, *allowed_options]
            raise loaded.error(
                ("method", key),
                f"unknown key {key!r} for method {m.name!r}{did_you_mean(key, candidates)};"
                f" allowed keys: {', '.join(candidates)}",
            )
    return MethodSettings(
        name=m.name,
        ratio=m.ratio,
        skip_layers=list(m.skip_layers),
        round_to=m.round_to,
        options={**allowed_options, **method_options},
    )


def _components(
    loaded: LoadedRecipe, registry, entry, method_cls: type[Method]
) -> tuple[dict[str, Any], dict[str, dict]]:
    """The method's slot components, built once (the recipe's or the slot's default), and
    what each is (name, plugin, options); every requirement (``needs``) met."""
    m = loaded.recipe.method
    slot_kinds = registry.slot_kinds()
    for slot in method_cls.slots:
        if slot not in slot_kinds:
            raise loaded.error(
                ("method", "name"),
                f"method {m.name!r} (plugin {entry.plugin!r}) has a slot {slot!r}, "
                f"but no installed plugin declares that component kind; kinds: "
                f"{', '.join(slot_kinds)}",
            )
    components: dict[str, Any] = {}
    component_info: dict[str, dict] = {}
    for slot in slot_kinds:
        try:
            cfg = m.slot(slot)
        except ValueError as exc:
            raise loaded.error(("method", slot), str(exc)) from None
        if cfg is not None and slot not in method_cls.slots:
            raise loaded.error(
                ("method", slot),
                f"method {m.name!r} has no slot {slot!r}; its slots: "
                f"{', '.join(method_cls.slots) or '(none)'}",
            )
        if slot not in method_cls.slots:
            continue
        default = method_cls.slots[slot] or registry.kinds[slot].default
        name = cfg.name if cfg is not None and cfg.name else default
        if name is None:
            raise loaded.error(
                ("method", slot),
                f"method {m.name!r} leaves slot {slot!r} to the kind's default, "
                f"and kind {slot!r} declares none; name one with "
                f"method.{slot}.name (registered: "
                f"{', '.join(registry.names(slot)) or '(none)'})",
            )
        options = {
            **(method_cls.slot_options.get(slot, {}) if name == default else {}),
            **(cfg.options if cfg is not None else {}),
        }
        where = loaded.where(("method", slot) if cfg is not None else ("method", "name"))
        components[slot] = registry.create(slot, name, options, where=where)
        comp_entry = registry.get(slot, name)
        component_info[slot] = {"name": name, "plugin": comp_entry.plugin, "options": options}
    problem = unmet_needs(method_cls, entry, components, component_info, registry)
    if problem:
        raise problem_error(loaded, problem)
    return components, component_info


def _check_depth(
    loaded: LoadedRecipe, method_cls: type[Method], num_layers: int | None, run: RunView
) -> None:
    """``skip_layers`` name layers the model has, and leave some ratio below 1 to prune."""
    m = loaded.recipe.method
    if num_layers is None:
        return
    bad = [i for i in m.skip_layers if i >= num_layers]
    if bad:
        raise loaded.error(
            ("method", "skip_layers"),
            f"layers {bad} do not exist: the model has {num_layers} layers (0..{num_layers - 1})",
        )
    if m.ratio <= 0:
        return
    try:
        r = method_cls.layer_ratio(run, num_layers)
    except ValueError:
        raise loaded.error(
            ("method", "skip_layers"), "every layer is skipped, so nothing can be pruned"
        ) from None
    if r >= 1:
        raise loaded.error(
            ("method", "ratio"),
            f"ratio {m.ratio} becomes {r} per pruned layer once the "
            f"{len(m.skip_layers)} skipped layers are compensated "
            f"(L/(L-skipped)·r with L={num_layers}); lower the ratio or "
            f"skip fewer layers",
        )


def _check_target(
    loaded: LoadedRecipe, entry, method_cls, components, settings, adapter_cls, config, model=None
) -> None:
    """``method.target`` needs an allocator to turn it into kept units, and must be reachable:
    below the dense cost, and no lower than the most the method can prune with these skipped
    layers. Checked on the model built on the meta device from its config (no weights); a
    model whose config is not at hand here is checked when the run starts."""
    recipe = loaded.recipe
    target = recipe.method.target
    if target is None:
        return
    where = ("method", "target")
    allocator = components.get("allocator")
    if allocator is None and not method_cls.solves_target:
        raise loaded.error(
            where,
            f"method {recipe.method.name!r} (plugin {entry.plugin!r}) has no allocator slot, "
            "so nothing turns a target into kept units; use method.ratio, or a method that "
            "prunes heads and channels (prunekit components method)",
        )
    if model is None and adapter_cls is not None and config is not None:
        model = meta_model(config)
    if model is None or adapter_cls is None:
        return
    costs = cost_model(adapter_cls(model), model, macs_seq_len(recipe), recipe.model.dtype)
    ((kind, value),) = target.items()
    dense = costs.costs()[kind]
    if value > dense:
        raise loaded.error(
            where,
            f"{kind} {fmt(kind, value)} is above the dense model's {fmt(kind, dense)}: a "
            "target asks for less than the dense model; remove it to keep the model whole",
        )
    if isinstance(loaded, StageRecipe):
        # a method.then stage prunes what the stages before it left, unknown before they run:
        # whether its target can be met is told when it runs
        return
    if method_cls.solves_target:
        problem = method_cls.check_target(costs, settings, kind, value)
        if problem:
            raise loaded.error(where, problem)
    elif hasattr(allocator, "counts"):
        try:
            solve_counts(allocator, costs, settings, kind, value)
        except BudgetError as exc:
            raise loaded.error(where, str(exc)) from None


def _locate_data(loaded: LoadedRecipe, plan: Plan) -> None:
    """Every corpus, task and saved state the run reads, located and bounded in size (into
    ``plan``)."""
    recipe, m = loaded.recipe, loaded.recipe.method
    data_dir = recipe.data_dir
    c = recipe.calibration
    if plan.method_cls.uses_calibration:
        key = ("calibration", "path" if c.path else "dataset")
        try:
            plan.calibration_source = locate_calibration_corpus(
                c.dataset, c.split, c.path, c.text_field, data_dir=data_dir
            )
        except DataError as exc:
            raise loaded.error(key, str(exc)) from None
        _check_text_amount(loaded, plan.calibration_source, c.seq_len, None, key)
        _check_repetition(loaded, plan.calibration_source, c.samples, c.seq_len,
                          ("calibration", "samples"))  # fmt: skip
    labels: dict[str, int] = {}
    for i, p in enumerate(recipe.evaluation.perplexity):
        if p.label in labels:
            raise loaded.error(
                ("evaluation", "perplexity", i),
                f"entry {i} has the same label {p.label!r} as entry "
                f"{labels[p.label]}: their metrics would overwrite each other; "
                "evaluate each dataset/split once",
            )
        labels[p.label] = i
        key = ("evaluation", "perplexity", i, "path" if p.path else "dataset")
        try:
            source = locate_corpus(p.dataset, p.split, p.path, p.text_field, data_dir=data_dir)
        except DataError as exc:
            raise loaded.error(key, str(exc)) from None
        plan.perplexity_sources.append(source)
        _check_text_amount(
            loaded, source, p.seq_len, None if p.windows == "all" else p.windows, key
        )
    plan.tasks = _resolve_tasks(loaded, labels)
    if recipe.evaluation.lm_eval is not None:
        plan.lm_eval_manager = _check_lm_eval(loaded, {*labels, *(t[0] for t in plan.tasks)})
    if m.state.load and not Path(m.state.load).exists():
        raise loaded.error(
            ("method", "state", "load"),
            f"saved state {m.state.load!r} not found: give the directory "
            f"written by a run with output.save_model: true",
        )
    if m.state.load:
        try:
            plan.method_cls.check_state(m.state.load, plan.run)
        except StateError as exc:
            raise loaded.error(("method", "state", "load"), str(exc)) from None


def _check_lm_eval(loaded: LoadedRecipe, taken: set[str]):
    """``evaluation.lm_eval``: lm-eval installed, the include path a directory, every task
    name known to lm-eval's index (returned, so the run does not index again)."""
    cfg = loaded.recipe.evaluation.lm_eval
    where = ("evaluation", "lm_eval")
    if find_spec("lm_eval") is None:
        raise loaded.error(
            where,
            "lm-eval tasks need EleutherAI's lm-evaluation-harness, "
            "which is not installed: pip install 'prunekit[lm-eval]'",
        )
    if cfg.include_path is not None and not Path(cfg.include_path).expanduser().is_dir():
        raise loaded.error(
            (*where, "include_path"),
            f"{cfg.include_path!r} is not a directory of lm-eval task configs "
            f"(relative paths are taken from {os.getcwd()!r})",
        )
    if cfg.include_path is None and not cfg.include_defaults:
        raise loaded.error(
            (*where, "include_defaults"),
            "include_defaults: false leaves no task to run without an include_path",
        )
    from prunekit.evaluation.lm_eval import task_manager  # optional dependency

    include = None if cfg.include_path is None else Path(cfg.include_path).expanduser()
    manager = task_manager(include, cfg.include_defaults)
    known = set(manager.all_tasks)
    for i, name in enumerate(cfg.tasks):
        if name not in known:
            looked = ["lm-eval's tasks"] if cfg.include_defaults else []
            looked += [f"the configs under {str(include)!r}"] if include else []
            where_found = " and ".join(looked)
            raise loaded.error(
                (*where, "tasks", i),
                f"lm-eval knows no task {name!r}{did_you_mean(name, known)} "
                f"(looked in {where_found}); `python -m lm_eval ls tasks` lists "
                "them",
            )
        if f"lm_eval:{name}" in taken:
            raise loaded.error((*where, "tasks", i), f"task {name!r} is listed twice")
        taken.add(f"lm_eval:{name}")
    return manager


def _check_recovery(
    loaded: LoadedRecipe, plan: Plan, check_files: bool, device: torch.device | None = None
) -> None:
    """``recovery:``: a static method, peft installed, a corpus that is no evaluated text and
    holds one window, a checkpoint directory that can be one, distillation settings that can
    run (``device``: the run's, when it runs on this machine: the teacher's memory)."""
    recipe, r = loaded.recipe, loaded.recipe.recovery
    if plan.method_cls.dynamic:
        raise loaded.error(
            ("recovery",),
            f"recovery fine-tunes the pruned weights of a static "
            f"method; {recipe.method.name!r} is dynamic (its kept sets change per "
            "batch): remove the recovery section or use a static method",
        )
    if find_spec("peft") is None:
        raise loaded.error(
            ("recovery",),
            "recovery needs peft, which is not installed: pip install 'prunekit[recovery]'",
        )
    if r.checkpoint_dir and Path(r.checkpoint_dir).exists() and not Path(r.checkpoint_dir).is_dir():
        raise loaded.error(
            ("recovery", "checkpoint_dir"), f"{r.checkpoint_dir!r} exists and is not a directory"
        )
    problem = check_target_modules(recipe.model.id, r.target_modules)
    if problem:
        raise loaded.error(("recovery", "target_modules"), problem)
    from prunekit.recovery import check_distillation

    problem = check_distillation(recipe, device)  # loss, kd: vocabulary, the teacher's memory
    if problem:
        raise loaded.error(*problem)
    if not check_files:
        return
    key = ("recovery", "path" if r.path else "dataset")
    try:
        plan.recovery_source = locate_calibration_corpus(
            r.dataset, r.split, r.path, r.text_field, data_dir=recipe.data_dir
        )
    except DataError as exc:
        raise loaded.error(key, str(exc)) from None
    source = plan.recovery_source
    # the carve-out, where it can be seen from the sources: the same text (file and split) as
    # an evaluated one is refused here; the runner also drops every training window that
    # shares a run of tokens with an evaluated text (prunekit.recovery.carve_out)
    for i, (cfg, other) in enumerate(
        zip(recipe.evaluation.perplexity, plan.perplexity_sources, strict=False)
    ):
        if (other.location, other.split) == (source.location, source.split):
            raise loaded.error(
                key,
                f"the recovery text {source.describe()} is the text "
                f"evaluation.perplexity[{i}] ({cfg.label}) measures: recovery "
                "would train on the evaluation text; train on another split or "
                "file (e.g. recovery.dataset: c4, whose calibration split holds "
                "other documents than its validation split)",
            )
    for i, task in enumerate(recipe.evaluation.tasks):
        if (
            task.path
            and source.kind == "file"
            and Path(task.path).resolve() == Path(source.location)
        ):
            raise loaded.error(
                key,
                f"the recovery text is the file of evaluation.tasks[{i}] "
                f"({task.name}): recovery would train on evaluation questions; "
                "train on another file",
            )
    _check_text_amount(loaded, source, r.seq_len, None, key)
    _check_repetition(loaded, source, r.samples, r.seq_len, ("recovery", "samples"))


#: validate refuses windows drawn with replacement whose text could be at most this share
#: distinct, even counted with the most generous tokenizer (one token per byte, twice over):
#: the real share is then some 10 times lower, and more windows only repeat the same text
MIN_DISTINCT_BOUND = 0.5


def _check_repetition(loaded: LoadedRecipe, source, samples: int, seq_len: int,
                      key: tuple) -> None:  # fmt: skip
    """Refuse ``samples`` windows drawn with replacement (calibration, recovery) that ask for
    vastly more text than the corpus holds, from file sizes alone; the run warns for the
    milder cases once it has counted the tokens."""
    bound = max_tokens(source)
    if bound is None or samples * seq_len * MIN_DISTINCT_BOUND <= bound:
        return
    most = max(1, int(bound / (seq_len * MIN_DISTINCT_BOUND)))
    raise loaded.error(
        key,
        f"{samples} windows of {seq_len} tokens ask for {samples * seq_len:,} tokens, but "
        f"{source.describe()} holds at most {bound:,} with any tokenizer (about a tenth of that "
        f"with a real one): the windows, drawn with replacement, would repeat the same text "
        f"over and over; ask for at most {most} samples, or use a larger corpus",
    )


def _check_timing(loaded: LoadedRecipe) -> None:
    """``runtime.batches``, when the recipe sets it, no more than the first perplexity entry
    has (they are its first batches): more would time fewer batches than asked, without a
    word."""
    r = loaded.recipe
    if "batches" not in r.runtime.model_fields_set:  # the default times what there is
        return
    if not (r.runtime.batches and r.evaluation.perplexity):
        return
    p = r.evaluation.perplexity[0]
    if p.windows == "all":
        return  # counted once the text is tokenized
    available = -(-p.windows // p.batch_size)
    if r.runtime.batches > available:
        raise loaded.error(
            ("runtime", "batches"),
            f"{r.runtime.batches} timed batches, but evaluation.perplexity[0] has only "
            f"{available} ({p.windows} windows in batches of {p.batch_size}); time at most "
            f"{available}, or evaluate more windows",
        )


def _check_text_amount(
    loaded: LoadedRecipe, source, seq_len: int, windows: int | None, key: tuple
) -> None:
    """Refuse, before any weight loads, a corpus that cannot hold what the recipe asks of it
    (empty, shorter than one window, or fewer tokens than ``windows`` x ``seq_len`` with any
    tokenizer). The exact count needs the tokenizer and is checked when the windows are cut."""
    try:
        check_head(source)
    except DataError as exc:
        raise loaded.error(key, str(exc)) from None
    bound = max_tokens(source)
    if bound is None:
        return
    where = source.describe()
    if bound <= 1:
        raise loaded.error(key, f"{where} is empty; give a file with text in it")
    if bound < seq_len:
        raise loaded.error(
            key,
            f"{where} holds at most {bound} tokens with any tokenizer, "
            f"fewer than one window of seq_len={seq_len}; use a larger file "
            "or a smaller seq_len",
        )
    if windows is not None and bound < windows * seq_len:
        raise loaded.error(
            key[:-1] + ("windows",),
            f"{windows} windows of {seq_len} tokens need {windows * seq_len} "
            f"tokens, but {where} holds at most {bound} with any tokenizer; ask "
            f"for fewer windows (at most {bound // seq_len}), windows: all, or a "
            "smaller seq_len",
        )


def output_problem(out: Path) -> str | None:
    """Why a run could not write its outputs into ``out`` (None when it can): checked before
    any weight loads, so that a bad location fails in a second, not after the run."""
    if out.exists() and not out.is_dir():
        return (
            f"{str(out)!r} is an existing file, not a directory; give a directory "
            "(created if missing; a finished run's outputs in it are replaced)"
        )
    # the run stages its outputs beside out (in out's parent) and renames them into place:
    # the nearest existing ancestor of that parent is where anything is first created
    parent = out.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        return (
            f"{str(out)!r} cannot be created: {str(parent)!r} is a file; choose another directory"
        )
    # permission bits do not tell (read-only mounts, ACLs, root squash, full disks): create
    # and remove a probe entry where the run would create its first one
    try:
        probe = tempfile.mkdtemp(prefix=".prunekit-probe-", dir=parent)
    except OSError as exc:
        return (
            f"{str(out)!r} cannot be written: {str(parent)!r} is not writable "
            f"({exc.strerror or exc}); choose another directory"
        )
    os.rmdir(probe)
    return None


def _resolve_tasks(loaded: LoadedRecipe, taken: dict[str, int]) -> list[tuple]:
    """Expand ``evaluation.tasks`` (groups, aliases), locate every task's data, check labels."""
    recipe = loaded.recipe
    out: list[tuple] = []
    seen: dict[str, int] = {}
    for i, cfg in enumerate(recipe.evaluation.tasks):
        where = ("evaluation", "tasks", i)
        if cfg.path is not None:
            task = JsonlTask(
                name=cfg.name,
                path=cfg.path,
                context=cfg.context,
                choices=cfg.choices if isinstance(cfg.choices, str | None) else tuple(cfg.choices),
                gold=cfg.gold,
                continuation=cfg.continuation,
                gold_base=cfg.gold_base,
                choice_fields=tuple(cfg.choice_fields or ()),
            )
            try:
                task.check()
            except DataError as exc:
                raise loaded.error(where, str(exc)) from None
            if not Path(cfg.path).expanduser().is_file():
                raise loaded.error(
                    (*where, "path"),
                    f"task file {cfg.path!r} does not exist (relative paths are "
                    f"taken from {os.getcwd()!r})",
                )
            try:  # every question the run evaluates, built now (no tokenizer, no weights)
                task.check_records(cfg.limit)
            except DataError as exc:
                raise loaded.error((*where, "path"), str(exc)) from None
            entries = [(cfg.name, task)]
        else:
            try:
                names = expand_task_names(cfg.name)
                entries = [(n, locate_task(n, recipe.data_dir)) for n in names]
            except DataError as exc:
                raise loaded.error((*where, "name"), str(exc)) from None
        for label, source in entries:
            if label == AVERAGE_KEY:
                raise loaded.error(
                    (*where, "name"),
                    f"{AVERAGE_KEY!r} is reserved for the average over the tasks; rename the task",
                )
            if label in taken or label in seen:
                other = (
                    f"evaluation.perplexity entry {taken[label]}"
                    if label in taken
                    else f"evaluation.tasks entry {seen[label]}"
                )
                raise loaded.error(
                    where,
                    f"task {label!r} is already evaluated by {other}: "
                    "their metrics would overwrite each other",
                )
            seen[label] = i
            out.append((label, cfg, source))
    return out


def perplexity_windows(
    plan: Plan, index: int, tokenizer, adapter
) -> tuple[torch.Tensor, int | None]:
    """The token windows of ``evaluation.perplexity[index]`` and the BOS id they start with
    (None): what evaluation scores and, for entry 0, what the runtime times."""
    cfg, source = plan.recipe.evaluation.perplexity[index], plan.perplexity_sources[index]
    bos_id = sequence_bos(cfg.bos, adapter, tokenizer)
    windows = eval_windows(
        tokenizer,
        source,
        cfg.seq_len,
        cfg.windows,
        cfg.sampling,
        seed=plan.recipe.seed,
        bos_id=bos_id,
        batch_size=cfg.batch_size if cfg.sampling == "random" else None,
    )
    return windows, bos_id
