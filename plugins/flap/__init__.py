"""FLAP (fluctuation-based adaptive structured pruning) as a prunekit plugin.

* statistic ``fluctuation``: the reference's streamed Welford variant, per position and
  channel, centred on each channel's position-averaged running mean; the first calibration
  batch only feeds the baseline (pp-spec section 5.3).
* metric ``flap``: ``(Σ_t fluc[t, j]) · Σ_i W_ij²`` per input channel of o_proj/down_proj
  (channel-level scores; a head's raw score is the sum of its channels).
* allocator ``flap_global``: per-module standardisation, head = mean of its channels' z-scores
  (the model's real head_dim), a FLOPs weight per unit, one global inclusive threshold, then
  the per-layer count rules.
* compensator ``bias_mean``: adds ``W[:, removed] · mean[removed]`` to the output projection.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from prunekit.plugin import (
    ATTN,
    MLP,
    Allocation,
    RecipeError,
    StaticMethod,
    hookimpl,
    kept_channels,
    per_layer_ratio,
    top_units,
)


class Fluctuation:
    """Per-position running mean and Welford-style fluctuation of each input channel.

    ``baseline[t, j]`` is the running mean of ``x[t, j]``; with ``μ_j = mean_t baseline[t, j]``
    before (old) and after (new) the batch:
    ``fluc ← fluc·(n-1)/(n+B-1) + Σ_b (x - μ_new)(x - μ_old)/(n+B)``, skipped while ``n = 0``.
    Finalised to ``fluctuation = Σ_t fluc[t, :]`` and ``mean = mean_t baseline[t, :]``.

    :param running_mean: ``flap`` (default): FLAP's own running mean, the batch's sum entering
        with weight ``1/(n+B)``, i.e. its mean with ``B/(n+B)``. ``reference``: the PP
        reference code's update ``baseline ← baseline·n/(n+B) + mean_b(x)/(n+B)`` (its
        ``llama_pp.py``), which the paper's FLAP rows come from: with batches of ``B`` windows
        the baseline tends to ``mean/B``, so the fluctuation is close to the raw second moment
        and the compensation bias about ``1/B`` of FLAP's.
    """

    name = "fluctuation"
    provides = ("fluctuation", "mean")
    RUNNING_MEANS = ("flap", "reference")

    def __init__(self, running_mean: str = "flap") -> None:
        if running_mean not in self.RUNNING_MEANS:
            raise ValueError(
                f"running_mean must be one of {', '.join(self.RUNNING_MEANS)} "
                f"(FLAP's own formula, or the PP reference code's), got "
                f"{running_mean!r}"
            )
        self.running_mean = running_mean

    def options(self) -> dict[str, Any]:
        # FLAP's own formula keeps the cache key it always had
        return {} if self.running_mean == "flap" else {"running_mean": self.running_mean}

    def init(self, channels: int, positions: int) -> dict[str, torch.Tensor]:
        return {
            "baseline": torch.zeros(positions, channels, dtype=torch.float64),
            "fluc": torch.zeros(positions, channels, dtype=torch.float64),
            "n": torch.zeros((), dtype=torch.float64),
            "batches": torch.zeros((), dtype=torch.int64),
            "seen": torch.zeros(positions, dtype=torch.bool),
        }

    def update(self, state, x, mask) -> None:
        if not bool(mask.all()):
            raise ValueError("the fluctuation statistic expects unpadded calibration windows")
        x = x.double().cpu()
        bsz, seq = x.shape[:2]
        n = float(state["n"])
        base = state["baseline"][:seq]
        mu_old = base.mean(0)
        if self.running_mean == "flap":
            new_base = (base * n + x.sum(0)) / (n + bsz)
        else:  # the reference's: the batch mean enters with weight 1/(n+B), not B/(n+B)
            new_base = base * (n / (n + bsz)) + x.mean(0) / (n + bsz)
        state["baseline"][:seq] = new_base
        state["seen"][:seq] = True
        mu_new = new_base.mean(0)
        if n > 0:
            delta = ((x - mu_new) * (x - mu_old)).sum(0)
            state["fluc"][:seq] = state["fluc"][:seq] * (n - 1) / (n + bsz - 1) + delta / (n + bsz)
        state["n"] += bsz
        state["batches"] += 1

    def finalize(self, state) -> dict[str, torch.Tensor]:
        if int(state["batches"]) < 2:
            raise RecipeError(
                "calibration: the fluctuation statistic needs at least 2 calibration batches "
                "(the first batch only feeds the running mean); raise calibration.samples above "
                "calibration.batch_size"
            )
        seen = state["seen"]
        return {
            "fluctuation": state["fluc"][seen].sum(0).float(),
            "mean": state["baseline"][seen].mean(0).float(),
        }


class FlapScore:
    """``fluctuation_j · Σ_i W_ij²`` per input channel (attention: one score per channel)."""

    needs = ("fluctuation",)

    def prepare(self, layer, group: str):
        factor = layer.output_projection(group).weight.detach().float().square().sum(0)

        def score(stats: dict[str, torch.Tensor]) -> torch.Tensor:
            return stats["fluctuation"].to(factor.device).float() * factor

        return score


def head_flops_weight(layer, tokens: int) -> float:
    """FLOPs of one head relative to one MLP channel, from the adapter's cost model
    (``unit_macs``). For LLaMA this is the reference's ``(T d d_h c + 2 T² d_h) / (3 T d)``,
    ``c = 4`` (q, k, v, o) with MHA and ``2`` (q, o) with GQA, where K/V are never pruned; for
    OPT's ungated MLP the channel costs ``2 d``."""
    return layer.unit_macs(ATTN, tokens) / layer.unit_macs(MLP, tokens)


class FlapGlobal:
    """FLAP's adaptive structure: one FLOPs-weighted threshold over every unit of every layer.

    :param tokens: the sequence length in the head FLOPs weight (reference: 1024 for language
        modelling, 100 for commonsense tasks).
    :param inflate: prune the pooled units to the inflated ratio ``r'`` (the reference does).
    """

    def __init__(self, tokens: int = 1024, inflate: bool = True) -> None:
        if int(tokens) < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens!r}")
        self.tokens, self.inflate = int(tokens), bool(inflate)

    @staticmethod
    def _standardise(v: torch.Tensor) -> torch.Tensor:
        std = v.std(unbiased=True) if v.numel() > 1 else torch.ones(())
        return (v - v.mean()) / (std if std > 0 else 1.0)

    def module_ratios(self, scores, adapter, settings) -> dict[tuple[int, str], float]:
        """The fraction of units pruned per (layer, group) by the global threshold."""
        units, weights, owners = [], [], []
        device = next(iter(scores.values())).device if scores else None
        for key, s in scores.items():
            layer = adapter.layers()[key[0]]
            # pooled over every layer, so on one device (a dispatched model's layers have their
            # own): the first layer's
            z = self._standardise(s.float().flatten().to(device))
            if key[1] == ATTN:
                width = layer.unit_width(ATTN)
                z = z.view(-1, width).mean(1) if z.numel() == layer.units(ATTN) * width else z
                w = head_flops_weight(layer, self.tokens)
            else:
                w = 1.0
            units.append(z)
            weights.append(torch.full_like(z, w))
            owners += [key] * z.numel()
        score = torch.cat(units)
        weight = torch.cat(weights).double()
        order = torch.argsort(score)
        cumulative = torch.cumsum(weight[order], 0)
        r = settings.ratio
        if self.inflate:
            r = per_layer_ratio(r, adapter.num_layers, settings.skip_layers)
        target = r * float(cumulative[-1])
        idx = int(
            torch.searchsorted(cumulative, torch.tensor(target, dtype=torch.float64), right=True)
        )
        if r <= 0:
            return dict.fromkeys(scores, 0.0)
        threshold = score[order[min(idx, len(order) - 1)]]
        pruned = score <= threshold  # inclusive, as the reference
        out: dict[tuple[int, str], list[int]] = {key: [0, 0] for key in scores}
        for key, flag in zip(owners, pruned.tolist(), strict=True):
            out[key][0] += int(flag)
            out[key][1] += 1
        return {key: p / n for key, (p, n) in out.items()}

    def __call__(self, scores, adapter, settings) -> Allocation:
        allocation = Allocation()
        for key, ratio in self.module_ratios(scores, adapter, settings).items():
            layer = adapter.layers()[key[0]]
            s = scores[key].float().flatten()
            if key[1] == ATTN:
                raw = s.view(layer.num_heads, -1).sum(1) if s.numel() > layer.num_heads else s
                keep = layer.num_heads - math.floor(ratio * layer.num_heads + 1e-9)
                keep = max(keep, 1)
            else:
                raw = s
                # a module is never emptied: keep at least one channel
                keep = max(kept_channels(layer.intermediate_size, ratio, settings.round_to), 1)
            if keep < layer.units(key[1]):
                allocation.kept[key] = top_units(raw, keep)
        return allocation


class BiasMean:
    """FLAP's bias compensation: ``b = W[:, removed] · mean[removed]`` (the position-averaged
    calibration mean of the removed input channels), added to the output projection."""

    needs = ("mean",)

    def __call__(self, layer, group, kept, stats):
        mean = stats.get("mean")
        if mean is None:
            raise ValueError(
                "bias_mean needs a statistic that records the channel mean (e.g. 'fluctuation')"
            )
        weight = layer.output_projection(group).weight.detach().float()
        channels = layer.unit_channels(group, kept.to(weight.device))
        removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
        removed[channels] = False
        return weight[:, removed] @ mean.to(weight.device).float()[removed]


class Flap(StaticMethod):
    """FLAP: fluctuation metric, global FLOPs-weighted allocation, bias compensation."""

    name = "flap"
    slots = {
        "statistic": "fluctuation",
        "metric": "flap",
        "allocator": "flap_global",
        "compensator": "bias_mean",
    }

    @classmethod
    def check_recipe(cls, recipe, num_layers):
        c = recipe.calibration
        if recipe.method.ratio > 0 and c.samples <= c.batch_size:
            return [
                f"calibration.samples: FLAP's fluctuation needs at least 2 calibration "
                f"batches (the first only feeds the running mean): samples ({c.samples}) "
                f"must exceed batch_size ({c.batch_size})"
            ]
        return []


@hookimpl
def prunekit_register_statistics(register):
    register("fluctuation", Fluctuation)


@hookimpl
def prunekit_register_metrics(register):
    register("flap", FlapScore)


@hookimpl
def prunekit_register_allocators(register):
    register("flap_global", FlapGlobal)


@hookimpl
def prunekit_register_compensators(register):
    register("bias_mean", BiasMean)


@hookimpl
def prunekit_register_methods(register):
    register("flap", Flap)


__all__ = ["BiasMean", "Flap", "FlapGlobal", "FlapScore", "Fluctuation", "MLP"]
