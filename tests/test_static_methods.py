"""Static methods (Wanda-sp, pp-calib): scores, physical pruning, save and reload."""

import json
import subprocess
import sys

import pytest
import torch
from prunekit_plugins.wanda_sp import WandaSpScore

import prunekit
from prunekit.components import ATTN, MLP
from prunekit.models.llama import LlamaAdapter
from prunekit.models.pruned_llama import PrunedLlamaAttention
from prunekit.pruning.allocation import Uniform, balanced_heads
from prunekit.testing import tiny_llama

UNIFORM = ["wanda-sp", "pp-calib"]
STATIC = [*UNIFORM, "flap"]


def _calibration(n=24, seq=32):
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(1))


def _ids():
    return torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("method", STATIC)
def test_ratio_zero_prunes_nothing(method):
    model = tiny_llama(heads=6, kv_heads=2)
    with torch.no_grad():
        dense = model(_ids()).logits
        outcome = prunekit.prune(model, None, method=method, ratio=0.0, calibration=_calibration())
        after = outcome.model(_ids()).logits
    assert not outcome.dynamic
    torch.testing.assert_close(after, dense, atol=0, rtol=0)
    assert not any(
        isinstance(layer.self_attn, PrunedLlamaAttention) for layer in model.model.layers
    )


@pytest.mark.parametrize("method", UNIFORM)
def test_static_prune_is_physical_with_spec_counts(method):
    model = tiny_llama(heads=6, kv_heads=2, layers=4, intermediate=96)
    params = sum(p.numel() for p in model.parameters())
    outcome = prunekit.prune(
        model,
        None,
        method=method,
        ratio=0.4,
        calibration=_calibration(),
        skip_layers=[0],
        round_to=1,
    )
    layers = model.model.layers
    assert layers[0].mlp.down_proj.in_features == 96
    for i in (1, 2, 3):  # r' = 0.53: heads 6 -> 3, channels 96 -> 46
        assert layers[i].self_attn.q_proj.out_features == 3 * 16
        assert layers[i].mlp.gate_proj.out_features == 46
        assert layers[i].self_attn.k_proj.out_features == 2 * 16  # GQA: K/V kept whole
    assert outcome.params_kept < params
    assert outcome.structure[1] == {"layer": 1, "heads": 3, "channels": 46}
    with torch.no_grad():
        assert torch.isfinite(outcome.model(_ids()).logits).all()


def test_wanda_sp_score_by_hand():
    class L:
        head_dim = 2

        def __init__(self, w):
            self.lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            self.lin.weight.data = w

        def output_projection(self, group):
            return self.lin

        def unit_width(self, group):
            return self.head_dim if group == ATTN else 1

    W = torch.tensor([[1.0, -2.0, 0.5, 1.0], [-1.0, 0.0, 0.5, -3.0]])
    H = torch.tensor([[1.0, 4.0, 0.0, 9.0], [3.0, 0.0, 4.0, 7.0]])  # [T=2, D=4] -> C = [4,4,4,16]
    mlp = WandaSpScore().prepare(L(W), MLP)({"sq_mean": H})
    torch.testing.assert_close(mlp, torch.tensor([2 * 2.0, 2 * 2.0, 2 * 1.0, 4 * 4.0]))
    heads = WandaSpScore().prepare(L(W), ATTN)({"sq_mean": H})
    torch.testing.assert_close(heads, torch.tensor([8.0, 18.0]))


def test_balanced_heads_keeps_groups_equal():
    class L:
        num_heads, num_kv_heads = 6, 3

        def kv_heads_of(self, heads):
            return heads // 2

    scores = torch.tensor([5.0, 1.0, 0.0, 9.0, 3.0, 2.0])
    assert balanced_heads(scores, 3, L()).tolist() == [0, 3, 4]
    assert balanced_heads(scores, 4, L()).tolist() == [0, 1, 2, 3, 4, 5]  # 4 -> 6 (multiple of 3)


def test_balanced_heads_follow_the_adapters_kv_mapping():
    class Interleaved:  # head h reads K/V head h % 2, and a pruned layer with uneven groups
        num_heads, num_kv_heads = 5, 2

        def kv_heads_of(self, heads):
            return torch.tensor([0, 1, 0, 1, 0])[heads]

    scores = torch.tensor([1.0, 7.0, 3.0, 2.0, 9.0])
    assert balanced_heads(scores, 2, Interleaved()).tolist() == [1, 4]  # top of {0,2,4}, {1,3}
    assert balanced_heads(scores, 4, Interleaved()).tolist() == [1, 2, 3, 4]


def _save_and_fresh_logits(tmp_path, model, trust):
    from prunekit.pruning.static import save_pruned

    path = tmp_path / "ckpt"
    save_pruned(model, None, str(path), {"method": "test"})
    ids = _ids()
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import torch, sys\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code={trust})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"torch.save(m(ids).logits.detach(), {str(tmp_path / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    return path, torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("method", STATIC)
def test_per_layer_shapes_reload_in_a_fresh_process(tmp_path, method):
    model = tiny_llama(heads=6, kv_heads=3, layers=4, intermediate=96)
    prunekit.prune(
        model,
        None,
        method=method,
        ratio=0.4,
        calibration=_calibration(),
        skip_layers=[0],
        round_to=1,
    )
    with torch.no_grad():
        expected = model(_ids()).logits
    path, fresh = _save_and_fresh_logits(tmp_path, model, trust=True)
    meta = json.loads((path / "prunekit.json").read_text())
    assert meta["layout"] == "remote_code" and (path / "modeling_prunekit_llama.py").is_file()
    torch.testing.assert_close(fresh, expected, atol=1e-6, rtol=0)
    reloaded = prunekit.load_pruned(path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids()).logits, expected, atol=1e-6, rtol=0)


def test_uniform_balanced_model_reloads_without_remote_code(tmp_path):
    model = tiny_llama(heads=6, kv_heads=3, layers=3, intermediate=96)
    prunekit.prune(
        model,
        None,
        method="wanda-sp",
        ratio=0.4,
        calibration=_calibration(),
        skip_layers=[],
        round_to=1,
        allocator={"name": "uniform", "balanced_kv": True},
    )
    kv = [layer.self_attn.kv_index.tolist() for layer in model.model.layers]
    assert all(k == [0, 0, 1, 1, 2, 2][: len(k)] or sorted(k) == k for k in kv)
    with torch.no_grad():
        expected = model(_ids()).logits
    path, fresh = _save_and_fresh_logits(tmp_path, model, trust=False)
    assert json.loads((path / "prunekit.json").read_text())["layout"] == "plain"
    assert "auto_map" not in json.loads((path / "config.json").read_text())
    torch.testing.assert_close(fresh, expected, atol=1e-6, rtol=0)


def test_uniform_allocator_rejects_bad_options():
    with pytest.raises(ValueError, match="balanced_kv"):
        Uniform(balanced_kv="yes")


def test_adapter_sees_pruned_shapes():
    model = tiny_llama(heads=6, kv_heads=2, layers=3)
    prunekit.prune(
        model,
        None,
        method="wanda-sp",
        ratio=0.4,
        calibration=_calibration(),
        skip_layers=[0],
        round_to=1,
    )
    layer = LlamaAdapter(model).layers()[1]
    assert layer.num_heads == 3 and layer.shares_kv
