"""Prompt-then-continuation evaluation, methods that decide on the prompt, and the
``prunekit generate`` / ``prunekit bench --generate`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunekit.cli import main
from prunekit.components import MLP, DynamicProtocol
from prunekit.evaluation.generation import greedy, left_padded
from prunekit.evaluation.perplexity import cache_keyword, output_cache, perplexity
from prunekit.evaluation.zeroshot import score_requests
from prunekit.pruning.dynamic import DynamicModel
from prunekit.recipe import load_recipe
from prunekit.registry import resolve_adapter
from prunekit.testing import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


class PromptController:
    """Decides on the prompt (after observing it): per row, the MLP channels with the largest
    mean square over the row's real prompt tokens; attention whole."""

    def __init__(self, keep: int | None):
        self.keep, self.decisions, self.observed = keep, 0, 0

    def wants_activations(self, layer, group):
        return group == MLP

    def observe(self, layer, group, kept, activations, batch):
        assert kept is None  # the prompt runs dense
        m = batch.token_mask.unsqueeze(-1).to(activations.dtype)
        self.energy = (activations.square() * m).sum(1)  # [B, C]
        self.observed += 1

    def decide(self, layer, group, x, residual, batch):
        if group != MLP or self.keep is None:
            return None
        self.decisions += 1
        return self.energy.topk(self.keep, dim=1).indices


def _prompt_method(model, keep):
    controller = PromptController(keep)
    protocol = DynamicProtocol(decides="prompt", observes=("activations",))
    return DynamicModel(model, resolve_adapter(model), controller, protocol), controller


def _windows(n=6, seq=20, seed=3):
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_prompt_tokens_scores_the_continuation_only():
    model = tiny_llama()
    windows = _windows()
    full = perplexity(model, windows, batch_size=3)
    cont = perplexity(model, windows, batch_size=3, prompt_tokens=8)
    assert full["tokens"] == 6 * 19 and cont["tokens"] == 6 * 11 and cont["prompt_tokens"] == 8
    # dense: the cached continuation scores the same tokens as one full forward
    with torch.no_grad():
        logits = model(windows).logits[:, 8:-1].float().log_softmax(-1)
    nll = -logits.gather(-1, windows[:, 9:, None]).mean().item()
    assert cont["nll"] == pytest.approx(nll, abs=1e-5)


def test_a_prompt_method_is_dense_on_the_prompt_and_pruned_on_the_continuation():
    model = tiny_llama(intermediate=96)
    windows = _windows()
    dense = perplexity(model, windows, batch_size=3, prompt_tokens=8)["ppl"]
    dyn, controller = _prompt_method(model, keep=96)
    assert perplexity(dyn, windows, batch_size=3, prompt_tokens=8)["ppl"] == pytest.approx(
        dense, rel=1e-5
    )  # all channels kept
    dyn.controller.keep = 24
    assert perplexity(dyn, windows, batch_size=3)["ppl"] == pytest.approx(
        perplexity(model, windows, batch_size=3)["ppl"], rel=1e-5
    )  # whole window = prompt
    pruned = perplexity(dyn, windows, batch_size=3, prompt_tokens=8)["ppl"]
    assert pruned > dense * 1.01
    assert controller.observed and controller.decisions


def test_zero_shot_scoring_runs_the_context_as_the_prompt():
    model = tiny_llama(intermediate=96)
    pairs = [([5, 6, 7, 8], [9, 10]), ([11, 12], [13]), ([14, 15, 16], [17, 18, 19])]
    dense = score_requests(model, pairs, batch_size=3)
    dyn, _ = _prompt_method(model, keep=96)
    same = score_requests(dyn, pairs, batch_size=3)
    for a, b in zip(dense, same, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.greedy == b.greedy
    dyn.controller.keep = 12
    pruned = score_requests(dyn, pairs, batch_size=3)
    # the first continuation token comes from the (dense) prompt, the others are pruned
    assert pruned[1].logprob == pytest.approx(dense[1].logprob, abs=1e-4)
    assert pruned[2].logprob != pytest.approx(dense[2].logprob, abs=1e-3)


def test_greedy_loop_matches_hf_generate_with_left_padding():
    model = tiny_llama()
    tok = tiny_tokenizer()
    ids, mask = left_padded(tok, ["a b c d e", "f g"], bos_id=None)
    assert mask[1, 0] == 0 and mask[1, -1] == 1
    ours, prefill, decode = greedy(model, ids, mask, 5)
    with torch.no_grad():
        hf = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
        )[:, ids.shape[1] :]
    assert torch.equal(ours, hf) and prefill > 0 and decode > 0


def test_prompt_tokens_must_leave_a_continuation():
    from prunekit.errors import RecipeError

    with pytest.raises(RecipeError, match="prompt_tokens 63 leaves fewer than 2 tokens"):
        load_recipe({"evaluation": {"perplexity": [{"seq_len": 64, "prompt_tokens": 63}]}})


def test_generate_needs_a_prompt(capsys):
    assert main(["generate", str(ROOT / "recipes" / "pp_smollm2.yaml")]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_generate_past_the_models_context_is_refused_before_generating(tmp_path, capsys):
    model_dir = tmp_path / "tiny"  # 512 positions
    tiny_llama(layers=4).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{id: {model_dir}}}\nmethod: {{name: dense}}\nevaluation: {{perplexity: []}}\n"
    )
    args = ["generate", str(recipe), "-q", "--prompt", "the cat sat"]
    assert main([*args, "-n", "600"]) == 2
    err = capsys.readouterr().err
    assert "plus --max-new-tokens 600" in err and "past the model's context (512 positions)" in err
    assert "Traceback" not in err
    assert main([*args, "-n", "2"]) == 0
    assert "> the cat sat" in capsys.readouterr().out
    # prunekit bench --generate: prompts cut to --prompt-tokens, checked before weights load
    bench = [
        "bench",
        str(recipe),
        "--generate",
        "-q",
        "-o",
        str(tmp_path / "b"),
        "--prompt-tokens",
        "500",
        "-n",
        "13",
        "--prompt",
        "the cat sat",
    ]
    assert main(bench) == 2
    err = capsys.readouterr().err
    assert "--prompt-tokens 500 plus --max-new-tokens 13 is 513 tokens" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.smollm2
def test_generate_at_ratio_zero_prints_the_dense_continuation(smollm2, capsys):
    prompts = ["The capital of France is", "Water boils at"]
    args = [
        "generate",
        str(ROOT / "recipes" / "pp_smollm2.yaml"),
        "-n",
        "6",
        "-q",
        "--set",
        "method.ratio=0",
        "--set",
        "calibration.samples=4",
        "--set",
        "calibration.seq_len=64",
        "--set",
        "evaluation.perplexity.0.seq_len=64",
    ]
    for p in prompts:
        args += ["--prompt", p]
    assert main([*args, "--set", "method.name=dense"]) == 0
    dense = capsys.readouterr().out
    assert main([*args, "--set", "method.name=pp-seq"]) == 0
    assert capsys.readouterr().out == dense and dense.count("> ") == 2


@pytest.mark.smollm2
def test_bench_generate_writes_a_generation_section(smollm2, tmp_path, capsys):
    out = tmp_path / "g"
    args = [
        "bench",
        str(ROOT / "recipes" / "pp_smollm2.yaml"),
        "--generate",
        "-o",
        str(out),
        "--prompt-tokens",
        "16",
        "-n",
        "3",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "-q",
        "--set",
        "calibration.samples=4",
        "--set",
        "calibration.seq_len=64",
        "--set",
        "evaluation.perplexity.0.batch_size=2",
        "--set",
        "evaluation.perplexity.0.windows=2",
        "--set",
        "evaluation.perplexity.0.seq_len=64",
    ]
    assert main(args) == 0
    gen = json.loads((out / "results.json").read_text())["generation"]
    assert gen["batch"] == 2 and gen["prompt_tokens"] == 32 and gen["interleaved"]
    for name in ("dense", "pruned"):
        assert len(gen[name]["prefill_s_all"]) == len(gen[name]["decode_s_all"]) == 1
        assert gen[name]["decode_tokens_per_s"] > 0
    # pp at 0.4: a decoding step reads the gathered weights, held once for the continuation
    dense, pruned = gen["dense"]["step"], gen["pruned"]["step"]
    assert pruned["weight_bytes"] < 0.8 * dense["weight_bytes"] and dense["held_weight_bytes"] == 0
    assert 0 < pruned["held_weight_bytes"] < dense["weight_bytes"]
    assert gen["decode_bytes_limit"] == pytest.approx(dense["total_bytes"] / pruned["total_bytes"])
    out = capsys.readouterr().out
    assert "decode" in out and "bytes limit" in out and "MiB of weights" in out


def test_last_token_split_scores_all_but_the_last_answer_token_dense():
    """GRIFFIN's reference classification mode: everything but the last input token is the
    prompt, so every answer token but the last is predicted densely and the last one by the
    pruned token (checked against direct forwards)."""
    import dataclasses

    model = tiny_llama(intermediate=96)
    pairs = [([5, 6, 7, 8], [9, 10, 11]), ([11, 12], [13]), ([14, 15, 16], [17, 18])]
    dyn, _ = _prompt_method(model, keep=12)
    dyn.runtime.protocol = dataclasses.replace(dyn.protocol, prompt_split="last_token")
    got = score_requests(dyn, pairs, batch_size=3)
    with torch.no_grad():
        for (ctx, cont), score in zip(pairs, got, strict=True):
            full = torch.tensor([ctx + cont])
            with dyn.dense():
                dense = model(input_ids=full).logits[0].log_softmax(-1)
            want = sum(dense[len(ctx) - 1 + j, cont[j]].item() for j in range(len(cont) - 1))
            out = dyn(input_ids=full[:, :-2], use_cache=True)
            step = dyn(
                input_ids=full[:, -2:-1], use_cache=True, **{cache_keyword(dyn): output_cache(out)}
            ).logits
            want += step[0, -1].log_softmax(-1)[cont[-1]].item()
            assert score.logprob == pytest.approx(want, abs=1e-4)
            assert score.tokens == len(cont)
