"""Multiple-choice tasks: the 7 zero-shot commonsense tasks and user JSON-lines tasks.

A task is a list of :class:`Question`: every answer choice is a ``(context, continuation)``
pair of strings and ``gold`` is the index of the correct choice (one-hot labels for every
task: the reference's PIQA label bug, where both choices get the gold index, is not copied).

Formatting of the built-in tasks follows Probe Pruning's evaluation code (pp-spec section 7.3):

=============  ===========================================  ================================
task           context                                      continuation
=============  ===========================================  ================================
boolq          ``{passage}\\nQuestion: {question}?\\nAnswer:``  ``" yes"`` / ``" no"``
piqa           ``{goal}``                                   ``" " + sol``
hellaswag      cleaned ``{activity_label}: {ctx_a} {Ctx_b}``  ``" " + cleaned ending``
winogrande     sentence up to ``_``, option substituted     ``" " + rest of the sentence``
arc_easy/...   ``Question: {question}\\nAnswer:``             ``" " + choice``
openbookqa     ``{question_stem}``                          ``" " + choice``
=============  ===========================================  ================================

The reference tokenises the continuation on its own with LLaMA's SentencePiece tokenizer,
which puts a word-boundary marker in front of it; prunekit writes that space explicitly into
the continuation, which is what a byte-level BPE tokenizer (SmolLM2, GPT-2, LLaMA-3) needs
for the same text (see :func:`prunekit.evaluation.zeroshot.encode_pair`).

Where the data comes from, per task: a local data directory (``data_dir`` or
``$PRUNEKIT_DATA_DIR``, laid out like the project's shared data directory, e.g.
``<dir>/boolq/validation.jsonl``), else the Hugging Face hub.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.data.reading import _open_text, json_records
from prunekit.data.sources import DATA_DIR_ENV, _find_in, _local_data_dir
from prunekit.errors import DataError, did_you_mean
from prunekit.registry import get_registry

__all__ = [
    "GROUPS",
    "TASKS",
    "JsonlTask",
    "Question",
    "TaskSource",
    "TaskSpec",
    "expand_task_names",
    "load_questions",
    "locate_task",
    "registered_tasks",
]


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: choice ``i`` is ``contexts[i] + continuations[i]``."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    id: str | int | None = None

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.continuations):
            raise ValueError("a question needs one context per continuation")
        if len(self.continuations) < 2:
            raise ValueError("a multiple-choice question needs at least two choices")
        if not 0 <= self.gold < len(self.continuations):
            raise ValueError(
                f"gold index {self.gold} out of range for {len(self.continuations)} choices"
            )

    @property
    def num_choices(self) -> int:
        return len(self.continuations)

    @classmethod
    def shared_context(
        cls, context: str, continuations: Sequence[str], gold: int, id: str | int | None = None
    ) -> Question:
        return cls((context,) * len(continuations), tuple(continuations), gold, id)


# --------------------------------------------------------------------------------------------
# The built-in tasks
# --------------------------------------------------------------------------------------------


def _hub_choices(record: dict) -> tuple[list[str], int]:
    """Choices and gold index from either layout: the shared-data one (``choices`` a list,
    ``gold`` an index) or the Hugging Face one (``choices{text,label}``, ``answerKey``)."""
    choices = record["choices"]
    if isinstance(choices, dict):
        labels = [str(x) for x in choices["label"]]
        return [str(t) for t in choices["text"]], labels.index(str(record["answerKey"]).strip())
    return [str(t) for t in choices], int(record["gold"])


def _boolq(doc: dict) -> Question:
    context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    answer = doc["answer"]
    if isinstance(answer, str):  # some exports store "True"/"False"
        answer = answer.strip().lower() in ("true", "yes", "1")
    return Question.shared_context(context, (" yes", " no"), 0 if answer else 1, doc.get("idx"))


def _piqa(doc: dict) -> Question:
    return Question.shared_context(
        doc["goal"], (" " + doc["sol1"], " " + doc["sol2"]), int(doc["label"]), doc.get("id")
    )


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict) -> Question:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    context = _hellaswag_clean(doc["activity_label"] + ": " + ctx)
    endings = [" " + _hellaswag_clean(e) for e in doc["endings"]]
    return Question.shared_context(context, endings, int(doc["label"]), doc.get("ind"))


def _winogrande(doc: dict) -> Question:
    sentence = doc["sentence"]
    cut = sentence.index("_")
    rest = " " + sentence[cut + 1 :].strip()
    contexts = (sentence[:cut] + doc["option1"], sentence[:cut] + doc["option2"])
    return Question(contexts, (rest, rest), int(doc["answer"]) - 1, doc.get("qID"))


def _arc(doc: dict) -> Question:
    choices, gold = _hub_choices(doc)
    context = f"Question: {doc['question']}\nAnswer:"
    return Question.shared_context(context, [" " + c for c in choices], gold, doc.get("id"))


def _openbookqa(doc: dict) -> Question:
    choices, gold = _hub_choices(doc)
    return Question.shared_context(
        doc["question_stem"], [" " + c for c in choices], gold, doc.get("id")
    )


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: where its split lives (locally and on the hub) and how to format it."""

    name: str
    title: str
    split: str
    file: str  # relative to a local data directory
    hub: tuple[str, str | None, str]  # load_dataset(path, name, split=...)
    build: Callable[[dict], Question]
    labels_file: str | None = None  # PIQA: gold labels in a separate line-aligned file


#: The built-in tasks, registered by the built-in data plugin (:mod:`prunekit.data.builtin`)
#: like any plugin's task; what a recipe can name is :func:`registered_tasks`.
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "boolq",
            "BoolQ",
            "validation",
            "boolq/validation.jsonl",
            ("google/boolq", None, "validation"),
            _boolq,
        ),
        TaskSpec(
            "piqa",
            "PIQA",
            "validation",
            "piqa/valid.jsonl",
            ("baber/piqa", None, "validation"),
            _piqa,
            labels_file="piqa/valid-labels.lst",
        ),
        TaskSpec(
            "hellaswag",
            "HellaSwag",
            "validation",
            "hellaswag/hellaswag_val.jsonl.gz",
            ("Rowan/hellaswag", None, "validation"),
            _hellaswag,
        ),
        TaskSpec(
            "winogrande",
            "WinoGrande",
            "validation",
            "winogrande/dev.jsonl",
            ("allenai/winogrande", "winogrande_xl", "validation"),
            _winogrande,
        ),
        TaskSpec(
            "arc_easy",
            "ARC-e",
            "test",
            "arc/ARC-Easy-test.jsonl",
            ("allenai/ai2_arc", "ARC-Easy", "test"),
            _arc,
        ),
        TaskSpec(
            "arc_challenge",
            "ARC-c",
            "test",
            "arc/ARC-Challenge-test.jsonl",
            ("allenai/ai2_arc", "ARC-Challenge", "test"),
            _arc,
        ),
        TaskSpec(
            "openbookqa",
            "OBQA",
            "test",
            "openbookqa/test.jsonl",
            ("allenai/openbookqa", "main", "test"),
            _openbookqa,
        ),
    )
}

#: Names that stand for several tasks in ``evaluation.tasks``.
GROUPS: dict[str, tuple[str, ...]] = {"commonsense": tuple(TASKS)}

_ALIASES = {
    "arc-e": "arc_easy",
    "arc_e": "arc_easy",
    "arc-easy": "arc_easy",
    "arc-c": "arc_challenge",
    "arc_c": "arc_challenge",
    "arc-challenge": "arc_challenge",
    "obqa": "openbookqa",
    "csr": "commonsense",
}


def canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    return _ALIASES.get(key, key)


def registered_tasks() -> dict[str, TaskSpec]:
    """Every task a recipe can name: the registered ones (kind ``task``: the built-ins of
    :data:`TASKS` and those plugins register with ``prunekit_register_tasks``)."""
    return {e.name: e.factory for e in get_registry().entries("task")}


def _spec(name: str) -> TaskSpec:
    known = registered_tasks()
    key = name if name in known else canonical_name(name)
    if key not in known:
        raise DataError(
            f"task {name!r} is not registered (is the plugin that registers it installed?)"
        )
    return known[key]


def expand_task_names(name: str) -> tuple[str, ...]:
    """``commonsense`` -> the 7 built-in tasks; a registered task's name -> itself; else an
    error."""
    known = registered_tasks()
    if name in known:  # a plugin's task, by its exact name
        return (name,)
    key = canonical_name(name)
    if key in GROUPS and all(t in known for t in GROUPS[key]):
        return GROUPS[key]
    if key in known:
        return (key,)
    names = [*known, *(g for g, members in GROUPS.items() if all(t in known for t in members))]
    raise DataError(
        f"unknown task {name!r}{did_you_mean(key, [*names, *_ALIASES])}; registered tasks: "
        f"{', '.join(names) or '(none)'}; for your own data give `path:` (a JSON-lines file) "
        "with `context:`, `choices:` (or `choice_fields:`) and `gold:`, a task of "
        "lm-evaluation-harness by name under `evaluation.lm_eval`, or install a plugin that "
        "registers the task (prunekit_register_tasks)"
    )


# --------------------------------------------------------------------------------------------
# Locating and reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSource:
    """Where a task's questions come from (resolved without reading them)."""

    task: str
    kind: str  # "local", "hub" or "file"
    location: str
    labels: str | None = None

    def describe(self) -> str:
        return f"task {self.task} ({self.kind}: {self.location})"


def locate_task(name: str, data_dir: str | os.PathLike[str] | None = None) -> TaskSource:
    """Find a registered task's split in the local data directory, else name its hub source."""
    spec = _spec(name)
    local = _local_data_dir(data_dir)
    if local is not None:
        found = _find_in(local, spec.file)
        if found is not None:
            labels = None
            if spec.labels_file is not None:
                labels_path = _find_in(local, spec.labels_file)
                if labels_path is None:
                    raise DataError(
                        f"{found} needs its gold labels in {local / spec.labels_file} "
                        "(one 0/1 per line, aligned with the questions), which is missing"
                    )
                labels = str(labels_path.resolve())
            return TaskSource(spec.name, "local", str(found.resolve()), labels)
    path, config, split = spec.hub
    return TaskSource(spec.name, "hub", f"{path}/{config}:{split}" if config else f"{path}:{split}")


def _hub_records(spec: TaskSpec) -> list[tuple[int, dict]]:
    path, config, split = spec.hub
    try:
        import datasets  # heavy; only imported when the hub is needed

        ds = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear user error
        raise DataError(
            f"could not load task {spec.name} from the Hugging Face hub ({path}"
            f"{'/' + config if config else ''}, split {split}): {type(exc).__name__}: {exc}. "
            f"No local copy was found: put the file at <dir>/{spec.file} and set "
            f"{DATA_DIR_ENV}=<dir> (or the recipe's data_dir)"
        ) from exc
    return [(i + 1, dict(row)) for i, row in enumerate(ds)]


def load_questions(source: TaskSource, limit: int | None = None) -> list[Question]:
    """The first ``limit`` questions (all if None) of a registered task, in file order."""
    spec = _spec(source.task)
    where = source.location
    if source.kind == "hub":
        records = _hub_records(spec)
    else:
        records = list(json_records(Path(source.location)))
        if source.labels is not None:
            with _open_text(Path(source.labels)) as fh:
                labels = [line.strip() for line in fh if line.strip()]
            if len(labels) != len(records):
                raise DataError(
                    f"{source.labels} has {len(labels)} labels for {len(records)} "
                    f"questions in {where}; the two files must be line-aligned"
                )
            records = [
                (n, {**r, "label": lab}) for (n, r), lab in zip(records, labels, strict=True)
            ]
    if limit is not None:
        records = records[:limit]
    out = []
    for lineno, record in records:
        try:
            out.append(spec.build(record))
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise DataError(
                f"{where}:{lineno}: cannot read this {spec.title} record "
                f"({type(exc).__name__}: {exc}); fields present: "
                f"{', '.join(map(repr, record))}"
            ) from None
    return out


# --------------------------------------------------------------------------------------------
# User tasks from a JSON-lines file
# --------------------------------------------------------------------------------------------


def _template_fields(template: str) -> list[str]:
    """Top-level field names a ``str.format`` template uses (``{a}``, ``{a[b]}``, ``{a.b}``)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(
            f"bad template {template!r}: {exc}; use {{field}} to insert a field "
            "and {{{{ / }}}} for literal braces"
        ) from None
    names = []
    for _, field_name, _, _ in parsed:
        if field_name is None:
            continue
        if field_name == "" or field_name.isdigit():
            raise DataError(
                f"bad template {template!r}: every {{}} needs a field name, e.g. {{question}}"
            )
        names.append(re.split(r"[.\[]", field_name, maxsplit=1)[0])
    return names


@dataclass(frozen=True)
class JsonlTask:
    """A multiple-choice task read from a user's JSON-lines file, formatted by templates.

    :param context: ``str.format`` template over a record's fields, e.g.
        ``"Question: {question}\\nAnswer:"``.
    :param choices: the field holding the list of choice texts, or a fixed list of choices for
        every question (e.g. ``["yes", "no"]``); None with ``choice_fields``.
    :param choice_fields: the fields holding one choice text each, in order (SocialIQA's
        ``answerA``/``answerB``/``answerC``, PIQA's ``sol1``/``sol2``).
    :param gold: the field holding the answer: an index into the choices (an int, or a string
        of digits; counted from ``gold_base``), the text of one choice, or a letter (``A`` is
        the first choice) when no choice text matches.
    :param continuation: template of each choice's continuation; ``{choice}`` is the choice
        text, the record's fields are available too. Default ``" {choice}"``.
    """

    name: str
    path: str
    context: str
    choices: str | tuple[str, ...] | None
    gold: str
    continuation: str = " {choice}"
    gold_base: int = 0
    choice_fields: tuple[str, ...] = ()

    def check(self) -> None:
        """Template syntax errors, found before any data is read."""
        _template_fields(self.context)
        _template_fields(self.continuation)

    def _gold_index(self, value: Any, choices: list[str]) -> int:
        if isinstance(value, bool):
            raise ValueError(f"gold value {value!r} is a boolean; use an index or a choice text")
        if isinstance(value, int):
            index = value - self.gold_base
        else:
            text = str(value).strip()
            if text in choices:
                index = choices.index(text)
            elif re.fullmatch(r"-?\d+", text):
                index = int(text) - self.gold_base
            elif re.fullmatch(r"[A-Za-z]", text):
                index = ord(text.upper()) - ord("A")
            else:
                raise ValueError(
                    f"gold value {value!r} is neither an index, a choice text nor "
                    f"a letter; choices: {choices}"
                )
        if not 0 <= index < len(choices):
            raise ValueError(
                f"gold value {value!r} gives index {index}, out of range for "
                f"{len(choices)} choices (gold_base {self.gold_base})"
            )
        return index

    def build(self, record: dict) -> Question:
        if self.choice_fields:
            choices = []
            for name in self.choice_fields:
                if name not in record:
                    raise KeyError(name)
                if not isinstance(record[name], str):
                    raise ValueError(
                        f"field {name!r} must hold a choice text (a string), not "
                        f"{type(record[name]).__name__} {record[name]!r}"
                    )
                choices.append(record[name])
        elif isinstance(self.choices, str):
            if self.choices not in record:
                raise KeyError(self.choices)
            choices = record[self.choices]
            if isinstance(choices, dict) and "text" in choices:  # HF {text, label} layout
                choices = choices["text"]
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                raise ValueError(f"field {self.choices!r} must be a list of strings")
        else:
            choices = list(self.choices)
        if self.gold not in record:
            raise KeyError(self.gold)
        gold = self._gold_index(record[self.gold], choices)
        context = self.context.format(**record)
        continuations = [self.continuation.format(**{**record, "choice": c}) for c in choices]
        return Question.shared_context(context, continuations, gold, record.get("id"))

    def load(self, limit: int | None = None) -> list[Question]:
        return list(self._questions(limit))

    def check_records(self, limit: int | None = None) -> None:
        """Build every question the run will evaluate (the first ``limit``), keeping none:
        a missing field, a bad gold value or a broken line is a DataError naming its line
        before any weight loads (streamed: no tokenizer, constant memory)."""
        for _ in self._questions(limit):
            pass

    def _questions(self, limit: int | None) -> Iterator[Question]:
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise DataError(
                f"task {self.name}: file {str(path)!r} does not exist; check the "
                f"`path:` setting (relative paths are taken from {os.getcwd()!r})"
            )
        count = 0
        for lineno, record in json_records(path):
            if limit is not None and count >= limit:
                return
            try:
                question = self.build(record)
            except KeyError as exc:
                missing = exc.args[0]
                raise DataError(
                    f"{path}:{lineno}: task {self.name}: the record has no field "
                    f"{missing!r}{did_you_mean(str(missing), record)}; fields "
                    f"present: {', '.join(map(repr, record))}"
                ) from None
            except (ValueError, IndexError, AttributeError) as exc:
                raise DataError(f"{path}:{lineno}: task {self.name}: {exc}") from None
            count += 1
            yield question
        if not count:
            raise DataError(f"task {self.name}: {path} holds no records")
