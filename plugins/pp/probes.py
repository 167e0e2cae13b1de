"""Probe selectors: which rows (samples) and positions of a batch form the probe.

A selector is called with the tensor to rank on (``[B, T, d]``), the token mask
(``[B, T]``, True = real token) and returns ``(rows, cols)``: sorted LongTensors of the
selected sample indices and position (column) indices. Pad tokens never enter a probe: a
column counts only if some row has a real token there, a row only if it has a real token.
"""

from __future__ import annotations

import math

import torch


def _check_ratio(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


ORDERS = ("seq_first", "batch_first")


class ResidualRank:
    """Rank positions, then samples, by the residual norm (the PP default).

    1. ``s[b, t] = ‖h[b, t, :]‖₂`` (pads: 0).
    2. Positions: score ``‖s[:, t]‖₂``; keep ``max(ceil(ratio_seq · T), min_tokens)`` (``T`` =
       positions holding a real token), sorted. If that count is ``<= force_first_below``, the
       smallest selected position is replaced by the first real position (token 0, the
       attention sink), unless already selected.
    3. Samples: score ``‖s[b, selected]‖₂``; keep ``ceil(ratio_batch · B)``, sorted.
    ``order="batch_first"`` picks samples on all positions first.

    :param rank_on: ``"residual"`` (the pre-norm residual, reference default) or
        ``"normalized"`` (the block's normalised input).
    """

    def __init__(
        self,
        ratio_seq: float = 0.5,
        ratio_batch: float = 0.05,
        order: str = "seq_first",
        rank_on: str = "residual",
        min_tokens: int = 2,
        force_first_below: int = 10,
    ) -> None:
        self.ratio_seq = _check_ratio("ratio_seq", ratio_seq)
        self.ratio_batch = _check_ratio("ratio_batch", ratio_batch)
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if rank_on not in ("residual", "normalized"):
            raise ValueError(f"rank_on must be 'residual' or 'normalized', got {rank_on!r}")
        if int(min_tokens) < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens!r}")
        self.order, self.rank_on = order, rank_on
        self.min_tokens, self.force_first_below = int(min_tokens), int(force_first_below)

    def _cols(self, s: torch.Tensor, valid_cols: torch.Tensor) -> torch.Tensor:
        n_valid = int(valid_cols.sum())
        k = min(max(math.ceil(n_valid * self.ratio_seq), self.min_tokens), n_valid)
        score = s.norm(dim=0).masked_fill(~valid_cols, -1.0)
        cols = torch.topk(score, k, sorted=False).indices.sort().values
        if k <= self.force_first_below:
            first = int(valid_cols.nonzero()[0, 0])
            if first not in cols.tolist():
                cols[0] = first
                cols = cols.sort().values
        return cols

    def _rows(self, s: torch.Tensor, valid_rows: torch.Tensor) -> torch.Tensor:
        n_valid = int(valid_rows.sum())
        k = min(math.ceil(n_valid * self.ratio_batch), n_valid)
        score = s.norm(dim=1).masked_fill(~valid_rows, -1.0)
        return torch.topk(score, k, sorted=False).indices.sort().values

    #: the caller may pass the per-token norms it already has (``norms=``, see ``__call__``)
    takes_norms = True

    def __call__(
        self, rank_source: torch.Tensor, token_mask: torch.Tensor, norms: torch.Tensor | None = None
    ):
        """``(rows, cols)`` of the probe. ``norms`` (``[B, T]`` fp32): the L2 norm of each
        token of ``rank_source`` when the caller has it (PP passes the one its layer's RMSNorm
        computed); otherwise it is computed here."""
        if norms is None:
            # fp32 at least (a float64 model keeps float64: vector_norm refuses to narrow)
            dtype = torch.promote_types(rank_source.dtype, torch.float32)
            norms = torch.linalg.vector_norm(rank_source, dim=-1, dtype=dtype)
        s = torch.where(token_mask, norms, 0.0)
        if self.order == "seq_first":
            cols = self._cols(s, token_mask.any(0))
            sub = s[:, cols]
            rows = self._rows(sub, token_mask[:, cols].any(1))
        else:
            rows = self._rows(s, token_mask.any(1))
            cols = self._cols(s[rows], token_mask[rows].any(0))
        return rows, cols


class RandomProbe:
    """Random positions and samples (the random-probe ablation), seeded, sorted.

    Same counts as :class:`ResidualRank`; the generator advances with every call, so each
    batch and block gets its own draw while the run stays reproducible.
    """

    def __init__(
        self, ratio_seq: float = 0.5, ratio_batch: float = 0.05, seed: int = 0, min_tokens: int = 2
    ) -> None:
        self.ratio_seq = _check_ratio("ratio_seq", ratio_seq)
        self.ratio_batch = _check_ratio("ratio_batch", ratio_batch)
        self.seed, self.min_tokens = int(seed), int(min_tokens)
        self.generator = torch.Generator().manual_seed(self.seed)
        # the ranker ignores its scores when they are all equal; only counts are shared
        self.rank_on = "residual"

    @staticmethod
    def _pick(valid: torch.Tensor, k: int, generator) -> torch.Tensor:
        idx = valid.nonzero().flatten().cpu()
        perm = torch.randperm(idx.numel(), generator=generator)[:k]
        return idx[perm].sort().values.to(valid.device)

    def __call__(self, rank_source: torch.Tensor, token_mask: torch.Tensor):
        valid_cols = token_mask.any(0)
        n_cols = int(valid_cols.sum())
        k_t = min(max(math.ceil(n_cols * self.ratio_seq), self.min_tokens), n_cols)
        cols = self._pick(valid_cols, k_t, self.generator)
        valid_rows = token_mask[:, cols].any(1)
        k_b = min(math.ceil(int(valid_rows.sum()) * self.ratio_batch), int(valid_rows.sum()))
        rows = self._pick(valid_rows, k_b, self.generator)
        return rows, cols


class FullBatch:
    """The whole batch is the probe (full-batch probing): every real row and position."""

    rank_on = "residual"

    def __call__(self, rank_source: torch.Tensor, token_mask: torch.Tensor):
        rows = token_mask.any(1).nonzero().flatten()
        cols = token_mask.any(0).nonzero().flatten()
        return rows, cols
