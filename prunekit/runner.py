"""``apply(recipe) -> result``: load, calibrate, prune, evaluate, time, write.

The runner knows no method and no architecture by name: it resolves the recipe's method,
components and model adapter from the registry once, hands them a :class:`PruneContext`, and
evaluates whatever model comes back. :func:`run_plan` (``apply``, ``prunekit bench``) is one
pipeline of stages: :func:`load`, the dense timing, :func:`prune_loaded`, :func:`evaluate_model`,
the pruned timing and the writing. :func:`prepare` runs the same load and prune stages and
returns the loaded, pruned model (the lm-eval bridge uses it).
Everything the CLI does is a thin layer over :func:`apply`, :func:`validate` and :func:`prune`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit.components import (
    Allocation,
    Method,
    MethodSettings,
    ModelAdapter,
    PruneOutcome,
)
from prunekit.devices import input_device
from prunekit.errors import (
    DataError,
    ModelError,
    PluginError,
    PrunekitError,
    RecipeError,
    StateError,
    did_you_mean,
)
from prunekit.plugins import plugin_faults
from prunekit.progress import info
from prunekit.ratios import per_layer_ratio
from prunekit.recipe import LoadedRecipe, Recipe, dump_recipe, load_recipe
from prunekit.registry import RESERVED_METHOD_KEYS, resolve_adapter

SCHEMA_VERSION = 1


# --------------------------------------------------------------------------------------------
# Validation: everything that can be checked without loading weights
# --------------------------------------------------------------------------------------------


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


def unmet_needs(method_cls: type[Method], method_entry, components: dict[str, Any],
                info: dict[str, dict], registry) -> str | None:  # fmt: skip
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
    stat_desc = (f"method.statistic {info['statistic']['name']!r} (plugin "
                 f"{info['statistic']['plugin']!r}) provides "
                 f"{', '.join(getattr(statistic, 'provides', ())) or 'nothing'}; "
                 if statistic is not None else "the method has no statistic slot; ")  # fmt: skip
    method_desc = (f"method {method_cls.name!r} (plugin {method_entry.plugin!r}) provides "
                   f"{', '.join(method_cls.provides) or 'nothing'}")  # fmt: skip
    method_key = "method.statistic" if "statistic" in method_cls.slots else "method.name"
    needers = [(method_key, f"method {method_cls.name!r} (plugin {method_entry.plugin!r})",
                method_cls.needs)]  # fmt: skip
    for slot, component in components.items():
        needs = getattr(component, "needs", ())
        if needs:
            needers.append((f"method.{slot}", f"{slot} {info[slot]['name']!r} (plugin "
                            f"{info[slot]['plugin']!r})", needs))  # fmt: skip
    for key, who, needs in needers:
        for req in needs:
            alternatives = _requirement(req)
            if provided.intersection(alternatives):
                continue
            wanted = " or ".join(repr(a) for a in alternatives)
            candidates = sorted(
                e.name for e in registry.entries("statistic")
                if set(getattr(e.factory, "provides", ()) or ()).intersection(alternatives)
            )
            fix = (f"choose a statistic that provides it ({', '.join(candidates)})"
                   if candidates and "statistic" in method_cls.slots else
                   "choose another component for this slot, or a method that provides it")
            return (f"{key}: {who} needs {wanted}, which this run does not provide: "
                    f"{stat_desc}{method_desc}. {fix[0].upper()}{fix[1:]}.")
    return None


def _model_adapter(loaded: LoadedRecipe, registry, model=None) -> tuple[type | None, int | None, Any]:
    """(adapter class, decoder layer count, config) of the recipe's model, without loading
    weights; ``(None, None, None)`` for a hub model whose config is not cached (not checked
    offline)."""
    from prunekit.models.loading import local_checkpoint_problem, peek_config
    from prunekit.registry import adapter_class_for

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
    lengths += [(("evaluation", "perplexity", i, "seq_len"), p.seq_len)
                for i, p in enumerate(r.evaluation.perplexity)]  # fmt: skip
    lengths += [(("evaluation", "tasks", i, "max_length"), t.max_length)
                for i, t in enumerate(r.evaluation.tasks)]  # fmt: skip
    if r.recovery is not None:
        lengths.append((("recovery", "seq_len"), r.recovery.seq_len))
    for key, n in lengths:
        if n > context:
            raise loaded.error(key, f"{n} tokens is longer than the model's context "
                               f"({context} positions, max_position_embeddings of "
                               f"{r.model.id}); use at most {context}")  # fmt: skip


def validate(loaded: LoadedRecipe | str | os.PathLike | dict, overrides=(), registry=None,
             check_files: bool = True, model=None, check_output: bool = True) -> Plan:  # fmt: skip
    """Check a recipe against the registry, the method, the model, the data files and the
    output location.

    :param model: an already loaded model (``prunekit.prune``): its depth is used and
        ``model.id`` is not looked up.
    :param check_output: check that ``output.dir`` can be written (off for ``prunekit.prune``,
        which writes nothing).
    """
    from prunekit.data import locate_calibration_corpus, locate_corpus
    from prunekit.registry import get_registry

    if not isinstance(loaded, LoadedRecipe):
        loaded = load_recipe(loaded, overrides)
    recipe = loaded.recipe
    registry = registry or get_registry()
    m = recipe.method
    entry = registry.get("method", m.name, where=loaded.where(("method", "name")))
    method_cls: type[Method] = entry.factory
    if method_cls.default_skip_layers is not None and "skip_layers" not in m.model_fields_set:
        m.skip_layers = list(method_cls.default_skip_layers)

    # method-specific options and slots (the engine's kinds and those plugins declare)
    slot_kinds = registry.slot_kinds()
    allowed_options = dict(method_cls.option_defaults)
    method_options = {k: v for k, v in m.options.items() if k not in slot_kinds}
    for key in method_options:
        if key not in allowed_options:
            candidates = [*RESERVED_METHOD_KEYS, *method_cls.slots, *allowed_options]
            raise loaded.error(("method", key),
                               f"unknown key {key!r} for method {m.name!r}{did_you_mean(key, candidates)};"
                               f" allowed keys: {', '.join(candidates)}")  # fmt: skip
    for slot in method_cls.slots:
        if slot not in slot_kinds:
            raise loaded.error(("method", "name"),
                               f"method {m.name!r} (plugin {entry.plugin!r}) has a slot {slot!r}, "
                               f"but no installed plugin declares that component kind; kinds: "
                               f"{', '.join(slot_kinds)}")  # fmt: skip
    components: dict[str, Any] = {}
    component_info: dict[str, dict] = {}
    for slot in slot_kinds:
        try:
            cfg = m.slot(slot)
        except ValueError as exc:
            raise loaded.error(("method", slot), str(exc)) from None
        if cfg is not None and slot not in method_cls.slots:
            raise loaded.error(("method", slot),
                               f"method {m.name!r} has no slot {slot!r}; its slots: "
                               f"{', '.join(method_cls.slots) or '(none)'}")  # fmt: skip
        if slot not in method_cls.slots:
            continue
        default = method_cls.slots[slot] or registry.kinds[slot].default
        name = cfg.name if cfg is not None and cfg.name else default
        if name is None:
            raise loaded.error(("method", slot),
                               f"method {m.name!r} leaves slot {slot!r} to the kind's default, "
                               f"and kind {slot!r} declares none; name one with "
                               f"method.{slot}.name (registered: "
                               f"{', '.join(registry.names(slot)) or '(none)'})")  # fmt: skip
        options = {**(method_cls.slot_options.get(slot, {}) if name == default else {}),
                   **(cfg.options if cfg is not None else {})}  # fmt: skip
        where = loaded.where(("method", slot) if cfg is not None else ("method", "name"))
        components[slot] = registry.create(slot, name, options, where=where)
        comp_entry = registry.get(slot, name)
        component_info[slot] = {"name": name, "plugin": comp_entry.plugin, "options": options}
    problem = unmet_needs(method_cls, entry, components, component_info, registry)
    if problem:
        raise problem_error(loaded, problem)

    settings = MethodSettings(
        name=m.name,
        ratio=m.ratio,
        skip_layers=list(m.skip_layers),
        round_to=m.round_to,
        options={**allowed_options, **method_options},
    )

    # the device (one this machine has), the model (its adapter, from its config), and what
    # depends on its depth
    if model is None:
        from prunekit.models.loading import resolve_device

        try:
            resolve_device(recipe.model.device)
        except ModelError as exc:
            raise loaded.error(("model", "device"), str(exc)) from None
    adapter_cls, num_layers, config = _model_adapter(loaded, registry, model)
    context = model_context(config)
    _check_context(loaded, method_cls, context)
    if num_layers is not None:
        bad = [i for i in m.skip_layers if i >= num_layers]
        if bad:
            raise loaded.error(("method", "skip_layers"),
                               f"layers {bad} do not exist: the model has {num_layers} layers "
                               f"(0..{num_layers - 1})")  # fmt: skip
        if m.ratio > 0:
            try:
                r = method_cls.layer_ratio(recipe, num_layers)
            except ValueError:
                raise loaded.error(
                    ("method", "skip_layers"), "every layer is skipped, so nothing can be pruned"
                ) from None
            if r >= 1:
                raise loaded.error(("method", "ratio"),
                                   f"ratio {m.ratio} becomes {r} per pruned layer once the "
                                   f"{len(m.skip_layers)} skipped layers are compensated "
                                   f"(L/(L-skipped)·r with L={num_layers}); lower the ratio or "
                                   f"skip fewer layers")  # fmt: skip
    for problem in [*method_cls.check_recipe(recipe, num_layers),
                    *method_cls.check_components(components)]:  # fmt: skip
        raise problem_error(loaded, problem)

    # data
    data_dir = recipe.data_dir
    if data_dir and not Path(data_dir).is_dir():
        raise loaded.error(("data_dir",), f"directory {data_dir!r} does not exist")
    plan = Plan(loaded, method_cls, components, component_info, settings, num_layers, adapter_cls,
                context=context)  # fmt: skip
    if check_files:
        c = recipe.calibration
        if method_cls.uses_calibration:
            try:
                plan.calibration_source = locate_calibration_corpus(
                    c.dataset, c.split, c.path, c.text_field, data_dir=data_dir
                )
            except DataError as exc:
                key = ("calibration", "path" if c.path else "dataset")
                raise loaded.error(key, str(exc)) from None
            _check_text_amount(loaded, plan.calibration_source, c.seq_len, None,
                               ("calibration", "path" if c.path else "dataset"))  # fmt: skip
        labels: dict[str, int] = {}
        for i, p in enumerate(recipe.evaluation.perplexity):
            if p.label in labels:
                raise loaded.error(("evaluation", "perplexity", i),
                                   f"entry {i} has the same label {p.label!r} as entry "
                                   f"{labels[p.label]}: their metrics would overwrite each other; "
                                   "evaluate each dataset/split once")  # fmt: skip
            labels[p.label] = i
            try:
                plan.perplexity_sources.append(
                    locate_corpus(p.dataset, p.split, p.path, p.text_field, data_dir=data_dir)
                )
            except DataError as exc:
                key = ("evaluation", "perplexity", i, "path" if p.path else "dataset")
                raise loaded.error(key, str(exc)) from None
            _check_text_amount(loaded, plan.perplexity_sources[-1], p.seq_len,
                               None if p.windows == "all" else p.windows,
                               ("evaluation", "perplexity", i,
                                "path" if p.path else "dataset"))  # fmt: skip
        plan.tasks = _resolve_tasks(loaded, labels)
        if m.state.load and not Path(m.state.load).exists():
            raise loaded.error(("method", "state", "load"),
                               f"saved state {m.state.load!r} not found: give the directory "
                               f"written by a run with output.save_model: true")  # fmt: skip
        if m.state.load:
            try:
                method_cls.check_state(m.state.load, recipe)
            except StateError as exc:
                raise loaded.error(("method", "state", "load"), str(exc)) from None
    if recipe.recovery is not None:
        _check_recovery(loaded, plan, check_files)
    if check_output:
        problem = output_problem(recipe.output_dir())
        if problem:
            raise loaded.error(("output", "dir"), problem)
    return plan


def _check_recovery(loaded: LoadedRecipe, plan: Plan, check_files: bool) -> None:
    """``recovery:``: a static method, peft installed, a corpus that is no evaluated text and
    holds one window, a checkpoint directory that can be one."""
    from importlib.util import find_spec

    from prunekit.data import locate_calibration_corpus
    from prunekit.recovery import check_target_modules

    recipe, r = loaded.recipe, loaded.recipe.recovery
    if plan.method_cls.dynamic:
        raise loaded.error(("recovery",), f"recovery fine-tunes the pruned weights of a static "
                           f"method; {recipe.method.name!r} is dynamic (its kept sets change per "
                           "batch): remove the recovery section or use a static method")  # fmt: skip
    if find_spec("peft") is None:
        raise loaded.error(("recovery",), "recovery needs peft, which is not installed: "
                           "pip install 'prunekit[recovery]'")  # fmt: skip
    if r.checkpoint_dir and Path(r.checkpoint_dir).exists() and not Path(r.checkpoint_dir).is_dir():
        raise loaded.error(("recovery", "checkpoint_dir"),
                           f"{r.checkpoint_dir!r} exists and is not a directory")  # fmt: skip
    problem = check_target_modules(recipe.model.id, r.target_modules)
    if problem:
        raise loaded.error(("recovery", "target_modules"), problem)
    if not check_files:
        return
    key = ("recovery", "path" if r.path else "dataset")
    try:
        plan.recovery_source = locate_calibration_corpus(r.dataset, r.split, r.path, r.text_field,
                                                         data_dir=recipe.data_dir)  # fmt: skip
    except DataError as exc:
        raise loaded.error(key, str(exc)) from None
    source = plan.recovery_source
    # the carve-out, where it can be seen from the sources: the same text (file and split) as
    # an evaluated one is refused here; the runner also drops every training window that
    # shares a run of tokens with an evaluated text (prunekit.recovery.carve_out)
    for i, (cfg, other) in enumerate(zip(recipe.evaluation.perplexity, plan.perplexity_sources,
                                         strict=False)):  # fmt: skip
        if (other.location, other.split) == (source.location, source.split):
            raise loaded.error(key, f"the recovery text {source.describe()} is the text "
                               f"evaluation.perplexity[{i}] ({cfg.label}) measures: recovery "
                               "would train on the evaluation text; train on another split or "
                               "file (e.g. recovery.dataset: c4, whose calibration split holds "
                               "other documents than its validation split)")  # fmt: skip
    for i, task in enumerate(recipe.evaluation.tasks):
        if task.path and source.kind == "file" and Path(task.path).resolve() == Path(source.location):
            raise loaded.error(key, f"the recovery text is the file of evaluation.tasks[{i}] "
                               f"({task.name}): recovery would train on evaluation questions; "
                               "train on another file")  # fmt: skip
    _check_text_amount(loaded, source, r.seq_len, None, key)


def _check_text_amount(loaded: LoadedRecipe, source, seq_len: int, windows: int | None,
                       key: tuple) -> None:  # fmt: skip
    """Refuse, before any weight loads, a corpus that cannot hold what the recipe asks of it
    (empty, shorter than one window, or fewer tokens than ``windows`` x ``seq_len`` with any
    tokenizer). The exact count needs the tokenizer and is checked when the windows are cut."""
    from prunekit.data.corpora import check_head, max_tokens

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
        raise loaded.error(key, f"{where} holds at most {bound} tokens with any tokenizer, "
                                f"fewer than one window of seq_len={seq_len}; use a larger file "
                                "or a smaller seq_len")  # fmt: skip
    if windows is not None and bound < windows * seq_len:
        raise loaded.error(key[:-1] + ("windows",),
                           f"{windows} windows of {seq_len} tokens need {windows * seq_len} "
                           f"tokens, but {where} holds at most {bound} with any tokenizer; ask "
                           f"for fewer windows (at most {bound // seq_len}), windows: all, or a "
                           "smaller seq_len")  # fmt: skip


def output_problem(out: Path) -> str | None:
    """Why a run could not write its outputs into ``out`` (None when it can): checked before
    any weight loads, so that a bad location fails in a second, not after the run."""
    if out.exists() and not out.is_dir():
        return (f"{str(out)!r} is an existing file, not a directory; give a directory "
                "(created if missing; a finished run's outputs in it are replaced)")
    parent = out
    while not parent.exists():  # the nearest existing ancestor is where mkdir starts
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        return (f"{str(out)!r} cannot be created: {str(parent)!r} is a file; choose another "
                "directory")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        return f"{str(out)!r} cannot be written: {str(parent)!r} is not writable"
    return None


#: ``metrics`` key of the average over the evaluated tasks (reserved: no task may use it).
AVERAGE_KEY = "tasks_average"


def _resolve_tasks(loaded: LoadedRecipe, taken: dict[str, int]) -> list[tuple]:
    """Expand ``evaluation.tasks`` (groups, aliases), locate every task's data, check labels."""
    from prunekit.data.tasks import JsonlTask, expand_task_names, locate_task

    recipe = loaded.recipe
    out: list[tuple] = []
    seen: dict[str, int] = {}
    for i, cfg in enumerate(recipe.evaluation.tasks):
        where = ("evaluation", "tasks", i)
        if cfg.path is not None:
            task = JsonlTask(name=cfg.name, path=cfg.path, context=cfg.context,
                             choices=cfg.choices if isinstance(cfg.choices, str)
                             else tuple(cfg.choices), gold=cfg.gold,
                             continuation=cfg.continuation, gold_base=cfg.gold_base)  # fmt: skip
            try:
                task.check()
            except DataError as exc:
                raise loaded.error(where, str(exc)) from None
            if not Path(cfg.path).expanduser().is_file():
                raise loaded.error((*where, "path"),
                                   f"task file {cfg.path!r} does not exist (relative paths are "
                                   f"taken from {os.getcwd()!r})")  # fmt: skip
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
                raise loaded.error((*where, "name"), f"{AVERAGE_KEY!r} is reserved for the "
                                   "average over the tasks; rename the task")  # fmt: skip
            if label in taken or label in seen:
                other = (f"evaluation.perplexity entry {taken[label]}" if label in taken
                         else f"evaluation.tasks entry {seen[label]}")  # fmt: skip
                raise loaded.error(where, f"task {label!r} is already evaluated by {other}: "
                                   "their metrics would overwrite each other")  # fmt: skip
            seen[label] = i
            out.append((label, cfg, source))
    return out


def evaluate_tasks(model, tokenizer, tasks: list[tuple], output_dir: Path | None = None) -> dict:
    """Accuracy metrics of every planned task, and their average when there are several."""
    from prunekit.data.tasks import TaskSource, load_questions
    from prunekit.evaluation.zeroshot import evaluate_questions

    metrics: dict[str, dict] = {}
    for label, cfg, source in tasks:
        if isinstance(source, TaskSource):
            questions = load_questions(source, cfg.limit)
            origin = {"source": source.kind, "location": source.location}
        else:
            questions = source.load(cfg.limit)
            origin = {"source": "file", "location": str(Path(source.path).resolve())}
        result = evaluate_questions(model, tokenizer, questions, batch_size=cfg.batch_size,
                                    max_length=cfg.max_length, description=f"accuracy {label}")  # fmt: skip
        records = result.pop("records")
        if output_dir is not None:
            (output_dir / "predictions").mkdir(exist_ok=True)
            with open(output_dir / "predictions" / f"{label}.jsonl", "w") as fh:
                for rec in records:
                    fh.write(json.dumps(rec) + "\n")
        metrics[label] = {**result, "limit": cfg.limit, **origin}
        info(f"{label}: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} over "
             f"{result['questions']} questions")  # fmt: skip
    if len(metrics) > 1:
        metrics[AVERAGE_KEY] = {
            "acc_norm": sum(m["acc_norm"] for m in metrics.values()) / len(metrics),
            "acc": sum(m["acc"] for m in metrics.values()) / len(metrics),
            "tasks": list(metrics),
        }
    return metrics


# --------------------------------------------------------------------------------------------
# The context a method prunes in
# --------------------------------------------------------------------------------------------


@dataclass
class PruneContext:
    """Everything a method may use: the model, its adapter, settings, calibration data."""

    model: torch.nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    settings: MethodSettings
    recipe: Recipe
    model_info: dict = field(default_factory=dict)
    calibration_source: Any = None
    calibration_windows_override: torch.Tensor | None = None
    timings: dict = field(default_factory=dict)
    use_cache: bool = True
    _windows: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def calibration_windows(self) -> torch.Tensor:
        """The calibration token windows ([samples, seq_len]), drawn once per run."""
        if self.calibration_windows_override is not None:
            return self.calibration_windows_override
        if self._windows is None:
            from prunekit.data import calibration_windows, locate_calibration_corpus

            c = self.recipe.calibration
            source = self.calibration_source or locate_calibration_corpus(
                c.dataset, c.split, c.path, c.text_field, data_dir=self.recipe.data_dir
            )
            self.calibration_source = source
            self._windows = calibration_windows(self.tokenizer, source, c.samples, c.seq_len,
                                                seed=self.recipe.seed,
                                                bos_id=self.calibration_bos_id())  # fmt: skip
        return self._windows

    def calibration_bos_id(self) -> int | None:
        """The token every calibration window starts with (``calibration.bos``), or None."""
        return sequence_bos(self.recipe.calibration.bos, self.adapter, self.tokenizer)

    def calibration_key(self) -> dict | None:
        """What identifies the calibration data and model, for the statistics cache."""
        if not self.use_cache or not self.model_info.get("fingerprint"):
            return None
        from prunekit.data import source_sha256

        c = self.recipe.calibration
        windows = self.calibration_windows()
        if self.calibration_windows_override is not None:
            import hashlib

            data = {"windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()}
        else:
            data = {"source": self.calibration_source.location,
                    "split": self.calibration_source.split,
                    "sha256": source_sha256(self.calibration_source),
                    "samples": c.samples, "seq_len": c.seq_len, "seed": self.recipe.seed}  # fmt: skip
            if self.calibration_bos_id() is not None:  # only then: older keys stay valid
                data["bos"] = self.calibration_bos_id()
        return {"model": self.model_info["fingerprint"], "data": data,
                "tokenizer": getattr(self.tokenizer, "name_or_path", "")}  # fmt: skip

    def statistics(self, stats=None) -> dict:
        """Calibration statistics (default: the method's), collected once and cached on disk."""
        from prunekit.calibration import collect_statistics

        stats = list(stats or [])
        start = time.perf_counter()
        out = collect_statistics(self.model, self.adapter, self.calibration_windows(), stats,
                                 batch_size=self.recipe.calibration.batch_size,
                                 cache_key=self.calibration_key())  # fmt: skip
        self.timings["calibration_s"] = self.timings.get("calibration_s", 0.0) + (
            time.perf_counter() - start
        )
        return out

    def dense_structure(self) -> list[dict]:
        return Allocation().structure(self.adapter)

    def save_hf_model(self, model, path: str) -> None:
        """Save a Hugging Face model and the tokenizer into ``path``."""
        model.save_pretrained(path, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)


# --------------------------------------------------------------------------------------------
# Cost model (the adapters own it; taken before pruning, so it is the dense model's)
# --------------------------------------------------------------------------------------------


def structure_reduction(adapter: ModelAdapter, structure: list[dict] | None,
                        seq_len: int, head_macs_per_token: float | None = None) -> dict:  # fmt: skip
    """Decoder-layer MACs per token, dense and with the kept structure (the adapter's analytic
    cost model; ``adapter`` must be the one taken before pruning).

    With ``head_macs_per_token`` (the LM head's, :func:`head_macs`), also the whole forward's:
    ``forward_flops_kept_fraction`` bounds the speed-up pruning can give
    (:func:`prunekit.evaluation.runtime.flop_limit`). Embedding lookups and norms are not MACs.
    """
    layers = adapter.layers()
    dense = sum(la.macs_per_token(la.num_heads, la.intermediate_size, seq_len) for la in layers)
    if not structure:
        structure = [{"heads": la.num_heads, "channels": la.intermediate_size} for la in layers]
    kept = sum(la.macs_per_token(row["heads"], row["channels"], seq_len)
               for la, row in zip(layers, structure, strict=True))  # fmt: skip
    out = {"decoder_macs_per_token_dense": dense, "decoder_macs_per_token": kept,
           "flops_kept_fraction": kept / dense, "flops_removed_fraction": 1 - kept / dense,
           "seq_len": seq_len}  # fmt: skip
    if head_macs_per_token is not None:
        out["head_macs_per_token"] = head_macs_per_token
        out["forward_flops_kept_fraction"] = (kept + head_macs_per_token) / (
            dense + head_macs_per_token
        )
    return out


def head_macs(model) -> float:
    """MACs per token of the LM head (the output embedding's weight), 0 without one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    return float(weight.numel()) if weight is not None else 0.0


def _reduction(plan: Plan, loaded: Loaded, outcome: PruneOutcome) -> dict:
    """The ``reduction`` figures of results.json: decoder and whole-forward MACs kept."""
    recipe = plan.recipe
    seq = recipe.evaluation.perplexity[0].seq_len if recipe.evaluation.perplexity else 512
    return structure_reduction(loaded.adapter, outcome.structure, seq, loaded.head_macs)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every run starts here)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("prunekit", "torch", "transformers", "pluggy", "datasets", "gguf"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# The pipeline, stage by stage
# --------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """The load stage's result: the dense model, its tokenizer and adapter, provenance."""

    model: torch.nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    info: dict
    params: int
    timings: dict = field(default_factory=dict)
    #: MACs per token of the LM head, taken before pruning (see :func:`head_macs`)
    head_macs: float = 0.0


@dataclass
class Prepared:
    """A loaded and pruned model (what :func:`prepare` returns).

    ``model`` answers like a Hugging Face causal LM; ``loaded.adapter`` is the adapter taken
    before pruning (its cost model describes the dense shapes); ``outcome`` is the method's
    :class:`~prunekit.components.PruneOutcome`.
    """

    plan: Plan
    loaded: Loaded
    context: PruneContext
    outcome: PruneOutcome

    @property
    def model(self) -> torch.nn.Module:
        return self.outcome.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer


def load(plan: Plan) -> Loaded:
    """Load the recipe's model and tokenizer and resolve its adapter."""
    from prunekit.models.loading import load_model

    recipe = plan.recipe
    t0 = time.perf_counter()
    info(f"loading {recipe.model.id} ({recipe.model.dtype}, {recipe.model.device})")
    lm = load_model(recipe.model.id, dtype=recipe.model.dtype, device=recipe.model.device,
                    attn_implementation=recipe.model.attn_implementation,
                    max_memory=recipe.model.max_memory)  # fmt: skip
    # the adapter validate resolved from the config; resolved here when it could not be read
    adapter = (plan.adapter_cls(lm.model) if plan.adapter_cls is not None
               else resolve_adapter(lm.model, name=recipe.model.adapter))  # fmt: skip
    lm.info["adapter"] = adapter.name
    params = sum(p.numel() for p in lm.model.parameters())
    return Loaded(lm.model, lm.tokenizer, adapter, lm.info, params,
                  {"load_s": time.perf_counter() - t0}, head_macs(lm.model))  # fmt: skip


def prune_loaded(plan: Plan, loaded: Loaded) -> tuple[PruneContext, PruneOutcome]:
    """Calibrate and prune with the plan's method (``loaded.model`` may be changed in place)."""
    timings = loaded.timings
    ctx = PruneContext(model=loaded.model, tokenizer=loaded.tokenizer, adapter=loaded.adapter,
                       settings=plan.settings, recipe=plan.recipe, model_info=loaded.info,
                       calibration_source=plan.calibration_source, timings=timings)  # fmt: skip
    method = plan.method_cls(plan.settings, plan.components)
    t1 = time.perf_counter()
    info(f"pruning with {plan.settings.name} at ratio {plan.settings.ratio:g}")
    outcome: PruneOutcome = method.prune(ctx)
    timings["pruning_s"] = time.perf_counter() - t1 - timings.get("calibration_s", 0.0)
    timings.setdefault("calibration_s", 0.0)
    return ctx, outcome


def prepare(recipe: str | os.PathLike | dict | Recipe | LoadedRecipe | Plan,
            overrides=()) -> Prepared:  # fmt: skip
    """Validate a recipe, load its model and prune it: no evaluation, no output written.

    :param recipe: a YAML path, a dict, a :class:`Recipe`, a :class:`LoadedRecipe` or an
        already validated :class:`Plan`.
    :param overrides: ``["a.b=c", ...]`` applied on top (like ``--set``).
    """
    if isinstance(recipe, Plan):
        if overrides:
            raise RecipeError("prepare(): overrides apply to a recipe, not to a validated Plan; "
                              "pass the recipe (path, dict or Recipe) with the overrides")  # fmt: skip
        plan = recipe
    else:
        plan = validate(_as_loaded(recipe, overrides), check_output=False)  # writes nothing
    seed_everything(plan.recipe.seed)
    with plugin_faults(stage="loading and pruning"):
        loaded = load(plan)
        ctx, outcome = prune_loaded(plan, loaded)
        recover(plan, loaded, outcome, None)
    return Prepared(plan, loaded, ctx, outcome)


def sequence_bos(setting, adapter, tokenizer) -> int | None:
    """The BOS id every window starts with, or None.

    :param setting: a recipe's ``bos``: ``"auto"`` (when the adapter ``needs_bos``), ``True``
        or ``False``.
    :param adapter: the model adapter (class or instance), or None.
    """
    wanted = bool(getattr(adapter, "needs_bos", False)) if setting == "auto" else bool(setting)
    bos = getattr(tokenizer, "bos_token_id", None) if wanted else None
    if wanted and bos is None and setting is True:
        raise DataError("bos: true, but the tokenizer has no BOS token to start windows with; "
                        "set bos: false (or auto)")  # fmt: skip
    return None if bos is None else int(bos)


def perplexity_windows(plan: Plan, index: int, tokenizer,
                       adapter) -> tuple[torch.Tensor, int | None]:  # fmt: skip
    """The token windows of ``evaluation.perplexity[index]`` and the BOS id they start with
    (None): what evaluation scores and, for entry 0, what the runtime times."""
    from prunekit.data import eval_windows

    cfg, source = plan.recipe.evaluation.perplexity[index], plan.perplexity_sources[index]
    bos_id = sequence_bos(cfg.bos, adapter, tokenizer)
    windows = eval_windows(tokenizer, source, cfg.seq_len, cfg.windows, cfg.sampling,
                           seed=plan.recipe.seed, bos_id=bos_id,
                           batch_size=cfg.batch_size if cfg.sampling == "random" else None)  # fmt: skip
    return windows, bos_id


def evaluate_model(plan: Plan, model, tokenizer, staging: Path | None = None,
                   adapter=None) -> tuple[dict, dict]:  # fmt: skip
    """Perplexity and task metrics of ``model`` (``(metrics, data sha256 per label)``).

    :param adapter: the model's adapter (default: the plan's), which decides ``bos: auto``.
    """
    from prunekit.data import source_sha256
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.models.loading import sha256_file

    recipe = plan.recipe
    metrics: dict[str, dict] = {}
    data_hashes: dict[str, str | None] = {}
    adapter = adapter if adapter is not None else plan.adapter_cls
    for i, (cfg, source) in enumerate(zip(recipe.evaluation.perplexity, plan.perplexity_sources,
                                          strict=True)):  # fmt: skip
        windows, bos_id = perplexity_windows(plan, i, tokenizer, adapter)
        result = perplexity(model, windows, cfg.batch_size, description=f"perplexity {cfg.label}",
                            prompt_tokens=cfg.prompt_tokens)  # fmt: skip
        metrics[cfg.label] = {**result, "dataset": source.dataset, "split": source.split,
                              "sampling": cfg.sampling, "bos": bos_id is not None}  # fmt: skip
        data_hashes[cfg.label] = source_sha256(source)
        info(f"{cfg.label}: perplexity {result['ppl']:.3f} over {result['tokens']} tokens")
    if plan.tasks:
        save_to = staging if recipe.output.save_predictions else None
        metrics.update(evaluate_tasks(model, tokenizer, plan.tasks, save_to))
        for label, _, _ in plan.tasks:
            m = metrics[label]
            data_hashes[label] = (None if m["source"] == "hub"
                                  else sha256_file(Path(m["location"])))  # fmt: skip
    return metrics, data_hashes


def _timing_batches(plan: Plan, loaded: Loaded) -> list[torch.Tensor]:
    """The first ``runtime.batches`` batches of the first perplexity dataset."""
    recipe = plan.recipe
    if not (recipe.runtime.batches and recipe.evaluation.perplexity):
        return []
    w0, _ = perplexity_windows(plan, 0, loaded.tokenizer, loaded.adapter)
    return list(torch.split(w0, recipe.evaluation.perplexity[0].batch_size))[
        : recipe.runtime.batches
    ]


def _runtime(plan: Plan, outcome: PruneOutcome, batches, dense: DenseTiming,
             device, reduction: dict) -> dict | None:  # fmt: skip
    """The ``runtime`` section: dense and pruned timed on the same batches, in interleaved
    rounds (a dynamic model's dense reference is its own ``dense()`` layers; a static method's
    is the dense copy kept before pruning), or the pruned model alone against the dense times
    taken before pruning (``runtime.interleave: false``)."""
    from prunekit.evaluation.runtime import (
        Contender,
        memory_info,
        phase_medians,
        summarize,
        time_interleaved,
    )

    if not batches:
        return None
    rt_cfg = plan.recipe.runtime
    pruned = outcome.model
    if plan.method_cls.baseline or dense.times is not None:  # dense alone, or timed before
        contenders = [Contender("pruned", pruned)]
    elif dense.model is not None:
        contenders = [Contender("dense", dense.model), Contender("pruned", pruned)]
    elif callable(getattr(pruned, "dense", None)):  # a dynamic model's own dense layers
        contenders = [Contender("dense", pruned, dense=True), Contender("pruned", pruned)]
    else:
        raise PluginError(
            f"method {plan.settings.name!r}: its pruned model has no dense() mode to time the "
            "dense model beside it; set runtime.interleave: false to time dense before pruning"
        )
    info(f"timing {' and '.join(c.name for c in contenders)}: {len(batches)} batch(es) x "
         f"{rt_cfg.repeats} interleaved round(s) after {rt_cfg.warmup} warm-up call(s)")  # fmt: skip
    timed = time_interleaved(contenders, batches, rt_cfg.repeats, rt_cfg.warmup)
    pruned_times = timed["pruned"]["s_all"]
    dense_times = timed["dense"]["s_all"] if "dense" in timed else (dense.times or pruned_times)
    pruned_memory = memory_info(pruned)
    if timed["pruned"]["peak_allocated_bytes"] is not None:
        pruned_memory["peak_allocated_bytes"] = timed["pruned"]["peak_allocated_bytes"]
    dense_memory = dense.memory
    if "dense" in timed:
        dense_memory = memory_info(dense.model or pruned)
        if timed["dense"]["peak_allocated_bytes"] is not None:
            dense_memory["peak_allocated_bytes"] = timed["dense"]["peak_allocated_bytes"]
    runtime = summarize(dense_times, pruned_times, tuple(batches[0].shape),
                        phase_medians(timed["pruned"]["phases_s_all"]), rt_cfg.repeats,
                        flops_kept_fraction=reduction.get("forward_flops_kept_fraction"),
                        interleaved=dense.times is None)  # fmt: skip
    runtime["memory"] = {"dense": dense_memory or pruned_memory, "pruned": pruned_memory}
    runtime["device"] = str(device)
    if outcome.figures is not None:  # the method's own figures (e.g. PP's probe FLOPs)
        figures = outcome.figures(*batches[0].shape)
        clash = sorted(set(figures) & set(runtime))
        if clash:
            raise PluginError(f"method {plan.settings.name!r} reports runtime figures {clash}, "
                              "which the runner already writes; rename them in the method")
        runtime.update(figures)
    return runtime


@dataclass
class DenseTiming:
    """What the runtime section compares the pruned model with: a dense copy kept for
    interleaved timing, or dense times taken before pruning (``runtime.interleave: false``)."""

    model: torch.nn.Module | None = None
    times: list[float] | None = None
    memory: dict | None = None


def _dense_reference(plan: Plan, loaded: Loaded, timed: bool, batches) -> DenseTiming:
    """Before pruning, when anything is ``timed``: nothing for a baseline or a dynamic method
    (its dense layers stay: ``dense()``); for a static method (which prunes in place) a dense
    copy; with ``runtime.interleave: false`` the dense times on ``batches`` themselves."""
    from prunekit.evaluation.runtime import memory_info, time_batches

    rt = plan.recipe.runtime
    if not timed or plan.method_cls.baseline or (plan.method_cls.dynamic and rt.interleave):
        return DenseTiming()
    if rt.interleave:
        info("keeping a dense copy for interleaved timing (runtime.interleave: false saves "
             "the memory)")  # fmt: skip
        return DenseTiming(model=copy.deepcopy(loaded.model))
    info("timing the dense model (before pruning: not interleaved)")
    times = time_batches(loaded.model, batches, rt.warmup, rt.repeats) if batches else []
    return DenseTiming(times=times, memory=memory_info(loaded.model))


def _result(plan: Plan, loaded: Loaded, ctx: PruneContext, outcome: PruneOutcome,
            metrics: dict, runtime: dict | None, output_dir: Path,
            reduction: dict) -> dict:  # fmt: skip
    """The content of ``results.json``."""
    recipe = plan.recipe
    params = loaded.params
    params_kept = outcome.params_kept if outcome.params_kept is not None else params
    return {
        "schema_version": SCHEMA_VERSION,
        "method": plan.settings.name,
        "ratio": plan.settings.ratio,
        "dynamic": outcome.dynamic,
        "seed": recipe.seed,
        "model": {
            "id": recipe.model.id,
            "name": loaded.info.get("name", recipe.model.id),
            "adapter": loaded.adapter.name,
            "dtype": recipe.model.dtype,
            "device": str(ctx.device),
            "params": params,
            "params_kept": params_kept,
            "params_kept_fraction": params_kept / params,
        },
        "components": plan.component_info,
        "structure": outcome.structure,
        "reduction": {
            "params_kept_fraction": params_kept / params,
            "params_removed_fraction": 1 - params_kept / params,
            **reduction,
        },
        "metrics": metrics,
        "timings": loaded.timings,
        "runtime": runtime,
        "output_dir": str(output_dir),
        **outcome.extra,
    }


def _provenance(plan: Plan, loaded: Loaded, ctx: PruneContext, data_hashes: dict) -> dict:
    """The content of ``provenance.json``."""
    from prunekit.data import source_sha256

    recipe = plan.recipe
    if plan.calibration_source is not None and plan.settings.ratio > 0:
        data_hashes["calibration"] = source_sha256(plan.calibration_source)
    return {
        "versions": _versions(),
        "model": loaded.info,
        "data_sha256": data_hashes,
        "seed": recipe.seed,
        "device": str(ctx.device),
        "dtype": recipe.model.dtype,
        "platform": platform.platform(),
        "recipe_file": str(plan.loaded.path) if plan.loaded.path else None,
        "overrides": list(plan.loaded.overrides.values()),
    }


@dataclass
class GenerationBench:
    """What ``prunekit bench --generate`` times: greedy generation from ``prompts`` (default:
    the first batch of ``evaluation.perplexity[0]``'s windows cut to ``prompt_tokens``)."""

    prompts: list[str] | None = None
    prompt_tokens: int = 64
    max_new_tokens: int = 32
    rounds: int = 3
    warmup: int = 1


def _generation_inputs(plan: Plan, loaded: Loaded, spec: GenerationBench):
    from prunekit.evaluation.generation import left_padded

    if spec.prompts:
        bos = sequence_bos("auto", loaded.adapter, loaded.tokenizer)
        ids, mask = left_padded(loaded.tokenizer, spec.prompts, bos, spec.prompt_tokens)
    else:
        if not plan.recipe.evaluation.perplexity:
            raise RecipeError("bench --generate without --prompt takes its prompts from "
                              "evaluation.perplexity[0], and the recipe has none; add one "
                              "or give --prompt")  # fmt: skip
        windows, _ = perplexity_windows(plan, 0, loaded.tokenizer, loaded.adapter)
        ids = windows[: plan.recipe.evaluation.perplexity[0].batch_size, : spec.prompt_tokens]
        mask = torch.ones_like(ids)
    device = input_device(loaded.model)
    return ids.to(device), mask.to(device)


def _generation_bytes(spec: GenerationBench, models: dict, ids, mask) -> dict:
    """What a decoding step of each model reads (weights, KV cache) and holds beyond its own
    weights (:func:`prunekit.evaluation.generation.decode_bytes`)."""
    from prunekit.evaluation.generation import decode_bytes

    return {name: decode_bytes(model, ids, mask, spec.max_new_tokens, dense=dense)
            for name, (model, dense) in models.items()}  # fmt: skip


def _time_generation(spec: GenerationBench, models: dict, ids, mask) -> dict:
    from prunekit.evaluation.generation import greedy, time_generation

    def runner(model, dense: bool):
        def run():
            # a dynamic model's state is left as it was (timing leaves no trace)
            keep = getattr(model, "preserved_state", None)
            with (model.dense() if dense else contextlib.nullcontext()), (
                    keep() if keep else contextlib.nullcontext()):  # fmt: skip
                return greedy(model, ids, mask, spec.max_new_tokens)

        return run

    runs = {name: runner(model, dense) for name, (model, dense) in models.items()}
    return time_generation(runs, int(mask.sum()), mask.shape[0] * (spec.max_new_tokens - 1),
                           rounds=spec.rounds, warmup=spec.warmup)  # fmt: skip


def recover(plan: Plan, loaded: Loaded, outcome: PruneOutcome,
            output_dir: Path | None) -> tuple[dict | None, Any]:  # fmt: skip
    """The ``recovery:`` step on a pruned model: LoRA fine-tuning on the recovery corpus minus
    anything an evaluation reads, merged into ``outcome.model``'s weights. Returns the
    ``recovery`` section of results.json and the trainer (whose checkpoints the caller removes
    once the results are safe), or ``(None, None)`` without a recovery section."""
    from prunekit.data import calibration_windows
    from prunekit.recovery import (
        OVERLAP_TOKENS,
        LoraTrainer,
        default_checkpoint_dir,
        keep_out_evaluated,
    )

    recipe, r = plan.recipe, plan.recipe.recovery
    if r is None:
        return None, None
    t0 = time.perf_counter()
    tokenizer = loaded.tokenizer
    bos_id = sequence_bos(r.bos, loaded.adapter, tokenizer)
    windows = calibration_windows(tokenizer, plan.recovery_source, r.samples, r.seq_len,
                                  seed=recipe.seed, bos_id=bos_id)  # fmt: skip
    kept, dropped, excluded = keep_out_evaluated(windows, recipe, tokenizer,
                                                 plan.perplexity_sources)  # fmt: skip
    if dropped:
        info(f"recovery: {len(dropped)} of {r.samples} windows share {OVERLAP_TOKENS} tokens "
             "with an evaluated text and are left out")  # fmt: skip
    if r.checkpoint_every == 0:
        ckpt = None
    elif r.checkpoint_dir:
        ckpt = Path(r.checkpoint_dir)
    else:
        ckpt = default_checkpoint_dir(output_dir) if output_dir is not None else None
    identity = {"model": recipe.model.model_dump(mode="json"),
                "method": recipe.method.model_dump(mode="json")}  # fmt: skip
    trainer = LoraTrainer(outcome.model, r, kept, seed=recipe.seed, checkpoint_dir=ckpt,
                          identity=identity)  # fmt: skip
    record = trainer.train()
    outcome.model, diff = trainer.merge(check=kept[:1].to(input_device(outcome.model)))
    loaded.timings["recovery_s"] = time.perf_counter() - t0
    record.update({
        "corpus": plan.recovery_source.describe(),
        "carve_out": {"excluded": excluded, "overlap_tokens": OVERLAP_TOKENS,
                      "windows_dropped": len(dropped)},
        "merged": True,
        "merge_max_abs_logit_diff": diff,
        "checkpoint_dir": None if ckpt is None else str(ckpt),
    })  # fmt: skip
    info(f"recovery: {record['steps']} steps, loss {record['loss_first']:.3f} -> "
         f"{record['loss_last']:.3f}, merged (logits differ by at most {diff:.2e})")  # fmt: skip
    return record, trainer


def run_plan(plan: Plan, output_dir: Path, pm=None, evaluate: bool = True,
             generation: GenerationBench | None = None) -> dict:  # fmt: skip
    """Execute a validated plan, writing every output into ``output_dir`` atomically.

    Stages: load, calibrate and prune, evaluate, time dense and pruned interleaved, write (into a
    staging directory renamed into place at the end; nothing is left behind on failure).

    :param evaluate: False skips perplexity and tasks (``prunekit bench``: runtime only).
    :param generation: also time greedy generation, dense and pruned (``generation`` section:
        prefill and decode seconds and tokens/s). A dynamic model's dense runs interleave
        with its pruned runs (its ``dense()`` layers); a static method's dense model is timed
        before it is pruned in place.
    """
    from prunekit.plugins import get_plugin_manager

    pm = pm or get_plugin_manager()
    recipe = plan.recipe
    seed_everything(recipe.seed)
    pm.hook.prunekit_run_started(recipe=recipe, output_dir=str(output_dir))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        t0 = time.perf_counter()
        with plugin_faults(pm, "loading the model"):
            loaded = load(plan)
            timing_batches = _timing_batches(plan, loaded)
            dense_ref = _dense_reference(plan, loaded, bool(timing_batches) or generation is not None,
                                         timing_batches)  # fmt: skip
            gen_inputs = gen_dense = None
            if generation is not None:
                gen_inputs = _generation_inputs(plan, loaded, generation)
                if dense_ref.times is not None:  # not interleaved: time dense before pruning
                    gen_dense = _time_generation(generation, {"dense": (loaded.model, False)},
                                                 *gen_inputs)  # fmt: skip
                    gen_dense["dense"]["step"] = _generation_bytes(
                        generation, {"dense": (loaded.model, False)}, *gen_inputs)["dense"]
        with plugin_faults(pm, "calibration and pruning"):
            ctx, outcome = prune_loaded(plan, loaded)
        with plugin_faults(pm, "recovery"):
            recovery, trainer = recover(plan, loaded, outcome, output_dir)
        t2 = time.perf_counter()
        with plugin_faults(pm, "evaluation"):
            metrics, data_hashes = (
                evaluate_model(plan, outcome.model, loaded.tokenizer, staging, loaded.adapter)
                if evaluate else ({}, {})
            )
        loaded.timings["evaluation_s"] = time.perf_counter() - t2
        loaded.timings["total_s"] = time.perf_counter() - t0
        with plugin_faults(pm, "timing"):
            reduction = _reduction(plan, loaded, outcome)
            runtime = _runtime(plan, outcome, timing_batches, dense_ref, ctx.device, reduction)
        result = _result(plan, loaded, ctx, outcome, metrics, runtime, output_dir, reduction)
        if recovery is not None:
            result["recovery"] = recovery
        if generation is not None:
            with plugin_faults(pm, "timing generation"):
                models = {"pruned": (outcome.model, False)}
                if gen_dense is None:  # interleaved with the dense copy or dense() layers
                    dense_model = dense_ref.model or outcome.model
                    models = {"dense": (dense_model, dense_ref.model is None), **models}
                timed = _time_generation(generation, models, *gen_inputs)
                for name, step in _generation_bytes(generation, models, *gen_inputs).items():
                    timed[name]["step"] = step
            timed = {**(gen_dense or {}), **timed}
            result["generation"] = {
                "batch": int(gen_inputs[0].shape[0]),
                "prompt_tokens": int(gen_inputs[1].sum()),
                "max_new_tokens": generation.max_new_tokens,
                "rounds": generation.rounds,
                "interleaved": gen_dense is None,
                **timed,
                "decode_speedup": timed["dense"]["decode_s"] / timed["pruned"]["decode_s"],
                "decode_bytes_limit": (timed["dense"]["step"]["total_bytes"]
                                       / timed["pruned"]["step"]["total_bytes"]),
                "prefill_speedup": timed["dense"]["prefill_s"] / timed["pruned"]["prefill_s"],
            }  # fmt: skip
        dense_ref = None  # the dense copy is not needed any more
        provenance = _provenance(plan, loaded, ctx, data_hashes)
        if recipe.output.save_model and outcome.save is not None:
            with plugin_faults(pm, "saving"):
                outcome.save(str(staging / "model"))
            result["saved_model"] = str(output_dir / "model")
        _write_json(staging / "results.json", result)
        _write_json(staging / "provenance.json", provenance)
        (staging / "recipe.yaml").write_text(dump_recipe(recipe))
        _publish(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if trainer is not None and not recipe.recovery.keep_checkpoints:
        trainer.remove_checkpoints()  # the results are in place: nothing left to resume
    pm.hook.prunekit_result_ready(result=result, output_dir=str(output_dir))
    return result


def _publish(staging: Path, output_dir: Path) -> None:
    """Move a finished staging directory into place (replacing an older run's outputs)."""
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        os.replace(output_dir, old)
        os.replace(staging, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output_dir)


def apply(recipe: str | os.PathLike | dict | Recipe | LoadedRecipe, overrides=(),
          output: str | os.PathLike | None = None) -> dict:  # fmt: skip
    """Run a recipe end to end and return the content of ``results.json``.

    :param recipe: a YAML path, a dict, a :class:`Recipe` or a :class:`LoadedRecipe`.
    :param overrides: ``["a.b=c", ...]`` applied on top (like ``--set``).
    :param output: output directory (overrides ``output.dir``).
    """
    loaded = _as_loaded(recipe, overrides)
    if output is not None:
        loaded.recipe.output.dir = str(output)
    plan = validate(loaded)
    return run_plan(plan, loaded.recipe.output_dir())


def _as_loaded(recipe, overrides=()) -> LoadedRecipe:
    if isinstance(recipe, Recipe):
        recipe = recipe.model_dump(mode="json")
    return recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe, overrides)


def prune(model, tokenizer=None, method: str = "dense", ratio: float = 0.0,
          calibration: dict | torch.Tensor | None = None, seed: int = 0,
          **method_keys) -> PruneOutcome:  # fmt: skip
    """Prune an in-memory Hugging Face causal LM without a recipe file.

    :param method: a registered method name; ``method_keys`` are further ``method.*`` recipe
        keys (``skip_layers=[...]``, ``probe={"name": "random"}``, ``mode="sync"``...).
    :param calibration: ``calibration.*`` recipe keys as a dict, or a ``[N, T]`` tensor of
        token windows to calibrate on directly.
    :returns: a :class:`PruneOutcome` whose ``model`` answers like a Hugging Face causal LM.
    """
    data: dict[str, Any] = {"method": {"name": method, "ratio": ratio, **method_keys},
                            "seed": seed, "evaluation": {"perplexity": []}}  # fmt: skip
    if isinstance(calibration, dict):
        data["calibration"] = calibration
    elif isinstance(calibration, torch.Tensor) and calibration.dim() == 2:
        # the windows given are the calibration set: methods read its size from the recipe
        # (e.g. a running-mean history counts them)
        data["calibration"] = {"samples": int(calibration.shape[0]),
                               "seq_len": max(int(calibration.shape[1]), 2)}  # fmt: skip
    loaded = load_recipe(data)
    plan = validate(loaded, check_files=not isinstance(calibration, torch.Tensor), model=model,
                    check_output=False)  # fmt: skip
    if isinstance(calibration, torch.Tensor):
        plan.calibration_source = None
    seed_everything(seed)
    from prunekit.models.loading import model_fingerprint

    # the fingerprint keys the calibration cache, so notebooks share statistics across calls
    info = {"fingerprint": model_fingerprint(model)} if plan.method_cls.uses_calibration else {}
    ctx = PruneContext(model=model, tokenizer=tokenizer,
                       adapter=plan.adapter_cls(model) if plan.adapter_cls else resolve_adapter(model),
                       settings=plan.settings, recipe=loaded.recipe, model_info=info,
                       calibration_source=plan.calibration_source,
                       calibration_windows_override=calibration
                       if isinstance(calibration, torch.Tensor) else None)  # fmt: skip
    if tokenizer is None and method_needs_tokenizer(plan, calibration):
        raise RecipeError("prune(): give a tokenizer, or calibration windows as a tensor")
    with plugin_faults(stage="pruning"):
        return plan.method_cls(plan.settings, plan.components).prune(ctx)


def method_needs_tokenizer(plan: Plan, calibration) -> bool:
    return plan.method_cls.uses_calibration and not isinstance(calibration, torch.Tensor)


__all__ = ["Loaded", "Plan", "Prepared", "PruneContext", "PrunekitError", "apply",
           "evaluate_model", "load", "per_layer_ratio", "prepare", "prune", "prune_loaded", "resolve_adapter",
           "run_plan", "seed_everything", "structure_reduction", "head_macs", "validate"]  # fmt: skip
