"""Wanda-sp (structured Wanda) as a prunekit plugin.

Score of input channel ``j`` of an output projection: ``sqrt(C_j) · Σ_i |W_ij|`` with
``C_j = Σ_t H[t, j]`` (the calibration mean of x² summed over positions, i.e.
``‖X_j‖₂² / N``); a head scores the sum of its channels. Uniform allocation per layer, no
compensation; statistics shared with PP (``sq_mean``), computed in fp32.
"""

from __future__ import annotations

import torch

from prunekit.plugin import ATTN, StaticMethod, hookimpl


class WandaSpScore:
    """``sqrt(C_j) · Σ_i |W_ij|`` per channel; heads sum their channels."""

    needs = (("S", "sq_mean"),)

    def prepare(self, layer, group: str):
        weight = layer.output_projection(group).weight.detach().float()
        factor = weight.abs().sum(0)  # [D]
        width = layer.unit_width(group)

        def score(stats: dict[str, torch.Tensor]) -> torch.Tensor:
            C = stats["S"] if "S" in stats else stats["sq_mean"].sum(0)
            v = C.to(factor.device).float().clamp(min=0).sqrt() * factor
            return v.view(-1, width).sum(1) if group == ATTN else v

        return score


class WandaSp(StaticMethod):
    """Wanda-sp: |W| · ‖X‖ on the output projections' input channels, uniform per layer."""

    name = "wanda-sp"
    slots = {
        "statistic": "sq_mean",
        "metric": "wanda_sp",
        "allocator": "uniform",
        "compensator": "none",
    }


@hookimpl
def prunekit_register_metrics(register):
    register("wanda_sp", WandaSpScore)


@hookimpl
def prunekit_register_methods(register):
    register("wanda-sp", WandaSp)
