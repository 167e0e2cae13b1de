"""Sublayers as prunable units (``attn-drop``, ``mlp-drop``) and targets for the methods that
remove whole units (depth and sublayer methods meet ``method.target`` themselves).

References are independent of the adapter's code paths: the residual after the attention
sublayer read from Hugging Face's own module (the input of ``post_attention_layernorm``), the
dense model with the dropped sublayers' output projections zeroed, and costs counted by hand.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_run import assert_reloads, flow, write_recipe

import prunekit
from prunekit.cli import main
from prunekit.evaluation.costs import structure_reduction
from prunekit.registry import resolve_adapter
from prunekit.testing import (
    tiny_gemma3,
    tiny_llama,
    tiny_opt,
    tiny_phi3,
    tiny_qwen2,
    tiny_qwen3,
    tiny_tokenizer,
)

CALIB = torch.randint(3, 100, (6, 16), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(2))

ARCHS = {
    "llama-gqa": lambda: tiny_llama(heads=4, kv_heads=2, layers=4),
    "llama-mha": lambda: tiny_llama(heads=4, kv_heads=4, layers=4),
    "qwen2-sliding": lambda: tiny_qwen2(layers=4),
    "qwen3": lambda: tiny_qwen3(layers=4),
    "gemma3": lambda: tiny_gemma3(layers=4),
    "opt": lambda: tiny_opt(layers=4),
    "phi3": lambda: tiny_phi3(layers=4),
}
METHODS = ("block-influence", "angular", "attn-drop", "mlp-drop")


def _cos(a, b):
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _attention_residuals(model, windows):
    """Per layer, the residual entering the block and after its attention sublayer, read from
    Hugging Face's modules (the input of ``post_attention_layernorm`` is that residual)."""
    ins, mids = {}, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(
            layer.register_forward_pre_hook(
                lambda m, a, k, _i=i: ins.setdefault(_i, []).append(
                    a[0] if a else k["hidden_states"]
                ),
                with_kwargs=True,
            )
        )
        hooks.append(
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, _i=i: mids.setdefault(_i, []).append(a[0])
            )
        )
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    n = len(model.model.layers)
    return [ins[i][0] for i in range(n)], [mids[i][0] for i in range(n)]


def _zeroed(model, layers, attr):
    """The dense model with the named sublayers' output projections zeroed (no bias here)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i in layers:
            block = ref.model.layers[i]
            proj = block.self_attn.o_proj if attr == "attn" else block.mlp.down_proj
            proj.weight.zero_()
    return ref


def test_attn_drop_by_hand():
    model = tiny_llama(heads=4, kv_heads=2, layers=6)
    with torch.no_grad():  # layer 3's attention barely changes the residual
        model.model.layers[3].self_attn.o_proj.weight.mul_(1e-3)
    dense = copy.deepcopy(model)
    ins, mids = _attention_residuals(dense, CALIB)
    score = [1 - _cos(a, b).mean().item() for a, b in zip(ins, mids, strict=True)]
    out = prunekit.prune(
        model, None, method="attn-drop", ratio=0.5, calibration=CALIB, skip_layers=[0, 5]
    )
    got = out.extra["attention_influence"]
    assert got[0] is None and got[5] is None
    for i in range(1, 5):
        assert got[i] == pytest.approx(score[i], abs=1e-9)
    want = sorted(sorted(range(1, 5), key=lambda i: score[i])[:2])  # floor(0.5 * 4)
    assert 3 in want and out.extra["dropped_attention"] == want
    assert [r["heads"] for r in out.structure] == [0 if i in want else 4 for i in range(6)]
    assert model.config.num_hidden_layers == 6
    for i in want:  # no K/V projection left either
        assert model.model.layers[i].self_attn.k_proj.weight.numel() == 0
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=IDS).logits,
            _zeroed(dense, want, "attn")(input_ids=IDS).logits,
            atol=1e-5,
            rtol=0,
        )


def test_mlp_drop_drops_the_lowest_mlp_sublayers():
    model = tiny_llama(heads=4, kv_heads=2, layers=5)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
    dense = copy.deepcopy(model)
    out = prunekit.prune(
        model, None, method="mlp-drop", ratio=0.25, calibration=CALIB, skip_layers=[0]
    )
    assert out.extra["dropped_mlp"] == [2]  # floor(0.25 * 4) = 1 of layers 1..4
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=IDS).logits,
            _zeroed(dense, [2], "mlp")(input_ids=IDS).logits,
            atol=1e-5,
            rtol=0,
        )


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", METHODS)
def test_ratio_zero_and_a_full_target_are_dense(arch, method):
    if arch == "phi3" and method == "attn-drop":
        pytest.skip("phi3 declares no attention sublayer unit (refused at validate)")
    for budget in ({"ratio": 0.0}, {"target": {"macs": 1.0}}):
        model = ARCHS[arch]()
        dense = copy.deepcopy(model)
        out = prunekit.prune(model, None, method=method, calibration=CALIB, **budget)
        assert not any(out.extra[k] for k in out.extra if k.startswith(("removed", "dropped")))
        with torch.no_grad():
            torch.testing.assert_close(
                out.model(input_ids=IDS).logits, dense(input_ids=IDS).logits, atol=0, rtol=0
            )


@pytest.mark.parametrize("method", ["block-influence", "angular", "attn-drop"])
def test_a_target_gives_the_fewest_units_that_meet_it(method):
    model = tiny_llama(heads=4, kv_heads=2, layers=8)
    adapter = resolve_adapter(copy.deepcopy(model))
    value = 0.8
    out = prunekit.prune(
        model, None, method=method, calibration=CALIB, target={"macs": value}, skip_layers=[0]
    )
    target = out.extra["target"]
    achieved = structure_reduction(adapter, out.structure, 512)["flops_kept_fraction"]
    assert target["achieved"] == pytest.approx(achieved) and achieved <= value
    key = "dropped_attention" if method == "attn-drop" else "removed_layers"
    removed = out.extra[key]
    assert out.extra["ratio"] == pytest.approx(len(removed) / 7)
    # by hand: every layer costs the same, so one unit fewer would not meet the target
    la = adapter.layers()[0]
    per_layer = la.macs_per_token(la.num_heads, la.intermediate_size, 512)
    gone = per_layer if method != "attn-drop" else per_layer - la.macs_per_token(0, 96, 512)
    assert la.intermediate_size == 96
    dense = 8 * per_layer
    assert (
        (dense - len(removed) * gone) / dense <= value < (dense - (len(removed) - 1) * gone) / dense
    )


def test_an_unreachable_target_fails_when_pruning():
    model = tiny_llama(heads=4, kv_heads=2, layers=4)
    with pytest.raises(prunekit.PrunekitError, match=r"method\.target.*cannot be met.*removing 1 "):
        prunekit.prune(
            model, None, method="block-influence", calibration=CALIB, target={"macs": 0.5}
        )


def _recipe(tmp, method, save=False, **keys):
    return write_recipe(tmp, flow(method, **keys), save=save)


def test_apply_saves_a_model_without_attention_sublayers_that_reloads(tiny_dir):
    recipe = _recipe(tiny_dir, "attn-drop", save=True, target="{macs: 0.85}")
    assert main(["apply", recipe, "-q"]) == 0
    run = tiny_dir / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["target"]["achieved"] <= 0.85 and results["dropped_attention"]
    assert all(
        r["heads"] == 0 for r in results["structure"] if r["layer"] in results["dropped_attention"]
    )
    # the pruned model in this process, against the reload in a fresh one
    assert_reloads(recipe, run, IDS)


@pytest.mark.parametrize(
    "method, keys, needle",
    [
        ("block-influence", {"target": "{macs: 0.3}"}, "cannot be met: removing 3 blocks"),
        ("angular", {"target": "{macs: 0.3}"}, "removing 3 consecutive blocks"),
        ("attn-drop", {"target": "{macs: 0.3}"}, "cannot be met: removing 3 attention"),
        ("attn-drop", {"target": "{params: 1e9}"}, "above the dense model"),
        ("attn-drop", {"target": "{macs: 0.9}", "ratio": 0.2}, "not both"),
    ],
)
def test_bad_targets_fail_at_validate(tiny_dir, capsys, method, keys, needle):
    assert main(["validate", _recipe(tiny_dir, method, **keys)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tiny_dir / "run").exists()


def test_an_adapter_without_attention_sublayers_is_refused_at_validate(tmp_path, capsys):
    tiny_phi3(layers=4).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "text.txt").write_text(" ".join(f"w{i % 120 + 3}" for i in range(6000)))
    assert main(["validate", _recipe(tmp_path, "attn-drop", ratio=0.3)]) == 2
    err = capsys.readouterr().err
    assert "drops whole attention sublayers" in err and "'phi3'" in err
    assert main(["validate", _recipe(tmp_path, "mlp-drop", ratio=0.3)]) == 0


def test_kv_cache_target_counts_dropped_attention():
    """A KV-cache budget on a GQA model is met by dropping attention sublayers (width methods
    never prune GQA's K/V heads)."""
    model = tiny_llama(heads=4, kv_heads=2, layers=6)
    la = resolve_adapter(model).layers()[0]
    per_layer = 2 * la.num_kv_heads * la.head_dim * 4  # fp32 keys and values
    out = prunekit.prune(
        model,
        None,
        method="attn-drop",
        calibration=CALIB,
        target={"kv_bytes_per_token": 5 * per_layer},
    )
    assert len(out.extra["dropped_attention"]) == 1
    assert out.extra["target"]["achieved"] == 5 * per_layer
    assert sum(1 for r in out.structure if r["heads"] == 0) == 1


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3", "qwen2-sliding", "opt"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generation_without_attention_sublayers_equals_the_zeroed_dense_model(arch, cache):
    """Greedy generation, each cache class: the first layer's attention dropped too (the layer
    the model reads its sequence length from), against the dense model with those output
    projections zeroed."""
    from prunekit.components import Allocation
    from prunekit.pruning.static import slice_model

    model = ARCHS[arch]()
    adapter = resolve_adapter(model)
    none = torch.zeros(0, dtype=torch.long)
    kept = {(0, "attn"): none, (2, "attn"): none}
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i in (0, 2):
            adapter.layers()[i].output_projection("attn").weight.zero_()
            resolve_adapter(ref).layers()[i].output_projection("attn").weight.zero_()
    slice_model(adapter, Allocation(kept))
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    if cache != "dynamic":
        kw["cache_implementation"] = cache
    prompt = IDS[:, :6]
    assert torch.equal(model.generate(prompt, **kw), ref.generate(prompt, **kw))
