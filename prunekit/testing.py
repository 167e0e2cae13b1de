"""Helpers for tests of prunekit and of third-party plugins (our ``pytester``).

* :func:`tiny_llama` builds a small random LLaMA model (MHA or GQA) in a second, offline.
* :func:`isolated_plugin_manager` is a context manager giving a fresh plugin manager with the
  built-in plugins (and optionally extra ones) registered, restored afterwards; the pytest
  fixture ``prunekit_pm`` (enabled by ``pytest_plugins = ["prunekit.testing"]``) wraps it.
* :class:`AdapterConformance` is a base class of checks every model adapter must pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from prunekit.plugins import (
    PrunekitPluginManager,
    load_entry_points,
    new_plugin_manager,
    set_plugin_manager,
)


def tiny_llama(
    *,
    heads: int = 4,
    kv_heads: int | None = None,
    layers: int = 4,
    hidden: int | None = None,
    intermediate: int = 96,
    vocab: int = 128,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """A small random ``LlamaForCausalLM`` (GQA when ``kv_heads < heads``), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden or heads * 16,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    # random init is tiny; widen weights a bit so pruning decisions are not ties
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


@contextlib.contextmanager
def isolated_plugin_manager(
    *plugins: object, autoload: bool = True
) -> Iterator[PrunekitPluginManager]:
    """A fresh process-wide plugin manager for the duration of the block.

    ``plugins`` are registered on top of the entry points (each under its class or module
    name). The previous manager is restored on exit.
    """
    pm = new_plugin_manager(autoload=False)
    if autoload:
        load_entry_points(pm)
    for i, plugin in enumerate(plugins):
        name = getattr(plugin, "__name__", type(plugin).__name__) + f"-{i}"
        pm.register_plugin(plugin, name)
    previous = set_plugin_manager(pm)
    try:
        yield pm
    finally:
        set_plugin_manager(previous)


try:  # pytest fixtures, only when pytest is importable
    import pytest

    @pytest.fixture
    def prunekit_pm():
        """A fresh plugin manager with the installed plugins; register throwaway ones on it."""
        with isolated_plugin_manager() as pm:
            yield pm

except ImportError:  # pragma: no cover
    pass


class AdapterConformance:
    """Checks every model adapter must pass; subclasses define ``make_model()``.

    Example::

        class TestMyAdapter(AdapterConformance):
            adapter_class = MyAdapter
            def make_model(self):
                return tiny_my_model()
    """

    adapter_class: type
    atol = 1e-5

    def make_model(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def _inputs(self, model, batch: int = 2, seq: int = 7):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
        return ids

    def _layer_io(self, model, index: int):
        """Input and output of decoder layer ``index`` for a random batch, via hooks."""
        captured = {}
        layer = self.adapter_class(model).decoder_layers[index]

        def hook(module, args, kwargs, output):
            captured["args"], captured["kwargs"] = args, kwargs
            captured["out"] = output[0] if isinstance(output, tuple) else output

        handle = layer.register_forward_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                model(self._inputs(model))
        finally:
            handle.remove()
        return captured

    def test_supports(self):
        model = self.make_model()
        assert self.adapter_class.supports(model)

    def test_every_layer_has_units(self):
        adapter = self.adapter_class(self.make_model())
        for layer in adapter.layers():
            assert layer.num_heads > 0, f"layer {layer.index}: no attention heads"
            assert layer.intermediate_size > 0, f"layer {layer.index}: no MLP channels"
            assert layer.num_heads % layer.num_kv_heads == 0, f"layer {layer.index}: bad GQA"

    def test_block_forward_matches_hf(self):
        model = self.make_model()
        adapter = self.adapter_class(model)
        for layer in adapter.layers():
            io = self._layer_io(model, layer.index)
            hidden = io["args"][0] if io["args"] else io["kwargs"]["hidden_states"]
            kw = io["kwargs"]
            with torch.no_grad():
                out = layer.run_block(
                    hidden,
                    position_embeddings=kw["position_embeddings"],
                    attention_mask=kw.get("attention_mask"),
                )
            torch.testing.assert_close(out, io["out"], atol=self.atol, rtol=0,
                                       msg=lambda m, i=layer.index: f"layer {i}: {m}")  # fmt: skip
