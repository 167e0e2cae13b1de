"""LLM-Pruner (Ma et al., NeurIPS 2023) without fine-tuning, as a prunekit plugin.

First-order Taylor importance ``|w · ∂L/∂w|`` of the causal-LM loss on a few calibration
windows (the reference: 10 windows of 128 tokens), summed over every parameter of a coupled
group, then uniform allocation and physical pruning like the other static methods.

Coupled groups:

* MLP channel ``j``: row ``j`` of gate and up, column ``j`` of down. The group is found by
  torch-pruning's dependency graph, built **per decoder block** (on the block's MLP only, so the
  graph stays small: no tracing through the embeddings or the residual stream), and scored with
  its ``GroupTaylorImportance`` (sum over the group, no normalisation).
* attention head ``h``: its rows of q (and of k/v with MHA) and its columns of o. torch-pruning's
  graph does not couple q/k/v to o through the attention matmuls (checked with torch-pruning
  1.6), so this group is declared from the adapter's roles and scored with the same reduction
  (``Σ |w · grad|`` over the group). With GQA the k/v heads are shared by several query heads and
  are never pruned, so a query head's group is its q rows and o columns: the query-to-KV mapping
  is kept (kept heads carry their own KV head, groups may end up unequal).

``block_range: [start, end]`` reproduces the reference's semantics: only layers
``start <= l < end`` are pruned (reference: 4..30 of 32) at the nominal ratio, with no
inflation; the achieved parameter and FLOP reduction is then lower than the nominal ratio (it
is reported in results.json). By default prunekit uses the same skipped layers and inflated
ratio as the other methods, so compared methods remove the same structures.
"""

from __future__ import annotations

import time

import torch

from prunekit import hookimpl
from prunekit.components import MLP
from prunekit.errors import RecipeError
from prunekit.pruning.static import StaticMethod


def _taylor(module: torch.nn.Linear) -> torch.Tensor:
    if module.weight.grad is None:
        raise RuntimeError("no gradient on the weights: run the loss backward first")
    return (module.weight.detach().float() * module.weight.grad.detach().float()).abs()


class GroupTaylor:
    """Σ |w · grad| over the coupled group of each unit (needs gradients on the weights).

    MLP groups come from torch-pruning's dependency graph on the block's MLP; attention heads
    from the adapter's roles (see the module docstring for why).
    """

    def prepare(self, layer, group: str):
        if group == MLP:
            imp = self._mlp(layer)
        else:
            imp = self._heads(layer)

        def score(stats: dict[str, torch.Tensor]) -> torch.Tensor:
            return imp

        return score

    @staticmethod
    def _mlp(layer) -> torch.Tensor:
        import torch_pruning as tp

        mlp = layer.mlp
        example = torch.zeros(1, 2, layer.hidden_size, dtype=mlp.gate_proj.weight.dtype,
                              device=mlp.gate_proj.weight.device)  # fmt: skip
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(mlp, example_inputs=example)
        channels = list(range(layer.intermediate_size))
        group = graph.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels, idxs=channels)
        scorer = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
        return scorer(group).float()

    @staticmethod
    def _heads(layer) -> torch.Tensor:
        a = layer.attn
        hd, nh = layer.head_dim, layer.num_heads
        imp = _taylor(a.q_proj).sum(1).view(nh, hd).sum(1)
        imp = imp + _taylor(a.o_proj).sum(0).view(nh, hd).sum(1)
        if not layer.is_gqa:  # MHA: k/v rows belong to their head
            imp = imp + _taylor(a.k_proj).sum(1).view(nh, hd).sum(1)
            imp = imp + _taylor(a.v_proj).sum(1).view(nh, hd).sum(1)
        return imp


class LlmPruner(StaticMethod):
    """LLM-Pruner (no LoRA): Taylor importance of coupled groups, physical pruning."""

    name = "llm-pruner"
    slots = {"metric": "taylor", "allocator": "uniform", "compensator": "none"}
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
                problems.append(f"method.block_range: give [start, end) layer indices within "
                                f"the model's {num_layers or '?'} layers (got {rng!r})")  # fmt: skip
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
                raise RecipeError("method.block_range needs an allocator with an 'inflate' "
                                  "option (e.g. 'uniform')")  # fmt: skip
            allocator.inflate = False  # the reference applies the nominal ratio in the range

    def prune(self, ctx):
        rng = self.settings.options.get("block_range")
        if rng is not None:
            self.settings.skip_layers = [i for i in range(ctx.adapter.num_layers)
                                         if not rng[0] <= i < rng[1]]  # fmt: skip
        try:
            outcome = super().prune(ctx)
            outcome.extra["skipped_layers"] = list(self.settings.skip_layers)
            return outcome
        finally:
            for p in getattr(self, "_params", []):
                p.grad = None

    def calibrate(self, ctx) -> dict:
        """Accumulate gradients of the LM loss on the gradient windows (weights of the
        prunable projections only), then let the metric read them."""
        start = time.perf_counter()
        windows = self._grad_windows(ctx)
        model = ctx.model
        params = []
        skip = set(self.settings.skip_layers)
        for layer in ctx.adapter.layers():
            if layer.index in skip:  # only the layers that will be pruned need gradients
                continue
            for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj,
                         layer.attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                         layer.mlp.down_proj):  # fmt: skip
                params.append(proj.weight)
        previous = {id(p): p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        try:
            with torch.enable_grad():
                for batch in torch.split(windows, 2):
                    batch = batch.to(ctx.device)
                    loss = model(input_ids=batch, labels=batch).loss
                    (loss * batch.shape[0] / windows.shape[0]).backward()
        finally:
            for p in model.parameters():
                p.requires_grad_(previous[id(p)])
        self._params = params
        ctx.timings["gradients_s"] = time.perf_counter() - start
        return {}

    def _grad_windows(self, ctx) -> torch.Tensor:
        n = int(self.settings.options.get("grad_samples", 10))
        seq = int(self.settings.options.get("grad_seq_len", 128))
        if ctx.calibration_windows_override is not None:
            return ctx.calibration_windows_override[:n, :seq]
        from prunekit.data import calibration_windows, locate_calibration_corpus

        c = ctx.recipe.calibration
        source = ctx.calibration_source or locate_calibration_corpus(
            c.dataset, c.split, c.path, c.text_field, data_dir=ctx.recipe.data_dir
        )
        return calibration_windows(ctx.tokenizer, source, n, seq, seed=ctx.recipe.seed)

    def statistics(self):
        return []


@hookimpl
def prunekit_register_metrics(register):
    register("taylor", GroupTaylor)


@hookimpl
def prunekit_register_methods(register):
    register("llm-pruner", LlmPruner)
