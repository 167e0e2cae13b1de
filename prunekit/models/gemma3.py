"""The Gemma-3 (text) adapter: sandwich norms, q/k norms, sliding and full attention layers,
GELU-tanh gated MLP, ``head_dim`` independent of the hidden size, scaled embeddings.

The layer: ``h += post_attention_norm(attn(input_norm(h)))``, then
``h += post_feedforward_norm(mlp(pre_feedforward_norm(h)))``. The embedding scale
(``sqrt(hidden)``) is applied by the model before the first layer, so nothing in a layer
depends on it. Attention scales scores by ``query_pre_attn_scalar ** -0.5`` (not
``head_dim ** -0.5``), applies RoPE with the base of the layer's type, and on
``sliding_attention`` layers sees only the last ``sliding_window`` positions; the probe's
attention among its tokens follows the same rules.

Prunable groups: query heads (with GQA, e.g. Gemma-3-270M's 4 query heads over 1 KV head,
K/V are never pruned and each kept head keeps its KV head; the q/k norms act on ``head_dim``
and are shared), and MLP channels (gate/up rows, down columns).
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.components import ATTN
from prunekit.hookspecs import hookimpl
from prunekit.models.llama import LlamaAdapter, LlamaLayerAdapter
from prunekit.models.pruned_gemma3 import (
    Gemma3AttentionWeights,
    Gemma3Kernel,
    PrunedGemma3Attention,
    gemma3_attention_forward,
    project_qkv,
)


class Gemma3LayerAdapter(LlamaLayerAdapter):
    """One ``Gemma3DecoderLayer``: the LLaMA layer adapter (prunable groups, MLP, K/V mapping,
    cost model) with Gemma-3's norms around each group and its attention (q/k norms, scale,
    RoPE per layer type)."""

    attention_fn = staticmethod(gemma3_attention_forward)
    project_qkv = staticmethod(project_qkv)
    pruned_attention_class = PrunedGemma3Attention

    def __init__(self, layer: nn.Module, index: int, config, rotary) -> None:
        super().__init__(layer, index, config, rotary)
        self.kernel = Gemma3Kernel(config, self.kernel.layer_idx)

    def group_input(self, group: str, residual: torch.Tensor) -> torch.Tensor:
        norm = self.layer.input_layernorm if group == ATTN else self.layer.pre_feedforward_layernorm
        return norm(residual)

    def add_output(self, group: str, residual: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        norm = (
            self.layer.post_attention_layernorm
            if group == ATTN
            else self.layer.post_feedforward_layernorm
        )
        return residual + norm(y)

    def attention_weights(self, kept_heads):
        q, k, v, o, qb, kb, vb, ob, kv_index = self._attention_parts(kept_heads)
        return Gemma3AttentionWeights(
            q, k, v, o, qb, kb, vb, ob, self.attn.q_norm, self.attn.k_norm, kv_index, self.head_dim
        )

    @property
    def attention_scale(self) -> float:
        return self.kernel.scaling  # query_pre_attn_scalar ** -0.5

    def rotary(self, x, position_ids):
        return self._rotary(x, position_ids, self.kernel.layer_type)  # RoPE base per layer type

    def _pruned_attention(self, q_proj, k_proj, v_proj, o_proj, kv_index) -> nn.Module:
        a = self.attn
        return PrunedGemma3Attention(
            self.config,
            self.kernel.layer_idx,
            self.head_dim,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            a.q_norm,
            a.k_norm,
            kv_index,
        )


class Gemma3Adapter(LlamaAdapter):
    """Gemma-3 text causal LMs (``Gemma3ForCausalLM``, ``model_type: gemma3_text``): the LLaMA
    model adapter's layer list, saved shapes and plain export, with Gemma-3 layers."""

    name = "gemma3"
    model_types = ("gemma3_text",)
    modeling = "prunekit.models.pruned_gemma3:PrunekitGemma3ForCausalLM"
    layer_class = Gemma3LayerAdapter
    # Gemma's first-token attention sink: WikiText-2 windows without a BOS at position 0 give
    # Gemma-3-270M a perplexity of ~220 instead of ~36
    needs_bos = True

    @classmethod
    def unsupported(cls, config) -> str | None:
        causal = super().unsupported(config)
        if causal:
            return causal
        softcap = getattr(config, "attn_logit_softcapping", None)
        if softcap is not None:
            # Gemma-2-style score soft-capping: the gathered and sliced attention forwards and
            # the probe do not apply it
            return (
                f"attn_logit_softcapping={softcap}: prunekit's Gemma-3 attention has no score "
                "soft-capping (Gemma-3 checkpoints set it to null)"
            )
        return None

    def gguf_model(self):
        """llama.cpp's ``gemma3`` architecture, for one shape in every layer
        (:func:`prunekit.models.gguf_llama.gemma3_gguf_model`)."""
        from prunekit.models.gguf_llama import gemma3_gguf_model

        return gemma3_gguf_model(self)

    def plain_bias_keys(self, config, o_bias, down_bias):
        # an o_proj bias needs attention_bias (zero q/k/v biases with it); the MLP has no switch
        if down_bias:
            return None
        return {"attention_bias": bool(config.attention_bias) or o_bias}


@hookimpl
def prunekit_register_adapters(register):
    register(
        "gemma3",
        Gemma3Adapter,
        description="Gemma-3 text (q/k norms, sliding + full layers, GQA, GELU-tanh MLP)",
    )
