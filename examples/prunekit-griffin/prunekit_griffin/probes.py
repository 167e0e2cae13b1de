"""``input_norm``: a probe selector for the ``pp`` plugin's ``probe`` kind, from outside it.

The ``pp`` plugin declares the kind ``probe`` (protocol ``ProbeSelector`` in
``prunekit_plugins.pp.protocols``): an object with an attribute ``rank_on`` and a call
``(rank_source [B, T, d], token_mask [B, T]) -> (rows, cols)``, sorted ``LongTensor``s of the
selected samples and positions, pad tokens never selected. This module needs nothing from
``pp`` to implement it: the protocol is structural (``validate`` checks the built object with
``isinstance`` against the runtime-checkable protocol).
"""

from __future__ import annotations

import math

import torch

__all__ = ["InputNormProbe"]


def _ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


class InputNormProbe:
    """Rank positions by the norm of the block's normalised input, samples by their largest.

    With ``n[b, t] = ‖x[b, t, :]‖₂`` on the block's normalised input ``x`` (``rank_on =
    "normalized"``: the pp controller passes the output of the pre-block norm, not the
    residual), pads 0:

    1. positions: score ``‖n[:, t]‖₂`` over the rows; keep
       ``min(max(ceil(ratio_seq · T), min_tokens), T)`` of the ``T`` positions that hold a real
       token in some row;
    2. samples: score ``max_t n[b, t]`` over the selected positions (real tokens only): the
       sample with the single strongest token first, where ``residual_rank`` takes the L2
       norm over the tokens; keep ``ceil(ratio_batch · B)`` of the ``B`` rows with a real
       token there.

    Both sorted ascending. A column holding only pads, and a row with no real token among the
    selected positions, are never selected.

    :param ratio_seq: fraction of the positions in the probe, in (0, 1].
    :param ratio_batch: fraction of the samples in the probe, in (0, 1].
    :param min_tokens: at least this many positions (when the batch has them), >= 1.
    """

    rank_on = "normalized"

    def __init__(
        self, ratio_seq: float = 0.5, ratio_batch: float = 0.05, min_tokens: int = 2
    ) -> None:
        self.ratio_seq = _ratio("ratio_seq", ratio_seq)
        self.ratio_batch = _ratio("ratio_batch", ratio_batch)
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
            raise ValueError(f"min_tokens must be an integer >= 1, got {min_tokens!r}")
        self.min_tokens = min_tokens

    def __call__(self, rank_source: torch.Tensor, token_mask: torch.Tensor):
        token_mask = token_mask.bool()
        norms = torch.linalg.vector_norm(rank_source, dim=-1, dtype=torch.float32)  # [B, T]
        n = torch.where(token_mask, norms, 0.0)

        valid_cols = token_mask.any(0)
        n_cols = int(valid_cols.sum())
        k_t = min(max(math.ceil(self.ratio_seq * n_cols), self.min_tokens), n_cols)
        col_score = torch.linalg.vector_norm(n, dim=0).masked_fill(~valid_cols, -1.0)
        cols = torch.topk(col_score, k_t, sorted=False).indices.sort().values
        if k_t == 0:  # no real token at all: an empty probe
            return cols.new_empty(0), cols

        sub_mask = token_mask[:, cols]
        valid_rows = sub_mask.any(1)
        n_rows = int(valid_rows.sum())
        k_b = min(math.ceil(self.ratio_batch * n_rows), n_rows)
        # pads score -1 (norms are >= 0): a row's score is its strongest real token
        row_score = n[:, cols].masked_fill(~sub_mask, -1.0).amax(1)
        rows = torch.topk(row_score, k_b, sorted=False).indices.sort().values
        return rows, cols
