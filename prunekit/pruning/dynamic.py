"""The dynamic per-batch runtime: decide kept sets per batch and block, run smaller matmuls.

A dynamic method supplies a :class:`Controller`; :class:`DynamicModel` wraps every decoder layer
of the model so that, for each batch and each block (attention, MLP), the controller decides
the kept units and the block runs on weights gathered to that kept set (real, smaller
matrices). The layer itself runs through its model adapter (``run_block``), so the runtime
knows no architecture.
The wrapped model (:class:`DynamicModel`) answers like a Hugging Face causal LM, so evaluation
code is shared with static and dense models.

Padding: the wrapper reads the batch's 2-D ``attention_mask`` (1 = real token) and, when no
``position_ids`` are given and there is no cache, derives them from it (``cumsum - 1``), so
left-padded sequences get their true positions. Controllers receive the token mask and the
positions and must keep pad tokens out of their decisions.

The method's :class:`~prunekit.components.DynamicProtocol` travels with the model
(``DynamicModel.protocol``): what the method observes, and how an evaluation starts
(:meth:`DynamicModel.begin_evaluation`: reset, warm-up), so that evaluation code asks the
model instead of assuming one method's protocol.

Holding: inside ``with model.hold():`` the last kept set of every block is reused without
new decisions (e.g. decided on a prompt, held across decoding steps with a KV cache), and the
gathered weights are cached.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from prunekit.components import ATTN, MLP, DynamicProtocol, LayerAdapter, ModelAdapter


@dataclass
class BatchState:
    """What every block of the current forward can see."""

    token_mask: torch.Tensor  # [B, T] bool, True = real token
    position_ids: torch.Tensor  # [B, T] true positions
    #: residual stream entering each group: ``(layer, group)`` -> ``[B, T, d]`` (the current
    #: layer's and, for asynchronous probing, the previous layer's)
    residuals: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


class Controller(Protocol):
    """The decision logic of a dynamic method (one object per run)."""

    def decide(self, layer: LayerAdapter, group: str, x: torch.Tensor, residual: torch.Tensor,
               batch: BatchState) -> torch.Tensor | None:  # fmt: skip
        """Kept units of ``group`` for this batch (sorted LongTensor), or None for all.

        :param x: the block's normalised input [B, T, d]; :param residual: the pre-norm
            residual entering the block [B, T, d].
        """

    def wants_activations(self, layer: LayerAdapter, group: str) -> bool:
        """Whether :meth:`observe` needs the output projection's input for this block (asked
        only when the method's protocol ``observes`` ``"activations"``)."""

    def observe(self, layer: LayerAdapter, group: str, kept: torch.Tensor | None,
                activations: torch.Tensor, batch: BatchState) -> None:  # fmt: skip
        """See the full batch's (post-pruning) input of the output projection, [B, T, |kept|]."""

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
        self.held: dict[tuple[int, str], tuple[torch.Tensor | None, Any]] = {}


class DynamicDecoderLayer(nn.Module):
    """Wraps one decoder layer; same call signature as the Hugging Face layer it replaces.

    The layer runs through its adapter's :meth:`~prunekit.components.LayerAdapter.run_block`,
    with this wrapper as the :class:`~prunekit.components.BlockDriver` that decides each
    group's kept set (or reuses a held one) and gathers the weights.
    """

    def __init__(self, layer: nn.Module, adapter: LayerAdapter, runtime: Runtime) -> None:
        super().__init__()
        self.layer = layer
        self.adapter = adapter
        self._runtime = [runtime]  # a list: not registered as a submodule

    @property
    def runtime(self) -> Runtime:
        return self._runtime[0]

    def _drive(self, la: LayerAdapter, group: str, x, residual, run):
        rt, batch = self.runtime, self.runtime.batch
        key = (la.index, group)
        batch.residuals[key] = residual
        if rt.holding and key in rt.held:
            kept, weights = rt.held[key]
        else:
            kept = rt.controller.decide(la, group, x, residual, batch)
            with rt.timers("gather", x.device):
                weights = la.gather(group, kept)
            if rt.holding:
                rt.held[key] = (kept, weights)
        # held decisions (e.g. decoding steps) leave the method's state alone
        observe = (rt.observes_activations and not rt.holding
                   and rt.controller.wants_activations(la, group))  # fmt: skip
        out = run(weights, observe)
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
            # called without the wrapper (e.g. by Hugging Face generate): every token is real
            bsz, seq = hidden_states.shape[:2]
            position_ids = kwargs.get("position_ids")
            pos = position_ids if position_ids is not None else torch.arange(
                seq, device=hidden_states.device)[None]  # fmt: skip
            rt.batch = BatchState(
                torch.ones(bsz, seq, dtype=torch.bool, device=hidden_states.device),
                pos.expand(bsz, seq),
            )
            try:
                return self.forward(hidden_states, **kwargs)
            finally:
                rt.batch = None
        la, batch = self.adapter, rt.batch
        out = la.run_block(hidden_states, driver=self._drive, **kwargs)
        # keep only what async probing may read (the previous layer's residuals)
        batch.residuals.pop((la.index - 1, ATTN), None)
        batch.residuals.pop((la.index - 2, MLP), None)
        return out


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
        return next(self.model.parameters()).device

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        bsz, seq = ref.shape[:2]
        has_cache = kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask.bool()
            if position_ids is None and not has_cache and seq == attention_mask.shape[1]:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            token_mask = torch.ones(bsz, seq, dtype=torch.bool, device=ref.device)
        if position_ids is None:
            past = 0
            cache = kwargs.get("past_key_values")
            cache = cache if cache is not None else kwargs.get("cache")  # an empty cache is falsy
            if cache is not None:
                past = cache.get_seq_length()
            position_ids = torch.arange(past, past + seq, device=ref.device).expand(bsz, seq)
        token_mask = token_mask[:, -seq:]
        self.runtime.batch = BatchState(token_mask, position_ids.expand(bsz, seq))
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, **kwargs)  # fmt: skip
        finally:
            self.runtime.batch = None

    def generate(self, *args, **kwargs):
        """Hugging Face ``generate`` through the pruned layers (decisions held after the prompt
        if called inside :meth:`hold`)."""
        return self.model.generate(*args, **kwargs)

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
        """Reuse each block's last decision (and gathered weights) until the block exits."""
        self.runtime.holding, self.runtime.held = True, {}
        try:
            yield
        finally:
            self.runtime.holding, self.runtime.held = False, {}

    def remove(self) -> nn.Module:
        """Restore the original layers and return the unwrapped model."""
        layers = self.runtime.adapter.decoder_layers
        for i, original in enumerate(self._originals):
            layers[i] = original
        return self.model
