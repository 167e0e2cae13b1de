"""The Phi-3 adapter: fused qkv_proj / gate_up_proj, partial RoPE, long-rope scaling, sliding
windows, MHA and GQA, tied and untied embeddings.

Independent references: the dense Hugging Face ``Phi3ForCausalLM`` (the conformance kit), a
``LlamaForCausalLM`` holding the same weights unfused (a Phi-3 with full RoPE and no scaling
computes exactly what that LLaMA computes, so every method must keep the same units and give
the same logits through the LLaMA adapter), each row run alone, a fresh process reloading a
saved model, and llama.cpp running the exported GGUF.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import prunekit
from prunekit.components import ATTN, MLP, Allocation
from prunekit.models.phi3 import FusedRows, Phi3Adapter
from prunekit.pruning.static import slice_model
from prunekit.registry import adapter_class_for, resolve_adapter
from prunekit.testing import AdapterConformance, tiny_phi3

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# The conformance kit on what the family varies
# --------------------------------------------------------------------------------------------


class TestPhi3GQA(AdapterConformance):
    adapter_class = Phi3Adapter
    skip_checks = ("reload",)  # the long-rope GQA variant below saves the same layout

    def make_model(self):
        return tiny_phi3(heads=4, kv_heads=2)


class TestPhi3MHAEager(AdapterConformance):
    adapter_class = Phi3Adapter

    def make_model(self):
        return tiny_phi3(heads=4, kv_heads=4, attn_implementation="eager")


class TestPhi3LongRopePartialTied(AdapterConformance):
    """Long-rope with ``original_max_position_embeddings`` 4, shorter than the kit's 9-token
    inputs (the long factors are used), RoPE on half of each head, tied embeddings."""

    adapter_class = Phi3Adapter

    def make_model(self):
        return tiny_phi3(
            heads=4, kv_heads=2, longrope=4, partial_rotary_factor=0.5, tie_word_embeddings=True
        )


class TestPhi3SlidingPartial(AdapterConformance):
    adapter_class = Phi3Adapter
    skip_checks = ("reload",)

    def make_model(self):
        return tiny_phi3(heads=6, kv_heads=3, sliding_window=4, partial_rotary_factor=0.75)


def test_the_long_factors_are_what_the_kit_runs():
    """The long-rope variant above really runs its long factors on the kit's inputs."""
    model = tiny_phi3(longrope=4, partial_rotary_factor=0.5)
    rotary = model.model.rotary_emb
    short = rotary.original_inv_freq.clone()
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (2, 9)))
    assert not torch.allclose(rotary.inv_freq, short)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (2, 4)))
    torch.testing.assert_close(rotary.inv_freq, short, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# A Phi-3 is a LLaMA with fused projections: every method must prune both alike
# --------------------------------------------------------------------------------------------


def _llama_twin(phi3):
    """A ``LlamaForCausalLM`` with ``phi3``'s weights, q/k/v and gate/up unfused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = phi3.config
    hd = c.hidden_size // c.num_attention_heads
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=hd,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_parameters["rope_theta"]},
        tie_word_embeddings=c.tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = c._attn_implementation
    dtype = next(phi3.parameters()).dtype
    llama = LlamaForCausalLM(config).to(dtype).eval()
    q_rows = c.num_attention_heads * hd
    kv_rows = c.num_key_value_heads * hd
    with torch.no_grad():
        llama.model.embed_tokens.weight.copy_(phi3.model.embed_tokens.weight)
        llama.model.norm.weight.copy_(phi3.model.norm.weight)
        llama.lm_head.weight.copy_(phi3.lm_head.weight)
        for ours, theirs in zip(llama.model.layers, phi3.model.layers, strict=True):
            q, k, v = theirs.self_attn.qkv_proj.weight.split([q_rows, kv_rows, kv_rows])
            ours.self_attn.q_proj.weight.copy_(q)
            ours.self_attn.k_proj.weight.copy_(k)
            ours.self_attn.v_proj.weight.copy_(v)
            ours.self_attn.o_proj.weight.copy_(theirs.self_attn.o_proj.weight)
            gate, up = theirs.mlp.gate_up_proj.weight.chunk(2)
            ours.mlp.gate_proj.weight.copy_(gate)
            ours.mlp.up_proj.weight.copy_(up)
            ours.mlp.down_proj.weight.copy_(theirs.mlp.down_proj.weight)
            ours.input_layernorm.weight.copy_(theirs.input_layernorm.weight)
            ours.post_attention_layernorm.weight.copy_(theirs.post_attention_layernorm.weight)
    return llama


TWINS = {
    "gqa": lambda: tiny_phi3(heads=6, kv_heads=2, intermediate=48, dtype=torch.float64),
    "mha": lambda: tiny_phi3(heads=4, kv_heads=4, intermediate=48, dtype=torch.float64),
}
IDS = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(2))
CALIBRATION = torch.randint(3, 128, (16, 16), generator=torch.Generator().manual_seed(1))


def test_the_twin_is_the_same_function():
    phi3 = TWINS["gqa"]()
    with torch.no_grad():
        torch.testing.assert_close(
            _llama_twin(phi3)(input_ids=IDS).logits, phi3(input_ids=IDS).logits, atol=1e-10, rtol=0
        )


@pytest.mark.parametrize("method", ["wanda-sp", "flap", "llm-pruner", "pp-calib", "pp", "pp-seq"])
@pytest.mark.parametrize("twin", sorted(TWINS))
def test_every_method_prunes_phi3_as_it_prunes_the_same_llama(twin, method):
    """The same kept heads (q, and k/v with MHA, rows of qkv_proj) and channels (gate and up
    rows of gate_up_proj, down columns) as the LLaMA adapter keeps from the unfused weights:
    the same structure and logits (float64) for static and dynamic methods."""
    phi3 = TWINS[twin]()
    llama = _llama_twin(phi3)
    outcomes = [
        prunekit.prune(
            m,
            None,
            method=method,
            ratio=0.5,
            calibration=CALIBRATION,
            skip_layers=[0],
            round_to=1,
        )
        for m in (phi3, llama)
    ]
    assert outcomes[0].structure == outcomes[1].structure
    pruned = [r for r in outcomes[0].structure if r["layer"] > 0]
    heads = phi3.config.num_attention_heads
    assert all(r["heads"] < heads and r["channels"] < 48 for r in pruned)
    with torch.no_grad():
        got, want = (o.model(input_ids=IDS).logits for o in outcomes)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    if not outcomes[0].dynamic:
        assert outcomes[0].params_kept == outcomes[1].params_kept


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_taylor_scores_of_fused_parts_are_the_unfused_projections_scores(twin):
    """LLM-Pruner's Taylor score reads each unit's coupled group through ``unit_slices``: the
    parts of qkv_proj and gate_up_proj (``FusedRows``) give what LLaMA's q/k/v and gate/up
    projections give."""
    from prunekit_plugins.llm_pruner import unit_taylor

    phi3 = TWINS[twin]()
    llama = _llama_twin(phi3)
    scores = []
    for model in (phi3, llama):
        adapter = resolve_adapter(model)
        params = [s.tensor for la in adapter.layers() for g in la.groups for s in la.unit_slices(g)]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        model(input_ids=IDS, labels=IDS).loss.backward()
        scores.append([unit_taylor(la, g) for la in adapter.layers() for g in la.groups])
        for p in params:
            p.grad = None
    assert any(
        isinstance(s.tensor, FusedRows) for s in resolve_adapter(phi3).layers()[0].unit_slices(ATTN)
    )
    for got, want in zip(*scores, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=1e-6)  # unit_taylor sums in fp32


def test_fused_rows_stand_for_their_part_of_the_parameter():
    model = tiny_phi3(heads=4, kv_heads=4)
    la = resolve_adapter(model).layers()[1]
    (q, k, v, o) = la.unit_slices(ATTN)
    weight = la.attn.qkv_proj.weight
    assert [s.role for s in (q, k, v, o)] == [
        "qkv_proj.weight[q]",
        "qkv_proj.weight[k]",
        "qkv_proj.weight[v]",
        "o_proj.weight",
    ]
    torch.testing.assert_close(v.tensor.detach(), weight.detach()[128:192])
    assert v.tensor.numel() == 64 * 64 and v.tensor.grad is None
    v.tensor.requires_grad_(False)
    assert not weight.requires_grad
    v.tensor.requires_grad_(True)
    weight.grad = torch.arange(weight.numel(), dtype=weight.dtype).view_as(weight)
    torch.testing.assert_close(k.tensor.grad, weight.grad[64:128])
    k.tensor.grad = None
    assert weight.grad is None
    gate, up, down = la.unit_slices(MLP)
    torch.testing.assert_close(up.tensor.detach(), la.mlp.gate_up_proj.weight.detach()[64:])
    with pytest.raises(ValueError, match="no gradient of its own"):
        gate.tensor.grad = torch.zeros(1)
    # GQA: only the query rows of qkv_proj belong to a head
    gqa = resolve_adapter(tiny_phi3(heads=4, kv_heads=2)).layers()[0]
    assert [s.role for s in gqa.unit_slices(ATTN)] == ["qkv_proj.weight[q]", "o_proj.weight"]


def test_loraprune_is_refused_with_a_reason_rather_than_scored_without_the_fused_parts():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model = tiny_phi3()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["qkv_proj", "down_proj"]))
    la = Phi3Adapter(peft_model.base_model.model).layers()[0]
    with pytest.raises(prunekit.PrunekitError, match="fused projection with a LoRA adapter"):
        la.unit_slices(ATTN)


# --------------------------------------------------------------------------------------------
# Long-rope: the probe reads the factors the forward chose
# --------------------------------------------------------------------------------------------


def test_a_probe_of_early_positions_reads_the_long_factors_of_a_long_batch():
    """Long-rope chooses its factors per forward from the longest position; a probe of only
    positions below ``original_max_position_embeddings`` inside a longer batch is computed
    with the factors that batch ran (the dense forward's activations there), not with the
    short ones its own positions would pick."""
    model = tiny_phi3(heads=4, kv_heads=2, longrope=4, partial_rotary_factor=0.5)
    adapter = Phi3Adapter(model)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    seen = {}

    def driver(layer, group, x, residual, run, residual_sq_mean=None):
        y, activations = run(layer.gather(group, None), observe=True)
        pos = torch.arange(3).expand(2, 3)
        seen[group] = (layer.probe(group, x[:, :3], pos), activations[:, :3])
        return y

    captured = {}
    hook = adapter.decoder_layers[1].register_forward_hook(
        lambda m, args, kwargs, out: captured.update(
            h=args[0] if args else kwargs["hidden_states"], kw=kwargs
        ),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(input_ids=ids)
        hook.remove()
        kw = {k: v for k, v in captured["kw"].items() if k != "hidden_states"}
        adapter.layers()[1].run_block(captured["h"], driver=driver, **kw)
    probe, dense = seen[ATTN]
    torch.testing.assert_close(probe, dense, atol=1e-5, rtol=0)
    # the same positions on their own pick the short factors: another result
    rotary = model.model.rotary_emb
    x = torch.zeros(1, 3, 64)
    with torch.no_grad():
        batch, _ = adapter.layers()[1].rotary(x, torch.arange(3)[None])
        own, _ = rotary(x, torch.arange(3)[None])  # (this call switches it to the short ones)
    assert (own - batch).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# Saving: plain checkpoints where Phi3Config can say the shapes, the per-layer class otherwise
# --------------------------------------------------------------------------------------------


def _prune(model, method="wanda-sp", ratio=0.5, **keys):
    keys.setdefault("round_to", 1)
    return prunekit.prune(model, None, method=method, ratio=ratio, calibration=CALIBRATION, **keys)


@pytest.mark.parametrize(
    "factory,layout",
    [
        (lambda: tiny_phi3(heads=4, kv_heads=2, partial_rotary_factor=0.5), "plain"),
        (lambda: tiny_phi3(heads=4, kv_heads=4, tie_word_embeddings=True), "plain"),
        # transformers checks the long-rope factor lists against hidden / heads
        (lambda: tiny_phi3(heads=4, kv_heads=2, longrope=4), "remote_code"),
    ],
)
def test_one_shape_in_every_layer_saves_a_plain_phi3_where_its_config_can_say_it(
    factory, layout, tmp_path
):
    from transformers import AutoModelForCausalLM, Phi3ForCausalLM

    outcome = _prune(factory(), skip_layers=[], allocator={"balanced_kv": True})
    assert {(r["heads"], r["channels"]) for r in outcome.structure} == {(2, 32)}
    outcome.save(str(tmp_path / "m"))
    meta = json.loads((tmp_path / "m" / "prunekit.json").read_text())
    assert meta["layout"] == layout
    with torch.no_grad():
        want = outcome.model(input_ids=IDS).logits
        if layout == "plain":
            reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
            assert type(reloaded) is Phi3ForCausalLM and reloaded.config.head_dim == 16
            attn = reloaded.model.layers[1].self_attn
            assert attn.qkv_proj.out_features == (2 + 2 * reloaded.config.num_key_value_heads) * 16
        else:
            reloaded = prunekit.load_pruned(str(tmp_path / "m"))
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, want, atol=1e-5, rtol=0)


def test_a_compensation_bias_saves_the_per_layer_class(tmp_path):
    outcome = _prune(tiny_phi3(), method="flap", skip_layers=[])
    outcome.save(str(tmp_path / "m"))
    assert json.loads((tmp_path / "m" / "prunekit.json").read_text())["layout"] == "remote_code"
    assert (tmp_path / "m" / "modeling_prunekit_phi3.py").is_file()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("PrunekitPhi3ForCausalLM")
    with torch.no_grad():
        torch.testing.assert_close(
            prunekit.load_pruned(str(tmp_path / "m"))(input_ids=IDS).logits,
            outcome.model(input_ids=IDS).logits,
            atol=1e-5,
            rtol=0,
        )


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_slicing_an_already_sliced_layer_composes_the_fused_rows(kv_heads):
    import copy

    model = tiny_phi3(heads=4, kv_heads=kv_heads)
    reference = copy.deepcopy(model)
    first = Allocation({(1, ATTN): torch.tensor([0, 2, 3]), (1, MLP): torch.arange(0, 64, 2)})
    adapter = slice_model(Phi3Adapter(model), first)
    slice_model(adapter, Allocation({(1, ATTN): torch.tensor([1, 2]), (1, MLP): torch.arange(5)}))
    once = slice_model(
        Phi3Adapter(reference),
        Allocation({(1, ATTN): torch.tensor([2, 3]), (1, MLP): torch.arange(0, 10, 2)}),
    )
    assert Phi3Adapter(model).layers()[1].kv_heads_of(torch.arange(2)).tolist() == (
        once.layers()[1].kv_heads_of(torch.arange(2)).tolist()
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=IDS).logits, reference(input_ids=IDS).logits, atol=1e-5, rtol=0
        )


# --------------------------------------------------------------------------------------------
# Methods at ratio 0, per-sequence PP, and what the adapter refuses
# --------------------------------------------------------------------------------------------

VARIANTS = {
    "mha-longrope-partial-tied": lambda: tiny_phi3(
        kv_heads=4, longrope=4, partial_rotary_factor=0.5, tie_word_embeddings=True
    ),
    "gqa-sliding": lambda: tiny_phi3(heads=6, kv_heads=2, sliding_window=5),
}


@pytest.mark.parametrize(
    "method", ["pp", "pp-fullbatch", "pp-history", "pp-calib", "wanda-sp", "flap", "llm-pruner"]
)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ratio_zero_reproduces_dense_logits(variant, method):
    model = VARIANTS[variant]()
    with torch.no_grad():
        dense = model(input_ids=IDS).logits
        outcome = _prune(model, method=method, ratio=0.0, skip_layers=[0])
        for _ in range(2):  # dynamic methods: a second batch after a history update
            torch.testing.assert_close(
                outcome.model(input_ids=IDS).logits, dense, atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pp_seq_rows_match_running_alone(variant):
    model = VARIANTS[variant]()
    dyn = _prune(model, method="pp-seq", ratio=0.4, skip_layers=[0]).model
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        dyn.reset_state()
        together = dyn(input_ids=ids).logits
        kept = dyn.decisions[(1, MLP)]
        assert kept.shape[0] == 4 and len({tuple(r.tolist()) for r in kept}) > 1
        for b in range(ids.shape[0]):
            dyn.reset_state()  # each row alone from the same history
            alone = dyn(input_ids=ids[b : b + 1]).logits
            torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=0)


def test_a_bidirectional_config_is_refused_at_validate_with_the_field(tmp_path):
    """``is_causal: false`` makes transformers build bidirectional masks for Phi-3 (it
    changes the eager forward); the adapter's probe attends causally, so it is not claimed."""
    model = tiny_phi3(attn_implementation="eager")
    ids = IDS[:1]
    with torch.no_grad():
        causal = model(input_ids=ids).logits
        model.config.is_causal = False
        assert (model(input_ids=ids).logits[:, :-1] - causal[:, :-1]).abs().max() > 1e-3
    model.config.save_pretrained(tmp_path / "bidirectional")
    recipe = {
        "model": {"id": str(tmp_path / "bidirectional")},
        "method": {"name": "dense"},
        "evaluation": {"perplexity": []},
    }
    with pytest.raises(prunekit.PrunekitError, match=r"model\.id.*'phi3'.*is_causal=False"):
        prunekit.validate(recipe)
    with pytest.raises(prunekit.PrunekitError, match=r"adapter 'phi3' cannot run.*is_causal"):
        prunekit.validate({**recipe, "model": {**recipe["model"], "adapter": "phi3"}})
    model.config.is_causal = True
    assert adapter_class_for(model.config) is Phi3Adapter


def test_an_unsupported_architecture_lists_phi3(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path / "gpt2")
    recipe = {
        "model": {"id": str(tmp_path / "gpt2")},
        "method": {"name": "dense"},
        "evaluation": {"perplexity": []},
    }
    with pytest.raises(prunekit.PrunekitError, match="phi3"):
        prunekit.validate(recipe)


# --------------------------------------------------------------------------------------------
# llama.cpp's phi3 architecture
# --------------------------------------------------------------------------------------------


def _llama_cpp():
    if os.environ.get("PRUNEKIT_REQUIRE_LLAMA_CPP") != "1":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


EXPORTS = {  # (model, method or None for the dense model, ratio)
    "dense-gqa": (lambda: tiny_phi3(layers=3), None, 0.0),
    "dense-mha-longrope-partial-tied": (
        lambda: tiny_phi3(
            kv_heads=4, longrope=8, partial_rotary_factor=0.5, tie_word_embeddings=True
        ),
        None,
        0.0,
    ),
    "wanda-sp-gqa": (lambda: tiny_phi3(layers=3), "wanda-sp", 0.5),
    # MHA keeping 2 of 4 heads: 2 K/V heads, each with a zero query head beside its own
    "llm-pruner-mha-longrope": (lambda: tiny_phi3(kv_heads=4, longrope=8), "llm-pruner", 0.5),
    # MHA keeping 3 of 4 heads: 4 K/V heads, one of them zero
    "wanda-sp-mha-3-of-4": (lambda: tiny_phi3(kv_heads=4), "wanda-sp", 0.25),
    "pp-calib-gqa-partial": (
        lambda: tiny_phi3(heads=6, kv_heads=3, partial_rotary_factor=0.75),
        "pp-calib",
        0.5,
    ),
    # the short factors: windows and llama.cpp's context (256) within original_max 300
    "wanda-sp-longrope-short": (
        lambda: tiny_phi3(longrope=300, tie_word_embeddings=True),
        "wanda-sp",
        0.5,
    ),
}
#: K/V heads the export adds per pruned layer (MHA whose kept heads do not divide the heads)
PADDED_KV = {"wanda-sp-mha-3-of-4": 1}


def _saved(tmp_path, factory, method, ratio=0.5, **keys):
    path = tmp_path / "run" / "model"
    model = factory()
    if method is None:
        model.save_pretrained(path)
        return path, None
    calibration = torch.randint(3, 128, (32, 32), generator=torch.Generator().manual_seed(1))
    keys = {"skip_layers": [], "allocator": {"name": "uniform", "balanced_kv": True}, **keys}
    outcome = prunekit.prune(
        model, None, method=method, ratio=ratio, round_to=1, calibration=calibration, **keys
    )
    outcome.save(str(path))
    return path, outcome


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_llama_cpp_computes_what_prunekit_computes(tmp_path, case):
    """One shape in every layer as llama.cpp's phi3 (fused attn_qkv, gate and up in ffn_up,
    partial RoPE, long-rope factors): logits within 1e-3 and the same greedy tokens; pruned
    heads held exactly as zero heads, their cost reported."""
    _llama_cpp()
    from prunekit.export import export

    factory, method, ratio = EXPORTS[case]
    path, outcome = _saved(tmp_path, factory, method, ratio)
    report = export(
        path, type="f32", vocab="none", check=True, check_windows=2, check_tokens=24, threads=1
    )
    check = report["check"]
    assert report["arch"] == "phi3", report
    assert check["max_abs_logit_diff"] < 1e-3, check
    assert check["greedy_same"], check
    assert abs(check["ppl_rel_diff"]) < 1e-4, check
    config = factory().config
    layers = config.num_hidden_layers
    pruned = (
        0
        if outcome is None
        else sum(config.num_attention_heads - r["heads"] for r in outcome.structure)
    )
    assert (outcome is None) == (pruned == 0)
    legal = report["legalization"]
    assert legal.get("padded_query_heads", 0) == pruned
    if pruned:
        padded_kv = PADDED_KV.get(case, 0) * layers
        assert legal["padded_kv_heads"] == padded_kv
        assert legal["extra_parameters"] == 2 * config.hidden_size * 16 * (pruned + padded_kv)
    assert not list(path.parent.glob(".*.tmp")), "a temporary file was left"


def test_llama_cpp_picks_long_factors_by_its_context_size(tmp_path):
    """transformers uses the short factors on 24-token windows within original_max 100;
    llama.cpp's context (rounded up to 256) exceeds it, so llama.cpp runs the long ones: the
    export writes both sets, and the check sees them differ (the documented difference)."""
    _llama_cpp()
    from prunekit.export import export

    path, _ = _saved(tmp_path, lambda: tiny_phi3(longrope=100), None)
    report = export(
        path, type="f32", vocab="none", check=True, check_windows=2, check_tokens=24, threads=1
    )
    assert report["check"]["max_abs_logit_diff"] > 1e-2, report["check"]


@pytest.mark.parametrize(
    "factory,method,keys,words",
    [
        (
            lambda: tiny_phi3(),
            "wanda-sp",
            {"skip_layers": [0]},
            r"per-layer MLP widths .*skip_layers: \[\]",
        ),
        (lambda: tiny_phi3(), "flap", {}, "compensation bias"),
        (lambda: tiny_phi3(sliding_window=5), None, {}, "sliding window of 5 tokens"),
    ],
)
def test_what_llama_cpp_cannot_hold_is_refused_before_writing(
    tmp_path, factory, method, keys, words
):
    from prunekit.errors import ExportError
    from prunekit.export import export

    path, _ = _saved(tmp_path, factory, method, **keys)
    with pytest.raises(ExportError, match=words):
        export(path, type="f32", vocab="none", output=tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*gguf*"))


def test_another_activation_is_refused_before_writing(tmp_path):
    from prunekit.errors import ExportError
    from prunekit.export import export

    model = tiny_phi3()
    model.config.hidden_act = "gelu_new"
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(ExportError, match="hidden_act is 'gelu_new'"):
        export(tmp_path / "model", type="f32", vocab="none", output=tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
