"""History policies: how the per-position history ``H [positions, D]`` evolves after a batch.

``update`` receives the full batch's post-pruning input of the output projection for the kept
channels (``x``: ``[B, T, K]``), the kept channel indices, the token mask and the true
positions. Pad tokens are excluded; each position's batch value is the mean of ``x²`` over the
real tokens at that position (the reference divides by B, or by the pad-aware count + 1e-3).
Channels not kept are left untouched (no decay).
"""

from __future__ import annotations

import torch


def position_means(x, token_mask, position_ids, positions: int):
    """(mean of x² per true position [positions, K], count per position [positions])."""
    xf = x.float()
    real = token_mask.reshape(-1)
    pos = position_ids.reshape(-1)[real]
    keep = pos < positions  # positions beyond the history are ignored
    pos = pos[keep]
    sq = xf.reshape(-1, xf.shape[-1])[real][keep].square()
    sums = torch.zeros(positions, xf.shape[-1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, pos, sq)
    counts = torch.bincount(pos, minlength=positions).to(torch.float32)
    return sums / counts.clamp(min=1).unsqueeze(-1), counts


class Ema:
    """``H[t, j] ← μ H[t, j] + (1-μ) mean_b x[b, t, j]²`` for kept channels j (PP default).

    :param momentum: ``μ`` (reference 0.99).
    """

    def __init__(self, momentum: float = 0.99) -> None:
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)

    def init_state(self, history: torch.Tensor, calibration_samples: int) -> dict:
        return {}

    def update(self, history, state, kept, x, token_mask, position_ids) -> None:
        means, counts = position_means(x, token_mask, position_ids, history.shape[0])
        rows = (counts > 0).nonzero().flatten()
        if rows.numel() == 0:
            return
        cols = kept if kept is not None else torch.arange(history.shape[1], device=x.device)
        block = history[rows][:, cols]
        history[rows[:, None], cols[None, :]] = (
            self.momentum * block + (1 - self.momentum) * means[rows]
        )


class RunningMean:
    """A cumulative mean per position and channel, continuing the calibration mean.

    The calibration count (number of windows) seeds the per-position, per-channel counts; each
    batch adds its real-token count at the kept channels.
    """

    def init_state(self, history: torch.Tensor, calibration_samples: int) -> dict:
        return {"count": torch.full(history.shape, float(calibration_samples),
                                    dtype=torch.float32, device=history.device)}  # fmt: skip

    def update(self, history, state, kept, x, token_mask, position_ids) -> None:
        means, counts = position_means(x, token_mask, position_ids, history.shape[0])
        rows = (counts > 0).nonzero().flatten()
        if rows.numel() == 0:
            return
        cols = kept if kept is not None else torch.arange(history.shape[1], device=x.device)
        n = state["count"][rows][:, cols]
        c = counts[rows].unsqueeze(-1)
        history[rows[:, None], cols[None, :]] = (history[rows][:, cols] * n + means[rows] * c) / (
            n + c
        )
        state["count"][rows[:, None], cols[None, :]] = n + c


class Frozen:
    """The history never changes after calibration."""

    def init_state(self, history: torch.Tensor, calibration_samples: int) -> dict:
        return {}

    def update(self, history, state, kept, x, token_mask, position_ids) -> None:
        return None
