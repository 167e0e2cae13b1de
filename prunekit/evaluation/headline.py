"""The headline metric of Probe Pruning: performance degradation per unit runtime reduction.

``(PPL_pruned - PPL_dense) / (1 - t_pruned / t_dense)``: how much perplexity a method gives up
for each unit of runtime it saves, with ``t`` the time per batch measured for the dense and the
pruned model in the same process, on the same batches. Lower is better. A method that is not
faster than dense (``t_pruned >= t_dense``, e.g. full-batch probing, which runs every batch
twice) has no value ("n/a"): it saves no runtime to divide by.

pp-spec section 7.4 notes that the reference code never computes this quantity; the paper's
abstract reports PP's value as 2.56x lower than the best static method's on LLaMA-2-7B at 40%.
"""

from __future__ import annotations

__all__ = ["degradation_per_runtime_reduction", "relative_to"]


def degradation_per_runtime_reduction(
    ppl_pruned: float, ppl_dense: float, t_pruned: float, t_dense: float
) -> float | None:
    """``(ppl_pruned - ppl_dense) / (1 - t_pruned / t_dense)``, or None when not faster."""
    if t_dense <= 0 or t_pruned <= 0:
        raise ValueError("times per batch must be positive")
    reduction = 1.0 - t_pruned / t_dense
    if reduction <= 0:
        return None
    return (ppl_pruned - ppl_dense) / reduction


def relative_to(values: dict[str, float | None], reference: str) -> dict[str, float | None]:
    """Each value divided by ``values[reference]`` (None where either is missing or the
    reference is not positive)."""
    ref = values.get(reference)
    return {
        k: (v / ref if v is not None and ref is not None and ref > 0 else None)
        for k, v in values.items()
    }
