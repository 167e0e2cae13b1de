"""FLAP: fluctuation statistic, metric, global allocator and bias compensation."""

import pytest
import torch
from prunekit_plugins.flap import BiasMean, FlapGlobal, FlapScore, Fluctuation, head_flops_weight

import prunekit
from prunekit.components import ATTN, MLP, MethodSettings
from prunekit.models.llama import LlamaAdapter
from prunekit.testing import tiny_llama


def test_fluctuation_by_hand():
    stat = Fluctuation()
    state = stat.init(channels=1, positions=1)
    ones = torch.ones(2, 1, dtype=torch.bool)
    stat.update(state, torch.tensor([[[1.0]], [[3.0]]]), ones)  # first batch: baseline only
    assert float(state["fluc"].sum()) == 0 and float(state["baseline"][0, 0]) == 2.0
    stat.update(state, torch.tensor([[[5.0]]]), torch.ones(1, 1, dtype=torch.bool))
    # baseline (2*2 + 5)/3 = 3; fluc = 0 * 1/2 + (5-3)(5-2)/3 = 2
    out = stat.finalize(state)
    torch.testing.assert_close(out["fluctuation"], torch.tensor([2.0]))
    torch.testing.assert_close(out["mean"], torch.tensor([3.0]))


def test_reference_running_mean_by_hand():
    """The PP reference code's update: the batch mean enters with weight 1/(n+B)."""
    stat = Fluctuation(running_mean="reference")
    state = stat.init(channels=1, positions=1)
    ones = torch.ones(2, 1, dtype=torch.bool)
    stat.update(state, torch.tensor([[[1.0]], [[3.0]]]), ones)
    assert float(state["baseline"][0, 0]) == 1.0  # 0·0 + mean 2 / (0+2)
    stat.update(state, torch.tensor([[[5.0]]]), torch.ones(1, 1, dtype=torch.bool))
    # baseline 1·2/3 + 5/3 = 7/3; fluc = 0 + (5 - 7/3)(5 - 1)/3 = 32/9
    out = stat.finalize(state)
    torch.testing.assert_close(out["fluctuation"], torch.tensor([32 / 9]))
    torch.testing.assert_close(out["mean"], torch.tensor([7 / 3]))
    assert stat.options() == {"running_mean": "reference"} and Fluctuation().options() == {}


def test_reference_running_mean_tends_to_the_mean_over_batch_size():
    x = torch.randn(40, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = torch.ones(20, 3, dtype=torch.bool)
    own, ref = Fluctuation(), Fluctuation(running_mean="reference")
    s_own, s_ref = own.init(2, 3), ref.init(2, 3)
    for batch in x.split(20):
        own.update(s_own, batch, mask)
        ref.update(s_ref, batch, mask)
    torch.testing.assert_close(own.finalize(s_own)["mean"], x.mean((0, 1)).float())
    # with equal batches it is exactly the mean of the batches seen over B, at every step
    first, second = x.split(20)
    want = (first.mean(0) / 2 + second.mean(0) / 2) / 20
    torch.testing.assert_close(s_ref["baseline"], want)


def test_running_mean_option_is_checked():
    with pytest.raises(ValueError, match="running_mean"):
        Fluctuation(running_mean="paper")


def test_one_calibration_batch_is_an_error():
    stat = Fluctuation()
    state = stat.init(channels=1, positions=1)
    stat.update(state, torch.ones(2, 1, 1), torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(prunekit.PrunekitError, match="at least 2 calibration batches"):
        stat.finalize(state)


class _Projection:
    """A stand-in layer whose output projection (o_proj/down_proj) has weight ``w``."""

    def __init__(self, w):
        self.lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.lin.weight.data = w

    def output_projection(self, group):
        return self.lin

    def unit_channels(self, group, kept):
        return kept


def test_flap_metric_by_hand():
    W = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    got = FlapScore().prepare(_Projection(W), MLP)({"fluctuation": torch.tensor([1.0, 0.5, 2.0])})
    torch.testing.assert_close(got, torch.tensor([2.0, 2.0, 18.0]))


def test_head_flops_weight_matches_the_reference_192():
    # LLaMA-2-7B's dims on the llama adapter's cost model (meta device: no memory)
    from transformers import LlamaConfig, LlamaForCausalLM

    def layer(kv):
        config = LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=kv,
            num_hidden_layers=1,
            vocab_size=8,
        )
        with torch.device("meta"):
            return LlamaAdapter(LlamaForCausalLM(config)).layers()[0]

    assert head_flops_weight(layer(32), 1024) == pytest.approx(192.0)
    # GQA: K/V never pruned, factor 4 -> 2
    assert head_flops_weight(layer(8), 1024) == pytest.approx(
        (1024 * 4096 * 128 * 2 + 2 * 1024**2 * 128) / (1024 * 4096 * 3)
    )


def test_flap_global_allocation_on_a_constructed_case():
    model = tiny_llama(heads=4, kv_heads=4, layers=3, intermediate=8, hidden=64)
    adapter = LlamaAdapter(model)
    # layer 1: MLP channels with a clear low tail; layer 2: flat MLP. Heads: layer 1 head 3 low.
    scores = {
        (1, MLP): torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]),
        (2, MLP): torch.tensor([5.0, 5.1, 5.2, 5.3, 5.4, 5.5, 5.6, 5.7]),
        (1, ATTN): torch.cat([torch.full((16,), 3.0)] * 3 + [torch.zeros(16)]),
        (2, ATTN): torch.cat([torch.full((16,), v) for v in (1.0, 2.0, 3.0, 4.0)]),
    }
    alloc = FlapGlobal(tokens=8, inflate=False)
    # z-scores (unbiased std, per module): L1 head 3 -1.719, L1 MLP zeros -1.620, L2 MLP 5.0
    # -1.429, L2 head 0 -1.331, ...; FLOPs weight per head (8*64*16*4 + 2*64*16)/(8*64*3) = 22.67,
    # per channel 1; total 16 + 8 * 22.67 = 197.3.
    # r = 0.1: target 19.7 < 22.67 (the first unit) -> the threshold is L1 head 3 (inclusive)
    r1 = alloc.module_ratios(scores, adapter, MethodSettings("flap", 0.1, [0], 1))
    assert r1 == {(1, MLP): 0.0, (2, MLP): 0.0, (1, ATTN): 0.25, (2, ATTN): 0.0}
    # r = 0.2: target 39.5; cumulative 22.67, 23.67, 24.67, 25.67, 48.33 -> threshold = L2 head 0
    settings = MethodSettings("flap", 0.2, [0], 1)
    r2 = alloc.module_ratios(scores, adapter, settings)
    assert r2 == {(1, MLP): 0.25, (2, MLP): 0.125, (1, ATTN): 0.25, (2, ATTN): 0.25}
    kept = alloc(scores, adapter, settings).kept
    assert kept[(1, MLP)].tolist() == [0, 1, 2, 3, 4, 5]
    assert kept[(2, MLP)].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert kept[(1, ATTN)].tolist() == [0, 1, 2]  # heads ranked by their raw channel sums
    assert kept[(2, ATTN)].tolist() == [1, 2, 3]
    # ratio 0 keeps everything, although the reference's inclusive threshold would cut one unit
    zero = MethodSettings(name="flap", ratio=0.0, skip_layers=[0], round_to=1)
    assert alloc(scores, adapter, zero).kept == {}


def test_bias_mean_by_hand():
    W = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    bias = BiasMean()(
        _Projection(W), MLP, torch.tensor([1]), {"mean": torch.tensor([1.0, 10.0, -1.0])}
    )
    torch.testing.assert_close(bias, torch.tensor([1 - 3.0, 4 - 6.0]))


def test_flap_ratio_zero_and_physical_with_bias():
    model = tiny_llama(heads=6, kv_heads=2, layers=4, intermediate=96)
    calib = torch.randint(3, 128, (24, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model(ids).logits
        prunekit.prune(model, None, method="flap", ratio=0.0, calibration=calib)
        torch.testing.assert_close(model(ids).logits, dense, atol=0, rtol=0)
        outcome = prunekit.prune(
            model, None, method="flap", ratio=0.4, calibration=calib, skip_layers=[0], round_to=1
        )
        assert torch.isfinite(model(ids).logits).all()
    pruned_layers = [r for r in outcome.structure if r["channels"] < 96 or r["heads"] < 6]
    assert pruned_layers and outcome.structure[0] == {"layer": 0, "heads": 6, "channels": 96}
    # about 44% of the pooled units go, not everything
    assert all(r["channels"] > 1 for r in outcome.structure)
    kept = sum(r["channels"] for r in outcome.structure[1:]) / (3 * 96)
    assert 0.3 < kept < 0.9, outcome.structure
    biased = [layer.mlp.down_proj.bias is not None for layer in model.model.layers[1:]]
    assert any(biased)
