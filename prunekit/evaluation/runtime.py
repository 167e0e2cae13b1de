"""Runtime: dense and pruned timed in the same process, on the same batches, warm-up excluded.

Each timed call is ``model(input_ids=batch)``, bracketed by ``torch.cuda.synchronize`` on GPU.
A dynamic model is timed with its state preserved (snapshot before, restored after), so timing
never changes what the metrics see.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_batches(model, batches: Sequence[torch.Tensor], warmup: int = 1) -> list[float]:
    """Seconds per batch for ``batches`` after ``warmup`` untimed calls on the first batch."""
    device = next(model.parameters()).device
    for _ in range(warmup):
        model(input_ids=batches[0].to(device))
    times = []
    for batch in batches:
        batch = batch.to(device)
        _sync(device)
        start = time.perf_counter()
        model(input_ids=batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def time_pruned(model, batches: Sequence[torch.Tensor], warmup: int = 1):
    """(seconds per batch, overhead seconds per batch by phase) of a pruned model.

    For a dynamic model (one with ``preserved_state`` and ``runtime.timers``) the method's own
    phases (probe, score, gather) are timed too.
    """
    preserved = getattr(model, "preserved_state", None)
    if preserved is None:
        return time_batches(model, batches, warmup), {}
    timers = model.runtime.timers
    with preserved():
        device = next(model.parameters()).device
        for _ in range(warmup):
            model(input_ids=batches[0].to(device))
        timers.reset()
        timers.enabled = True
        try:
            times = time_batches(model, batches, warmup=0)
        finally:
            timers.enabled = False
        overhead = {k: v / len(batches) for k, v in timers.seconds.items()}
        timers.reset()
    return times, overhead


def summarize(dense: list[float], pruned: list[float], batch_shape: tuple[int, int],
              overhead: dict[str, float] | None = None) -> dict:  # fmt: skip
    """The ``runtime`` section of results.json."""
    d, p = statistics.median(dense), statistics.median(pruned)
    tokens = batch_shape[0] * batch_shape[1]
    out = {
        "batch_shape": list(batch_shape),
        "timed_batches": len(pruned),
        "dense_s_per_batch": d,
        "pruned_s_per_batch": p,
        "dense_s_spread": [min(dense), max(dense)],
        "pruned_s_spread": [min(pruned), max(pruned)],
        "speedup": d / p if p > 0 else None,
        "time_ratio": p / d if d > 0 else None,
        "tokens_per_s": tokens / p if p > 0 else None,
        "dense_tokens_per_s": tokens / d if d > 0 else None,
    }
    if overhead:
        out["overhead_s_per_batch"] = dict(overhead)
        out["overhead_fraction"] = sum(overhead.values()) / p if p > 0 else None
    return out
