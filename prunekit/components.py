"""Component protocols: what each registered factory must produce.

A pruning method is a composition of small components, one per *slot*. A method declares a
default component name per slot; a recipe may replace any single slot
(``method.<slot>.name``) and pass it options (``method.<slot>.<option>``), which is what an
ablation study does. Components are plain objects, constructed once per run from their options;
the hot loop calls them directly, never through a hook.

Kinds and their job (see ``docs/plugins.md`` for worked examples):

=============== =========================================================================
adapter         maps an architecture to prunable groups and runs a block with a kept set
statistic       accumulates per-channel statistics over calibration batches
probe           picks the probe rows and positions of a batch (dynamic methods)
fusion          combines probe statistics with history (dynamic methods)
history         how history evolves after each batch (dynamic methods)
metric          scores heads and channels from statistics and weights
allocator       turns scores and a ratio into kept sets per layer
compensator     keeps the output mean of removed channels
method          a named default assignment of components per slot, and the pruning driver
=============== =========================================================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

#: slots a method can expose, in a stable order (recipe keys ``method.<slot>``)
SLOTS: tuple[str, ...] = (
    "statistic",
    "probe",
    "fusion",
    "history",
    "metric",
    "allocator",
    "compensator",
)
#: every component kind, in a stable order
KINDS: tuple[str, ...] = ("adapter", *SLOTS, "method")

#: the two prunable groups of a decoder layer
ATTN, MLP = "attn", "mlp"


# --------------------------------------------------------------------------------------------
# Model adapters
# --------------------------------------------------------------------------------------------


class LayerAdapter(ABC):
    """One decoder layer, described by role rather than by Hugging Face attribute names.

    Prunable groups: ``attn`` has ``num_heads`` units (query heads; each owns ``head_dim``
    input columns of the output projection), ``mlp`` has ``intermediate_size`` units (one
    channel each). Kept sets are 1-D ``LongTensor`` of unit indices.
    """

    index: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int

    @abstractmethod
    def output_projection(self, group: str) -> nn.Linear:
        """The projection whose *input* channels are scored (o_proj / down_proj)."""

    @abstractmethod
    def input_norm(self, group: str) -> nn.Module:
        """The norm applied to the residual stream before ``group``."""

    @abstractmethod
    def run_attention(self, x: torch.Tensor, kept_heads: torch.Tensor | None, **kwargs) -> Any:
        """Attention on normalised input ``x`` using only ``kept_heads`` (None = all)."""

    @abstractmethod
    def run_mlp(self, x: torch.Tensor, kept_channels: torch.Tensor | None) -> torch.Tensor:
        """MLP on normalised input ``x`` using only ``kept_channels`` (None = all)."""

    @abstractmethod
    def run_block(self, hidden_states: torch.Tensor, kept_heads: torch.Tensor | None = None,
                  kept_channels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:  # fmt: skip
        """The whole decoder layer (norms, attention, MLP, residuals) with the kept sets.

        ``kwargs`` are what the model passes its layers (``position_embeddings``,
        ``attention_mask``...)."""

    def units(self, group: str) -> int:
        """Number of prunable units of ``group``."""
        return self.num_heads if group == ATTN else self.intermediate_size

    def unit_width(self, group: str) -> int:
        """Output-projection input columns per unit (head_dim for attention, 1 for the MLP)."""
        return self.head_dim if group == ATTN else 1

    def unit_channels(self, group: str, units: torch.Tensor) -> torch.Tensor:
        """Output-projection input channels owned by ``units`` (in unit order)."""
        width = self.unit_width(group)
        if width == 1:
            return units
        import torch

        offsets = torch.arange(width, device=units.device)
        return (units[:, None] * width + offsets[None, :]).reshape(-1)


class ModelAdapter(ABC):
    """Maps a loaded causal LM to its decoder layers.

    To add an architecture, subclass this (``prunekit.models.llama.LlamaAdapter`` is the worked
    example), implement ``supports`` and ``layers``, and register the class with
    ``prunekit_register_adapters``.
    """

    name: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    @abstractmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether this adapter handles ``model``."""

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
class ProbeSelector(Protocol):
    """Picks the probe of a batch: which rows (samples) and positions (columns).

    ``rank_on`` is ``"residual"`` (rank on the pre-norm residual) or ``"normalized"`` (on the
    block's normalised input).
    """

    rank_on: str

    def __call__(
        self, rank_source: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cols)``: sorted indices; pad tokens (``token_mask`` False) never selected."""


@runtime_checkable
class FusionPolicy(Protocol):
    """Combines the probe's per-position statistic ``P`` with the history ``G`` (both
    ``[t', D]``; ``G`` may be None) into channel importance ``S`` (``[D]``)."""

    def __call__(self, probe: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor: ...


@runtime_checkable
class HistoryPolicy(Protocol):
    """How the per-position history ``H [positions, D]`` evolves after each scored batch."""

    def init_state(self, history: torch.Tensor, calibration_samples: int) -> dict:
        """Extra state kept beside ``history`` (e.g. counts)."""

    def update(self, history: torch.Tensor, state: dict, kept: torch.Tensor | None,
               x: torch.Tensor, token_mask: torch.Tensor,
               position_ids: torch.Tensor) -> None:  # fmt: skip
        """Fold the batch's kept-channel activations ``x`` ([B, T, K]) into ``history``."""


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


class Method(ABC):
    """A pruning method: default components per slot plus the driver that applies them.

    Subclasses set ``slots`` (slot -> default component name) and ``option_defaults`` (extra
    method-level recipe keys, e.g. ``mode``), and implement :meth:`prune`. The runner builds
    the components once (recipe overrides applied) and passes them in ``components``.
    """

    name: ClassVar[str] = ""
    dynamic: ClassVar[bool] = False
    slots: ClassVar[dict[str, str]] = {}
    option_defaults: ClassVar[dict[str, Any]] = {}
    #: whether the method reads calibration data (the runner then checks the data exists)
    uses_calibration: ClassVar[bool] = True

    def __init__(self, settings: MethodSettings, components: dict[str, Any]) -> None:
        self.settings = settings
        self.components = components

    @classmethod
    def check_recipe(cls, recipe: Any, num_layers: int | None) -> list[str]:
        """Problems known before running, as ``"key.path: message"`` strings.

        :param recipe: the validated :class:`prunekit.recipe.Recipe`.
        :param num_layers: the model's decoder layer count, or None when unknown offline.
        """
        return []

    @classmethod
    def check_components(cls, components: dict[str, Any]) -> list[str]:
        """Problems with the built components (``"key.path: message"``), e.g. a swapped
        component this method cannot use."""
        return []

    @classmethod
    def layer_ratio(cls, recipe: Any, num_layers: int) -> float:
        """The ratio a pruned layer is pruned at (validated to stay below 1).

        Default: the reference's inflation ``round(L / (L - skipped) * r, 2)``.
        """
        from prunekit.pruning.allocation import per_layer_ratio

        m = recipe.method
        slot = m.slot("allocator")
        if slot is not None and slot.options.get("inflate") is False:
            return m.ratio
        return per_layer_ratio(m.ratio, num_layers, m.skip_layers)

    @classmethod
    def check_state(cls, path: str, recipe: Any) -> None:
        """Raise :class:`prunekit.errors.StateError` if the saved state at ``path`` cannot be
        used by this recipe (called by ``validate`` for ``method.state.load``)."""
        from prunekit.errors import StateError

        raise StateError(f"method {cls.name!r} has no saved state to load")

    def statistics(self) -> list[CalibrationStatistic]:
        """Calibration statistics this method needs (collected and cached by the runner)."""
        stat = self.components.get("statistic")
        return [stat] if stat is not None else []

    @abstractmethod
    def prune(self, ctx: Any) -> PruneOutcome:
        """Prune ``ctx.model`` (see :class:`prunekit.runner.PruneContext`)."""
