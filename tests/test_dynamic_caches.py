"""Dynamic methods with every KV cache class, interleaved generations and prompt-decided heads.

Each check has an independent reference: the same rows run alone (each row's kept set decided
from that row only), a dynamic cache, or a statically sliced copy of the model continuing a
dense prompt's cache narrowed by hand. Float64 and one thread, so that tolerances only absorb
summation order.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, QuantizedCache, StaticCache

import prunekit
from prunekit.components import ATTN, MLP, DynamicProtocol
from prunekit.evaluation.perplexity import cache_keyword, output_cache
from prunekit.pruning.dynamic import DynamicModel
from prunekit.registry import resolve_adapter
from prunekit.rows import row_union, select_cache_heads
from prunekit.testing import (
    tiny_gemma3,
    tiny_llama,
    tiny_mistral,
    tiny_opt,
    tiny_phi3,
    tiny_qwen2,
    tiny_qwen3,
)

ATOL = 1e-9
#: the cache keyword of this transformers version (``cache`` from 5.24, ``past_key_values`` before)
CACHE = cache_keyword(tiny_llama(layers=1))

MODELS = {
    "llama-mha": lambda: tiny_llama(heads=4, kv_heads=4, layers=3, dtype=torch.float64),
    "llama-gqa": lambda: tiny_llama(heads=6, kv_heads=2, layers=3, dtype=torch.float64),
    "mistral-sliding": lambda: tiny_mistral(sliding_window=5, dtype=torch.float64),
    "qwen2-sliding": lambda: tiny_qwen2(sliding_window=5, dtype=torch.float64),
    "opt": lambda: tiny_opt(dtype=torch.float64),
    "gemma3": lambda: tiny_gemma3(dtype=torch.float64),
    "gemma3-mha": lambda: tiny_gemma3(kv_heads=4, dtype=torch.float64),
    "phi3-longrope": lambda: tiny_phi3(longrope=4, partial_rotary_factor=0.5, dtype=torch.float64),
    "phi3-mha-sliding": lambda: tiny_phi3(kv_heads=4, sliding_window=5, dtype=torch.float64),
    "qwen3-sliding": lambda: tiny_qwen3(sliding_window=5, dtype=torch.float64),
    "qwen3-mha": lambda: tiny_qwen3(kv_heads=4, attention_bias=True, dtype=torch.float64),
}
MHA = ["llama-mha", "opt", "gemma3-mha", "qwen3-mha", "phi3-mha-sliding"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _full_attention_only(model) -> bool:
    types = getattr(model.config, "layer_types", None)
    return getattr(model.config, "sliding_window", None) is None and (
        types is None or set(types) == {"full_attention"}
    )


def _cache(kind: str, model, length: int):
    config = model.config
    if kind == "dynamic":
        return DynamicCache(config=config)
    if kind == "static":
        return StaticCache(config=config, max_cache_len=length)
    if kind == "offloaded":
        return DynamicCache(config=config, offloading=True)
    if kind == "offloaded_static":
        return StaticCache(config=config, max_cache_len=length, offloading=True)
    if kind == "fp8":
        return QuantizedCache(backend="fp8", config=config)
    raise ValueError(kind)


CACHES = ["dynamic", "static", "fp8", "offloaded", "offloaded_static"]


class RowController:
    """Per row (decides="sequence"), from that row's real tokens only: the units whose output
    projection columns meet the row's mean input best; ``groups`` picks which blocks."""

    def __init__(self, keep_fraction=0.5, groups=(ATTN, MLP)):
        self.keep_fraction, self.groups, self.calls = keep_fraction, groups, 0

    def decide(self, layer, group, x, residual, batch):
        if group not in self.groups:
            return None
        self.calls += 1
        units = layer.units(group)
        keep = max(1, int(units * self.keep_fraction))
        mask = batch.token_mask.unsqueeze(-1).to(x.dtype)
        mean = (x * mask).sum(1) / mask.sum(1).clamp(min=1)
        w = layer.output_projection(group).weight.detach()
        scores = (mean @ w).abs().view(x.shape[0], units, -1).sum(-1)
        return scores.topk(keep, dim=1).indices

    def wants_activations(self, layer, group):
        return False


class PromptHeads(RowController):
    """Decides on the prompt (which ran dense), per row: attention heads (and MLP channels)."""

    def wants_activations(self, layer, group):
        return True

    def observe(self, layer, group, kept, activations, batch):
        assert kept is None  # the prompt runs dense


def _dynamic(model, controller=None, decides="sequence"):
    controller = controller or RowController()
    observes = ("activations",) if decides == "prompt" else ()
    protocol = DynamicProtocol(decides=decides, observes=observes)
    return DynamicModel(model, resolve_adapter(model), controller, protocol=protocol)


def _batch(vocab, lengths=(8, 8, 5), seed=3):
    """Left-padded prompts of different lengths: ``(ids, mask, rows)``."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - r.numel() :] = r
        mask[b, width - r.numel() :] = 1
    return ids, mask, rows


def _steps(dyn, ids, mask, cache, follow):
    """Prefill then one forward per column of ``follow`` ([B, n] tokens); every logits."""
    out = dyn(input_ids=ids, attention_mask=mask, **{CACHE: cache}, use_cache=True)
    logits = [out.logits]
    for t in range(follow.shape[1]):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = dyn(
            input_ids=follow[:, t : t + 1],
            attention_mask=mask,
            **{CACHE: output_cache(out)},
            use_cache=True,
        )
        logits.append(out.logits)
    return logits


@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_cache_class_gives_each_row_its_own_logits(name, cache_kind):
    """Rows with different kept sets in one batch, every cache class: prefill and decoding
    logits equal each row run alone with a dynamic cache (the static cache advanced once per
    row group before, and gave logits off by up to 8.8 without an error)."""
    if cache_kind.startswith("offloaded") and not torch.cuda.is_available():
        pytest.skip("transformers offloads caches with CUDA streams")
    model = MODELS[name]()
    if cache_kind == "fp8" and not _full_attention_only(model):
        pytest.skip("transformers' QuantizedCache holds full-attention layers only")
    dyn = _dynamic(model)
    vocab = model.config.vocab_size
    ids, mask, rows = _batch(vocab)
    follow = torch.randint(3, vocab, (3, 4), generator=torch.Generator().manual_seed(5))
    length = ids.shape[1] + follow.shape[1]
    with torch.no_grad():
        got = _steps(dyn, ids, mask, _cache(cache_kind, model, length), follow)
        kept = dyn.decisions[(1, MLP)]
        assert not isinstance(row_union(kept), torch.Tensor)  # the rows really differ
        for b, row in enumerate(rows):
            alone = _steps(
                dyn,
                row[None],
                torch.ones(1, row.numel(), dtype=torch.long),
                DynamicCache(config=model.config),
                follow[b : b + 1],
            )
            n = row.numel()
            if cache_kind == "fp8":  # quantized K/V: compared with the dense model's own error
                continue
            torch.testing.assert_close(got[0][b, -n:], alone[0][0], atol=ATOL, rtol=0)
            for step in range(1, len(got)):
                torch.testing.assert_close(got[step][b], alone[step][0], atol=ATOL, rtol=0)
    if cache_kind == "fp8":
        with torch.no_grad():
            exact = _steps(dyn, ids, mask, DynamicCache(config=model.config), follow)
            with dyn.dense():
                dense_fp8 = _steps(dyn, ids, mask, _cache("fp8", model, length), follow)
                dense = _steps(dyn, ids, mask, DynamicCache(config=model.config), follow)
        noise = max(
            (a - b).abs().max().item() for a, b in zip(dense_fp8[1:], dense[1:], strict=True)
        )
        err = max((a - b).abs().max().item() for a, b in zip(got[1:], exact[1:], strict=True))
        assert err <= 4 * noise + 1e-6, (err, noise)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_generate_with_a_static_cache_matches_the_dynamic_cache(name):
    """Hugging Face generate with cache_implementation="static" up to the end of the cache
    (it raised IndexError past max_cache_len / 2) gives the dynamic cache's tokens, which are
    each prompt's tokens alone."""
    model = MODELS[name]()
    dyn = _dynamic(model)
    ids, mask, rows = _batch(model.config.vocab_size)
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        dynamic = dyn.generate(ids, attention_mask=mask, **kw)
        static = dyn.generate(ids, attention_mask=mask, cache_implementation="static", **kw)
        assert torch.equal(static, dynamic)
        for b, row in enumerate(rows):
            alone = dyn.generate(row[None], **kw)[0, row.numel() :]
            assert torch.equal(dynamic[b, ids.shape[1] :], alone), b


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa", "opt"])
def test_interleaved_prompts_keep_their_own_kept_sets(name):
    """Prompt A, then another prompt and a cache-free scoring call, then A's continuation:
    A continues with A's kept sets (it reused the last prompt's before: logits off by 5.9)."""
    model = MODELS[name]()
    dyn = _dynamic(model)
    vocab = model.config.vocab_size
    a, mask_a, _ = _batch(vocab, lengths=(8, 8, 8), seed=11)
    b, mask_b, _ = _batch(vocab, lengths=(8, 8, 8), seed=12)
    follow = torch.randint(3, vocab, (3, 3), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        clean = _steps(dyn, a, mask_a, DynamicCache(config=model.config), follow)
        out_a = dyn(input_ids=a, attention_mask=mask_a, use_cache=True)
        out_b = dyn(input_ids=b, attention_mask=mask_b, use_cache=True)
        dyn(input_ids=b[:2], use_cache=False)  # a scoring call in between
        assert not torch.equal(
            dyn.decisions[(1, MLP)], dyn.decisions_for(output_cache(out_a))[(1, MLP)]
        )
        cache, mask = output_cache(out_a), mask_a
        for t in range(follow.shape[1]):
            mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
            step = dyn(
                input_ids=follow[:, t : t + 1],
                attention_mask=mask,
                **{CACHE: cache},
                use_cache=True,
            )
            torch.testing.assert_close(step.logits, clean[t + 1], atol=ATOL, rtol=0)
            cache = output_cache(step)
        # B's cache still continues with B's kept sets
        more = dyn(
            input_ids=follow[:, :1],
            **{CACHE: output_cache(out_b)},
            use_cache=True,
            attention_mask=torch.cat([mask_b, mask_b.new_ones(3, 1)], 1),
        )
        ref = _steps(dyn, b, mask_b, DynamicCache(config=model.config), follow[:, :1])
        torch.testing.assert_close(more.logits, ref[1], atol=ATOL, rtol=0)


def _greedy_steps(dyn, ids, n):
    out = dyn(input_ids=ids, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    yield token
    for _ in range(n - 1):
        out = dyn(input_ids=token, **{CACHE: output_cache(out)}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        yield token


@pytest.mark.parametrize("method", ["pp", "pp-seq"])
def test_two_generations_alternating_on_one_model(method):
    """Two greedy generations advanced in turns (as a server interleaves requests) produce
    what each produces alone."""
    model = tiny_llama(heads=4, kv_heads=4, intermediate=96, dtype=torch.float64)
    calibration = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    dyn = prunekit.prune(
        model, None, method=method, ratio=0.4, calibration=calibration, skip_layers=[0], round_to=1
    ).model
    g = torch.Generator().manual_seed(21)
    p1, p2 = torch.randint(3, 128, (2, 9), generator=g), torch.randint(3, 128, (3, 6), generator=g)
    with torch.no_grad(), dyn.preserved_state():
        alone1 = torch.cat(list(_greedy_steps(dyn, p1, 5)), 1)
    with torch.no_grad(), dyn.preserved_state():
        alone2 = torch.cat(list(_greedy_steps(dyn, p2, 5)), 1)
    with torch.no_grad(), dyn.preserved_state():
        # each prompt decides from the same history as alone (the first one's EMA update is
        # undone by running the second prompt from a snapshot of the state before it)
        state = dyn.controller.snapshot()
        g1 = _greedy_steps(dyn, p1, 5)
        t1 = [next(g1)]
        dyn.controller.restore(state)
        g2 = _greedy_steps(dyn, p2, 5)
        t2 = [next(g2)]
        for _ in range(4):
            t1.append(next(g1))
            t2.append(next(g2))
    assert torch.equal(torch.cat(t1, 1), alone1) and torch.equal(torch.cat(t2, 1), alone2)


def test_a_continuation_of_an_unknown_cache_is_refused():
    model = MODELS["llama-mha"]()
    dyn = _dynamic(model)
    ids, mask, _ = _batch(model.config.vocab_size)
    with torch.no_grad():
        with dyn.dense():  # filled by the dense layers: this model never decided on it
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        with pytest.raises(RuntimeError, match="that no prompt of this dynamic model filled"):
            dyn(input_ids=ids[:, :1], **{CACHE: copy.deepcopy(output_cache(out))}, use_cache=True)


def _sliced_copy(factory, kept: dict) -> torch.nn.Module:
    """A fresh model from ``factory`` physically sliced to one row's kept sets."""
    model = factory()
    adapter = resolve_adapter(model)
    for la in adapter.layers():
        la.slice(kept.get((la.index, ATTN)), kept.get((la.index, MLP)))
    return model


@pytest.mark.parametrize("cache_kind", ["dynamic", "static", "fp8"])
@pytest.mark.parametrize("name", MHA)
def test_prompt_decided_heads_on_mha_continue_on_a_narrowed_cache(name, cache_kind):
    """A method that decides on the prompt and prunes heads of a multi-head-attention model:
    the prompt ran dense, so its cache holds every head; decoding keeps only each row's heads
    (it crashed in torch.cat). Reference, per row: the dense prompt's cache narrowed to that
    row's heads by hand, continued by a statically sliced copy of the model."""
    factory = MODELS[name]
    model = factory()
    if cache_kind == "fp8" and not _full_attention_only(model):
        pytest.skip("transformers' QuantizedCache holds full-attention layers only")
    dyn = _dynamic(model, PromptHeads(), decides="prompt")
    vocab = model.config.vocab_size
    ids, mask, rows = _batch(vocab, lengths=(8, 8, 8))
    follow = torch.randint(3, vocab, (3, 3), generator=torch.Generator().manual_seed(5))
    length = ids.shape[1] + follow.shape[1]
    with torch.no_grad():
        got = _steps(dyn, ids, mask, _cache(cache_kind, model, length), follow)
        with dyn.dense():
            dense_prompt = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[0], dense_prompt, atol=ATOL, rtol=0)  # prompt: dense
        decided = dyn.decisions
        assert decided[(1, ATTN)].shape[1] < model.config.num_attention_heads
        if cache_kind == "fp8":
            return  # runs without error; the exact check is on the unquantized caches
        for b, row in enumerate(rows):
            kept = {k: v[b] for k, v in decided.items() if v is not None}
            cache = DynamicCache(config=model.config)
            factory()(input_ids=row[None], **{CACHE: cache}, use_cache=True)  # the dense prompt
            for i in range(model.config.num_hidden_layers):
                layer = cache.layers[i]
                heads = kept[(i, ATTN)]
                layer.keys = layer.keys.index_select(1, heads)
                layer.values = layer.values.index_select(1, heads)
            sliced = _sliced_copy(factory, kept)
            for t in range(follow.shape[1]):
                out = sliced(
                    input_ids=follow[b : b + 1, t : t + 1], **{CACHE: cache}, use_cache=True
                )
                torch.testing.assert_close(got[t + 1][b : b + 1], out.logits, atol=ATOL, rtol=0)
                cache = output_cache(out)


def test_a_cache_layer_that_cannot_select_heads_is_refused_with_a_message():
    class Opaque:
        is_initialized = True

    cache = DynamicCache()
    cache.layers.append(Opaque())
    with pytest.raises(NotImplementedError, match="layer 3 attention: .*Opaque cache layer"):
        select_cache_heads(cache, 0, torch.tensor([0]), "layer 3 attention")


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa", "opt", "gemma3"])
def test_the_batch_runs_whole_and_no_argument_is_split_by_rows(name):
    """Rows with different kept sets: every block runs once on the whole batch, with the
    layer's own keyword arguments (nothing guessed per row, so a BlockMask or a cache
    position of the batch's size passes as it is)."""
    model = MODELS[name]()
    dyn = _dynamic(model)
    seen = []
    for la in dyn.runtime.adapter.layers():
        run = la.run

        def spy(group, x, weights, *, _run=run, **kw):
            seen.append(
                (
                    x.shape[0],
                    kw.get("unit_mask") is not None,
                    {k: getattr(v, "shape", None) for k, v in kw.items()},
                )
            )
            return _run(group, x, weights, **kw)

        la.run = spy
    ids, mask, _ = _batch(model.config.vocab_size)
    with torch.no_grad():
        dyn(input_ids=ids, attention_mask=mask)
    layers = model.config.num_hidden_layers
    assert len(seen) == 2 * layers  # one call per block
    assert all(rows == 3 for rows, _, _ in seen)
    assert sum(masked for _, masked, _ in seen) >= layers  # rows that differ: masked, whole


def test_beam_search_reorders_the_per_row_kept_sets_with_the_cache():
    model = MODELS["llama-mha"]()
    dyn = _dynamic(model)
    ids, mask, rows = _batch(model.config.vocab_size, lengths=(8, 8, 8))
    calls = []
    reorder = dyn._reorder_cache

    def spy(cache, beam_idx):
        before = dyn.decisions_for(cache)[(1, MLP)]
        out = reorder(cache, beam_idx)
        calls.append(torch.equal(dyn.decisions_for(cache)[(1, MLP)], before[beam_idx]))
        return out

    model._reorder_cache = spy
    kw = {
        "max_new_tokens": 4,
        "min_new_tokens": 4,
        "do_sample": False,
        "pad_token_id": 0,
        "num_beams": 2,
    }
    with torch.no_grad():
        together = dyn.generate(ids, attention_mask=mask, **kw)
        assert calls and all(calls)
        for b, row in enumerate(rows):
            assert torch.equal(together[b], dyn.generate(row[None], **kw)[0]), b
