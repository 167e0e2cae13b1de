"""Streaming calibration statistics at the inputs of the output projections.

The dense model runs over the calibration windows once; the model adapter reports the input of
every output projection (``LayerAdapter.watch``: o_proj, down_proj, fc2...) and each batch is
folded into every requested statistic. Memory is O(positions x channels) per projection, independent of the number of
samples. Accumulation is fp32 whatever the model dtype.

Results are cached on disk by content: model fingerprint, calibration data (file hash, split,
window settings, seed), statistic name and options, and the prunekit version. Every method and
run needing the same statistic shares one cache file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prunekit._files import atomic_path, cache_root
from prunekit._files import tensor_sha256 as _digest
from prunekit.components import CalibrationStatistic, ModelAdapter
from prunekit.devices import input_device
from prunekit.hookspecs import hookimpl
from prunekit.progress import track

#: statistics keyed by (layer index, group) -> name -> tensor
LayerStats = dict[tuple[int, str], dict[str, torch.Tensor]]


class SquaredMean:
    """Per-position mean of x² over calibration samples: ``H[t, j] = mean_n x_n[t, j]²``.

    The history PP starts from and the activation norm of Wanda-sp (``C_j = Σ_t H[t, j]``).
    Pad tokens (mask False) are not counted; the count is kept per position.
    """

    name = "sq_mean"
    provides = ("sq_mean",)

    def options(self) -> dict[str, Any]:
        return {}

    def init(self, channels: int, positions: int) -> dict[str, torch.Tensor]:
        return {
            "sum": torch.zeros(positions, channels, dtype=torch.float64),
            "count": torch.zeros(positions, dtype=torch.float64),
        }

    def update(self, state, x, mask) -> None:
        m = mask.to(x.dtype).unsqueeze(-1)
        state["sum"][: x.shape[1]] += (x.square() * m).sum(0).double().cpu()
        state["count"][: x.shape[1]] += mask.sum(0).double().cpu()

    def finalize(self, state) -> dict[str, torch.Tensor]:
        count = state["count"].clamp(min=1).unsqueeze(-1)
        return {"sq_mean": (state["sum"] / count).float()}


def _stream(
    model,
    adapter: ModelAdapter,
    windows: torch.Tensor,
    batch_size: int,
    statistics: list[CalibrationStatistic],
    device,
) -> dict[str, LayerStats]:
    positions = windows.shape[1]
    states: dict[str, dict[tuple[int, str], dict]] = {s.name: {} for s in statistics}
    current_mask: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(key: tuple[int, str]) -> Callable:
        def hook(activations):
            x = activations.detach().float()
            for stat in statistics:
                if key not in states[stat.name]:
                    states[stat.name][key] = stat.init(x.shape[-1], positions)
                stat.update(states[stat.name][key], x, current_mask["mask"].to(x.device))

        return hook

    for layer in adapter.layers():
        for group in layer.groups:
            handles.append(layer.watch(group, make_hook((layer.index, group))))
    try:
        with torch.no_grad():
            batches = list(torch.split(windows, batch_size))
            for batch in track(batches, "calibration", total=len(batches)):
                current_mask["mask"] = torch.ones(batch.shape, dtype=torch.bool)
                # the decoder stack only: the statistics never need the LM head's logits
                # (with a large vocabulary they cost more than every layer together)
                getattr(model, "base_model", model)(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {
        stat.name: {key: stat.finalize(st) for key, st in states[stat.name].items()}
        for stat in statistics
    }


def _cache_file(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root() / "calibration" / f"{key['statistic']}-{digest}.safetensors"


def _save(path: Path, stats: LayerStats, key: dict) -> None:
    """Write a cache entry atomically, with the sha256 of its tensors in its metadata."""
    from safetensors.torch import save_file

    flat = {
        f"{layer}.{group}.{name}": t.contiguous()
        for (layer, group), d in stats.items()
        for name, t in d.items()
    }
    with atomic_path(path, suffix=".tmp") as tmp:
        save_file(
            flat,
            str(tmp),
            metadata={"key": json.dumps(key, sort_keys=True), "sha256": _digest(flat)},
        )


def _load(path: Path, key: dict | None = None) -> LayerStats | None:
    """A cache entry, or None when it is unreadable, truncated, for another key, or its tensors
    do not match the sha256 recorded when it was written (the caller recomputes it and writes
    it again). An entry written before the sha256 was recorded is checked for structure only
    and rewritten with its sha256."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        flat = load_file(str(path))
    except Exception as exc:  # truncated, garbage, unreadable
        _warn_corrupt(path, f"unreadable ({type(exc).__name__}: {str(exc)[:120]})")
        return None
    if key is not None and meta.get("key") not in (None, json.dumps(key, sort_keys=True)):
        _warn_corrupt(path, "it was written for other settings")
        return None
    recorded = meta.get("sha256")
    if recorded is not None and recorded != _digest(flat):
        _warn_corrupt(path, "its tensors do not match the sha256 recorded when it was written")
        return None
    out: LayerStats = {}
    for name, tensor in flat.items():
        layer, group, stat = name.split(".", 2)
        out.setdefault((int(layer), group), {})[stat] = tensor
    if recorded is None and key is not None:
        _save(path, out, key)  # an older entry: record its sha256 from now on
    return out


def _warn_corrupt(path: Path, why: str) -> None:
    import warnings

    warnings.warn(
        f"calibration cache entry {path} is not usable: {why}; computing the "
        "statistics again and replacing it",
        RuntimeWarning,
        stacklevel=3,
    )


def collect_statistics(
    model,
    adapter: ModelAdapter,
    windows: torch.Tensor,
    statistics: list[CalibrationStatistic],
    batch_size: int = 8,
    cache_key: dict | None = None,
    device=None,
) -> dict[str, LayerStats]:
    """Statistics of the dense model over ``windows``, from the cache where possible.

    :param cache_key: what identifies the data and model (fingerprint, data hash, window
        settings); ``None`` disables the cache. The statistic's name and options and the
        prunekit version are added to it.
    :param device: where the windows go (default: the device of the model's input
        embeddings, :func:`prunekit.devices.input_device`). On a model dispatched over several
        devices, each statistic sees every layer's activations on that layer's device.
    :returns: ``{statistic name: {(layer, group): {tensor name: tensor}}}``
    """
    from prunekit import __version__

    device = device or input_device(model)
    results: dict[str, LayerStats] = {}
    missing = []
    for stat in statistics:
        if cache_key is not None:
            key = {
                **cache_key,
                "statistic": stat.name,
                "options": stat.options(),
                "prunekit": __version__,
            }
            path = _cache_file(key)
            cached = _load(path, key) if path.is_file() else None
            if cached is not None:
                results[stat.name] = cached
                continue
        missing.append(stat)
    if missing:
        fresh = _stream(model, adapter, windows, batch_size, missing, device)
        for stat in missing:
            results[stat.name] = fresh[stat.name]
            if cache_key is not None:
                key = {
                    **cache_key,
                    "statistic": stat.name,
                    "options": stat.options(),
                    "prunekit": __version__,
                }
                _save(_cache_file(key), fresh[stat.name], key)
    return results


@hookimpl
def prunekit_register_statistics(register):
    register("sq_mean", SquaredMean, description="per-position mean of x² (PP history, Wanda-sp)")
