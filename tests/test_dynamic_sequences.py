"""Per-sequence kept sets, decisions on the prompt, and generation with dynamic pruning.

A toy controller that decides from each row alone checks the runtime on every tiny
architecture (MHA, GQA, sliding windows, OPT, Gemma-3, Qwen3); ``pp-seq`` checks the same on PP;
generation checks that decoding steps reuse the prompt's kept sets and that the KV cache is
consistent with them.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlamaForCausalLM

import prunekit
from prunekit.components import ATTN, MLP, DynamicProtocol
from prunekit.pruning.dynamic import DynamicModel
from prunekit.registry import resolve_adapter
from prunekit.rows import RowUnion, row_union
from prunekit.testing import tiny_gemma3, tiny_llama, tiny_mistral, tiny_opt, tiny_phi3, tiny_qwen3

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")

#: the cache keyword of this transformers version (``cache`` from 5.24, ``past_key_values`` before)
CACHE = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else ("past_key_values")
)


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


MODELS = {
    "llama-mha": lambda: tiny_llama(heads=4, kv_heads=4),
    "llama-gqa": lambda: tiny_llama(heads=6, kv_heads=2, intermediate=96),
    "mistral-sliding": lambda: tiny_mistral(sliding_window=5),
    "opt": lambda: tiny_opt(),
    "gemma3": lambda: tiny_gemma3(),
    "phi3-mha-longrope": lambda: tiny_phi3(kv_heads=4, longrope=4, partial_rotary_factor=0.5),
    "qwen3-sliding": lambda: tiny_qwen3(sliding_window=5),
}


class RowController:
    """Decides each row's kept set from that row alone: the units whose output-projection
    rows meet the row's mean input best (a deterministic function of the row's tokens)."""

    def __init__(self, adapter, keep_fraction=0.5, per_batch=False):
        self.adapter, self.keep_fraction, self.per_batch = adapter, keep_fraction, per_batch
        self.calls = 0

    def decide(self, layer, group, x, residual, batch):
        self.calls += 1
        units = layer.units(group)
        keep = max(1, int(units * self.keep_fraction))
        mask = batch.token_mask.unsqueeze(-1).to(x.dtype)
        mean = (x * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B, d]
        w = layer.output_projection(group).weight.detach()  # [d, C]
        scores = (mean @ w).abs()  # [B, C]
        scores = scores.view(scores.shape[0], units, -1).sum(-1)
        kept = scores.topk(keep, dim=1).indices
        return kept[:1].expand(x.shape[0], -1)[0] if self.per_batch else kept

    def wants_activations(self, layer, group):
        return False

    def observe(self, *args):
        raise AssertionError("not asked")


def _dynamic(model, **kw):
    adapter = resolve_adapter(model)
    controller = RowController(adapter, **kw)
    protocol = DynamicProtocol(decides="sequence", observes=())
    return DynamicModel(model, adapter, controller, protocol=protocol), controller


def _prompts(vocab, n=3, seq=10, seed=4):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _distinct(kept):
    return torch.unique(kept.sort(dim=1).values, dim=0).shape[0]


def test_row_union_masks_each_rows_units():
    kept = torch.tensor([[3, 1], [0, 2], [1, 3], [2, 5]])
    union = row_union(kept)
    assert isinstance(union, RowUnion)
    assert union.units.tolist() == [0, 1, 2, 3, 5]
    assert union.mask.tolist() == [
        [0, 1, 0, 1, 0],
        [1, 0, 1, 0, 0],
        [0, 1, 0, 1, 0],
        [0, 0, 1, 0, 1],
    ]
    assert torch.equal(union.kept, kept.sort(dim=1).values)
    beams = union.select(torch.tensor([3, 3, 0]))
    assert beams.kept.tolist() == [[2, 5], [2, 5], [1, 3]] and beams.units is union.units
    same = row_union(torch.tensor([[1, 2], [2, 1]]))  # every row agrees: the fast path
    assert not isinstance(same, RowUnion) and same.tolist() == [1, 2]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_row_gets_the_logits_it_gets_alone(name):
    model = MODELS[name]()
    dyn, controller = _dynamic(model)
    ids = _prompts(model.config.vocab_size)
    ids = torch.cat([ids, ids[:1]])  # rows 0 and 3 share their kept sets
    with torch.no_grad():
        together = dyn(input_ids=ids).logits
        kept = dyn.decisions[(1, MLP)]
        assert kept.shape[0] == 4 and torch.equal(kept[0], kept[3])
        assert _distinct(kept) == 3  # three distinct sets: really per row
        for b in range(ids.shape[0]):
            alone = dyn(input_ids=ids[b : b + 1]).logits
            torch.testing.assert_close(together[b : b + 1], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("step_tokens", [3, 1])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_decoding_matches_a_full_forward_with_the_same_kept_sets(name, step_tokens):
    """The KV cache stays consistent with each row's kept heads: continuation forwards
    through the cache (3 tokens at once, or one at a time as decoding runs, where uneven GQA
    groups run as zero-padded query slots on the cache as it is) equal a cache-free forward
    of prompt + continuation with the prompt's kept sets held (in float64, where both are
    exact: fp32 differs by kernel noise only)."""
    model = MODELS[name]().double()
    dyn, _ = _dynamic(model)
    vocab = model.config.vocab_size
    prompt, more = _prompts(vocab, seq=7), _prompts(vocab, seq=3, seed=9)
    with torch.no_grad():
        out = dyn(input_ids=prompt, use_cache=True)
        steps = []
        for i in range(0, 3, step_tokens):
            out = dyn(
                input_ids=more[:, i : i + step_tokens], use_cache=True, **{CACHE: _cache_of(out)}
            )
            steps.append(out.logits)
        with dyn.hold():
            dyn(input_ids=prompt)  # decides on the prompt, as above
            full = dyn(input_ids=torch.cat([prompt, more], 1)).logits
    torch.testing.assert_close(torch.cat(steps, 1), full[:, -3:], atol=1e-10, rtol=0)


def test_a_continuation_needs_its_prompts_decisions():
    model = tiny_llama()
    dyn, _ = _dynamic(model)
    ids = _prompts(model.config.vocab_size)
    with torch.no_grad():
        out = dyn(input_ids=ids, use_cache=True)
        with pytest.raises(RuntimeError, match="decided for 3 prompts, this continuation has 1"):
            cache = _cache_of(out)
            cache.batch_select_indices(torch.tensor([0]))
            dyn(input_ids=ids[:1, :1], **{CACHE: cache})


def _pp(model, method, ratio=0.4, **kw):
    kw.setdefault("skip_layers", [0])
    kw.setdefault("round_to", 1)
    calibration = torch.randint(
        3, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1)
    )
    return prunekit.prune(model, None, method=method, ratio=ratio, calibration=calibration, **kw)


@pytest.mark.parametrize("heads,kv", [(4, 4), (6, 2)])
def test_pp_seq_rows_match_running_alone(heads, kv):
    model = tiny_llama(heads=heads, kv_heads=kv, intermediate=96)
    outcome = _pp(model, "pp-seq")
    dyn = outcome.model
    assert dyn.protocol.decides == "sequence"
    ids = _prompts(model.config.vocab_size, n=4, seq=16)
    with torch.no_grad():
        dyn.reset_state()
        together = dyn(input_ids=ids).logits
        kept = dyn.decisions[(1, MLP)]
        assert kept.shape == (4, dyn.controller.counts[(1, MLP)]) and _distinct(kept) > 1
        for b in range(ids.shape[0]):
            dyn.reset_state()  # each row alone from the same history
            alone = dyn(input_ids=ids[b : b + 1]).logits
            torch.testing.assert_close(together[b : b + 1], alone, atol=ATOL, rtol=0)


def test_pp_seq_history_update_averages_the_rows_that_kept_each_channel():
    from prunekit_plugins.pp.history import Ema

    history = torch.ones(4, 6)
    x = torch.tensor([[[1.0, 2.0]] * 3, [[3.0, 4.0]] * 3])  # [B=2, T=3, K=2]
    kept = torch.tensor([[0, 1], [1, 5]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    pos = torch.arange(3).expand(2, 3)
    Ema(momentum=0.5).update(history, {}, kept, x, mask, pos)
    want = torch.ones(4, 6)
    want[:3, 0] = 0.5 + 0.5 * 1.0  # row 0 only
    want[:3, 1] = 0.5 + 0.5 * (4.0 + 9.0) / 2  # both rows
    want[:3, 5] = 0.5 + 0.5 * 16.0  # row 1 only
    torch.testing.assert_close(history, want)


@pytest.mark.parametrize("method", ["pp", "pp-seq", "pp-fullbatch", "pp-history"])
def test_greedy_generation_at_ratio_zero_is_dense(method):
    model = tiny_llama(heads=4, kv_heads=4)
    prompt = _prompts(model.config.vocab_size, n=2, seq=8)
    with torch.no_grad():
        dense = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        outcome = _pp(model, method, ratio=0.0)
        got = outcome.model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, dense)


@pytest.mark.parametrize("method", ["pp", "pp-seq"])
def test_decoding_steps_reuse_the_prompts_kept_sets(method):
    model = tiny_llama(heads=6, kv_heads=2, intermediate=96, layers=4)
    outcome = _pp(model, method)
    dyn = outcome.model
    calls = []
    decide = dyn.controller.decide
    dyn.controller.decide = lambda *a: calls.append(a[0].index) or decide(*a)
    prompt = _prompts(model.config.vocab_size, n=2, seq=8)
    with torch.no_grad():
        out = dyn.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13)
    # one decision per block (2 per layer) on the prompt, none for the 4 decoding steps
    assert len(calls) == 2 * model.config.num_hidden_layers
    kept = dyn.decisions[(1, ATTN)]
    keep = dyn.controller.counts[(1, ATTN)]
    assert keep < 6 and kept.shape == ((keep,) if method == "pp" else (2, keep))


def test_a_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny_llama(heads=4, kv_heads=4, intermediate=96)
    outcome = _pp(model, "pp-seq")
    dyn = outcome.model
    lengths = [9, 6, 4]
    prompts = [_prompts(model.config.vocab_size, n=1, seq=n, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):  # left padding
        ids[b, width - p.numel() :] = p
        mask[b, width - p.numel() :] = 1
    with torch.no_grad():
        dyn.reset_state()
        batch = dyn.generate(
            ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
        )[:, width:]
        for b, p in enumerate(prompts):
            dyn.reset_state()
            alone = dyn.generate(p[None], max_new_tokens=5, do_sample=False, pad_token_id=0)[
                :, p.numel() :
            ]
            assert torch.equal(batch[b : b + 1], alone), b


def test_pooled_topk_keeps_each_row_inside_the_batchs_pool():
    from prunekit.rows import pooled_topk

    scores = torch.tensor([[9.0, 8.0, 1.0, 0.0, 7.0], [0.0, 1.0, 90.0, 80.0, 70.0]])
    # no pool: each row's own top 2
    assert pooled_topk(scores, 2).tolist() == [[0, 1], [2, 3]]
    # pool of 3 by the mean of each row's scores scaled to its max:
    # [0.5, 0.456, 0.556, 0.444, 0.778] -> units 4, 2, 0
    assert pooled_topk(scores, 2, 3).tolist() == [[0, 4], [2, 4]]
    assert pooled_topk(scores, 2, 1).tolist() == [[2, 4], [2, 4]]  # a pool under keep: keep
    assert pooled_topk(scores, 5, 2).tolist() == [[0, 1, 2, 3, 4]] * 2


def test_pp_seq_pool_bounds_the_union_and_is_checked():
    from prunekit.errors import PrunekitError

    model = tiny_llama(heads=4, kv_heads=4, intermediate=96)
    dyn = _pp(model, "pp-seq", pool=0.6).model
    ids = _prompts(model.config.vocab_size, n=6, seq=16)
    with torch.no_grad():
        dyn(input_ids=ids)
    keep = dyn.controller.counts[(1, MLP)]
    kept = dyn.decisions[(1, MLP)]
    assert kept.shape == (6, keep) and torch.unique(kept).numel() <= max(keep, 58)
    with pytest.raises(PrunekitError, match=r"method.pool: 0 is not a fraction"):
        _pp(tiny_llama(), "pp-seq", pool=0)
