"""prunekit-granite: a third-party prunekit plugin adding a model adapter for IBM Granite.

An example for plugin authors: an architecture that no built-in adapter serves, supported
from outside prunekit with its plugin front (``prunekit.plugin``) only. The package's ``pyproject.toml`` exposes this
module under the ``prunekit`` entry-point group::

    [project.entry-points.prunekit]
    granite = "prunekit_granite"

so installing the package is enough: prunekit loads the module and calls its
``prunekit_register_adapters`` hook when it builds its registry, and ``resolve_adapter`` then
picks :class:`GraniteAdapter` for any model whose ``config.model_type`` is ``"granite"``.

Granite (``GraniteForCausalLM``) is a LLaMA layer with four scalar multipliers:

* ``attention_multiplier`` replaces ``head_dim ** -0.5`` as the attention score scale;
* ``residual_multiplier`` scales each block's output before the residual add:
  ``h = h + residual_multiplier * block(norm(h))``;
* ``embedding_multiplier`` (input embeddings) and ``logits_scaling`` (final logits) act
  outside the decoder layers, so an adapter, which only ever runs decoder layers, ignores them.

Hence the adapter is the LLaMA one with two changes in its layer adapter: the attention scale
(``kernel.scaling``, used by the block forward and by the probe) and :meth:`add_output`.
"""

from __future__ import annotations

from prunekit.plugin import LlamaAdapter, LlamaLayerAdapter, hookimpl

__all__ = ["GraniteAdapter", "GraniteLayerAdapter", "prunekit_register_adapters"]


class GraniteLayerAdapter(LlamaLayerAdapter):
    """One ``GraniteDecoderLayer``: a LLaMA layer with Granite's attention scale and residual
    multiplier."""

    def __init__(self, layer, index: int, config, rotary=None) -> None:
        super().__init__(layer, index, config, rotary)
        # the attention kernel (gathered blocks, dynamic runtime) and the probe read this scale
        self.kernel.scaling = config.attention_multiplier

    def add_output(self, group, residual, y):
        # GraniteDecoderLayer: hidden = residual + block_output * residual_multiplier
        return residual + y * self.config.residual_multiplier


class GraniteAdapter(LlamaAdapter):
    """IBM Granite causal LMs (``GraniteForCausalLM``, ``model_type: granite``): heads and MLP
    channels, as for LLaMA."""

    name = "granite"
    model_types = ("granite",)
    layer_class = GraniteLayerAdapter
    # This plugin ships no modelling file, so a pruned model with per-layer shapes cannot be
    # saved; one with the same shapes in every layer still saves as a plain Granite checkpoint
    # (LlamaAdapter.plain_model rebuilds it from the model's own config class).
    modeling = None


@hookimpl
def prunekit_register_adapters(register):
    register(
        "granite",
        GraniteAdapter,
        description="IBM Granite (third-party example plugin): heads and MLP channels",
    )
