"""Runtime: dense and pruned timed in the same process, on the same batches, warm-up excluded.

Each timed call is ``model(input_ids=batch, use_cache=False)`` (a scoring pass), bracketed by
``torch.cuda.synchronize`` on GPU.
A dynamic model is timed with its state preserved (snapshot before, restored after), so timing
never changes what the metrics see.

Memory: on CUDA the peak allocated memory of the timed calls of each model
(``torch.cuda.max_memory_allocated`` after a reset); on every device the bytes of the model's
parameters (the pruned model's are fewer) and, on CPU, the process's peak resident set size so
far (a process-wide figure, not one per model).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prunekit.devices import input_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_info(model, device: torch.device | None = None) -> dict:
    """Parameter bytes of ``model``; CUDA peak allocated bytes (since the last reset) or, on
    CPU, the process's peak resident set size."""
    device = device or input_device(model)
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
def time_batches(
    model, batches: Sequence[torch.Tensor], warmup: int = 1, repeats: int = 1
) -> list[float]:
    """Seconds per call for ``batches`` (each timed ``repeats`` times, in order) after
    ``warmup`` untimed calls on the first batch."""
    device = input_device(model)
    for _ in range(warmup):
        model(input_ids=batches[0].to(device), use_cache=False)
    _sync(device)
    _reset_peak(device)
    return [_seconds(model, batch.to(device), device) for _ in range(repeats) for batch in batches]


def _seconds(model, batch: torch.Tensor, device: torch.device) -> float:
    """Wall seconds of one scoring pass ``model(input_ids=batch, use_cache=False)`` (no KV
    cache to fill), synchronised on CUDA."""
    _sync(device)
    start = time.perf_counter()
    model(input_ids=batch, use_cache=False)
    _sync(device)
    return time.perf_counter() - start


@dataclass
class Contender:
    """One model of an interleaved timing table.

    :param dense: run a dynamic model on its original dense layers (``model.dense()``): the
        dense reference without a second copy of the weights.
    """

    name: str
    model: Any
    dense: bool = False


def _context(c: Contender):
    dense = getattr(c.model, "dense", None) if c.dense else None
    return dense() if dense is not None else contextlib.nullcontext()


def _phase_timers(c: Contender):
    """The dynamic runtime's phase timers of a pruned dynamic model, else None."""
    runtime = getattr(c.model, "runtime", None)
    return None if c.dense or runtime is None else getattr(runtime, "timers", None)


@torch.no_grad()
def time_interleaved(
    contenders: Sequence[Contender],
    batches: Sequence[torch.Tensor],
    rounds: int = 3,
    warmup: int = 1,
    progress=None,
) -> dict[str, dict]:
    """Seconds per call of every contender on the same batches, in interleaved rounds.

    Every contender first runs ``warmup`` untimed calls on the first batch. Then each of
    ``rounds`` rounds times every batch on every contender back to back (the order of the
    contenders rotates from round to round), so drift of the machine hits all of them alike
    and call ``i`` of every contender is on the same batch (paired ratios). A dynamic model's
    state is preserved around the whole timing (it never changes what the metrics see), and
    its own phases (probe, score, gather, history...) are timed per call.

    :returns: ``{name: {"s_all": [seconds per call], "phases_s_all": {phase: [seconds]},
        "peak_allocated_bytes": CUDA peak over the calls or None}}``.
    """
    if not batches or not contenders:
        raise ValueError("time_interleaved needs at least one batch and one contender")
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be unique, got {names}")
    out = {
        c.name: {"s_all": [], "phases_s_all": defaultdict(list), "peak_allocated_bytes": None}
        for c in contenders
    }
    with contextlib.ExitStack() as stack:
        seen: set[int] = set()
        for c in contenders:  # one snapshot per distinct dynamic model
            preserved = getattr(c.model, "preserved_state", None)
            if preserved is not None and id(c.model) not in seen:
                seen.add(id(c.model))
                stack.enter_context(preserved())
        for c in contenders:
            for _ in range(warmup):
                _call(c, batches[0])
        for r in range(rounds):
            shift = r % len(contenders)
            order = list(contenders[shift:]) + list(contenders[:shift])
            for batch in batches:
                for c in order:
                    seconds, phases, peak = _call(c, batch)
                    rec = out[c.name]
                    rec["s_all"].append(seconds)
                    for k, v in phases.items():
                        rec["phases_s_all"][k].append(v)
                    if peak is not None:
                        rec["peak_allocated_bytes"] = max(rec["peak_allocated_bytes"] or 0, peak)
            if progress is not None:
                progress(r + 1, rounds)
    for rec in out.values():
        rec["phases_s_all"] = dict(rec["phases_s_all"])
    return out


def _call(c: Contender, batch: torch.Tensor) -> tuple[float, dict[str, float], int | None]:
    device = _device(c.model)
    batch = batch.to(device)
    timers = _phase_timers(c)
    with _context(c):
        if timers is not None:
            timers.reset()
            timers.enabled = True
        _reset_peak(device)
        try:
            seconds = _seconds(c.model, batch, device)
        finally:
            if timers is not None:
                timers.enabled = False
        phases = dict(timers.seconds) if timers is not None else {}
        if timers is not None:
            timers.reset()
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return seconds, phases, peak


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else input_device(model)


def flop_limit(kept_fraction: float | None) -> float | None:
    """The largest speed-up the kept FLOPs allow: ``1 / kept_fraction`` (a model that does
    ``kept_fraction`` of the dense work cannot be faster than that, short of cache effects)."""
    if not kept_fraction or kept_fraction <= 0:
        return None
    return 1.0 / kept_fraction


def paired_speedups(dense: Sequence[float], pruned: Sequence[float]) -> list[float]:
    """Per-call ratios dense / pruned of interleaved timings (call ``i`` on the same batch)."""
    if len(dense) != len(pruned):
        raise ValueError(
            f"paired timings need as many dense calls as pruned ({len(dense)} vs {len(pruned)})"
        )
    return [d / p for d, p in zip(dense, pruned, strict=True) if p > 0]


def summarize(
    dense: list[float],
    pruned: list[float],
    batch_shape: tuple[int, int],
    overhead: dict[str, float] | None = None,
    repeats: int = 1,
    *,
    flops_kept_fraction: float | None = None,
    interleaved: bool = True,
) -> dict:
    """The ``runtime`` section of results.json.

    ``speedup`` is the ratio of the medians; ``speedup_spread`` the min-max of the per-call
    ratios when the calls were interleaved (paired on the same batch), else the ratio of the
    extreme times. With ``flops_kept_fraction`` (the whole forward's kept MACs), ``flop_limit``
    is ``1 / flops_kept_fraction`` and ``beyond_flop_limit`` flags a speed-up the kept FLOPs
    cannot explain: timing noise, not a result.
    """
    d, p = statistics.median(dense), statistics.median(pruned)
    tokens = batch_shape[0] * batch_shape[1]
    if interleaved and len(dense) == len(pruned):
        pairs = paired_speedups(dense, pruned)
        spread = [min(pairs), max(pairs)] if pairs else None
    else:
        spread = [min(dense) / max(pruned), max(dense) / min(pruned)] if min(pruned) > 0 else None
    speedup = d / p if p > 0 else None
    limit = flop_limit(flops_kept_fraction)
    out = {
        "batch_shape": list(batch_shape),
        "timed_batches": len(pruned) // repeats,
        "repeats": repeats,
        "timed_calls": len(pruned),
        "interleaved": interleaved,
        "dense_s_per_batch": d,
        "pruned_s_per_batch": p,
        "dense_s_spread": [min(dense), max(dense)],
        "pruned_s_spread": [min(pruned), max(pruned)],
        "speedup": speedup,
        "speedup_spread": spread,
        "time_ratio": p / d if d > 0 else None,
        "tokens_per_s": tokens / p if p > 0 else None,
        "dense_tokens_per_s": tokens / d if d > 0 else None,
        "forward_flops_kept_fraction": flops_kept_fraction,
        "flop_limit": limit,
        "beyond_flop_limit": bool(limit is not None and speedup is not None and speedup > limit),
        "dense_s_all": list(dense),
        "pruned_s_all": list(pruned),
    }
    if overhead:
        out["overhead_s_per_batch"] = dict(overhead)
        out["overhead_fraction"] = sum(overhead.values()) / p if p > 0 else None
    return out


def phase_medians(phases_s_all: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds per call of each phase of a dynamic method's own work."""
    return {k: statistics.median(v) for k, v in phases_s_all.items() if v}


def describe_speedup(runtime: dict) -> str:
    """One line for a person: the speed-up with its spread, flagged when beyond the FLOP limit."""
    speedup, spread = runtime.get("speedup"), runtime.get("speedup_spread")
    text = f"{speedup:.2f}x"
    if spread:
        text += f" (spread {spread[0]:.2f}-{spread[1]:.2f} over {runtime.get('timed_calls')} calls"
        text += ", interleaved)" if runtime.get("interleaved") else ", not interleaved)"
    if runtime.get("beyond_flop_limit"):
        text += (
            f" -- beyond the {runtime['flop_limit']:.2f}x that the kept FLOPs allow: timing "
            "noise, not a result; time again on a quiet machine with more batches"
        )
    return text
