"""What a run needs from the machine it runs on: memory for the weights, disk for a saved model.

``validate`` makes these checks only where the run happens (``apply``, ``bench``,
``generate``, a sweep cell): ``prunekit validate`` on a laptop, or a sweep submitted from a
login node, leaves them to the host that runs the recipe and says so (:attr:`Plan.elsewhere`).

The size of the weights is known without loading them: from the checkpoint's safetensors
headers (exact, read with the ``safetensors`` library), or else from the config by building the
model on the ``meta`` device (no memory, no remote code). A model whose size is not known here
(a hub checkpoint not in the local cache, a GGUF alias not yet converted) is not checked.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import torch

from prunekit.loading.resolve import converted_alias, locate_model, resolve_dtype


def _checkpoint_dir(model_id: str) -> Path | None:
    """The directory holding the weights the run will load, when it is on this machine."""
    location = locate_model(model_id)
    if location["source"] == "local":
        return Path(location["path"])
    if location["source"] == "alias":
        return converted_alias(model_id)
    return None


def _safetensors_elements(directory: Path) -> int | None:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= int(d)
                total += n
    return total


def meta_model(config: Any) -> torch.nn.Module | None:
    """The model of ``config`` built on the meta device: its shapes, no memory, no weights.
    None for a config that names remote code (``auto_map``: that code is not run here) or
    that transformers cannot build."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if not isinstance(config, PretrainedConfig) or getattr(config, "auto_map", None):
        return None
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture transformers cannot build here: not checked
        return None


def _meta_elements(config: Any) -> int | None:
    """Parameters of the model of ``config``, counted on the meta device."""
    model = meta_model(config)
    return None if model is None else sum(p.numel() for p in model.parameters())


def parameter_count(model_id: str, config: Any) -> int | None:
    """The number of weights the run loads for ``model_id`` (None when not known here)."""
    directory = None
    with contextlib.suppress(Exception):
        directory = _checkpoint_dir(model_id)
    if directory is not None:
        with contextlib.suppress(Exception):
            n = _safetensors_elements(directory)
            if n:
                return n
    return _meta_elements(config) if config is not None else None


def memory_available(device: torch.device) -> tuple[int, int] | None:
    """``(available, total)`` bytes of the memory that holds the weights on ``device``: the
    GPU's free and total memory, or this machine's available RAM (plus free swap) and its
    total RAM (plus swap). None when the platform does not say."""
    if device.type == "cuda":
        try:
            free, total = torch.cuda.mem_get_info(device.index or 0)
        except (RuntimeError, AssertionError, AttributeError):  # no driver to ask: not checked
            return None
        return int(free), int(total)
    if device.type != "cpu":
        return None
    try:
        import psutil

        vm, swap = psutil.virtual_memory(), psutil.swap_memory()
        return int(vm.available + swap.free), int(vm.total + swap.total)
    except ImportError:
        pass
    with contextlib.suppress(OSError, ValueError, KeyError):
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, value = line.split(":", 1)
            info[name] = int(value.split()[0]) * 1024
        return (
            info["MemAvailable"] + info.get("SwapFree", 0),
            info["MemTotal"] + info.get("SwapTotal", 0),
        )
    return None


def free_disk(path: Path) -> int | None:
    """Free bytes on the file system that ``path`` (or its nearest existing ancestor) is on."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_host(
    recipe, config: Any, device: torch.device
) -> tuple[list[tuple[tuple, str]], list[str]]:
    """``(problems, warnings)`` for running the recipe on this machine. Problems
    (``(recipe key, message)``): the weights in ``model.dtype`` exceed all the memory of
    ``device`` (RAM and swap for the CPU); ``output.save_model`` with less free disk than the
    dense weights take. Warnings: the weights exceed the memory free right now."""
    m = recipe.model
    if m.device == "auto":  # accelerate spreads the weights over what there is (and disk)
        return [], []
    n = parameter_count(m.id, config)
    if not n:
        return [], []
    need = n * resolve_dtype(m.dtype).itemsize
    problems, warnings = [], []
    memory = memory_available(device)
    if memory is not None and need > memory[1]:
        where = "this GPU" if device.type == "cuda" else "this machine (RAM and swap)"
        problems.append(
            (
                ("model", "id"),
                f"the weights alone need {gib(need)} ({n / 1e9:.2f} B parameters in "
                f"{m.dtype}), more than {where} has in all ({gib(memory[1])}): use a "
                "smaller model.dtype (bfloat16 or float16), model.device: auto to offload "
                "(with model.max_memory), or a machine with more memory",
            )
        )
    elif memory is not None and need > memory[0]:
        warnings.append(
            f"the weights need {gib(need)} in {m.dtype}, more than the {gib(memory[0])} free "
            "now: the run may swap or be killed; stop other jobs or use a smaller model.dtype"
        )
    if recipe.output.save_model:
        out = recipe.output_dir()
        free = free_disk(out)
        if free is not None and need > free:  # the dense size bounds the pruned one
            problems.append(
                (
                    ("output", "save_model"),
                    f"saving the model may need up to {gib(need)} (the dense weights in "
                    f"{m.dtype}), but {out} is on a file system with {gib(free)} free: free "
                    "space, choose another output.dir, or set output.save_model: false",
                )
            )
    return problems, warnings
