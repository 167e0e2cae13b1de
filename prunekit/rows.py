"""Per-sequence kept sets: rows of a batch that run a block on their own weights.

A per-sequence decision is a ``[B, k]`` LongTensor (row ``b`` keeps units ``kept[b]``; every row
keeps the same number of units, so the block's outputs, its observed activations and its K/V
keep one shape across rows). The runtime groups rows by their kept set
(:func:`row_groups`): one group (all rows agree) runs as a per-batch decision, the fast path;
otherwise each group runs the block through the adapter on its own rows (``x[rows]``,
:func:`row_kwargs` slices the layer's keyword arguments) with weights gathered once per group,
and the outputs are put back in row order.

KV caches: a group updates only its rows. :class:`RowCacheView` stands in for the cache while a
group runs: each cache layer is split to the group's rows, updated by the layer's own
``update`` (so dynamic, sliding-window and static layers keep their semantics), and the groups'
rows are merged back into the real cache once every group of the block has run
(:meth:`RowCacheView.commit`). This is written here rather than taken from transformers,
which has no per-row cache update.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

#: the cache-layer attributes that hold per-row states ([B, heads, positions, head_dim])
_STATE_ATTRS = ("keys", "values")


@dataclass
class RowGroup:
    """Rows of a batch (sorted LongTensor) that share one kept set (``kept``: 1-D)."""

    rows: torch.Tensor
    kept: torch.Tensor


def row_groups(kept: torch.Tensor) -> list[RowGroup]:
    """Group the rows of a ``[B, k]`` per-sequence decision by identical kept sets.

    Kept sets are compared as sets: each row is sorted first, so that the same units in
    another order share a group (and gather the same weights).
    """
    if kept.dim() != 2:
        raise ValueError(f"a per-sequence decision is a [batch, kept] tensor, got {tuple(kept.shape)}")
    kept = kept.sort(dim=1).values
    unique, inverse = torch.unique(kept, dim=0, return_inverse=True)
    if unique.shape[0] == 1:
        return [RowGroup(torch.arange(kept.shape[0], device=kept.device), unique[0])]
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=unique.shape[0]).tolist()
    groups, start = [], 0
    for u, n in enumerate(counts):
        groups.append(RowGroup(order[start:start + n], unique[u]))
        start += n
    return groups


def _is_cache(value: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(value, Cache)


def slice_rows(value: Any, rows: torch.Tensor, batch_size: int) -> Any:
    """``value`` restricted to ``rows``: tensors with a leading batch dimension (2-D or more,
    first size ``batch_size``) are indexed, tuples and lists recursively; anything else (1-D
    tensors such as ``cache_position``, broadcast tensors of batch 1, scalars) passes as is."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch_size:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, tuple | list):
        return type(value)(slice_rows(v, rows, batch_size) for v in value)
    return value


def row_kwargs(kwargs: dict[str, Any], rows: torch.Tensor, batch_size: int,
               cache_view=None) -> dict[str, Any]:  # fmt: skip
    """A decoder layer's keyword arguments for the batch rows ``rows``; a KV cache among them is
    replaced by ``cache_view(cache)`` (a :class:`RowCacheView`)."""
    out = {}
    for name, value in kwargs.items():
        if _is_cache(value):
            if cache_view is None:
                raise ValueError("a per-sequence block with a KV cache needs a cache view")
            out[name] = cache_view(value)
        else:
            out[name] = slice_rows(value, rows, batch_size)
    return out


class RowCacheView:
    """A KV cache as one group of rows sees it (see the module docstring)."""

    def __init__(self, cache, rows: torch.Tensor, batch_size: int, pending: list) -> None:
        self._cache = cache
        self._rows = rows
        self._batch_size = batch_size
        self._pending = pending  # (layer_idx, rows, split layer), shared by the block's groups

    def _layer(self, layer_idx: int):
        cache = self._cache
        replicate = getattr(cache, "layer_class_to_replicate", None)
        if replicate is not None:  # what Cache.update does for caches built without a config
            while len(cache.layers) <= layer_idx:
                cache.layers.append(replicate())
        layer = cache.layers[layer_idx]
        extra = [name for name, v in vars(layer).items()
                 if name not in _STATE_ATTRS and isinstance(v, torch.Tensor) and v.dim() >= 2
                 and v.shape[0] == self._batch_size]  # fmt: skip
        if extra:
            raise NotImplementedError(
                f"per-sequence kept sets cannot split a {type(layer).__name__} cache layer by "
                f"rows (it keeps per-row state in {', '.join(extra)}); use a dynamic or static "
                "KV cache, or a method that decides per batch"
            )
        return layer

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self._layer(layer_idx)
        part = copy.copy(layer)
        for name in _STATE_ATTRS:
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] == self._batch_size:
                setattr(part, name, t.index_select(0, self._rows.to(t.device)))
        keys, values = part.update(key_states, value_states, *args, **kwargs)
        self._pending.append((layer_idx, self._rows, part))
        return keys, values

    def __getattr__(self, name: str):
        return getattr(self._cache, name)

    @staticmethod
    def commit(cache, pending: list, batch_size: int) -> None:
        """Merge the groups' split layers back into ``cache`` (every row of the batch)."""
        by_layer: dict[int, list] = {}
        for layer_idx, rows, part in pending:
            by_layer.setdefault(layer_idx, []).append((rows, part))
        for layer_idx, parts in by_layer.items():
            layer = cache.layers[layer_idx]
            first = parts[0][1]
            merged = {}
            for name in _STATE_ATTRS:
                pieces = [(rows, getattr(part, name)) for rows, part in parts]
                ref = pieces[0][1]
                shapes = {tuple(t.shape[1:]) for _, t in pieces}
                if len(shapes) != 1:
                    raise RuntimeError(
                        f"cache layer {layer_idx}: row groups cached {name} of different shapes "
                        f"{sorted(shapes)}; per-sequence kept sets must keep as many K/V heads "
                        "in every row"
                    )
                out = ref.new_empty((batch_size, *ref.shape[1:]))
                for rows, t in pieces:
                    out.index_copy_(0, rows.to(out.device), t)
                merged[name] = out
            for name, value in vars(first).items():  # lengths, flags, devices: equal across rows
                if name not in _STATE_ATTRS:
                    setattr(layer, name, value)
            for name, value in merged.items():
                setattr(layer, name, value)
        pending.clear()
