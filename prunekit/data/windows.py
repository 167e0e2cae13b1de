"""Token windows of a corpus: evaluation windows (sequential or the paper's random windows) and
calibration windows (the C4 documents protocol or random windows over the stream), with the
BOS a window starts with. Tokenization is memoized per tokenizer and source."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

import torch

from prunekit.data.reading import (
    _DOC_TOKENS_CACHE,
    _STREAM_CACHE,
    _source_key,
    corpus_text,
    load_documents,
)
from prunekit.data.sources import CorpusSource, registered_corpora
from prunekit.errors import DataError, did_you_mean

logger = logging.getLogger("prunekit.data.corpora")

_SAMPLINGS = ("sequential", "random")


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
