"""The LLaMA-family adapter (MHA and GQA): the worked example of a model adapter.

Prunable groups per decoder layer:

* ``attn``: query heads. With MHA a kept head keeps its rows of q/k/v and its columns of o.
  With GQA only q rows and o columns are pruned; k/v are kept whole and each kept query head
  attends with its own KV group (``kv_index``), so groups may end up unequal.
* ``mlp``: intermediate channels: rows of gate/up, columns of down.

Running a block with a kept set gathers the kept rows/columns into smaller contiguous weights
and runs real, smaller matmuls (:func:`attention_forward`, :func:`mlp_forward`). The attention
kernel itself is Hugging Face's (``config._attn_implementation``: sdpa, eager, flash...), fed
with K/V already expanded to one KV head per kept query head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.components import ATTN, LayerAdapter, ModelAdapter
from prunekit.hookspecs import hookimpl
from prunekit.models.pruned_llama import (  # noqa: F401 - re-exported
    AttentionWeights,
    KernelModule,
    apply_rope,
    attention_forward,
)

LLAMA_LIKE = {"llama", "mistral", "qwen2", "smollm2", "granite"}


@dataclass
class MlpWeights:
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def mlp_forward(x: torch.Tensor, w: MlpWeights, act, return_down_input: bool = False):
    """``down(act(gate(x)) * up(x))`` with gathered weights."""
    h = act(F.linear(x, w.gate, w.gate_bias)) * F.linear(x, w.up, w.up_bias)
    y = F.linear(h, w.down, w.down_bias)
    return (y, h) if return_down_input else y


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return linear.bias if linear.bias is not None else None


class LlamaLayerAdapter(LayerAdapter):
    """One ``LlamaDecoderLayer`` (or a layer of the same shape)."""

    def __init__(self, layer: nn.Module, index: int, config, rotary=None) -> None:
        self.layer = layer
        self._rotary = rotary
        self.index = index
        self.config = config
        attn, mlp = layer.self_attn, layer.mlp
        self.head_dim = int(
            getattr(attn, "head_dim", config.hidden_size // config.num_attention_heads)
        )
        self.num_heads = attn.q_proj.out_features // self.head_dim
        self.num_kv_heads = attn.k_proj.out_features // self.head_dim
        self.hidden_size = attn.o_proj.out_features
        self.intermediate_size = mlp.down_proj.in_features
        self.kernel = KernelModule(config, getattr(attn, "layer_idx", index))

    # -- roles -----------------------------------------------------------------------------
    @property
    def attn(self) -> nn.Module:
        return self.layer.self_attn

    @property
    def mlp(self) -> nn.Module:
        return self.layer.mlp

    def output_projection(self, group: str) -> nn.Linear:
        return self.attn.o_proj if group == ATTN else self.mlp.down_proj

    def input_norm(self, group: str) -> nn.Module:
        return self.layer.input_layernorm if group == ATTN else self.layer.post_attention_layernorm

    @property
    def is_gqa(self) -> bool:
        """Whether K/V heads are shared (never pruned); true for a physically pruned GQA layer."""
        kv_index = getattr(self.attn, "kv_index", None)
        if kv_index is not None:
            return self.k_proj_heads != kv_index.numel() or bool(
                (kv_index != torch.arange(kv_index.numel(), device=kv_index.device)).any()
            )
        return self.num_kv_heads != self.num_heads

    @property
    def k_proj_heads(self) -> int:
        return self.attn.k_proj.out_features // self.head_dim

    def kv_heads_of(self, heads: torch.Tensor) -> torch.Tensor:
        """The KV head each of the query ``heads`` attends with."""
        kv_index = getattr(self.attn, "kv_index", None)
        if kv_index is not None:
            return kv_index.index_select(0, heads.to(kv_index.device))
        return heads // (self.num_heads // self.num_kv_heads)

    # -- gathering -------------------------------------------------------------------------
    def attention_weights(self, kept_heads: torch.Tensor | None) -> AttentionWeights:
        a = self.attn
        if kept_heads is None:
            kv_index = None
            if self.is_gqa:
                kv_index = self.kv_heads_of(
                    torch.arange(self.num_heads, device=a.q_proj.weight.device)
                )
            return AttentionWeights(
                a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
                _bias(a.q_proj), _bias(a.k_proj), _bias(a.v_proj), _bias(a.o_proj),
                kv_index, self.head_dim,
            )  # fmt: skip
        kept_heads = kept_heads.to(a.q_proj.weight.device)
        rows = self.unit_channels(ATTN, kept_heads)
        q = a.q_proj.weight.index_select(0, rows)
        qb = a.q_proj.bias.index_select(0, rows) if a.q_proj.bias is not None else None
        o = a.o_proj.weight.index_select(1, rows)
        if self.is_gqa:  # K/V are shared by a group of query heads: never pruned
            k, v, kb, vb = a.k_proj.weight, a.v_proj.weight, _bias(a.k_proj), _bias(a.v_proj)
            kv_index = self.kv_heads_of(kept_heads)
        else:
            k, v = a.k_proj.weight.index_select(0, rows), a.v_proj.weight.index_select(0, rows)
            kb = a.k_proj.bias.index_select(0, rows) if a.k_proj.bias is not None else None
            vb = a.v_proj.bias.index_select(0, rows) if a.v_proj.bias is not None else None
            kv_index = None
        return AttentionWeights(q, k, v, o, qb, kb, vb, _bias(a.o_proj), kv_index, self.head_dim)

    def mlp_weights(self, kept: torch.Tensor | None) -> MlpWeights:
        m = self.mlp
        g, u, d = m.gate_proj, m.up_proj, m.down_proj
        if kept is None:
            return MlpWeights(g.weight, u.weight, d.weight, _bias(g), _bias(u), _bias(d))
        kept = kept.to(g.weight.device)
        return MlpWeights(
            g.weight.index_select(0, kept),
            u.weight.index_select(0, kept),
            d.weight.index_select(1, kept),
            g.bias.index_select(0, kept) if g.bias is not None else None,
            u.bias.index_select(0, kept) if u.bias is not None else None,
            _bias(d),
        )

    # -- running ---------------------------------------------------------------------------
    def run_attention(self, x, kept_heads=None, *, position_embeddings, attention_mask=None,
                      cache=None, return_o_input=False, **kwargs):  # fmt: skip
        w = self.attention_weights(kept_heads)
        return attention_forward(x, w, position_embeddings, attention_mask, self.kernel, cache,
                                 return_o_input=return_o_input, **kwargs)  # fmt: skip

    # -- probing (dynamic methods) ------------------------------------------------------------
    def probe_attention(self, x: torch.Tensor, position_ids: torch.Tensor,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The input of o_proj for a probe, with the full (unpruned) q/k/v weights.

        :param x: normalised probe input [b', t', d] (selected rows and positions).
        :param position_ids: true positions of the probe tokens [b', t'] (RoPE is applied there).
        :param token_mask: [b', t'] False for pad tokens (never used as keys).
        :returns: [b', t', num_heads * head_dim]. Attention runs among the probe tokens only:
            probe token i attends to probe token j of its row when ``pos[j] <= pos[i]``.
        """
        a = self.attn
        b, t = x.shape[:2]
        hd = self.head_dim
        q = F.linear(x, a.q_proj.weight, a.q_proj.bias).view(b, t, -1, hd).transpose(1, 2)
        k = F.linear(x, a.k_proj.weight, a.k_proj.bias).view(b, t, -1, hd).transpose(1, 2)
        v = F.linear(x, a.v_proj.weight, a.v_proj.bias).view(b, t, -1, hd).transpose(1, 2)
        cos, sin = self.rotary(x, position_ids)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        allowed = position_ids[:, None, :] <= position_ids[:, :, None]  # [b', t'(q), t'(k)]
        if token_mask is not None:
            allowed = allowed & token_mask[:, None, :]
        # a query with no allowed key (a pad query) would give NaN: let it see itself
        allowed = allowed | torch.eye(t, dtype=torch.bool, device=x.device)[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=hd**-0.5)
        return out.transpose(1, 2).reshape(b, t, -1)

    def probe_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The input of down_proj for a probe: ``act(gate(x)) * up(x)`` with full weights."""
        m = self.mlp
        return m.act_fn(F.linear(x, m.gate_proj.weight, m.gate_proj.bias)) * F.linear(
            x, m.up_proj.weight, m.up_proj.bias
        )

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) at ``position_ids`` from the model's rotary embedding."""
        return self._rotary(x, position_ids)

    def run_mlp(self, x, kept_channels=None, return_down_input=False):
        return mlp_forward(x, self.mlp_weights(kept_channels), self.mlp.act_fn, return_down_input)

    def run_block(self, hidden_states, kept_heads=None, kept_channels=None, *,
                  position_embeddings, attention_mask=None, cache=None, **kwargs):  # fmt: skip
        """The whole decoder layer with the given kept sets (None = dense)."""
        h = hidden_states
        a = self.run_attention(self.layer.input_layernorm(h), kept_heads,
                               position_embeddings=position_embeddings,
                               attention_mask=attention_mask, cache=cache, **kwargs)  # fmt: skip
        h = h + a
        return h + self.run_mlp(self.layer.post_attention_layernorm(h), kept_channels)


class LlamaAdapter(ModelAdapter):
    """LLaMA-family causal LMs: ``model.model.layers[i].{self_attn,mlp}`` with q/k/v/o and
    gate/up/down projections, RMSNorm before each block, RoPE (MHA and GQA)."""

    name = "llama"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._layers = [
            LlamaLayerAdapter(layer, i, model.config, model.model.rotary_emb)
            for i, layer in enumerate(self.decoder_layers)
        ]

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in LLAMA_LIKE:
            return False
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not layers:
            return False
        first = layers[0]
        attn, mlp = getattr(first, "self_attn", None), getattr(first, "mlp", None)
        return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
            hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")
        )

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def layers(self) -> list[LlamaLayerAdapter]:
        return self._layers

    def rotary(self, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) for ``position_ids``, from the model's own rotary embedding."""
        return self.model.model.rotary_emb(hidden_states, position_ids)


@hookimpl
def prunekit_register_adapters(register):
    register(
        "llama", LlamaAdapter, description="LLaMA family (MHA and GQA): heads and MLP channels"
    )
