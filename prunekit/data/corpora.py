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

The code lives in :mod:`prunekit.data.sources` (which corpora exist, locating),
:mod:`prunekit.data.reading` (documents and text) and :mod:`prunekit.data.windows` (token
windows); this module gathers their public names.
"""

from __future__ import annotations

from prunekit.data.reading import (
    check_head,
    clear_caches,
    corpus_text,
    json_records,
    load_documents,
    max_tokens,
    source_sha256,
)
from prunekit.data.sources import (
    BUNDLED_DIR,
    DATA_DIR_ENV,
    DATASETS,
    CorpusSource,
    DatasetInfo,
    HubSpec,
    SplitInfo,
    locate_calibration_corpus,
    locate_corpus,
    registered_corpora,
)
from prunekit.data.windows import (
    DISTINCT_SHARE_WARNING,
    calibration_windows,
    distinct_share,
    distinct_tokens,
    eval_windows,
    sequence_bos,
    start_with_bos,
    token_stream,
)

__all__ = [
    "BUNDLED_DIR",
    "CorpusSource",
    "DATASETS",
    "DATA_DIR_ENV",
    "DISTINCT_SHARE_WARNING",
    "DatasetInfo",
    "HubSpec",
    "SplitInfo",
    "calibration_windows",
    "check_head",
    "clear_caches",
    "corpus_text",
    "distinct_share",
    "distinct_tokens",
    "eval_windows",
    "json_records",
    "load_documents",
    "locate_calibration_corpus",
    "locate_corpus",
    "max_tokens",
    "registered_corpora",
    "sequence_bos",
    "source_sha256",
    "start_with_bos",
    "token_stream",
]
