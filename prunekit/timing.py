"""The timing stage of a run: dense and pruned timed side by side, interleaved, on the same
batches (the ``runtime`` section of results.json), and greedy generation timed the same way
(``prunekit bench --generate``: the ``generation`` section)."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from prunekit.components import PruneOutcome
from prunekit.data import sequence_bos
from prunekit.devices import input_device
from prunekit.errors import PluginError, RecipeError
from prunekit.evaluation.generation import decode_bytes, greedy, left_padded, time_generation
from prunekit.evaluation.runtime import (
    Contender,
    memory_info,
    phase_medians,
    summarize,
    time_batches,
    time_interleaved,
)
from prunekit.plan import Plan, perplexity_windows
from prunekit.progress import info
from prunekit.stages import Loaded


def timing_batches(plan: Plan, loaded: Loaded) -> list[torch.Tensor]:
    """The first ``runtime.batches`` batches of the first perplexity dataset."""
    recipe = plan.recipe
    if not (recipe.runtime.batches and recipe.evaluation.perplexity):
        return []
    w0, _ = perplexity_windows(plan, 0, loaded.tokenizer, loaded.adapter)
    return list(torch.split(w0, recipe.evaluation.perplexity[0].batch_size))[
        : recipe.runtime.batches
    ]


@dataclass
class DenseTiming:
    """What the runtime section compares the pruned model with: a dense copy kept for
    interleaved timing, or dense times taken before pruning (``runtime.interleave: false``)."""

    model: torch.nn.Module | None = None
    times: list[float] | None = None
    memory: dict | None = None


def dense_reference(plan: Plan, loaded: Loaded, timed: bool, batches) -> DenseTiming:
    """Before pruning, when anything is ``timed``: nothing for a baseline or a dynamic method
    (its dense layers stay: ``dense()``); for a static method (which prunes in place) a dense
    copy; with ``runtime.interleave: false`` the dense times on ``batches`` themselves."""
    rt = plan.recipe.runtime
    if not timed or plan.method_cls.baseline or (plan.method_cls.dynamic and rt.interleave):
        return DenseTiming()
    if rt.interleave:
        info(
            "keeping a dense copy for interleaved timing (runtime.interleave: false saves "
            "the memory)"
        )
        return DenseTiming(model=copy.deepcopy(loaded.model))
    info("timing the dense model (before pruning: not interleaved)")
    times = time_batches(loaded.model, batches, rt.warmup, rt.repeats) if batches else []
    return DenseTiming(times=times, memory=memory_info(loaded.model))


def runtime_section(
    plan: Plan, outcome: PruneOutcome, batches, dense: DenseTiming, device, reduction: dict
) -> dict | None:
    """The ``runtime`` section: dense and pruned timed on the same batches, in interleaved
    rounds (a dynamic model's dense reference is its own ``dense()`` layers; a static method's
    is the dense copy kept before pruning), or the pruned model alone against the dense times
    taken before pruning (``runtime.interleave: false``)."""
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
    info(
        f"timing {' and '.join(c.name for c in contenders)}: {len(batches)} batch(es) x "
        f"{rt_cfg.repeats} interleaved round(s) after {rt_cfg.warmup} warm-up call(s)"
    )
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
    runtime = summarize(
        dense_times,
        pruned_times,
        tuple(batches[0].shape),
        phase_medians(timed["pruned"]["phases_s_all"]),
        rt_cfg.repeats,
        flops_kept_fraction=reduction.get("forward_flops_kept_fraction"),
        interleaved=dense.times is None,
    )
    runtime["memory"] = {"dense": dense_memory or pruned_memory, "pruned": pruned_memory}
    runtime["device"] = str(device)
    if outcome.figures is not None:  # the method's own figures (e.g. PP's probe FLOPs)
        figures = outcome.figures(*batches[0].shape)
        clash = sorted(set(figures) & set(runtime))
        if clash:
            raise PluginError(
                f"method {plan.settings.name!r} reports runtime figures {clash}, "
                "which the runner already writes; rename them in the method"
            )
        runtime.update(figures)
    return runtime


@dataclass
class GenerationBench:
    """What ``prunekit bench --generate`` times: greedy generation from ``prompts`` (default:
    the first batch of ``evaluation.perplexity[0]``'s windows cut to ``prompt_tokens``)."""

    prompts: list[str] | None = None
    prompt_tokens: int = 64
    max_new_tokens: int = 32
    rounds: int = 3
    warmup: int = 1


def generation_inputs(plan: Plan, loaded: Loaded, spec: GenerationBench):
    if spec.prompts:
        bos = sequence_bos("auto", loaded.adapter, loaded.tokenizer)
        ids, mask = left_padded(loaded.tokenizer, spec.prompts, bos, spec.prompt_tokens)
    else:
        if not plan.recipe.evaluation.perplexity:
            raise RecipeError(
                "bench --generate without --prompt takes its prompts from "
                "evaluation.perplexity[0], and the recipe has none; add one "
                "or give --prompt"
            )
        windows, _ = perplexity_windows(plan, 0, loaded.tokenizer, loaded.adapter)
        ids = windows[: plan.recipe.evaluation.perplexity[0].batch_size, : spec.prompt_tokens]
        mask = torch.ones_like(ids)
    device = input_device(loaded.model)
    return ids.to(device), mask.to(device)


def generation_bytes(spec: GenerationBench, models: dict, ids, mask) -> dict:
    """What a decoding step of each model reads (weights, KV cache) and holds beyond its own
    weights (:func:`prunekit.evaluation.generation.decode_bytes`)."""
    return {
        name: decode_bytes(model, ids, mask, spec.max_new_tokens, dense=dense)
        for name, (model, dense) in models.items()
    }


def time_generation_of(spec: GenerationBench, models: dict, ids, mask) -> dict:
    def runner(model, dense: bool):
        def run():
            # a dynamic model's state is left as it was (timing leaves no trace)
            keep = getattr(model, "preserved_state", None)
            with (
                model.dense() if dense else contextlib.nullcontext(),
                keep() if keep else contextlib.nullcontext(),
            ):
                return greedy(model, ids, mask, spec.max_new_tokens)

        return run

    runs = {name: runner(model, dense) for name, (model, dense) in models.items()}
    return time_generation(
        runs,
        int(mask.sum()),
        mask.shape[0] * (spec.max_new_tokens - 1),
        rounds=spec.rounds,
        warmup=spec.warmup,
    )


def dense_generation(
    spec: GenerationBench, loaded: Loaded, inputs, dense: DenseTiming
) -> dict | None:
    """Greedy generation of the dense model timed before pruning, when the run does not
    interleave (``runtime.interleave: false``); None otherwise (then it is timed beside the
    pruned model by :func:`generation_section`)."""
    if dense.times is None:
        return None
    models = {"dense": (loaded.model, False)}
    timed = time_generation_of(spec, models, *inputs)
    timed["dense"]["step"] = generation_bytes(spec, models, *inputs)["dense"]
    return timed


def generation_section(
    spec: GenerationBench,
    outcome: PruneOutcome,
    dense: DenseTiming,
    inputs,
    dense_timed: dict | None,
) -> dict:
    """The ``generation`` section of results.json: prefill and decode times of dense and
    pruned (interleaved with the dense copy or a dynamic model's ``dense()`` layers, unless
    ``dense_timed`` holds the dense times taken before pruning), bytes per step, speed-ups."""
    models = {"pruned": (outcome.model, False)}
    if dense_timed is None:  # interleaved with the dense copy or dense() layers
        dense_model = dense.model or outcome.model
        models = {"dense": (dense_model, dense.model is None), **models}
    timed = time_generation_of(spec, models, *inputs)
    for name, step in generation_bytes(spec, models, *inputs).items():
        timed[name]["step"] = step
    timed = {**(dense_timed or {}), **timed}
    return {
        "batch": int(inputs[0].shape[0]),
        "prompt_tokens": int(inputs[1].sum()),
        "max_new_tokens": spec.max_new_tokens,
        "rounds": spec.rounds,
        "interleaved": dense_timed is None,
        **timed,
        "decode_speedup": timed["dense"]["decode_s"] / timed["pruned"]["decode_s"],
        "decode_bytes_limit": (
            timed["dense"]["step"]["total_bytes"] / timed["pruned"]["step"]["total_bytes"]
        ),
        "prefill_speedup": timed["dense"]["prefill_s"] / timed["pruned"]["prefill_s"],
    }
