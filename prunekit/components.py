"""Component protocols: what each registered factory must produce.

A pruning method is a composition of small components, one per *slot*. A method declares a
default component name per slot; a recipe may replace any single slot
(``method.<slot>.name``) and pass it options (``method.<slot>.<option>``), which is what an
ablation study does. Components are plain objects, constructed once per run from their options;
the hot loop calls them directly, never through a hook.

Kinds and their job (see ``docs/plugins-tutorial.md`` for worked examples). The engine declares the
kinds every method needs:

=============== =========================================================================
adapter         owns one architecture: prunable groups, block forward on a kept set, probe,
                slicing, cost model, saved-model code
statistic       accumulates per-channel statistics over calibration batches
metric          scores heads and channels from statistics and weights
allocator       turns scores and a ratio into kept sets per layer
compensator     keeps the output mean of removed channels
method          a named default assignment of components per slot, and the pruning driver
=============== =========================================================================

A plugin declares further kinds with ``prunekit_register_kinds`` (the ``pp`` plugin declares
``probe``, ``fusion`` and ``history``, with their protocols in ``prunekit_plugins.pp.protocols``),
and registers components of any kind with ``prunekit_register_components``.

**Needs and provides.** A component may declare what it reads and what it gives, as class
attributes, so that a slot swap that cannot work fails at ``validate`` naming both components:

* ``provides``: names of what it makes available, e.g. a statistic's tensors
  (``("sq_mean",)``), or a method's per-decision inputs (PP gives its metric ``"S"``, the
  fused probe importance, and its fusion a ``"history"``);
* ``needs``: requirements, each a name or a tuple of alternatives, e.g. the PP score reads
  ``("S", "sq_mean")`` (either), FLAP's compensator ``"mean"``.

A component that declares nothing is not checked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from prunekit.ratios import per_layer_ratio

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunekit.views import RunView

#: the engine's slot kinds, in a stable order (recipe keys ``method.<slot>``); plugins declare
#: more (``prunekit_register_kinds``), listed by ``Registry.slot_kinds()``
SLOTS: tuple[str, ...] = ("statistic", "metric", "allocator", "compensator")
#: the engine's component kinds, in a stable order; ``corpus`` and ``task`` are data sources
#: (perplexity corpora and multiple-choice tasks), registered like components
KINDS: tuple[str, ...] = ("adapter", *SLOTS, "method", "executor", "corpus", "task")

#: the two prunable groups of a decoder layer
ATTN, MLP = "attn", "mlp"


# --------------------------------------------------------------------------------------------
# Model adapters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitSlice:
    """A tensor whose slices belong to the units of a group (one entry of a coupled group).

    Unit ``u`` owns ``tensor.narrow(dim, u * width, width)``. The query-head rows of ``q_proj``
    are ``UnitSlice("q_proj.weight", q.weight, 0, head_dim)``; the columns of ``o_proj``
    ``UnitSlice("o_proj.weight", o.weight, 1, head_dim)``; an MLP channel's row of ``gate_proj``
    ``UnitSlice("gate_proj.weight", gate.weight, 0, 1)``. Biases are listed too.
    """

    role: str
    tensor: Any
    dim: int
    width: int


class BlockDriver(Protocol):
    """What decides a block's kept set while :meth:`LayerAdapter.run_block` runs the layer
    (the dynamic runtime implements it)."""

    def __call__(
        self,
        layer: LayerAdapter,
        group: str,
        x: torch.Tensor,
        residual: torch.Tensor,
        run: Callable[..., Any],
        *,
        residual_sq_mean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decide the kept units of ``group``, gather them (``layer.gather``), and return the
        group's output ``run(weights, observe)``.

        :param residual_sq_mean: the residual's mean of squares per token (``[B, T, 1]``,
            fp32) when the layer's norm computed it (:meth:`LayerAdapter.normalized`), else
            None.

        :param x: the group's input, normalised (``layer.group_input(group, residual)``).
        :param residual: the residual stream entering the group.
        :param run: ``run(weights, observe=False)`` returns the group's output, and with
            ``observe=True`` the pair ``(output, output-projection input)``.
            ``run(weights, observe, unit_mask=mask)`` runs the whole batch with a per-row
            ``[B, units]`` mask on the gathered units (per-sequence kept sets as a union, see
            :mod:`prunekit.rows`; the adapter must declare ``row_masks``).
        """


class LayerAdapter(ABC):
    """One decoder layer, described by role rather than by Hugging Face attribute names.

    **Prunable groups.** ``attn`` has ``num_heads`` units (query heads; each owns ``head_dim``
    input columns of the output projection; with GQA ``kv_heads_of`` maps each to the K/V head
    it reads, and K/V are never pruned); ``mlp`` has ``intermediate_size`` units (one channel
    each). Kept sets are 1-D ``LongTensor`` of unit indices; ``None`` means every unit.

    **Running.** A layer runs its groups in ``groups`` order: ``x = group_input(group, h)``,
    ``y = run(group, x, gather(group, kept))``, ``h = add_output(group, h, y)``. That is
    :meth:`run_block`, the same loop for dense, gathered (dynamic) and sliced (static) weights.
    An architecture whose layer is not sequential (parallel attention and MLP) overrides
    :meth:`run_block`.

    **Everything else an engine needs**: what calibration statistics observe (:meth:`watch`),
    the probe's forward with full weights (:meth:`probe`), physical slicing (:meth:`slice`),
    the cost model (:meth:`macs_per_token`, :meth:`params`, :meth:`input_macs`) and the
    parameters of each unit's coupled group (:meth:`unit_slices`).

    The dims below are read when the adapter is built and never change, so the MACs of an
    adapter taken before pruning (``macs_per_token``, ``unit_macs``, ``input_macs``) stay the
    dense model's; ``unit_slices``, ``params`` and ``kv_heads_of`` read the live modules (after
    physical slicing, build a fresh adapter for them).
    """

    index: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    #: the decoder layer module (an entry of ``ModelAdapter.decoder_layers``)
    module: nn.Module
    #: the order in which the groups run inside the layer
    groups: tuple[str, ...] = (ATTN, MLP)
    #: whether :meth:`run` takes ``unit_mask``: a ``[B, units]`` tensor (the gathered units'
    #: order, values 1 or 0) multiplying each row's units at the input of the output
    #: projection, so one batched run gives every row its own kept set (per-sequence dynamic
    #: methods need it; see :mod:`prunekit.rows`)
    row_masks: ClassVar[bool] = False

    # -- prunable groups ---------------------------------------------------------------------
    def units(self, group: str) -> int:
        """Number of prunable units of ``group``."""
        return self.num_heads if group == ATTN else self.intermediate_size

    def unit_width(self, group: str) -> int:
        """Output-projection input columns per unit (head_dim for attention, 1 for the MLP)."""
        return self.head_dim if group == ATTN else 1

    def unit_channels(self, group: str, units: torch.Tensor) -> torch.Tensor:
        """Output-projection input channels owned by ``units`` (in unit order); for a
        per-sequence ``[B, k]`` kept set, ``[B, k * width]`` (per row)."""
        width = self.unit_width(group)
        if width == 1:
            return units
        import torch

        offsets = torch.arange(width, device=units.device)
        return (units[..., None] * width + offsets).flatten(-2)

    @property
    def shares_kv(self) -> bool:
        """Whether K/V heads are shared by several query heads (GQA/MQA): they are then never
        pruned, and only the query heads' rows and output columns are."""
        return self.num_kv_heads != self.num_heads

    def kv_heads_kept(self, heads: int) -> int:
        """K/V heads the layer still computes with ``heads`` query heads kept (the cost
        model's and the KV cache's): ``heads`` with MHA, every K/V head with GQA. An adapter
        whose slice removes the shared K/V heads with the last query head (the attention
        sublayer dropped, :attr:`ModelAdapter.sublayers`) returns 0 for 0 heads."""
        return self.num_kv_heads if self.shares_kv else heads

    def kv_heads_of(self, heads: torch.Tensor) -> torch.Tensor:
        """The K/V head each of the query ``heads`` attends with (default: consecutive groups)."""
        return heads // (self.num_heads // self.num_kv_heads)

    @property
    def cache_layer(self) -> int:
        """The index of this layer's entry in a KV cache (default: the layer index)."""
        return self.index

    def cached_kv_heads(self, kept_heads: torch.Tensor | None) -> torch.Tensor | None:
        """The heads whose keys and values the KV cache receives when attention runs on
        ``kept_heads`` (None: every head): with multi-head attention K/V are pruned with their
        query head, so the kept heads; with GQA K/V are never pruned, so None."""
        return None if kept_heads is None or self.shares_kv else kept_heads

    @abstractmethod
    def output_projection(self, group: str) -> nn.Linear:
        """The projection whose *input* channels are scored (o_proj / down_proj / fc2)."""

    @abstractmethod
    def unit_slices(self, group: str) -> list[UnitSlice]:
        """Every tensor slice a unit of ``group`` owns: its coupled group (q/k/v rows and o
        columns of a head, K/V excepted with GQA; gate/up rows and the down column of a
        channel), biases included. Used by gradient-based metrics and by the default
        :meth:`params`."""

    # -- observing ---------------------------------------------------------------------------
    def watch(self, group: str, fn: Callable[[torch.Tensor], None]):
        """Call ``fn`` with the input of ``group``'s output projection, ``[B, T, C]``, on every
        forward of the model (calibration statistics); returns a handle with ``remove()``.

        Default: a forward pre-hook on :meth:`output_projection`. An architecture that flattens
        tokens before the projection restores ``[B, T, C]`` here.
        """

        def hook(module, args):
            fn(args[0])

        return self.output_projection(group).register_forward_pre_hook(hook)

    # -- running -----------------------------------------------------------------------------
    @abstractmethod
    def group_input(self, group: str, residual: torch.Tensor) -> torch.Tensor:
        """The input ``group`` computes on, from the residual stream entering it (the
        pre-group norm: RMSNorm, LayerNorm, or the identity for a post-norm layer)."""

    def normalized(self, group: str, residual: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``(group_input(group, residual), sq_mean)``: an adapter whose pre-group norm
        computes the residual's mean of squares anyway (RMSNorm's variance, ``[B, T, 1]``
        fp32) returns it as ``sq_mean``, so that a dynamic method ranking tokens by residual
        norm need not compute it again (:attr:`BatchState.residual_sq_means`); None by
        default. :meth:`run_block` calls this."""
        return self.group_input(group, residual), None

    @abstractmethod
    def gather(self, group: str, kept: torch.Tensor | None) -> Any:
        """The weights of ``group`` restricted to ``kept`` units (None: all), as whatever
        object :meth:`run` takes: contiguous copies of the kept rows and columns, so that the
        block runs real, smaller matmuls."""

    @abstractmethod
    def run(
        self, group: str, x: torch.Tensor, weights: Any, *, observe: bool = False, **layer_kwargs
    ) -> Any:
        """The output of ``group`` on its input ``x`` with gathered ``weights``.

        :param observe: also return the output projection's input ``[B, T, C_kept]``, as the
            pair ``(output, activations)``.
        :param unit_mask: passed only to adapters that declare :attr:`row_masks`, and only
            when set (see there).
        :param layer_kwargs: what the model passes its decoder layers (``attention_mask``,
            ``position_embeddings``, the cache...).
        """

    def add_output(self, group: str, residual: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The residual stream after ``group`` (default ``residual + y``; e.g. Gemma-3 norms
        ``y`` first, a post-norm layer normalises the sum)."""
        return residual + y

    def run_block(
        self,
        hidden_states: torch.Tensor,
        kept: dict[str, Any] | None = None,
        *,
        driver: BlockDriver | None = None,
        **layer_kwargs,
    ) -> torch.Tensor:
        """The whole decoder layer with kept sets (``{group: kept}``; a missing group runs
        whole), or with the kept sets a ``driver`` decides per group (dynamic methods).

        Returns what the Hugging Face layer returns, so a wrapper can stand in for it.
        """
        kept = kept or {}
        h = hidden_states
        for group in self.groups:
            if driver is None:
                x = self.group_input(group, h)
                y = self.run(group, x, self.gather(group, kept.get(group)), **layer_kwargs)
            else:
                x, sq_mean = self.normalized(group, h)

                def run(weights, observe=False, unit_mask=None, _group=group, _x=x):
                    if unit_mask is None:
                        return self.run(_group, _x, weights, observe=observe, **layer_kwargs)
                    return self.run(
                        _group, _x, weights, observe=observe, unit_mask=unit_mask, **layer_kwargs
                    )

                y = driver(self, group, x, h, run, residual_sq_mean=sq_mean)
            h = self.add_output(group, h, y)
        return h

    # -- probing (dynamic methods) -----------------------------------------------------------
    @abstractmethod
    def probe(
        self,
        group: str,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The output projection's input for a probe, computed with the full (unpruned) input
        projections: ``[b', t', C]``.

        :param x: the group's input at the probe's rows and positions ``[b', t', d]``.
        :param position_ids: the true positions of those tokens ``[b', t']`` (positional
            encodings are applied there).
        :param token_mask: ``[b', t']``, False for pad tokens (never attended to).

        Attention runs among the probe tokens only: probe token ``i`` attends to probe token
        ``j`` of its row when ``pos[j] <= pos[i]`` (and within the layer's sliding window).
        """

    # -- physical pruning --------------------------------------------------------------------
    @abstractmethod
    def slice(self, kept_heads: torch.Tensor | None, kept_channels: torch.Tensor | None) -> None:
        """Physically prune the layer in place to the kept units (None: keep every unit of the
        group, but still bring the module to the layout a saved pruned model uses)."""

    def add_output_bias(self, group: str, bias: torch.Tensor) -> None:
        """Add ``bias`` to ``group``'s output projection (created when absent)."""
        import torch
        from torch import nn

        proj = self.output_projection(group)
        bias = bias.to(device=proj.weight.device, dtype=proj.weight.dtype)
        if proj.bias is not None:
            with torch.no_grad():
                proj.bias.add_(bias)
            return
        new = nn.Linear(
            proj.in_features,
            proj.out_features,
            bias=True,
            device=proj.weight.device,
            dtype=proj.weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(proj.weight)
            new.bias.copy_(bias)
        replace_module(self.module, proj, new)

    # -- cost model --------------------------------------------------------------------------
    @abstractmethod
    def macs_per_token(self, heads: int, channels: int, seq_len: int) -> float:
        """Multiply-accumulates per token of the layer's matmuls with ``heads`` query heads and
        ``channels`` MLP channels kept: every projection, plus ``2 * seq_len * heads *
        head_dim`` for the attention scores and their weighted sum (pp-spec section 8)."""

    def params(self, heads: int, channels: int) -> int:
        """Parameters of the layer with that many units kept (norms and biases included).

        Default: the layer's parameters minus the removed units' :meth:`unit_slices`.
        """
        total = sum(p.numel() for p in self.module.parameters())
        for group, kept in ((ATTN, heads), (MLP, channels)):
            if not self.units(group):  # a group already sliced to nothing has no unit to remove
                continue
            per_unit = sum(s.tensor.numel() // self.units(group) for s in self.unit_slices(group))
            total -= (self.units(group) - kept) * per_unit
        return total

    def unit_macs(self, group: str, seq_len: int) -> float:
        """MACs per token that pruning one unit of ``group`` saves."""
        h, c = self.num_heads, self.intermediate_size
        fewer = (
            self.macs_per_token(h - 1, c, seq_len)
            if group == ATTN
            else (self.macs_per_token(h, c - 1, seq_len))
        )
        return self.macs_per_token(h, c, seq_len) - fewer

    @abstractmethod
    def input_macs(self, group: str) -> float:
        """MACs per token of ``group``'s input projections with every unit (q, k, v; gate and
        up): what one probe token costs."""


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` sits in ``root``'s module tree (by identity)."""
    for module in root.modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return
    raise ValueError(f"{type(old).__name__} is not a submodule of {type(root).__name__}")


#: the config key under which a saved pruned checkpoint keeps its per-layer shapes (the
#: self-contained modelling files spell it out themselves)
PRUNED_LAYERS_KEY = "prunekit_layers"


class ModelAdapter(ABC):
    """Maps a loaded causal LM to its decoder layers, and owns its saved pruned form.

    To add an architecture, subclass this and :class:`LayerAdapter`
    (``prunekit.models.llama.LlamaAdapter`` is the worked example, ``prunekit.models.opt`` a
    second family), and register the class with ``prunekit_register_adapters``. Check it with
    :func:`prunekit.testing.check_adapter` on a tiny random model of the architecture.
    """

    name: ClassVar[str] = ""
    #: the Hugging Face ``config.model_type`` values this adapter serves (default ``supports``)
    model_types: ClassVar[tuple[str, ...]] = ()
    #: ``"module:Class"``: a self-contained modelling module (imports only torch and
    #: transformers) whose class rebuilds a checkpoint with per-layer shapes from
    #: ``config.prunekit_layers``. The file is copied into such checkpoints (remote code); the
    #: installed copy is what :func:`prunekit.load_pruned` uses. None: per-layer shapes cannot
    #: be saved.
    modeling: ClassVar[str | None] = None
    #: every sequence must start with the BOS token (the model's attention sink, e.g. Gemma):
    #: windows cut from a corpus then get one (recipe ``bos: auto``, the default)
    needs_bos: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def supports(cls, config: Any) -> bool:
        """Whether this adapter handles a model with this Hugging Face ``config`` (decided from
        the config alone, so that ``validate`` can tell before any weight loads): by default,
        one of :attr:`model_types` that :meth:`unsupported` finds nothing wrong with."""
        return getattr(config, "model_type", None) in cls.model_types and (
            cls.unsupported(config) is None
        )

    @classmethod
    def unsupported(cls, config: Any) -> str | None:
        """Why this adapter cannot run this ``config`` of one of its :attr:`model_types`, or
        None when it can: the config field, its value, and what the adapter's forward lacks
        for it (``"attn_logit_softcapping=50.0: ..."``).

        Check every config field that changes the forward and that the adapter's own code
        (gathered forwards, probes, sliced modules) does not replicate, so that a close
        variant of a supported architecture is refused at ``validate`` with this reason
        instead of being pruned with a wrong forward."""
        return None

    @abstractmethod
    def layers(self) -> list[LayerAdapter]:
        """One :class:`LayerAdapter` per decoder layer, in order."""

    @property
    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The model's list of decoder layer modules (dynamic methods wrap its entries)."""

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def __iter__(self) -> Iterator[LayerAdapter]:
        return iter(self.layers())

    # -- dropping whole sublayers -------------------------------------------------------------
    #: the groups (``ATTN``, ``MLP``) whose whole sublayer a slice to zero units removes: no
    #: per-token computation left, the shared K/V projections and KV-cache entries included
    #: (a constant output bias, where the architecture has one, stays). Methods that drop
    #: sublayers (``attn-drop``) are refused on an adapter that does not declare the group.
    sublayers: ClassVar[tuple[str, ...]] = ()

    # -- removing whole decoder layers (depth pruning) ---------------------------------------
    #: whether :meth:`remove_layers` can drop whole decoder layers of this architecture (the
    #: model's forward runs whatever its decoder list holds, and the config can say the new
    #: count); an adapter that cannot leaves it False and is refused with a reason
    removes_layers: ClassVar[bool] = False
    #: config attributes holding one entry per decoder layer, cut with the layers (e.g.
    #: ``layer_types``: sliding or full attention); ``num_hidden_layers`` is always updated
    per_layer_config_keys: ClassVar[tuple[str, ...]] = ("layer_types",)

    def remove_layers(self, indices) -> ModelAdapter:
        """Physically remove the decoder layers ``indices`` (indices of the model as it is now)
        and return a fresh adapter of the shallower model; this adapter is left describing
        the model it was built on (its dims, so its cost model stays the dense one).

        The remaining layers are renumbered in order (:meth:`renumber_layer`: their KV-cache
        indices), ``config.num_hidden_layers`` and the :attr:`per_layer_config_keys` lists
        are cut to them, and so are the per-layer shapes of a pruned checkpoint's config
        (``prunekit_layers``), so that the model saves as a checkpoint with fewer layers.

        :raises prunekit.errors.ModelError: the adapter does not declare
            :attr:`removes_layers`, or ``indices`` name a layer that does not exist, twice, or
            every layer.
        """
        from prunekit.errors import ModelError

        if not self.removes_layers:
            raise ModelError(
                f"adapter {self.name!r} cannot remove whole decoder layers (it does not declare "
                "ModelAdapter.removes_layers); use a width method (heads and channels) with this "
                "architecture, or implement layer removal in its adapter"
            )
        n = self.num_layers
        drop = [int(i) for i in indices]
        bad = sorted({i for i in drop if not 0 <= i < n})
        if bad:
            raise ModelError(
                f"remove_layers: layers {bad} do not exist: the model has {n} layers (0..{n - 1})"
            )
        if len(set(drop)) != len(drop):
            raise ModelError(f"remove_layers: a layer is named twice in {drop}")
        if len(drop) >= n:
            raise ModelError(f"remove_layers: removing all {n} layers leaves no model")
        if not drop:
            return type(self)(self.model)
        keep = [i for i in range(n) if i not in set(drop)]
        layers = self.decoder_layers
        for i in sorted(drop, reverse=True):
            del layers[i]  # the ModuleList renames its entries 0..k-1 (the state dict's keys)
        for new, module in enumerate(layers):
            self.renumber_layer(module, new)
        config = self.model.config
        config.num_hidden_layers = len(keep)
        for key in self.per_layer_config_keys:
            values = getattr(config, key, None)
            if isinstance(values, (list, tuple)) and len(values) == n:
                setattr(config, key, [values[i] for i in keep])
        shapes = getattr(config, PRUNED_LAYERS_KEY, None)
        if isinstance(shapes, dict):
            setattr(
                config,
                PRUNED_LAYERS_KEY,
                {k: [v[i] for i in keep] if len(v) == n else v for k, v in shapes.items()},
            )
        return type(self)(self.model)

    def renumber_layer(self, module: nn.Module, index: int) -> None:
        """Give the decoder layer ``module`` the position ``index`` after layers were removed.

        Default: every submodule's integer ``layer_idx`` (Hugging Face's attention, which
        indexes the KV cache with it) and that of any object a submodule holds (a sliced
        attention's kernel) is set to ``index``."""
        for sub in module.modules():
            for value in (sub, *vars(sub).values()):
                if isinstance(getattr(value, "layer_idx", None), int) and not isinstance(
                    value, type
                ):
                    value.layer_idx = index

    # -- saving a physically pruned model ----------------------------------------------------
    @abstractmethod
    def layer_shapes(self) -> dict[str, list]:
        """The per-layer shapes of the (possibly pruned) model, JSON-serialisable lists indexed
        by layer; saved as ``config.prunekit_layers`` for :attr:`modeling` to rebuild."""

    def plain_model(self, shapes: dict[str, list]) -> nn.Module | None:
        """A standard Hugging Face model holding the pruned weights, when ``shapes`` fit the
        architecture's own config (one shape for every layer...), else None (the per-layer
        layout and :attr:`modeling` are used)."""
        return None

    # -- exporting to serving engines ----------------------------------------------------------
    def gguf_model(self) -> Any:
        """The (possibly pruned) model as llama.cpp reads it, a
        :class:`prunekit.export.gguf.GgufModel` (``prunekit export --to gguf``): the llama.cpp
        architecture, its metadata, the tensors in llama.cpp's layout, and the exact
        legalization of shapes it cannot hold. Raise :class:`prunekit.errors.ExportError`
        naming the shape that is not expressible and what would be (the default: this
        adapter has no GGUF export)."""
        from prunekit.errors import ExportError

        raise ExportError(
            f"adapter {self.name!r} has no GGUF export (it does not implement gguf_model; "
            "docs/export.md lists the architectures that export and how an adapter adds one)"
        )


# --------------------------------------------------------------------------------------------
# Calibration statistics, metrics, allocators, compensators
# --------------------------------------------------------------------------------------------


@runtime_checkable
class CalibrationStatistic(Protocol):
    """Accumulates per-channel statistics of the output projections' inputs.

    Memory is O(positions x channels), never O(tokens). ``name`` and ``options()`` are part of
    the calibration cache key, so two runs that need the same statistic share it.
    """

    name: str

    def options(self) -> dict[str, Any]:
        """The settings that change the result (part of the cache key)."""

    def init(self, channels: int, positions: int) -> dict[str, torch.Tensor]:
        """Fresh fp32 state for one output projection with ``channels`` inputs."""

    def update(self, state: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor) -> None:
        """Fold a batch ``x`` ([B, T, channels], fp32) with token ``mask`` ([B, T] bool)."""

    def finalize(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Turn the state into the statistic's tensors (e.g. ``{"sq_mean": [T, C]}``)."""


@runtime_checkable
class ImportanceMetric(Protocol):
    """Scores units (heads or channels): higher = more important = kept first.

    ``prepare`` runs once per layer and block (precomputing weight factors); the returned
    scorer runs per decision (once for static methods, per batch for dynamic ones).
    """

    def prepare(
        self, layer: LayerAdapter, group: str
    ) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """A scorer mapping channel statistics (e.g. ``{"S": [D]}``) to unit scores
        (``[layer.units(group)]``)."""


@dataclass
class Allocation:
    """Kept units per (layer index, group); layers absent from ``kept`` are not pruned."""

    kept: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def structure(self, adapter: ModelAdapter) -> list[dict[str, int]]:
        out = []
        for layer in adapter.layers():
            row = {"layer": layer.index}
            for group, key in ((ATTN, "heads"), (MLP, "channels")):
                kept = self.kept.get((layer.index, group))
                row[key] = layer.units(group) if kept is None else int(kept.numel())
            out.append(row)
        return out


@runtime_checkable
class Allocator(Protocol):
    """Turns unit scores and a nominal ratio into kept sets per layer."""

    def __call__(
        self,
        scores: dict[tuple[int, str], torch.Tensor],
        adapter: ModelAdapter,
        settings: MethodSettings,
    ) -> Allocation: ...


@runtime_checkable
class Compensator(Protocol):
    """Computes an output bias replacing the removed channels' mean contribution (or None)."""

    def __call__(
        self, layer: LayerAdapter, group: str, kept: torch.Tensor, stats: dict[str, torch.Tensor]
    ) -> torch.Tensor | None: ...


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclass
class MethodSettings:
    """The method part of a recipe, after validation."""

    name: str
    ratio: float = 0.0
    skip_layers: list[int] = field(default_factory=lambda: [0, 1, 2])
    round_to: int = 64
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruneOutcome:
    """What a method returns: a model that answers like a Hugging Face causal LM."""

    model: nn.Module
    dynamic: bool = False
    structure: list[dict[str, Any]] | None = None
    params_kept: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: writes the method's artefact (pruned model or dynamic state) into a directory
    save: Callable[[str], None] | None = None
    #: the method's own figures for a timed batch of shape ``(batch_size, seq_len)`` (e.g.
    #: PP's ``probe_flops_fraction``), merged into ``results.json``'s ``runtime`` section
    figures: Callable[[int, int], dict[str, float]] | None = None


#: when a dynamic method decides its kept sets (see :class:`DynamicProtocol`)
DECISION_POINTS: tuple[str, ...] = ("batch", "sequence", "prompt")
#: where a scored request's prompt ends for a method that decides on the prompt
PROMPT_SPLITS: tuple[str, ...] = ("context", "last_token")


@dataclass(frozen=True)
class DynamicProtocol:
    """What a dynamic method declares about itself, so that the runtime, every evaluation
    path (perplexity, zero-shot, the lm-eval bridge) and the runner's timing ask the method
    instead of assuming one (e.g. PP's reset-and-warm-up protocol).

    Set it as the ``protocol`` class attribute of a dynamic :class:`Method`; the
    :class:`prunekit.pruning.dynamic.DynamicModel` the method returns carries it.
    """

    #: when and for whom kept sets are decided, per block:
    #:
    #: * ``"batch"``: on each forward, one kept set for every row (``decide`` returns a 1-D
    #:   tensor, or None for all units);
    #: * ``"sequence"``: on each forward, one kept set per row (``decide`` returns ``[B, k]``,
    #:   the same ``k`` for every row; rows sharing a set run together);
    #: * ``"prompt"``: the prompt runs dense and is observed, then ``decide`` (called after the
    #:   block ran, per row) fixes the kept sets for what continues that prompt (decoding steps,
    #:   a scored continuation); a forward that continues nothing is the prompt itself.
    #:
    #: With every kind, a forward that continues a KV cache (generation's decoding steps)
    #: reuses the kept sets decided on the prompt, with no new decision or observation.
    decides: str = "batch"
    #: what the method observes besides each block's input: ``"activations"`` (the output
    #: projection's input on the kept units after each block, e.g. PP's history update,
    #: shown when the controller's ``wants_activations`` also asks). ``()``: never shown,
    #: and the runtime does not ask.
    observes: tuple[str, ...] = ("activations",)
    #: every evaluation starts from the method's post-calibration state
    reset: bool = True
    #: unscored runs of an evaluation's first batch before it is scored, with the method's
    #: state restored after them (the PP reference's warm-up)
    warmup_batches: int = 0
    #: the method's state changes from batch to batch within an evaluation (e.g. PP's EMA
    #: history), so batch order matters: its controller must then have ``snapshot()`` and
    #: ``restore(state)`` (warm-up and timing leave no trace) and, with ``reset``, ``reset()``
    stateful: bool = False
    #: with ``decides="prompt"``, where a scored request's prompt ends (zero-shot scoring, the
    #: lm-eval bridge's loglikelihood): ``"context"`` (the question is the prompt and the whole
    #: answer runs pruned through its cache) or ``"last_token"`` (GRIFFIN's reference
    #: classification mode: every input token but the last is the prompt, and only the last
    #: one runs pruned, so only the final prediction is affected)
    prompt_split: str = "context"

    def __post_init__(self) -> None:
        if self.prompt_split not in PROMPT_SPLITS:
            raise ValueError(
                f"DynamicProtocol.prompt_split={self.prompt_split!r}: one of "
                f"{', '.join(PROMPT_SPLITS)}"
            )
        if self.decides not in DECISION_POINTS:
            raise ValueError(
                f"DynamicProtocol.decides={self.decides!r}: this prunekit version "
                f"decides per {', '.join(DECISION_POINTS)}"
            )
        unknown = set(self.observes) - {"activations"}
        if unknown:
            raise ValueError(
                f"DynamicProtocol.observes: unknown {sorted(unknown)}; known: activations"
            )
        if self.warmup_batches < 0:
            raise ValueError("DynamicProtocol.warmup_batches must be >= 0")


class Method(ABC):
    """A pruning method: default components per slot plus the driver that applies them.

    Subclasses set ``slots`` (slot -> default component name, or None for the slot kind's
    declared default) and ``option_defaults`` (extra method-level recipe keys, e.g. ``mode``),
    and implement :meth:`prune`. The runner builds the components once (recipe overrides
    applied) and passes them in ``components``.
    """

    name: ClassVar[str] = ""
    dynamic: ClassVar[bool] = False
    slots: ClassVar[dict[str, str | None]] = {}
    #: options for a slot's default component (used when the recipe names no other component
    #: for the slot; the recipe's own options for it take precedence)
    slot_options: ClassVar[dict[str, dict[str, Any]]] = {}
    option_defaults: ClassVar[dict[str, Any]] = {}
    #: whether the method reads calibration data (the runner then checks the data exists)
    uses_calibration: ClassVar[bool] = True
    #: whether the method removes whole decoder layers (:meth:`ModelAdapter.remove_layers`):
    #: ``validate`` then refuses an adapter that does not declare ``removes_layers``
    removes_layers: ClassVar[bool] = False
    #: the groups whose whole sublayers the method drops (slices to zero units): ``validate``
    #: refuses an adapter whose :attr:`ModelAdapter.sublayers` lacks one
    drops_sublayers: ClassVar[tuple[str, ...]] = ()
    #: whether the method meets ``method.target`` itself (it chooses how many units to remove
    #: from its own scores, reading ``ctx.budget``: a :class:`prunekit.budgets.Budget`), for a
    #: method without an allocator slot (depth methods)
    solves_target: ClassVar[bool] = False
    #: what the method itself gives its components, and what it reads from its statistic
    #: (see *needs and provides* above); checked at ``validate``
    provides: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[tuple[str | tuple[str, ...], ...]] = ()
    #: a dynamic method's decision and evaluation protocol
    protocol: ClassVar[DynamicProtocol] = DynamicProtocol()
    #: the layers the method leaves dense when the recipe sets no ``method.skip_layers``
    #: (None: the recipe's default, ``[0, 1, 2]``, the PP reference's); e.g. ``[]`` for a
    #: method that prunes every layer at one density
    default_skip_layers: ClassVar[list[int] | None] = None
    #: the method returns the model unchanged (the dense baseline): the runner then times
    #: nothing against it
    baseline: ClassVar[bool] = False

    def __init__(self, settings: MethodSettings, components: dict[str, Any]) -> None:
        self.settings = settings
        self.components = components

    @classmethod
    def check_recipe(cls, recipe: RunView, num_layers: int | None) -> list[str]:
        """Problems known before running, as ``"key.path: message"`` strings.

        :param recipe: the run's typed view (:class:`prunekit.views.RunView`: the recipe's
            paths ``method.options``, ``calibration.seq_len``, ``model.id``... read only).
        :param num_layers: the model's decoder layer count, or None when unknown offline.
        """
        return []

    @classmethod
    def check_components(cls, components: dict[str, Any]) -> list[str]:
        """Problems with the built components (``"key.path: message"``), e.g. a swapped
        component this method cannot use."""
        return []

    @classmethod
    def layer_ratio(cls, recipe: RunView, num_layers: int) -> float:
        """The ratio a pruned layer is pruned at (validated to stay below 1); ``recipe`` is the
        run's typed view (:class:`prunekit.views.RunView`).

        Default: the reference's inflation ``round(L / (L - skipped) * r, 2)``.
        """
        m = recipe.method
        slot = m.slot("allocator")
        if slot is not None and slot.options.get("inflate") is False:
            return m.ratio
        return per_layer_ratio(m.ratio, num_layers, m.skip_layers)

    @classmethod
    def check_target(
        cls, costs: Any, settings: MethodSettings, kind: str, value: float
    ) -> str | None:
        """For a method that :attr:`solves_target`: why ``kind <= value`` cannot be met on this
        model (``costs``: its :class:`prunekit.budgets.CostModel`, built on the meta device at
        ``validate``), or None. Default: None (checked when the method runs)."""
        return None

    @classmethod
    def check_state(cls, path: str, recipe: RunView) -> None:
        """Raise :class:`prunekit.errors.StateError` if the saved state at ``path`` cannot be
        used by this run (``recipe``: its :class:`prunekit.views.RunView`; called by
        ``validate`` for ``method.state.load``)."""
        from prunekit.errors import StateError

        raise StateError(f"method {cls.name!r} has no saved state to load")

    def statistics(self) -> list[CalibrationStatistic]:
        """Calibration statistics this method needs (collected and cached by the runner)."""
        stat = self.components.get("statistic")
        return [stat] if stat is not None else []

    @abstractmethod
    def prune(self, ctx: Any) -> PruneOutcome:
        """Prune ``ctx.model`` (see :class:`prunekit.context.PruneContext`)."""


# --------------------------------------------------------------------------------------------
# Sweep executors
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Executor(Protocol):
    """Runs the cells of a sweep (``prunekit sweep``; kind ``executor``, recipe
    ``sweep.executor``), on this machine, a cluster or any other engine.

    A cell is a directory holding its resolved ``recipe.yaml``. Running it means calling
    :func:`prunekit.sweep.run_cell` on that directory in a process of its own (``python -m
    prunekit.sweep CELL_DIR`` does exactly that). ``run_cell`` writes everything (the run's
    outputs, ``status.json`` with the error of a failed cell) atomically into the cell and
    never raises for a failed run, and a cell that is already finished or running elsewhere
    is left alone, so an executor only has to start the calls, in any order and with any
    parallelism; it needs no result passed back.

    ``run(cells, folder, wait)``: start every cell of ``cells`` (directories), keeping any
    files of the executor's own under ``folder``. With ``wait`` true, return once every cell
    has ended; with ``wait`` false an executor that can may return once the cells are
    submitted (``prunekit sweep --detach``), and ``prunekit sweep --status`` collects them
    later from the cells' files. Return a JSON-serialisable dict recorded in the sweep's
    ``sweep.json`` (e.g. job ids), or None. ``detaches`` says whether ``wait=False`` is
    supported. An interrupt (``KeyboardInterrupt``) must stop the cells the executor started.
    """

    detaches: bool

    def run(self, cells: list[Any], folder: Any, wait: bool = True) -> dict | None: ...
