"""The Phi-3 adapter (``Phi3ForCausalLM``, ``model_type: phi3``: Phi-3, Phi-3.5-mini, Phi-4-mini):
the LLaMA layer with fused projections, partial rotary embeddings and long-rope scaling.

The layer is pre-norm: ``h += attn(RMSNorm(h))``, ``h += mlp(RMSNorm(h))`` (the residual
dropouts are inert in eval). Attention projects q, k and v with one matrix, ``qkv_proj`` (rows:
every query head's, then every K/V head's keys, then their values), scales scores by
``head_dim ** -0.5`` and attends within ``sliding_window`` on every layer when the config sets
it. RoPE rotates the first ``partial_rotary_factor * head_dim`` dims of each head, with the
model's own rotary embedding (default or long-rope scaling). The MLP computes gate and up with
one matrix, ``gate_up_proj`` (rows: gate, then up), and ``up * act(gate)``.

Prunable groups per decoder layer:

* ``attn``: query heads. A kept head keeps its q rows of ``qkv_proj`` and its columns of
  ``o_proj``; with MHA also its k and v rows. With GQA the K/V rows are kept whole and each
  kept query head attends with its own K/V head (``kv_index``), so groups may end up unequal.
* ``mlp``: intermediate channels: a channel's gate row and its up row of ``gate_up_proj`` and
  its column of ``down_proj``.

Running a block with a kept set gathers the kept rows into one smaller fused ``qkv_proj`` (and
``gate_up_proj``) and runs the same matmuls as the original layer, with the functions the saved
pruned model runs (:mod:`prunekit.models.pruned_phi3`). A saved model with one shape in every
layer is a plain ``Phi3ForCausalLM`` (``head_dim`` written to its config); per-layer shapes,
compensation biases, or pruned heads of a long-rope config (whose factor lists transformers
checks against ``hidden_size / num_attention_heads``) rebuild as ``PrunekitPhi3ForCausalLM``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from prunekit.components import ATTN, MLP, LayerAdapter, UnitSlice
from prunekit.hookspecs import hookimpl
from prunekit.models import kit
from prunekit.models.llama import LlamaAdapter, LlamaLayerAdapter
from prunekit.models.pruned_phi3 import (
    PRUNED_LAYERS_KEY,
    Phi3AttentionWeights,
    Phi3Kernel,
    Phi3MlpWeights,
    PrunedPhi3Attention,
    head_dim_of,
    kv_slots,
    phi3_attention_forward,
    phi3_mlp_forward,
    project_qkv,
    regular_kv_repeat,
)

__all__ = ["FusedRows", "Phi3Adapter", "Phi3LayerAdapter"]


class FusedRows:
    """Rows ``start .. start + length - 1`` of a fused projection's weight (a part of
    ``qkv_proj`` or ``gate_up_proj``), as the tensor of a :class:`UnitSlice`.

    A unit owns rows of a part of the fused matrix, which no narrow of the whole matrix
    describes; this stands for the part: its values (``detach``), its gradient (``grad``, the
    fused parameter's gradient at those rows) and switching gradients on (``requires_grad_``)
    act on the fused parameter itself, which is what the gradient-based metrics (LLM-Pruner's
    Taylor score) and :meth:`LayerAdapter.params` use of a slice.
    """

    def __init__(self, param: torch.Tensor, start: int, length: int) -> None:
        self.param, self.start, self.length = param, start, length

    def detach(self) -> torch.Tensor:
        return self.param.detach().narrow(0, self.start, self.length)

    @property
    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        return None if g is None else g.narrow(0, self.start, self.length)

    @grad.setter
    def grad(self, value) -> None:
        if value is not None:
            raise ValueError("a part of a fused projection takes no gradient of its own")
        self.param.grad = None

    @property
    def requires_grad(self) -> bool:
        return self.param.requires_grad

    def requires_grad_(self, requires_grad: bool = True) -> FusedRows:
        self.param.requires_grad_(requires_grad)
        return self

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.length, *self.param.shape[1:]))

    def dim(self) -> int:
        return self.param.dim()

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.param.dtype

    @property
    def device(self) -> torch.device:
        return self.param.device

    def __repr__(self) -> str:
        return f"FusedRows(rows {self.start}..{self.start + self.length - 1} of {self.param.shape})"


class Phi3LayerAdapter(LlamaLayerAdapter):
    """One ``Phi3DecoderLayer`` (or a sliced one: ``PrunedPhi3Attention`` and smaller MLP
    projections): the LLaMA layer adapter's roles, norms, K/V mapping and cost model, with
    Phi-3's fused projections gathered, sliced and probed (its own ``__init__``: the head
    counts come from the fused ``qkv_proj``)."""

    attention_fn = staticmethod(phi3_attention_forward)
    mlp_fn = staticmethod(phi3_mlp_forward)

    @property
    def activation(self):
        return self.mlp.activation_fn

    def __init__(self, layer: nn.Module, index: int, config, rotary) -> None:
        self.module = self.layer = layer
        self._rotary = rotary
        self.index = index
        self.config = config
        attn, mlp = layer.self_attn, layer.mlp
        self.head_dim = int(getattr(attn, "head_dim", None) or head_dim_of(config))
        hd = self.head_dim
        self.num_heads = attn.o_proj.in_features // hd
        self.num_kv_heads = (attn.qkv_proj.out_features // hd - self.num_heads) // 2
        self.hidden_size = attn.o_proj.out_features
        self.intermediate_size = mlp.down_proj.in_features
        self.kernel = Phi3Kernel(config, getattr(attn, "layer_idx", index))
        self._shares_kv = self._kv_shared_now()

    # the fused qkv_proj keeps its shared K/V rows when no query head is left: Phi-3 declares
    # no attention sublayer unit, and its cost model says so
    kv_heads_kept = LayerAdapter.kv_heads_kept
    params = LayerAdapter.params

    def unit_slices(self, group: str) -> list[UnitSlice]:
        """A head's q rows of ``qkv_proj`` (and its k and v rows with MHA) and its ``o_proj``
        columns; a channel's gate and up rows of ``gate_up_proj`` and its ``down_proj``
        column. The parts of a fused matrix are :class:`FusedRows`."""
        if group == ATTN:
            qkv, hd, h = self.attn.qkv_proj, self.head_dim, self.num_heads
            self._refuse_lora(qkv, "qkv_proj")
            slices = [UnitSlice("qkv_proj.weight[q]", FusedRows(qkv.weight, 0, h * hd), 0, hd)]
            if not self.shares_kv:  # MHA: k/v rows belong to their head
                slices += [
                    UnitSlice("qkv_proj.weight[k]", FusedRows(qkv.weight, h * hd, h * hd), 0, hd),
                    UnitSlice(
                        "qkv_proj.weight[v]", FusedRows(qkv.weight, 2 * h * hd, h * hd), 0, hd
                    ),
                ]
            return [*slices, UnitSlice("o_proj.weight", self.attn.o_proj.weight, 1, hd)]
        gate_up, n = self.mlp.gate_up_proj, self.intermediate_size
        self._refuse_lora(gate_up, "gate_up_proj")
        return [
            UnitSlice("gate_up_proj.weight[gate]", FusedRows(gate_up.weight, 0, n), 0, 1),
            UnitSlice("gate_up_proj.weight[up]", FusedRows(gate_up.weight, n, n), 0, 1),
            UnitSlice("down_proj.weight", self.mlp.down_proj.weight, 1, 1),
        ]

    def _refuse_lora(self, module: nn.Module, name: str) -> None:
        if hasattr(module, "lora_A"):
            # LoRAPrune finds a slice's LoRA factors by the identity of its tensor and scores
            # the whole factor product by units of the slice's width: a part of a fused matrix
            # would silently add nothing to the unit scores
            from prunekit.errors import ModelError

            raise ModelError(
                f"layer {self.index}: {name} is a fused projection with a LoRA adapter; "
                "scoring units from LoRA factors (loraprune) needs whole per-unit "
                "projections, which Phi-3's fused qkv_proj / gate_up_proj are not; use "
                "llm-pruner, wanda-sp, flap or pp-calib"
            )

    # -- fused rows ------------------------------------------------------------------------
    def _qkv_rows(self, kept_heads: torch.Tensor) -> torch.Tensor:
        """Rows of ``qkv_proj`` the kept heads use: their q rows, then the k and v rows (all of
        them with GQA, the kept heads' with MHA)."""
        hd, h, n_kv = self.head_dim, self.num_heads, self.num_kv_heads
        q = self.unit_channels(ATTN, kept_heads)
        device = q.device
        if self.shares_kv:
            kv = torch.arange(h * hd, (h + 2 * n_kv) * hd, device=device)
            return torch.cat([q, kv])
        return torch.cat([q, h * hd + q, (h + n_kv) * hd + q])

    def _gate_up_rows(self, kept: torch.Tensor) -> torch.Tensor:
        """Rows of ``gate_up_proj`` the kept channels use: their gate rows, then their up rows."""
        return torch.cat([kept, self.intermediate_size + kept])

    # -- gathering -------------------------------------------------------------------------
    def attention_weights(self, kept_heads: torch.Tensor | None) -> Phi3AttentionWeights:
        """The kept heads' rows of ``qkv_proj`` as one smaller fused matrix and their columns
        of ``o_proj``; with GQA, ``kv_index`` (or ``kv_repeat`` for whole groups) maps each kept
        head to its K/V head."""
        a, hd = self.attn, self.head_dim
        if kept_heads is None:
            heads = torch.arange(self.num_heads, device=a.qkv_proj.weight.device)
            w = Phi3AttentionWeights(
                a.qkv_proj.weight,
                a.o_proj.weight,
                a.o_proj.bias,
                self.num_heads,
                self.num_kv_heads,
                hd,
                self.kv_heads_of(heads) if self.shares_kv else None,
            )
        else:
            kept_heads = kept_heads.to(a.qkv_proj.weight.device)
            w = Phi3AttentionWeights(
                a.qkv_proj.weight.index_select(0, self._qkv_rows(kept_heads)),
                kit.unit_columns(a.o_proj.weight, kept_heads, hd),
                a.o_proj.bias,
                int(kept_heads.numel()),
                self.num_kv_heads if self.shares_kv else int(kept_heads.numel()),
                hd,
                self.kv_heads_of(kept_heads) if self.shares_kv else None,
            )
        if w.kv_index is not None:
            # every query head of plain GQA: the kernel repeats K/V (no copy per step); else
            # the slots of the kept heads in equal groups, for decoding steps
            repeat = regular_kv_repeat(w.kv_index, w.num_kv_heads) if kept_heads is None else None
            if repeat:
                w.kv_index, w.kv_repeat = None, repeat
            else:
                w.kv_slots, w.kv_repeat = kv_slots(w.kv_index)
        return w

    def mlp_weights(self, kept: torch.Tensor | None) -> Phi3MlpWeights:
        m = self.mlp
        gate_up, down = m.gate_up_proj, m.down_proj
        if kept is None:
            return Phi3MlpWeights(gate_up.weight, down.weight, down.bias)
        kept = kept.to(gate_up.weight.device)
        return Phi3MlpWeights(
            gate_up.weight.index_select(0, self._gate_up_rows(kept)),
            down.weight.index_select(1, kept),
            down.bias,
        )

    # -- probing (dynamic methods) ------------------------------------------------------------
    def probe(self, group, x, position_ids, token_mask=None):
        if group == MLP:
            gate, up = torch.nn.functional.linear(x, self.mlp.gate_up_proj.weight).chunk(2, -1)
            return up * self.activation(gate)
        w = self.attention_weights(None)
        q, k, v = project_qkv(x, w, *self.rotary(x, position_ids))
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
            scale=self.head_dim**-0.5,
            kv_index=kv_index,
            sliding_window=self.kernel.sliding_window,
        )

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) at ``position_ids`` from the model's rotary embedding.

        Long-rope scaling picks its short or long factors on each forward of the model, from
        the batch's longest position (``original_max_position_embeddings``), and leaves them in
        the module's ``inv_freq``. A probe sees only some of the batch's positions, so it reads
        the factors that forward chose (the module's forward without that choice) instead of
        choosing again from its own positions."""
        rot = self._rotary
        if getattr(rot, "rope_type", "default") == "longrope":
            return inspect.unwrap(type(rot).forward)(rot, x, position_ids)
        return rot(x, position_ids)

    # -- physical pruning ----------------------------------------------------------------------
    def slice(self, kept_heads, kept_channels) -> None:
        attn = self.attn
        if kept_heads is not None:
            kept_heads = kept_heads.to(attn.qkv_proj.weight.device)
            kv_index = (
                self.kv_heads_of(kept_heads) if self.shares_kv else torch.arange(kept_heads.numel())
            )
            self.layer.self_attn = self._pruned_attention(
                kit.sub_linear(attn.qkv_proj, self._qkv_rows(kept_heads)),
                kit.sub_linear(attn.o_proj, cols=self.unit_channels(ATTN, kept_heads)),
                kv_index,
            )
        elif not isinstance(attn, PrunedPhi3Attention):
            # every layer of a pruned checkpoint has the same module layout and its kv_index
            self.layer.self_attn = self._pruned_attention(
                attn.qkv_proj, attn.o_proj, self.kv_heads_of(torch.arange(self.num_heads))
            )
        if kept_channels is not None:
            mlp = self.mlp
            kept_channels = kept_channels.to(mlp.gate_up_proj.weight.device)
            mlp.gate_up_proj = kit.sub_linear(mlp.gate_up_proj, self._gate_up_rows(kept_channels))
            mlp.down_proj = kit.sub_linear(mlp.down_proj, cols=kept_channels)

    def _pruned_attention(self, qkv_proj, o_proj, kv_index) -> nn.Module:
        return PrunedPhi3Attention(
            self.config, self.kernel.layer_idx, self.head_dim, qkv_proj, o_proj, kv_index
        )

    # -- cost model --------------------------------------------------------------------------


class Phi3Adapter(LlamaAdapter):
    """Phi-3 causal LMs: ``model.model.layers[i].{self_attn,mlp}`` with fused ``qkv_proj`` and
    ``gate_up_proj``, RMSNorm before each block, partial RoPE with default or long-rope
    scaling, an optional sliding window (MHA and GQA)."""

    #: the fused qkv_proj keeps its shared K/V rows with no query head left: only the MLP
    sublayers = (MLP,)

    name = "phi3"
    model_types = ("phi3",)
    modeling = "prunekit.models.pruned_phi3:PrunekitPhi3ForCausalLM"
    layer_class = Phi3LayerAdapter

    def plain_model(self, shapes: dict[str, list]) -> nn.Module | None:
        """A standard ``Phi3ForCausalLM`` when every layer has one shape, balanced K/V groups
        in order and no output bias (Phi-3's config has no bias switch). With pruned heads
        ``head_dim`` is written to the config (Phi-3 reads it when set); a long-rope config
        then fails transformers' check of its factor lists against ``hidden_size /
        num_attention_heads`` and the per-layer layout is used."""
        uniform = kit.uniform_shapes(shapes)
        if uniform is None or any(shapes["o_bias"]) or any(shapes["down_bias"]):
            return None
        nh, nkv, inter = uniform
        plain = kit.plain_config(
            self.model.config,
            (PRUNED_LAYERS_KEY,),
            num_attention_heads=nh,
            num_key_value_heads=nkv,
            head_dim=self._layers[0].head_dim,
            intermediate_size=inter,
        )
        return kit.plain_model_from(self.model, plain) if plain is not None else None

    def gguf_model(self):
        """llama.cpp's ``phi3`` architecture (:func:`prunekit.models.gguf_phi3.phi3_gguf_model`):
        one MLP width in every layer; pruned heads restored as zero heads."""
        from prunekit.models.gguf_phi3 import phi3_gguf_model

        return phi3_gguf_model(self)


@hookimpl
def prunekit_register_adapters(register):
    register(
        "phi3",
        Phi3Adapter,
        description="Phi-3, Phi-3.5, Phi-4-mini (fused qkv/gate_up, partial RoPE, long-rope)",
    )
