"""Static physical pruning: replace projections by smaller ``nn.Linear`` layers.

After :func:`slice_model` the model has really smaller matrices; per-layer shapes may differ
and, with GQA, the kept query heads of a layer may be unevenly spread over the KV groups: each
pruned attention module carries ``kv_index`` (the KV head each kept query head uses).
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.components import ATTN, MLP, Allocation, ModelAdapter
from prunekit.models.llama import AttentionWeights, attention_forward


def _sub_linear(linear: nn.Linear, rows: torch.Tensor | None = None,
                cols: torch.Tensor | None = None) -> nn.Linear:  # fmt: skip
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        b = b.index_select(0, rows.to(w.device)) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


class PrunedLlamaAttention(nn.Module):
    """LLaMA attention with a subset of query heads; drop-in for ``LlamaAttention``.

    ``kv_index[i]`` is the KV head used by kept query head ``i``. With MHA the k/v rows are
    pruned with their query head and ``kv_index`` is ``arange``.
    """

    def __init__(self, config, layer_idx: int, head_dim: int, q_proj: nn.Linear,
                 k_proj: nn.Linear, v_proj: nn.Linear, o_proj: nn.Linear,
                 kv_index: torch.Tensor) -> None:  # fmt: skip
        super().__init__()
        from prunekit.models.llama import _KernelModule

        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.register_buffer("kv_index", kv_index.long().clone(), persistent=True)
        self.is_causal = True
        self._kernel = _KernelModule(config, layer_idx)

    @property
    def num_heads(self) -> int:
        return self.q_proj.out_features // self.head_dim

    def weights(self) -> AttentionWeights:
        identity = self.kv_index.numel() == self.k_proj.out_features // self.head_dim and bool(
            (
                self.kv_index == torch.arange(self.kv_index.numel(), device=self.kv_index.device)
            ).all()
        )
        return AttentionWeights(
            self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.o_proj.weight,
            self.q_proj.bias, self.k_proj.bias, self.v_proj.bias, self.o_proj.bias,
            None if identity else self.kv_index, self.head_dim,
        )  # fmt: skip

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):  # fmt: skip
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        out = attention_forward(hidden_states, self.weights(), position_embeddings,
                                attention_mask, self._kernel, cache, **kwargs)  # fmt: skip
        return out, None


def slice_layer(adapter_layer, kept_heads: torch.Tensor | None,
                kept_channels: torch.Tensor | None) -> None:  # fmt: skip
    """Physically prune one LLaMA-family decoder layer in place."""
    layer = adapter_layer.layer
    if kept_heads is not None:
        w = adapter_layer.attention_weights(kept_heads)
        attn = layer.self_attn
        rows = adapter_layer.unit_channels(ATTN, kept_heads.to(attn.q_proj.weight.device))
        if adapter_layer.is_gqa:
            k_proj, v_proj = attn.k_proj, attn.v_proj
            kv_index = w.kv_index
        else:
            k_proj, v_proj = _sub_linear(attn.k_proj, rows), _sub_linear(attn.v_proj, rows)
            kv_index = torch.arange(kept_heads.numel())
        base_kv = getattr(attn, "kv_index", None)
        if base_kv is not None and adapter_layer.is_gqa:  # already pruned: compose mappings
            kv_index = base_kv.index_select(0, kept_heads.to(base_kv.device))
        layer.self_attn = PrunedLlamaAttention(
            adapter_layer.config, adapter_layer.kernel.layer_idx, adapter_layer.head_dim,
            _sub_linear(attn.q_proj, rows), k_proj, v_proj,
            _sub_linear(attn.o_proj, cols=rows), kv_index,
        )  # fmt: skip
    if kept_channels is not None:
        mlp = layer.mlp
        mlp.gate_proj = _sub_linear(mlp.gate_proj, kept_channels)
        mlp.up_proj = _sub_linear(mlp.up_proj, kept_channels)
        mlp.down_proj = _sub_linear(mlp.down_proj, cols=kept_channels)


def slice_model(adapter: ModelAdapter, allocation: Allocation) -> ModelAdapter:
    """Apply ``allocation`` physically; returns a fresh adapter of the pruned model."""
    for layer in adapter.layers():
        slice_layer(layer, allocation.kept.get((layer.index, ATTN)),
                    allocation.kept.get((layer.index, MLP)))  # fmt: skip
    return type(adapter)(adapter.model)
