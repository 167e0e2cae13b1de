"""Per-sequence kept sets: every row of a batch keeps its own units, the batch runs as one.

A per-sequence decision is a ``[B, k]`` LongTensor (row ``b`` keeps units ``kept[b]``). When
every row keeps the same units it is a per-batch decision (the fast path). Otherwise the block
runs **once, for the whole batch, on the union of the rows' kept units** (:func:`row_union`),
with a per-row mask that zeroes each row's unkept units at the input of the output projection
(:meth:`~prunekit.components.LayerAdapter.run`'s ``unit_mask``). A masked unit adds exactly
zero, so each row gets what its own kept set gives (GRIFFIN's own semantics), and:

* one gathered copy of each block's weights, never larger than the dense block, serves every
  row (no per-row copies held for a generation);
* one batched matmul per projection (a decoding step is bound by reading weights, so the union
  costs at most a dense step, and less when the rows agree);
* the KV cache is updated once per layer with the whole batch, so every cache class keeps its
  own semantics (dynamic, static, sliding-window, offloaded, quantized);
* no layer argument is ever split by rows, so nothing has to guess which arguments are
  per-row (attention masks, flex attention's ``BlockMask``, cache positions pass whole).

:func:`select_cache_heads` narrows a cache layer to a subset of the heads it holds: a method
that decides on the prompt runs the prompt dense, so with multi-head attention (K/V pruned with
their heads) the first continuation keeps only the cached heads it still uses. This is written
here rather than taken from transformers, which has no head selection on its cache layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RowUnion", "pooled_topk", "row_union", "select_cache_heads"]


@dataclass
class RowUnion:
    """A per-sequence decision as the union of its rows' kept units plus per-row masks."""

    #: the union of the rows' kept units, sorted ascending (1-D)
    units: torch.Tensor
    #: ``[B, k]``: where each row's kept units sit in :attr:`units`
    index: torch.Tensor
    #: ``[B, len(units)]`` bool: whether row ``b`` keeps union unit ``u``
    mask: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        """The ``[B, k]`` decision this union was built from (rows sorted)."""
        return self.units[self.index]

    def select(self, rows: torch.Tensor) -> RowUnion:
        """The same union for the batch rows ``rows`` (beam search reorders, a server drops
        finished rows): the gathered weights of :attr:`units` stay valid for any subset."""
        rows = rows.to(self.index.device)
        return RowUnion(
            self.units, self.index.index_select(0, rows), self.mask.index_select(0, rows)
        )


def row_union(kept: torch.Tensor) -> torch.Tensor | RowUnion:
    """A ``[B, k]`` per-sequence decision as a 1-D kept set when every row agrees (compared as
    sets), else as a :class:`RowUnion`."""
    if kept.dim() != 2:
        raise ValueError(
            f"a per-sequence decision is a [batch, kept] tensor, got {tuple(kept.shape)}"
        )
    kept = kept.sort(dim=1).values
    if kept.shape[0] == 1 or bool((kept == kept[:1]).all()):
        return kept[0]
    units, index = torch.unique(kept, sorted=True, return_inverse=True)
    if bool((index[:, 1:] == index[:, :-1]).any()):
        raise ValueError("a per-sequence decision keeps a unit twice in one row")
    mask = torch.zeros(kept.shape[0], units.numel(), dtype=torch.bool, device=kept.device)
    mask.scatter_(1, index, True)
    return RowUnion(units, index, mask)


def pooled_topk(scores: torch.Tensor, keep: int, pool: int | None = None) -> torch.Tensor:
    """Each row's ``keep`` best units (``[B, keep]``, rows sorted ascending), chosen inside the
    batch's ``pool`` best units when ``pool`` is given.

    The batch's pool ranks units by their mean over rows of each row's scores scaled to its
    largest magnitude (so that no row dominates by scale); every row then keeps its own top
    ``keep`` among them. The union of the rows' kept sets is at most ``pool`` units, so a
    batch that decodes on the union (:func:`row_union`) reads at most that many units'
    weights. ``pool`` below ``keep`` counts as ``keep`` (every row keeps the pool).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, units], got {tuple(scores.shape)}")
    units = scores.shape[1]
    if keep >= units:
        return torch.arange(units, device=scores.device).expand(scores.shape[0], units)
    s = scores.float()
    if pool is None or pool >= units:
        return torch.topk(s, keep, dim=1, sorted=False).indices.sort(dim=1).values
    scaled = s / s.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    candidates = torch.topk(scaled.mean(0), max(pool, keep), sorted=False).indices
    pick = torch.topk(s.index_select(1, candidates), keep, dim=1, sorted=False).indices
    return candidates[pick].sort(dim=1).values


def _cache_layer_classes() -> tuple[dict[type, tuple[str, ...]], type]:
    """Cache layer classes whose K/V states prunekit can narrow to a subset of heads, with the
    attributes that hold them (``[B, heads, positions, head_dim]``)."""
    from transformers import cache_utils as cu

    known: dict[type, tuple[str, ...]] = {}
    for name in (
        "DynamicLayer",
        "DynamicSlidingWindowLayer",
        "StaticLayer",
        "StaticSlidingWindowLayer",
    ):
        cls = getattr(cu, name, None)
        if cls is not None:
            known[cls] = ("keys", "values")
    fp8 = getattr(cu, "Fp8QuantizedLayer", None)
    if fp8 is not None:  # (fp8 tensor, per-tensor scale) pairs; keys/values hold the dtype
        known[fp8] = ("_quantized_keys", "_quantized_values")
    return known, cu.Cache


def select_cache_heads(cache, layer_idx: int, index: torch.Tensor, where: str) -> None:
    """Keep only the heads at positions ``index`` (1-D, among the heads the cache holds) of
    layer ``layer_idx`` of a transformers ``Cache``, in place.

    :param where: names the block, for the error when the cache layer's class keeps its K/V in
        a form this cannot select from (quantized with quanto or HQQ, indexed layers).
    """
    known, _ = _cache_layer_classes()
    layer = cache.layers[layer_idx]
    attrs = known.get(type(layer))
    if attrs is None:
        raise NotImplementedError(
            f"{where}: the KV cache holds every attention head of the prompt (it ran dense) and "
            f"the continuation keeps fewer, but a {type(layer).__name__} cache layer cannot be "
            "narrowed to a subset of heads; use a dynamic, static, sliding-window, offloaded "
            "or fp8-quantized cache, or a method that does not prune the attention heads of a "
            "multi-head-attention model"
        )
    if not getattr(layer, "is_initialized", True):
        return
    for name in attrs:
        state = getattr(layer, name, None)
        if isinstance(state, tuple):  # (quantized tensor, scale)
            tensor, scale = state
            setattr(layer, name, (tensor.index_select(1, index.to(tensor.device)), scale))
        elif isinstance(state, torch.Tensor) and state.dim() == 4:
            setattr(layer, name, state.index_select(1, index.to(state.device)))
    if hasattr(layer, "num_heads"):  # static layers record their head count
        layer.num_heads = int(index.numel())
