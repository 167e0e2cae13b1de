"""History policies: how the per-position history ``H [positions, D]`` evolves after a batch.

``update`` receives the full batch's post-pruning input of the output projection for the kept
channels (``x``: ``[B, T, K]``), the kept channel indices (``[K]``, or ``[B, K]`` per row when
the method decides per sequence: a channel's batch value then averages the rows that kept it),
the token mask and the true positions. Pad tokens are excluded; each position's batch value is the mean of ``x²`` over the
real tokens at that position (the reference divides by B, or by the pad-aware count + 1e-3).
Channels not kept are left untouched (no decay).
"""

from __future__ import annotations

import torch


def position_means(x, token_mask, position_ids, positions: int):
    """Mean of x² over the real tokens at each true position.

    :returns: ``(rows, means)``: the positions present in the batch (``[P]``, below
        ``positions``) and their mean squares (``[P, K]``, fp32).

    Fast path (no padding, or right padding): column ``t`` holds position ``t`` for every real
    token, so the means are one masked reduction over the batch, computed in fp32 without an
    fp32 copy of ``x``. Otherwise (left padding) tokens are scattered by position.
    """
    bsz, seq, k = x.shape
    columns = torch.arange(seq, device=x.device)
    if bool(((position_ids == columns) | ~token_mask).all()):
        counts = token_mask.sum(0)
        sums = _batch_sum_of_squares(x, None if bool(token_mask.all()) else token_mask)
        present = (counts > 0) & (columns < positions)
        rows = present.nonzero().flatten()
        return rows, sums[rows] / counts[rows].unsqueeze(-1)
    real = token_mask.reshape(-1)
    pos = position_ids.reshape(-1)[real]
    keep = pos < positions  # positions beyond the history are ignored
    pos = pos[keep]
    sq = x.reshape(-1, k)[real][keep].float().square()
    sums = torch.zeros(positions, k, dtype=torch.float32, device=x.device)
    sums.index_add_(0, pos, sq)
    counts = torch.bincount(pos, minlength=positions)
    rows = (counts > 0).nonzero().flatten()
    return rows, sums[rows] / counts[rows].unsqueeze(-1).to(torch.float32)


def _batch_sum_of_squares(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``Σ_b x[b]²`` in fp32, [T, K].

    A loop of fused ``addcmul_`` over the batch rows: on CPU about 10x faster than
    ``x.float().square().sum(0)`` (no full-size fp32 temporary, contiguous reads), which
    matters because it runs for every pruned block of every batch.
    """
    acc = torch.zeros(x.shape[1:], dtype=torch.float32, device=x.device)
    for b in range(x.shape[0]):
        row = x[b].float()
        if mask is not None:
            row = row * mask[b].unsqueeze(-1)
        acc.addcmul_(row, row)
    return acc


def row_channel_means(x, kept, token_mask, position_ids, positions: int, width: int):
    """Per-sequence kept channels (``kept``: ``[B, K]``, row ``b``'s columns of ``x``): the
    mean of x² at each true position and channel over the real tokens of the rows that kept
    that channel.

    :returns: ``(rows, means, counts)``: the positions present (``[P]``) and, at full width
        ``[P, width]``, the means (0 where no row kept the channel) and the token counts.
    """
    bsz, seq, k = x.shape
    real = token_mask.reshape(-1)
    pos = position_ids.reshape(-1)
    keep = real & (pos < positions)
    pos = pos[keep]
    cols = kept[:, None, :].expand(bsz, seq, k).reshape(-1, k)[keep]  # [N, K]
    flat = pos[:, None] * width + cols  # (position, channel) of every kept value
    sq = x.reshape(-1, k)[keep].float().square()
    sums = torch.zeros(positions * width, dtype=torch.float32, device=x.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, flat.reshape(-1), sq.reshape(-1))
    counts.index_add_(0, flat.reshape(-1), torch.ones_like(sq).reshape(-1))
    sums, counts = sums.view(positions, width), counts.view(positions, width)
    rows = (counts > 0).any(1).nonzero().flatten()
    counts = counts[rows]
    return rows, sums[rows] / counts.clamp(min=1), counts


def _columns(history, kept):
    return kept if kept is not None else torch.arange(history.shape[1], device=history.device)


def _contiguous_rows(rows: torch.Tensor) -> int | None:
    """``n`` if ``rows`` is ``0..n-1`` (the common case), else None."""
    n = rows.numel()
    if n and int(rows[-1]) == n - 1:
        return n
    return None


def _read(history, rows, cols):
    n = _contiguous_rows(rows)
    base = history[:n] if n is not None else history.index_select(0, rows)
    return base.index_select(1, cols)


def _write(history, rows, cols, values) -> None:
    n = _contiguous_rows(rows)
    if n is not None:
        history[:n].index_copy_(1, cols, values)
    else:
        history[rows[:, None], cols[None, :]] = values


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
        if kept is not None and kept.dim() == 2:  # per-sequence kept channels
            rows, means, counts = row_channel_means(
                x, kept, token_mask, position_ids, *history.shape
            )
            block = history.index_select(0, rows)
            new = block * self.momentum + means * (1 - self.momentum)
            history[rows] = torch.where(counts > 0, new, block)
            return
        rows, means = position_means(x, token_mask, position_ids, history.shape[0])
        if rows.numel() == 0:
            return
        cols = _columns(history, kept)
        block = _read(history, rows, cols)
        _write(history, rows, cols, block.mul_(self.momentum).add_(means, alpha=1 - self.momentum))


def _token_counts(token_mask, position_ids, positions: int) -> torch.Tensor:
    pos = position_ids[token_mask]
    return torch.bincount(pos[pos < positions], minlength=positions).to(torch.float32)


class RunningMean:
    """A cumulative mean per position and channel, continuing the calibration mean.

    The calibration count (number of windows) seeds the per-position, per-channel counts; each
    batch adds its real-token count at the kept channels.
    """

    def init_state(self, history: torch.Tensor, calibration_samples: int) -> dict:
        return {
            "count": torch.full(
                history.shape,
                float(calibration_samples),
                dtype=torch.float32,
                device=history.device,
            )
        }

    def update(self, history, state, kept, x, token_mask, position_ids) -> None:
        if kept is not None and kept.dim() == 2:  # per-sequence kept channels
            rows, means, counts = row_channel_means(
                x, kept, token_mask, position_ids, *history.shape
            )
            n = state["count"].index_select(0, rows)
            block = history.index_select(0, rows)
            history[rows] = (block * n + means * counts) / (n + counts).clamp(min=1e-12)
            state["count"][rows] = n + counts
            return
        rows, means = position_means(x, token_mask, position_ids, history.shape[0])
        if rows.numel() == 0:
            return
        counts = _token_counts(token_mask, position_ids, history.shape[0])[rows].unsqueeze(-1)
        cols = _columns(history, kept)
        n = _read(state["count"], rows, cols)
        _write(
            history, rows, cols, (_read(history, rows, cols) * n + means * counts) / (n + counts)
        )
        _write(state["count"], rows, cols, n + counts)


class Frozen:
    """The history never changes after calibration."""

    def init_state(self, history: torch.Tensor, calibration_samples: int) -> dict:
        return {}

    def update(self, history, state, kept, x, token_mask, position_ids) -> None:
        return None
