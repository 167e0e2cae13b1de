import pytest
import torch

from prunekit.components import ATTN, MLP
from prunekit.models.llama import LlamaAdapter
from prunekit.testing import AdapterConformance, tiny_llama


class TestLlamaMHA(AdapterConformance):
    adapter_class = LlamaAdapter

    def make_model(self):
        return tiny_llama(heads=4, kv_heads=4)


class TestLlamaGQA(AdapterConformance):
    adapter_class = LlamaAdapter

    def make_model(self):
        return tiny_llama(heads=6, kv_heads=2)


class TestLlamaEager(AdapterConformance):
    adapter_class = LlamaAdapter
    skip_checks = ("reload",)  # the same saved layout as TestLlamaGQA

    def make_model(self):
        return tiny_llama(heads=6, kv_heads=3, attn_implementation="eager")


def _block_io(model, index=1, seq=9):
    captured = {}

    def hook(module, args, kwargs, output):
        captured.update(kwargs)
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]

    h = model.model.layers[index].register_forward_hook(hook, with_kwargs=True)
    ids = torch.randint(
        3, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        model(ids)
    h.remove()
    return captured


@pytest.mark.parametrize("heads,kv,kept_heads", [(4, 4, [0, 2]), (6, 2, [0, 1, 5]), (6, 3, [3])])
def test_kept_set_equals_dense_with_removed_units_zeroed(heads, kv, kept_heads):
    model = tiny_llama(heads=heads, kv_heads=kv)
    adapter = LlamaAdapter(model)
    layer = adapter.layers()[2]
    io = _block_io(model, index=2)
    kw = dict(
        position_embeddings=io["position_embeddings"], attention_mask=io.get("attention_mask")
    )
    kept_h = torch.tensor(kept_heads)
    kept_c = torch.tensor([0, 3, 5, 17, 40, 95])
    with torch.no_grad():
        pruned = layer.run_block(io["hidden"], {ATTN: kept_h, MLP: kept_c}, **kw)
        # zero the removed heads' o_proj columns and the removed channels' down_proj columns
        o = layer.attn.o_proj.weight
        down = layer.mlp.down_proj.weight
        keep_cols = torch.zeros(o.shape[1], dtype=torch.bool)
        keep_cols[layer.unit_channels(ATTN, kept_h)] = True
        keep_ch = torch.zeros(down.shape[1], dtype=torch.bool)
        keep_ch[kept_c] = True
        o[:, ~keep_cols] = 0
        down[:, ~keep_ch] = 0
        reference = layer.run_block(io["hidden"], **kw)
        hf = model.model.layers[2](
            io["hidden"],
            attention_mask=io.get("attention_mask"),
            position_embeddings=io["position_embeddings"],
        )
        hf = hf[0] if isinstance(hf, tuple) else hf
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(pruned, hf, atol=1e-5, rtol=0)


def test_gqa_kept_heads_use_their_own_kv_group():
    model = tiny_llama(heads=6, kv_heads=2)
    layer = LlamaAdapter(model).layers()[0]
    w = layer.gather(ATTN, torch.tensor([0, 4, 5]))
    assert w.kv_index.tolist() == [0, 1, 1]
    assert w.q.shape[0] == 3 * layer.head_dim and w.k.shape[0] == 2 * layer.head_dim
    assert w.o.shape[1] == 3 * layer.head_dim


def test_unit_slices_are_the_coupled_groups():
    mha = LlamaAdapter(tiny_llama(heads=4, kv_heads=4)).layers()[0]
    gqa = LlamaAdapter(tiny_llama(heads=6, kv_heads=2)).layers()[0]
    roles = lambda la, g: [(s.role, s.dim, s.width) for s in la.unit_slices(g)]  # noqa: E731
    assert roles(mha, ATTN) == [
        ("q_proj.weight", 0, 16),
        ("o_proj.weight", 1, 16),
        ("k_proj.weight", 0, 16),
        ("v_proj.weight", 0, 16),
    ]
    assert roles(gqa, ATTN) == [("q_proj.weight", 0, 16), ("o_proj.weight", 1, 16)]
    assert roles(gqa, MLP) == [
        ("gate_proj.weight", 0, 1),
        ("up_proj.weight", 0, 1),
        ("down_proj.weight", 1, 1),
    ]
