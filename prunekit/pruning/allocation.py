"""Turning a ratio into kept counts per layer (pp-spec section 2), and the ``uniform`` allocator.

Rules, shared by every method that allocates uniformly (PP, Wanda-sp, pp-calib):

* layers in ``skip_layers`` are never pruned (default ``[0, 1, 2]``);
* the other layers use the inflated ratio ``r' = round(L / (L - skipped) * r, 2)`` so the
  average over all layers stays close to ``r``;
* attention: ``floor(r' * n_heads)`` whole heads pruned (no rounding to a multiple);
* MLP: ``floor(r' * I)`` channels pruned, then the kept count is rounded **up** to a multiple
  of ``round_to`` (default 64; 1 disables) by pruning fewer channels;
* the lowest-scoring units are pruned; kept indices are returned sorted ascending (the
  reference returns MLP indices in score order, which changes nothing but memory locality).
"""

from __future__ import annotations

import math

import torch

from prunekit.components import ATTN, MLP, Allocation, MethodSettings, ModelAdapter
from prunekit.hookspecs import hookimpl
from prunekit.ratios import kept_channels, kept_heads, per_layer_ratio

__all__ = [
    "Uniform",
    "as_unit_scores",
    "balanced_heads",
    "kept_channels",
    "kept_heads",
    "per_layer_ratio",
    "top_units",
]


def top_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, sorted ascending."""
    if keep >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    return torch.topk(scores.float(), keep, sorted=False).indices.sort().values


def as_unit_scores(scores: torch.Tensor, layer, group: str) -> torch.Tensor:
    """Unit scores from a metric's output: channel-level attention scores summed per head."""
    units, width = layer.units(group), layer.unit_width(group)
    if scores.numel() == units:
        return scores
    if scores.numel() == units * width:
        return scores.reshape(units, width).sum(1)
    raise ValueError(
        f"layer {layer.index} {group}: the metric returned {scores.numel()} scores, expected "
        f"{units} (units) or {units * width} (channels)"
    )


def balanced_heads(scores: torch.Tensor, keep: int, layer) -> torch.Tensor:
    """The top ``keep / n_kv`` query heads of every KV group (``keep`` rounded up to a
    multiple of the KV head count), so the kept heads stay balanced across groups.

    The groups are the adapter's (``layer.kv_heads_of``), so a layer whose heads map to their
    K/V heads in another order, or an already pruned layer with uneven groups, is grouped
    right; a group smaller than its share keeps all its heads. Returns sorted head indices.
    """
    groups = layer.num_kv_heads
    take = math.ceil(keep / groups)
    kv = layer.kv_heads_of(torch.arange(layer.num_heads)).to(scores.device)
    kept = []
    for g in range(groups):
        members = (kv == g).nonzero().flatten()
        top = torch.topk(scores.float()[members], min(take, members.numel())).indices
        kept.append(members[top])
    return torch.cat(kept).sort().values


class Uniform:
    """Same per-layer ratio for every non-skipped layer (attention and MLP alike).

    :param inflate: apply the ``L / (L - skipped)`` inflation (the reference does).
    :param balanced_kv: with GQA, keep the same number of query heads in every KV group
        (the kept count is rounded up to a multiple of the KV head count); with
        ``skip_layers: []`` the pruned model then has one shape for every layer and exports as
        a plain Hugging Face checkpoint.
    """

    def __init__(self, inflate: bool = True, balanced_kv: bool = False) -> None:
        for name, value in (("inflate", inflate), ("balanced_kv", balanced_kv)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        self.inflate = inflate
        self.balanced_kv = balanced_kv

    def layer_ratio(self, adapter: ModelAdapter, settings: MethodSettings) -> float:
        if not self.inflate:
            return settings.ratio
        return per_layer_ratio(settings.ratio, adapter.num_layers, settings.skip_layers)

    def counts(self, adapter: ModelAdapter, settings: MethodSettings) -> dict[tuple[int, str], int]:
        """Kept units per (layer, group); skipped layers and ratio 0 keep everything."""
        r = self.layer_ratio(adapter, settings) if settings.ratio > 0 else 0.0
        skip = set(settings.skip_layers)
        out = {}
        for layer in adapter.layers():
            if layer.index in skip or settings.ratio == 0:
                out[(layer.index, ATTN)] = layer.units(ATTN)
                out[(layer.index, MLP)] = layer.units(MLP)
                continue
            heads = kept_heads(layer.num_heads, r)
            if self.balanced_kv and layer.shares_kv:  # GQA only
                groups = layer.num_kv_heads
                heads = min(layer.num_heads, math.ceil(heads / groups) * groups)
            out[(layer.index, ATTN)] = heads
            out[(layer.index, MLP)] = kept_channels(layer.intermediate_size, r, settings.round_to)
        return out

    def __call__(self, scores, adapter: ModelAdapter, settings: MethodSettings) -> Allocation:
        allocation = Allocation()
        for key, keep in self.counts(adapter, settings).items():
            layer = adapter.layers()[key[0]]
            if keep < layer.units(key[1]) and key in scores:
                unit_scores = as_unit_scores(scores[key], layer, key[1])
                if key[1] == ATTN and self.balanced_kv and layer.shares_kv:
                    allocation.kept[key] = balanced_heads(unit_scores, keep, layer)
                else:
                    allocation.kept[key] = top_units(unit_scores, keep)
        return allocation


@hookimpl
def prunekit_register_allocators(register):
    register("uniform", Uniform, description="same inflated ratio for every non-skipped layer")
