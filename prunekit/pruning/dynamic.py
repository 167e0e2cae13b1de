"""The dynamic runtime: decide kept sets per batch, per sequence or per prompt, and run
smaller matmuls.

A dynamic method supplies a :class:`Controller`; :class:`DynamicModel` wraps every decoder layer
of the model so that, for each forward and each block (attention, MLP), the controller decides
the kept units and the block runs on weights gathered to that kept set (real, smaller
matrices). The layer itself runs through its model adapter (``run_block``), so the runtime
knows no architecture.
The wrapped model (:class:`DynamicModel`) answers like a Hugging Face causal LM, so evaluation
code is shared with static and dense models.

When decisions happen is the method's :class:`~prunekit.components.DynamicProtocol`
(``decides``): one kept set per batch (the fast path), one per sequence (``[B, k]``: the
batch runs once on the union of the rows' kept units with a per-row mask, see
:mod:`prunekit.rows`), or on the prompt only (the prompt runs dense and is observed).

Decisions belong to the KV cache they were made with. A forward with an empty cache (or none)
is a prompt: it decides, and its kept sets (:class:`Decisions`) are bound to that cache
object. A forward that continues a cache (generation's decoding steps, a scored
continuation) reuses the kept sets bound to *that* cache and their gathered weights, so
several generations can interleave on one model (as a server or lm-eval's ``generate_until``
does) and a cache that no prompt of this model filled is refused. Beam search's reordering of
the cache reorders its per-row kept sets too. With multi-head attention the cache holds the
kept heads' K/V; when a continuation keeps fewer heads than its cache holds (a method that
decides on the prompt ran the prompt dense), the cache is narrowed to them once, on the first
continuation (:func:`prunekit.rows.select_cache_heads`).

Padding: the wrapper reads the batch's 2-D ``attention_mask`` (1 = real token) and, when no
``position_ids`` are given, derives them from it (``cumsum - 1``), so left-padded sequences get
their true positions. Controllers receive the token mask and the positions and must keep pad
tokens out of their decisions. The batch state is set by a forward pre-hook on the wrapped
model, so Hugging Face ``generate`` (which calls the wrapped model) goes through it too.

The protocol also says how an evaluation starts (:meth:`DynamicModel.begin_evaluation`:
reset, warm-up), so that evaluation code asks the model instead of assuming one method's.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from prunekit.components import ATTN, MLP, DynamicProtocol, LayerAdapter, ModelAdapter
from prunekit.devices import execution_device, input_device, onloaded
from prunekit.rows import RowUnion, row_union, select_cache_heads

#: the keyword of the KV cache in Hugging Face forwards (``cache`` from transformers 5.24,
#: ``past_key_values`` before)
CACHE_KEYWORDS = ("cache", "past_key_values")


class Decisions:
    """The kept set of every block on one prompt (``kept``: ``(layer, group)`` -> None, a 1-D
    kept set or a ``[B, k]`` per-sequence one) and the gathered weights that forwards
    continuing that prompt reuse (``plans``)."""

    def __init__(self) -> None:
        self.kept: dict[tuple[int, str], torch.Tensor | None] = {}
        self.plans: dict[tuple[int, str], Plan] = {}

    def select_rows(self, rows: torch.Tensor) -> Decisions:
        """These decisions for the batch rows ``rows`` (beam search's reordering)."""
        out = Decisions()
        for key, kept in self.kept.items():
            out.kept[key] = (
                kept.index_select(0, rows.to(kept.device))
                if kept is not None and kept.dim() == 2
                else kept
            )
        for key, plan in self.plans.items():
            out.plans[key] = plan.select(rows) if plan.union is not None else plan
        return out


@dataclass
class CacheRecord:
    """What a KV cache was filled with: the decisions of its prompt, and per layer the heads
    whose K/V it holds (None: every head; a layer not listed has not been written yet)."""

    decisions: Decisions
    heads: dict[int, torch.Tensor | None] = field(default_factory=dict)


@dataclass
class Plan:
    """A block's gathered weights: ``units`` (1-D, None for every unit) gathered into
    ``weights`` (the adapter's :meth:`~prunekit.components.LayerAdapter.gather`), and for a
    per-sequence decision whose rows differ the per-row masks over those units."""

    units: torch.Tensor | None
    weights: Any
    union: RowUnion | None = None
    _mask: torch.Tensor | None = None

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The per-row mask ``[B, units]`` in ``dtype`` (built once)."""
        if self._mask is None or self._mask.dtype != dtype:
            self._mask = self.union.mask.to(dtype)
        return self._mask

    def select(self, rows: torch.Tensor) -> Plan:
        return Plan(self.units, self.weights, self.union.select(rows))

    @property
    def rows(self) -> int | None:
        """The batch size the per-row masks were made for (None: any)."""
        return None if self.union is None else self.union.index.shape[0]


@dataclass
class BatchState:
    """What every block of the current forward can see."""

    token_mask: torch.Tensor  # [B, T] bool, True = real token
    position_ids: torch.Tensor  # [B, T] true positions
    #: residual stream entering each group: ``(layer, group)`` -> ``[B, T, d]`` (the current
    #: layer's and, for asynchronous probing, the previous layer's)
    residuals: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    #: the mean of squares of those residuals per token (``[B, T, 1]`` fp32) where the
    #: layer's norm computed it anyway (:meth:`LayerAdapter.normalized`); absent otherwise
    residual_sq_means: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    #: this forward continues a prompt (a KV cache holds earlier tokens, or inside
    #: ``DynamicModel.hold()``): kept sets come from the prompt's decisions
    continuing: bool = False
    #: the KV cache this forward reads and writes (None: none, or not seen yet)
    cache: Any = None
    #: the decisions this forward makes or reuses (set by :meth:`Runtime.start`)
    decisions: Decisions = field(default_factory=lambda: Decisions())
    #: the cache's record (None without a cache)
    record: CacheRecord | None = None

    @functools.cached_property
    def unpadded(self) -> bool:
        """Every token of the batch is real (no padding): controllers may skip their masks.
        Read once per forward (one host synchronisation), not once per block."""
        return bool(self.token_mask.all())


class Controller(Protocol):
    """The decision logic of a dynamic method (one object per run)."""

    def decide(
        self,
        layer: LayerAdapter,
        group: str,
        x: torch.Tensor,
        residual: torch.Tensor,
        batch: BatchState,
    ) -> torch.Tensor | None:
        """Kept units of ``group``: a sorted 1-D LongTensor for the whole batch (the method's
        protocol ``decides="batch"``), a ``[B, k]`` LongTensor with one row per sequence
        (``"sequence"`` and ``"prompt"``), or None for all units.

        :param x: the block's normalised input [B, T, d]; :param residual: the pre-norm
            residual entering the block [B, T, d]. With ``decides="prompt"`` it is called after
            the block ran dense on the prompt (and after :meth:`observe`).
        """

    def wants_activations(self, layer: LayerAdapter, group: str) -> bool:
        """Whether :meth:`observe` needs the output projection's input for this block (asked
        only when the method's protocol ``observes`` ``"activations"``)."""

    def observe(
        self,
        layer: LayerAdapter,
        group: str,
        kept: torch.Tensor | None,
        activations: torch.Tensor,
        batch: BatchState,
    ) -> None:
        """See the full batch's (post-pruning) input of the output projection, [B, T, C]: the
        kept units' channels, in the order of ``kept`` (per row with a ``[B, k]`` decision)."""

    # optional: reset(), snapshot() -> state, restore(state) (a stateful method's state)


class Timers:
    """Cumulative wall time per category, on when ``enabled`` (synchronises CUDA)."""

    def __init__(self) -> None:
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str, device: torch.device | None = None) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        sync = device is not None and device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(device)
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds.clear()


class Runtime:
    """Shared state of the wrapped layers: the controller, the current batch, the switches."""

    def __init__(
        self, controller: Controller, adapter: ModelAdapter, protocol: DynamicProtocol
    ) -> None:
        self.controller = controller
        self.adapter = adapter
        self.protocol = protocol
        self.observes_activations = "activations" in protocol.observes
        self.enabled = True  # False: every layer runs its original (dense) forward
        self.batch: BatchState | None = None
        self.timers = Timers()
        self.holding = False
        #: inside ``hold()``: the decisions every forward reuses
        self.held: Decisions | None = None
        #: the decisions of the last prompt (``DynamicModel.decisions``)
        self.last = Decisions()
        #: every live KV cache this model filled, with its prompt's decisions
        self.records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def start(self, batch: BatchState) -> None:
        """A forward begins: a prompt gets new decisions (bound to its cache), a continuation
        the decisions bound to the cache it continues."""
        if batch.continuing:
            record = self.records.get(batch.cache)
            if record is None:
                raise RuntimeError(
                    f"this forward continues a KV cache ({type(batch.cache).__name__}, "
                    f"{int(batch.cache.get_seq_length())} tokens) that no prompt of this dynamic "
                    "model filled (or a copy of one), so the kept sets it was filled with are "
                    "unknown; run the prompt through this model with that cache first "
                    "(model.generate does), or start from an empty cache"
                )
            batch.decisions, batch.record = record.decisions, record
        else:
            if self.holding:
                self.held = self.held if self.held is not None else Decisions()
                batch.decisions = self.held
            else:
                self.last = batch.decisions
            if batch.cache is not None:
                self.bind(batch)
        self.batch = batch

    def bind(self, batch: BatchState) -> None:
        """Bind a prompt's decisions to the (empty) cache it fills."""
        batch.record = self.records[batch.cache] = CacheRecord(batch.decisions)


class DynamicDecoderLayer(nn.Module):
    """Wraps one decoder layer; same call signature as the Hugging Face layer it replaces.

    The layer runs through its adapter's :meth:`~prunekit.components.LayerAdapter.run_block`,
    with this wrapper as the :class:`~prunekit.components.BlockDriver` that decides each
    group's kept set (or reuses the prompt's) and gathers the weights.
    """

    def __init__(self, layer: nn.Module, adapter: LayerAdapter, runtime: Runtime) -> None:
        super().__init__()
        self.layer = layer
        self.adapter = adapter
        self._runtime = [runtime]  # a list: not registered as a submodule

    @property
    def runtime(self) -> Runtime:
        return self._runtime[0]

    def _dispatched(self) -> bool:
        """Whether accelerate hooks this layer or a module of it. Asked per forward, but the
        walk over the layer's modules is done again only when their set changes (a model
        dispatched after it was wrapped), not on every decoding step."""
        modules = self.layer._modules
        key = (id(self.layer), len(modules), hasattr(self.layer, "_hf_hook"))
        cached = getattr(self, "_dispatch_cache", None)
        if cached is None or cached[0] != key:
            found = any(hasattr(m, "_hf_hook") for m in self.layer.modules())
            self._dispatch_cache = (key, found)
            return found
        return cached[1]

    def _plan(
        self, la: LayerAdapter, group: str, kept: torch.Tensor | None, device: torch.device
    ) -> Plan:
        """Gathered weights for ``kept``: None or 1-D (or rows that all agree) as one kept set,
        rows that differ as their union with per-row masks (:mod:`prunekit.rows`). A kept set
        that covers every unit uses the layer's own weights (no copy)."""
        with self.runtime.timers("gather", device):
            union = None
            if kept is not None and kept.dim() == 2:
                rows = row_union(kept)
                if isinstance(rows, RowUnion):
                    if not la.row_masks:
                        raise TypeError(
                            f"layer {la.index} {group}: the rows of this batch keep different "
                            f"units, but {type(la).__name__} does not declare row_masks (its "
                            "run() takes no per-row unit_mask); per-sequence dynamic methods "
                            "need an adapter that does (see docs/plugins-reference.md, 'Per-row masks')"
                        )
                    union, kept = rows, rows.units
                else:
                    kept = rows
            if kept is not None and kept.numel() == la.units(group):
                kept = None  # every unit, in order: the layer's own weights
            return Plan(kept, la.gather(group, kept), union)

    def _execute(
        self, la: LayerAdapter, group: str, plan: Plan, run, observe: bool, dtype: torch.dtype
    ):
        """The block's output (and, with ``observe``, its activations: per row the channels of
        that row's kept units, in their order) on ``plan``."""
        if plan.union is None:
            return run(plan.weights, observe)
        out = run(plan.weights, observe, unit_mask=plan.mask(dtype))
        if not observe:
            return out
        y, act = out
        channels = la.unit_channels(group, plan.union.index.to(act.device))  # [B, k * width]
        return y, act.gather(2, channels[:, None, :].expand(-1, act.shape[1], -1))

    def _sync_cache(self, la: LayerAdapter, group: str, plan: Plan) -> None:
        """Keep the KV cache consistent with the heads ``plan`` runs: record which heads a
        layer's cache entry is first written with, and narrow it when a continuation keeps
        fewer (a prompt that ran dense, then pruned decoding)."""
        batch = self.runtime.batch
        record = batch.record
        if group != ATTN or record is None:
            return
        heads = la.cached_kv_heads(plan.units)
        if la.index not in record.heads:
            record.heads[la.index] = heads
            return
        held = record.heads[la.index]
        if held is heads or (held is not None and heads is not None and torch.equal(held, heads)):
            return
        where = f"layer {la.index} attention"
        if heads is None:
            raise RuntimeError(
                f"{where}: the KV cache holds only the {held.numel()} heads its prompt kept, and "
                "this forward runs every head; continue a cache with the model that filled it, "
                "pruned as it was"
            )
        held_all = (
            held.to(heads.device)
            if held is not None
            else torch.arange(la.num_heads, device=heads.device)
        )
        pos = torch.searchsorted(held_all, heads).clamp(max=held_all.numel() - 1)
        if not torch.equal(held_all[pos], heads):
            raise RuntimeError(
                f"{where}: this forward runs heads {heads.tolist()}, not all of which the KV "
                f"cache holds ({held_all.tolist()}); a continuation can only keep fewer heads "
                "than its prompt"
            )
        select_cache_heads(batch.cache, la.cache_layer, pos, where)
        record.heads[la.index] = heads

    def _continue(self, la: LayerAdapter, group: str, run, x: torch.Tensor):
        """A forward that continues a prompt: its kept set and gathered weights, reused."""
        bsz = x.shape[0]
        decisions = self.runtime.batch.decisions
        key = (la.index, group)
        if key not in decisions.kept:
            raise RuntimeError(
                f"layer {la.index} {group}: this forward continues a prompt (its KV cache "
                "is not empty) but this model has no kept set from that prompt; run the "
                "prompt through this dynamic model first (e.g. model.generate)"
            )
        plan = decisions.plans.get(key)
        if plan is None:
            kept = decisions.kept[key]
            rows = kept.shape[0] if kept is not None and kept.dim() == 2 else None
            if rows is not None and rows != bsz:
                raise RuntimeError(
                    f"layer {la.index} {group}: per-sequence kept sets were decided for "
                    f"{rows} prompts, this continuation has {bsz} rows"
                )
            plan = decisions.plans[key] = self._plan(la, group, kept, x.device)
        elif plan.rows is not None and plan.rows != bsz:
            raise RuntimeError(
                f"layer {la.index} {group}: per-sequence kept sets were decided for "
                f"{plan.rows} prompts, this continuation has {bsz} rows"
            )
        self._sync_cache(la, group, plan)
        # continuing a prompt leaves the method's state alone
        return self._execute(la, group, plan, run, False, x.dtype)

    def _drive(self, la: LayerAdapter, group: str, x, residual, run, residual_sq_mean=None):
        rt, batch = self.runtime, self.runtime.batch
        key = (la.index, group)
        batch.residuals[key] = residual
        if residual_sq_mean is not None:
            batch.residual_sq_means[key] = residual_sq_mean
        decisions = batch.decisions
        if batch.continuing or (rt.holding and key in decisions.kept):
            return self._continue(la, group, run, x)
        on_prompt = rt.protocol.decides == "prompt"
        # inside hold() the method's state is left alone, but a method that decides on the
        # prompt still sees the prompt it decides on
        observe = (
            rt.observes_activations
            and (on_prompt or not rt.holding)
            and rt.controller.wants_activations(la, group)
        )
        if on_prompt:
            # the prompt runs dense and is observed; the decision is for what continues it
            plan = self._plan(la, group, None, x.device)
            self._sync_cache(la, group, plan)
            out = self._execute(la, group, plan, run, observe, x.dtype)
            if observe:
                out, act = out
                rt.controller.observe(la, group, None, act, batch)
            decisions.kept[key] = _sorted_rows(rt.controller.decide(la, group, x, residual, batch))
            return out
        kept = _sorted_rows(rt.controller.decide(la, group, x, residual, batch))
        decisions.kept[key] = kept
        plan = self._plan(la, group, kept, x.device)
        if batch.record is not None:  # a generation: its continuations reuse these weights
            decisions.plans[key] = plan
        self._sync_cache(la, group, plan)
        out = self._execute(la, group, plan, run, observe, x.dtype)
        if observe:
            y, act = out
            rt.controller.observe(la, group, kept, act, batch)
            return y
        return out

    def forward(self, hidden_states, *args, **kwargs):
        rt = self.runtime
        if not rt.enabled:
            return self.layer(hidden_states, *args, **kwargs)
        if args:  # name positional arguments as the wrapped layer does
            hidden_states, kwargs = _as_keywords(self.layer.forward, hidden_states, args, kwargs)
        if rt.batch is None:
            # called on its own (not through the model): every token is real
            bsz, seq = hidden_states.shape[:2]
            position_ids = kwargs.get("position_ids")
            pos = (
                position_ids
                if position_ids is not None
                else torch.arange(seq, device=hidden_states.device)[None]
            )
            rt.start(
                BatchState(
                    torch.ones(bsz, seq, dtype=torch.bool, device=hidden_states.device),
                    pos.expand(bsz, seq),
                )
            )
            try:
                return self.forward(hidden_states, **kwargs)
            finally:
                rt.batch = None
        la, batch = self.adapter, rt.batch
        if batch.cache is None:
            cache = next((kwargs[k] for k in CACHE_KEYWORDS if kwargs.get(k) is not None), None)
            if cache is not None:  # created inside the model's forward: empty, a prompt's
                batch.cache = cache
                if not batch.continuing:
                    rt.bind(batch)
        if self._dispatched():  # accelerate's
            out = _run_dispatched(
                self.layer,
                batch,
                la.index,
                hidden_states,
                kwargs,
                lambda h, kw: la.run_block(h, driver=self._drive, **kw),
            )
        else:
            out = la.run_block(hidden_states, driver=self._drive, **kwargs)
        # keep only what async probing may read (the previous layer's residuals)
        for stale in ((la.index - 1, ATTN), (la.index - 2, MLP)):
            batch.residuals.pop(stale, None)
            batch.residual_sq_means.pop(stale, None)
        return out


def _run_dispatched(
    layer: nn.Module, batch: BatchState, index: int, hidden_states, kwargs: dict, run
):
    """``run(hidden_states, kwargs)`` for a layer dispatched by accelerate, which calling
    ``run_block`` instead of the layer's ``forward`` would bypass: the layer's own hook moves
    the inputs to its execution device (and post-processes the output), its offloaded weights
    are onloaded for the call, and the batch's tensors follow the layer to its device."""
    hook = getattr(layer, "_hf_hook", None)
    device = execution_device(layer)
    if hook is not None:
        args, kwargs = hook.pre_forward(layer, hidden_states, **kwargs)
        hidden_states = args[0]
    else:  # hooks only on submodules: move what the layer computes on
        from accelerate.utils import send_to_device

        hidden_states = hidden_states.to(device)
        kwargs = {
            k: v if k in ("cache", "past_key_values") else send_to_device(v, device)
            for k, v in kwargs.items()
        }
    if batch.token_mask.device != device:
        batch.token_mask = batch.token_mask.to(device)
        batch.position_ids = batch.position_ids.to(device)
    for key in ((index - 1, MLP), (index - 1, ATTN)):  # what asynchronous probing reads
        for kept in (batch.residuals, batch.residual_sq_means):
            if key in kept:
                kept[key] = kept[key].to(device)
    with onloaded(layer):
        out = run(hidden_states, kwargs)
    return hook.post_forward(layer, out) if hook is not None else out


def _sorted_rows(kept: torch.Tensor | None) -> torch.Tensor | None:
    """A per-sequence decision with each row's units in ascending order (the order of the
    gathered weights and of the activations ``observe`` sees)."""
    if kept is not None and kept.dim() == 2:
        return kept.sort(dim=1).values
    return kept


def _outside_blocks_bytes(model: nn.Module, blocks: set[int]) -> int:
    """Bytes of the parameters outside the decoder blocks (``blocks``: their data pointers)
    that a decoding step reads: an input embedding not tied to the output embedding is only
    indexed, so it does not count."""
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    skip = set()
    if embed is not None and (head is None or head.weight.data_ptr() != embed.weight.data_ptr()):
        skip.add(embed.weight.data_ptr())
    seen: dict[int, int] = {}
    for p in model.parameters():
        ptr = p.data_ptr()
        if ptr not in blocks and ptr not in skip:
            seen[ptr] = p.numel() * p.element_size()
    return sum(seen.values())


def _token_mask_of(mask, bsz: int, seq: int, past: int, device) -> torch.Tensor:
    """Which of a forward's ``seq`` new tokens are real, from a 4-D attention mask (a token
    sees itself unless it is padding; boolean masks allow with True, additive ones with 0),
    or from the full-attention entry of a per-layer-type dict of them. Anything else (none,
    flex attention's BlockMask): every token."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] >= past + seq:
        i = torch.arange(seq, device=mask.device)
        diag = mask[:, 0, i, past + i] if mask.shape[-2] >= seq else None
        if diag is not None:
            real = diag if diag.dtype == torch.bool else diag == 0
            return real.expand(bsz, seq).to(device)
    return torch.ones(bsz, seq, dtype=torch.bool, device=device)


def _tensors(weights) -> list[torch.Tensor]:
    """The tensors of a gathered-weights object (a dataclass, tuple or dict of tensors)."""
    if isinstance(weights, torch.Tensor):
        return [weights]
    if isinstance(weights, dict):
        values = weights.values()
    elif isinstance(weights, list | tuple):
        values = weights
    elif hasattr(weights, "__dict__"):
        values = vars(weights).values()
    else:
        return []
    return [t for v in values if not isinstance(v, nn.Module) for t in _tensors(v)]


def true_positions(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """True positions of the last ``seq`` tokens of a 2-D ``attention_mask`` (1 = real token)
    that spans every token so far: left-padded rows count from their first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]


def begin_evaluation(model, input_ids=None, attention_mask=None) -> None:
    """Start an evaluation of any model: a dynamic model follows its method's protocol
    (reset, warm-up on ``input_ids``); dense and static models need nothing."""
    begin = getattr(model, "begin_evaluation", None)
    if begin is not None:
        begin(input_ids, attention_mask)


def _as_keywords(forward, hidden_states, args, kwargs) -> tuple[Any, dict]:
    """``(hidden_states, kwargs)`` with positional ``args`` named after ``forward``'s signature."""
    sig = inspect.signature(forward)
    first = next(iter(sig.parameters.values()), None)
    if first is None or first.kind is inspect.Parameter.VAR_POSITIONAL:
        raise TypeError(
            f"{forward.__qualname__} takes no named hidden_states argument, so its "
            "positional arguments cannot be passed on by name"
        )
    bound = sig.bind(hidden_states, *args, **kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{forward.__qualname__}: extra positional arguments {value!r}")
        else:
            named[name] = value
    return named.pop(first.name), named


class DynamicModel(nn.Module):
    """A causal LM whose decoder layers are pruned per batch by a :class:`Controller`.

    Call it like the wrapped Hugging Face model (``input_ids``, ``attention_mask``, ``labels``
    -> ``loss``, ``logits``). Unknown attributes (``config``, ``generate``...) are looked up on
    the wrapped model.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        controller: Controller,
        protocol: DynamicProtocol | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        protocol = protocol or DynamicProtocol()
        if protocol.stateful:
            needed = ["snapshot", "restore", *(["reset"] if protocol.reset else [])]
            missing = [m for m in needed if not callable(getattr(controller, m, None))]
            if missing:
                raise TypeError(
                    f"{type(controller).__name__}: a stateful dynamic method's controller needs "
                    f"{', '.join(needed)} (missing {', '.join(missing)}), so that evaluations "
                    "start from the same state and warm-up and timing leave no trace"
                )
        if protocol.decides in ("sequence", "prompt"):
            lacking = sorted({type(la).__name__ for la in adapter.layers() if not la.row_masks})
            if lacking:
                raise TypeError(
                    f"a method that decides per {protocol.decides} runs the rows of a batch "
                    f"with their own kept units, which needs an adapter whose run() takes a "
                    f"per-row unit_mask; {', '.join(lacking)} does not declare row_masks "
                    "(see docs/plugins-reference.md, 'Per-row masks')"
                )
        self.runtime = Runtime(controller, adapter, protocol)
        if hasattr(controller, "timers"):
            controller.timers = self.runtime.timers  # the controller times its own phases
        layers = adapter.decoder_layers
        self._originals = list(layers)
        for i, la in enumerate(adapter.layers()):
            layers[i] = DynamicDecoderLayer(self._originals[i], la, self.runtime)
        self._hooks = [
            model.register_forward_pre_hook(self._begin_forward, with_kwargs=True),
            model.register_forward_hook(self._end_forward, with_kwargs=True, always_call=True),
        ]
        self._forward_params = list(inspect.signature(model.forward).parameters)
        self._generate_mask: torch.Tensor | None = None
        # beam search reorders the cache through the model's ``_reorder_cache`` when it has
        # one (Hugging Face ``generate``): the per-row kept sets bound to it follow
        self._installed_reorder = not hasattr(model, "_reorder_cache")
        if self._installed_reorder:
            model._reorder_cache = self._reorder_cache

    @property
    def controller(self) -> Controller:
        return self.runtime.controller

    @property
    def protocol(self) -> DynamicProtocol:
        """The method's declared decision and evaluation protocol."""
        return self.runtime.protocol

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        seq = ref.shape[1]
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # true positions of left-padded rows (the mask spans the cached tokens too)
            position_ids = true_positions(attention_mask, seq)
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )

    def _argument(self, name: str, args: tuple, kwargs: dict):
        """The wrapped model's forward argument ``name``, given by keyword or position."""
        if kwargs.get(name) is not None:
            return kwargs[name]
        if name in self._forward_params:
            i = self._forward_params.index(name)
            if i < len(args):
                return args[i]
        return None

    def _begin_forward(self, module, args, kwargs) -> None:
        """Forward pre-hook of the wrapped model (so that its ``generate`` passes here too):
        the batch's token mask, true positions, its KV cache and whether it continues one."""
        if not self.runtime.enabled:  # dense(): the original layers run, nothing is decided
            return
        input_ids = self._argument("input_ids", args, kwargs)
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        bsz, seq = ref.shape[:2]
        cache = next(
            (c for c in (self._argument(k, args, kwargs) for k in CACHE_KEYWORDS) if c is not None),
            None,
        )
        if cache is not None and not callable(getattr(cache, "get_seq_length", None)):
            raise TypeError(
                f"{type(cache).__name__} is not a transformers Cache; pass a "
                "DynamicCache, StaticCache or another Cache object"
            )
        past = int(cache.get_seq_length()) if cache is not None else 0
        mask = self._argument("attention_mask", args, kwargs)
        position_ids = self._argument("position_ids", args, kwargs)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            token_mask = mask[:, -seq:].bool()
            if position_ids is None:
                position_ids = true_positions(mask, seq)
        else:
            # generate turns the 2-D mask into 4-D ones with a static cache: the prompt's own
            # 2-D mask (kept by DynamicModel.generate), else the 4-D mask's diagonal
            prompt = self._generate_mask
            if past == 0 and prompt is not None and tuple(prompt.shape) == (bsz, seq):
                token_mask = prompt.bool().to(ref.device)
            else:
                token_mask = _token_mask_of(mask, bsz, seq, past, ref.device)
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=ref.device)
        self.runtime.start(
            BatchState(token_mask, position_ids.expand(bsz, seq), continuing=past > 0, cache=cache)
        )

    def _end_forward(self, module, args, kwargs, output) -> None:
        self.runtime.batch = None

    def generate(self, *args, **kwargs):
        """Hugging Face ``generate`` through the pruned layers: kept sets are decided on the
        prompt (prefill) and reused by every decoding step (per row where the method decides
        per sequence); left-padded prompts get their true positions and stay out of the
        decisions, with any cache class."""
        mask = kwargs.get("attention_mask")
        previous = self._generate_mask
        self._generate_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            self._generate_mask = previous

    @property
    def decisions(self) -> dict[tuple[int, str], torch.Tensor | None]:
        """The kept set of every block on the last prompt (``(layer, group)`` -> kept; inside
        ``hold()`` the held ones)."""
        rt = self.runtime
        return dict((rt.held if rt.holding and rt.held is not None else rt.last).kept)

    def decisions_for(self, cache) -> dict[tuple[int, str], torch.Tensor | None]:
        """The kept sets that forwards continuing ``cache`` use (those of the prompt that
        filled it); KeyError for a cache this model did not fill."""
        record = self.runtime.records.get(cache)
        if record is None:
            raise KeyError("this dynamic model filled no such cache")
        return dict(record.decisions.kept)

    def _reorder_cache(self, cache, beam_idx: torch.Tensor):
        """Beam search's reordering of the cache rows, applied to its per-row kept sets too."""
        cache.reorder_cache(beam_idx)
        record = self.runtime.records.get(cache)
        if record is not None:
            record.decisions = record.decisions.select_rows(beam_idx)
        return cache

    def step_weight_bytes(self, cache=None) -> int:
        """Bytes of weights one forward continuing ``cache`` reads: each block's gathered (or
        own) weights, plus everything outside the decoder blocks that a decoding step reads
        (norms, the output embedding; an untied input embedding only reads its rows).
        Without a cache this model filled: the dense model's."""
        record = self.runtime.records.get(cache) if cache is not None else None
        plans = record.decisions.plans if record is not None else {}
        in_blocks: dict[int, int] = {}
        read: dict[int, int] = {}
        for la in self.runtime.adapter.layers():
            for group in la.groups:
                for t in _tensors(la.gather(group, None)):
                    in_blocks[t.data_ptr()] = t.numel() * t.element_size()
                plan = plans.get((la.index, group))
                weights = plan.weights if plan is not None else la.gather(group, None)
                for t in _tensors(weights):
                    read[t.data_ptr()] = t.numel() * t.element_size()
        return sum(read.values()) + _outside_blocks_bytes(self.model, set(in_blocks))

    def held_weight_bytes(self) -> int:
        """Bytes of gathered weights held for continuing the live prompts (copies only: a kept
        set covering every unit uses the layer's own weights), counted once per tensor."""
        seen: dict[int, int] = {}
        originals = {p.data_ptr() for p in self.model.parameters()}
        for record in list(self.runtime.records.values()):
            for plan in record.decisions.plans.values():
                for t in _tensors(plan.weights):
                    if t.data_ptr() not in originals:
                        seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    # -- state (optional controller methods: reset, snapshot, restore) ------------------------
    def reset_state(self) -> None:
        """Back to the post-calibration state, e.g. before each evaluation."""
        reset = getattr(self.controller, "reset", None)
        if reset is not None:
            reset()

    @contextlib.contextmanager
    def preserved_state(self) -> Iterator[None]:
        """Run forwards that leave no trace in the method's state (timing, warm-up)."""
        snapshot = getattr(self.controller, "snapshot", None)
        saved = snapshot() if snapshot is not None else None
        try:
            yield
        finally:
            if snapshot is not None:
                self.controller.restore(saved)

    @torch.no_grad()
    def warmup(self, input_ids, attention_mask=None, runs: int = 1) -> None:
        """Run a batch ``runs`` times, unscored, leaving the method's state unchanged."""
        with self.preserved_state():
            for _ in range(runs):
                self(input_ids=input_ids, attention_mask=attention_mask)

    def begin_evaluation(self, input_ids=None, attention_mask=None) -> None:
        """What the method's protocol asks before an evaluation scores its first batch: its
        state reset to post-calibration, then its warm-up runs on that batch (every
        evaluation path calls this; see :func:`begin_evaluation`)."""
        if self.protocol.reset:
            self.reset_state()
        if self.protocol.warmup_batches and input_ids is not None:
            self.warmup(input_ids, attention_mask, runs=self.protocol.warmup_batches)

    @contextlib.contextmanager
    def dense(self) -> Iterator[None]:
        """Run the original dense layers inside the block (for timing against dense)."""
        previous, self.runtime.enabled = self.runtime.enabled, False
        try:
            yield
        finally:
            self.runtime.enabled = previous

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Every forward inside reuses the first decision made inside (and its gathered
        weights), with or without a KV cache, and observes nothing."""
        rt = self.runtime
        rt.holding, rt.held = True, Decisions()
        try:
            yield
        finally:
            rt.holding = False
            if rt.held.kept:
                rt.last = rt.held
            rt.held = None

    def remove(self) -> nn.Module:
        """Restore the original layers and return the unwrapped model."""
        for hook in self._hooks:
            hook.remove()
        if self._installed_reorder and "_reorder_cache" in vars(self.model):
            del self.model._reorder_cache
        layers = self.runtime.adapter.decoder_layers
        for i, original in enumerate(self._originals):
            layers[i] = original
        return self.model
