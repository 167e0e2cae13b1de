"""The LLaMA-family adapter (MHA and GQA): the worked example of a model adapter.

``llama`` serves LLaMA-1/2/3, Vicuna and SmolLM2 (``model_type: llama``); :mod:`.mistral` and
:mod:`.qwen2` subclass it (sliding windows; Qwen2's q/k/v biases). The layer is pre-norm:
``h += attn(RMSNorm(h))``, ``h += mlp(RMSNorm(h))`` with RoPE, ``head_dim ** -0.5`` scaling and
a gated SiLU MLP.

Prunable groups per decoder layer:

* ``attn``: query heads. With MHA a kept head keeps its rows of q/k/v and its columns of o.
  With GQA only q rows and o columns are pruned; k/v are kept whole and each kept query head
  attends with its own KV group (``kv_index``), so groups may end up unequal.
* ``mlp``: intermediate channels: rows of gate/up, columns of down.

Running a block with a kept set gathers the kept rows/columns into smaller contiguous weights
and runs real, smaller matmuls with the same functions the saved pruned model runs
(:func:`~prunekit.models.pruned_llama.attention_forward`,
:func:`~prunekit.models.pruned_llama.mlp_forward`). The attention kernel itself is Hugging
Face's (``config._attn_implementation``: sdpa, eager, flash...), fed with K/V already expanded
to one KV head per kept query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.components import ATTN, MLP, LayerAdapter, ModelAdapter, UnitSlice
from prunekit.hookspecs import hookimpl
from prunekit.models import kit
from prunekit.models.pruned_llama import (
    PRUNED_LAYERS_KEY,
    AttentionWeights,
    KernelModule,
    MlpWeights,
    PrunedLlamaAttention,
    attention_forward,
    head_dim_of,
    kv_slots,
    layer_sliding_window,
    mlp_forward,
    project_qkv,
    regular_kv_repeat,
)

__all__ = [
    "AttentionWeights",
    "LlamaAdapter",
    "LlamaLayerAdapter",
    "MlpWeights",
    "attention_forward",
    "mlp_forward",
]


class LlamaLayerAdapter(LayerAdapter):
    """One ``LlamaDecoderLayer`` (or a layer of the same shape: Mistral, Qwen2, and the base of
    Gemma-3's).

    A subclass for a related layer overrides the attention pieces: ``attention_fn`` and
    ``attention_weights`` (the gathered forward), ``project_qkv``, ``rotary`` and
    ``attention_scale`` (the probe), ``_pruned_attention`` and ``pruned_attention_class`` (slicing), ``group_input``
    and ``add_output`` (the norms around each group).
    """

    #: the gathered attention forward (also the sliced module's) and its q/k/v projection
    attention_fn = staticmethod(attention_forward)
    project_qkv = staticmethod(project_qkv)
    #: the gathered MLP forward (also the sliced module's computation)
    mlp_fn = staticmethod(mlp_forward)
    pruned_attention_class: type[nn.Module] = PrunedLlamaAttention

    def __init__(self, layer: nn.Module, index: int, config, rotary=None) -> None:
        self.module = self.layer = layer
        self._rotary = rotary
        self.index = index
        self.config = config
        attn, mlp = layer.self_attn, layer.mlp
        self.head_dim = int(getattr(attn, "head_dim", None) or head_dim_of(config))
        self.num_heads = attn.q_proj.out_features // self.head_dim
        self.num_kv_heads = attn.k_proj.out_features // self.head_dim
        self.hidden_size = attn.o_proj.out_features
        self.intermediate_size = mlp.down_proj.in_features
        self.sliding_window = layer_sliding_window(config, index)
        self.kernel = KernelModule(config, getattr(attn, "layer_idx", index), self.sliding_window)
        self._shares_kv = self._kv_shared_now()

    # -- roles -----------------------------------------------------------------------------
    @property
    def attn(self) -> nn.Module:
        return self.layer.self_attn

    @property
    def mlp(self) -> nn.Module:
        return self.layer.mlp

    @property
    def activation(self):
        """The MLP's activation function (the module's own)."""
        return self.mlp.act_fn

    def output_projection(self, group: str) -> nn.Linear:
        return self.attn.o_proj if group == ATTN else self.mlp.down_proj

    def input_norm(self, group: str) -> nn.Module:
        return self.layer.input_layernorm if group == ATTN else self.layer.post_attention_layernorm

    def group_input(self, group: str, residual: torch.Tensor) -> torch.Tensor:
        return self.input_norm(group)(residual)

    def normalized(self, group: str, residual: torch.Tensor):
        """The group's input and, when its norm is Hugging Face's plain RMSNorm, the variance
        that norm computes (the residual's mean of squares, ``[B, T, 1]`` fp32), computed
        once here with the norm's own operations, in its order (bit-identical output): PP
        ranks tokens by residual norm and would otherwise read the residual a second time."""
        norm = self.input_norm(group)
        plain = type(self).group_input is LlamaLayerAdapter.group_input
        if not plain or type(norm).forward not in _plain_rms_forwards():
            # another norm, a hub kernel or a subclass's own group input: run it as it is
            return self.group_input(group, residual), None
        hidden = residual.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + norm.variance_epsilon)
        return norm.weight * hidden.to(residual.dtype), variance

    def _kv_shared_now(self) -> bool:
        kv_index = getattr(self.attn, "kv_index", None)
        if kv_index is not None:  # a physically pruned layer
            return self.num_kv_heads != kv_index.numel() or bool(
                (kv_index != torch.arange(kv_index.numel(), device=kv_index.device)).any()
            )
        return self.num_kv_heads != self.num_heads

    @property
    def shares_kv(self) -> bool:
        return self._shares_kv

    def kv_heads_of(self, heads: torch.Tensor) -> torch.Tensor:
        kv_index = getattr(self.attn, "kv_index", None)
        if kv_index is not None:
            return kv_index.index_select(0, heads.to(kv_index.device))
        return heads // (self.num_heads // self.num_kv_heads)

    def unit_slices(self, group: str) -> list[UnitSlice]:
        if group == ATTN:
            a, hd = self.attn, self.head_dim
            projections = [("q_proj", a.q_proj, 0), ("o_proj", a.o_proj, 1)]
            if not self.shares_kv:  # MHA: k/v rows belong to their head
                projections += [("k_proj", a.k_proj, 0), ("v_proj", a.v_proj, 0)]
            return kit.linear_slices(projections, hd)
        m = self.mlp
        return kit.linear_slices(
            [
                ("gate_proj", m.gate_proj, 0),
                ("up_proj", m.up_proj, 0),
                ("down_proj", m.down_proj, 1),
            ],
            1,
        )

    # -- gathering -------------------------------------------------------------------------
    def gather(self, group: str, kept: torch.Tensor | None):
        return self.attention_weights(kept) if group == ATTN else self.mlp_weights(kept)

    def _attention_parts(self, kept_heads: torch.Tensor | None) -> tuple:
        """``(q, k, v, o, q_bias, k_bias, v_bias, o_bias, kv_index)`` of the kept heads: the
        kept rows of q (and of k/v with MHA) and columns of o; with GQA k/v whole and
        ``kv_index`` mapping each kept head to its K/V head (None when one-to-one)."""
        a = self.attn
        if kept_heads is None:
            kv_index = None
            if self.shares_kv:
                kv_index = self.kv_heads_of(
                    torch.arange(self.num_heads, device=a.q_proj.weight.device)
                )
            return (
                a.q_proj.weight,
                a.k_proj.weight,
                a.v_proj.weight,
                a.o_proj.weight,
                a.q_proj.bias,
                a.k_proj.bias,
                a.v_proj.bias,
                a.o_proj.bias,
                kv_index,
            )
        kept_heads = kept_heads.to(a.q_proj.weight.device)
        rows = self.unit_channels(ATTN, kept_heads)
        q, qb = kit.rows(a.q_proj, rows)
        o = kit.unit_columns(a.o_proj.weight, kept_heads, self.head_dim)
        if self.shares_kv:  # K/V are shared by a group of query heads: never pruned
            k, v, kb, vb = a.k_proj.weight, a.v_proj.weight, a.k_proj.bias, a.v_proj.bias
            kv_index = self.kv_heads_of(kept_heads)
        else:
            (k, kb), (v, vb) = kit.rows(a.k_proj, rows), kit.rows(a.v_proj, rows)
            kv_index = None
        return q, k, v, o, qb, kb, vb, a.o_proj.bias, kv_index

    def attention_weights(self, kept_heads: torch.Tensor | None) -> AttentionWeights:
        w = AttentionWeights(*self._attention_parts(kept_heads), self.head_dim)
        if w.kv_index is not None:
            n_kv = w.k.shape[0] // self.head_dim
            # every query head of plain GQA: the kernel repeats K/V (no copy per step); else
            # the slots of the kept heads in equal groups, for decoding steps
            repeat = regular_kv_repeat(w.kv_index, n_kv) if kept_heads is None else None
            if repeat:
                w.kv_index, w.kv_repeat = None, repeat
            else:
                w.kv_slots, w.kv_repeat = kv_slots(w.kv_index, n_kv)
        return w

    def mlp_weights(self, kept: torch.Tensor | None) -> MlpWeights:
        m = self.mlp
        g, u, d = m.gate_proj, m.up_proj, m.down_proj
        if kept is None:
            return MlpWeights(g.weight, u.weight, d.weight, g.bias, u.bias, d.bias)
        kept = kept.to(g.weight.device)
        (gw, gb), (uw, ub) = kit.rows(g, kept), kit.rows(u, kept)
        return MlpWeights(gw, uw, d.weight.index_select(1, kept), gb, ub, d.bias)

    # -- running ---------------------------------------------------------------------------
    #: the gathered forwards take ``unit_mask`` (per-sequence kept sets, :mod:`prunekit.rows`)
    row_masks = True

    def run(
        self,
        group,
        x,
        weights,
        *,
        observe=False,
        position_embeddings=None,
        attention_mask=None,
        cache=None,
        unit_mask=None,
        **kwargs,
    ):
        if group == MLP:
            return self.mlp_fn(
                x, weights, self.activation, return_down_input=observe, unit_mask=unit_mask
            )
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        return self.attention_fn(
            x,
            weights,
            position_embeddings,
            attention_mask,
            self.kernel,
            cache,
            return_o_input=observe,
            unit_mask=unit_mask,
            **kwargs,
        )

    @property
    def cache_layer(self) -> int:
        return self.kernel.layer_idx

    # -- probing (dynamic methods) ------------------------------------------------------------
    def probe(self, group, x, position_ids, token_mask=None):
        if group == MLP:
            m = self.mlp
            return self.activation(F.linear(x, m.gate_proj.weight, m.gate_proj.bias)) * F.linear(
                x, m.up_proj.weight, m.up_proj.bias
            )
        q, k, v = self._probe_qkv(x, position_ids)
        kv_index = (
            self.kv_heads_of(torch.arange(self.num_heads, device=x.device))
            if self.shares_kv
            else None
        )
        return kit.probe_attention(
            q,
            k,
            v,
            position_ids,
            token_mask,
            scale=self.attention_scale,
            kv_index=kv_index,
            sliding_window=self.kernel.sliding_window,
        )

    @property
    def attention_scale(self) -> float:
        """The scale of the attention scores (``head_dim ** -0.5`` unless the kernel says)."""
        return self.kernel.scaling if self.kernel.scaling is not None else self.head_dim**-0.5

    def _probe_qkv(self, x: torch.Tensor, position_ids: torch.Tensor):
        """Queries, keys and values of probe tokens ``[b', H, t', d_h]`` with full weights and
        positional encoding at their true positions: the gathered forward's own projection."""
        return self.project_qkv(x, self.attention_weights(None), *self.rotary(x, position_ids))

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) at ``position_ids`` from the model's rotary embedding."""
        return self._rotary(x, position_ids)

    # -- physical pruning ----------------------------------------------------------------------
    def slice(self, kept_heads, kept_channels) -> None:
        attn = self.attn
        if kept_heads is not None:
            rows = self.unit_channels(ATTN, kept_heads.to(attn.q_proj.weight.device))
            if self.shares_kv and kept_heads.numel():
                k_proj, v_proj, kv_index = attn.k_proj, attn.v_proj, self.kv_heads_of(kept_heads)
            else:  # MHA, or no head left: the K/V heads go too (a dropped attention sublayer)
                k_proj, v_proj = (
                    kit.sub_linear(attn.k_proj, rows),
                    kit.sub_linear(attn.v_proj, rows),
                )
                kv_index = torch.arange(kept_heads.numel())
            self.layer.self_attn = self._pruned_attention(
                kit.sub_linear(attn.q_proj, rows),
                k_proj,
                v_proj,
                kit.sub_linear(attn.o_proj, cols=rows),
                kv_index,
            )
        elif not isinstance(attn, self.pruned_attention_class):
            # every layer of a pruned checkpoint has the same module layout and its kv_index
            self.layer.self_attn = self._pruned_attention(
                attn.q_proj,
                attn.k_proj,
                attn.v_proj,
                attn.o_proj,
                self.kv_heads_of(torch.arange(self.num_heads)),
            )
        if kept_channels is not None:
            mlp = self.mlp
            mlp.gate_proj = kit.sub_linear(mlp.gate_proj, kept_channels)
            mlp.up_proj = kit.sub_linear(mlp.up_proj, kept_channels)
            mlp.down_proj = kit.sub_linear(mlp.down_proj, cols=kept_channels)

    def _pruned_attention(self, q_proj, k_proj, v_proj, o_proj, kv_index) -> nn.Module:
        """The attention module of a sliced layer (``pruned_attention_class``)."""
        return PrunedLlamaAttention(
            self.config,
            self.kernel.layer_idx,
            self.head_dim,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            kv_index,
            self.kernel.scaling,
        )

    # -- cost model --------------------------------------------------------------------------
    def macs_per_token(self, heads: int, channels: int, seq_len: int) -> float:
        d, hd = self.hidden_size, self.head_dim
        kv = self.kv_heads_kept(heads)
        return (
            d * hd * (heads + 2 * kv) + heads * hd * d + 3 * d * channels + 2 * seq_len * heads * hd
        )

    def kv_heads_kept(self, heads: int) -> int:
        """K/V heads a slice keeping ``heads`` query heads computes: with MHA the k/v rows go
        with their head; with GQA every K/V head stays while one query head does, and none
        when no head is left (the attention sublayer is gone)."""
        if not heads:
            return 0
        return self.num_kv_heads if self.shares_kv else heads

    def params(self, heads: int, channels: int) -> int:
        total = super().params(heads, channels)
        if not heads and self.shares_kv:  # the shared K/V projections go with the last head
            a = self.attn
            total -= sum(p.numel() for m in (a.k_proj, a.v_proj) for p in m.parameters())
        return total

    def input_macs(self, group: str) -> float:
        d = self.hidden_size
        if group == ATTN:
            return d * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        return 2 * d * self.intermediate_size


def _plain_rms_forwards() -> frozenset:
    """The ``forward`` functions of the RMSNorm classes that :meth:`LlamaLayerAdapter.normalized`
    replicates (the same code in each family's modelling file)."""
    global _RMS_FORWARDS
    if _RMS_FORWARDS is None:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        from transformers.models.mistral.modeling_mistral import MistralRMSNorm
        from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

        _RMS_FORWARDS = frozenset(
            c.forward
            for c in (LlamaRMSNorm, MistralRMSNorm, Phi3RMSNorm, Qwen2RMSNorm, Qwen3RMSNorm)
        )
    return _RMS_FORWARDS


_RMS_FORWARDS: frozenset | None = None


class LlamaAdapter(ModelAdapter):
    """LLaMA-family causal LMs: ``model.model.layers[i].{self_attn,mlp}`` with q/k/v/o and
    gate/up/down projections, RMSNorm before each block, RoPE (MHA and GQA)."""

    name = "llama"
    model_types = ("llama",)
    modeling = "prunekit.models.pruned_llama:PrunekitLlamaForCausalLM"
    layer_class = LlamaLayerAdapter
    #: whole decoder layers can be removed (:meth:`ModelAdapter.remove_layers`): the model
    #: runs ``model.layers`` in order, and ``num_hidden_layers`` and ``layer_types`` say the rest
    removes_layers = True
    #: a layer sliced to no head drops its K/V projections too; to no channel, its whole MLP
    sublayers = (ATTN, MLP)

    @classmethod
    def unsupported(cls, config) -> str | None:
        return kit.causal_problem(config)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._layers = [
            self.layer_class(layer, i, model.config, model.model.rotary_emb)
            for i, layer in enumerate(self.decoder_layers)
        ]

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def layers(self) -> list[LlamaLayerAdapter]:
        return self._layers

    # -- saving --------------------------------------------------------------------------------
    def layer_shapes(self) -> dict[str, list]:
        spec = {
            k: []
            for k in (
                "num_heads",
                "num_kv_heads",
                "kv_index",
                "intermediate_size",
                "o_bias",
                "down_bias",
            )
        }
        for la in self._layers:
            spec["num_heads"].append(la.num_heads)
            spec["num_kv_heads"].append(la.num_kv_heads)
            spec["kv_index"].append(la.kv_heads_of(torch.arange(la.num_heads)).tolist())
            spec["intermediate_size"].append(la.intermediate_size)
            spec["o_bias"].append(la.attn.o_proj.bias is not None)
            spec["down_bias"].append(la.mlp.down_proj.bias is not None)
        return spec

    def plain_model(self, shapes: dict[str, list]) -> nn.Module | None:
        """A standard model of this family when every layer has one shape and balanced KV
        groups in order (so plain ``from_pretrained`` rebuilds it)."""
        config = self.model.config
        uniform = kit.uniform_shapes(shapes)
        if uniform is None:
            return None
        nh, nkv, inter = uniform
        bias_keys = self.plain_bias_keys(config, any(shapes["o_bias"]), any(shapes["down_bias"]))
        if bias_keys is None:
            return None
        plain = kit.plain_config(
            config,
            (PRUNED_LAYERS_KEY,),
            num_attention_heads=nh,
            num_key_value_heads=nkv,
            head_dim=self._layers[0].head_dim,
            intermediate_size=inter,
            **bias_keys,
        )
        return kit.plain_model_from(self.model, plain) if plain is not None else None

    def gguf_model(self):
        """llama.cpp's ``llama`` architecture for one shape in every layer, ``deci`` for
        per-layer shapes (:mod:`prunekit.models.gguf_llama`)."""
        from prunekit.models.gguf_llama import llama_gguf_model

        return llama_gguf_model(self, "llama")

    def plain_bias_keys(self, config, o_bias: bool, down_bias: bool) -> dict | None:
        """Config keys that give o_proj / down_proj (compensation) biases in a standard
        checkpoint, or None when the family's config cannot express them. LLaMA:
        ``attention_bias`` (q/k/v/o; the q/k/v biases are then zeros) and ``mlp_bias``."""
        return {
            "attention_bias": bool(getattr(config, "attention_bias", False)) or o_bias,
            "mlp_bias": bool(getattr(config, "mlp_bias", False)) or down_bias,
        }


@hookimpl
def prunekit_register_adapters(register):
    register(
        "llama",
        LlamaAdapter,
        description="LLaMA-1/2/3, Vicuna, SmolLM2 (MHA and GQA): heads and MLP channels",
    )
