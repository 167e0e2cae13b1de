"""LoRAPrune (Zhang et al., 2023) as a prunekit plugin: structured pruning decided from LoRA
weights and their gradients during a LoRA fine-tune.

**Importance.** LoRA adapters (peft) are put on the linear layers and trained on the
calibration windows. After each step's backward pass, every adapted weight ``W`` (with LoRA
factors ``B`` [out, r], ``A`` [r, in], scaling ``s``) gets the element importance
``|Ĝ ⊙ (W + s·BA)|`` with the LoRA-guided gradient estimate
``Ĝ = ∂L/∂B · A + B · ∂L/∂A − ∂L/∂B · ∂L/∂A``: the frozen weights need no gradient, which is
the point of the method. A unit's score sums this over its coupled group (the adapter's
``LayerAdapter.unit_slices``: the q (and k/v with MHA) rows and o columns of a head, the
gate/up rows and down column of a channel), each tensor's unit vector divided by its L2 norm
as in the reference; scores are averaged over steps with an EMA (``ema``, 0.9).

**Schedule.** Every ``prune_every`` steps the kept counts follow a cubic schedule from no
pruning (until ``start`` of the steps) to ``method.ratio`` (reached at ``1 - end`` of the
steps, then held), with the same allocation rules as every other method (the ``allocator``
slot: uniform per layer, ``skip_layers`` never pruned, the inflated per-layer ratio,
``round_to``). Pruned units are masked (the input channels of their output projection are
zeroed) and never come back. At the end the model is **physically** pruned to the last masks,
so it is really smaller and faster (the reference only masks).

**w/o LoRA, with LoRA.** ``keep_lora: false`` (the default, the paper's "w/o LoRA" rows)
drops the adapters: the pruned structure with the original weights. ``keep_lora: true`` merges
them into the kept weights first; then, as in ``recovery:``, no calibration window that shares
a run of 32 tokens with an evaluated text is trained on (the count dropped is recorded).
``recovery:`` can fine-tune either afterwards.

The fine-tune is prunekit's :class:`prunekit.recovery.LoraTrainer` (seeded, checkpointed,
resumable); ``method.finetune`` takes its keys (steps, batch_size, lr, rank, alpha, ...).
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from pydantic import ValidationError

from prunekit.plugin import (
    OVERLAP_TOKENS,
    Allocation,
    FineTuneConfig,
    LoraTrainer,
    StaticMethod,
    check_target_modules,
    hookimpl,
)

#: the reference's EMA weight of the previous importance
EMA = 0.9


def lora_weight_importance(module) -> torch.Tensor | None:
    """``|Ĝ ⊙ (W + s·BA)|`` of a peft LoRA linear layer (``[out, in]``, fp32), with
    ``Ĝ = gB·A + B·gA − gB·gA``; None when its factors have no gradient yet."""
    name = module.active_adapters[0]
    A, B = module.lora_A[name].weight, module.lora_B[name].weight
    if A.grad is None or B.grad is None:
        return None
    a, b, ga, gb = (t.detach().float() for t in (A, B, A.grad, B.grad))
    grad = gb @ a + b @ ga - gb @ ga
    weight = module.get_base_layer().weight.detach().float()
    return (grad * (weight + module.scaling[name] * (b @ a))).abs()


def unit_importance(layer, group: str, lora_of: dict[int, object]) -> torch.Tensor | None:
    """Each unit's LoRA-guided importance: per adapted tensor of the unit's coupled group
    (``layer.unit_slices``), the element importances summed per unit and divided by their L2
    norm, then summed over the tensors. ``lora_of`` maps ``id(base weight)`` to its LoRA layer;
    tensors without an adapter (biases, layers left out of ``target_modules``) add nothing."""
    total = None
    for piece in layer.unit_slices(group):
        module = lora_of.get(id(piece.tensor))
        if module is None:
            continue
        element = lora_weight_importance(module)
        if element is None:
            continue
        per_unit = element.sum(1 - piece.dim).view(-1, piece.width).sum(1)
        per_unit = per_unit / (torch.linalg.vector_norm(per_unit) + 1e-8)
        total = per_unit if total is None else total + per_unit
    return total


def scheduled_ratio(step: int, steps: int, final: float, start: float, end: float) -> float:
    """The cubic schedule: 0 up to ``start * steps``, ``final`` from ``(1 - end) * steps``,
    ``final * (1 - (1 - progress)**3)`` between."""
    first, last = start * steps, (1 - end) * steps
    if step <= first:
        return 0.0
    if step >= last:
        return final
    progress = (step - first) / (last - first)
    return final * (1 - (1 - progress) ** 3)


class LoraPrune(StaticMethod):
    """LoRAPrune: LoRA-gradient importance, iterative masking on a cubic schedule during a
    LoRA fine-tune, physical pruning at the end."""

    name = "loraprune"
    slots = {"allocator": "uniform"}
    option_defaults = {
        "finetune": {},
        "seq_len": None,
        "prune_every": 10,
        "start": 0.1,
        "end": 0.2,
        "ema": EMA,
        "keep_lora": False,
    }

    @classmethod
    def check_recipe(cls, recipe, num_layers):
        o = {**cls.option_defaults, **recipe.method.options}
        problems = []
        try:
            finetune = FineTuneConfig(**(o["finetune"] or {}))
        except (ValidationError, TypeError) as exc:
            detail = (
                "; ".join(e["msg"] + f" ({'.'.join(map(str, e['loc']))})" for e in exc.errors())
                if isinstance(exc, ValidationError)
                else exc
            )
            problems.append(f"method.finetune: {detail}")
        else:
            problem = check_target_modules(recipe.model.id, finetune.target_modules)
            if problem:
                problems.append(f"method.finetune.target_modules: {problem}")
        if not isinstance(o["prune_every"], int) or o["prune_every"] < 1:
            problems.append(
                f"method.prune_every: a positive number of steps (got {o['prune_every']!r})"
            )
        for key in ("start", "end"):
            if not isinstance(o[key], (int, float)) or not 0 <= o[key] < 1:
                problems.append(f"method.{key}: a fraction of the steps in [0, 1) (got {o[key]!r})")
        if not problems and o["start"] + o["end"] >= 1:
            problems.append(
                f"method.end: method.start + method.end ({o['start']} + {o['end']}) "
                "must be below 1 to leave steps to prune in; lower one of them"
            )
        if not isinstance(o["ema"], (int, float)) or not 0 <= o["ema"] < 1:
            problems.append(f"method.ema: in [0, 1) (got {o['ema']!r})")
        seq = o["seq_len"]
        if seq is not None and (
            not isinstance(seq, int) or not 2 <= seq <= recipe.calibration.seq_len
        ):
            problems.append(
                f"method.seq_len: at least 2 and at most calibration.seq_len "
                f"({recipe.calibration.seq_len}) (got {seq!r})"
            )
        if not isinstance(o["keep_lora"], bool):
            problems.append(f"method.keep_lora: true or false (got {o['keep_lora']!r})")
        from importlib.util import find_spec

        if find_spec("peft") is None:
            problems.append(
                "method.name: loraprune needs peft, which is not installed: "
                "pip install 'prunekit[recovery]'"
            )
        return problems

    def statistics(self):
        return []

    def prune(self, ctx):
        settings, o = self.settings, {**self.option_defaults, **self.settings.options}
        if settings.ratio == 0:
            return super().prune(ctx)
        t0 = time.perf_counter()
        finetune = FineTuneConfig(**(o["finetune"] or {}))
        windows = ctx.calibration_windows()
        if o["seq_len"]:
            windows = windows[:, : o["seq_len"]]
        dropped: list[int] = []
        excluded: list[str] = []
        # without a tokenizer (prune() given windows as a tensor) no evaluated text is known
        checked = bool(o["keep_lora"]) and ctx.tokenizer is not None
        if checked:
            # the merged adapters are trained weights: like recovery, never train them on an
            # evaluated text. Without them (w/o LoRA) the windows only steer which units are
            # kept, as every method's calibration text does, and all of them are used.
            windows, dropped, excluded = ctx.keep_out_evaluated(
                windows, what="loraprune (keep_lora: true)"
            )
        ckpt = None
        if finetune.checkpoint_every:
            ckpt = ctx.checkpoint_dir("loraprune", finetune.checkpoint_dir)
        trainer = LoraTrainer(
            ctx.model,
            finetune,
            windows,
            seed=ctx.seed,
            checkpoint_dir=ckpt,
            identity=ctx.identity(),
            description="loraprune",
        )
        adapter = type(ctx.adapter)(ctx.model)  # sees the LoRA layers in place
        lora_of = {
            id(m.get_base_layer().weight): m
            for m in trainer.peft_model.modules()
            if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")
        }
        skip = set(settings.skip_layers)
        layers = [layer for layer in adapter.layers() if layer.index not in skip]
        keys = [(layer.index, group) for layer in layers for group in layer.groups]
        masks = {
            (layer.index, g): torch.ones(layer.units(g), dtype=torch.bool)
            for layer in layers
            for g in layer.groups
        }
        scores = {k: torch.zeros(m.numel()) for k, m in masks.items()}
        events: list[dict] = []
        allocator = self.components["allocator"]
        ema, every = float(o["ema"]), int(o["prune_every"])
        steps = finetune.steps

        def hook_for(layer, group):
            width = layer.unit_width(group)

            def hook(module, args):
                mask = masks[(layer.index, group)]
                if bool(mask.all()):
                    return None
                channel = mask.repeat_interleave(width).to(args[0].device, args[0].dtype)
                return (args[0] * channel, *args[1:])

            return hook

        handles = [
            layer.output_projection(g).register_forward_pre_hook(hook_for(layer, g))
            for layer in layers
            for g in layer.groups
        ]

        def mask_to(ratio: float, step: int) -> None:
            ranked = {k: torch.where(masks[k], scores[k], torch.tensor(-math.inf)) for k in keys}
            at = dataclasses.replace(settings, ratio=ratio)
            kept = allocator(ranked, adapter, at).kept
            for k in keys:
                new = torch.zeros_like(masks[k])
                new[kept[k] if k in kept else torch.arange(new.numel())] = True
                masks[k] = new & masks[k]
            events.append(
                {
                    "step": step,
                    "ratio": ratio,
                    "kept": {f"{i}.{g}": int(masks[(i, g)].sum()) for i, g in keys},
                }
            )

        def on_gradients(step: int) -> None:
            for layer in layers:
                for group in layer.groups:
                    imp = unit_importance(layer, group, lora_of)
                    if imp is not None and bool(torch.isfinite(imp).all()):
                        key = (layer.index, group)
                        scores[key] = ema * scores[key] + (1 - ema) * imp.cpu()
            ratio = scheduled_ratio(step, steps, settings.ratio, o["start"], o["end"])
            due = step % every == 0 or step == steps
            if due and ratio > 0 and (not events or ratio > events[-1]["ratio"]):
                mask_to(ratio, step)

        def get_state() -> dict:
            return {
                "masks": {f"{i}.{g}": masks[(i, g)] for i, g in keys},
                "scores": {f"{i}.{g}": scores[(i, g)] for i, g in keys},
                "events": events,
            }

        def set_state(state: dict) -> None:
            for i, g in keys:
                masks[(i, g)] = state["masks"][f"{i}.{g}"].bool()
                scores[(i, g)] = state["scores"][f"{i}.{g}"]
            events[:] = state["events"]

        try:
            record = trainer.train(on_gradients, (get_state, set_state))
            if not events or events[-1]["ratio"] < settings.ratio:  # steps too few to reach it
                mask_to(settings.ratio, steps)
        finally:
            for handle in handles:
                handle.remove()
        if o["keep_lora"]:
            ctx.model, _ = trainer.merge()
        else:
            ctx.model = trainer.unload()
        if not finetune.keep_checkpoints:
            trainer.remove_checkpoints()
        ctx.adapter = type(ctx.adapter)(ctx.model)
        allocation = Allocation(
            {k: m.nonzero().flatten() for k, m in masks.items() if not bool(m.all())}
        )
        ctx.timings["finetune_s"] = time.perf_counter() - t0
        outcome = self.sliced_outcome(ctx, allocation)
        outcome.extra["loraprune"] = {
            "keep_lora": bool(o["keep_lora"]),
            "schedule": events,
            "carve_out": {
                "checked": checked,
                "excluded": excluded,
                "overlap_tokens": OVERLAP_TOKENS,
                "windows_dropped": len(dropped),
            },
            "finetune": {k: v for k, v in record.items() if k != "settings"},
            "finetune_settings": record["settings"],
        }
        return outcome


@hookimpl
def prunekit_register_methods(register):
    register("loraprune", LoraPrune)
