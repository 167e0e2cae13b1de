"""Reading a located corpus: its documents (:func:`load_documents`), the one evaluation text
of a split (:func:`corpus_text`, with the split's join rule), a bound on its tokens, and its
sha256, memoized per file (size and mtime)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prunekit.data.sources import (
    _KINDS,
    DATA_DIR_ENV,
    CorpusSource,
    _is_jsonl_name,
    registered_corpora,
)
from prunekit.errors import DataError, did_you_mean


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


class _DuplicateKey(ValueError):
    """A JSON object names a key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def json_records(path: Path, expected: str = "a JSON object") -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-empty line of a JSON-lines file (optionally .gz);
    a line that is not a JSON object is a DataError naming the file and line."""
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_unique_keys)
            except _DuplicateKey as exc:
                raise DataError(
                    f"{path}:{lineno}: key {exc.args[0]!r} appears twice in this record; JSON "
                    "would keep only the last value: remove one of them"
                ) from None
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
