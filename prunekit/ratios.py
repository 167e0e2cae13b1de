"""Counting rules shared by every method: per-layer ratio inflation and kept counts.

A leaf module (imports nothing from prunekit), so that :mod:`prunekit.components` (where
:meth:`~prunekit.components.Method.layer_ratio` uses it) and :mod:`prunekit.pruning.allocation`
(the ``uniform`` allocator) can both import it without a cycle. See pp-spec section 2:

* the non-skipped layers use the inflated ratio ``r' = round(L / (L - skipped) * r, 2)``;
* attention: ``floor(r' * n_heads)`` whole heads pruned;
* MLP: ``floor(r' * I)`` channels pruned, then the kept count rounded **up** to a multiple of
  ``round_to`` (1 disables).
"""

from __future__ import annotations

import math


def per_layer_ratio(ratio: float, num_layers: int, skip_layers: list[int]) -> float:
    """``round(L / (L - skipped) * r, 2)``: the ratio each non-skipped layer is pruned at."""
    skipped = len([i for i in set(skip_layers) if 0 <= i < num_layers])
    if skipped >= num_layers:
        raise ValueError("every layer is skipped")
    return round(num_layers / (num_layers - skipped) * ratio, 2)


def kept_heads(num_heads: int, layer_ratio: float) -> int:
    """Heads kept at ``layer_ratio``: ``n - floor(r' n)``."""
    return num_heads - math.floor(layer_ratio * num_heads + 1e-9)


def kept_channels(channels: int, layer_ratio: float, round_to: int = 64) -> int:
    """MLP channels kept at ``layer_ratio``, rounded up to a multiple of ``round_to``."""
    keep = channels - math.floor(layer_ratio * channels + 1e-9)
    if round_to > 1:
        keep = min(channels, math.ceil(keep / round_to) * round_to)
    return keep
