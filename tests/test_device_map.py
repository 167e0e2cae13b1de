"""Models larger than one device: tiny models dispatched by accelerate (layers offloaded to the
disk, or kept in CPU memory as for a GPU), pruned through the public API, give the logits of
the same model in one piece (prunekit.devices, the dynamic runtime, static slicing, loading
with model.device: auto and model.max_memory)."""

import copy
import gc

import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import (
    AlignDevicesHook,
    add_hook_to_module,
    attach_align_device_hook_on_blocks,
)
from accelerate.utils import OffloadedWeightsLoader, extract_submodules_state_dict

import prunekit
from prunekit.devices import execution_device, input_device, is_offloaded, onloaded, stored_tensor
from prunekit.errors import ModelError, RecipeError
from prunekit.loading import load_model, model_fingerprint
from prunekit.recipe import load_recipe
from prunekit.testing import tiny_llama

LAYERS = 4
CPU = torch.device("cpu")


def _calibration(n=16, seq=32):
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(1))


def _batch(seed=2, b=4, seq=24):
    return torch.randint(3, 128, (b, seq), generator=torch.Generator().manual_seed(seed))


def _module_names(layers=LAYERS):
    return [
        "model.embed_tokens",
        "model.rotary_emb",
        "model.norm",
        "lm_head",
        *(f"model.layers.{i}" for i in range(layers)),
    ]


def _dispatch(model, offloaded: list[str], store: str, tmp_path):
    """``model`` dispatched as accelerate does for a ``device_map``, every module executing on
    the CPU: the ``offloaded`` modules stored on the disk (``store="disk"``), or in CPU memory
    (``"cpu"``: what ``dispatch_model`` does for the CPU part of a model on a GPU)."""
    names = _module_names()
    if store == "disk":
        device_map = {name: "disk" if name in offloaded else "cpu" for name in names}
        return dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    weights = OffloadedWeightsLoader(
        state_dict=extract_submodules_state_dict(model.state_dict(), offloaded)
    )
    attach_align_device_hook_on_blocks(
        model,
        execution_device={"": CPU, **dict.fromkeys(names, CPU)},
        offload={name: name in offloaded for name in names},
        weights_map=weights,
        skip_keys=model._skip_keys_device_placement,
    )
    return model


def _prune(model, method, **kw):
    kw.setdefault("skip_layers", [0])
    return prunekit.prune(
        model, None, method=method, ratio=0.4, calibration=_calibration(), round_to=1, **kw
    )


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _meta_layers(model) -> set[int]:
    return {
        i
        for i, layer in enumerate(model.model.layers)
        if any(p.is_meta for p in layer.parameters())
    }


# ------------------------------------------------------------------------------------------
# prunekit.devices


def test_onloaded_gives_real_weights_and_offloads_them_again(tmp_path):
    reference = tiny_llama(layers=LAYERS)
    model = _dispatch(copy.deepcopy(reference), ["model.layers.1"], "disk", tmp_path)
    layer = model.model.layers[1]
    assert is_offloaded(layer) and not is_offloaded(model.model.layers[0])
    assert layer.self_attn.o_proj.weight.is_meta
    assert execution_device(layer) == CPU and input_device(model) == CPU
    expected = reference.model.layers[1].self_attn.o_proj.weight
    with onloaded(layer):
        torch.testing.assert_close(layer.self_attn.o_proj.weight, expected, rtol=0, atol=0)
        layer.input_layernorm(torch.ones(1, 2, layer.input_layernorm.weight.shape[0]))
        # a submodule's forward inside the context leaves its weights in place
        assert not layer.input_layernorm.weight.is_meta
    assert layer.self_attn.o_proj.weight.is_meta and layer.input_layernorm.weight.is_meta
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(stored_tensor(model, name), reference.get_parameter(name))
    assert model_fingerprint(model) == model_fingerprint(reference)


def test_onloaded_names_the_module_to_onload_instead():
    model = tiny_llama(layers=2)
    layer = model.model.layers[1]
    # one hook for the whole layer (accelerate's preload_module_classes): the projection
    # itself stores nothing
    add_hook_to_module(
        layer, AlignDevicesHook(execution_device=CPU, offload=True, place_submodules=True)
    )
    with pytest.raises(RuntimeError, match="decoder layer"):
        with onloaded(layer.self_attn.o_proj):
            pass
    with pytest.raises(ValueError, match="decoder layer"):
        execution_device(layer.self_attn.o_proj)
    with onloaded(layer):
        assert not layer.self_attn.o_proj.weight.is_meta
    assert execution_device(layer) == CPU


def test_undispatched_modules_are_left_alone():
    model = tiny_llama(layers=2)
    weight = model.model.layers[0].mlp.down_proj.weight
    with onloaded(model):
        assert model.model.layers[0].mlp.down_proj.weight is weight
    assert not is_offloaded(model) and execution_device(model) == CPU


# ------------------------------------------------------------------------------------------
# methods on dispatched models


@pytest.mark.parametrize("store", ["disk", "cpu"])
@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_static_method_on_a_dispatched_model(method, store, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    reference = tiny_llama(heads=6, kv_heads=2, layers=LAYERS)
    offloaded = [
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "model.layers.3",
        "lm_head",
    ]
    model = _dispatch(copy.deepcopy(reference), offloaded, store, tmp_path)
    ids = _batch()
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), rtol=0, atol=0)
    expected = _prune(reference, method)
    outcome = _prune(model, method)
    assert outcome.structure == expected.structure
    assert any(row["heads"] < 6 for row in outcome.structure)
    # the sliced layers are stored again where they were, as smaller layers
    assert _meta_layers(model) == {0, 1, 3}
    for ref_layer, layer in zip(reference.model.layers, model.model.layers, strict=True):
        with onloaded(layer):
            for name, p in ref_layer.named_parameters():
                assert layer.get_parameter(name).shape == p.shape, name
    diff = (_logits(model, ids) - _logits(reference, ids)).abs().max().item()
    assert diff <= 1e-5
    assert _meta_layers(model) == {0, 1, 3}
    # on the disk: one folder per sliced layer (FLAP's bias rewrites it), gone with the model
    folders = list((tmp_path / "cache" / "offload").glob("*"))
    assert len(folders) == (3 if store == "disk" else 0)
    del model, outcome, layer
    gc.collect()
    assert not any(folder.exists() for folder in folders)


def test_saved_dispatched_static_model_reloads(tmp_path):
    reference = tiny_llama(heads=6, kv_heads=2, layers=LAYERS)
    model = _dispatch(copy.deepcopy(reference), ["model.layers.1", "lm_head"], "disk", tmp_path)
    outcome = _prune(model, "wanda-sp")
    outcome.save(str(tmp_path / "saved"))
    reloaded = prunekit.load_pruned(str(tmp_path / "saved"))
    ids = _batch()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=1e-5)


def _two_batches(model):
    return [_logits(model, _batch(seed)) for seed in (2, 3)]  # the history evolves between


@pytest.mark.parametrize("method", ["pp", "pp-seq"])
def test_dynamic_method_with_an_offloaded_skipped_layer(method, tmp_path):
    reference = tiny_llama(heads=6, kv_heads=2, layers=LAYERS)
    model = _dispatch(copy.deepcopy(reference), ["model.layers.0", "lm_head"], "disk", tmp_path)
    expected = _two_batches(_prune(reference, method).model)
    got = _two_batches(_prune(model, method).model)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
    assert _meta_layers(model) == {0}


@pytest.mark.parametrize("store", ["disk", "cpu"])
def test_pp_with_offloaded_pruned_layers(store, tmp_path):
    reference = tiny_llama(heads=6, kv_heads=2, layers=LAYERS)
    offloaded = ["model.layers.1", "model.layers.2", "lm_head"]
    model = _dispatch(copy.deepcopy(reference), offloaded, store, tmp_path)
    expected = _two_batches(_prune(reference, "pp").model)
    got = _two_batches(_prune(model, "pp").model)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


def test_dynamic_generation_on_a_dispatched_model(tmp_path):
    reference = tiny_llama(heads=6, kv_heads=2, layers=LAYERS)
    model = _dispatch(copy.deepcopy(reference), ["model.layers.0", "lm_head"], "disk", tmp_path)
    ids = _batch(b=2, seq=12)
    out = [
        _prune(m, "pp").model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
        )
        for m in (reference, model)
    ]
    assert out[0].tolist() == out[1].tolist()


def test_llm_pruner_refuses_offloaded_pruned_layers(tmp_path):
    model = _dispatch(tiny_llama(layers=LAYERS), ["model.layers.2"], "disk", tmp_path)
    with pytest.raises(ModelError, match=r"layers \[2\] are offloaded"):
        _prune(model, "llm-pruner", grad_samples=2, grad_seq_len=16)


# ------------------------------------------------------------------------------------------
# loading with model.device: auto and model.max_memory


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny LLaMA saved with a word-level tokenizer, and the bytes one layer takes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama(layers=LAYERS)
    directory = tmp_path / "tiny"
    model.save_pretrained(directory)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>"
    ).save_pretrained(directory)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return model, directory, layer_bytes


def test_auto_with_max_memory_offloads_to_disk_without_cuda(tiny_checkpoint, tmp_path, monkeypatch):
    reference, directory, layer_bytes = tiny_checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load_model(str(directory), device="auto", max_memory={"cpu": 3 * layer_bytes})
    assert "disk" in loaded.info["device_map"].values()
    assert loaded.info["device"] == "cpu"
    assert loaded.info["fingerprint"] == model_fingerprint(reference)
    ids = _batch()
    torch.testing.assert_close(
        _logits(loaded.model, ids), _logits(reference, ids), rtol=0, atol=1e-5
    )
    folders = list((tmp_path / "cache" / "offload").iterdir())
    assert len(folders) == 1
    del loaded
    gc.collect()
    assert not folders[0].exists()  # the offloaded weights go with the model


def test_auto_without_cuda_or_max_memory_loads_on_the_cpu(tiny_checkpoint, monkeypatch):
    _, directory, _ = tiny_checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = load_model(str(directory), device="auto")
    assert "device_map" not in loaded.info and not is_offloaded(loaded.model)


def test_max_memory_needs_device_auto(tiny_checkpoint):
    _, directory, _ = tiny_checkpoint
    with pytest.raises(ModelError, match="max_memory applies only to device 'auto'"):
        load_model(str(directory), device="cpu", max_memory={"cpu": "1GiB"})


def test_recipe_max_memory():
    model = load_recipe(
        {
            "model": {
                "device": "auto",
                "max_memory": {0: "20GiB", "cuda:1": "1.5GB", "cpu": 1024, "disk": "100 MiB"},
            }
        }
    ).recipe.model
    assert model.max_memory == {0: 20 * 2**30, 1: 1_500_000_000, "cpu": 1024, "disk": 100 * 2**20}
    with pytest.raises(RecipeError) as error:
        load_recipe({"model": {"max_memory": {"cpu": "2GiB"}}})
    assert "model.max_memory: " in str(error.value)
    assert "applies only with model.device: auto" in str(error.value)
    with pytest.raises(RecipeError, match="unknown device 'gpu'"):
        load_recipe({"model": {"device": "auto", "max_memory": {"gpu": "2GiB"}}})
    with pytest.raises(RecipeError, match="'lots' is not a memory size"):
        load_recipe({"model": {"device": "auto", "max_memory": {"cpu": "lots"}}})
