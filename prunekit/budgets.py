"""Budgets: ``method.target`` ("this model in 60% of the decoder MACs") instead of a ratio.

A target names one cost and its value:

* ``macs``: the fraction of the dense model's decoder-layer MACs per token to keep, at the
  sequence length ``results.json`` reports MACs at (the first perplexity evaluation's, else
  512); the adapter's analytic cost model, as ``reduction.flops_kept_fraction``;
* ``params``: the number of parameters the pruned model keeps (embeddings and norms
  included), as ``model.params_kept``;
* ``kv_bytes_per_token``: the KV cache's bytes per token in ``model.dtype`` (keys and values
  of every layer; with GQA the K/V heads are never pruned, so only MHA models can lower it).

The engine turns the target into the smallest ratio whose structure meets it, by bisection on
the method's allocator: from its ``counts`` (the score-free ``uniform`` allocator; resolved
before the method runs, so every method, static or dynamic, runs at that ratio), or, for an
allocator that needs the scores (FLAP's global threshold), inside its call on each set of
scores. Costs are non-increasing in the ratio; the bisection stops at a ratio step of 1e-4.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from prunekit.components import ATTN, MLP, Allocation, MethodSettings, ModelAdapter
from prunekit.loading.resolve import resolve_dtype
from prunekit.ratios import per_layer_ratio

#: the costs a target can name
TARGET_KINDS = ("macs", "params", "kv_bytes_per_token")
_STEP = 1e-4


class CostModel:
    """The costs of a structure (kept heads and channels per layer) of one model, from the
    adapter's cost model. Taken before pruning: each layer's parameters per unit are read
    then (a sliced layer's modules no longer show the dense ones).

    ``macs_scale`` is the fraction of a reference model's MACs this model keeps (a
    ``method.then`` stage: what the stages before it left of the dense model): ``macs``
    fractions are then of the reference, as the user wrote the target."""

    def __init__(
        self,
        adapter: ModelAdapter,
        seq_len: int,
        total_params: int,
        dtype_bytes: int,
        macs_scale: float = 1.0,
    ):
        self.adapter, self.seq_len = adapter, seq_len
        self.total_params, self.dtype_bytes = total_params, dtype_bytes
        self.macs_scale = macs_scale
        # layer -> (params dense, per head, per channel, more params gone with the last head:
        # shared K/V projections where the adapter drops them with the attention sublayer)
        self._params = {}
        for la in adapter.layers():
            h, c = la.num_heads, la.intermediate_size
            full = la.params(h, c)
            per_head, per_channel = full - la.params(h - 1, c), full - la.params(h, c - 1)
            last = full - la.params(0, c) - h * per_head
            self._params[la.index] = (full, per_head, per_channel, last)

    def structure(self, counts: dict[tuple[int, str], int]) -> list[dict[str, int]]:
        return [
            {
                "heads": counts.get((la.index, ATTN), la.num_heads),
                "channels": counts.get((la.index, MLP), la.intermediate_size),
            }
            for la in self.adapter.layers()
        ]

    def costs(self, structure: list[dict[str, int]] | None = None) -> dict[str, float]:
        """Every target kind's value for ``structure`` (None: dense)."""
        layers = self.adapter.layers()
        if structure is None:
            structure = [{"heads": la.num_heads, "channels": la.intermediate_size} for la in layers]
        dense_macs = kept_macs = 0.0
        params = self.total_params
        kv = 0
        for la, row in zip(layers, structure, strict=True):
            h, c = row["heads"], row["channels"]
            dense_macs += la.macs_per_token(la.num_heads, la.intermediate_size, self.seq_len)
            if not row.get("removed"):
                kept_macs += la.macs_per_token(h, c, self.seq_len)
            full, per_head, per_channel, last = self._params[la.index]
            if row.get("removed"):  # the whole block is gone (depth pruning)
                params -= full
                continue
            params -= (la.num_heads - h) * per_head + (la.intermediate_size - c) * per_channel
            params -= last if h == 0 else 0
            kv += 2 * la.kv_heads_kept(h) * la.unit_width(ATTN) * self.dtype_bytes
        macs = kept_macs / dense_macs * self.macs_scale
        return {"macs": macs, "params": params, "kv_bytes_per_token": kv}

    def start(self, kind: str) -> str:
        """What the model it describes costs, unpruned, for messages."""
        what = "dense" if self.macs_scale == 1.0 else "the model this stage receives"
        return f"{what}: {fmt(kind, self.costs()[kind])}"


def cost_model(
    adapter: ModelAdapter, model, seq_len: int, dtype: str, macs_scale: float = 1.0
) -> CostModel:
    total = sum(p.numel() for p in model.parameters())
    return CostModel(adapter, seq_len, total, resolve_dtype(dtype).itemsize, macs_scale)


def macs_seq_len(recipe) -> int:
    """The sequence length MACs are counted at (results.json's ``reduction.seq_len``)."""
    ppl = recipe.evaluation.perplexity
    return ppl[0].seq_len if ppl else 512


def _bisect(meets: Callable[[float], bool], high: float) -> float:
    """The smallest ratio in ``[0, high]`` for which ``meets`` holds (``meets(high)`` does)."""
    if meets(0.0):
        return 0.0
    low = 0.0
    while high - low > _STEP:
        mid = (low + high) / 2
        if meets(mid):
            high = mid
        else:
            low = mid
    return high


def highest_ratio(allocator, adapter: ModelAdapter, settings: MethodSettings) -> float:
    """The largest ratio the allocator accepts with these skipped layers (its per-layer ratio
    below 1), to a step of 1e-4."""
    layer_ratio = getattr(allocator, "layer_ratio", None)

    def ok(r: float) -> bool:
        if layer_ratio is not None:
            return layer_ratio(adapter, dataclasses.replace(settings, ratio=r)) < 1
        # an allocator that does not say: the reference's L / (L - skipped) inflation
        return per_layer_ratio(r, adapter.num_layers, settings.skip_layers) < 1

    high = 1 - _STEP
    if ok(high):
        return high
    # the first ratio that is not accepted, less one step (accepted: the ratio is monotone)
    return max(0.0, _bisect(lambda r: not ok(r), high) - _STEP)


class BudgetError(ValueError):
    """A target the model cannot meet with this method's structure."""


def solve_counts(
    allocator, costs: CostModel, settings: MethodSettings, kind: str, value: float
) -> tuple[float, dict[str, float]]:
    """``(ratio, costs at it)``: the smallest ratio whose kept counts (the allocator's
    ``counts``) meet ``kind <= value``.

    :raises BudgetError: when even the highest ratio the skipped layers allow does not.
    """
    adapter = costs.adapter

    def at(r: float) -> dict[str, float]:
        counts = allocator.counts(adapter, dataclasses.replace(settings, ratio=r))
        return costs.costs(costs.structure(counts))

    high = highest_ratio(allocator, adapter, settings)
    lowest = at(high)[kind]
    if lowest > value:
        raise BudgetError(unreachable(kind, value, lowest, high, settings, costs))
    ratio = _bisect(lambda r: at(r)[kind] <= value, high)
    return ratio, at(ratio)


def unreachable(kind, value, lowest, high, settings, costs: CostModel) -> str:
    gqa = kind == "kv_bytes_per_token" and all(la.shares_kv for la in costs.adapter.layers())
    why = (
        "every layer shares its K/V heads (GQA), which pruning never removes, so the KV cache "
        "keeps its dense size"
        if gqa
        else f"the most this method can prune (ratio {high:.4f} with skip_layers "
        f"{settings.skip_layers}) leaves {fmt(kind, lowest)}"
    )
    return cannot_meet(kind, value, why, costs)


def cannot_meet(kind: str, value: float, why: str, costs: CostModel) -> str:
    """The message of a target that cannot be met, ``why`` saying what the most pruning
    leaves."""
    return (
        f"{kind} {fmt(kind, value)} cannot be met: {why} ({costs.start(kind)}); "
        "ask for more, or skip fewer layers"
    )


def fmt(kind: str, v: float) -> str:
    if kind == "macs":
        return f"{v:.4f} of the dense MACs"
    if kind == "params":
        return f"{v / 1e6:.2f} M parameters"
    return f"{int(v)} bytes per token"


@dataclasses.dataclass
class Budget:
    """``method.target`` handed to a method that meets it itself (``Method.solves_target``,
    as ``ctx.budget``): the method removes units in its own order until :meth:`met`."""

    kind: str
    value: float
    costs: CostModel

    def achieved(self, structure: list[dict]) -> float:
        return self.costs.costs(structure)[self.kind]

    def met(self, structure: list[dict]) -> bool:
        """Whether ``structure`` (rows with ``heads``, ``channels``, ``removed``) meets it."""
        return self.achieved(structure) <= self.value

    def unreachable(self, what: str, lowest: float) -> BudgetError:
        why = f"{what} leaves {fmt(self.kind, lowest)}"
        return BudgetError(cannot_meet(self.kind, self.value, why, self.costs))


class BudgetAllocator:
    """An allocator that needs the scores (FLAP's global threshold), run at the smallest ratio
    whose allocation meets the target. The ratio it settled on is in :attr:`ratio`."""

    def __init__(self, inner, costs: CostModel, kind: str, value: float) -> None:
        self.inner, self.costs, self.kind, self.value = inner, costs, kind, value
        self.ratio: float | None = None
        self.achieved: dict[str, float] | None = None

    def __getattr__(self, name: str) -> Any:  # the inner allocator's own attributes
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, scores, adapter: ModelAdapter, settings: MethodSettings) -> Allocation:
        def allocate(r: float) -> tuple[Allocation, dict[str, float]]:
            allocation = self.inner(scores, adapter, dataclasses.replace(settings, ratio=r))
            return allocation, self.costs.costs(allocation.structure(adapter))

        high = highest_ratio(self.inner, adapter, settings)
        lowest = allocate(high)[1][self.kind]
        if lowest > self.value:
            raise BudgetError(
                unreachable(self.kind, self.value, lowest, high, settings, self.costs)
            )
        self.ratio = _bisect(lambda r: allocate(r)[1][self.kind] <= self.value, high)
        allocation, self.achieved = allocate(self.ratio)
        return allocation
