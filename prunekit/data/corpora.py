"""Text corpora as token windows, for perplexity evaluation and calibration.

A corpus is named either by a corpus id (``wikitext2``, ``ptb``, ``c4``; see :data:`DATASETS`)
and a split, or by the path of a user file. :func:`locate_corpus` resolves where the text comes
from *without reading it* (so ``prunekit validate`` stays fast); :func:`load_documents`,
:func:`corpus_text`, :func:`eval_windows` and :func:`calibration_windows` then read and
tokenize it.

Resolution order for a corpus id:

1. a local data directory: the ``data_dir`` argument if given, else the environment variable
   ``PRUNEKIT_DATA_DIR``. Its layout is that of the project's shared data directory, e.g.
   ``<dir>/wikitext-2-raw-v1/test.jsonl``; each file may also be stored gzip-compressed
   (``test.jsonl.gz``), and a ``.gz`` name may also be found uncompressed.
2. the files bundled with the package (``prunekit/data/bundled/``, see its ``NOTICE.md``):
   WikiText-2 raw test/validation and the 2,000-document C4 file.
3. the Hugging Face hub, through ``datasets.load_dataset`` (only when nothing local exists).

Join rules (how the documents of a split become the one evaluation text):

* ``wikitext2``: every row, empty rows included, joined with ``"\\n\\n"`` (the GPTQ / SparseGPT
  / Wanda / Probe Pruning convention).
* ``ptb``: every row (a line of the file, stripped, as the Hugging Face ``ptb_text_only``
  loader yields it) joined with ``" "`` (the GPTQ convention).
* ``c4``: documents joined with ``" "`` (the GPTQ convention).
* a user ``.jsonl`` file: rows joined with ``"\\n\\n"``; a plain-text file is one document.

Splits of ``c4``: the local/bundled file holds 2,000 C4 documents; ``validation`` is documents
0-999 (evaluation) and ``train`` documents 1000-1999 (calibration), so the two never overlap.
The hub fallback loads ``allenai/c4`` shards instead: ``validation`` = the first 1,100
documents of ``en/c4-validation.00000-of-00008.json.gz`` (the SparseGPT/Wanda evaluation set),
``train`` = ``en/c4-train.00000-of-01024.json.gz``.

Tokenization is memoized inside the process, per tokenizer (class, ``name_or_path``, vocabulary
size, GGUF file) and per source (kind, location, split, text field, file size and mtime).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import DataError, did_you_mean
from prunekit.registry import get_registry

__all__ = [
    "sequence_bos",
    "BUNDLED_DIR",
    "DATASETS",
    "registered_corpora",
    "DATA_DIR_ENV",
    "CorpusSource",
    "DatasetInfo",
    "HubSpec",
    "SplitInfo",
    "calibration_windows",
    "clear_caches",
    "corpus_text",
    "eval_windows",
    "start_with_bos",
    "load_documents",
    "locate_corpus",
    "source_sha256",
    "token_stream",
]

#: Environment variable naming a local data directory (layout of the shared data directory).
DATA_DIR_ENV = "PRUNEKIT_DATA_DIR"

#: Directory of the data files shipped inside the package.
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"

_KINDS = ("local", "bundled", "hub", "file")
_SAMPLINGS = ("sequential", "random")


# --------------------------------------------------------------------------------------------
# Registry of known corpora
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSpec:
    """How to load one split from the Hugging Face hub with ``datasets.load_dataset``.

    ``path``/``name``/``split`` are passed to ``load_dataset``; ``data_files`` (if set) selects
    single files of a large dataset; ``limit`` keeps only the first ``limit`` rows.
    """

    path: str
    name: str | None
    split: str
    text_field: str
    data_files: str | None = None
    limit: int | None = None

    @property
    def location(self) -> str:
        """A human-readable hub id, e.g. ``wikitext/wikitext-2-raw-v1``."""
        loc = self.path if self.name is None else f"{self.path}/{self.name}"
        if self.data_files is not None:
            loc += f":{self.data_files}"
        return loc


@dataclass(frozen=True)
class SplitInfo:
    """One split of a known corpus.

    Attributes:
        file: path of the local/bundled file relative to a data directory (``None``: the split
            exists only on the hub).
        text_field: JSON-lines field holding the text; ``None`` for a plain-text file read one
            row per line (each line stripped).
        doc_range: ``(start, stop)``: the split is ``documents[start:stop]`` of the file.
        hub: where the split lives on the Hugging Face hub (``None``: nowhere).
    """

    file: str | None
    text_field: str | None
    doc_range: tuple[int, int] | None = None
    hub: HubSpec | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """A known corpus id.

    Attributes:
        id: the corpus id used in recipes (``wikitext2``, ``ptb``, ``c4``).
        description: one line for docs and error messages.
        splits: the splits, by name.
        default_split: the split used for evaluation when none is given.
        calibration_split: the split recommended for calibration.
        join: separator placed between rows to build the evaluation text.
        calibration: ``"documents"`` (sample a document, then a window inside it: the C4
            protocol) or ``"stream"`` (random windows over the joined token stream).
        licence: licence of the text.
    """

    id: str
    description: str
    splits: Mapping[str, SplitInfo]
    default_split: str
    calibration_split: str
    join: str
    calibration: str
    licence: str
    aliases: tuple[str, ...] = field(default=())


_WIKITEXT_HUB = ("wikitext", "wikitext-2-raw-v1")
_C4_VAL_SHARD = "en/c4-validation.00000-of-00008.json.gz"
_C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"

#: The built-in corpora (``DATASETS[id].splits`` lists their splits), registered by the
#: built-in data plugin (:mod:`prunekit.data.builtin`) like any plugin's corpus; what a recipe
#: can name is :func:`registered_corpora`.
DATASETS: dict[str, DatasetInfo] = {
    "wikitext2": DatasetInfo(
        id="wikitext2",
        description="WikiText-2, raw text (wikitext-2-raw-v1), rows joined with '\\n\\n'",
        splits={
            "test": SplitInfo(
                "wikitext-2-raw-v1/test.jsonl",
                "text",
                hub=HubSpec(*_WIKITEXT_HUB, split="test", text_field="text"),
            ),
            "validation": SplitInfo(
                "wikitext-2-raw-v1/validation.jsonl",
                "text",
                hub=HubSpec(*_WIKITEXT_HUB, split="validation", text_field="text"),
            ),
            "train": SplitInfo(
                None, "text", hub=HubSpec(*_WIKITEXT_HUB, split="train", text_field="text")
            ),
        },
        default_split="test",
        calibration_split="validation",
        join="\n\n",
        calibration="stream",
        licence="CC BY-SA 3.0 and GFDL",
        aliases=("wikitext", "wikitext-2", "wikitext-2-raw-v1", "wiki2"),
    ),
    "ptb": DatasetInfo(
        id="ptb",
        description="Penn Treebank (Mikolov's preprocessed text), rows joined with ' '",
        splits={
            "validation": SplitInfo(
                "ptb/ptb.valid.txt",
                None,
                hub=HubSpec("ptb_text_only", "penn_treebank", "validation", "sentence"),
            ),
            "test": SplitInfo(
                None, "sentence", hub=HubSpec("ptb_text_only", "penn_treebank", "test", "sentence")
            ),
            "train": SplitInfo(
                None,
                "sentence",
                hub=HubSpec("ptb_text_only", "penn_treebank", "train", "sentence"),
            ),
        },
        default_split="validation",
        calibration_split="validation",
        join=" ",
        calibration="stream",
        licence="LDC user agreement (Treebank-3, LDC99T42); research evaluation only",
        aliases=("ptb_text_only", "penn_treebank"),
    ),
    "c4": DatasetInfo(
        id="c4",
        description=(
            "C4 English, 2,000 documents: 'validation' = docs 0-999 (evaluation), "
            "'train' = docs 1000-1999 (calibration); documents joined with ' '"
        ),
        splits={
            "validation": SplitInfo(
                "c4/c4_validation_2k.jsonl.gz",
                "text",
                doc_range=(0, 1000),
                hub=HubSpec(
                    "allenai/c4",
                    None,
                    "validation",
                    "text",
                    data_files=_C4_VAL_SHARD,
                    limit=1100,
                ),
            ),
            "train": SplitInfo(
                "c4/c4_validation_2k.jsonl.gz",
                "text",
                doc_range=(1000, 2000),
                hub=HubSpec("allenai/c4", None, "train", "text", data_files=_C4_TRAIN_SHARD),
            ),
        },
        default_split="validation",
        calibration_split="train",
        join=" ",
        calibration="documents",
        licence="ODC-BY 1.0 (and the Common Crawl terms of use)",
        aliases=("allenai/c4", "c4-en"),
    ),
}


def registered_corpora() -> dict[str, DatasetInfo]:
    """Every corpus a recipe can name, by id: the registered ones (kind ``corpus``: the
    built-ins of :data:`DATASETS` and those plugins register with
    ``prunekit_register_corpora``)."""
    return {e.name: e.factory for e in get_registry().entries("corpus")}


def _aliases(known: Mapping[str, DatasetInfo]) -> dict[str, str]:
    return {a: info.id for info in known.values() for a in info.aliases}


# --------------------------------------------------------------------------------------------
# Locating a corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSource:
    """Where a corpus comes from, resolved without reading it.

    Attributes:
        dataset: corpus id (a key of :data:`DATASETS`), or ``None`` for a user file.
        split: split name (``"all"`` for a user file).
        kind: ``"local"`` (data directory), ``"bundled"`` (inside the package), ``"hub"``
            (Hugging Face hub) or ``"file"`` (a user file).
        location: file path, or hub id such as ``wikitext/wikitext-2-raw-v1``.
        text_field: JSON-lines field holding the text; ``None`` for plain text.
    """

    dataset: str | None
    split: str
    kind: str
    location: str
    text_field: str | None

    def describe(self) -> str:
        """A short description for messages, e.g. ``wikitext2/test (local file /x/test.jsonl)``."""
        if self.kind == "file":
            return f"file {self.location}"
        where = "hub dataset" if self.kind == "hub" else f"{self.kind} file"
        return f"{self.dataset}/{self.split} ({where} {self.location})"


def _gz_variants(rel: str) -> tuple[str, str]:
    """The name as given first, then its ``.gz`` (or un-``.gz``) twin."""
    return (rel, rel[:-3]) if rel.endswith(".gz") else (rel, rel + ".gz")


def _find_in(directory: Path, rel: str) -> Path | None:
    for name in _gz_variants(rel):
        p = directory / name
        if p.is_file():
            return p
    return None


def _local_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        if not d.is_dir():
            raise DataError(
                f"data directory {str(d)!r} does not exist or is not a directory; "
                "check the data_dir setting (it should be laid out like "
                "<dir>/wikitext-2-raw-v1/test.jsonl)"
            )
        return d
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        d = Path(env).expanduser()
        if not d.is_dir():
            raise DataError(
                f"{DATA_DIR_ENV}={env!r} is not a directory; point it at a local data "
                "directory laid out like <dir>/wikitext-2-raw-v1/test.jsonl, or unset it to use "
                "the bundled data"
            )
        return d
    return None


def _resolve_dataset_id(dataset: str) -> DatasetInfo:
    known = registered_corpora()
    aliases = _aliases(known)
    key = str(dataset).strip()
    key = aliases.get(key.lower(), key if key in known else key.lower())
    if key in known:
        return known[key]
    listed = ", ".join(f"{k} (splits: {', '.join(v.splits)})" for k, v in known.items())
    raise DataError(
        f"unknown dataset {dataset!r}{did_you_mean(dataset, [*known, *aliases])}; "
        f"known datasets: {listed or '(none: no corpus is registered)'}; or give a file with "
        "`path:` (.txt, .jsonl, .jsonl.gz), or install a plugin that registers the corpus "
        "(prunekit_register_corpora)"
    )


def _is_jsonl_name(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith((".jsonl", ".json"))


def locate_corpus(
    dataset: str | None = None,
    split: str | None = None,
    path: str | os.PathLike[str] | None = None,
    text_field: str = "text",
    data_dir: str | os.PathLike[str] | None = None,
) -> CorpusSource:
    """Resolve where a corpus comes from, without reading it.

    Args:
        dataset: a corpus id of :data:`DATASETS` (``wikitext2``, ``ptb``, ``c4``).
        split: split of ``dataset``; ``None`` picks the dataset's default (evaluation) split.
        path: a user file; wins over ``dataset``. ``.jsonl`` / ``.json`` (JSON lines, optionally
            ``.gz``) read field ``text_field`` of every row; any other file (``.txt``, optionally
            ``.gz``) is one document, the whole file.
        text_field: field of a user JSON-lines file holding the text.
        data_dir: local data directory; defaults to ``$PRUNEKIT_DATA_DIR``.

    Returns:
        the :class:`CorpusSource`; the hub is never contacted here.

    Raises:
        DataError: unknown dataset or split, missing file, bad data directory.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            what = "is a directory, not a file" if p.is_dir() else "does not exist"
            raise DataError(
                f"corpus file {str(p)!r} {what}; check the `path:` setting "
                f"(relative paths are taken from the current directory {os.getcwd()!r})"
            )
        jsonl = _is_jsonl_name(p)
        return CorpusSource(
            dataset=None,
            split=split or "all",
            kind="file",
            location=str(p.resolve()),
            text_field=text_field if jsonl else None,
        )
    if dataset is None:
        raise DataError(
            f"no corpus given: set `dataset:` (one of {', '.join(registered_corpora())}) or `path:` "
            "(a .txt or .jsonl file)"
        )
    info = _resolve_dataset_id(dataset)
    split = info.default_split if split is None else str(split).strip()
    if split not in info.splits:
        raise DataError(
            f"dataset {info.id!r} has no split {split!r}{did_you_mean(split, info.splits)}; "
            f"its splits are: {', '.join(info.splits)} (default: {info.default_split})"
        )
    spec = info.splits[split]
    if spec.file is not None:
        local = _local_data_dir(data_dir)
        if local is not None:
            found = _find_in(local, spec.file)
            if found is not None:
                return CorpusSource(info.id, split, "local", str(found.resolve()), spec.text_field)
        found = _find_in(BUNDLED_DIR, spec.file)
        if found is not None:
            return CorpusSource(info.id, split, "bundled", str(found), spec.text_field)
    if spec.hub is None:  # pragma: no cover - every split without a file has a hub spec
        raise DataError(f"no local file for {info.id}/{split} and no hub source known")
    return CorpusSource(info.id, split, "hub", spec.hub.location, spec.hub.text_field)


# --------------------------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------------------------


class _LRU:
    """A tiny least-recently-used cache."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        if key not in self._data:
            return None
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key: Any, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


_DOCS_CACHE = _LRU(8)
_STREAM_CACHE = _LRU(8)
_DOC_TOKENS_CACHE = _LRU(8)
_SHA_CACHE = _LRU(64)


def clear_caches() -> None:
    """Forget every memoized document list, token stream and file hash."""
    for cache in (_DOCS_CACHE, _STREAM_CACHE, _DOC_TOKENS_CACHE, _SHA_CACHE):
        cache.clear()


def _file_key(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return (path, st.st_mtime_ns, st.st_size)


def _source_key(source: CorpusSource) -> tuple[Any, ...]:
    if source.kind == "hub":
        ident: tuple[Any, ...] = (source.location,)
    else:
        try:
            ident = _file_key(source.location)
        except OSError as exc:
            raise DataError(
                f"cannot read {source.describe()}: {exc}; check that the file still exists"
            ) from exc
    return (source.kind, source.dataset, source.split, source.text_field, *ident)


@contextmanager
def _open_text(path: Path) -> Iterator[Any]:
    """Open a (possibly gzip-compressed) UTF-8 text file, turning OS errors into DataError."""
    try:
        if path.name.endswith(".gz"):
            fh = gzip.open(path, "rt", encoding="utf-8-sig")
        else:
            fh = open(path, encoding="utf-8-sig")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise DataError(f"cannot open {str(path)!r}: {exc}") from exc
    try:
        yield fh
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"cannot read {str(path)!r}: {exc}; the file may be truncated or not gzip data"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not UTF-8 text: {exc}") from exc
    finally:
        fh.close()


def json_records(path: Path, expected: str = "a JSON object") -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-empty line of a JSON-lines file (optionally .gz);
    a line that is not a JSON object is a DataError naming the file and line."""
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); a JSON-lines file needs one "
                    "JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected {expected}, got {type(row).__name__}")
            yield lineno, row


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    return list(_iter_jsonl(path, text_field))


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for lineno, row in json_records(path, f"a JSON object with a {text_field!r} field"):
        if text_field not in row:
            present = ", ".join(repr(k) for k in row) or "none"
            raise DataError(
                f"{path}:{lineno}: row has no field {text_field!r}"
                f"{did_you_mean(text_field, row)}; fields present: {present}; set "
                "`text_field:` to the field that holds the text"
            )
        value = row[text_field]
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{lineno}: field {text_field!r} is {type(value).__name__}, "
                "expected a string"
            )
        yield value


def check_head(source: CorpusSource, rows: int = 64) -> None:
    """Read the first ``rows`` rows of a local JSON-lines corpus and raise the DataError that
    loading it would raise there (not JSON, not an object, no text field, not UTF-8, not gzip):
    ``validate`` reports a malformed file before any weight loads, not at evaluation. A damaged
    row further down is still found when the corpus is read. Bundled and hub corpora are not
    read here."""
    if source.kind not in ("file", "local") or not source.text_field:
        return
    path = Path(source.location)
    if not _is_jsonl_name(path):
        return
    for i, _ in enumerate(_iter_jsonl(path, source.text_field)):
        if i + 1 >= rows:
            break


def _read_lines(path: Path) -> list[str]:
    """Rows of a line-per-row text file, each stripped (like the HF ``ptb_text_only`` loader)."""
    with _open_text(path) as fh:
        return [line.strip() for line in fh]


def _read_whole(path: Path) -> str:
    with _open_text(path) as fh:
        return fh.read()


def _load_hub(source: CorpusSource) -> list[str]:
    assert source.dataset is not None
    info = registered_corpora()[source.dataset]
    spec = info.splits[source.split].hub
    assert spec is not None
    try:
        import datasets  # heavy; only imported when the hub is needed

        kwargs: dict[str, Any] = {"split": spec.split}
        if spec.data_files is not None:
            kwargs["data_files"] = {spec.split: spec.data_files}
        ds = datasets.load_dataset(spec.path, spec.name, **kwargs)
        if spec.limit is not None:
            ds = ds.select(range(min(spec.limit, len(ds))))
        rows = list(ds[spec.text_field])
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear user error
        rel = info.splits[source.split].file
        hint = (
            f"or copy the file to <dir>/{rel} and set {DATA_DIR_ENV}=<dir>"
            if rel
            else "or use a split that is available offline: "
            + ", ".join(s for s, i in info.splits.items() if i.file)
        )
        raise DataError(
            f"could not load {source.dataset}/{source.split} from the Hugging Face hub "
            f"({spec.location}): {type(exc).__name__}: {exc}. No local copy was found "
            f"(neither in {DATA_DIR_ENV} / data_dir nor bundled with prunekit). Check the "
            f"network or the hub cache (HF_DATASETS_OFFLINE), {hint}"
        ) from exc
    return [str(r) if r is not None else "" for r in rows]


def load_documents(source: CorpusSource) -> list[str]:
    """Read the raw documents (rows) of a corpus, in order.

    For ``c4`` the rows are the split's slice of the file: ``validation`` = documents 0-999,
    ``train`` = documents 1000-1999 (so calibration and evaluation never overlap). A plain-text
    user file is one document. Results are memoized per file (size and mtime); a new list is
    returned each time.

    Raises:
        DataError: unreadable file, bad JSON line, missing text field, hub unreachable.
    """
    key = _source_key(source)
    cached = _DOCS_CACHE.get(key)
    if cached is not None:
        return list(cached)
    if source.kind == "hub":
        docs = _load_hub(source)
    elif source.kind == "file":
        p = Path(source.location)
        docs = _read_jsonl(p, source.text_field) if source.text_field else [_read_whole(p)]
    elif source.kind in ("local", "bundled"):
        info = registered_corpora().get(source.dataset)
        if info is None or source.split not in info.splits:
            raise DataError(f"unknown corpus {source.dataset}/{source.split} in {source!r}")
        spec = info.splits[source.split]
        p = Path(source.location)
        docs = _read_jsonl(p, source.text_field) if source.text_field else _read_lines(p)
        if spec.doc_range is not None:
            start, stop = spec.doc_range
            if len(docs) < stop:
                raise DataError(
                    f"{p} has {len(docs)} documents, but split {source.dataset}/{source.split} "
                    f"is documents {start}-{stop - 1}; use the original "
                    f"{spec.file} (2,000 documents) or give your own file with `path:`"
                )
            docs = docs[start:stop]
    else:
        raise DataError(f"unknown corpus source kind {source.kind!r}; expected one of {_KINDS}")
    _DOCS_CACHE.put(key, docs)
    return list(docs)


def max_tokens(source: CorpusSource) -> int | None:
    """An upper bound on the tokens any tokenizer can make of the corpus, from file sizes
    alone (nothing is read): ``validate`` refuses a request the text cannot hold before any
    weight loads. None for a hub dataset (not checked offline) or when no bound is known.

    Every byte-level or byte-fallback tokenizer makes at most one token per UTF-8 byte; the
    joined text is at most twice the file's bytes (a one-byte line end can become ``"\n\n"``);
    plus one BOS. A gzip file's size is its trailer's uncompressed size.
    """
    if source.kind == "hub":
        return None
    path = Path(source.location)
    try:
        size = path.stat().st_size
        if path.suffix == ".gz":
            if size < 18:  # not even a gzip header and trailer: nothing in it
                return 0
            if size >= (1 << 32) // 1032:  # the trailer holds the size modulo 2**32
                return None
            with open(path, "rb") as handle:
                handle.seek(-4, os.SEEK_END)
                size = int.from_bytes(handle.read(4), "little")
    except OSError:
        return None
    return 2 * size + 1


def _join_rule(source: CorpusSource) -> str:
    info = registered_corpora().get(source.dataset) if source.dataset is not None else None
    if info is not None:
        return info.join
    return "\n\n"


def corpus_text(source: CorpusSource, documents: list[str] | None = None) -> str:
    """The evaluation text: the documents joined by the dataset's rule.

    ``wikitext2``: ``"\\n\\n".join(rows)`` over every row, empty ones included. ``ptb`` and
    ``c4``: ``" ".join(rows)``. A user JSON-lines file: ``"\\n\\n".join(rows)``; a plain-text
    file: its whole content. Pass ``documents`` to skip reading them again.
    """
    docs = load_documents(source) if documents is None else documents
    return _join_rule(source).join(docs)


def source_sha256(source: CorpusSource) -> str | None:
    """sha256 of the corpus file exactly as stored (compressed bytes for ``.gz``).

    ``None`` for a hub source. Memoized per path, size and mtime.
    """
    if source.kind == "hub":
        return None
    key = _source_key(source)
    cached = _SHA_CACHE.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    try:
        with open(source.location, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise DataError(f"cannot read {source.describe()}: {exc}") from exc
    digest = h.hexdigest()
    _SHA_CACHE.put(key, digest)
    return digest


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


@contextmanager
def _quiet_length_warning() -> Iterator[None]:
    """Silence transformers' "sequence length is longer than the maximum" warning."""
    logger = logging.getLogger("transformers.tokenization_utils_base")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _tokenizer_key(tokenizer: Any) -> tuple[Any, ...] | None:
    """Identity of a tokenizer for memoization; ``None`` (no memoization) if it has no name."""
    name = getattr(tokenizer, "name_or_path", None)
    if not name:
        return None
    try:
        size: Any = len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
    init_kwargs = getattr(tokenizer, "init_kwargs", None)
    gguf = init_kwargs.get("gguf_file") if isinstance(init_kwargs, dict) else None
    return (type(tokenizer).__qualname__, str(name), size, gguf)


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor, with the tokenizer's default special tokens."""
    with _quiet_length_warning():
        enc = tokenizer(text)
    if isinstance(enc, Mapping):
        ids = enc["input_ids"]
    else:
        ids = getattr(enc, "input_ids", enc)
    t = torch.as_tensor(ids, dtype=torch.long)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise DataError(
            f"the tokenizer returned input_ids of shape {tuple(t.shape)} for one text; "
            "expected a flat list of token ids"
        )
    return t


def token_stream(tokenizer: Any, source: CorpusSource) -> torch.Tensor:
    """The whole tokenized evaluation text of ``source`` (:func:`corpus_text`), 1-D int64,
    memoized per tokenizer and source."""
    return _token_stream(tokenizer, source)


def _token_stream(tokenizer: Any, source: CorpusSource) -> torch.Tensor:
    """The tokenized evaluation text of ``source`` (memoized per tokenizer and source)."""
    tok_key = _tokenizer_key(tokenizer)
    key = None if tok_key is None else (tok_key, _source_key(source))
    if key is not None:
        cached = _STREAM_CACHE.get(key)
        if cached is not None:
            return cached
    stream = _encode(tokenizer, corpus_text(source))
    if key is not None:
        _STREAM_CACHE.put(key, stream)
    return stream


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {value}")
    return value


def _random_starts(n_tokens: int, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """``count`` offsets uniform in ``[0, n_tokens - seq_len)`` (0 when that range is empty)."""
    gen = torch.Generator().manual_seed(int(seed))
    high = n_tokens - seq_len
    if high <= 0:
        return torch.zeros(count, dtype=torch.long)
    return torch.randint(0, high, (count,), generator=gen, dtype=torch.long)


def _gather(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    return stream[starts[:, None] + torch.arange(seq_len, dtype=torch.long)].contiguous()


def eval_windows(
    tokenizer: Any,
    source: CorpusSource,
    seq_len: int,
    windows: int | str = "all",
    sampling: str = "sequential",
    seed: int = 0,
    batch_size: int | None = None,
    bos_id: int | None = None,
) -> torch.LongTensor:
    """Token windows for perplexity evaluation, shape ``[N, seq_len]``, int64.

    The evaluation text (:func:`corpus_text`) is tokenized once with ``tokenizer(text)`` (the
    tokenizer's default special tokens, e.g. one BOS at the start).

    Args:
        tokenizer: a Hugging Face tokenizer, or any callable returning ``{"input_ids": [...]}``.
        source: from :func:`locate_corpus`.
        seq_len: tokens per window (>= 2).
        windows: ``"all"`` or an int N. ``"sequential"``: ``"all"`` is every full window (the
            last partial one is dropped), N is the first N. ``"random"``: ``"all"`` means
            ``floor(n_tokens / seq_len)`` windows.
        sampling: ``"sequential"``: consecutive, non-overlapping windows from token 0.
            ``"random"``: the Probe Pruning protocol: each window starts at an offset drawn
            uniformly from ``[0, n_tokens - seq_len)`` with a ``torch.Generator`` seeded by
            ``seed``; windows may overlap (drawn with replacement).
        seed: seed of the random sampling.
        batch_size: if given, N is rounded down to a multiple of it (``drop_last``: the last
            partial batch is dropped, as a ``DataLoader(drop_last=True)`` would).
        bos_id: every window starts with this token (:func:`start_with_bos`); None: the
            windows are cut from the token stream as they are (the reference protocol).

    Raises:
        DataError: bad arguments, or too few tokens for the requested windows.
    """
    seq_len = _check_int("seq_len", seq_len, 2)
    if sampling not in _SAMPLINGS:
        raise DataError(
            f"unknown sampling {sampling!r}{did_you_mean(sampling, _SAMPLINGS)}; "
            f"use one of: {', '.join(_SAMPLINGS)}"
        )
    if isinstance(windows, str):
        if windows != "all":
            raise DataError(f"windows must be 'all' or a positive integer, got {windows!r}")
    else:
        windows = _check_int("windows", windows, 1)
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)

    stream = _token_stream(tokenizer, source)
    n_tokens = int(stream.numel())
    available = n_tokens // seq_len
    if available < 1:
        raise DataError(
            f"{source.describe()} has only {n_tokens} tokens with this tokenizer, fewer than "
            f"one window of seq_len={seq_len}; use a smaller seq_len or a larger corpus"
        )
    count = available if windows == "all" else int(windows)
    if count > available:
        raise DataError(
            f"asked for {count} windows of {seq_len} tokens ({count * seq_len} tokens), but "
            f"{source.describe()} has {n_tokens} tokens, i.e. at most {available} windows; "
            f"use windows: all or at most {available}, or a smaller seq_len"
        )
    if sampling == "sequential":
        out = stream[: count * seq_len].view(count, seq_len)
    else:
        out = _gather(stream, _random_starts(n_tokens, seq_len, count, seed), seq_len)
    if batch_size is not None:
        kept = (count // batch_size) * batch_size
        if kept == 0:
            raise DataError(
                f"{count} windows make no full batch of batch_size={batch_size} (the last "
                "partial batch is dropped); use a smaller batch_size or more windows"
            )
        out = out[:kept]
    return start_with_bos(out.clone(), bos_id)


def _doc_tokens(tokenizer: Any, source: CorpusSource) -> dict[int, torch.Tensor]:
    """Per-document token memo (index -> ids) for ``source``; shared per tokenizer and source."""
    tok_key = _tokenizer_key(tokenizer)
    if tok_key is None:
        return {}
    key = (tok_key, _source_key(source))
    memo = _DOC_TOKENS_CACHE.get(key)
    if memo is None:
        memo = {}
        _DOC_TOKENS_CACHE.put(key, memo)
    return memo


def _uses_documents(source: CorpusSource) -> bool:
    info = registered_corpora().get(source.dataset) if source.dataset is not None else None
    if info is not None:
        return info.calibration == "documents"
    return source.kind == "file" and source.text_field is not None


def calibration_windows(
    tokenizer: Any,
    source: CorpusSource,
    samples: int,
    seq_len: int,
    seed: int = 0,
    bos_id: int | None = None,
) -> torch.LongTensor:
    """Random calibration windows, shape ``[samples, seq_len]``, int64.

    ``bos_id``: every window starts with this token (see :func:`start_with_bos`).

    Multi-document corpora (``c4``, user JSON-lines files) follow the GPTQ/SparseGPT/Wanda C4
    protocol: ``samples`` times, draw a document index uniformly (``torch.Generator`` seeded by
    ``seed``) until a document tokenizes to *more* than ``seq_len`` tokens, then take the
    window of exactly ``seq_len`` tokens starting at an offset uniform in
    ``[0, len - seq_len)``. Each document is tokenized at most once. For ``c4`` use split
    ``train`` (documents 1000-1999, disjoint from the ``validation`` evaluation documents).

    Single-text corpora (``wikitext2``, ``ptb``, plain-text files) take ``samples`` random
    windows over the joined token stream instead (offsets uniform in ``[0, n - seq_len)``).

    Raises:
        DataError: bad arguments, or no document / text long enough for one window.
    """
    samples = _check_int("samples", samples, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    gen_seed = int(seed)
    if not _uses_documents(source):
        stream = _token_stream(tokenizer, source)
        n_tokens = int(stream.numel())
        if n_tokens < seq_len:
            raise DataError(
                f"{source.describe()} has only {n_tokens} tokens with this tokenizer, fewer "
                f"than one calibration window of seq_len={seq_len}; use a smaller seq_len"
            )
        starts = _random_starts(n_tokens, seq_len, samples, gen_seed)
        _warn_repeated_text([(0, int(j)) for j in starts], seq_len, source, n_tokens=n_tokens)
        return start_with_bos(_gather(stream, starts, seq_len), bos_id)

    docs = load_documents(source)
    n_docs = len(docs)
    if n_docs == 0:
        raise DataError(f"{source.describe()} has no documents to calibrate on")
    memo = _doc_tokens(tokenizer, source)
    gen = torch.Generator().manual_seed(gen_seed)
    too_short: set[int] = set()
    out = torch.empty(samples, seq_len, dtype=torch.long)
    places: list[tuple[int, int]] = []
    for s in range(samples):
        while True:
            i = int(torch.randint(0, n_docs, (1,), generator=gen))
            ids = memo.get(i)
            if ids is None:
                ids = _encode(tokenizer, docs[i])
                memo[i] = ids
            if ids.numel() > seq_len:
                break
            too_short.add(i)
            if len(too_short) == n_docs:
                longest = max(int(t.numel()) for t in memo.values())
                raise DataError(
                    f"no document of {source.describe()} is longer than seq_len={seq_len} "
                    f"tokens (all {n_docs} tried; the longest has {longest}); use a smaller "
                    "seq_len or a corpus with longer documents"
                )
        j = int(torch.randint(0, int(ids.numel()) - seq_len, (1,), generator=gen))
        out[s] = ids[j : j + seq_len]
        places.append((i, j))
    _warn_repeated_text(places, seq_len, source)
    return start_with_bos(out, bos_id)


#: :func:`calibration_windows` warns when less than this share of the tokens it draws is
#: distinct text (windows drawn with replacement from a bounded corpus overlap).
DISTINCT_SHARE_WARNING = 0.5


def distinct_tokens(places: list[tuple[int, int]], seq_len: int) -> int:
    """The number of distinct tokens among windows of ``seq_len`` tokens cut at ``places``,
    each a ``(document, offset)`` pair (a single-text corpus is document 0): the length of the
    union of the intervals ``[offset, offset + seq_len)`` of each document."""
    by_doc: dict[int, list[int]] = {}
    for d, j in places:
        by_doc.setdefault(d, []).append(j)
    distinct = 0
    for offsets in by_doc.values():
        # the windows have one length: in offset order each adds what lies past the previous
        starts = sorted(offsets)
        distinct += seq_len + sum(min(seq_len, b - a) for a, b in pairwise(starts))
    return distinct


def distinct_share(places: list[tuple[int, int]], seq_len: int) -> float:
    """:func:`distinct_tokens` over the tokens drawn: 1.0 when no two windows overlap,
    ``1 / len(places)`` when all are the same window."""
    return distinct_tokens(places, seq_len) / (len(places) * seq_len) if places else 1.0


def _warn_repeated_text(
    places: list[tuple[int, int]], seq_len: int, source: CorpusSource, n_tokens: int | None = None
) -> None:
    """Warn when the calibration windows mostly repeat each other's text, so that asking for
    more windows no longer gives more calibration data (the numbers are not changed)."""
    share = distinct_share(places, seq_len)
    if share >= DISTINCT_SHARE_WARNING:
        return
    if n_tokens is not None:
        pool = f"its {n_tokens:,} tokens"
    else:
        pool = f"{len({d for d, _ in places})} distinct documents longer than {seq_len} tokens"
    warnings.warn(
        f"calibration: the {len(places)} windows of {seq_len} tokens drawn from "
        f"{source.describe()} hold only {share:.0%} distinct text (they are drawn with "
        f"replacement from {pool}), so more windows mostly repeat the same text; use fewer "
        "calibration.samples or a larger corpus (calibration.path)",
        RuntimeWarning,
        stacklevel=3,
    )


def start_with_bos(windows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """``windows`` with every row starting with ``bos_id``: ``[BOS, w_0, ..., w_{T-2}]`` (the
    same length and the same random draws; a row that already starts with it is kept).

    For models that need their BOS attention sink at position 0 of every sequence (Gemma-3:
    WikiText-2 perplexity about 6x worse without it); ``None`` returns ``windows`` as they are.
    """
    if bos_id is None:
        return windows
    shifted = torch.cat([torch.full_like(windows[:, :1], bos_id), windows[:, :-1]], dim=1)
    keep = (windows[:, :1] == bos_id).expand_as(windows)
    return torch.where(keep, windows, shifted)


def locate_calibration_corpus(
    dataset: str | None = None,
    split: str | None = None,
    path: str | os.PathLike[str] | None = None,
    text_field: str = "text",
    data_dir: str | os.PathLike[str] | None = None,
) -> CorpusSource:
    """:func:`locate_corpus` for calibration: without a split, the dataset's calibration split.

    For ``c4`` that is ``train`` (documents 1000-1999 of the local file), so calibration never
    overlaps the ``validation`` documents used for evaluation.
    """
    if split is None and dataset is not None and path is None:
        split = _resolve_dataset_id(dataset).calibration_split
    return locate_corpus(dataset, split, path, text_field, data_dir=data_dir)


def sequence_bos(setting, adapter, tokenizer) -> int | None:
    """The BOS id every window starts with, or None.

    :param setting: a recipe's ``bos``: ``"auto"`` (when the adapter ``needs_bos``), ``True``
        or ``False``.
    :param adapter: the model adapter (class or instance), or None.
    """
    wanted = bool(getattr(adapter, "needs_bos", False)) if setting == "auto" else bool(setting)
    bos = getattr(tokenizer, "bos_token_id", None) if wanted else None
    if wanted and bos is None and setting is True:
        raise DataError(
            "bos: true, but the tokenizer has no BOS token to start windows with; "
            "set bos: false (or auto)"
        )
    return None if bos is None else int(bos)
