"""``prunekit export``: a saved (pruned) model in the format a serving engine reads.

Today: GGUF for llama.cpp (``to="gguf"``), written with the ``gguf`` package, checked by
llama.cpp itself when asked (:func:`prunekit.export.check.check_gguf`). Every problem that can be
seen before the weights load (no saved model, a dynamic method, an existing output, an unknown
type, no tokenizer) is an :class:`~prunekit.errors.ExportError` raised first; the file is
written under a temporary name and renamed when complete, so a failed export leaves nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunekit.errors import ExportError

__all__ = ["FORMATS", "export", "resolve_source"]

#: the formats ``export`` writes
FORMATS = ("gguf",)
#: the tokenizer choices: a source GGUF's (or the model directory's Hugging Face tokenizer,
#: converted), or none (the file is read by token ids)
VOCABS = ("auto", "none")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot read it ({exc})") from None


def resolve_source(source: str | Path) -> tuple[Path, dict, dict]:
    """``(model directory, its prunekit.json or {}, the run's provenance.json or {})`` of a
    saved model directory or of a run directory that saved one; every refusal before any
    weight loads."""
    path = Path(source)
    if not path.exists():
        raise ExportError(
            f"{path}: no such directory; give a run directory written with "
            "output.save_model: true, or its 'model' subdirectory"
        )
    results = path / "results.json"
    run_dir = None
    if results.is_file():  # a run directory
        run_dir = path
        result = _read_json(results)
        method = result.get("method")
        if result.get("dynamic"):
            raise ExportError(
                f"{path}: method {method!r} is dynamic (it decides its kept units on every "
                "batch), so there is no static pruned model to export; pp-calib (PP's score "
                "decided once from calibration) is its exportable counterpart"
            )
        model_dir = path / "model"
        if not (model_dir / "config.json").is_file():
            raise ExportError(
                f"{path}: the run saved no model; rerun it with "
                "output.save_model: true (or --set output.save_model=true)"
            )
    else:
        model_dir = path
        if not (model_dir / "config.json").is_file():
            raise ExportError(
                f"{path}: no config.json; give a run directory written with "
                "output.save_model: true, or its 'model' subdirectory"
            )
        if (model_dir.parent / "results.json").is_file():
            run_dir = model_dir.parent
    meta_path = model_dir / "prunekit.json"
    meta = _read_json(meta_path) if meta_path.is_file() else {}
    provenance = {}
    if run_dir is not None and (run_dir / "provenance.json").is_file():
        provenance = _read_json(run_dir / "provenance.json")
    return model_dir, meta, provenance


def _source_gguf(meta: dict, provenance: dict) -> Path | str | None:
    """The GGUF file the dense model was loaded from when it is still on this machine, else
    the model alias it came from (whose file can be assembled again), else None."""
    from prunekit.loading import ALIASES

    records = (meta.get("source_model") or {}, provenance.get("model") or {})
    for record in records:
        path = record.get("gguf_path")
        if path and Path(path).is_file():
            return Path(path)
    for record in records:
        if record.get("source") == "alias" and record.get("id") in ALIASES:
            return str(record["id"])
    return None


def _alias_tokenizer_fields(alias: str):
    from prunekit.export.gguf import tokenizer_fields_from_gguf
    from prunekit.loading import alias_gguf

    with alias_gguf(alias) as path:
        return tokenizer_fields_from_gguf(path)


def _default_output(model_dir: Path, type_name: str) -> Path:
    return model_dir.parent / f"{model_dir.name}.{type_name}.gguf"


def export(
    source: str | Path,
    to: str = "gguf",
    type: str = "f16",
    output: str | Path | None = None,
    *,
    force: bool = False,
    tokenizer_from: str | Path | None = None,
    vocab: str = "auto",
    check: bool = False,
    check_windows: int = 4,
    check_tokens: int = 128,
    threads: int | None = None,
) -> dict[str, Any]:
    """Export a saved model (``source``: a run directory or its ``model`` subdirectory) to
    ``to`` (``"gguf"``) with tensor type ``type`` (``f32``, ``f16``, ``bf16``, ``q8_0``,
    ``q5_1``, ``q5_0``, ``q4_1``, ``q4_0``).

    :param output: the file to write (default: beside the model directory,
        ``model.<type>.gguf``); an existing file needs ``force``.
    :param tokenizer_from: a GGUF file whose tokenizer (vocabulary, merges, special tokens,
        chat template) the export carries. Default: the GGUF the dense model was loaded from
        (a model alias), else the model directory's Hugging Face tokenizer (byte-level BPE).
    :param vocab: ``"none"``: write no tokenizer (a file read by token ids).
    :param check: load the file with llama.cpp (``llama-cpp-python``) and compare its logits,
        perplexity and greedy tokens with the model's own on ``check_windows`` windows of
        ``check_tokens`` tokens (:func:`prunekit.export.check.check_gguf`).
    :returns: what was written (path, architecture, type, bytes, tensor types, legalization)
        and, with ``check``, the comparison.
    """
    from prunekit.export.gguf import (
        TYPES,
        no_vocab_fields,
        tokenizer_fields_from_gguf,
        tokenizer_fields_from_hf,
        write_gguf,
    )

    if to not in FORMATS:
        raise ExportError(f"unknown format {to!r}; prunekit exports to {', '.join(FORMATS)}")
    if type not in TYPES:
        raise ExportError(f"unknown type {type!r}; choose one of {', '.join(TYPES)}")
    if vocab not in VOCABS:
        raise ExportError(f"unknown vocab {vocab!r}; choose one of {', '.join(VOCABS)}")
    model_dir, meta, provenance = resolve_source(source)
    out = Path(output) if output is not None else _default_output(model_dir, type)
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force (force=True) to replace it")
    if out.exists() and out.is_dir():
        raise ExportError(f"{out} is a directory; give a file name")
    if check:
        from prunekit.export.check import require_llama_cpp

        require_llama_cpp()
    gguf_source = None
    if vocab == "auto":
        if tokenizer_from is not None:
            gguf_source = Path(tokenizer_from)
            if not gguf_source.is_file():
                raise ExportError(f"--tokenizer-from {gguf_source}: no such file")
        else:
            gguf_source = _source_gguf(meta, provenance)
        if isinstance(gguf_source, str):  # an alias: its GGUF assembled again, then removed
            tokenizer_fields = _alias_tokenizer_fields(gguf_source)
            gguf_source = f"model alias {gguf_source}"
        elif gguf_source is not None:
            tokenizer_fields = tokenizer_fields_from_gguf(gguf_source)
        else:
            tokenizer_fields = None
    else:
        tokenizer_fields = []

    import torch

    from prunekit.pruning.static import load_pruned
    from prunekit.registry import resolve_adapter

    model = load_pruned(str(model_dir), dtype=torch.float32)
    adapter = resolve_adapter(model)
    spec = adapter.gguf_model()  # raises ExportError for shapes the engine cannot hold
    if vocab == "none":
        tokenizer_fields = no_vocab_fields(spec.vocab_size)
    elif tokenizer_fields is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as exc:
            raise ExportError(
                f"{model_dir}: no tokenizer to export ({exc}); pass "
                "--tokenizer-from a GGUF file of the dense model, or --vocab "
                "none"
            ) from None
        tokenizer_fields = tokenizer_fields_from_hf(tokenizer, spec.vocab_size)
    source_name = (
        (meta.get("source_model") or {}).get("name")
        or (provenance.get("model") or {}).get("name")
        or model_dir.name
    )
    method, ratio = meta.get("method"), meta.get("ratio")
    name = source_name if not method else f"{source_name}, {method} at ratio {ratio}"
    from prunekit import __version__

    written = write_gguf(
        spec,
        out,
        type,
        name,
        tokenizer_fields,
        metadata={
            "prunekit.version": __version__,
            "prunekit.method": str(method or "none"),
            "prunekit.ratio": str(ratio if ratio is not None else 0),
        },
    )
    report: dict[str, Any] = {
        "path": str(out),
        "format": to,
        "type": type,
        "arch": spec.arch,
        "name": name,
        "adapter": adapter.name,
        "source": str(model_dir),
        "tokenizer": (
            "none" if vocab == "none" else str(gguf_source) if gguf_source is not None else "hf"
        ),
        "legalization": spec.legalization,
        **written,
    }
    if check:
        from prunekit.export.check import check_gguf

        report["check"] = check_gguf(
            out,
            model,
            adapter,
            windows=check_windows,
            tokens=check_tokens,
            threads=threads,
            text=vocab != "none",
            model_dir=model_dir,
        )
    return report
