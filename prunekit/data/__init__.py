"""Text corpora for perplexity evaluation and calibration (see :mod:`prunekit.data.corpora`)."""

from prunekit.data.corpora import (
    BUNDLED_DIR,
    DATA_DIR_ENV,
    DATASETS,
    CorpusSource,
    DatasetInfo,
    HubSpec,
    SplitInfo,
    calibration_windows,
    clear_caches,
    corpus_text,
    eval_windows,
    load_documents,
    locate_calibration_corpus,
    locate_corpus,
    source_sha256,
    start_with_bos,
)

__all__ = [
    "BUNDLED_DIR",
    "DATASETS",
    "DATA_DIR_ENV",
    "CorpusSource",
    "DatasetInfo",
    "HubSpec",
    "SplitInfo",
    "calibration_windows",
    "clear_caches",
    "corpus_text",
    "eval_windows",
    "load_documents",
    "locate_calibration_corpus",
    "locate_corpus",
    "source_sha256",
    "start_with_bos",
]
