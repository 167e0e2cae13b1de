"""Runtime: dense and pruned timed in the same process, on the same batches, warm-up excluded.

Each timed call is ``model(input_ids=batch)``, bracketed by ``torch.cuda.synchronize`` on GPU.
A dynamic model is timed with its state preserved (snapshot before, restored after), so timing
never changes what the metrics see.

Memory: on CUDA the peak allocated memory of the timed calls of each model
(``torch.cuda.max_memory_allocated`` after a reset); on every device the bytes of the model's
parameters (the pruned model's are fewer) and, on CPU, the process's peak resident set size so
far (a process-wide figure, not one per model).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_info(model, device: torch.device | None = None) -> dict:
    """Parameter bytes of ``model``; CUDA peak allocated bytes (since the last reset) or, on
    CPU, the process's peak resident set size."""
    device = device or next(model.parameters()).device
    out = {"param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    if device.type == "cuda":
        out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
        try:
            import resource
            import sys

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out["process_peak_rss_bytes"] = rss if sys.platform == "darwin" else rss * 1024
        except ImportError:  # pragma: no cover - Windows
            pass
    return out


@torch.no_grad()
def time_batches(model, batches: Sequence[torch.Tensor], warmup: int = 1,
                 repeats: int = 1) -> list[float]:  # fmt: skip
    """Seconds per call for ``batches`` (each timed ``repeats`` times, in order) after
    ``warmup`` untimed calls on the first batch."""
    device = next(model.parameters()).device
    for _ in range(warmup):
        model(input_ids=batches[0].to(device))
    _sync(device)
    _reset_peak(device)
    times = []
    for _ in range(repeats):
        for batch in batches:
            batch = batch.to(device)
            _sync(device)
            start = time.perf_counter()
            model(input_ids=batch)
            _sync(device)
            times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def time_pruned(model, batches: Sequence[torch.Tensor], warmup: int = 1, repeats: int = 1):
    """(seconds per call, overhead seconds per call by phase) of a pruned model.

    For a dynamic model (one with ``preserved_state`` and ``runtime.timers``) the method's own
    phases (probe, score, gather, history) are timed too.
    """
    preserved = getattr(model, "preserved_state", None)
    if preserved is None:
        return time_batches(model, batches, warmup, repeats), {}
    timers = model.runtime.timers
    with preserved():
        device = next(model.parameters()).device
        for _ in range(warmup):
            model(input_ids=batches[0].to(device))
        timers.reset()
        timers.enabled = True
        try:
            times = time_batches(model, batches, warmup=0, repeats=repeats)
        finally:
            timers.enabled = False
        overhead = {k: v / len(times) for k, v in timers.seconds.items()}
        timers.reset()
    return times, overhead


def summarize(dense: list[float], pruned: list[float], batch_shape: tuple[int, int],
              overhead: dict[str, float] | None = None, repeats: int = 1) -> dict:  # fmt: skip
    """The ``runtime`` section of results.json."""
    d, p = statistics.median(dense), statistics.median(pruned)
    tokens = batch_shape[0] * batch_shape[1]
    out = {
        "batch_shape": list(batch_shape),
        "timed_batches": len(pruned) // repeats,
        "repeats": repeats,
        "dense_s_per_batch": d,
        "pruned_s_per_batch": p,
        "dense_s_spread": [min(dense), max(dense)],
        "pruned_s_spread": [min(pruned), max(pruned)],
        "speedup": d / p if p > 0 else None,
        "time_ratio": p / d if d > 0 else None,
        "tokens_per_s": tokens / p if p > 0 else None,
        "dense_tokens_per_s": tokens / d if d > 0 else None,
        "dense_s_all": list(dense),
        "pruned_s_all": list(pruned),
    }
    if overhead:
        out["overhead_s_per_batch"] = dict(overhead)
        out["overhead_fraction"] = sum(overhead.values()) / p if p > 0 else None
    return out
