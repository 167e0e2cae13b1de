"""Probe Pruning end to end on tiny random LLaMA models (MHA and GQA)."""

import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit.components import ATTN, MLP
from prunekit.errors import RecipeError
from prunekit.testing import tiny_llama

PP_METHODS = ["pp", "pp-fullbatch", "pp-history"]


def _calibration(vocab=128, n=8, seq=32, seed=1):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _batch(b=4, seq=24, vocab=128, seed=2):
    return torch.randint(3, vocab, (b, seq), generator=torch.Generator().manual_seed(seed))


def _prune(model, method="pp", ratio=0.4, **kw):
    kw.setdefault("skip_layers", [0])
    kw.setdefault("round_to", 1)
    return prunekit.prune(model, None, method=method, ratio=ratio, calibration=_calibration(), **kw)


@pytest.mark.parametrize("method", PP_METHODS)
@pytest.mark.parametrize("heads,kv", [(4, 4), (6, 2)])
def test_ratio_zero_reproduces_dense_logits(method, heads, kv):
    model = tiny_llama(heads=heads, kv_heads=kv)
    ids = _batch()
    with torch.no_grad():
        dense = model(ids).logits
        outcome = _prune(model, method, ratio=0.0)
        pruned = outcome.model(ids).logits
    assert outcome.dynamic
    torch.testing.assert_close(pruned, dense, atol=1e-5, rtol=0)
    assert all(row["heads"] == heads for row in outcome.structure)


@pytest.mark.parametrize("method", PP_METHODS)
@pytest.mark.parametrize("mode", ["sync", "async_intra"])
def test_pruned_forward_uses_the_allocated_counts(method, mode):
    if method == "pp-history" and mode != "sync":
        pytest.skip("pp-history has no probe, hence no mode")
    model = tiny_llama(heads=6, kv_heads=2, intermediate=96, layers=4)
    extra = {"mode": mode} if method != "pp-history" else {}
    outcome = _prune(model, method, ratio=0.4, **extra)
    seen = {}

    def spy(la, group, x, residual, batch, _decide=outcome.model.controller.decide):
        kept = _decide(la, group, x, residual, batch)
        seen[(la.index, group)] = None if kept is None else kept.numel()
        return kept

    outcome.model.controller.decide = spy
    with torch.no_grad():
        logits = outcome.model(_batch()).logits
    assert torch.isfinite(logits).all()
    # L=4, skip [0]: r' = round(4/3*0.4, 2) = 0.53 -> heads 6 - floor(3.18) = 3, MLP 96 - 50 = 46
    assert seen[(0, ATTN)] is None and seen[(0, MLP)] is None
    for layer in (1, 2, 3):
        assert seen[(layer, ATTN)] == 3 and seen[(layer, MLP)] == 46
    assert outcome.structure[1] == {"layer": 1, "heads": 3, "channels": 46}


def test_pruned_logits_differ_from_dense_and_batches_differ():
    model = tiny_llama(heads=4, kv_heads=4)
    with torch.no_grad():
        dense = model(_batch()).logits.clone()
        outcome = _prune(model, "pp")
        decisions = []
        orig = outcome.model.controller.decide

        def spy(*a):
            kept = orig(*a)
            decisions.append(None if kept is None else tuple(kept.tolist()))
            return kept

        outcome.model.controller.decide = spy
        pruned = outcome.model(_batch()).logits
        first = list(decisions)
        decisions.clear()
        outcome.model(_batch(seed=9))
    assert not torch.allclose(pruned, dense, atol=1e-3)
    assert first != decisions  # a different batch gets a different kept set somewhere


def test_ema_history_evolves_only_in_scored_passes():
    model = tiny_llama(heads=4, kv_heads=4)
    outcome = _prune(model, "pp")
    ctrl = outcome.model.controller
    key = sorted(ctrl.active)[0]
    before = ctrl.history[key].clone()
    with torch.no_grad():
        outcome.model.warmup(_batch())
        assert torch.equal(ctrl.history[key], before)  # warm-up: no update
        with outcome.model.preserved_state():
            outcome.model(_batch())
        assert torch.equal(ctrl.history[key], before)  # timing: state restored
        outcome.model(_batch())
    assert not torch.equal(ctrl.history[key], before)
    outcome.model.reset_state()
    assert torch.equal(ctrl.history[key], before)


def _token_losses(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    lp = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return lp[0][mask[0, 1:].bool() & mask[0, :-1].bool()]


@pytest.mark.parametrize("ratio", [0.0, 0.4])
@pytest.mark.parametrize("heads,kv", [(4, 4), (6, 2)])
def test_padding_is_invisible(ratio, heads, kv):
    model = tiny_llama(heads=heads, kv_heads=kv, layers=4)
    outcome = _prune(model, "pp", ratio=ratio, skip_layers=[0], round_to=1)
    ids = _batch(b=1, seq=16)
    ones = torch.ones_like(ids)
    ref = _token_losses(outcome.model, ids, ones)
    pad = torch.zeros(1, 5, dtype=ids.dtype)
    for side in ("left", "right"):
        padded = torch.cat([pad, ids], 1) if side == "left" else torch.cat([ids, pad], 1)
        mask = (
            torch.cat([torch.zeros_like(pad), ones], 1)
            if side == "left"
            else torch.cat([ones, torch.zeros_like(pad)], 1)
        )
        outcome.model.reset_state()
        got = _token_losses(outcome.model, padded, mask)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0, msg=f"{side} padding")


def test_hold_reuses_decisions_for_generation():
    model = tiny_llama(heads=4, kv_heads=4)
    outcome = _prune(model, "pp")
    calls = []
    orig = outcome.model.controller.decide
    outcome.model.controller.decide = lambda *a: calls.append(1) or orig(*a)
    prompt = _batch(b=1, seq=8)
    with torch.no_grad(), outcome.model.hold():
        out = outcome.model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)
    # one decision per block (2 per layer) on the prompt, none for the 3 decoding steps
    assert len(calls) == 2 * model.config.num_hidden_layers


def test_bad_component_options_are_recipe_errors():
    model = tiny_llama()
    with pytest.raises(RecipeError, match="ratio_seq must be in"):
        _prune(model, "pp", probe={"name": "residual_rank", "ratio_seq": 1.5})
    with pytest.raises(RecipeError, match="unknown mode"):
        _prune(model, "pp", mode="async_inter")
    with pytest.raises(RecipeError, match="has no slot 'probe'"):
        _prune(model, "pp-history", probe={"name": "random"})


def test_fullbatch_rejects_a_fusion_that_needs_history():
    with pytest.raises(RecipeError, match="needs .history., which this run does not provide"):
        _prune(tiny_llama(), "pp-fullbatch", fusion={"name": "history_only"})


@pytest.mark.parametrize("mode", ["sync", "async_intra"])
def test_norms_from_the_rmsnorm_give_the_same_decisions(mode, monkeypatch):
    """PP ranks probe tokens on norms its layers' RMSNorm computed (no second pass over the
    residual): the kept sets and logits equal those of norms computed by the selector."""
    from prunekit.components import LayerAdapter

    def run(reuse: bool):
        torch.manual_seed(0)
        model = _prune(tiny_llama(heads=6, kv_heads=2, layers=4, intermediate=96), mode=mode).model
        if not reuse:  # the engine's default: no variance reported, the selector computes
            monkeypatch.setattr(
                type(model.runtime.adapter.layers()[0]), "normalized", LayerAdapter.normalized
            )
        selector, given = model.controller.probe, []

        def spy(rank_source, token_mask, norms=None):
            given.append(norms is not None)
            return selector(rank_source, token_mask, norms=norms)

        spy.takes_norms, spy.rank_on = True, "residual"
        model.controller.probe = spy
        out = []
        with torch.no_grad():
            for seed in range(3):
                logits = model(input_ids=_batch(seed=seed)).logits
                out.append((logits, model.decisions))
        monkeypatch.undo()
        assert given and all(given) if reuse else not any(given)
        return out

    reused, computed = run(True), run(False)
    for (la, da), (lb, db) in zip(reused, computed, strict=True):
        assert torch.equal(la, lb)
        assert da.keys() == db.keys() and all(
            torch.equal(da[k], db[k]) for k in da if da[k] is not None
        )
