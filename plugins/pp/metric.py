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


class PPScore:
    """PP score: ``‖S_j · W[:, j]²‖₂`` per channel, L2 over the head's channels for heads."""

    #: the fused probe importance (dynamic PP), or the calibration mean of squares
    needs = (("S", "sq_mean"),)

    def prepare(self, layer, group: str):
        weight = layer.output_projection(group).weight.detach().float()
        factor = weight.pow(4).sum(0).sqrt()  # [D]
        width = layer.unit_width(group)

        def score(stats: dict[str, torch.Tensor]) -> torch.Tensor:
            # per batch: the fused S; from calibration (pp-calib): S_j = Σ_t H[t, j]
            S = stats["S"] if "S" in stats else stats["sq_mean"].sum(0)
            v = S.to(factor.device).float() * factor
            if group == ATTN:
                return v.view(-1, width).norm(dim=1)
            return v

        return score
