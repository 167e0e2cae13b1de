"""The OPT adapter: pre-LN (and post-LN) layers with biases everywhere, a ReLU fc1/fc2 MLP and
learned positions added to the embeddings (nothing positional inside a layer).

Prunable groups per decoder layer:

* ``attn``: heads (always MHA): each owns its rows of q/k/v (and their biases) and its columns
  of out_proj; out_proj's bias is kept whole.
* ``mlp``: fc1 rows (with their bias) and fc2 columns; fc2's bias is kept whole.

The query is scaled after its projection (``head_dim ** -0.5``, as OPT does). OPT derives
``head_dim`` from ``hidden_size / num_attention_heads``, so a checkpoint with pruned heads
always uses the per-layer layout (``PrunekitOPTForCausalLM``); pruning only MLP channels, the
same number in every layer, gives a plain checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.components import ATTN, MLP, LayerAdapter, ModelAdapter, UnitSlice
from prunekit.hookspecs import hookimpl
from prunekit.models import kit
from prunekit.models.pruned_opt import (
    PRUNED_LAYERS_KEY,
    OptAttentionWeights,
    OptKernel,
    OptMlpWeights,
    PrunedOPTAttention,
    opt_attention_forward,
    opt_mlp_forward,
    opt_project_qkv,
)


class _Handles:
    def __init__(self, *handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class OptLayerAdapter(LayerAdapter):
    """One ``OPTDecoderLayer``."""

    def __init__(self, layer: nn.Module, index: int, config) -> None:
        self.module = self.layer = layer
        self.index = index
        self.config = config
        attn = layer.self_attn
        self.hidden_size = attn.out_proj.out_features
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_heads = attn.q_proj.out_features // self.head_dim
        self.num_kv_heads = self.num_heads
        self.intermediate_size = layer.fc2.in_features
        self.pre_norm = bool(getattr(config, "do_layer_norm_before", True))
        self.kernel = OptKernel(config, getattr(attn, "layer_idx", index))

    @property
    def attn(self) -> nn.Module:
        return self.layer.self_attn

    def output_projection(self, group: str) -> nn.Linear:
        return self.attn.out_proj if group == ATTN else self.layer.fc2

    def _norm(self, group: str) -> nn.Module:
        return self.layer.self_attn_layer_norm if group == ATTN else self.layer.final_layer_norm

    def unit_slices(self, group: str) -> list[UnitSlice]:
        if group == ATTN:
            a = self.attn
            return kit.linear_slices(
                [
                    ("q_proj", a.q_proj, 0),
                    ("k_proj", a.k_proj, 0),
                    ("v_proj", a.v_proj, 0),
                    ("out_proj", a.out_proj, 1),
                ],
                self.head_dim,
            )
        return kit.linear_slices([("fc1", self.layer.fc1, 0), ("fc2", self.layer.fc2, 1)], 1)

    def watch(self, group, fn):
        if group == ATTN:
            return super().watch(group, fn)
        # OPT flattens tokens to [B*T, d] before fc1: restore [B, T, C] from the layer's input
        shape: dict[str, torch.Size] = {}

        def remember(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            shape["bt"] = hidden.shape[:-1]

        def hook(module, args):
            x = args[0]
            fn(x.view(*shape["bt"], x.shape[-1]) if x.dim() == 2 else x)

        return _Handles(
            self.layer.register_forward_pre_hook(remember, with_kwargs=True),
            self.layer.fc2.register_forward_pre_hook(hook),
        )

    # -- running -----------------------------------------------------------------------------
    def group_input(self, group: str, residual: torch.Tensor) -> torch.Tensor:
        return self._norm(group)(residual) if self.pre_norm else residual

    def add_output(self, group: str, residual: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return residual + y if self.pre_norm else self._norm(group)(residual + y)

    def gather(self, group: str, kept):
        if group == MLP:
            fc1, fc2 = self.layer.fc1, self.layer.fc2
            if kept is None:
                return OptMlpWeights(fc1.weight, fc2.weight, fc1.bias, fc2.bias)
            kept = kept.to(fc1.weight.device)
            w1, b1 = kit.rows(fc1, kept)
            return OptMlpWeights(w1, fc2.weight.index_select(1, kept), b1, fc2.bias)
        a = self.attn
        if kept is None:
            return OptAttentionWeights(
                a.q_proj.weight,
                a.k_proj.weight,
                a.v_proj.weight,
                a.out_proj.weight,
                a.q_proj.bias,
                a.k_proj.bias,
                a.v_proj.bias,
                a.out_proj.bias,
                self.head_dim,
            )
        rows = self.unit_channels(ATTN, kept.to(a.q_proj.weight.device))
        (q, qb), (k, kb), (v, vb) = (kit.rows(p, rows) for p in (a.q_proj, a.k_proj, a.v_proj))
        o = kit.unit_columns(a.out_proj.weight, kept, self.head_dim)
        return OptAttentionWeights(q, k, v, o, qb, kb, vb, a.out_proj.bias, self.head_dim)

    #: the gathered forwards take ``unit_mask`` (per-sequence kept sets, :mod:`prunekit.rows`)
    row_masks = True

    def run(
        self,
        group,
        x,
        weights,
        *,
        observe=False,
        attention_mask=None,
        cache=None,
        unit_mask=None,
        **kwargs,
    ):
        if group == MLP:
            return opt_mlp_forward(x, weights, self.layer.activation_fn, observe, unit_mask)
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        return opt_attention_forward(
            x,
            weights,
            attention_mask,
            self.kernel,
            cache,
            return_out_input=observe,
            unit_mask=unit_mask,
            **kwargs,
        )

    @property
    def cache_layer(self) -> int:
        return self.kernel.layer_idx

    # -- probing -----------------------------------------------------------------------------
    def probe(self, group, x, position_ids, token_mask=None):
        w = self.gather(group, None)
        if group == MLP:
            return self.layer.activation_fn(torch.nn.functional.linear(x, w.fc1, w.fc1_bias))
        q, k, v = opt_project_qkv(x, w)  # q already scaled
        return kit.probe_attention(q, k, v, position_ids, token_mask, scale=1.0)

    # -- physical pruning --------------------------------------------------------------------
    def slice(self, kept_heads, kept_channels) -> None:
        layer, a = self.layer, self.attn
        if kept_heads is not None:
            rows = self.unit_channels(ATTN, kept_heads.to(a.q_proj.weight.device))
            layer.self_attn = PrunedOPTAttention(
                self.config,
                self.kernel.layer_idx,
                self.head_dim,
                kit.sub_linear(a.q_proj, rows),
                kit.sub_linear(a.k_proj, rows),
                kit.sub_linear(a.v_proj, rows),
                kit.sub_linear(a.out_proj, cols=rows),
            )
        elif not isinstance(a, PrunedOPTAttention):  # one module layout in every layer
            layer.self_attn = PrunedOPTAttention(
                self.config,
                self.kernel.layer_idx,
                self.head_dim,
                a.q_proj,
                a.k_proj,
                a.v_proj,
                a.out_proj,
            )
        if kept_channels is not None:
            layer.fc1 = kit.sub_linear(layer.fc1, kept_channels)
            layer.fc2 = kit.sub_linear(layer.fc2, cols=kept_channels)

    # -- cost model --------------------------------------------------------------------------
    def macs_per_token(self, heads: int, channels: int, seq_len: int) -> float:
        d, hd = self.hidden_size, self.head_dim
        return 4 * d * hd * heads + 2 * d * channels + 2 * seq_len * heads * hd

    def input_macs(self, group: str) -> float:
        d = self.hidden_size
        return (
            3 * d * self.num_heads * self.head_dim if group == ATTN else d * self.intermediate_size
        )


class OptAdapter(ModelAdapter):
    """OPT causal LMs (``model.model.decoder.layers``)."""

    name = "opt"
    model_types = ("opt",)
    modeling = "prunekit.models.pruned_opt:PrunekitOPTForCausalLM"
    #: whole decoder layers can be removed (:meth:`ModelAdapter.remove_layers`)
    removes_layers = True
    #: MHA: a layer sliced to no head keeps no K/V either; to no channel, no MLP (fc1/fc2)
    sublayers = (ATTN, MLP)

    @classmethod
    def unsupported(cls, config) -> str | None:
        return kit.causal_problem(config)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._layers = [
            OptLayerAdapter(layer, i, model.config) for i, layer in enumerate(self.decoder_layers)
        ]

    def gguf_model(self):
        from prunekit.errors import ExportError

        raise ExportError(
            "OPT does not export to GGUF: llama.cpp has no OPT architecture "
            "(learned positions, LayerNorm and ReLU MLPs match none of its "
            "architectures), whatever the shapes"
        )

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    def layers(self) -> list[OptLayerAdapter]:
        return self._layers

    def layer_shapes(self) -> dict[str, list]:
        return {
            "num_heads": [la.num_heads for la in self._layers],
            "ffn_dim": [la.intermediate_size for la in self._layers],
            "out_bias": [la.attn.out_proj.bias is not None for la in self._layers],
            "fc2_bias": [la.layer.fc2.bias is not None for la in self._layers],
        }

    def plain_model(self, shapes: dict[str, list]) -> nn.Module | None:
        config = self.model.config
        if set(shapes["num_heads"]) != {config.num_attention_heads}:
            return None  # OPTConfig cannot keep head_dim with fewer heads
        if len(set(shapes["ffn_dim"])) != 1:
            return None
        if not config.enable_bias and (any(shapes["out_bias"]) or any(shapes["fc2_bias"])):
            return None
        plain = kit.plain_config(config, (PRUNED_LAYERS_KEY,), ffn_dim=shapes["ffn_dim"][0])
        # PrunedOPTAttention has OPTAttention's parameter names: the weights load as they are
        return kit.plain_model_from(self.model, plain) if plain is not None else None


@hookimpl
def prunekit_register_adapters(register):
    register(
        "opt",
        OptAdapter,
        description="OPT (pre- and post-LN, biases, ReLU fc1/fc2, learned positions)",
    )
