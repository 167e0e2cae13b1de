"""Zero-shot multiple-choice accuracy: scoring on hand-made items, task formatting on the real
files of ../shared/data, user JSON-lines tasks, recipes, padding with dynamic methods."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from prunekit.data.tasks import (
    JsonlTask,
    Question,
    expand_task_names,
    load_questions,
    locate_task,
)
from prunekit.errors import DataError, RecipeError
from prunekit.evaluation.zeroshot import (
    ChoiceScore,
    accuracy,
    encode_pair,
    evaluate_questions,
    score_requests,
)

# --------------------------------------------------------------------------------------------
# Hand-made models and tokenizers with known log-probabilities
# --------------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character (id = code point); optional BOS id 1; EOS 2; pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, bos: bool = False) -> None:
        self.bos = bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [ord(c) for c in text]
        return {"input_ids": ([1] if self.bos and add_special_tokens else []) + ids}


class Bigram(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next-token distribution depends only on the
    current token, so every log-probability is known in closed form."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.calls: list[tuple] = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(tuple(input_ids.shape))
        return SimpleNamespace(logits=self.table[input_ids])

    def logprob(self, prev: int, nxt: int) -> float:
        return float(self.table[prev].log_softmax(-1)[nxt])


@pytest.fixture
def bigram():
    return Bigram(torch.randn(128, 128, generator=torch.Generator().manual_seed(0)) * 2)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def test_known_nlls_give_known_predictions_for_both_metrics():
    # question 1: choice 0 has the smallest sum (acc), choice 1 the smallest per token (acc_norm)
    # question 2: both metrics pick choice 2; question 3: a tie goes to the first choice
    q1 = Question.shared_context("c", ["a", "b"], gold=1)
    q2 = Question.shared_context("c", ["a", "b", "c"], gold=2)
    q3 = Question.shared_context("c", ["a", "b"], gold=0)
    scores = [
        ChoiceScore(-3.0, 1, False),
        ChoiceScore(-4.0, 4, False),  # 3.0/tok vs 1.0/tok
        ChoiceScore(-5.0, 1, False),
        ChoiceScore(-6.0, 2, False),
        ChoiceScore(-1.0, 1, True),
        ChoiceScore(-2.0, 2, False),
        ChoiceScore(-2.0, 2, False),
    ]
    result = accuracy([q1, q2, q3], scores)
    preds = [(r["pred"], r["pred_norm"]) for r in result["records"]]
    assert preds == [(0, 1), (2, 2), (0, 0)]
    assert result["acc"] == pytest.approx(2 / 3)  # q2, q3
    assert result["acc_norm"] == pytest.approx(1.0)  # q1, q2, q3
    assert result["questions"] == 3 and result["choices"] == 7
    assert result["acc_stderr"] == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 2))
    assert result["records"][0]["nll"] == [3.0, 4.0] and result["records"][0]["tokens"] == [1, 4]


def test_accuracy_rejects_a_score_count_mismatch():
    q = Question.shared_context("c", ["a", "b"], gold=0)
    with pytest.raises(ValueError, match="3 scores for 2 choices"):
        accuracy([q], [ChoiceScore(-1.0, 1, False)] * 3)


def test_scores_are_the_summed_continuation_logprobs(bigram):
    tok = CharTokenizer()
    pairs = [
        encode_pair(tok, "ab", "cd"),
        encode_pair(tok, "abcdef", "g"),
        encode_pair(tok, "x", "yz"),
    ]
    scores = score_requests(bigram, pairs, batch_size=2)
    expected = [
        bigram.logprob(ord("b"), ord("c")) + bigram.logprob(ord("c"), ord("d")),
        bigram.logprob(ord("f"), ord("g")),
        bigram.logprob(ord("x"), ord("y")) + bigram.logprob(ord("y"), ord("z")),
    ]
    assert [s.logprob for s in scores] == pytest.approx(expected, abs=1e-5)
    assert [s.tokens for s in scores] == [2, 1, 2]
    # no request dropped: a last partial batch of one is scored; groups padded to their longest
    assert bigram.calls == [(2, 6), (1, 2)]  # inputs drop the last token


def test_padding_and_batch_size_do_not_change_scores(bigram):
    tok = CharTokenizer()
    pairs = [encode_pair(tok, "a" * n, "bc") for n in (1, 7, 3, 12, 2)]
    alone = score_requests(bigram, pairs, batch_size=1)
    batched = score_requests(bigram, pairs, batch_size=5, pad_id=7)
    assert [s.logprob for s in alone] == pytest.approx([s.logprob for s in batched], abs=1e-6)


def test_context_cut_from_the_left_keeps_the_continuation(bigram):
    tok = CharTokenizer()
    pair = encode_pair(tok, "abcdefghij", "kl")
    (score,) = score_requests(bigram, [pair], max_length=4)
    assert score.tokens == 2
    assert bigram.calls == [(1, 4)]  # input "hijk" predicts "ijkl"; the continuation is "kl"
    assert score.logprob == pytest.approx(
        bigram.logprob(ord("j"), ord("k")) + bigram.logprob(ord("k"), ord("l")), abs=1e-5
    )


def test_encode_pair_moves_trailing_spaces_and_handles_empty_context():
    tok = CharTokenizer(bos=True)
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert ctx == [1, *map(ord, "Answer:")] and cont == list(map(ord, " yes"))
    ctx, cont = encode_pair(tok, "", "yes")
    assert ctx == [1] and cont == list(map(ord, "yes"))  # BOS stands for the empty context


def test_encode_pair_with_the_real_tokenizer(smollm2):
    tok = smollm2.tokenizer
    ctx, cont = encode_pair(tok, "Question: Is the sky blue?\nAnswer:", " yes")
    assert tok.decode(ctx + cont) == "Question: Is the sky blue?\nAnswer: yes"
    assert tok.decode(cont) == " yes"


def test_evaluate_questions_predicts_the_likeliest_choice(bigram):
    tok = CharTokenizer()
    # make "z" after "q" very likely, so the choice "z" wins both metrics
    bigram.table.data[ord("q")] = -10.0
    bigram.table.data[ord("q"), ord("z")] = 10.0
    questions = [
        Question.shared_context("q", ["a", "z", "b"], gold=1),
        Question.shared_context("q", ["z", "a"], gold=1),
    ]
    result = evaluate_questions(bigram, tok, questions, batch_size=4)
    assert [r["pred"] for r in result["records"]] == [1, 0]
    assert result["acc"] == 0.5 and result["acc_norm"] == 0.5
    assert result["tokens_scored"] == 5


def test_question_validation():
    with pytest.raises(ValueError, match="at least two choices"):
        Question.shared_context("c", ["a"], gold=0)
    with pytest.raises(ValueError, match="out of range"):
        Question.shared_context("c", ["a", "b"], gold=2)


# --------------------------------------------------------------------------------------------
# The built-in tasks on the real files
# --------------------------------------------------------------------------------------------


def _first(name, data_dir, n=None):
    return load_questions(locate_task(name, data_dir), n)


def test_every_record_is_read_and_one_hot(shared_data):
    expected = {
        "boolq": 3270,
        "piqa": 1838,
        "hellaswag": 10042,
        "winogrande": 1267,
        "arc_easy": 2376,
        "arc_challenge": 1172,
        "openbookqa": 500,
    }
    for name, count in expected.items():
        questions = _first(name, shared_data)
        assert len(questions) == count, name  # no question dropped
        golds = {q.gold for q in questions}
        assert min(golds) == 0 and max(golds) >= 1, name  # one gold index per question


def test_piqa_labels_are_one_hot_not_the_reference_bug(shared_data):
    labels = (shared_data / "piqa" / "valid-labels.lst").read_text().split()
    questions = _first("piqa", shared_data)
    assert [q.gold for q in questions] == [int(x) for x in labels]
    assert {q.gold for q in questions} == {0, 1}


def test_reference_formatting(shared_data):
    row = json.loads((shared_data / "boolq" / "validation.jsonl").read_text().splitlines()[0])
    (q,) = _first("boolq", shared_data, 1)
    assert q.contexts[0] == f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    assert q.continuations == (" yes", " no") and q.gold == (0 if row["answer"] else 1)

    (q,) = _first("arc_easy", shared_data, 1)
    row = json.loads((shared_data / "arc" / "ARC-Easy-test.jsonl").read_text().splitlines()[0])
    assert q.contexts[0] == f"Question: {row['question']}\nAnswer:"
    assert q.continuations == tuple(" " + c for c in row["choices"]) and q.gold == row["gold"]

    (q,) = _first("winogrande", shared_data, 1)
    row = json.loads((shared_data / "winogrande" / "dev.jsonl").read_text().splitlines()[0])
    cut = row["sentence"].index("_")
    assert q.contexts == (
        row["sentence"][:cut] + row["option1"],
        row["sentence"][:cut] + row["option2"],
    )
    assert q.continuations[0] == q.continuations[1] == " " + row["sentence"][cut + 1 :].strip()
    assert q.gold == int(row["answer"]) - 1

    (q,) = _first("hellaswag", shared_data, 1)
    assert q.contexts[0].startswith("Roof shingle removal: A man is sitting on a roof. He")
    assert all(c.startswith(" ") and "[" not in c for c in q.continuations)

    (q,) = _first("openbookqa", shared_data, 1)
    assert not q.contexts[0].startswith("Question:")
    assert all(c.startswith(" ") for c in q.continuations)


def test_hub_layout_of_arc_and_openbookqa(shared_data):
    """The hub's choices{text,label} + answerKey layout gives the same questions."""
    from prunekit.data.tasks import TASKS

    row = json.loads(
        (shared_data / "arc" / "ARC-Easy-validation.jsonl").read_text().splitlines()[0]
    )
    q = TASKS["arc_easy"].build(row)
    assert q.continuations == tuple(" " + t for t in row["choices"]["text"])
    assert q.gold == row["choices"]["label"].index(row["answerKey"])
    row = json.loads((shared_data / "openbookqa" / "validation.jsonl").read_text().splitlines()[0])
    q = TASKS["openbookqa"].build(row)
    assert q.gold == row["choices"]["label"].index(row["answerKey"])


def test_task_names_groups_and_suggestions():
    assert len(expand_task_names("commonsense")) == 7
    assert expand_task_names("ARC-e") == ("arc_easy",)
    with pytest.raises(DataError, match="did you mean 'hellaswag'"):
        expand_task_names("helaswag")


def test_missing_local_file_falls_back_to_the_hub_with_a_clear_error(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    source = locate_task("piqa", tmp_path)
    assert source.kind == "hub"
    with pytest.raises(DataError, match=r"piqa/valid.jsonl"):
        load_questions(source)


# --------------------------------------------------------------------------------------------
# User tasks from JSON lines
# --------------------------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_task_gold_as_index_text_or_letter(tmp_path):
    path = _write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"q": "2+2", "opts": ["3", "4"], "answer": 1},
            {"q": "sky", "opts": ["blue", "green"], "answer": "blue"},
            {"q": "x", "opts": ["a1", "b1", "c1"], "answer": "C"},
            {"q": "y", "opts": ["a1", "b1"], "answer": "1"},
        ],
    )
    task = JsonlTask("mine", str(path), context="Q: {q}\nA:", choices="opts", gold="answer")
    questions = task.load()
    assert [q.gold for q in questions] == [1, 0, 2, 1]
    assert questions[0].contexts[0] == "Q: 2+2\nA:" and questions[0].continuations == (" 3", " 4")
    one_based = JsonlTask("mine", str(path), "{q}", "opts", "answer", gold_base=1).load(1)
    assert one_based[0].gold == 0
    fixed = JsonlTask(
        "yn", str(path), "{q}?", ("yes", "no"), "answer", continuation=" -> {choice}"
    ).load(1)
    assert fixed[0].continuations == (" -> yes", " -> no") and fixed[0].gold == 1


def test_jsonl_task_errors_name_file_line_and_fields(tmp_path):
    path = _write_jsonl(
        tmp_path / "t.jsonl",
        [{"q": "a", "opts": ["x", "y"], "answer": 0}, {"qq": "b", "opts": ["x", "y"], "answer": 0}],
    )
    with pytest.raises(DataError, match=r"t.jsonl:2: .*no field 'q'.*fields present"):
        JsonlTask("mine", str(path), "{q}", "opts", "answer").load()
    with pytest.raises(DataError, match=r"t.jsonl:1: .*out of range"):
        JsonlTask("mine", str(path), "{q}", "opts", "answer", gold_base=1).load()
    with pytest.raises(DataError, match="needs a field name"):
        JsonlTask("mine", str(path), "{}", "opts", "answer").check()
    with pytest.raises(DataError, match="does not exist"):
        JsonlTask("mine", str(tmp_path / "nope.jsonl"), "{q}", "opts", "answer").load()


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


def _validate(tasks, **extra):
    from prunekit.runner import validate

    return validate({"evaluation": {"perplexity": [], "tasks": tasks}, **extra})


def test_recipe_tasks_accept_names_groups_and_files(shared_data, tmp_path):
    path = _write_jsonl(tmp_path / "mine.jsonl", [{"q": "a", "opts": ["x", "y"], "answer": 0}])
    plan = _validate(
        [
            {"name": "commonsense", "limit": 5},
            {
                "name": "mine",
                "path": str(path),
                "context": "{q}",
                "choices": "opts",
                "gold": "answer",
            },
        ]
    )
    labels = [label for label, _, _ in plan.tasks]
    assert labels[:7] == list(expand_task_names("commonsense")) and labels[7] == "mine"
    assert all(cfg.limit == 5 for _, cfg, _ in plan.tasks[:7])
    with pytest.raises(RecipeError, match="boolq.*already evaluated"):
        _validate(["boolq", "commonsense"])


def test_recipe_task_errors_point_at_the_entry(tmp_path):
    with pytest.raises(RecipeError, match=r"evaluation\.tasks\.0\.name.*did you mean 'piqa'"):
        _validate(["piqaa"])
    with pytest.raises(RecipeError, match="also needs choices, gold"):
        _validate([{"name": "mine", "path": "x.jsonl", "context": "{q}"}])
    with pytest.raises(RecipeError, match="only apply to a task read from a file"):
        _validate([{"name": "boolq", "context": "{q}"}])
    with pytest.raises(RecipeError, match="does not exist"):
        _validate(
            [
                {
                    "name": "mine",
                    "path": str(tmp_path / "no.jsonl"),
                    "context": "{q}",
                    "choices": "c",
                    "gold": "g",
                }
            ]
        )


def test_set_applies_a_limit_to_every_task():
    from prunekit.recipe import load_recipe

    loaded = load_recipe(
        {"evaluation": {"tasks": ["boolq", {"name": "piqa"}]}}, ["evaluation.tasks.limit=7"]
    )
    assert [t.limit for t in loaded.recipe.evaluation.tasks] == [7, 7]


# --------------------------------------------------------------------------------------------
# Dynamic methods: pads never matter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_dynamic_scores_do_not_depend_on_pad_tokens(kv_heads):
    import prunekit
    from prunekit.testing import tiny_llama

    model = tiny_llama(kv_heads=kv_heads, layers=4, vocab=128)
    calib = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    outcome = prunekit.prune(
        model, None, method="pp", ratio=0.4, calibration=calib, skip_layers=[0]
    )
    gen = torch.Generator().manual_seed(1)
    pairs = [
        (
            torch.randint(3, 128, (n,), generator=gen).tolist(),
            torch.randint(3, 128, (3,), generator=gen).tolist(),
        )
        for n in (4, 11, 7, 2)
    ]
    a = score_requests(outcome.model, pairs, batch_size=4, pad_id=0)
    b = score_requests(outcome.model, pairs, batch_size=4, pad_id=99)
    assert all(math.isfinite(s.logprob) for s in a)
    assert [s.logprob for s in a] == pytest.approx([s.logprob for s in b], abs=1e-5)


@pytest.mark.smollm2
def test_apply_reports_tasks_and_their_average(smollm2, shared_data, tmp_path):
    from prunekit.cli import main

    path = _write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"q": "The capital of France is", "opts": ["Paris", "banana"], "answer": 0},
            {"q": "Two plus two is", "opts": ["four", "purple"], "answer": "four"},
        ],
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "method: {name: wanda-sp, ratio: 0.2}\n"
        "calibration: {samples: 4, seq_len: 64, batch_size: 4}\n"
        "evaluation:\n  perplexity: []\n  tasks:\n"
        "    - {name: piqa, limit: 3}\n    - {name: arc_challenge, limit: 2, batch_size: 3}\n"
        f"    - {{name: mine, path: {path}, context: '{{q}}', choices: opts, gold: answer}}\n"
        f"output: {{dir: {tmp_path / 'out'}, save_predictions: true}}\n"
    )
    assert main(["apply", str(recipe), "--quiet"]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    metrics = result["metrics"]
    assert metrics["piqa"]["questions"] == 3 and metrics["arc_challenge"]["questions"] == 2
    assert metrics["mine"]["questions"] == 2 and metrics["mine"]["source"] == "file"
    average = metrics["tasks_average"]
    assert average["tasks"] == ["piqa", "arc_challenge", "mine"]
    assert average["acc_norm"] == pytest.approx(
        sum(metrics[t]["acc_norm"] for t in average["tasks"]) / 3
    )
    hashes = json.loads((tmp_path / "out" / "provenance.json").read_text())["data_sha256"]
    import hashlib

    assert hashes["mine"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(hashes["piqa"]) == 64
    lines = (tmp_path / "out" / "predictions" / "arc_challenge.jsonl").read_text().splitlines()
    assert len(lines) == 2 and {"gold", "pred", "pred_norm", "nll"} <= set(json.loads(lines[0]))
