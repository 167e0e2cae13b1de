"""The PP importance score (``ppwandasp``), on the output projection's input channels.

* MLP channel ``j``: ``S_j · sqrt(Σ_i W_down[i, j]⁴)``
* attention head ``h``: ``sqrt(Σ_{j ∈ h} S_j² Σ_i W_o[i, j]⁴)``

The weight factor ``c_j = sqrt(Σ_i W_ij⁴)`` is computed once per layer (fp32); per decision
only ``S · c`` and, for heads, an L2 norm per head remain. The scorer takes the fused
``{"S": [D]}`` (dynamic PP) or calibration statistics ``{"sq_mean": [T, D]}`` (pp-calib,
``S_j = Σ_t H[t, j]``).
"""

from __future__ import annotations

import torch

from prunekit.plugin import ATTN

#: how a head's channel scores ``S_j c_j`` make its score: ``l2`` (the reference) or ``sum``
HEAD_REDUCTIONS = ("l2", "sum")


class PPScore:
    """PP score: ``‖S_j · W[:, j]²‖₂`` per channel, L2 over the head's channels for heads.

    :param heads: ``l2`` (the reference: ``sqrt(Σ_{j ∈ h} (S_j c_j)²)``) or ``sum``
        (``Σ_{j ∈ h} S_j c_j``, an ablation). The L2 of scores linear in the activation
        energy is decided by a head's largest channels: on Gemma-3-270M (head_dim 256) its
        top 1% of channels carry a median ~85% of it (benchmarks/methods_gemma3.md).
    """

    #: the fused probe importance (dynamic PP), or the calibration mean of squares
    needs = (("S", "sq_mean"),)

    def __init__(self, heads: str = "l2") -> None:
        if heads not in HEAD_REDUCTIONS:
            raise ValueError(f"heads must be one of {', '.join(HEAD_REDUCTIONS)}, got {heads!r}")
        self.heads = heads

    def prepare(self, layer, group: str):
        weight = layer.output_projection(group).weight.detach().float()
        factor = weight.pow(4).sum(0).sqrt()  # [D]
        width = layer.unit_width(group)

        def score(stats: dict[str, torch.Tensor]) -> torch.Tensor:
            # per batch: the fused S; from calibration (pp-calib): S_j = Σ_t H[t, j]
            S = stats["S"] if "S" in stats else stats["sq_mean"].sum(0)
            v = S.to(factor.device).float() * factor
            if group == ATTN:
                v = v.view(-1, width)
                return v.norm(dim=1) if self.heads == "l2" else v.sum(1)
            return v

        return score
