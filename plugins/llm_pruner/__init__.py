"""LLM-Pruner (Ma et al., NeurIPS 2023) without fine-tuning, as a prunekit plugin.

First-order Taylor importance ``|w · ∂L/∂w|`` of the causal-LM loss on a few calibration
windows (the reference: 10 windows of 128 tokens), summed over every parameter of a coupled
group, then uniform allocation and physical pruning like the other static methods.

Coupled groups come from the model adapter (``LayerAdapter.unit_slices``): for an attention
head its rows of q (and of k/v with MHA; with GQA the k/v heads are shared by several query
heads and never pruned, so the query-to-KV mapping is kept) and its columns of o; for an MLP
channel its rows of gate/up (fc1) and its column of down (fc2); biases included. The score of a
unit is ``Σ |w · grad|`` over every entry of its group (torch-pruning's ``GroupTaylorImportance``
with ``group_reduction="sum"``, no normaliser). We sum over the adapter's declared slices
instead of tracing torch-pruning's dependency graph: the graph needs a self-contained,
traceable MLP module (OPT has none: fc1/fc2 sit on the decoder layer) and does not couple
q/k/v to o through the attention matmuls (torch-pruning 1.6), while the adapter's roles cover
every architecture the same way. On LLaMA both give the same groups; tests/test_llm_pruner.py
checks the MLP scores against torch-pruning's.

``block_range: [start, end]`` reproduces the reference's semantics: only layers
``start <= l < end`` are pruned (reference: 4..30 of 32) at the nominal ratio, with no
inflation; the achieved parameter and FLOP reduction is then lower than the nominal ratio (it
is reported in results.json). By default prunekit uses the same skipped layers and inflated
ratio as the other methods, so compared methods remove the same structures.
"""

from __future__ import annotations

import time

import torch

from prunekit.plugin import (
    ModelError,
    RecipeError,
    StaticMethod,
    hookimpl,
    input_device,
    is_offloaded,
)


def unit_taylor(layer, group: str) -> torch.Tensor:
    """``Σ |w · grad|`` over each unit's coupled group (``layer.unit_slices(group)``), fp32."""
    imp = None
    for piece in layer.unit_slices(group):
        tensor = piece.tensor
        if tensor.grad is None:
            raise RuntimeError(
                f"layer {layer.index} {group}: no gradient on {piece.role}; run "
                "the loss backward first"
            )
        taylor = (tensor.detach().float() * tensor.grad.detach().float()).abs()
        per_row = taylor.sum(1 - piece.dim) if taylor.dim() == 2 else taylor  # [units * width]
        per_unit = per_row.view(-1, piece.width).sum(1)
        imp = per_unit if imp is None else imp + per_unit
    return imp


class GroupTaylor:
    """Σ |w · grad| over the coupled group of each unit (needs gradients on the weights)."""

    #: the weights' ``.grad``, which only a method that runs backward passes provides
    needs = ("gradients",)

    def prepare(self, layer, group: str):
        imp = unit_taylor(layer, group)

        def score(stats: dict[str, torch.Tensor]) -> torch.Tensor:
            return imp

        return score


class LlmPruner(StaticMethod):
    """LLM-Pruner (no LoRA): Taylor importance of coupled groups, physical pruning."""

    name = "llm-pruner"
    slots = {"metric": "taylor", "allocator": "uniform", "compensator": "none"}
    provides = ("gradients",)
    option_defaults = {"grad_samples": 10, "grad_seq_len": 128, "block_range": None}

    @classmethod
    def check_recipe(cls, recipe, num_layers):
        o = recipe.method.options
        problems = []
        for key in ("grad_samples", "grad_seq_len"):
            value = o.get(key, cls.option_defaults[key])
            if not isinstance(value, int) or value < (2 if key == "grad_seq_len" else 1):
                problems.append(f"method.{key}: must be a positive integer (got {value!r})")
        rng = o.get("block_range")
        if rng is not None:
            ok = isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) for v in rng)
            if not ok or not 0 <= rng[0] < rng[1] or (num_layers and rng[1] > num_layers):
                problems.append(
                    f"method.block_range: give [start, end) layer indices within "
                    f"the model's {num_layers or '?'} layers (got {rng!r})"
                )
        return problems

    @classmethod
    def layer_ratio(cls, recipe, num_layers):
        if recipe.method.options.get("block_range") is not None:
            return recipe.method.ratio  # the nominal ratio inside the range
        return super().layer_ratio(recipe, num_layers)

    def __init__(self, settings, components) -> None:
        super().__init__(settings, components)
        rng = settings.options.get("block_range")
        if rng is not None:
            allocator = components["allocator"]
            if not hasattr(allocator, "inflate"):
                raise RecipeError(
                    "method.block_range needs an allocator with an 'inflate' "
                    "option (e.g. 'uniform')"
                )
            allocator.inflate = False  # the reference applies the nominal ratio in the range

    def prune(self, ctx):
        rng = self.settings.options.get("block_range")
        if rng is not None:
            self.settings.skip_layers = [
                i for i in range(ctx.adapter.num_layers) if not rng[0] <= i < rng[1]
            ]
        try:
            outcome = super().prune(ctx)
            outcome.extra["skipped_layers"] = list(self.settings.skip_layers)
            return outcome
        finally:
            for p in getattr(self, "_params", []):
                p.grad = None

    def calibrate(self, ctx) -> dict:
        """Accumulate gradients of the LM loss on the gradient windows (only on the tensors of
        the pruned layers' coupled groups, ``unit_slices``: weights and biases), then let the
        metric read them."""
        start = time.perf_counter()
        model = ctx.model
        skip = set(self.settings.skip_layers)
        pruned = [layer for layer in ctx.adapter.layers() if layer.index not in skip]
        offloaded = [layer.index for layer in pruned if is_offloaded(layer.module)]
        if offloaded:
            raise ModelError(
                f"llm-pruner needs the gradients of the weights it scores, and the weights of "
                f"layers {offloaded} are offloaded to the CPU or the disk (model.device: auto), "
                "which keeps no gradient: give model.max_memory room for those layers on their "
                "devices, skip them (method.skip_layers), or use a method without gradients "
                "(wanda-sp, flap, pp)"
            )
        windows = self._grad_windows(ctx)
        params = []
        for layer in pruned:  # only the layers that will be pruned need gradients
            for group in layer.groups:
                params += [piece.tensor for piece in layer.unit_slices(group)]
        # by name: accelerate replaces the parameters of offloaded modules at each forward
        previous = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        try:
            with torch.enable_grad():
                for batch in torch.split(windows, 2):
                    batch = batch.to(input_device(model))
                    loss = model(input_ids=batch, labels=batch).loss
                    (loss * batch.shape[0] / windows.shape[0]).backward()
        finally:
            for name, p in model.named_parameters():
                p.requires_grad_(previous[name])
        self._params = params
        ctx.timings["gradients_s"] = time.perf_counter() - start
        return {}

    def _grad_windows(self, ctx) -> torch.Tensor:
        n = int(self.settings.options.get("grad_samples", 10))
        seq = int(self.settings.options.get("grad_seq_len", 128))
        return ctx.calibration_windows(n, seq)

    def statistics(self):
        return []


@hookimpl
def prunekit_register_metrics(register):
    register("taylor", GroupTaylor)


@hookimpl
def prunekit_register_methods(register):
    register("llm-pruner", LlmPruner)
