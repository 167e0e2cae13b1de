"""Fusion policies: probe statistics ``P`` and history ``G`` -> channel importance ``S``.

Both inputs are ``[t', D]``: one row per probe position (the history row at that position's
true position), fp32. ``G`` is None when the method keeps no history. The result is ``[D]``.
"""

from __future__ import annotations

import torch


def _need_history(name: str, history: torch.Tensor | None) -> torch.Tensor:
    if history is None:
        raise ValueError(f"fusion {name!r} needs a history; use 'probe_only' without history")
    return history


class ImportanceScaled:
    """PP's fusion: ``α = P / (P + G + eps)``, ``F = (1-α) G + α P``, ``S = Σ_t F``.

    Each source is weighted by its own magnitude (``F = (P² + G²)/(P + G)``), which favours
    outliers; only the probe's positions enter the sum.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.eps = float(eps)

    def __call__(self, probe: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        if history is None:
            return probe.sum(0)
        alpha = probe / (probe + history + self.eps)
        return ((1 - alpha) * history + alpha * probe).sum(0)


class FixedRatio:
    """A fixed convex combination: ``F = w·P + (1-w)·G`` with ``w = probe_weight``.

    One convention for both blocks (the reference's ``probefixratio`` weights the probe by X in
    attention but the history by X in the MLP; pass ``probe_weight = 1 - X`` to reproduce its
    MLP side).
    """

    needs = ("history",)

    def __init__(self, probe_weight: float = 0.5) -> None:
        if not 0 <= probe_weight <= 1:
            raise ValueError(f"probe_weight must be in [0, 1], got {probe_weight!r}")
        self.probe_weight = float(probe_weight)

    def __call__(self, probe: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        history = _need_history("fixed_ratio", history)
        return (self.probe_weight * probe + (1 - self.probe_weight) * history).sum(0)


class ProbeOnly:
    """Ignore the history: ``S = Σ_t P``."""

    def __call__(self, probe: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        return probe.sum(0)


class HistoryOnly:
    """Ignore the probe's values: ``S = Σ_t G`` over the probe's positions."""

    needs = ("history",)

    def __call__(self, probe: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        return _need_history("history_only", history).sum(0)
