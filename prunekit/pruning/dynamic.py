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
(``decides``): one kept set per batch (the fast path), one per sequence (``[B, k]``: rows that
share a set run together, the others as separate gathered matmuls, see
:mod:`prunekit.rows`), or on the prompt only (the prompt runs dense and is observed).
A forward that continues a KV cache (generation's decoding steps, a scored continuation)
reuses the kept sets decided on its prompt, so the cache stays consistent with the kept heads;
a test counts the decisions.

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
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from prunekit.components import ATTN, MLP, DynamicProtocol, LayerAdapter, ModelAdapter
from prunekit.devices import execution_device, input_device, onloaded
from prunekit.rows import RowCacheView, row_groups


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

    @functools.cached_property
    def unpadded(self) -> bool:
        """Every token of the batch is real (no padding): controllers may skip their masks.
        Read once per forward (one host synchronisation), not once per block."""
        return bool(self.token_mask.all())


class Controller(Protocol):
    """The decision logic of a dynamic method (one object per run)."""

    def decide(self, layer: LayerAdapter, group: str, x: torch.Tensor, residual: torch.Tensor,
               batch: BatchState) -> torch.Tensor | None:  # fmt: skip
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

    def observe(self, layer: LayerAdapter, group: str, kept: torch.Tensor | None,
                activations: torch.Tensor, batch: BatchState) -> None:  # fmt: skip
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


#: a block's gathered weights: one object for the whole batch, or (rows, weights) per group
Plan = Any


class Runtime:
    """Shared state of the wrapped layers: the controller, the current batch, the switches."""

    def __init__(self, controller: Controller, adapter: ModelAdapter,
                 protocol: DynamicProtocol) -> None:  # fmt: skip
        self.controller = controller
        self.adapter = adapter
        self.protocol = protocol
        self.observes_activations = "activations" in protocol.observes
        self.enabled = True  # False: every layer runs its original (dense) forward
        self.batch: BatchState | None = None
        self.timers = Timers()
        self.holding = False
        #: the kept set of every block on the last prompt (what continuations reuse)
        self.decisions: dict[tuple[int, str], torch.Tensor | None] = {}
        #: gathered weights of those decisions, built on the first continuation
        self.continued: dict[tuple[int, str], Plan] = {}

    def start(self, batch: BatchState) -> None:
        """A forward begins: a new prompt forgets the previous prompt's decisions."""
        if not batch.continuing and not self.holding:
            self.decisions.clear()
            self.continued.clear()
        self.batch = batch


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

    def _plan(self, la: LayerAdapter, group: str, kept: torch.Tensor | None,
              device: torch.device) -> Plan:  # fmt: skip
        """Gathered weights for ``kept``: one set (1-D or None, or rows that all agree), or a
        list of ``(rows, weights)``, one per distinct per-sequence kept set."""
        with self.runtime.timers("gather", device):
            if kept is None or kept.dim() == 1:
                return la.gather(group, kept)
            groups = row_groups(kept)
            if len(groups) == 1:  # every row agrees: the per-batch fast path
                return la.gather(group, groups[0].kept)
            return [(g.rows, la.gather(group, g.kept)) for g in groups]

    def _execute(self, plan: Plan, run, observe: bool, batch_size: int):
        """The block's output (and, with ``observe``, its activations) on ``plan``."""
        if not isinstance(plan, list):
            return run(plan, observe)
        pending: list = []
        caches: list = []

        def views(rows):
            def view(cache):
                caches.append(cache)
                return RowCacheView(cache, rows, batch_size, pending)

            return view

        ys, acts = [], []
        for rows, weights in plan:
            out = run(weights, observe, rows=rows, cache_view=views(rows))
            y, act = out if observe else (out, None)
            ys.append((rows, y))
            acts.append((rows, act))
        if pending:
            RowCacheView.commit(caches[0], pending, batch_size)
        y = _merge_rows(ys, batch_size)
        return (y, _merge_rows(acts, batch_size)) if observe else y

    def _drive(self, la: LayerAdapter, group: str, x, residual, run, residual_sq_mean=None):
        rt, batch = self.runtime, self.runtime.batch
        key = (la.index, group)
        batch.residuals[key] = residual
        if residual_sq_mean is not None:
            batch.residual_sq_means[key] = residual_sq_mean
        bsz = x.shape[0]
        if batch.continuing or (rt.holding and key in rt.decisions):
            if key not in rt.decisions:
                raise RuntimeError(
                    f"layer {la.index} {group}: this forward continues a prompt (its KV cache "
                    "is not empty) but this model has no kept set from that prompt; run the "
                    "prompt through this dynamic model first (e.g. model.generate)"
                )
            kept = rt.decisions[key]
            if kept is not None and kept.dim() == 2 and kept.shape[0] != bsz:
                raise RuntimeError(
                    f"layer {la.index} {group}: per-sequence kept sets were decided for "
                    f"{kept.shape[0]} prompts, this continuation has {bsz} rows"
                )
            plan = rt.continued.get(key)
            if plan is None:
                plan = rt.continued[key] = self._plan(la, group, kept, x.device)
            # continuing a prompt leaves the method's state alone
            return self._execute(plan, run, False, bsz)
        on_prompt = rt.protocol.decides == "prompt"
        # inside hold() the method's state is left alone, but a method that decides on the
        # prompt still sees the prompt it decides on
        observe = (rt.observes_activations and (on_prompt or not rt.holding)
                   and rt.controller.wants_activations(la, group))  # fmt: skip
        if on_prompt:
            # the prompt runs dense and is observed; the decision is for what continues it
            out = run(self._plan(la, group, None, x.device), observe)
            if observe:
                out, act = out
                rt.controller.observe(la, group, None, act, batch)
            rt.decisions[key] = _sorted_rows(rt.controller.decide(la, group, x, residual, batch))
            return out
        kept = _sorted_rows(rt.controller.decide(la, group, x, residual, batch))
        rt.decisions[key] = kept
        out = self._execute(self._plan(la, group, kept, x.device), run, observe, bsz)
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
            pos = position_ids if position_ids is not None else torch.arange(
                seq, device=hidden_states.device)[None]  # fmt: skip
            rt.start(BatchState(
                torch.ones(bsz, seq, dtype=torch.bool, device=hidden_states.device),
                pos.expand(bsz, seq),
            ))  # fmt: skip
            try:
                return self.forward(hidden_states, **kwargs)
            finally:
                rt.batch = None
        la, batch = self.adapter, rt.batch
        if any(hasattr(m, "_hf_hook") for m in self.layer.modules()):  # accelerate's
            out = _run_dispatched(self.layer, batch, la.index, hidden_states, kwargs,
                                  lambda h, kw: la.run_block(h, driver=self._drive, **kw))  # fmt: skip
        else:
            out = la.run_block(hidden_states, driver=self._drive, **kwargs)
        # keep only what async probing may read (the previous layer's residuals)
        for stale in ((la.index - 1, ATTN), (la.index - 2, MLP)):
            batch.residuals.pop(stale, None)
            batch.residual_sq_means.pop(stale, None)
        return out


def _run_dispatched(layer: nn.Module, batch: BatchState, index: int, hidden_states,
                    kwargs: dict, run):  # fmt: skip
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
        kwargs = {k: v if k in ("cache", "past_key_values") else send_to_device(v, device)
                  for k, v in kwargs.items()}  # fmt: skip
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


def _merge_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> torch.Tensor:
    """Row groups' outputs back in batch order."""
    ref = parts[0][1]
    out = ref.new_empty((batch_size, *ref.shape[1:]))
    for rows, t in parts:
        if tuple(t.shape[1:]) != tuple(ref.shape[1:]):
            raise RuntimeError(f"row groups returned shapes {tuple(ref.shape)} and "
                               f"{tuple(t.shape)}; per-sequence kept sets must have one size")  # fmt: skip
        out.index_copy_(0, rows.to(out.device), t)
    return out


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
        raise TypeError(f"{forward.__qualname__} takes no named hidden_states argument, so its "
                        "positional arguments cannot be passed on by name")  # fmt: skip
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

    def __init__(self, model: nn.Module, adapter: ModelAdapter, controller: Controller,
                 protocol: DynamicProtocol | None = None) -> None:  # fmt: skip
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
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, **kwargs)  # fmt: skip

    def _begin_forward(self, module, args, kwargs) -> None:
        """Forward pre-hook of the wrapped model (so that its ``generate`` passes here too):
        the batch's token mask, true positions and whether it continues a prompt."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        bsz, seq = ref.shape[:2]
        cache = kwargs.get("cache")  # transformers >= 5.24; before: past_key_values
        cache = cache if cache is not None else kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        position_ids = kwargs.get("position_ids")
        if mask is not None and mask.dim() == 2:
            token_mask = mask[:, -seq:].bool()
            if position_ids is None:
                position_ids = true_positions(mask, seq)
        else:
            token_mask = torch.ones(bsz, seq, dtype=torch.bool, device=ref.device)
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=ref.device)
        self.runtime.start(BatchState(token_mask, position_ids.expand(bsz, seq),
                                      continuing=past > 0))  # fmt: skip

    def _end_forward(self, module, args, kwargs, output) -> None:
        self.runtime.batch = None

    def generate(self, *args, **kwargs):
        """Hugging Face ``generate`` through the pruned layers: kept sets are decided on the
        prompt (prefill) and reused by every decoding step (per row where the method decides
        per sequence); left-padded prompts get their true positions."""
        return self.model.generate(*args, **kwargs)

    @property
    def decisions(self) -> dict[tuple[int, str], torch.Tensor | None]:
        """The kept set of every block on the last prompt (``(layer, group)`` -> kept)."""
        return dict(self.runtime.decisions)

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
        rt.holding = True
        rt.decisions.clear()
        rt.continued.clear()
        try:
            yield
        finally:
            rt.holding = False
            rt.decisions.clear()
            rt.continued.clear()

    def remove(self) -> nn.Module:
        """Restore the original layers and return the unwrapped model."""
        for hook in self._hooks:
            hook.remove()
        layers = self.runtime.adapter.decoder_layers
        for i, original in enumerate(self._originals):
            layers[i] = original
        return self.model
