"""``apply(recipe) -> result``: load, calibrate, prune, recover, evaluate, time, write.

The runner knows no method and no architecture by name: it takes a validated
:class:`~prunekit.plan.Plan` (:func:`prunekit.plan.validate`), hands the method a
:class:`~prunekit.context.PruneContext`, and evaluates whatever model comes back.
:func:`run_plan` (``apply``, ``prunekit bench``) is one pipeline of stages: :func:`load`, the
dense timing (:mod:`prunekit.timing`), :func:`prune_loaded`, :func:`recover`,
:func:`evaluate_model`, the pruned timing and the writing. :func:`prepare` runs the same load
and prune stages and returns the loaded, pruned model (the lm-eval bridge uses it).
Everything the CLI does is a thin layer over :func:`apply`, :func:`validate` and :func:`prune`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as md
import json
import os
import platform
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.budgets import (
    Budget,
    BudgetAllocator,
    BudgetError,
    cost_model,
    fmt,
    highest_ratio,
    macs_seq_len,
    solve_counts,
)
from prunekit.chain import dense_costs, run_then
from prunekit.components import PruneOutcome
from prunekit.context import PruneContext
from prunekit.data import calibration_windows, sequence_bos, source_sha256
from prunekit.devices import input_device
from prunekit.errors import PrunekitError, RecipeError
from prunekit.evaluation.costs import head_macs, structure_reduction
from prunekit.evaluation.perplexity import perplexity
from prunekit.evaluation.zeroshot import evaluate_tasks
from prunekit.loading import load_model, model_fingerprint, sha256_file
from prunekit.plan import Plan, perplexity_windows, validate
from prunekit.plugins import get_plugin_manager, plugin_faults
from prunekit.progress import info
from prunekit.ratios import per_layer_ratio
from prunekit.recipe import LoadedRecipe, Recipe, dump_recipe, load_recipe
from prunekit.recovery import (
    OVERLAP_TOKENS,
    LoraTrainer,
    OnlineTeacher,
    TeacherCache,
    default_checkpoint_dir,
    keep_out_evaluated,
)
from prunekit.registry import resolve_adapter
from prunekit.stages import Loaded
from prunekit.timing import (
    GenerationBench,
    dense_generation,
    dense_reference,
    generation_inputs,
    generation_section,
    runtime_section,
    timing_batches,
)

SCHEMA_VERSION = 1


def _reduction(plan: Plan, loaded: Loaded, outcome: PruneOutcome) -> dict:
    """The ``reduction`` figures of results.json: decoder and whole-forward MACs kept."""
    recipe = plan.recipe
    seq = recipe.evaluation.perplexity[0].seq_len if recipe.evaluation.perplexity else 512
    return structure_reduction(loaded.adapter, outcome.structure, seq, loaded.head_macs)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every run starts here)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("prunekit", "torch", "transformers", "pluggy", "datasets", "gguf"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


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
    recipe = plan.recipe
    t0 = time.perf_counter()
    info(f"loading {recipe.model.id} ({recipe.model.dtype}, {recipe.model.device})")
    lm = load_model(
        recipe.model.id,
        dtype=recipe.model.dtype,
        device=recipe.model.device,
        attn_implementation=recipe.model.attn_implementation,
        max_memory=recipe.model.max_memory,
    )
    # the adapter validate resolved from the config; resolved here when it could not be read
    adapter = (
        plan.adapter_cls(lm.model)
        if plan.adapter_cls is not None
        else resolve_adapter(lm.model, name=recipe.model.adapter)
    )
    lm.info["adapter"] = adapter.name
    params = sum(p.numel() for p in lm.model.parameters())
    return Loaded(
        lm.model,
        lm.tokenizer,
        adapter,
        lm.info,
        params,
        {"load_s": time.perf_counter() - t0},
        head_macs(lm.model),
    )


def _budgeted(plan: Plan, adapter, model):
    """``(settings, components, finish)`` for the plan's ``method.target`` (none: the plan's
    own, and ``finish`` does nothing): the ratio that meets the target, solved before the
    method runs from a score-free allocator's counts, or by the allocator itself on the scores
    (:class:`prunekit.budgets.BudgetAllocator`). ``finish(outcome)`` records the ratio and the
    target beside what was achieved in ``outcome.extra`` (results.json)."""
    target = plan.recipe.method.target
    if not target:
        return plan.settings, plan.components, lambda outcome: None, None
    ((kind, value),) = target.items()
    recipe = plan.recipe
    costs = cost_model(adapter, model, macs_seq_len(recipe), recipe.model.dtype, plan.macs_scale)
    allocator = plan.components.get("allocator")
    wrapper = budget = None
    try:
        if plan.method_cls.solves_target:  # the method removes units until the target is met
            budget = Budget(kind, value, costs)
            ratio, components = plan.settings.ratio, plan.components
        elif hasattr(allocator, "counts"):
            ratio, _ = solve_counts(allocator, costs, plan.settings, kind, value)
            components = plan.components
        else:  # the allocator needs the scores: it solves on them
            wrapper = BudgetAllocator(allocator, costs, kind, value)
            ratio = highest_ratio(allocator, adapter, plan.settings)
            components = {**plan.components, "allocator": wrapper}
    except BudgetError as exc:
        raise plan.loaded.error(("method", "target"), str(exc)) from None
    settings = dataclasses.replace(plan.settings, ratio=ratio)

    def finish(outcome: PruneOutcome) -> None:
        achieved = costs.costs(outcome.structure) if outcome.structure else costs.costs()
        if outcome.params_kept is not None:  # compensation biases count too
            achieved["params"] = outcome.params_kept
        if budget is None or "ratio" not in outcome.extra:
            outcome.extra["ratio"] = wrapper.ratio if wrapper is not None else ratio
        outcome.extra["target"] = {
            "kind": kind,
            "value": value,
            "achieved": achieved[kind],
            "costs": achieved,
            "macs_seq_len": costs.seq_len,
        }

    return settings, components, finish, budget


def prune_loaded(plan: Plan, loaded: Loaded) -> tuple[PruneContext, PruneOutcome]:
    """Calibrate and prune with the plan's method, then its ``method.then`` stages
    (``loaded.model`` may be changed in place); the context is the first method's."""
    costs = dense_costs(plan, loaded.adapter, loaded.model)
    ctx, outcome = _prune_stage(plan, loaded)
    if plan.then is None:
        return ctx, outcome

    def stage(stage_plan: Plan, model, adapter) -> PruneOutcome:
        # the stage's statistics are its model's: never the dense model's cached ones
        info_ = {k: v for k, v in loaded.info.items() if k != "fingerprint"}
        sub = dataclasses.replace(loaded, model=model, adapter=adapter, info=info_, timings={})
        _, out = _prune_stage(stage_plan, sub)
        for key in ("calibration_s", "pruning_s"):
            loaded.timings[key] += sub.timings.get(key, 0.0)
        return out

    return ctx, run_then(plan, outcome, loaded.adapter, costs, stage)


def _prune_stage(plan: Plan, loaded: Loaded) -> tuple[PruneContext, PruneOutcome]:
    """Calibrate and prune with the plan's own method (not its ``then``)."""
    timings = loaded.timings
    settings, components, finish, budget = _budgeted(plan, loaded.adapter, loaded.model)
    ctx = PruneContext(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        adapter=loaded.adapter,
        settings=settings,
        run_recipe=plan.recipe,
        run=plan.run,
        model_info=loaded.info,
        calibration_source=plan.calibration_source,
        perplexity_sources=plan.perplexity_sources,
        timings=timings,
        budget=budget,
    )
    method = plan.method_cls(settings, components)
    t1 = time.perf_counter()
    if plan.recipe.method.target:
        ((kind, value),) = plan.recipe.method.target.items()
        how = f"to {kind} {fmt(kind, value)}" + (
            f" (ratio {settings.ratio:.4f})" if components is plan.components else ""
        )
    else:
        how = f"at ratio {settings.ratio:g}"
    info(f"pruning with {settings.name} {how}")
    try:
        outcome: PruneOutcome = method.prune(ctx)
    except BudgetError as exc:  # a method that meets the target itself could not
        raise plan.loaded.error(("method", "target"), str(exc)) from None
    finish(outcome)
    timings["pruning_s"] = time.perf_counter() - t1 - timings.get("calibration_s", 0.0)
    timings.setdefault("calibration_s", 0.0)
    return ctx, outcome


def prepare(
    recipe: str | os.PathLike | dict | Recipe | LoadedRecipe | Plan, overrides=()
) -> Prepared:
    """Validate a recipe, load its model and prune it: no evaluation, no output written.

    :param recipe: a YAML path, a dict, a :class:`Recipe`, a :class:`LoadedRecipe` or an
        already validated :class:`Plan`.
    :param overrides: ``["a.b=c", ...]`` applied on top (like ``--set``).
    """
    if isinstance(recipe, Plan):
        if overrides:
            raise RecipeError(
                "prepare(): overrides apply to a recipe, not to a validated Plan; "
                "pass the recipe (path, dict or Recipe) with the overrides"
            )
        plan = recipe
    else:
        plan = validate(_as_loaded(recipe, overrides), check_output=False)  # writes nothing
    seed_everything(plan.recipe.seed)
    with plugin_faults(stage="loading and pruning"):
        loaded = load(plan)
        early = recovery_teacher_cache(plan, loaded)
        ctx, outcome = prune_loaded(plan, loaded)
        recover(plan, loaded, outcome, None, early=early)
    return Prepared(plan, loaded, ctx, outcome)


def evaluate_model(
    plan: Plan, model, tokenizer, staging: Path | None = None, adapter=None
) -> tuple[dict, dict]:
    """Perplexity and task metrics of ``model`` (``(metrics, data sha256 per label)``).

    :param adapter: the model's adapter (default: the plan's), which decides ``bos: auto``.
    """
    recipe = plan.recipe
    metrics: dict[str, dict] = {}
    data_hashes: dict[str, str | None] = {}
    adapter = adapter if adapter is not None else plan.adapter_cls
    for i, (cfg, source) in enumerate(
        zip(recipe.evaluation.perplexity, plan.perplexity_sources, strict=True)
    ):
        windows, bos_id = perplexity_windows(plan, i, tokenizer, adapter)
        result = perplexity(
            model,
            windows,
            cfg.batch_size,
            description=f"perplexity {cfg.label}",
            prompt_tokens=cfg.prompt_tokens,
        )
        metrics[cfg.label] = {
            **result,
            "dataset": source.dataset,
            "split": source.split,
            "sampling": cfg.sampling,
            "bos": bos_id is not None,
        }
        data_hashes[cfg.label] = source_sha256(source)
        info(f"{cfg.label}: perplexity {result['ppl']:.3f} over {result['tokens']} tokens")
    lm = recipe.evaluation.lm_eval
    if lm is not None:
        from prunekit.evaluation.lm_eval import evaluate_by_name  # optional dependency

        results = evaluate_by_name(
            model,
            tokenizer,
            lm.tasks,
            manager=plan.lm_eval_manager,
            include_path=lm.include_path,
            include_defaults=lm.include_defaults,
            limit=lm.limit,
            num_fewshot=lm.num_fewshot,
            batch_size=lm.batch_size,
            max_length=lm.max_length,
            seed=recipe.seed,
        )
        metrics.update(results)
        data_hashes.update(dict.fromkeys(results))  # lm-eval keeps its data: no file to hash
    if plan.tasks:
        save_to = staging if recipe.output.save_predictions else None
        metrics.update(evaluate_tasks(model, tokenizer, plan.tasks, save_to))
        for label, _, _ in plan.tasks:
            m = metrics[label]
            data_hashes[label] = None if m["source"] == "hub" else sha256_file(Path(m["location"]))
    return metrics, data_hashes


def _result(
    plan: Plan,
    loaded: Loaded,
    ctx: PruneContext,
    outcome: PruneOutcome,
    metrics: dict,
    runtime: dict | None,
    output_dir: Path,
    reduction: dict,
) -> dict:
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


def recovery_windows(plan: Plan, loaded: Loaded) -> tuple[torch.Tensor, list[int], list[str]]:
    """The recovery windows minus every one sharing a run of tokens with an evaluated text:
    ``(kept, dropped row indices, evaluated labels)``."""
    recipe, r = plan.recipe, plan.recipe.recovery
    tokenizer = loaded.tokenizer
    bos_id = sequence_bos(r.bos, loaded.adapter, tokenizer)
    windows = calibration_windows(
        tokenizer, plan.recovery_source, r.samples, r.seq_len, seed=recipe.seed, bos_id=bos_id
    )
    kept, dropped, excluded = keep_out_evaluated(
        windows, recipe, tokenizer, plan.perplexity_sources
    )
    if dropped:
        info(
            f"recovery: {len(dropped)} of {r.samples} windows share {OVERLAP_TOKENS} tokens "
            "with an evaluated text and are left out"
        )
    return kept, dropped, excluded


def recovery_teacher_cache(plan: Plan, loaded: Loaded):
    """``recovery.kd.cache: true``: the dense model's top-k targets on the recovery windows,
    computed now, before pruning changes ``loaded.model`` (so no second copy is ever held);
    ``(windows, cache)`` for :func:`recover`, or None without a cached teacher."""
    r = plan.recipe.recovery
    kd = r.distillation if r is not None else None
    if kd is None or not kd.cache:
        return None
    t0 = time.perf_counter()
    text = recovery_windows(plan, loaded)
    info(f"recovery: the dense teacher's top-{kd.top_k} on the recovery windows (kd.cache)")
    cache = TeacherCache.build(
        loaded.model, text[0], r, seed=plan.recipe.seed, source="the dense model, before pruning"
    )
    loaded.timings["recovery_teacher_s"] = time.perf_counter() - t0
    return text, cache


def _online_teacher(plan: Plan, dense) -> OnlineTeacher:
    """The dense parent beside the student: the dense copy kept for interleaved timing when
    there is one (no extra memory), else the recipe's model loaded again."""
    m, kd = plan.recipe.model, plan.recipe.recovery.distillation
    if dense is not None:
        return OnlineTeacher(dense, kd.top_k, "the dense copy kept for timing")
    info(f"recovery: loading the dense teacher {m.id} again (recovery.kd.cache: true avoids it)")
    lm = load_model(
        m.id,
        dtype=m.dtype,
        device=m.device,
        attn_implementation=m.attn_implementation,
        max_memory=m.max_memory,
    )
    return OnlineTeacher(lm.model, kd.top_k, f"{m.id} loaded again")


def recover(
    plan: Plan,
    loaded: Loaded,
    outcome: PruneOutcome,
    output_dir: Path | None,
    dense=None,
    early=None,
) -> tuple[dict | None, Any]:
    """The ``recovery:`` step on a pruned model: LoRA fine-tuning on the recovery corpus minus
    anything an evaluation reads, merged into ``outcome.model``'s weights. Returns the
    ``recovery`` section of results.json and the trainer (whose checkpoints the caller removes
    once the results are safe), or ``(None, None)`` without a recovery section.

    :param dense: the dense copy the run already holds (interleaved timing), the online
        teacher of ``recovery.loss: kd`` or ``ce+kd`` if given; otherwise it is loaded again
        for the fine-tune and freed after it.
    :param early: what :func:`recovery_teacher_cache` returned before pruning."""
    recipe, r = plan.recipe, plan.recipe.recovery
    if r is None:
        return None, None
    t0 = time.perf_counter()
    if early is not None:
        (kept, dropped, excluded), teacher = early
    else:
        kept, dropped, excluded = recovery_windows(plan, loaded)
        teacher = _online_teacher(plan, dense) if r.distillation is not None else None
    if r.checkpoint_every == 0:
        ckpt = None
    elif r.checkpoint_dir:
        ckpt = Path(r.checkpoint_dir)
    else:
        ckpt = default_checkpoint_dir(output_dir) if output_dir is not None else None
    identity = {
        "model": recipe.model.model_dump(mode="json"),
        "method": recipe.method.model_dump(mode="json"),
    }
    trainer = LoraTrainer(
        outcome.model,
        r,
        kept,
        seed=recipe.seed,
        checkpoint_dir=ckpt,
        identity=identity,
        teacher=teacher,
    )
    teacher = early = None  # the trainer holds it, and drops it after training
    try:
        record = trainer.train()
    finally:
        trainer.release_teacher()
    outcome.model, diff = trainer.merge(check=kept[:1].to(input_device(outcome.model)))
    # with kd.cache, the teacher's pass over the windows (before pruning) is part of the step
    loaded.timings["recovery_s"] = (
        time.perf_counter() - t0 + loaded.timings.get("recovery_teacher_s", 0.0)
    )
    record.update(
        {
            "corpus": plan.recovery_source.describe(),
            "carve_out": {
                "excluded": excluded,
                "overlap_tokens": OVERLAP_TOKENS,
                "windows_dropped": len(dropped),
            },
            "merged": True,
            "merge_max_abs_logit_diff": diff,
            "checkpoint_dir": None if ckpt is None else str(ckpt),
        }
    )
    info(
        f"recovery: {record['steps']} steps, loss {record['loss_first']:.3f} -> "
        f"{record['loss_last']:.3f}, merged (logits differ by at most {diff:.2e})"
    )
    return record, trainer


def run_plan(
    plan: Plan,
    output_dir: Path,
    pm=None,
    evaluate: bool = True,
    generation: GenerationBench | None = None,
) -> dict:
    """Execute a validated plan, writing every output into ``output_dir`` atomically.

    Stages: load, calibrate and prune, recover, evaluate, time dense and pruned interleaved,
    write (into a staging directory renamed into place at the end; nothing is left behind on
    failure).

    :param evaluate: False skips perplexity and tasks (``prunekit bench``: runtime only).
    :param generation: also time greedy generation, dense and pruned (``generation`` section:
        prefill and decode seconds and tokens/s). A dynamic model's dense runs interleave
        with its pruned runs (its ``dense()`` layers); a static method's dense model is timed
        before it is pruned in place.
    """
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
            batches = timing_batches(plan, loaded)
            dense_ref = dense_reference(
                plan, loaded, bool(batches) or generation is not None, batches
            )
            gen_inputs = gen_dense = None
            if generation is not None:
                gen_inputs = generation_inputs(plan, loaded, generation)
                gen_dense = dense_generation(generation, loaded, gen_inputs, dense_ref)
        with plugin_faults(pm, "recovery"):
            early = recovery_teacher_cache(plan, loaded)  # the dense model, before pruning
        with plugin_faults(pm, "calibration and pruning"):
            ctx, outcome = prune_loaded(plan, loaded)
        with plugin_faults(pm, "recovery"):
            recovery, trainer = recover(plan, loaded, outcome, output_dir, dense_ref.model, early)
            early = None
        t2 = time.perf_counter()
        with plugin_faults(pm, "evaluation"):
            metrics, data_hashes = (
                evaluate_model(plan, outcome.model, loaded.tokenizer, staging, loaded.adapter)
                if evaluate
                else ({}, {})
            )
        loaded.timings["evaluation_s"] = time.perf_counter() - t2
        loaded.timings["total_s"] = time.perf_counter() - t0
        with plugin_faults(pm, "timing"):
            reduction = _reduction(plan, loaded, outcome)
            runtime = runtime_section(plan, outcome, batches, dense_ref, ctx.device, reduction)
        result = _result(plan, loaded, ctx, outcome, metrics, runtime, output_dir, reduction)
        if recovery is not None:
            result["recovery"] = recovery
        if generation is not None:
            with plugin_faults(pm, "timing generation"):
                result["generation"] = generation_section(
                    generation, outcome, dense_ref, gen_inputs, gen_dense
                )
        dense_ref = None  # the dense copy is not needed any more
        _write(plan, loaded, ctx, outcome, result, data_hashes, staging, output_dir, pm)
        _publish(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if trainer is not None and not recipe.recovery.keep_checkpoints:
        trainer.remove_checkpoints()  # the results are in place: nothing left to resume
    pm.hook.prunekit_result_ready(result=result, output_dir=str(output_dir))
    return result


def _write(
    plan: Plan,
    loaded: Loaded,
    ctx: PruneContext,
    outcome: PruneOutcome,
    result: dict,
    data_hashes: dict,
    staging: Path,
    output_dir: Path,
    pm,
) -> None:
    """The write stage: the saved model (``output.save_model``), results.json, provenance.json
    and the recipe, into the staging directory."""
    provenance = _provenance(plan, loaded, ctx, data_hashes)
    if plan.recipe.output.save_model and outcome.save is not None:
        with plugin_faults(pm, "saving"):
            outcome.save(str(staging / "model"))
        result["saved_model"] = str(output_dir / "model")
    _write_json(staging / "results.json", result)
    _write_json(staging / "provenance.json", provenance)
    (staging / "recipe.yaml").write_text(dump_recipe(plan.recipe))


def _publish(staging: Path, output_dir: Path) -> None:
    """Move a finished staging directory into place (replacing an older run's outputs)."""
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        os.replace(output_dir, old)
        os.replace(staging, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output_dir)


def apply(
    recipe: str | os.PathLike | dict | Recipe | LoadedRecipe,
    overrides=(),
    output: str | os.PathLike | None = None,
) -> dict:
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


def prune(
    model,
    tokenizer=None,
    method: str = "dense",
    ratio: float = 0.0,
    calibration: dict | torch.Tensor | None = None,
    seed: int = 0,
    **method_keys,
) -> PruneOutcome:
    """Prune an in-memory Hugging Face causal LM without a recipe file.

    :param method: a registered method name; ``method_keys`` are further ``method.*`` recipe
        keys (``skip_layers=[...]``, ``probe={"name": "random"}``, ``mode="sync"``...).
    :param calibration: ``calibration.*`` recipe keys as a dict, or a ``[N, T]`` tensor of
        token windows to calibrate on directly.
    :returns: a :class:`PruneOutcome` whose ``model`` answers like a Hugging Face causal LM.
    """
    data: dict[str, Any] = {
        "method": {"name": method, "ratio": ratio, **method_keys},
        "seed": seed,
        "evaluation": {"perplexity": []},
    }
    if isinstance(calibration, dict):
        data["calibration"] = calibration
    elif isinstance(calibration, torch.Tensor) and calibration.dim() == 2:
        # the windows given are the calibration set: methods read its size from the recipe
        # (e.g. a running-mean history counts them)
        data["calibration"] = {
            "samples": int(calibration.shape[0]),
            "seq_len": max(int(calibration.shape[1]), 2),
        }
    loaded = load_recipe(data)
    plan = validate(
        loaded,
        check_files=not isinstance(calibration, torch.Tensor),
        model=model,
        check_output=False,
    )
    if isinstance(calibration, torch.Tensor):
        plan.calibration_source = None
    seed_everything(seed)

    # the fingerprint keys the calibration cache, so notebooks share statistics across calls
    info = {"fingerprint": model_fingerprint(model)} if plan.method_cls.uses_calibration else {}
    adapter = plan.adapter_cls(model) if plan.adapter_cls else resolve_adapter(model)
    override = calibration if isinstance(calibration, torch.Tensor) else None

    def run(stage_plan: Plan, stage_model, stage_adapter, model_info: dict) -> PruneOutcome:
        """One stage's method (the plan's own, or a ``method.then`` stage's)."""
        settings, components, finish, budget = _budgeted(stage_plan, stage_adapter, stage_model)
        ctx = PruneContext(
            model=stage_model,
            tokenizer=tokenizer,
            adapter=stage_adapter,
            settings=settings,
            run_recipe=stage_plan.recipe,
            run=stage_plan.run,
            model_info=model_info,
            calibration_source=plan.calibration_source,
            calibration_windows_override=override,
            budget=budget,
        )
        if tokenizer is None and method_needs_tokenizer(stage_plan, calibration):
            raise RecipeError("prune(): give a tokenizer, or calibration windows as a tensor")
        with plugin_faults(stage="pruning"):
            try:
                out = stage_plan.method_cls(settings, components).prune(ctx)
            except BudgetError as exc:  # a method that meets the target itself could not
                raise stage_plan.loaded.error(("method", "target"), str(exc)) from None
        finish(out)
        return out

    costs = dense_costs(plan, adapter, model)
    outcome = run(plan, model, adapter, info)
    if plan.then is not None:  # later stages: their own statistics, never cached ones
        outcome = run_then(plan, outcome, adapter, costs, lambda p, m, a: run(p, m, a, {}))
    return outcome


def method_needs_tokenizer(plan: Plan, calibration) -> bool:
    return plan.method_cls.uses_calibration and not isinstance(calibration, torch.Tensor)


#: names that lived here before the runner was split, and where they live now; importing
#: them from here still works for one release, with a DeprecationWarning
#: (the runner still imports and serves sequence_bos, structure_reduction, head_macs,
#: perplexity_windows and evaluate_tasks itself; they now live in prunekit.data,
#: prunekit.evaluation.costs, prunekit.plan and prunekit.evaluation.zeroshot)
_MOVED = {
    "problem_error": "prunekit.plan",
    "unmet_needs": "prunekit.plan",
    "model_context": "prunekit.plan",
    "output_problem": "prunekit.plan",
    "AVERAGE_KEY": "prunekit.evaluation.zeroshot",
    "DenseTiming": "prunekit.timing",
}


def __getattr__(name: str):
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"prunekit.runner.{name} moved to {module}.{name}; import it from there "
        "(the old path goes in the next release)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)


__all__ = [
    "GenerationBench",
    "Loaded",
    "Plan",
    "Prepared",
    "PruneContext",
    "PrunekitError",
    "apply",
    "evaluate_model",
    "load",
    "per_layer_ratio",
    "prepare",
    "prune",
    "prune_loaded",
    "resolve_adapter",
    "run_plan",
    "seed_everything",
    "validate",
]
