"""Corpora and multiple-choice tasks as registry kinds, local task files whose choices sit in
separate fields, and lm-eval tasks by name from a recipe.

References: a plugin's corpus is read exactly as a user file with the same text; a
SocialIQA-style file is scored against each choice's log-likelihood summed by hand from the
model's logits; an lm-eval task (a local config) against prunekit's own evaluation of the
same questions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import prunekit
from prunekit.data import DatasetInfo, SplitInfo, locate_corpus, registered_corpora
from prunekit.data.tasks import Question, TaskSpec, expand_task_names, registered_tasks
from prunekit.errors import PluginError, RecipeError
from prunekit.plan import validate
from prunekit.recipe import load_recipe
from prunekit.testing import isolated_plugin_manager, tiny_llama, tiny_tokenizer

WORDS = [f"w{i}" for i in range(3, 128)]


def _text(rng, n):
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=rng))


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny"
    tiny_llama(seed=2).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_builtins_are_registered_like_plugins():
    assert {"wikitext2", "ptb", "c4"} <= set(registered_corpora())
    assert {"boolq", "piqa", "arc_easy"} <= set(registered_tasks())
    assert len(expand_task_names("commonsense")) == 7


class LocalCorpusPlugin:
    """A third-party corpus: one split, a JSON-lines file under the data directory."""

    @prunekit.hookimpl
    def prunekit_register_corpora(self, register):
        register(
            "mytext",
            DatasetInfo(
                id="mytext",
                description="a corpus of a plugin",
                splits={"test": SplitInfo(file="mytext/test.jsonl", text_field="body")},
                default_split="test",
                calibration_split="test",
                join="\n\n",
                calibration="stream",
                licence="CC0",
            ),
        )


def test_a_plugin_corpus_is_named_from_a_recipe(tmp_path, tiny_dir):
    rng = torch.Generator().manual_seed(0)
    (tmp_path / "data" / "mytext").mkdir(parents=True)
    rows = [{"body": _text(rng, 80)} for _ in range(20)]
    (tmp_path / "data" / "mytext" / "test.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    (tmp_path / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with isolated_plugin_manager(LocalCorpusPlugin()):
        source = locate_corpus("mytext", data_dir=tmp_path / "data")
        assert (source.dataset, source.split, source.kind) == ("mytext", "test", "local")
        common = {
            "model": {"id": str(tiny_dir)},
            "method": {"name": "dense"},
            "runtime": {"batches": 0},
            "data_dir": str(tmp_path / "data"),
        }
        ppl = {"seq_len": 32, "windows": 4, "batch_size": 2}
        by_name = prunekit.apply(
            {**common, "evaluation": {"perplexity": [{"dataset": "mytext", **ppl}]}},
            output=tmp_path / "a",
        )
        by_file = prunekit.apply(
            {
                **common,
                "evaluation": {
                    "perplexity": [
                        {"path": str(tmp_path / "same.jsonl"), "text_field": "body", **ppl}
                    ]
                },
            },
            output=tmp_path / "b",
        )
    a, b = by_name["metrics"]["mytext"], next(iter(by_file["metrics"].values()))
    assert a["ppl"] == b["ppl"] and a["tokens"] == b["tokens"]
    # without the plugin, the name is unknown at validate, with what is known
    with pytest.raises(RecipeError, match=r"unknown dataset 'mytext'.*wikitext2"):
        validate(
            {**common, "evaluation": {"perplexity": [{"dataset": "mytext", **ppl}]}},
            check_output=False,
        )


def test_a_plugin_task_is_named_from_a_recipe(tmp_path, tiny_dir):
    rng = torch.Generator().manual_seed(1)
    (tmp_path / "data" / "mine").mkdir(parents=True)
    records = [
        {"q": _text(rng, 6), "a": _text(rng, 2), "b": _text(rng, 2), "label": i % 2}
        for i in range(6)
    ]
    (tmp_path / "data" / "mine" / "dev.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records)
    )

    def build(doc):
        return Question.shared_context(doc["q"], [" " + doc["a"], " " + doc["b"]], doc["label"])

    class TaskPlugin:
        @prunekit.hookimpl
        def prunekit_register_tasks(self, register):
            register(
                "mine",
                TaskSpec(
                    "mine", "My task", "dev", "mine/dev.jsonl", ("nowhere", None, "dev"), build
                ),
            )

    common = {
        "model": {"id": str(tiny_dir)},
        "method": {"name": "dense"},
        "runtime": {"batches": 0},
        "data_dir": str(tmp_path / "data"),
    }
    with isolated_plugin_manager(TaskPlugin()):
        result = prunekit.apply(
            {**common, "evaluation": {"perplexity": [], "tasks": ["mine"]}}, output=tmp_path / "run"
        )
        by_file = prunekit.apply(
            {
                **common,
                "evaluation": {
                    "perplexity": [],
                    "tasks": [
                        {
                            "name": "same",
                            "path": str(tmp_path / "data" / "mine" / "dev.jsonl"),
                            "context": "{q}",
                            "choice_fields": ["a", "b"],
                            "gold": "label",
                        }
                    ],
                },
            },
            output=tmp_path / "run2",
        )
    got = result["metrics"]["mine"]
    assert got["questions"] == 6 and got["source"] == "local"
    assert got["acc"] == by_file["metrics"]["same"]["acc"]
    assert got["acc_norm"] == by_file["metrics"]["same"]["acc_norm"]


@pytest.mark.parametrize(
    "bad, match",
    [
        ("not a spec", "registered task .mine. as a str, which lacks name, file, hub, build"),
        (
            TaskSpec("other", "t", "dev", "f", ("x", None, "dev"), lambda d: d),
            "register it under 'other'",
        ),
    ],
)
def test_a_malformed_data_registration_names_the_plugin(bad, match):
    class Bad:
        @prunekit.hookimpl
        def prunekit_register_tasks(self, register):
            register("mine", bad)

    with isolated_plugin_manager(Bad()), pytest.raises(PluginError, match=match):
        registered_tasks()


def _loglik(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context), summed over the continuation's tokens, by hand."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_socialiqa_style_file_with_three_answer_fields(tmp_path, tiny_dir):
    rng = torch.Generator().manual_seed(2)
    records = [
        {
            "context": _text(rng, 5),
            "question": _text(rng, 3),
            "answerA": _text(rng, 2),
            "answerB": _text(rng, 3),
            "answerC": _text(rng, 1),
            "label": str(1 + i % 3),
        }
        for i in range(9)
    ]
    path = tmp_path / "siqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    task = {
        "name": "siqa",
        "path": str(path),
        "context": "{context} {question}",
        "choice_fields": ["answerA", "answerB", "answerC"],
        "gold": "label",
        "gold_base": 1,
    }
    result = prunekit.apply(
        {
            "model": {"id": str(tiny_dir)},
            "method": {"name": "dense"},
            "runtime": {"batches": 0},
            "evaluation": {"perplexity": [], "tasks": [task]},
        },
        output=tmp_path / "run",
    )
    model, tokenizer = tiny_llama(seed=2), tiny_tokenizer()
    hits = 0
    for r in records:
        scores = [
            _loglik(model, tokenizer, f"{r['context']} {r['question']}", " " + r[k])
            for k in ("answerA", "answerB", "answerC")
        ]
        hits += int(max(range(3), key=lambda i: scores[i]) == int(r["label"]) - 1)
    got = result["metrics"]["siqa"]
    assert got["questions"] == 9
    assert math.isclose(got["acc"], hits / 9)


def test_wrong_choice_field_fails_at_validate_with_file_and_line(tmp_path, tiny_dir):
    path = tmp_path / "siqa.jsonl"
    path.write_text(
        json.dumps({"q": "w3", "answerA": "w4", "answerB": "w5", "label": 1})
        + "\n"
        + json.dumps({"q": "w3", "answerA": "w4", "answerb": "w5", "label": 1})
        + "\n"
    )
    task = {
        "name": "siqa",
        "path": str(path),
        "context": "{q}",
        "choice_fields": ["answerA", "answerB"],
        "gold": "label",
    }
    recipe = {"model": {"id": str(tiny_dir)}, "evaluation": {"perplexity": [], "tasks": [task]}}
    with pytest.raises(
        RecipeError,
        match=rf"{path}:2: task siqa: the record has no field "
        r"'answerB' \(did you mean 'answerb'\?\)",
    ):
        validate(load_recipe(recipe), check_output=False)
    both = {**task, "choices": ["w4", "w5"]}
    with pytest.raises(RecipeError, match="either `choices:`.*or `choice_fields:`"):
        load_recipe({**recipe, "evaluation": {"perplexity": [], "tasks": [both]}})


# --------------------------------------------------------------------------------------------
# lm-eval tasks by name
# --------------------------------------------------------------------------------------------

LM_EVAL_TASK = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def test_an_lm_eval_task_by_name_equals_prunekits_own_scoring(tmp_path, tiny_dir):
    pytest.importorskip("lm_eval")
    rng = torch.Generator().manual_seed(3)
    records = [
        {"question": _text(rng, 6), "choices": [_text(rng, 2) for _ in range(3)], "gold": i % 3}
        for i in range(8)
    ]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    include = tmp_path / "tasks"
    include.mkdir()
    (include / "tiny_mc.yaml").write_text(LM_EVAL_TASK.format(data=data))
    recipe = {
        "model": {"id": str(tiny_dir)},
        "method": {"name": "dense"},
        "runtime": {"batches": 0},
        "evaluation": {
            "perplexity": [],
            "lm_eval": {
                "tasks": ["tiny_mc"],
                "include_path": str(include),
                "include_defaults": False,
                "batch_size": 4,
            },
            "tasks": [
                {
                    "name": "own",
                    "path": str(data),
                    "context": "{question}",
                    "choices": "choices",
                    "gold": "gold",
                }
            ],
        },
    }
    result = prunekit.apply(recipe, output=tmp_path / "run")
    lm, own = result["metrics"]["lm_eval:tiny_mc"], result["metrics"]["own"]
    assert lm["samples"] == 8 and lm["source"] == "lm-eval"
    assert lm["acc"] == own["acc"]
    # the recipe, written with the run, reads back the same section
    written = yaml.safe_load(Path(tmp_path / "run" / "recipe.yaml").read_text())
    assert written["evaluation"]["lm_eval"]["tasks"] == ["tiny_mc"]


def test_an_unknown_lm_eval_task_fails_at_validate(tmp_path, tiny_dir):
    pytest.importorskip("lm_eval")
    include = tmp_path / "tasks"
    include.mkdir()
    (include / "tiny_mc.yaml").write_text(LM_EVAL_TASK.format(data=tmp_path / "x.jsonl"))
    recipe = {
        "model": {"id": str(tiny_dir)},
        "evaluation": {
            "perplexity": [],
            "lm_eval": {
                "tasks": ["tiny_mcq"],
                "include_path": str(include),
                "include_defaults": False,
            },
        },
    }
    with pytest.raises(
        RecipeError,
        match=r"evaluation\.lm_eval\.tasks\.0.*no task 'tiny_mcq'.*"
        r"did you mean 'tiny_mc'",
    ):
        validate(load_recipe(recipe), check_output=False)
    recipe["evaluation"]["lm_eval"]["include_path"] = str(tmp_path / "missing")
    with pytest.raises(RecipeError, match="is not a directory of lm-eval task configs"):
        validate(load_recipe(recipe), check_output=False)


def test_lm_eval_list_shorthand():
    recipe = load_recipe({"evaluation": {"lm_eval": ["arc_easy", "piqa"]}}).recipe
    assert recipe.evaluation.lm_eval.tasks == ["arc_easy", "piqa"]
    assert recipe.evaluation.lm_eval.include_defaults
