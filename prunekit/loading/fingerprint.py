"""What identifies a model's weights: the sha256 of its weight files and a fingerprint of the
loaded model (config, dtype and tensors), which keys the calibration cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from prunekit._files import sha256_file
from prunekit.devices import stored_tensor
from prunekit.loading.aliases import _WEIGHT_PATTERNS
from prunekit.loading.resolve import _dtype_name


def _weights_sha256(directory: Path) -> str | None:
    """sha256 over a checkpoint's weight files (``*.safetensors``, ``*.bin``) in name order.

    It is the sha256 of ``sha256sum``-style lines (``<file sha256>  <name>``), so each file can be
    checked on its own. None if the directory holds no weight files.
    """
    files = sorted({p for pattern in _WEIGHT_PATTERNS for p in directory.glob(pattern)})
    if not files:
        return None
    lines = "".join(f"{sha256_file(p)}  {p.name}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes in logical (row-major) order, whatever its device."""
    if tensor.is_meta:  # no content anywhere (a model built on the meta device)
        return "meta"
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.to("cpu")
    data = data.contiguous().reshape(-1)
    if data.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    if data.is_complex():
        data = torch.view_as_real(data).reshape(-1)
    raw = data.view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(raw)).hexdigest()


def _fingerprint_config(config: Any) -> str:
    """The config as canonical JSON, without what does not describe the model itself.

    Dropped: private keys (``_name_or_path``, ``_commit_hash``, the attention implementation),
    ``transformers_version`` and ``dtype`` (the tensor dtypes are hashed with the weights).
    """

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: clean(v)
                for k, v in value.items()
                if not str(k).startswith("_")
                and k not in ("transformers_version", "dtype", "torch_dtype")
            }
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(config.to_dict()), sort_keys=True, default=str)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hex digest identifying a model's exact weights and config (a cache key).

    Hashes the config (see :func:`_fingerprint_config`) and, for every parameter and buffer in
    a fixed order, its name, shape, dtype and the sha256 of its bytes. Non-persistent buffers
    (e.g. rotary ``inv_freq``) are recomputed from the config, so only their name, shape and
    dtype count. Tensors are hashed in parallel threads (hashlib releases the GIL), so a model of
    a few hundred million parameters takes well under a second. The digest does not depend on the
    device, the process or the attention implementation; it does depend on the dtype. Weights
    that accelerate offloaded (CPU memory or disk) are read from where they are stored, one at
    a time, so a dispatched model has the digest of the same model in one piece.
    """
    entries: list[tuple[str, str, torch.Tensor | None]] = []
    seen: set[int] = set()
    for name, param in model.named_parameters():  # tied weights are listed once
        seen.add(id(param))
        entries.append(("param", name, param))
    for module_name, module in model.named_modules():
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for buffer_name, buffer in module._buffers.items():
            if buffer is None or id(buffer) in seen:
                continue
            seen.add(id(buffer))
            full_name = f"{module_name}.{buffer_name}" if module_name else buffer_name
            if buffer_name in non_persistent:
                entries.append(("derived", full_name, buffer))
            else:
                entries.append(("buffer", full_name, buffer))

    def digest(name: str, tensor: torch.Tensor) -> str:
        if tensor.is_meta:  # offloaded by accelerate: hash the stored copy
            with contextlib.suppress(KeyError):
                tensor = stored_tensor(model, name)
        return _tensor_sha256(tensor)

    to_hash = [(name, t) for kind, name, t in entries if kind != "derived"]
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = iter(list(pool.map(lambda item: digest(*item), to_hash)))

    hasher = hashlib.sha256()
    config = getattr(model, "config", None)
    hasher.update(_fingerprint_config(config).encode() if config is not None else b"{}")
    for kind, name, tensor in entries:
        content = "-" if kind == "derived" else next(digests)
        line = f"\n{kind}\t{name}\t{tuple(tensor.shape)}\t{_dtype_name(tensor.dtype)}\t{content}"
        hasher.update(line.encode())
    return hasher.hexdigest()[:16]
