"""Physical slicing: smaller nn.Linear layers give the dense model's output with the removed
heads / channels zeroed, for MHA and GQA (unequal KV groups included)."""

import copy

import pytest
import torch

from prunekit.components import ATTN, MLP, Allocation
from prunekit.models.llama import LlamaAdapter
from prunekit.models.pruned_llama import PrunedLlamaAttention
from prunekit.pruning.static import slice_model
from prunekit.testing import tiny_llama


def _zeroed_reference(model, allocation):
    ref = copy.deepcopy(model)
    for layer in LlamaAdapter(ref).layers():
        heads = allocation.kept.get((layer.index, ATTN))
        if heads is not None:
            keep = torch.zeros(layer.attn.o_proj.in_features, dtype=torch.bool)
            keep[layer.unit_channels(ATTN, heads)] = True
            layer.attn.o_proj.weight.data[:, ~keep] = 0
        chans = allocation.kept.get((layer.index, MLP))
        if chans is not None:
            keep = torch.zeros(layer.intermediate_size, dtype=torch.bool)
            keep[chans] = True
            layer.mlp.down_proj.weight.data[:, ~keep] = 0
    return ref


@pytest.mark.parametrize(
    "heads,kv,kept",
    [(4, 4, [[0, 3], [1]]), (6, 2, [[0, 1, 2, 5], [4]]), (6, 3, [[0, 2, 3], [0, 1, 2, 3, 4]])],
)
def test_sliced_model_matches_zeroed_dense(heads, kv, kept):
    model = tiny_llama(heads=heads, kv_heads=kv, layers=3)
    allocation = Allocation(
        {
            (1, ATTN): torch.tensor(kept[0]),
            (2, ATTN): torch.tensor(kept[1]),
            (1, MLP): torch.tensor([0, 5, 7, 30]),
            (2, MLP): torch.arange(0, 96, 2),
        }
    )
    ref = _zeroed_reference(model, allocation)
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    adapter = slice_model(LlamaAdapter(model), allocation)
    attn = model.model.layers[1].self_attn
    assert isinstance(attn, PrunedLlamaAttention)
    assert attn.q_proj.out_features == len(kept[0]) * attn.head_dim
    assert model.model.layers[1].mlp.down_proj.in_features == 4
    assert adapter.layers()[2].num_heads == len(kept[1])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    n = sum(p.numel() for p in model.parameters())
    assert n < sum(p.numel() for p in ref.parameters())
