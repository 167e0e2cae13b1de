"""lm-eval versions of prunekit's 7 zero-shot tasks, formatted exactly like prunekit.

The ``pk_<task>.yaml`` files here are lm-evaluation-harness task configs for ``boolq``,
``piqa``, ``hellaswag``, ``winogrande``, ``arc_easy``, ``arc_challenge`` and ``openbookqa``
that read the local data files (the layout of the project's shared data directory) and build
every request exactly as :mod:`prunekit.data.tasks` does: the same context text, the same
continuation text (prunekit's leading space is lm-eval's ``target_delimiter``) and the same
gold index. The functions below re-implement that formatting independently, so that
``benchmarks/lm_eval_crosscheck.py`` can check it request by request.

The YAML files are templates: their data file is the placeholder ``"@DATA_FILE@"``. Render
them into a directory with the real paths filled in, then point lm-eval at that directory::

    python benchmarks/lm_eval_tasks/pk_tasks.py /tmp/pk_tasks --data-dir /path/to/data
    python -m prunekit.integrations.lm_eval --model prunekit \\
        --model_args recipe=recipes/dense_smollm2.yaml,batch_size=20 \\
        --include_path /tmp/pk_tasks --tasks pk_arc_easy,pk_piqa

Files are found like prunekit finds them (:func:`prunekit.data.tasks.locate_task`: the given
directory, else ``$PRUNEKIT_DATA_DIR``); PIQA's gold labels, kept in a separate line-aligned
file, are merged into ``piqa-valid-labeled.jsonl`` in the output directory.

Differences from lm-eval's own tasks of the same name: PIQA's context is the bare goal, as in
the Probe Pruning reference (lm-eval: ``Question: {goal}\\nAnswer:``); BoolQ lists its choices
as ``yes``/``no`` (lm-eval: ``no``/``yes``, same predictions, other gold index); the data are
the local files (ARC and OpenBookQA: the test split, as in lm-eval). HellaSwag, WinoGrande,
ARC and OpenBookQA are formatted as lm-eval formats them. ``pk_winogrande`` reports ``acc``
only, like lm-eval's ``winogrande``: with one context per choice, lm-eval's ``acc_norm`` would
divide by the length of each *context*.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
PLACEHOLDER = '"@DATA_FILE@"'
PIQA_MERGED = "piqa-valid-labeled.jsonl"


# ------------------------------------------------------------------------------------------
# Formatting (lm-eval calls these through `process_docs: !function pk_tasks.<name>`)
#
# Every processed document gets pk_query (the context), pk_choices (the continuations without
# their leading space, which target_delimiter " " adds back) and pk_gold (the gold index).
# WinoGrande instead has one context per choice in pk_choices, pk_gold as its doc_to_text (an
# int: lm-eval's "multiple input" form) and the shared continuation in pk_continuation.
# ------------------------------------------------------------------------------------------


def _doc(query: str, choices, gold: int) -> dict:
    return {"pk_query": query, "pk_choices": [str(c) for c in choices], "pk_gold": int(gold)}


def _boolq(doc: dict) -> dict:
    answer = doc["answer"]
    if isinstance(answer, str):
        answer = answer.strip().lower() in ("true", "yes", "1")
    return _doc(
        f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
        ["yes", "no"],
        0 if answer else 1,
    )


def _piqa(doc: dict) -> dict:
    return _doc(doc["goal"], [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return _doc(
        _hellaswag_clean(doc["activity_label"] + ": " + ctx),
        [_hellaswag_clean(e) for e in doc["endings"]],
        int(doc["label"]),
    )


def _winogrande(doc: dict) -> dict:
    sentence = doc["sentence"]
    cut = sentence.index("_")
    contexts = [sentence[:cut] + doc["option1"], sentence[:cut] + doc["option2"]]
    out = _doc("", contexts, int(doc["answer"]) - 1)
    out["pk_continuation"] = sentence[cut + 1 :].strip()
    return out


def _choices_and_gold(doc: dict) -> tuple[list[str], int]:
    """Shared-data layout (``choices`` list + ``gold`` index) or the hub's
    (``choices{text,label}`` + ``answerKey``)."""
    choices = doc["choices"]
    if isinstance(choices, dict):
        labels = [str(x) for x in choices["label"]]
        return list(choices["text"]), labels.index(str(doc["answerKey"]).strip())
    return list(choices), int(doc["gold"])


def _arc(doc: dict) -> dict:
    choices, gold = _choices_and_gold(doc)
    return _doc(f"Question: {doc['question']}\nAnswer:", choices, gold)


def _openbookqa(doc: dict) -> dict:
    choices, gold = _choices_and_gold(doc)
    return _doc(doc["question_stem"], choices, gold)


def process_boolq(dataset):
    return dataset.map(_boolq)


def process_piqa(dataset):
    return dataset.map(_piqa)


def process_hellaswag(dataset):
    return dataset.map(_hellaswag)


def process_winogrande(dataset):
    return dataset.map(_winogrande)


def process_arc(dataset):
    return dataset.map(_arc)


def process_openbookqa(dataset):
    return dataset.map(_openbookqa)


# ------------------------------------------------------------------------------------------
# Rendering the templates
# ------------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [line for line in fh if line.strip()]


def merge_piqa_labels(questions: Path, labels: Path, out: Path) -> Path:
    """Write PIQA's questions with their gold ``label`` (from the line-aligned labels file)."""
    records = _read_lines(questions)
    golds = [line.strip() for line in _read_lines(labels)]
    if len(records) != len(golds):
        raise ValueError(
            f"{labels} has {len(golds)} labels for {len(records)} questions in "
            f"{questions}; the two files must be line-aligned"
        )
    with open(out, "w", encoding="utf-8") as fh:
        for line, gold in zip(records, golds, strict=True):
            fh.write(json.dumps({**json.loads(line), "label": int(gold)}) + "\n")
    return out


def render(
    out_dir: str | Path, data_dir: str | Path | None = None, tasks: tuple[str, ...] = TASKS
) -> Path:
    """Write the ``pk_<task>.yaml`` configs of ``tasks`` into ``out_dir`` with their data
    files located (``data_dir``, else ``$PRUNEKIT_DATA_DIR``), plus this module (the configs
    call its functions). Returns ``out_dir``, for lm-eval's ``include_path``."""
    from prunekit.data.tasks import TASKS as SPECS
    from prunekit.data.tasks import locate_task

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
        source = locate_task(name, data_dir)
        if source.kind != "local":
            raise FileNotFoundError(
                f"no local copy of {name}: expected <data dir>/{SPECS[name].file} with the data "
                "dir given by --data-dir or $PRUNEKIT_DATA_DIR (these lm-eval configs read "
                "local files only)"
            )
        path = Path(source.location)
        if source.labels is not None:
            path = merge_piqa_labels(path, Path(source.labels), out / PIQA_MERGED)
        template = (HERE / f"pk_{name}.yaml").read_text(encoding="utf-8")
        if template.count(PLACEHOLDER) != 1:
            raise ValueError(f"pk_{name}.yaml must hold the placeholder {PLACEHOLDER} once")
        text = template.replace(PLACEHOLDER, json.dumps(str(path.resolve())))
        (out / f"pk_{name}.yaml").write_text(text, encoding="utf-8")
    if Path(__file__).resolve() != (out / "pk_tasks.py").resolve():
        shutil.copyfile(__file__, out / "pk_tasks.py")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write the rendered task configs into")
    parser.add_argument(
        "--data-dir", default=None, help="local data directory (default: $PRUNEKIT_DATA_DIR)"
    )
    parser.add_argument(
        "--tasks", default=",".join(TASKS), help="comma-separated subset of: " + ", ".join(TASKS)
    )
    args = parser.parse_args(argv)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    try:
        out = render(args.out_dir, args.data_dir, tasks)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(tasks)} task configs to {out}; use it as lm-eval's --include_path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
