"""GRIFFIN (Dong et al., 2024, arXiv 2404.01365): each prompt picks its own MLP channels.

Training-free and calibration-free. GRIFFIN observes that the feed-forward activations of one
sequence concentrate on few channels ("flocking"), and that the prompt reveals which. So the
prompt runs with the full model; for every pruned MLP, the activations ``Z`` of each sequence
(the input of the down projection, ``act(gate x) * up x``, ``[T, D]``, real tokens only) give

* ``Z̄[t] = Z[t] / ‖Z[t]‖₂``   (each token normalised, so no single token dominates),
* ``s_j = ‖Z̄[:, j]‖₂``         (one statistic per channel, over the prompt's tokens),

and the top-``k`` channels by ``s`` are the kept set of that sequence for the whole
generation: every decoding step runs the MLP on those ``k`` channels only. Attention is never
pruned. ``k`` comes from the recipe's ratio through the allocator (``method.allocator``,
``uniform`` by default): the fraction of MLP channels removed in every layer, as GRIFFIN
prunes every layer at one density (``method.skip_layers`` defaults to ``[]`` here; a recipe
that names skipped layers gets PP's inflation of the others' ratio).

Options (``method.<name>`` in a recipe):

* ``mode``: ``generation`` (default; a scored multiple-choice answer is the continuation of
  its question, every answer token runs pruned) or ``classification`` (the reference's
  ``--mode class``: the statistic comes from every input token but the last, and only that
  last token runs pruned; see ``DynamicProtocol.prompt_split``);
* ``pool``: each prompt keeps its channels inside the batch's best ``pool`` fraction of them
  (None: anywhere), so that a batch of prompts decodes on a smaller union of channels
  (:func:`prunekit.rows.pooled_topk`).

In prunekit this is a dynamic method with ``DynamicProtocol(decides="prompt")``: the runtime
(``prunekit.pruning.dynamic``) runs the prompt dense, shows the controller each MLP's
activations (``observe``), asks for the per-row kept sets (``decide``, a ``[B, k]`` tensor) and
reuses them on every forward that continues the prompt's KV cache.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from prunekit.plugin import (
    MLP,
    DynamicModel,
    DynamicProtocol,
    Method,
    PruneOutcome,
    Timers,
    pooled_topk,
)

#: ``method.mode`` -> where a scored request's prompt ends (``DynamicProtocol.prompt_split``)
MODES = {"generation": "context", "classification": "last_token"}

__all__ = ["Griffin", "GriffinController", "griffin_keep", "griffin_scores"]


def griffin_scores(activations: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """GRIFFIN's channel statistic of every sequence of a batch, ``[B, D]``.

    :param activations: the MLP's down-projection input on the prompt, ``[B, T, D]``.
    :param token_mask: ``[B, T]``, True for a real token; pad tokens do not count.

    One masked reduction for the whole batch: each token's row normalised to unit L2 norm (an
    all-zero row stays zero), pads zeroed, then the L2 norm over tokens per channel.
    """
    z = activations.float()
    norms = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    z_bar = z / norms.clamp_min(torch.finfo(z.dtype).tiny)
    z_bar = torch.where(token_mask.unsqueeze(-1), z_bar, 0.0)
    return torch.linalg.vector_norm(z_bar, dim=1)


def griffin_keep(
    activations: torch.Tensor, token_mask: torch.Tensor, k: int, pool: int | None = None
) -> torch.Tensor:
    """The ``k`` top channels of every sequence by :func:`griffin_scores`: ``[B, k]``, each row
    sorted ascending (the runtime's per-sequence kept-set format); with ``pool``, inside the
    batch's ``pool`` best channels (:func:`prunekit.rows.pooled_topk`)."""
    scores = griffin_scores(activations, token_mask)
    if pool is not None:
        return pooled_topk(scores, k, pool)
    return torch.topk(scores, k, dim=1, sorted=False).indices.sort(dim=1).values


class GriffinController:
    """The decision logic (``prunekit.pruning.dynamic.Controller``): one object per run.

    :param keep: kept MLP channels per layer index, for the layers that are pruned (a layer
        absent from it, a skipped one, runs dense).

    GRIFFIN keeps no state from prompt to prompt: the activations ``observe`` receives are held
    only until ``decide`` is called for the same block, right after.
    """

    def __init__(self, keep: dict[int, int], pool: dict[int, int] | None = None) -> None:
        self.keep = dict(keep)
        #: per layer, the batch's pool of channels each row chooses in (None: no pool)
        self.pool = dict(pool or {})
        self._observed: dict[int, torch.Tensor] = {}
        self.timers = Timers()  # replaced by the runtime's own (phases in runtime overhead)

    def wants_activations(self, layer, group: str) -> bool:
        return group == MLP and layer.index in self.keep

    def observe(self, layer, group: str, kept, activations: torch.Tensor, batch) -> None:
        # decides="prompt": the prompt ran dense, so ``kept`` is None and ``activations`` holds
        # every channel, [B, T, D]
        if kept is None:
            self._observed[layer.index] = activations.detach()

    def decide(self, layer, group: str, x: torch.Tensor, residual: torch.Tensor, batch):
        if group != MLP or layer.index not in self.keep:
            return None  # attention, and skipped layers: every unit
        activations = self._observed.pop(layer.index, None)
        if activations is None:
            # not shown the prompt (a runtime that observes nothing): compute its activations
            # from the block's input with the full weights
            activations = layer.probe(MLP, x, batch.position_ids, batch.token_mask)
        with self.timers("griffin_select", x.device):
            return griffin_keep(
                activations, batch.token_mask, self.keep[layer.index], self.pool.get(layer.index)
            )


def kept_parameters(adapter, keep: dict[int, int], model) -> int:
    """Parameters a decoding step uses: the model's, minus the pruned MLP channels' coupled
    weights (the adapter's cost model ``params(heads, channels)``; attention is whole)."""
    total = sum(p.numel() for p in model.parameters())
    for la in adapter.layers():
        if la.index in keep:
            heads = la.num_heads
            total -= la.params(heads, la.intermediate_size) - la.params(heads, keep[la.index])
    return total


class Griffin(Method):
    """GRIFFIN (arXiv 2404.01365): each prompt's top MLP channels for its generation, no training."""

    name = "griffin"
    dynamic = True
    #: ``k`` per layer: the allocator's MLP count (``counts(adapter, settings)``)
    slots = {"allocator": "uniform"}
    #: no calibration data: everything comes from the prompt
    uses_calibration = False
    #: GRIFFIN hands its components no per-decision statistic and reads no statistic
    provides = ()
    needs = ()
    #: the prompt runs dense and is observed; its decision serves what continues it; nothing
    #: carries over from one prompt to the next
    protocol = DynamicProtocol(
        decides="prompt", observes=("activations",), reset=False, warmup_batches=0, stateful=False
    )
    #: GRIFFIN prunes every layer at one density
    default_skip_layers = []
    option_defaults = {"mode": "generation", "pool": None}

    @classmethod
    def check_recipe(cls, recipe, num_layers):
        options, problems = recipe.method.options, []
        if options.get("mode", "generation") not in MODES:
            problems.append(
                f"method.mode: {options['mode']!r} is not a GRIFFIN mode; choose "
                f"one of {', '.join(MODES)}"
            )
        pool = options.get("pool")
        if pool is not None and (
            isinstance(pool, bool) or not isinstance(pool, int | float) or not 0 < pool <= 1
        ):
            problems.append(
                f"method.pool: {pool!r} is not a fraction of a layer's MLP "
                "channels in (0, 1]; give e.g. 0.6, or null for no pool"
            )
        return problems

    @classmethod
    def check_components(cls, components):
        allocator = components.get("allocator")
        if not callable(getattr(allocator, "counts", None)):
            return [
                f"method.allocator: {cls.name} keeps a fixed number of MLP channels per "
                "layer and needs an allocator with counts(adapter, settings), e.g. "
                f"'uniform'; {type(allocator).__name__} has none"
            ]
        return []

    def prune(self, ctx) -> PruneOutcome:
        adapter = ctx.adapter
        counts = self.components["allocator"].counts(adapter, self.settings)
        width = {la.index: la.units(MLP) for la in adapter.layers()}
        # the pruned layers and their k; a layer that keeps every channel runs dense
        keep = {i: counts[(i, MLP)] for i in width if counts[(i, MLP)] < width[i]}
        params_kept = kept_parameters(adapter, keep, ctx.model)
        options = self.settings.options
        fraction = options.get("pool")
        pool = {i: math.ceil(fraction * width[i]) for i in keep} if fraction is not None else None
        controller = GriffinController(keep, pool)
        protocol = dataclasses.replace(
            self.protocol, prompt_split=MODES[options.get("mode", "generation")]
        )
        model = DynamicModel(ctx.model, adapter, controller, protocol=protocol)
        structure = [
            {
                "layer": la.index,
                "heads": la.num_heads,
                "channels": keep.get(la.index, width[la.index]),
            }
            for la in adapter.layers()
        ]
        return PruneOutcome(model=model, dynamic=True, structure=structure, params_kept=params_kept)
