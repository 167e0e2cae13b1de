"""The component kinds Probe Pruning adds to prunekit: ``probe``, ``fusion`` and ``history``.

The ``pp`` plugin declares them (``prunekit_register_kinds``) with these protocols; any plugin
can then register components of them (``prunekit_register_components``), e.g. a new probe
selector that ``pp`` uses from a recipe line (``method.probe.name``). ``validate`` checks each
built component against its kind's protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


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
    ``[t', D]``; ``G`` may be None) into channel importance ``S`` (``[D]``).

    A fusion that reads the history declares ``needs = ("history",)``; only the PP methods
    that keep one provide it."""

    def __call__(self, probe: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor: ...


@runtime_checkable
class HistoryPolicy(Protocol):
    """How the per-position history ``H [positions, D]`` evolves after each scored batch."""

    def init_state(self, history: torch.Tensor, calibration_samples: int) -> dict:
        """Extra state kept beside ``history`` (e.g. counts)."""

    def update(
        self,
        history: torch.Tensor,
        state: dict,
        kept: torch.Tensor | None,
        x: torch.Tensor,
        token_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> None:
        """Fold the batch's kept-channel activations ``x`` ([B, T, K]) into ``history``."""
