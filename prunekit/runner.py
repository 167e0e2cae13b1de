"""``apply(recipe) -> result``: load, calibrate, prune, evaluate, save.

The runner knows no method by name: it resolves the recipe's method and components from the
registry once, hands them a :class:`PruneContext`, and evaluates whatever model comes back.
Everything the CLI does is a thin layer over :func:`apply`, :func:`validate` and :func:`prune`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit.components import (
    SLOTS,
    Allocation,
    Method,
    MethodSettings,
    ModelAdapter,
    PruneOutcome,
)
from prunekit.errors import (
    DataError,
    ModelError,
    PrunekitError,
    RecipeError,
    StateError,
    did_you_mean,
)
from prunekit.progress import info
from prunekit.pruning.allocation import per_layer_ratio
from prunekit.recipe import LoadedRecipe, Recipe, dump_recipe, load_recipe

SCHEMA_VERSION = 1
FIXED_METHOD_KEYS = ("name", "ratio", "skip_layers", "round_to", "state", *SLOTS)


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
    calibration_source: Any = None
    perplexity_sources: list = field(default_factory=list)
    #: (label, TaskConfig, TaskSource | JsonlTask) per evaluated task, groups expanded
    tasks: list = field(default_factory=list)

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe


def _num_layers(model_id: str) -> int | None:
    """Decoder layer count, read from a config without loading weights (None if unknown)."""
    from prunekit.models import loading

    location = loading.locate_model(model_id)
    if location.get("source") == "alias" and str(location.get("path", "")).endswith(".gguf"):
        return _gguf_block_count(location["path"])
    config_path = Path(location.get("path") or "") / "config.json"
    if config_path.is_file():
        try:
            return int(json.loads(config_path.read_text())["num_hidden_layers"])
        except (KeyError, ValueError, TypeError):
            return None
    try:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(model_id, local_files_only=True).num_hidden_layers)
    except Exception:
        return None


def _gguf_block_count(path: str) -> int | None:
    """Layer count from a GGUF file's metadata (memory-mapped; no tensor is read)."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        arch_field = fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        count = fields[f"{arch}.block_count"]
        return int(count.parts[count.data[0]][0])
    except Exception:
        return None


def validate(loaded: LoadedRecipe | str | os.PathLike | dict, overrides=(), registry=None,
             check_files: bool = True, model=None) -> Plan:  # fmt: skip
    """Check a recipe against the registry, the method, the model and the data files.

    :param model: an already loaded model (``prunekit.prune``): its depth is used and
        ``model.id`` is not looked up.
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

    # method-specific options and slots
    allowed_options = dict(method_cls.option_defaults)
    for key in m.options:
        if key not in allowed_options:
            candidates = [*FIXED_METHOD_KEYS, *allowed_options]
            raise loaded.error(("method", key),
                               f"unknown key {key!r} for method {m.name!r}{did_you_mean(key, candidates)};"
                               f" allowed keys: {', '.join(candidates)}")  # fmt: skip
    components: dict[str, Any] = {}
    component_info: dict[str, dict] = {}
    for slot in SLOTS:
        cfg = m.slot(slot)
        if cfg is not None and slot not in method_cls.slots:
            raise loaded.error(("method", slot),
                               f"method {m.name!r} has no slot {slot!r}; its slots: "
                               f"{', '.join(method_cls.slots) or '(none)'}")  # fmt: skip
        if slot not in method_cls.slots:
            continue
        name = cfg.name if cfg is not None and cfg.name else method_cls.slots[slot]
        options = cfg.options if cfg is not None else {}
        where = loaded.where(("method", slot) if cfg is not None else ("method", "name"))
        components[slot] = registry.create(slot, name, options, where=where)
        comp_entry = registry.get(slot, name)
        component_info[slot] = {"name": name, "plugin": comp_entry.plugin, "options": options}

    settings = MethodSettings(
        name=m.name,
        ratio=m.ratio,
        skip_layers=list(m.skip_layers),
        round_to=m.round_to,
        options={**allowed_options, **m.options},
    )

    # the model, and what depends on its depth
    if model is not None:
        num_layers = resolve_adapter(model, registry).num_layers
    else:
        try:
            num_layers = _num_layers(recipe.model.id)
        except ModelError as exc:
            raise loaded.error(("model", "id"), str(exc)) from None
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
        key, _, message = problem.partition(": ")
        raise loaded.error(key, message)

    # data
    data_dir = recipe.data_dir
    if data_dir and not Path(data_dir).is_dir():
        raise loaded.error(("data_dir",), f"directory {data_dir!r} does not exist")
    plan = Plan(loaded, method_cls, components, component_info, settings, num_layers)
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
    return plan


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
        return next(self.model.parameters()).device

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
                                                seed=self.recipe.seed)  # fmt: skip
        return self._windows

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


def resolve_adapter(model, registry=None) -> ModelAdapter:
    """The first registered adapter that supports ``model``."""
    from prunekit.registry import get_registry

    registry = registry or get_registry()
    names = registry.names("adapter")
    for entry in registry.entries("adapter"):  # registration order: first match wins
        if entry.factory.supports(model):
            return entry.factory(model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ModelError(
        f"no model adapter supports model type {model_type!r}; registered adapters: "
        f"{', '.join(names) or '(none)'}. Install a plugin that registers one "
        f"(prunekit_register_adapters), or see docs/plugins.md to write it."
    )


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def layer_dims(adapter: ModelAdapter) -> list[dict]:
    """The dense shape of every decoder layer (taken before pruning)."""
    return [{"d": la.hidden_size, "hd": la.head_dim, "heads": la.num_heads,
             "kv": la.num_kv_heads, "inter": la.intermediate_size}
            for la in adapter.layers()]  # fmt: skip


def _layer_macs(dim: dict, heads: int, inter: int, seq_len: int) -> float:
    """MACs per token of one decoder layer (pp-spec section 8 convention): q, k, v, o, gate,
    up, down and ``2·T·heads·d_h`` for the attention matmuls. With MHA the kept heads keep their
    k/v rows; with GQA k/v stay whole."""
    d, hd = dim["d"], dim["hd"]
    kv = heads if dim["kv"] == dim["heads"] else dim["kv"]
    return d * hd * (heads + 2 * kv) + heads * hd * d + 3 * d * inter + 2 * seq_len * heads * hd


def structure_reduction(dims: list[dict], structure: list[dict] | None, seq_len: int) -> dict:
    """Decoder-layer MACs per token, dense and with the kept structure (analytic)."""
    dense = sum(_layer_macs(dm, dm["heads"], dm["inter"], seq_len) for dm in dims)
    if not structure:
        structure = [{"heads": dm["heads"], "channels": dm["inter"]} for dm in dims]
    kept = sum(_layer_macs(dm, row["heads"], row["channels"], seq_len)
               for dm, row in zip(dims, structure, strict=True))  # fmt: skip
    return {"decoder_macs_per_token_dense": dense, "decoder_macs_per_token": kept,
            "flops_kept_fraction": kept / dense, "flops_removed_fraction": 1 - kept / dense,
            "seq_len": seq_len}  # fmt: skip


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("prunekit", "torch", "transformers", "pluggy", "datasets", "torch-pruning"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def run_plan(plan: Plan, output_dir: Path, pm=None, evaluate: bool = True) -> dict:
    """Execute a validated plan, writing every output into ``output_dir`` atomically.

    :param evaluate: False skips perplexity and tasks (``prunekit bench``: runtime only).
    """
    from prunekit.data import eval_windows, source_sha256
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.evaluation.runtime import memory_info, summarize, time_batches, time_pruned
    from prunekit.models.loading import load_model, sha256_file
    from prunekit.plugins import get_plugin_manager

    pm = pm or get_plugin_manager()
    recipe = plan.recipe
    _seed_everything(recipe.seed)
    pm.hook.prunekit_run_started(recipe=recipe, output_dir=str(output_dir))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        info(f"loading {recipe.model.id} ({recipe.model.dtype}, {recipe.model.device})")
        loaded_model = load_model(recipe.model.id, dtype=recipe.model.dtype,
                                  device=recipe.model.device,
                                  attn_implementation=recipe.model.attn_implementation)  # fmt: skip
        timings["load_s"] = time.perf_counter() - t0
        model, tokenizer = loaded_model.model, loaded_model.tokenizer
        adapter = resolve_adapter(model)
        params = sum(p.numel() for p in model.parameters())
        dims = layer_dims(adapter)

        # the timing batches: the first batches of the first perplexity dataset
        timing_batches: list[torch.Tensor] = []
        rt_cfg = recipe.runtime
        if rt_cfg.batches and recipe.evaluation.perplexity:
            cfg0, src0 = recipe.evaluation.perplexity[0], plan.perplexity_sources[0]
            w0 = eval_windows(tokenizer, src0, cfg0.seq_len, cfg0.windows, cfg0.sampling,
                              seed=recipe.seed,
                              batch_size=cfg0.batch_size if cfg0.sampling == "random" else None)  # fmt: skip
            timing_batches = list(torch.split(w0, cfg0.batch_size))[: rt_cfg.batches]
        dense_times, dense_memory = None, None
        if timing_batches and plan.settings.name != "dense":
            info("timing the dense model")
            dense_times = time_batches(model, timing_batches, rt_cfg.warmup, rt_cfg.repeats)
            dense_memory = memory_info(model)

        ctx = PruneContext(model=model, tokenizer=tokenizer, adapter=adapter,
                           settings=plan.settings, recipe=recipe, model_info=loaded_model.info,
                           calibration_source=plan.calibration_source, timings=timings)  # fmt: skip
        method = plan.method_cls(plan.settings, plan.components)
        t1 = time.perf_counter()
        info(f"pruning with {plan.settings.name} at ratio {plan.settings.ratio:g}")
        outcome: PruneOutcome = method.prune(ctx)
        timings["pruning_s"] = time.perf_counter() - t1 - timings.get("calibration_s", 0.0)
        timings.setdefault("calibration_s", 0.0)

        metrics: dict[str, dict] = {}
        data_hashes: dict[str, str | None] = {}
        t2 = time.perf_counter()
        ppl_entries = zip(recipe.evaluation.perplexity, plan.perplexity_sources, strict=True)
        for cfg, source in ppl_entries if evaluate else ():
            windows = eval_windows(tokenizer, source, cfg.seq_len, cfg.windows, cfg.sampling,
                                   seed=recipe.seed,
                                   batch_size=cfg.batch_size if cfg.sampling == "random" else None)  # fmt: skip
            result = perplexity(outcome.model, windows, cfg.batch_size,
                                description=f"perplexity {cfg.label}")  # fmt: skip
            metrics[cfg.label] = {**result, "dataset": source.dataset, "split": source.split,
                                  "sampling": cfg.sampling}  # fmt: skip
            data_hashes[cfg.label] = source_sha256(source)
            info(f"{cfg.label}: perplexity {result['ppl']:.3f} over {result['tokens']} tokens")
        if evaluate and plan.tasks:
            save_to = staging if recipe.output.save_predictions else None
            metrics.update(evaluate_tasks(outcome.model, tokenizer, plan.tasks, save_to))
            for label, _, _ in plan.tasks:
                m = metrics[label]
                data_hashes[label] = (None if m["source"] == "hub"
                                      else sha256_file(Path(m["location"])))  # fmt: skip
        timings["evaluation_s"] = time.perf_counter() - t2
        timings["total_s"] = time.perf_counter() - t0

        runtime = None
        if timing_batches:
            info("timing the pruned model")
            pruned_times, overhead = time_pruned(outcome.model, timing_batches, rt_cfg.warmup,
                                                 rt_cfg.repeats)  # fmt: skip
            pruned_memory = memory_info(outcome.model)
            runtime = summarize(dense_times or pruned_times, pruned_times,
                                tuple(timing_batches[0].shape), overhead, rt_cfg.repeats)  # fmt: skip
            runtime["memory"] = {"dense": dense_memory or pruned_memory, "pruned": pruned_memory}
            runtime["device"] = str(ctx.device)
            fraction = getattr(getattr(outcome.model, "controller", None),
                               "probe_flops_fraction", None)  # fmt: skip
            if fraction is not None:
                runtime["probe_flops_fraction"] = fraction(*timing_batches[0].shape)
        params_kept = outcome.params_kept if outcome.params_kept is not None else params
        seq_for_flops = (
            recipe.evaluation.perplexity[0].seq_len if recipe.evaluation.perplexity else 512
        )
        reduction = structure_reduction(dims, outcome.structure, seq_for_flops)
        result = {
            "schema_version": SCHEMA_VERSION,
            "method": plan.settings.name,
            "ratio": plan.settings.ratio,
            "dynamic": outcome.dynamic,
            "seed": recipe.seed,
            "model": {
                "id": recipe.model.id,
                "name": loaded_model.info.get("name", recipe.model.id),
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
            "timings": timings,
            "runtime": runtime,
            "output_dir": str(output_dir),
            **outcome.extra,
        }
        if plan.calibration_source is not None and plan.settings.ratio > 0:
            data_hashes["calibration"] = source_sha256(plan.calibration_source)
        provenance = {
            "versions": _versions(),
            "model": loaded_model.info,
            "data_sha256": data_hashes,
            "seed": recipe.seed,
            "device": str(ctx.device),
            "dtype": recipe.model.dtype,
            "platform": platform.platform(),
            "recipe_file": str(plan.loaded.path) if plan.loaded.path else None,
            "overrides": list(plan.loaded.overrides.values()),
        }
        if recipe.output.save_model and outcome.save is not None:
            outcome.save(str(staging / "model"))
            result["saved_model"] = str(output_dir / "model")
        _write_json(staging / "results.json", result)
        _write_json(staging / "provenance.json", provenance)
        (staging / "recipe.yaml").write_text(dump_recipe(recipe))
        _publish(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
    if isinstance(recipe, Recipe):
        recipe = recipe.model_dump(mode="json")
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe, overrides)
    if output is not None:
        loaded.recipe.output.dir = str(output)
    plan = validate(loaded)
    return run_plan(plan, loaded.recipe.output_dir())


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
    loaded = load_recipe(data)
    plan = validate(loaded, check_files=not isinstance(calibration, torch.Tensor), model=model)
    if isinstance(calibration, torch.Tensor):
        plan.calibration_source = None
    _seed_everything(seed)
    from prunekit.models.loading import model_fingerprint

    # the fingerprint keys the calibration cache, so notebooks share statistics across calls
    info = {"fingerprint": model_fingerprint(model)} if plan.method_cls.uses_calibration else {}
    ctx = PruneContext(model=model, tokenizer=tokenizer, adapter=resolve_adapter(model),
                       settings=plan.settings, recipe=loaded.recipe, model_info=info,
                       calibration_source=plan.calibration_source,
                       calibration_windows_override=calibration
                       if isinstance(calibration, torch.Tensor) else None)  # fmt: skip
    if tokenizer is None and method_needs_tokenizer(plan, calibration):
        raise RecipeError("prune(): give a tokenizer, or calibration windows as a tensor")
    return plan.method_cls(plan.settings, plan.components).prune(ctx)


def method_needs_tokenizer(plan: Plan, calibration) -> bool:
    return plan.method_cls.uses_calibration and not isinstance(calibration, torch.Tensor)


__all__ = ["Plan", "PruneContext", "PrunekitError", "apply", "per_layer_ratio", "prune",
           "resolve_adapter", "run_plan", "validate"]  # fmt: skip
