"""LLM-Pruner: Taylor importance of coupled groups, physical pruning, GQA mapping kept."""

import pytest
import torch
from prunekit_plugins.llm_pruner import GroupTaylor

import prunekit
from prunekit.components import ATTN, MLP
from prunekit.models.llama import LlamaAdapter
from prunekit.testing import tiny_llama


def _grads(model):
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("heads,kv", [(4, 4), (6, 2)])
def test_importance_is_w_times_grad_summed_over_the_group(heads, kv):
    model = tiny_llama(heads=heads, kv_heads=kv, layers=2)
    _grads(model)
    layer = LlamaAdapter(model).layers()[1]
    t = {
        n: (m.weight * m.weight.grad).abs().detach()
        for n, m in [
            ("q", layer.attn.q_proj),
            ("k", layer.attn.k_proj),
            ("v", layer.attn.v_proj),
            ("o", layer.attn.o_proj),
            ("g", layer.mlp.gate_proj),
            ("u", layer.mlp.up_proj),
            ("d", layer.mlp.down_proj),
        ]
    }
    mlp = GroupTaylor().prepare(layer, MLP)({})
    expected = t["g"].sum(1) + t["u"].sum(1) + t["d"].sum(0)
    torch.testing.assert_close(mlp, expected, rtol=1e-5, atol=1e-8)
    heads_imp = GroupTaylor().prepare(layer, ATTN)({})
    hd = layer.head_dim
    for h in range(heads):
        rows = slice(h * hd, (h + 1) * hd)
        want = t["q"][rows].sum() + t["o"][:, rows].sum()
        if kv == heads:
            want = want + t["k"][rows].sum() + t["v"][rows].sum()
        torch.testing.assert_close(heads_imp[h], want, rtol=1e-5, atol=1e-8)


def test_ratio_zero_and_pruned_gqa_keeps_query_to_kv_mapping():
    model = tiny_llama(heads=6, kv_heads=2, layers=4, intermediate=96)
    calib = torch.randint(3, 128, (10, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model(ids).logits
    prunekit.prune(model, None, method="llm-pruner", ratio=0.0, calibration=calib)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, atol=0, rtol=0)
    outcome = prunekit.prune(
        model, None, method="llm-pruner", ratio=0.4, calibration=calib, skip_layers=[0], round_to=1
    )
    assert outcome.structure[2] == {"layer": 2, "heads": 3, "channels": 46}
    for layer in model.model.layers[1:]:
        attn = layer.self_attn
        assert attn.k_proj.out_features == 2 * 16  # shared K/V never pruned
        assert all(0 <= k < 2 for k in attn.kv_index.tolist())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_block_range_reference_semantics():
    model = tiny_llama(heads=4, kv_heads=4, layers=6, intermediate=64)
    calib = torch.randint(3, 128, (10, 32), generator=torch.Generator().manual_seed(1))
    outcome = prunekit.prune(
        model,
        None,
        method="llm-pruner",
        ratio=0.5,
        calibration=calib,
        round_to=1,
        block_range=[2, 5],
    )
    heads = [r["heads"] for r in outcome.structure]
    assert heads == [4, 4, 2, 2, 2, 4]  # nominal ratio inside [2, 5), no inflation


def test_bad_block_range_is_a_recipe_error():
    with pytest.raises(prunekit.PrunekitError, match="block_range"):
        prunekit.prune(
            tiny_llama(),
            None,
            method="llm-pruner",
            ratio=0.2,
            calibration=torch.zeros(2, 8, dtype=torch.long),
            block_range=[5, 2],
        )


def test_mlp_groups_agree_with_torch_pruning_dependency_graph():
    """The adapter's declared MLP coupling gives torch-pruning's GroupTaylorImportance."""
    import torch_pruning as tp

    model = tiny_llama(heads=4, kv_heads=2, layers=2)
    _grads(model)
    layer = LlamaAdapter(model).layers()[1]
    mlp = layer.mlp
    example = torch.zeros(1, 2, layer.hidden_size)
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(mlp, example_inputs=example)
    group = graph.get_pruning_group(
        mlp.gate_proj, tp.prune_linear_out_channels, idxs=list(range(layer.intermediate_size))
    )
    reference = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)(group)
    torch.testing.assert_close(
        GroupTaylor().prepare(layer, MLP)({}), reference.float(), rtol=1e-5, atol=1e-8
    )
