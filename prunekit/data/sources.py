"""Which corpora exist and where a corpus comes from, resolved without reading it (so
``prunekit validate`` stays fast): the registered corpora (:data:`DATASETS` and the plugins'),
and :func:`locate_corpus` (see :mod:`prunekit.data.corpora` for the resolution order)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prunekit.errors import DataError, did_you_mean
from prunekit.registry import get_registry

#: Environment variable naming a local data directory (layout of the shared data directory).
DATA_DIR_ENV = "PRUNEKIT_DATA_DIR"


#: Directory of the data files shipped inside the package.
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


_KINDS = ("local", "bundled", "hub", "file")


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
