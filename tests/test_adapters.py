"""Every built-in adapter passes the conformance kit, and every method at ratio 0 reproduces
the dense logits on each architecture."""

import pytest
import torch

import prunekit
from prunekit.models.gemma3 import Gemma3Adapter
from prunekit.models.mistral import MistralAdapter
from prunekit.models.opt import OptAdapter
from prunekit.models.qwen2 import Qwen2Adapter
from prunekit.registry import adapter_class_for
from prunekit.testing import (
    AdapterConformance,
    tiny_gemma3,
    tiny_llama,
    tiny_mistral,
    tiny_opt,
    tiny_phi3,
    tiny_qwen2,
    tiny_qwen3,
)


class TestMistral(AdapterConformance):
    adapter_class = MistralAdapter

    def make_model(self):
        return tiny_mistral(heads=4, kv_heads=2, sliding_window=5)


class TestMistralMHA(AdapterConformance):
    adapter_class = MistralAdapter
    skip_checks = ("reload",)  # the GQA / sdpa variant above saves the same layout

    def make_model(self):
        return tiny_mistral(heads=4, kv_heads=4, sliding_window=3, attn_implementation="eager")


class TestQwen2(AdapterConformance):
    adapter_class = Qwen2Adapter

    def make_model(self):
        return tiny_qwen2(heads=4, kv_heads=2, sliding_window=5)


class TestQwen2MHA(AdapterConformance):
    adapter_class = Qwen2Adapter
    skip_checks = ("reload",)  # the GQA / sdpa variant above saves the same layout

    def make_model(self):
        return tiny_qwen2(heads=4, kv_heads=4, sliding_window=None)


class TestOpt(AdapterConformance):
    adapter_class = OptAdapter

    def make_model(self):
        return tiny_opt(heads=4)


class TestOptEager(AdapterConformance):
    adapter_class = OptAdapter
    skip_checks = ("reload",)  # the GQA / sdpa variant above saves the same layout

    def make_model(self):
        return tiny_opt(heads=4, attn_implementation="eager")


class TestGemma3(AdapterConformance):
    adapter_class = Gemma3Adapter

    def make_model(self):
        return tiny_gemma3(heads=4, kv_heads=1)


class TestGemma3MHA(AdapterConformance):
    adapter_class = Gemma3Adapter

    def make_model(self):
        return tiny_gemma3(heads=4, kv_heads=4, attn_implementation="eager")


TINY = {
    "llama-mha": lambda: tiny_llama(heads=4, kv_heads=4),
    "llama-gqa": lambda: tiny_llama(heads=6, kv_heads=2),
    "mistral": lambda: tiny_mistral(),
    "qwen2": lambda: tiny_qwen2(),
    "opt": lambda: tiny_opt(),
    "gemma3": lambda: tiny_gemma3(),
    "phi3": lambda: tiny_phi3(),
    "qwen3": lambda: tiny_qwen3(sliding_window=5),
    "qwen3-mha": lambda: tiny_qwen3(kv_heads=4, attention_bias=True, tie_word_embeddings=True),
}
METHODS = ["pp", "pp-fullbatch", "pp-history", "pp-calib", "wanda-sp", "flap", "llm-pruner"]


@pytest.mark.parametrize("arch", TINY)
def test_resolution_picks_the_architecture_adapter(arch):
    model = TINY[arch]()
    expected = {"llama-mha": "llama", "llama-gqa": "llama", "qwen3-mha": "qwen3"}.get(arch, arch)
    assert adapter_class_for(model.config).name == expected


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", TINY)
def test_ratio_zero_reproduces_dense_logits(arch, method):
    model = TINY[arch]()
    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(2))
    calibration = torch.randint(3, 128, (24, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        outcome = prunekit.prune(
            model, None, method=method, ratio=0.0, calibration=calibration, skip_layers=[0]
        )
        for _ in range(2):  # dynamic methods: a second batch after a history update
            torch.testing.assert_close(
                outcome.model(input_ids=ids).logits, dense, atol=1e-5, rtol=0
            )


def test_installed_adapter_takes_over_from_a_builtin(prunekit_pm):
    from prunekit.models.llama import LlamaAdapter
    from prunekit.registry import adapter_order, get_registry, resolve_adapter

    class MyLlama(LlamaAdapter):
        name = "my-llama"

    class Plugin:
        @prunekit.hookimpl
        def prunekit_register_adapters(self, register):
            register("my-llama", MyLlama)

    prunekit_pm.register_plugin(Plugin(), "a-third-party-plugin")
    model = tiny_llama()
    assert adapter_order(get_registry())[0].name == "my-llama"  # third party first
    assert resolve_adapter(model).name == "my-llama"
    assert resolve_adapter(model, name="llama").name == "llama"  # recipe model.adapter


def test_unsupported_architecture_fails_at_validate_with_the_supported_list(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path / "gpt2")
    recipe = {
        "model": {"id": str(tmp_path / "gpt2")},
        "method": {"name": "dense"},
        "evaluation": {"perplexity": []},
    }
    with pytest.raises(prunekit.PrunekitError) as err:
        prunekit.validate(recipe)
    message = str(err.value)
    assert "model.id" in message and "'gpt2'" in message
    for name in ("llama", "mistral", "qwen2", "opt", "gemma3", "qwen3"):
        assert name in message


def test_a_close_variant_is_refused_at_validate_with_the_field_that_differs(tmp_path):
    # Gemma-2-style attention soft-capping changes the forward; the Gemma-3 adapter does not
    # replicate it, so it must not claim such a config silently, nor when named explicitly
    config = tiny_gemma3().config
    config.attn_logit_softcapping = 50.0
    config.save_pretrained(tmp_path / "capped")
    recipe = {
        "model": {"id": str(tmp_path / "capped")},
        "method": {"name": "dense"},
        "evaluation": {"perplexity": []},
    }
    with pytest.raises(
        prunekit.PrunekitError, match=r"model\.id.*'gemma3'.*attn_logit_softcapping=50"
    ):
        prunekit.validate(recipe)
    with pytest.raises(prunekit.PrunekitError, match=r"adapter 'gemma3' cannot run.*softcapping"):
        prunekit.validate({**recipe, "model": {**recipe["model"], "adapter": "gemma3"}})
    config.attn_logit_softcapping = None
    assert adapter_class_for(config) is Gemma3Adapter


@pytest.mark.parametrize(
    "arch", ["llama-gqa", "mistral", "qwen2", "opt", "gemma3", "phi3", "qwen3"]
)
def test_bidirectional_attention_is_refused_by_every_builtin_adapter(arch):
    # transformers builds bidirectional masks from is_causal=False for any decoder; every
    # built-in adapter's probe and per-row runtime attend causally
    from prunekit.errors import ModelError

    config = TINY[arch]().config
    assert adapter_class_for(config)  # served as it is
    config.is_causal = False
    with pytest.raises(ModelError, match="is_causal=False"):
        adapter_class_for(config)
    if arch == "gemma3":  # EmbeddingGemma's switch
        config.is_causal = True
        config.use_bidirectional_attention = True
        with pytest.raises(ModelError, match="use_bidirectional_attention=True"):
            adapter_class_for(config)


def test_recipe_can_name_the_adapter_and_a_wrong_name_is_an_error():
    recipe = {
        "model": {"id": "smollm2-135m-instruct", "adapter": "lama"},
        "method": {"name": "dense"},
        "evaluation": {"perplexity": []},
    }
    with pytest.raises(prunekit.PrunekitError, match=r"model\.adapter.*did you mean 'llama'"):
        prunekit.validate(recipe)


STATIC = ["wanda-sp", "flap", "llm-pruner", "pp-calib"]


def _prune(arch, method, ratio=0.4, **keys):
    model = TINY[arch]()
    calibration = torch.randint(3, 128, (24, 16), generator=torch.Generator().manual_seed(1))
    return prunekit.prune(
        model, None, method=method, ratio=ratio, calibration=calibration, round_to=1, **keys
    )


@pytest.mark.parametrize("method", STATIC)
@pytest.mark.parametrize("arch", TINY)
def test_static_model_saves_and_reloads(arch, method, tmp_path):
    outcome = _prune(arch, method, skip_layers=[0])
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    outcome.save(str(tmp_path / "m"))
    with torch.no_grad():
        want = outcome.model(input_ids=ids).logits
        got = prunekit.load_pruned(str(tmp_path / "m"))(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert outcome.params_kept < sum(p.numel() for p in TINY[arch]().parameters())


@pytest.mark.parametrize("arch", TINY)
def test_uniform_shapes_export_a_plain_checkpoint_where_the_config_allows(arch, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    # ratio 0.5 keeps a head count that divides every tiny model's hidden size
    outcome = _prune(arch, "wanda-sp", skip_layers=[], allocator={"balanced_kv": True}, ratio=0.5)
    outcome.save(str(tmp_path / "m"))
    layout = json.loads((tmp_path / "m" / "prunekit.json").read_text())["layout"]
    # OPTConfig derives head_dim from hidden / heads: pruned heads need the per-layer layout
    assert layout == ("remote_code" if arch == "opt" else "plain")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = outcome.model(input_ids=ids).logits
        if layout == "plain":
            got = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()(input_ids=ids).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["pp", "pp-fullbatch", "pp-history"])
@pytest.mark.parametrize("arch", TINY)
def test_dynamic_methods_prune_every_architecture(arch, method):
    outcome = _prune(arch, method, skip_layers=[0])
    assert [
        row["heads"] < TINY[arch]().config.num_attention_heads for row in outcome.structure
    ] == [False] + [True] * (len(outcome.structure) - 1)
    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = outcome.model(input_ids=ids).logits
        second = outcome.model(input_ids=ids).logits
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert outcome.model.runtime.timers is not None


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3", "llama-mha", "qwen3"])
def test_slicing_an_already_sliced_model_composes_the_kv_mapping(arch):
    import copy

    from prunekit.components import ATTN, MLP, Allocation
    from prunekit.pruning.static import slice_model

    model = TINY[arch]()
    reference = copy.deepcopy(model)
    adapter = adapter_class_for(model.config)(model)
    heads = adapter.layers()[1].num_heads
    first = Allocation({(1, ATTN): torch.tensor([0, 2, heads - 1]), (1, MLP): torch.arange(0, 64)})
    adapter = slice_model(adapter, first)
    second = Allocation({(1, ATTN): torch.tensor([1, 2]), (1, MLP): torch.arange(0, 64, 3)})
    slice_model(adapter, second)
    # the same as keeping heads [2, H-1] and channels 0, 3, ..., 63 of the original at once
    once = slice_model(
        adapter_class_for(reference.config)(reference),
        Allocation({(1, ATTN): torch.tensor([2, heads - 1]), (1, MLP): torch.arange(0, 64, 3)}),
    )
    assert once.layers()[1].kv_heads_of(torch.arange(2)).tolist() == (
        adapter_class_for(model.config)(model).layers()[1].kv_heads_of(torch.arange(2)).tolist()
    )
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0
        )


def test_load_pruned_without_prunekit_json_finds_an_adapter_with_modelling_code(tmp_path):
    outcome = _prune("qwen2", "flap", skip_layers=[0])  # a compensation bias: per-layer layout
    outcome.save(str(tmp_path / "m"))
    (tmp_path / "m" / "prunekit.json").unlink()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            prunekit.load_pruned(str(tmp_path / "m"))(input_ids=ids).logits,
            outcome.model(input_ids=ids).logits,
            atol=1e-5,
            rtol=0,
        )


def test_layer_wrapper_names_positional_arguments():
    from prunekit.pruning.dynamic import _as_keywords

    def forward(hidden_states, attention_mask=None, position_ids=None, **kwargs):
        pass

    h, kw = _as_keywords(forward, "H", ("M",), {"cache": "C"})
    assert h == "H" and kw == {"attention_mask": "M", "cache": "C"}

    def only_args(*args, **kwargs):
        pass

    with pytest.raises(TypeError, match="no named hidden_states"):
        _as_keywords(only_args, "H", ("M",), {})


def test_an_edited_remote_code_file_is_reported_and_never_run(tmp_path):
    """load_pruned runs the installed prunekit's modelling code, and says when the
    checkpoint's own modeling_prunekit_*.py (what trust_remote_code would run) differs."""
    import warnings

    outcome = _prune("qwen2", "flap", skip_layers=[0])
    outcome.save(str(tmp_path / "m"))
    (remote,) = (tmp_path / "m").glob("modeling_prunekit_*.py")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the untouched file: no warning
        prunekit.load_pruned(str(tmp_path / "m"))
    remote.write_text(remote.read_text() + "\nraise RuntimeError('checkpoint code ran')\n")
    with pytest.warns(UserWarning, match="differs from the installed prunekit"):
        model = prunekit.load_pruned(str(tmp_path / "m"))  # and it did not raise
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, outcome.model(input_ids=ids).logits, atol=1e-5, rtol=0
        )
