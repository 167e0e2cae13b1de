"""The Qwen3 adapter: the LLaMA layer with an RMSNorm on every query and key head.

Qwen3's decoder layer is LLaMA's pre-norm layer (RMSNorm before each block, RoPE, gated SiLU
MLP, MHA or GQA) whose attention norms each query and key head over ``head_dim`` after the
projection and before RoPE (``q_norm``/``k_norm``, as Gemma-3's, but without Gemma's sandwich
norms, embedding scale or ``query_pre_attn_scalar``: scores are scaled by ``head_dim ** -0.5``).
``head_dim`` is explicit and need not equal ``hidden / heads``; ``attention_bias`` gives q, k, v
and o biases; with ``use_sliding_window`` the layers ``layer_types`` marks
``sliding_attention`` (by default those from ``max_window_layers`` on) attend within
``sliding_window``; the embeddings may be tied.

Prunable groups are LLaMA's: query heads (q rows and o columns, and with MHA the k/v rows; their
biases with them) and MLP channels. The q/k norms act on ``head_dim`` and are shared by every
head, so they are never sliced: the gathered weights
(:class:`~prunekit.models.pruned_llama.AttentionWeights`) and the sliced attention module
(:class:`~prunekit.models.pruned_llama.PrunedLlamaAttention`) hold the layer's own norm modules,
and the LLaMA forward applies them (:func:`~prunekit.models.pruned_llama.project_qkv`). A saved
checkpoint with per-layer shapes rebuilds as ``PrunekitQwen3ForCausalLM`` (``pruned_llama.py``).
"""

from __future__ import annotations

from torch import nn

from prunekit.errors import ExportError
from prunekit.hookspecs import hookimpl
from prunekit.models.gemma3 import Gemma3Adapter
from prunekit.models.llama import LlamaAdapter, LlamaLayerAdapter
from prunekit.models.pruned_llama import AttentionWeights


class Qwen3LayerAdapter(LlamaLayerAdapter):
    """One ``Qwen3DecoderLayer``: the LLaMA layer adapter (prunable groups, MLP, K/V mapping,
    probe, slicing, cost model) whose gathered and sliced attention carry the layer's q/k norms.
    The norms add no matmul, so the cost model is LLaMA's."""

    def attention_weights(self, kept_heads) -> AttentionWeights:
        w = super().attention_weights(kept_heads)
        w.q_norm, w.k_norm = self.attn.q_norm, self.attn.k_norm
        return w

    def _pruned_attention(self, q_proj, k_proj, v_proj, o_proj, kv_index) -> nn.Module:
        pruned = super()._pruned_attention(q_proj, k_proj, v_proj, o_proj, kv_index)
        pruned.q_norm, pruned.k_norm = self.attn.q_norm, self.attn.k_norm
        return pruned


class Qwen3Adapter(LlamaAdapter):
    """Qwen3 causal LMs (``Qwen3ForCausalLM``, ``model_type: qwen3``): the LLaMA model adapter's
    layer list, saved shapes and plain export, with Qwen3 layers."""

    name = "qwen3"
    model_types = ("qwen3",)
    modeling = "prunekit.models.pruned_llama:PrunekitQwen3ForCausalLM"
    layer_class = Qwen3LayerAdapter

    #: Gemma-3's rule: ``attention_bias`` gives an o_proj bias (q/k/v biases, zero where the
    #: checkpoint had none, come with it); Qwen3's MLP has no bias switch, so a down_proj bias
    #: needs the per-layer layout
    plain_bias_keys = Gemma3Adapter.plain_bias_keys

    def gguf_model(self):
        """llama.cpp's ``qwen3`` architecture, for one shape in every layer: the LLaMA export
        (:func:`prunekit.models.gguf_llama.llama_gguf_model`; its exact legalization of uneven
        K/V groups, RoPE halves as Hugging Face rotates them) with the q/k norms added.

        Refused, before anything is written: per-layer shapes (``qwen3`` reads one head count
        and FFN width for every layer, and ``deci``, which reads them per layer, has no q/k
        norms), a sliding window (``qwen3`` attends to every earlier token), and a non-zero
        ``o_proj`` or ``down_proj`` bias (``qwen3`` reads neither: ``attention_bias: true``
        checkpoints, or a compensation bias)."""
        from prunekit.export.gguf import GgufTensor
        from prunekit.models.gguf_llama import llama_gguf_model

        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None)
        sliding = [
            la.index
            for la in self.layers()
            if la.sliding_window is not None and (limit is None or la.sliding_window < limit)
        ]
        if sliding:
            raise ExportError(
                f"layers {sliding} attend within a sliding window of {config.sliding_window} "
                "tokens, which llama.cpp's qwen3 architecture does not apply (it would attend to "
                "every earlier token); a Qwen3 whose config has use_sliding_window: false exports"
            )
        spec = llama_gguf_model(self, "qwen3", rotate_half=True)
        if spec.arch != "qwen3":
            shapes = sorted(
                set(
                    zip(
                        spec.fields["head_count"],
                        spec.fields["head_count_kv"],
                        spec.fields["feed_forward_length"],
                        strict=True,
                    )
                )
            )
            raise ExportError(
                f"this Qwen3 has per-layer shapes {shapes[:3]}{' ...' if len(shapes) > 3 else ''} "
                "(query heads, K/V heads, FFN width), which llama.cpp cannot hold for Qwen3: its "
                "qwen3 architecture reads one shape for every layer, and deci (per-layer shapes) "
                "has no q/k norms; prune every layer to one shape (a uniform ratio: skip_layers: "
                "[], the uniform allocator with balanced_kv: true)"
            )
        tensors = []
        for tensor in spec.tensors:
            if tensor.name.endswith(("attn_output.bias", "ffn_down.bias")):
                if bool(tensor.data.abs().any()):
                    raise ExportError(
                        f"{tensor.name} is not zero (attention_bias: true, or a compensation "
                        "bias), and llama.cpp's qwen3 architecture reads no attention-output or "
                        "FFN-down bias; prune without a compensation bias (compensator: none)"
                    )
                continue  # a zero bias: dropped, as llama.cpp's qwen3 would refuse the tensor
            tensors.append(tensor)
        for la in self.layers():
            for name in ("q_norm", "k_norm"):
                weight = getattr(la.attn, name).weight
                tensors.append(GgufTensor(f"blk.{la.index}.attn_{name}.weight", weight, False))
        spec.tensors = tensors
        return spec


@hookimpl
def prunekit_register_adapters(register):
    register(
        "qwen3",
        Qwen3Adapter,
        description="Qwen3 (q/k norms, head_dim of its own, GQA, optional sliding windows)",
    )
