"""The Qwen2 adapter: the LLaMA layer with q/k/v biases and per-layer sliding windows.

A head's coupled group includes its q bias (and k/v biases with MHA); ``config.layer_types``
says which layers use the sliding window. A saved checkpoint with per-layer shapes rebuilds as
``PrunekitQwen2ForCausalLM`` (a ``Qwen2ForCausalLM``).
"""

from __future__ import annotations

from prunekit.hookspecs import hookimpl
from prunekit.models.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    """Qwen2 causal LMs (GQA, q/k/v biases, optional sliding window layers)."""

    name = "qwen2"
    model_types = ("qwen2",)
    modeling = "prunekit.models.pruned_llama:PrunekitQwen2ForCausalLM"

    def gguf_model(self):
        """llama.cpp's ``qwen2`` architecture holds only the unpruned shape (heads times head
        size equal to the hidden size, no output biases): ``deci`` otherwise."""
        from prunekit.models.gguf_llama import llama_gguf_model

        return llama_gguf_model(self, "qwen2", own_arch_pruned=False, rotate_half=True)

    def plain_bias_keys(self, config, o_bias, down_bias):
        # Qwen2's o_proj and MLP never carry a bias: a compensation bias needs the per-layer
        # layout
        return None if o_bias or down_bias else {}


@hookimpl
def prunekit_register_adapters(register):
    register("qwen2", Qwen2Adapter, description="Qwen2 (GQA, q/k/v biases, sliding windows)")
