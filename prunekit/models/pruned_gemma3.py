"""Pruned Gemma-3 (text) modelling, self-contained (imports only torch and transformers).

Part of prunekit **and** copied verbatim into every saved Gemma-3 checkpoint whose layers have
per-layer shapes, as ``modeling_prunekit_gemma3.py``, named in the config's ``auto_map``:
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` rebuilds the pruned
model without prunekit (``prunekit.load_pruned`` uses the installed copy instead). Keep it free
of prunekit imports.

Gemma-3 attention: q/k RMSNorms over ``head_dim`` (shared by every head, never sliced), RoPE
with a base per layer type, ``query_pre_attn_scalar ** -0.5`` scaling, a sliding window on the
``sliding_attention`` layers. With GQA the kept query heads keep their K/V head through
``kv_index``. The forward functions here are also what the prunekit adapter runs on gathered
weights.

Per-layer shapes live in ``config.prunekit_layers``: ``num_heads``, ``num_kv_heads``,
``kv_index``, ``intermediate_size``, ``o_bias``, ``down_bias``, lists indexed by layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Gemma3ForCausalLM

PRUNED_LAYERS_KEY = "prunekit_layers"


@dataclass
class Gemma3AttentionWeights:
    """Attention weights for one kept set; the q/k norms are the layer's own modules."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None
    q_norm: nn.Module
    k_norm: nn.Module
    #: KV head used by each kept query head (None: one KV head per query head, in order)
    kv_index: torch.Tensor | None
    head_dim: int
    #: the sliced module's projections when these are its whole weights (``weights()``), called
    #: instead of ``F.linear`` on the tensors (see :func:`_linear_of`); None for gathered weights
    modules: tuple | None = None


class Gemma3Kernel:
    """What Hugging Face's attention functions read from ``module``: K/V come pre-expanded."""

    def __init__(self, config, layer_idx: int) -> None:
        self.config = config
        self.layer_idx = layer_idx
        layer_types = getattr(config, "layer_types", None)
        self.is_sliding = layer_types is not None and layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if self.is_sliding else None
        self.layer_type = layer_types[layer_idx] if layer_types is not None else None
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.is_causal = not bool(getattr(config, "use_bidirectional_attention", False))
        self.training = False
        self.num_key_value_groups = 1


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` [B, H, T, d] with cos/sin [B, T, d] (Hugging Face's layout)."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def project_qkv(x: torch.Tensor, w: Gemma3AttentionWeights, cos, sin):
    """Queries, keys, values of ``x`` [B, T, d]: projected, q/k-normed, RoPE applied."""
    bsz, seq = x.shape[:2]
    hd = w.head_dim
    q = _linear_of(x, w.q, w.q_bias, w.modules, 0).view(bsz, seq, -1, hd).transpose(1, 2)
    k = _linear_of(x, w.k, w.k_bias, w.modules, 1).view(bsz, seq, -1, hd).transpose(1, 2)
    v = _linear_of(x, w.v, w.v_bias, w.modules, 2).view(bsz, seq, -1, hd).transpose(1, 2)
    q, k = w.q_norm(q), w.k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def gemma3_attention_forward(
    x,
    w: Gemma3AttentionWeights,
    position_embeddings,
    attention_mask,
    kernel: Gemma3Kernel,
    cache=None,
    return_o_input: bool = False,
    unit_mask: torch.Tensor | None = None,
    **kwargs,
):
    """Gemma-3 attention of ``x`` [B, T, d] with the weights ``w``; with ``return_o_input``
    also the input of o_proj; ``unit_mask`` ([B, heads]) removes heads per row."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    bsz, seq = x.shape[:2]
    q, k, v = project_qkv(x, w, *position_embeddings)
    if cache is not None:
        k, v = update_cache(cache, k, v, kernel.layer_idx, kwargs)
    if w.kv_index is not None:
        k, v = k.index_select(1, w.kv_index), v.index_select(1, w.kv_index)
    if q.shape[1] == 0:  # every head pruned: the block contributes only its bias
        out = torch.zeros(bsz, seq, 0, dtype=x.dtype, device=x.device)
    else:
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(
            kernel.config._attn_implementation, eager_attention_forward
        )
        kw = {
            k_: v_
            for k_, v_ in kwargs.items()
            if k_ not in ("position_ids", "use_cache", "sliding_window")
        }
        out, _ = fn(
            kernel,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0,
            scaling=kernel.scaling,
            sliding_window=kernel.sliding_window,
            **kw,
        )
        out = out.reshape(bsz, seq, -1).contiguous()
        if unit_mask is not None:  # this file imports no prunekit module (see the docstring)
            m = unit_mask.to(out.dtype)[:, None, :, None]
            out = (out.view(bsz, seq, -1, w.head_dim) * m).view(bsz, seq, -1)
    y = _linear_of(out, w.o, w.o_bias, w.modules, 3)
    return (y, out) if return_o_input else y


def _linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    # a dropped sublayer's projection has a zero dimension: torch warns that initialising it
    # is a no-op, which is what is meant
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
        return nn.Linear(n_in, n_out, bias=bias)


class PrunedGemma3Attention(nn.Module):
    """Gemma-3 attention with a subset of query heads; drop-in for ``Gemma3Attention``.

    ``kv_index[i]`` is the KV head used by kept query head ``i`` (groups may be unequal)."""

    def __init__(
        self,
        config,
        layer_idx: int,
        head_dim: int,
        q_proj: nn.Linear,
        k_proj: nn.Linear,
        v_proj: nn.Linear,
        o_proj: nn.Linear,
        q_norm: nn.Module,
        k_norm: nn.Module,
        kv_index: torch.Tensor,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        self.register_buffer(
            "kv_index", kv_index.long().clone().to(q_proj.weight.device), persistent=True
        )
        self._identity: bool | None = None  # see _kv_identity
        self._kernel = Gemma3Kernel(config, layer_idx)
        self.is_sliding = self._kernel.is_sliding
        self.sliding_window = self._kernel.sliding_window
        self.is_causal = self._kernel.is_causal

    @classmethod
    def empty(
        cls,
        config,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        kv_index: list[int],
        o_bias: bool,
    ) -> PrunedGemma3Attention:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

        hd, d = config.head_dim, config.hidden_size
        bias = bool(config.attention_bias)
        return cls(
            config,
            layer_idx,
            hd,
            _linear(d, num_heads * hd, bias),
            _linear(d, num_kv_heads * hd, bias),
            _linear(d, num_kv_heads * hd, bias),
            _linear(num_heads * hd, d, bias or o_bias),
            Gemma3RMSNorm(hd, eps=config.rms_norm_eps),
            Gemma3RMSNorm(hd, eps=config.rms_norm_eps),
            torch.tensor(kv_index, dtype=torch.long),
        )

    @property
    def num_heads(self) -> int:
        return self.q_proj.out_features // self.head_dim

    def _kv_identity(self) -> bool:
        """Whether kept head ``i`` reads K/V head ``i`` (no index needed). Decided once, not
        per forward (the test synchronises a GPU), and again after a state dict loads."""
        if self._identity is None:
            n = self.kv_index.numel()
            self._identity = n == self.k_proj.out_features // self.head_dim and bool(
                (self.kv_index == torch.arange(n, device=self.kv_index.device)).all()
            )
        return self._identity

    def _load_from_state_dict(self, *args, **kwargs):
        self._identity = None
        return super()._load_from_state_dict(*args, **kwargs)

    def weights(self) -> Gemma3AttentionWeights:
        identity = self._kv_identity()
        return Gemma3AttentionWeights(
            self.q_proj.weight,
            self.k_proj.weight,
            self.v_proj.weight,
            self.o_proj.weight,
            self.q_proj.bias,
            self.k_proj.bias,
            self.v_proj.bias,
            self.o_proj.bias,
            self.q_norm,
            self.k_norm,
            None if identity else self.kv_index,
            self.head_dim,
            modules=(self.q_proj, self.k_proj, self.v_proj, self.o_proj),
        )

    def forward(
        self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs
    ):
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        out = gemma3_attention_forward(
            hidden_states,
            self.weights(),
            position_embeddings,
            attention_mask,
            self._kernel,
            cache,
            **kwargs,
        )
        return out, None


def apply_layer_shapes(model: nn.Module, spec: dict) -> None:
    """Give every decoder layer of ``model`` the shapes recorded in ``spec``."""
    config = model.config
    d = config.hidden_size
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = PrunedGemma3Attention.empty(
            config,
            i,
            spec["num_heads"][i],
            spec["num_kv_heads"][i],
            spec["kv_index"][i],
            bool(spec["o_bias"][i]),
        )
        inter = spec["intermediate_size"][i]
        mlp = layer.mlp
        mlp.gate_proj = _linear(d, inter, False)
        mlp.up_proj = _linear(d, inter, False)
        mlp.down_proj = _linear(inter, d, bool(spec["down_bias"][i]))


class PrunekitGemma3ForCausalLM(Gemma3ForCausalLM):
    """A Gemma-3 causal LM whose layers have the per-layer shapes of
    ``config.prunekit_layers``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        spec = getattr(config, PRUNED_LAYERS_KEY, None)
        if spec:
            apply_layer_shapes(self, spec)


def update_cache(cache, k: torch.Tensor, v: torch.Tensor, layer_idx: int, kwargs: dict):
    """``cache.update``, with a placeholder K/V head of width 1 for a layer without K/V heads
    (see ``update_cache`` in ``pruned_llama.py``; this file is saved beside checkpoints as
    remote code and imports nothing of prunekit, hence its own copy)."""
    if k.shape[1]:
        return cache.update(k, v, layer_idx, kwargs=kwargs)
    b, _, t, _ = k.shape
    cache.update(k.new_zeros(b, 1, t, 1), v.new_zeros(b, 1, t, 1), layer_idx, kwargs=kwargs)
    return k, v


def _linear_of(x: torch.Tensor, weight, bias, modules, i: int) -> torch.Tensor:
    """``x`` through projection ``i``: the sliced module itself when the weights come whole from
    one (``modules``: peft's LoRA adapters and forward hooks then apply), else ``F.linear``
    (see ``pruned_llama.py``; this file imports nothing of prunekit, hence its own copy)."""
    return modules[i](x) if modules is not None else F.linear(x, weight, bias)
