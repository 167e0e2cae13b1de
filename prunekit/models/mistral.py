"""The Mistral adapter: the LLaMA layer with a sliding attention window on every layer.

The window (``config.sliding_window``) reaches the attention kernel of gathered and sliced
layers, and the probe's attention sees only keys inside it. A saved checkpoint with per-layer
shapes rebuilds as ``PrunekitMistralForCausalLM`` (a ``MistralForCausalLM``, so the model
builds its sliding-window masks as the original does).
"""

from __future__ import annotations

from prunekit.hookspecs import hookimpl
from prunekit.models.llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    """Mistral causal LMs (GQA, sliding window, no biases)."""

    name = "mistral"
    model_types = ("mistral",)
    modeling = "prunekit.models.pruned_llama:PrunekitMistralForCausalLM"

    def plain_bias_keys(self, config, o_bias, down_bias):
        # MistralConfig has no bias switch: a compensation bias needs the per-layer layout
        return None if o_bias or down_bias else {}


@hookimpl
def prunekit_register_adapters(register):
    register("mistral", MistralAdapter, description="Mistral (GQA, sliding window)")
