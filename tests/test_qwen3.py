"""The Qwen3 adapter on tiny random Qwen3 models that vary what the family varies: MHA and GQA,
``head_dim`` equal to ``hidden / heads`` or not, q/k/v/o biases (``attention_bias``), tied and
untied embeddings, a mix of full and sliding-window layers; the q/k norms get random weights.

Each check has an independent reference: Hugging Face's own Qwen3 forward (the conformance
kit; ratio 0 in ``test_adapters.py``), a dense copy whose removed units are zeroed, the saved
model reloaded (in a fresh process by the conformance kit), each row run alone (``pp-seq``),
and llama.cpp itself (the GGUF export, with ``llama-cpp-python``). The shared tests list Qwen3
too: every method at ratio 0, saving per method, dynamic methods, caches and per-row decisions.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import prunekit
from prunekit.components import ATTN, MLP, Allocation
from prunekit.errors import ExportError
from prunekit.export import export
from prunekit.models.qwen3 import Qwen3Adapter
from prunekit.pruning.static import save_pruned, slice_model
from prunekit.registry import adapter_class_for
from prunekit.testing import AdapterConformance, tiny_qwen3

#: tiny configurations: (tiny_qwen3 keywords)
CONFIGS = {
    # 4 query heads over 2 K/V heads; head_dim 24 while hidden / heads is 16; untied
    "gqa": {},
    # multi-head attention with q/k/v/o biases and tied embeddings
    "mha-bias-tied": {"kv_heads": 4, "attention_bias": True, "tie_word_embeddings": True},
    # 6 query heads over 3 K/V heads, head_dim = hidden / heads; layer 0 full attention, layers
    # 1 and 2 within a window of 5 tokens (shorter than the test inputs)
    "sliding": {"heads": 6, "kv_heads": 3, "head_dim": 16, "hidden": 96, "sliding_window": 5},
}
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(config: str, **kw):
    return tiny_qwen3(**CONFIGS[config], **kw)


def _ids(n=2, seq=12, seed=2):
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _calibration():
    return torch.randint(3, 128, (24, 16), generator=torch.Generator().manual_seed(1))


def test_the_tiny_models_vary_what_the_family_varies():
    """Guards the premise of the tests below: each variation is really in its tiny model."""
    gqa, mha, sliding = (_model(name) for name in ("gqa", "mha-bias-tied", "sliding"))
    attn = gqa.model.layers[0].self_attn
    assert gqa.config.head_dim * gqa.config.num_attention_heads != gqa.config.hidden_size
    assert gqa.config.num_key_value_heads < gqa.config.num_attention_heads
    assert not torch.allclose(attn.q_norm.weight, torch.ones_like(attn.q_norm.weight))
    assert gqa.lm_head.weight is not gqa.model.embed_tokens.weight
    assert mha.lm_head.weight is mha.model.embed_tokens.weight
    assert all(
        getattr(mha.model.layers[0].self_attn, p).bias is not None
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    )
    assert sliding.config.layer_types == ["full_attention"] + ["sliding_attention"] * 2
    windows = [la.sliding_window for la in Qwen3Adapter(sliding).layers()]
    assert windows == [None, 5, 5]


def test_the_pre_norms_give_the_residual_mean_of_squares():
    """Qwen3's RMSNorm is LLaMA's: ``normalized`` returns the group input bit for bit and the
    residual's mean of squares, so PP ranks tokens without reading the residual again."""
    la = Qwen3Adapter(_model("gqa")).layers()[1]
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    for group in (ATTN, MLP):
        x, sq_mean = la.normalized(group, h)
        assert torch.equal(x, la.group_input(group, h))
        torch.testing.assert_close(sq_mean, h.pow(2).mean(-1, keepdim=True))


class TestQwen3GQA(AdapterConformance):
    adapter_class = Qwen3Adapter

    def make_model(self):
        return _model("gqa")


class TestQwen3MHABiasTied(AdapterConformance):
    adapter_class = Qwen3Adapter

    def make_model(self):
        return _model("mha-bias-tied", attn_implementation="eager")


class TestQwen3SlidingLayers(AdapterConformance):
    adapter_class = Qwen3Adapter

    def make_model(self):
        return _model("sliding")


def test_bidirectional_qwen3_is_refused_at_validate_with_the_field(tmp_path):
    """``is_causal: false`` (bidirectional Qwen3 conversions) changes Hugging Face's forward,
    which the probe does not follow: validate refuses it, also when the adapter is named."""
    model = _model("gqa")
    ids = _ids()
    with torch.no_grad():
        causal = model(input_ids=ids).logits
        model.config.is_causal = False
        bidirectional = model(input_ids=ids).logits
    assert (causal - bidirectional).abs().max() > 1e-2  # the field is not cosmetic
    model.config.save_pretrained(tmp_path / "bidirectional")
    recipe = {
        "model": {"id": str(tmp_path / "bidirectional")},
        "method": {"name": "dense"},
        "evaluation": {"perplexity": []},
    }
    with pytest.raises(prunekit.PrunekitError, match=r"model\.id.*'qwen3'.*is_causal=False"):
        prunekit.validate(recipe)
    with pytest.raises(prunekit.PrunekitError, match=r"adapter 'qwen3' cannot run.*is_causal"):
        prunekit.validate({**recipe, "model": {**recipe["model"], "adapter": "qwen3"}})
    model.config.is_causal = True
    assert adapter_class_for(model.config) is Qwen3Adapter


def _uniform_kept(adapter) -> dict:
    """Two query heads per layer (one per K/V group with GQA) and every other MLP channel."""
    kept = {}
    for la in adapter.layers():
        step = la.num_heads // 2
        kept[(la.index, ATTN)] = torch.tensor([0, step + 1])
        kept[(la.index, MLP)] = torch.arange(0, la.intermediate_size, 2)
    return kept


@pytest.mark.parametrize("bias", [None, ATTN, MLP])
@pytest.mark.parametrize("config", ["gqa", "mha-bias-tied"])
def test_uniform_shapes_save_plain_unless_a_down_bias_needs_the_per_layer_layout(
    tmp_path, config, bias
):
    """One shape in every layer saves as a plain Qwen3 checkpoint (head_dim, tied embeddings
    and an o_proj compensation bias through attention_bias kept); a down_proj bias, which
    Qwen3's config cannot express, gives the per-layer layout. Both reload exactly."""
    from transformers import AutoModelForCausalLM

    model = _model(config)
    adapter = slice_model(Qwen3Adapter(model), Allocation(_uniform_kept(Qwen3Adapter(model))))
    if bias is not None:
        for la in adapter.layers():
            la.add_output_bias(bias, torch.linspace(-0.2, 0.2, la.hidden_size))
    path = tmp_path / "m"
    save_pruned(Qwen3Adapter(model), None, str(path), {})
    layout = json.loads((path / "prunekit.json").read_text())["layout"]
    assert layout == ("remote_code" if bias == MLP else "plain")
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        if layout == "plain":
            reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
            assert type(reloaded).__name__ == "Qwen3ForCausalLM"
            assert reloaded.config.num_attention_heads == 2 and reloaded.config.head_dim == 24
            assert reloaded.config.attention_bias == (bias == ATTN or config != "gqa")
            tied = reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
            assert tied == (config == "mha-bias-tied")
        else:
            reloaded = prunekit.load_pruned(str(path))
            assert type(reloaded).__name__ == "PrunekitQwen3ForCausalLM"
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, atol=ATOL, rtol=0)


def _pp_seq(model):
    calibration = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    return prunekit.prune(
        model,
        None,
        method="pp-seq",
        ratio=0.4,
        calibration=calibration,
        skip_layers=[0],
        round_to=1,
    ).model


@pytest.mark.parametrize("config", ["sliding", "mha-bias-tied"])
def test_pp_seq_rows_match_running_alone(config):
    dyn = _pp_seq(_model(config))
    ids = _ids(n=4, seq=16, seed=4)
    with torch.no_grad():
        dyn.reset_state()
        together = dyn(input_ids=ids).logits
        kept = dyn.decisions[(1, MLP)]
        assert torch.unique(kept.sort(dim=1).values, dim=0).shape[0] > 1  # rows differ
        for b in range(ids.shape[0]):
            dyn.reset_state()  # each row alone from the same history
            alone = dyn(input_ids=ids[b : b + 1]).logits
            torch.testing.assert_close(together[b : b + 1], alone, atol=ATOL, rtol=0)


def test_pp_seq_padded_generation_equals_each_prompt_alone_past_the_window():
    """Left-padded prompts of 9, 6 and 4 tokens and 6 new ones: longer than the sliding
    window, so the sliding layers drop keys while the cache grows."""
    dyn = _pp_seq(_model("sliding"))
    prompts = [_ids(n=1, seq=n, seed=10 + n)[0] for n in (9, 6, 4)]
    width = max(p.numel() for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - p.numel() :], mask[b, width - p.numel() :] = p, 1
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        dyn.reset_state()
        batch = dyn.generate(ids, attention_mask=mask, **kw)[:, width:]
        for b, p in enumerate(prompts):
            dyn.reset_state()
            alone = dyn.generate(p[None], **kw)[:, p.numel() :]
            assert torch.equal(batch[b : b + 1], alone), b


# --------------------------------------------------------------------------------------------
# GGUF export: llama.cpp's qwen3 architecture
# --------------------------------------------------------------------------------------------


def _llama_cpp():
    if os.environ.get("PRUNEKIT_REQUIRE_LLAMA_CPP") == "1":
        import llama_cpp  # noqa: F401  (CI: a missing binding is a failure, not a skip)
    else:
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


def _checked(path):
    """Export ``path`` in f32 and compare it in llama.cpp with the saved model."""
    _llama_cpp()
    report = export(
        path, type="f32", vocab="none", check=True, check_windows=2, check_tokens=24, threads=1
    )
    check = report["check"]
    assert report["arch"] == "qwen3", report
    assert check["max_abs_logit_diff"] < 1e-3 and check["greedy_same"], check
    assert abs(check["ppl_rel_diff"]) < 1e-4, check
    return report


def _gguf_fields(path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    out = {key: field.contents() for key, field in reader.fields.items() if key.startswith("qwen3")}
    out["tensors"] = {t.name for t in reader.tensors}
    return out


@pytest.mark.parametrize("config", ["gqa", "mha-bias-tied", "sliding-off"])
def test_dense_qwen3_exports_as_qwen3_and_matches_in_llama_cpp(tmp_path, config):
    """Unpruned: head_dim of its own, tied embeddings, q/k/v biases (the o_proj bias zero:
    llama.cpp's qwen3 reads none), and a config with use_sliding_window but no layer past
    max_window_layers (every layer full attention)."""
    if config == "sliding-off":
        model = tiny_qwen3(sliding_window=5, max_window_layers=3)
        assert set(model.config.layer_types) == {"full_attention"}
    else:
        model = _model(config)
    if config == "mha-bias-tied":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.bias.zero_()
    model.save_pretrained(tmp_path / "m")
    report = _checked(tmp_path / "m")
    assert report["legalization"] == {}
    fields = _gguf_fields(report["path"])
    c = model.config
    assert fields["qwen3.attention.key_length"] == c.head_dim
    assert fields["qwen3.attention.head_count"] == c.num_attention_heads
    assert fields["qwen3.attention.head_count_kv"] == c.num_key_value_heads
    assert {"blk.2.attn_q_norm.weight", "blk.2.attn_k_norm.weight"} <= fields["tensors"]
    assert ("output.weight" in fields["tensors"]) == (not c.tie_word_embeddings)
    assert ("blk.0.attn_q.bias" in fields["tensors"]) == c.attention_bias
    assert "blk.0.attn_output.bias" not in fields["tensors"]


@pytest.mark.parametrize("config", ["gqa", "mha-bias-tied"])
def test_uniformly_pruned_qwen3_exports_as_qwen3(tmp_path, config):
    """Every layer pruned at one ratio (wanda-sp, the uniform allocator with balanced K/V
    groups): llama.cpp's qwen3 holds the pruned head count (heads x head size != hidden)."""
    model = _model(config)
    if config == "mha-bias-tied":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.bias.zero_()
    outcome = prunekit.prune(
        model,
        None,
        method="wanda-sp",
        ratio=0.5,
        calibration=_calibration(),
        round_to=1,
        skip_layers=[],
        allocator={"name": "uniform", "balanced_kv": True},
    )
    assert {(r["heads"], r["channels"]) for r in outcome.structure} == {(2, 32)}
    outcome.save(str(tmp_path / "m"))
    fields = _gguf_fields(_checked(tmp_path / "m")["path"])
    assert fields["qwen3.attention.head_count"] == 2
    assert fields["qwen3.feed_forward_length"] == 32


def test_uneven_kv_groups_in_every_layer_are_padded_exactly(tmp_path):
    """Three of four query heads kept in every layer, two on K/V head 0 and one on K/V head 1:
    each group is padded to two with a zero query head, the same shape in every layer."""
    model = _model("gqa")
    kept = {(i, ATTN): torch.tensor([0, 1, 2]) for i in range(3)}
    slice_model(Qwen3Adapter(model), Allocation(kept))
    save_pruned(Qwen3Adapter(model), None, str(tmp_path / "m"), {})
    report = _checked(tmp_path / "m")
    assert report["legalization"]["padded_query_heads"] == 3  # one per layer
    assert _gguf_fields(report["path"])["qwen3.attention.head_count"] == 4


def _refused(path, words: str, tmp_path) -> None:
    out = tmp_path / "x.gguf"
    with pytest.raises(ExportError, match=words):
        export(path, type="f32", vocab="none", output=out)
    assert not list(tmp_path.glob("*gguf*")), "a file was written"


def test_per_layer_shapes_are_refused_with_what_would_export(tmp_path):
    outcome = prunekit.prune(
        _model("gqa"),
        None,
        method="wanda-sp",
        ratio=0.4,
        calibration=_calibration(),
        round_to=1,
        skip_layers=[0],
    )
    outcome.save(str(tmp_path / "m"))
    _refused(tmp_path / "m", r"per-layer shapes .*no q/k norms.*uniform ratio", tmp_path)


@pytest.mark.parametrize("source", ["attention_bias", "compensation"])
def test_output_biases_llama_cpp_does_not_read_are_refused(tmp_path, source):
    """A trained o_proj bias (attention_bias: true) or a compensation bias on down_proj:
    llama.cpp's qwen3 reads neither, so the export would compute another function."""
    if source == "attention_bias":
        model, name = _model("mha-bias-tied"), "attn_output.bias"
    else:  # one shape in every layer, so that only the bias stands in the way
        model, name = _model("gqa"), "ffn_down.bias"
        adapter = slice_model(Qwen3Adapter(model), Allocation(_uniform_kept(Qwen3Adapter(model))))
        for la in adapter.layers():
            la.add_output_bias(MLP, torch.linspace(-0.2, 0.2, la.hidden_size))
    save_pruned(Qwen3Adapter(model), None, str(tmp_path / "m"), {})
    _refused(tmp_path / "m", rf"blk\.0\.{name} is not zero", tmp_path)
