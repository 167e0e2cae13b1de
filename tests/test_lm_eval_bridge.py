"""Tests of the lm-eval bridge (prunekit.integrations.lm_eval), offline.

Tiny random LLaMA models with a word-level tokenizer (``w3 w4 ...``, BOS added like a LLaMA
tokenizer) for the scoring, padding, dynamic-model and generation tests; the real SmolLM2 and
the shared data for the run of a local task through ``lm_eval.simple_evaluate``.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

import prunekit  # noqa: E402
from prunekit.evaluation.zeroshot import encode_pair, evaluate_questions, score_requests  # noqa: E402
from prunekit.integrations.lm_eval import PrunekitLM  # noqa: E402
from prunekit.testing import tiny_llama, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BOS = 1


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level: ``w3``..``w127`` are tokens 3..127; BOS (1) starts every encoded text."""
    return tiny_tokenizer(add_bos=True)


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def requests(*pairs: tuple[str, str]) -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, idx=0) for pair in pairs]


#: mixed lengths, so that batches of 3 are padded; one empty context (BOS stands for it)
PAIRS = [
    (words(3, 4, 5), " " + words(6)),
    (words(7), " " + words(8, 9, 10, 11)),
    (words(12, 13, 14, 15, 16, 17, 18), " " + words(19, 20)),
    ("", " " + words(21, 22)),
    (words(23, 24), " " + words(25, 26, 27)),
]


@torch.no_grad()
def direct_score(model, context_ids: list[int], continuation_ids: list[int]):
    """log P(continuation | context) and greedy-ness from one unpadded forward."""
    ids = torch.tensor([context_ids + continuation_ids])
    logits = model(input_ids=ids).logits[0, len(context_ids) - 1 : -1].log_softmax(-1)
    target = torch.tensor(continuation_ids)
    return logits.gather(1, target[:, None]).sum().item(), bool((logits.argmax(-1) == target).all())


def word_ids(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


# ------------------------------------------------------------------------------------------
# loglikelihood and loglikelihood_rolling
# ------------------------------------------------------------------------------------------


def test_registered_under_prunekit():
    assert lm_eval.api.registry.get_model("prunekit") is PrunekitLM


def test_loglikelihood_equals_unpadded_forward(tokenizer):
    model = tiny_llama()
    # a continuation that is the model's greedy choice, so that is_greedy must come out True
    with torch.no_grad():
        best = int(model(input_ids=torch.tensor([[BOS, 40, 41]])).logits[0, -1].argmax())
    assert best >= 3, "precondition: the greedy token after w40 w41 is a word"
    pairs = [*PAIRS, (words(40, 41), " " + words(best))]
    got = PrunekitLM(model, tokenizer, batch_size=3).loglikelihood(requests(*pairs))
    assert len(got) == len(pairs)
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        expected, expected_greedy = direct_score(
            model, [BOS, *word_ids(context)], word_ids(continuation)
        )
        assert logprob == pytest.approx(expected, abs=1e-4), (context, continuation)
        assert greedy == expected_greedy
    assert got[-1][1] is True


def test_loglikelihood_keeps_continuation_when_truncating(tokenizer):
    model = tiny_llama()
    context, continuation = words(*range(3, 23)), " " + words(30, 31)
    ((logprob, _),) = PrunekitLM(model, tokenizer, max_length=6).loglikelihood(
        requests((context, continuation))
    )
    # max_length 6: the input is the last 6 of the 7 tokens preceding the end
    expected, _ = direct_score(model, word_ids(context)[-5:], [30, 31])
    assert logprob == pytest.approx(expected, abs=1e-4)


def test_loglikelihood_rolling_sums_disjoint_windows(tokenizer):
    model = tiny_llama()
    long_doc, short_doc = words(*range(3, 23)), words(50, 51, 52)
    lm = PrunekitLM(model, tokenizer, batch_size=2, max_length=8)
    got = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), idx=0) for t in (long_doc, short_doc, "")]
    )
    # the short document fits one window: its tokens given BOS
    assert got[1] == pytest.approx(direct_score(model, [BOS], [50, 51, 52])[0], abs=1e-4)
    # the long one in lm-eval's disjoint windows of 8: [BOS] -> t0..t7; t7 -> t8..t15 (each
    # token with up to 8 of context); t11..t15 -> t16..t19 (the last window keeps 8 inputs)
    t = word_ids(long_doc)
    expected = (
        direct_score(model, [BOS], t[:8])[0]
        + direct_score(model, t[7:8], t[8:16])[0]
        + direct_score(model, t[11:16], t[16:20])[0]
    )
    assert got[0] == pytest.approx(expected, abs=1e-4)
    assert got[2] == 0.0


@pytest.mark.parametrize("kind", ["dense", "static"])
def test_scores_do_not_depend_on_padding(tokenizer, kind):
    model = tiny_llama(seed=1)
    if kind == "static":
        calibration = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
        outcome = prunekit.prune(
            model, None, method="wanda-sp", ratio=0.4, calibration=calibration, skip_layers=[]
        )
        assert not outcome.dynamic and outcome.params_kept < sum(
            p.numel() for p in tiny_llama(seed=1).parameters()
        )
        model = outcome.model
    short = (words(3, 4), " " + words(5))
    longer = [(words(*range(10, 40)), " " + words(41, 42)), (words(*range(50, 70)), " w71")]
    alone = PrunekitLM(model, tokenizer, batch_size=1).loglikelihood(requests(short))
    batched = PrunekitLM(model, tokenizer, batch_size=3).loglikelihood(
        requests(*longer[:1], short, *longer[1:])
    )
    assert batched[1][0] == pytest.approx(alone[0][0], abs=1e-5)
    assert batched[1][1] == alone[0][1]


# ------------------------------------------------------------------------------------------
# a dynamic model (Probe Pruning)
# ------------------------------------------------------------------------------------------


@pytest.fixture
def pp_model(tokenizer):
    calibration = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    outcome = prunekit.prune(
        tiny_llama(seed=2),
        tokenizer,
        method="pp",
        ratio=0.4,
        calibration=calibration,
        skip_layers=[],
    )
    assert outcome.dynamic
    return outcome.model


def test_dynamic_model_through_the_bridge(tokenizer, pp_model):
    lm = PrunekitLM(pp_model, tokenizer, batch_size=3)
    first = lm.loglikelihood(requests(*PAIRS))
    assert all(math.isfinite(logprob) for logprob, _ in first)
    # every call starts from the post-calibration state (reset + warm-up), so it repeats
    assert lm.loglikelihood(requests(*PAIRS)) == first
    # ... and is prunekit's own scoring of the same requests in the same order
    pairs = [encode_pair(tokenizer, c, k) for c, k in PAIRS]
    own = score_requests(pp_model, pairs, batch_size=3, pad_id=tokenizer.pad_token_id)
    assert [(s.logprob, s.greedy) for s in own] == first
    # the pruning is really applied: the dense model (same weights) scores differently
    dense = PrunekitLM(tiny_llama(seed=2), tokenizer, batch_size=3).loglikelihood(requests(*PAIRS))
    assert max(abs(a[0] - b[0]) for a, b in zip(first, dense, strict=True)) > 1e-3


def test_dynamic_model_generates_with_held_decisions(tokenizer, pp_model):
    # MHA: the KV cache holds only the kept heads, so decoding must keep the prompt's decision
    lm = PrunekitLM(pp_model, tokenizer)
    request = Instance("generate_until", {}, (words(3, 4, 5, 6), {"max_gen_toks": 6}), idx=0)
    out = lm.generate_until([request, request])
    assert out[0] == out[1]
    # reference: no KV cache, the decision taken on the prompt held for every full forward
    pp_model.reset_state()
    ids = torch.tensor([[BOS, 3, 4, 5, 6]])
    with torch.no_grad(), pp_model.hold():
        for _ in range(6):
            nxt = pp_model(input_ids=ids).logits[0, -1].argmax()
            if nxt == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert out[0] == tokenizer.decode(ids[0, 5:], skip_special_tokens=True)
    assert out[0]


# ------------------------------------------------------------------------------------------
# generate_until
# ------------------------------------------------------------------------------------------


def test_generate_until_stops_at_the_stop_string(tokenizer):
    model = tiny_llama(seed=1)
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    lm = PrunekitLM(model, tokenizer)
    context = words(3, 4, 5)

    def generate(gen_kwargs):
        calls.clear()
        text = lm.generate_until([Instance("generate_until", {}, (context, gen_kwargs), idx=0)])
        return text[0], len(calls)

    full, steps = generate({"until": [], "max_gen_toks": 8})
    generated = full.split()
    assert steps == len(generated) == 8
    # stop on a word (the 4th or later) that does not occur in the text before it
    k = next(i for i, w in enumerate(generated) if i >= 3 and w not in " ".join(generated[:i]))
    stop = generated[k]
    text, steps = generate({"until": [stop], "max_gen_toks": 8, "do_sample": False})
    assert text == full[: full.index(stop)]
    assert steps == k + 1  # generation stopped right after the stop string appeared
    with pytest.raises(ValueError, match="greedily"):
        generate({"until": [], "do_sample": True, "temperature": 0.7})
    with pytest.raises(ValueError, match="no room"):
        generate({"max_gen_toks": 600})


# ------------------------------------------------------------------------------------------
# construction
# ------------------------------------------------------------------------------------------


def test_bad_arguments_are_explained(tokenizer):
    model = tiny_llama()
    with pytest.raises(ValueError, match="automatic batch size"):
        PrunekitLM(model, tokenizer, batch_size="auto")
    with pytest.raises(ValueError, match="max_length"):
        PrunekitLM(model, tokenizer, max_length=1)
    with pytest.raises(ValueError, match="tokenizer"):
        PrunekitLM(model, None)
    with pytest.raises(ValueError, match=r"recipe=<recipe\.yaml>"):
        PrunekitLM.create_from_arg_string("batch_size=4")
    with pytest.raises(ValueError, match="unknown model_args"):
        PrunekitLM.create_from_arg_string("recipe=x.yaml,pretrained=gpt2")
    lm = PrunekitLM(model, tokenizer, batch_size="8")
    assert lm.batch_size == 8


def test_prunekit_does_not_import_lm_eval():
    code = (
        "import sys, prunekit, prunekit.runner, prunekit.cli, prunekit.evaluation.zeroshot; "
        "sys.exit('lm_eval' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# ------------------------------------------------------------------------------------------
# the real model and data: a local task through lm_eval.simple_evaluate
# ------------------------------------------------------------------------------------------


def _pk_tasks():
    path = ROOT / "benchmarks" / "lm_eval_tasks" / "pk_tasks.py"
    spec = importlib.util.spec_from_file_location("pk_tasks_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.smollm2
def test_simple_evaluate_matches_prunekit_evaluation(smollm2, shared_data, tmp_path, monkeypatch):
    import datasets
    from lm_eval.tasks import TaskManager

    from prunekit.data.tasks import load_questions, locate_task

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    tasks = ("arc_easy", "winogrande")  # shared context / one context per choice
    include = _pk_tasks().render(tmp_path / "tasks", shared_data, tasks)
    limit = 3  # 18 requests: one batch
    result = lm_eval.simple_evaluate(
        model=PrunekitLM(smollm2.model, smollm2.tokenizer, batch_size=20),
        tasks=[f"pk_{t}" for t in tasks],
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(include), include_defaults=False),
    )
    for task in tasks:
        questions = load_questions(locate_task(task, shared_data), limit)
        own = evaluate_questions(smollm2.model, smollm2.tokenizer, questions, batch_size=20)
        samples = sorted(result["samples"][f"pk_{task}"], key=lambda s: s["doc_id"])
        assert len(samples) == limit
        for q, record, sample in zip(questions, own["records"], samples, strict=True):
            assert [tuple(a[:2]) for a in sample["arguments"]] == list(
                zip(q.contexts, q.continuations, strict=True)
            )
            lls = [r[0] for r in sample["filtered_resps"]]
            assert lls == pytest.approx([-x for x in record["nll"]], abs=1e-4)
            assert max(range(len(lls)), key=lls.__getitem__) == record["pred"]
            assert sample["acc"] == float(record["pred"] == q.gold)
        assert result["results"][f"pk_{task}"]["acc,none"] == pytest.approx(own["acc"])


def test_model_args_recipe_builds_the_pruned_model(tokenizer, tmp_path):
    """``--model prunekit --model_args recipe=...,set=...``: load, prune, no evaluation."""
    import yaml

    tiny_llama(seed=4).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"id": str(tmp_path / "tiny")},
                "method": {"name": "dense", "ratio": 0.0},
                "evaluation": {"perplexity": []},
            }
        )
    )
    lm = lm_eval.api.registry.get_model("prunekit").create_from_arg_string(
        f"recipe={recipe},set=method.name=pp-fullbatch;method.ratio=0.4;method.skip_layers=[],"
        "batch_size=4,max_length=256",
        {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"},  # lm-eval's CLI defaults
    )
    assert (lm.batch_size, lm.max_length) == (4, 256)  # model_args win over lm-eval's --batch_size
    assert lm.device.type == "cpu"  # the recipe's device; lm-eval's default cuda:0 is not used
    assert (lm.recipe.method.name, lm.recipe.method.ratio) == ("pp-fullbatch", 0.4)
    assert lm.outcome.dynamic and lm.model is lm.outcome.model
    assert [row["heads"] for row in lm.outcome.structure] == [3, 3, 3, 3]
    got = lm.loglikelihood(requests(*PAIRS))
    dense = PrunekitLM(tiny_llama(seed=4), tokenizer, batch_size=4).loglikelihood(requests(*PAIRS))
    assert all(math.isfinite(logprob) for logprob, _ in got)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, dense, strict=True)) > 1e-3
