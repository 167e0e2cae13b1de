"""Pruned OPT modelling, self-contained (imports only torch and transformers).

Part of prunekit **and** copied verbatim into every saved OPT checkpoint whose layers have
per-layer shapes, as ``modeling_prunekit_opt.py``, named in the config's ``auto_map``:
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` rebuilds the pruned
model without prunekit (``prunekit.load_pruned`` uses the installed copy instead). Keep it free
of prunekit imports.

OPT's attention derives ``head_dim`` from ``hidden_size / num_attention_heads``, so a layer with
pruned heads cannot be described by ``OPTConfig``: :class:`PrunedOPTAttention` takes its head
count from its own ``q_proj``. The forward functions here are also what the prunekit adapter
runs on gathered weights.

Per-layer shapes live in ``config.prunekit_layers``: ``num_heads``, ``ffn_dim``, ``out_bias``
and ``fc2_bias`` (whether out_proj / fc2 carry a bias), lists indexed by layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import OPTForCausalLM

PRUNED_LAYERS_KEY = "prunekit_layers"


@dataclass
class OptAttentionWeights:
    """q/k/v rows and out_proj columns of the kept heads (biases may be None)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    out_bias: torch.Tensor | None
    head_dim: int
    #: the sliced module's projections when these are its whole weights (``weights()``), called
    #: instead of ``F.linear`` on the tensors (see :func:`_linear_of`); None for gathered weights
    modules: tuple | None = None


@dataclass
class OptMlpWeights:
    fc1: torch.Tensor
    fc2: torch.Tensor
    fc1_bias: torch.Tensor | None
    fc2_bias: torch.Tensor | None


class OptKernel:
    """What Hugging Face's attention functions read from ``module``."""

    def __init__(self, config, layer_idx: int) -> None:
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = True
        self.training = False


def opt_project_qkv(x: torch.Tensor, w: OptAttentionWeights):
    """Queries (scaled by ``head_dim ** -0.5`` after the projection, as OPT does), keys and
    values of ``x`` [B, T, d], as [B, H, T, d_h]."""
    bsz, seq = x.shape[:2]
    hd = w.head_dim
    q = _linear_of(x, w.q, w.q_bias, w.modules, 0) * hd**-0.5
    q = q.view(bsz, seq, -1, hd).transpose(1, 2)
    k = _linear_of(x, w.k, w.k_bias, w.modules, 1).view(bsz, seq, -1, hd).transpose(1, 2)
    v = _linear_of(x, w.v, w.v_bias, w.modules, 2).view(bsz, seq, -1, hd).transpose(1, 2)
    return q, k, v


def opt_attention_forward(
    x,
    w: OptAttentionWeights,
    attention_mask,
    kernel: OptKernel,
    cache=None,
    return_out_input: bool = False,
    unit_mask: torch.Tensor | None = None,
    **kwargs,
):
    """OPT attention of ``x`` [B, T, d] with weights ``w``; with ``return_out_input`` also the
    input of out_proj. The query is scaled after its projection, as OPT does. ``unit_mask``
    ([B, heads]) removes heads per row (their output is zeroed before out_proj)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.opt.modeling_opt import eager_attention_forward

    bsz, seq = x.shape[:2]
    q, k, v = opt_project_qkv(x, w)
    if cache is not None:
        k, v = update_cache(cache, k, v, kernel.layer_idx, kwargs)
    if q.shape[1] == 0:  # every head pruned: the block contributes only its bias
        out = torch.zeros(bsz, seq, 0, dtype=x.dtype, device=x.device)
    else:
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(
            kernel.config._attn_implementation, eager_attention_forward
        )
        kw = {k_: v_ for k_, v_ in kwargs.items() if k_ not in ("position_ids", "use_cache")}
        out, _ = fn(kernel, q, k, v, attention_mask, dropout=0.0, scaling=1.0, **kw)
        out = _mask_units(out.reshape(bsz, seq, -1).contiguous(), unit_mask, w.head_dim)
    y = _linear_of(out, w.out, w.out_bias, w.modules, 3)
    return (y, out) if return_out_input else y


def _mask_units(h: torch.Tensor, unit_mask: torch.Tensor | None, width: int = 1) -> torch.Tensor:
    """``h`` ([B, T, units * width]) with each row's units multiplied by ``unit_mask``
    ([B, units]); the same as ``pruned_llama.mask_units`` (this file imports no prunekit
    module, see the docstring)."""
    if unit_mask is None:
        return h
    bsz, seq = h.shape[:2]
    m = unit_mask.to(h.dtype)
    if width == 1:
        return h * m[:, None, :]
    return (h.view(bsz, seq, -1, width) * m[:, None, :, None]).view(bsz, seq, -1)


def opt_mlp_forward(
    x, w: OptMlpWeights, act, return_fc2_input: bool = False, unit_mask: torch.Tensor | None = None
):
    """``fc2(act(fc1(x)))``; with ``return_fc2_input`` also the input of fc2; ``unit_mask``
    ([B, channels]) removes channels per row."""
    h = _mask_units(act(F.linear(x, w.fc1, w.fc1_bias)), unit_mask)
    y = F.linear(h, w.fc2, w.fc2_bias)
    return (y, h) if return_fc2_input else y


def _linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    # a dropped sublayer's projection has a zero dimension: torch warns that initialising it
    # is a no-op, which is what is meant
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
        return nn.Linear(n_in, n_out, bias=bias)


class PrunedOPTAttention(nn.Module):
    """OPT attention with a subset of heads (``head_dim`` kept, head count from ``q_proj``);
    drop-in for ``OPTAttention``."""

    def __init__(
        self,
        config,
        layer_idx: int,
        head_dim: int,
        q_proj: nn.Linear,
        k_proj: nn.Linear,
        v_proj: nn.Linear,
        out_proj: nn.Linear,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.is_causal = True
        self._kernel = OptKernel(config, layer_idx)

    @classmethod
    def empty(cls, config, layer_idx: int, num_heads: int, out_bias: bool) -> PrunedOPTAttention:
        d = config.hidden_size
        hd = d // config.num_attention_heads
        bias = bool(config.enable_bias)
        inner = num_heads * hd
        return cls(
            config,
            layer_idx,
            hd,
            _linear(d, inner, bias),
            _linear(d, inner, bias),
            _linear(d, inner, bias),
            _linear(inner, d, out_bias),
        )

    @property
    def num_heads(self) -> int:
        return self.q_proj.out_features // self.head_dim

    def weights(self) -> OptAttentionWeights:
        return OptAttentionWeights(
            self.q_proj.weight,
            self.k_proj.weight,
            self.v_proj.weight,
            self.out_proj.weight,
            self.q_proj.bias,
            self.k_proj.bias,
            self.v_proj.bias,
            self.out_proj.bias,
            self.head_dim,
            modules=(self.q_proj, self.k_proj, self.v_proj, self.out_proj),
        )

    def forward(
        self, hidden_states, cache=None, attention_mask=None, output_attentions=False, **kwargs
    ):
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        out = opt_attention_forward(
            hidden_states, self.weights(), attention_mask, self._kernel, cache, **kwargs
        )
        return out, None


def apply_layer_shapes(model: nn.Module, spec: dict) -> None:
    """Give every decoder layer of ``model`` the shapes recorded in ``spec``."""
    config = model.config
    d = config.hidden_size
    bias = bool(config.enable_bias)
    for i, layer in enumerate(model.model.decoder.layers):
        layer.self_attn = PrunedOPTAttention.empty(
            config, i, spec["num_heads"][i], bias or bool(spec["out_bias"][i])
        )
        ffn = spec["ffn_dim"][i]
        layer.fc1 = _linear(d, ffn, bias)
        layer.fc2 = _linear(ffn, d, bias or bool(spec["fc2_bias"][i]))


class PrunekitOPTForCausalLM(OPTForCausalLM):
    """An OPT causal LM whose layers have the per-layer shapes of ``config.prunekit_layers``."""

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
