"""Writing a pruned model as a GGUF file for llama.cpp, with the ``gguf`` package.

The architecture-specific part is the model adapter's: :meth:`ModelAdapter.gguf_model
<prunekit.components.ModelAdapter.gguf_model>` describes the model as llama.cpp reads it (a
:class:`GgufModel`: the llama.cpp architecture, its metadata, the tensors in llama.cpp's
layout, and any exact legalization of shapes llama.cpp cannot hold). This module knows no
architecture: it adds the tokenizer, converts every tensor to the asked type with the
``gguf`` package's quantizers (the well-kept implementation of the format; no hand-packed
bytes), and writes the file under a temporary name, renamed once complete.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.errors import ExportError

#: ``--type`` -> (GGML tensor type name, llama.cpp file type name); 1-D tensors stay F32, a
#: matrix a block type cannot hold (its rows not a multiple of the block) falls back to F16
TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}


@dataclass
class GgufTensor:
    """One tensor as llama.cpp names and reads it (``data`` in Hugging Face's ``[out, in]``
    layout: the ``gguf`` writer reverses the dims as GGUF stores them)."""

    name: str
    data: torch.Tensor
    #: a weight matrix: takes the file's type; False keeps F32 (norms, biases, rope factors)
    quantize: bool = True


@dataclass
class GgufModel:
    """A model as llama.cpp's architecture ``arch`` reads it (what an adapter returns)."""

    arch: str
    #: ``GGUFWriter.add_<key>(value)`` calls, in order (e.g. ``{"head_count": [9, 6, ...]}``)
    fields: dict[str, Any]
    tensors: list[GgufTensor]
    #: the changes made to hold the model's shapes exactly in ``arch`` and their cost
    #: (e.g. ``{"padded_query_heads": 3, "extra_parameters": 6912}``); empty when none
    legalization: dict[str, Any] = field(default_factory=dict)
    #: the vocabulary size (token ids the model reads)
    vocab_size: int = 0


def tokenizer_fields_from_gguf(path: str | os.PathLike) -> list[tuple[str, Any, Any, Any]]:
    """Every ``tokenizer.*`` key of a GGUF file, as ``(key, value, type, sub_type)`` for
    ``GGUFWriter.add_key_value`` (the source model's vocabulary, merges, special tokens and
    chat template, copied as they are)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    out = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = f.types[-1]
            out.append((key, [f.contents(i) for i in range(len(f.data))], vtype, sub))
        else:
            out.append((key, f.contents(), vtype, None))
    if not any(k == "tokenizer.ggml.model" for k, *_ in out):
        raise ExportError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.model)")
    return out


#: Hugging Face ``Split`` pre-tokenizer patterns (before a ``ByteLevel`` without its own regex)
#: and the llama.cpp pre-tokenizer that splits text the same way. llama.cpp's
#: convert_hf_to_gguf.py recognises tokenizers by hashing a tokenization; these are the
#: patterns of the families it names so (Qwen2/2.5/3: digits one by one; LLaMA-3: up to three)
_PRE_BY_PATTERN = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "qwen2",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "llama-bpe",
}


def _llama_cpp_pre(parts: list[dict]) -> str:
    """llama.cpp's pre-tokenizer for a byte-level BPE's pre-tokenizer ``parts``: ``default``
    (GPT-2's rule) for a plain ``ByteLevel`` with its regex, a named one for a known ``Split``
    pattern. Anything else is refused: llama.cpp would split the text another way and give
    other tokens, with no error."""
    byte_level = next(p for p in parts if p.get("type") == "ByteLevel")
    others = [p for p in parts if p is not byte_level]
    if not others and byte_level.get("use_regex", True):
        return "default"
    if len(others) == 1 and others[0].get("type") == "Split" and not byte_level.get("use_regex"):
        pattern = (others[0].get("pattern") or {}).get("Regex")
        if pattern in _PRE_BY_PATTERN:
            return _PRE_BY_PATTERN[pattern]
    described = ", ".join(
        p.get("type", "?") + (f" {p['pattern']}" if "pattern" in p else "") for p in parts
    )
    raise ExportError(
        f"the tokenizer splits text before BPE with a pre-tokenizer prunekit cannot name for "
        f"llama.cpp ({described}): llama.cpp would split it another way and give other tokens "
        "without an error; pass --tokenizer-from a GGUF file of the dense model (llama.cpp's "
        "convert_hf_to_gguf.py writes one), or --vocab none"
    )


def tokenizer_fields_from_hf(tokenizer, vocab_size: int) -> list[tuple[str, Any, Any, Any]]:
    """A Hugging Face byte-level BPE tokenizer (GPT-2, LLaMA-3, Qwen2, SmolLM...) as
    llama.cpp's ``gpt2`` tokenizer: the tokens padded to ``vocab_size``, their types, the
    merges and the special tokens (``gguf.SpecialVocab`` reads those from a saved tokenizer
    directory). Other tokenizer kinds raise :class:`ExportError`."""
    import json

    from gguf import GGUFValueType, TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            "the tokenizer is not a fast Hugging Face tokenizer; pass "
            "--tokenizer-from a GGUF file of the dense model"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not any(p.get("type") == "ByteLevel" for p in parts) or model.get("byte_fallback"):
        raise ExportError(
            "the tokenizer is not a byte-level BPE (GPT-2 style: it splits on "
            "spaces or falls back to bytes, as SentencePiece-style ones do), which "
            "llama.cpp reads as another tokenizer kind; pass --tokenizer-from a "
            "GGUF file of the dense model (llama.cpp's convert_hf_to_gguf.py "
            "writes one), or --vocab none"
        )
    if model.get("type") != "BPE" or not isinstance(model.get("merges"), list):
        raise ExportError(
            f"the {model.get('type')} tokenizer has no llama.cpp equivalent "
            "prunekit can write; pass --tokenizer-from a GGUF file of the dense "
            "model (llama.cpp's convert_hf_to_gguf.py writes one), or --vocab "
            "none for a file read by token ids"
        )
    pre_name = _llama_cpp_pre(parts)
    vocab = tokenizer.get_vocab()
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    tokens, types = [], []
    by_id = {i: t for t, i in vocab.items()}
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if i in added else TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    out = [
        ("tokenizer.ggml.model", "gpt2", GGUFValueType.STRING, None),
        # llama.cpp splits text before BPE by a named pre-tokenizer (_llama_cpp_pre)
        ("tokenizer.ggml.pre", pre_name, GGUFValueType.STRING, None),
        ("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        (
            "tokenizer.ggml.token_type",
            [int(t) for t in types],
            GGUFValueType.ARRAY,
            GGUFValueType.INT32,
        ),
        ("tokenizer.ggml.merges", merges, GGUFValueType.ARRAY, GGUFValueType.STRING),
    ]
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            out.append(
                (f"tokenizer.ggml.{name}_token_id", int(token_id), GGUFValueType.UINT32, None)
            )
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        out.append(("tokenizer.chat_template", template, GGUFValueType.STRING, None))
    return out


def no_vocab_fields(vocab_size: int) -> list[tuple[str, Any, Any, Any]]:
    """llama.cpp's ``none`` tokenizer: the file is read by token ids only."""
    from gguf import GGUFValueType

    del vocab_size  # llama.cpp reads it from ``<arch>.vocab_size``, which every export has
    return [("tokenizer.ggml.model", "none", GGUFValueType.STRING, None)]


def _as_type(tensor: GgufTensor, qtype_name: str) -> tuple[np.ndarray, Any, str]:
    """``(data, raw type or None, type name)`` of one tensor in the file's type."""
    from gguf import GGMLQuantizationType, QuantError, quants

    data = tensor.data.detach().to(torch.float32).cpu().contiguous().numpy()
    if not tensor.quantize or data.ndim < 2 or qtype_name == "F32":
        return data, None, "F32"
    if qtype_name == "F16":
        return data.astype(np.float16), None, "F16"
    qtype = GGMLQuantizationType[qtype_name]
    try:
        return quants.quantize(data, qtype), qtype, qtype_name
    except QuantError:  # rows not a multiple of the block size: F16, as llama-quantize does
        return data.astype(np.float16), None, "F16"


def write_gguf(
    model: GgufModel,
    path: Path,
    type_name: str,
    name: str,
    tokenizer_fields: list[tuple[str, Any, Any, Any]],
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``model`` to ``path`` (through a temporary file in the same directory, renamed
    when complete, so a failed export leaves nothing). Returns what was written: the tensor
    types counted, the bytes, and the tensors that fell back to F16."""
    from gguf import GGUFValueType, GGUFWriter, LlamaFileType

    if type_name not in TYPES:
        raise ExportError(f"unknown type {type_name!r}; choose one of {', '.join(TYPES)}")
    qtype_name, ftype_name = TYPES[type_name]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    counts: dict[str, int] = {}
    fallback: list[str] = []
    try:
        writer = GGUFWriter(tmp, model.arch)
        writer.add_name(name)
        for key, value in model.fields.items():
            getattr(writer, f"add_{key}")(value)
        writer.add_file_type(int(LlamaFileType[ftype_name]))
        for key, value, vtype, sub in tokenizer_fields:
            if vtype == GGUFValueType.ARRAY:
                writer.add_key_value(key, value, vtype, sub_type=sub)
            else:
                writer.add_key_value(key, value, vtype)
        for key, value in (metadata or {}).items():
            writer.add_string(key, value)
        for tensor in model.tensors:
            data, raw, written = _as_type(tensor, qtype_name)
            if tensor.quantize and data.ndim >= 2 and written != qtype_name:
                fallback.append(tensor.name)
            counts[written] = counts.get(written, 0) + 1
            if raw is None:
                writer.add_tensor(tensor.name, data)
            else:
                writer.add_tensor(tensor.name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"tensor_types": counts, "f16_fallback": fallback, "bytes": path.stat().st_size}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
