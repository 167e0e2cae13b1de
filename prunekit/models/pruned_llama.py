"""Pruned LLaMA-family modelling (LLaMA, Mistral, Qwen2, Qwen3), self-contained (imports only
torch and transformers).

This file is part of prunekit **and** is copied verbatim into every saved checkpoint of these
families whose layers have per-layer shapes, as ``modeling_prunekit_<adapter>.py``: the
checkpoint's config names it in ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` rebuilds the pruned model
without prunekit installed (``prunekit.load_pruned`` uses the installed copy and never runs the
checkpoint's). Keep it free of prunekit imports.

The forward functions here (:func:`attention_forward`, :func:`mlp_forward`) are also what the
prunekit adapters run on gathered weights, so a physically pruned layer and the dynamic
runtime compute the same thing.

Qwen3's attention is LLaMA's with an RMSNorm over ``head_dim`` on each query and key head before
RoPE (``q_norm``/``k_norm``, shared by every head, never sliced): :class:`AttentionWeights` and
:class:`PrunedLlamaAttention` carry them when the family has them.

Per-layer shapes live in ``config.prunekit_layers`` (lists indexed by layer):
``num_heads`` (kept query heads), ``num_kv_heads`` (k/v heads stored), ``kv_index`` (the KV
head of each kept query head), ``intermediate_size``, ``o_bias`` and ``down_bias`` (whether
o_proj / down_proj carry a compensation bias).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

PRUNED_LAYERS_KEY = "prunekit_layers"


def layer_sliding_window(config, layer_idx: int) -> int | None:
    """The sliding window of layer ``layer_idx`` (None: full causal attention).

    Qwen2-style configs list ``layer_types``; Mistral applies ``sliding_window`` to every layer;
    LLaMA has none.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is not None and layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


@dataclass
class AttentionWeights:
    """Attention weights for one kept set (biases may be None)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None
    #: KV head used by each kept query head (None: one KV head per query head, in order, or
    #: ``kv_repeat`` consecutive query heads per KV head)
    kv_index: torch.Tensor | None
    head_dim: int
    #: with ``kv_index`` None: consecutive query heads per K/V head (GQA left whole), handed
    #: to the attention kernel (``num_key_value_groups``) instead of copying K/V per query head
    kv_repeat: int = 1
    #: with ``kv_index`` (uneven groups): each kept query head's slot in a layout of
    #: ``kv_repeat`` slots per K/V head (:func:`kv_slots`), so that a decoding step can run the
    #: kernel on zero-padded queries against the cached K/V as they are, instead of copying
    #: the cache per query head
    kv_slots: torch.Tensor | None = None
    #: RMSNorms over ``head_dim`` applied to every query / key head before RoPE (Qwen3; the
    #: layer's own modules), None where the family has none
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    #: the sliced module's projections when these are its whole weights (``weights()``), called
    #: instead of ``F.linear`` on the tensors (see :func:`_linear_of`); None for gathered weights
    modules: tuple | None = None


def kv_slots(kv_index: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, int]:
    """``(slots, g)``: with ``g`` the largest number of query heads on one K/V head, query head
    ``i`` goes to slot ``kv_index[i] * g + (its rank among the heads on that K/V head)``."""
    ranks: list[int] = []
    seen: dict[int, int] = {}
    for j in kv_index.tolist():
        ranks.append(seen.get(j, 0))
        seen[j] = ranks[-1] + 1
    g = max(seen.values(), default=1)
    return kv_index * g + torch.tensor(ranks, dtype=kv_index.dtype, device=kv_index.device), g


def regular_kv_repeat(kv_index: torch.Tensor, num_kv_heads: int) -> int | None:
    """``g`` when ``kv_index`` is ``[0]*g + [1]*g + ...`` over all ``num_kv_heads`` heads
    (plain GQA), else None."""
    n = kv_index.numel()
    if num_kv_heads < 1 or n % num_kv_heads:
        return None
    g = n // num_kv_heads
    grouped = torch.arange(num_kv_heads, device=kv_index.device).repeat_interleave(g)
    return g if torch.equal(kv_index, grouped) else None


@dataclass
class MlpWeights:
    """Gated-MLP weights for one kept set (biases may be None)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def mask_units(h: torch.Tensor, unit_mask: torch.Tensor | None, width: int = 1) -> torch.Tensor:
    """``h`` ([B, T, units * width], an output projection's input) with each row's units
    multiplied by ``unit_mask`` ([B, units]; 1 keeps a unit, 0 removes it from that row)."""
    if unit_mask is None:
        return h
    bsz, seq = h.shape[:2]
    m = unit_mask.to(h.dtype)
    if width == 1:
        return h * m[:, None, :]
    return (h.view(bsz, seq, -1, width) * m[:, None, :, None]).view(bsz, seq, -1)


def mlp_forward(
    x: torch.Tensor,
    w: MlpWeights,
    act,
    return_down_input: bool = False,
    unit_mask: torch.Tensor | None = None,
):
    """``down(act(gate(x)) * up(x))`` with the weights ``w``; with ``return_down_input`` also
    the input of down_proj; ``unit_mask`` ([B, channels]) removes channels per row."""
    h = act(F.linear(x, w.gate, w.gate_bias)) * F.linear(x, w.up, w.up_bias)
    h = mask_units(h, unit_mask)
    y = F.linear(h, w.down, w.down_bias)
    return (y, h) if return_down_input else y


class KernelModule:
    """What Hugging Face's attention functions read from ``module``: K/V come pre-expanded."""

    def __init__(
        self,
        config,
        layer_idx: int,
        sliding_window: int | None = None,
        scaling: float | None = None,
    ) -> None:
        self.config = config
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        #: the attention score scale (None: ``head_dim ** -0.5``)
        self.scaling = scaling
        self.is_causal = True
        self.training = False
        self.num_key_value_groups = 1


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` [B, H, T, d] with cos/sin [B, T, d] (Hugging Face's layout)."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def project_qkv(x: torch.Tensor, w: AttentionWeights, cos, sin):
    """Queries, keys, values of ``x`` [B, T, d] ([B, H, T, d_h]): projected, q/k-normed when
    ``w`` has the norms, RoPE applied at cos/sin."""
    bsz, seq = x.shape[:2]
    hd = w.head_dim
    q = _linear_of(x, w.q, w.q_bias, w.modules, 0).view(bsz, seq, -1, hd).transpose(1, 2)
    k = _linear_of(x, w.k, w.k_bias, w.modules, 1).view(bsz, seq, -1, hd).transpose(1, 2)
    v = _linear_of(x, w.v, w.v_bias, w.modules, 2).view(bsz, seq, -1, hd).transpose(1, 2)
    if w.q_norm is not None:
        q, k = w.q_norm(q), w.k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_forward(
    x,
    w: AttentionWeights,
    position_embeddings,
    attention_mask,
    kernel: KernelModule,
    cache=None,
    return_o_input: bool = False,
    unit_mask: torch.Tensor | None = None,
    **kwargs,
):
    """Attention of normalised input ``x`` [B, T, d] with the weights ``w``.

    Runs real matmuls of the given (possibly gathered) shapes; the attention kernel is Hugging
    Face's (``config._attn_implementation``), fed with K/V expanded to one KV head per query
    head through ``kv_index``. Returns the block output, and with ``return_o_input`` also the
    input of o_proj ([B, T, heads * head_dim]). ``unit_mask`` ([B, heads]) removes heads per
    row (their output is zeroed before o_proj).
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    bsz, seq = x.shape[:2]
    hd = w.head_dim
    q, k, v = project_qkv(x, w, *position_embeddings)
    if cache is not None:
        k, v = update_cache(cache, k, v, kernel.layer_idx, kwargs)
    repeat, slots = w.kv_repeat, None
    if w.kv_index is not None and w.kv_slots is not None and seq == 1 and q.shape[1]:
        # a decoding step: the cache is far larger than the query, so pad the queries into
        # equal groups (zero queries, dropped after) and let the kernel repeat K/V itself
        slots, repeat = w.kv_slots, w.kv_repeat
        padded = q.new_zeros(bsz, k.shape[1] * repeat, seq, hd)
        q = padded.index_copy_(1, slots, q)
    elif w.kv_index is not None:
        k, v = k.index_select(1, w.kv_index), v.index_select(1, w.kv_index)
        repeat = 1
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
        if kernel.sliding_window is not None:
            kw["sliding_window"] = kernel.sliding_window
        # the kernel repeats K/V itself (sdpa's enable_gqa without a mask, no copy)
        kernel.num_key_value_groups = repeat
        scaling = kernel.scaling if kernel.scaling is not None else hd**-0.5
        out, _ = fn(kernel, q, k, v, attention_mask, dropout=0.0, scaling=scaling, **kw)
        if slots is not None:  # [B, T, slots, d]: the kept heads' own outputs
            out = out.index_select(2, slots)
        out = mask_units(out.reshape(bsz, seq, -1).contiguous(), unit_mask, hd)
    y = _linear_of(out, w.o, w.o_bias, w.modules, 3)
    return (y, out) if return_o_input else y


def _linear(n_in: int, n_out: int, bias: bool, like: nn.Linear | None = None) -> nn.Linear:
    ref = like.weight if like is not None else None
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    # a dropped sublayer's projection has a zero dimension: torch warns that initialising it
    # is a no-op, which is what is meant
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
        return nn.Linear(n_in, n_out, bias=bias, **kw)


class PrunedLlamaAttention(nn.Module):
    """LLaMA attention with a subset of query heads; drop-in for ``LlamaAttention``.

    ``kv_index[i]`` is the KV head used by kept query head ``i`` (``arange`` with MHA, where
    k/v rows are pruned with their query head); groups may be unequal. ``q_norm``/``k_norm``:
    Qwen3's per-head RMSNorms (the original attention's modules), else None.
    """

    def __init__(
        self,
        config,
        layer_idx: int,
        head_dim: int,
        q_proj: nn.Linear,
        k_proj: nn.Linear,
        v_proj: nn.Linear,
        o_proj: nn.Linear,
        kv_index: torch.Tensor,
        scaling: float | None = None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.sliding_window = layer_sliding_window(config, layer_idx)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        kv_index = kv_index.long().clone().to(q_proj.weight.device)
        self.register_buffer("kv_index", kv_index, persistent=True)
        self._identity: bool | None = None  # see _kv_identity
        self.is_causal = True
        self._kernel = KernelModule(config, layer_idx, self.sliding_window, scaling)

    @classmethod
    def empty(
        cls,
        config,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        kv_index: list[int],
        o_bias: bool,
        qkv_bias: bool,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ) -> PrunedLlamaAttention:
        """Modules of the right shapes (weights are loaded afterwards); the q/k norms, which
        pruning never changes, are given as they are."""
        hd = head_dim_of(config)
        d = config.hidden_size
        return cls(
            config,
            layer_idx,
            hd,
            _linear(d, num_heads * hd, qkv_bias),
            _linear(d, num_kv_heads * hd, qkv_bias),
            _linear(d, num_kv_heads * hd, qkv_bias),
            _linear(num_heads * hd, d, o_bias),
            torch.tensor(kv_index, dtype=torch.long),
            q_norm=q_norm,
            k_norm=k_norm,
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

    def weights(self) -> AttentionWeights:
        return AttentionWeights(
            self.q_proj.weight,
            self.k_proj.weight,
            self.v_proj.weight,
            self.o_proj.weight,
            self.q_proj.bias,
            self.k_proj.bias,
            self.v_proj.bias,
            self.o_proj.bias,
            None if self._kv_identity() else self.kv_index,
            self.head_dim,
            q_norm=self.q_norm,
            k_norm=self.k_norm,
            modules=(self.q_proj, self.k_proj, self.v_proj, self.o_proj),
        )

    def forward(
        self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs
    ):
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        out = attention_forward(
            hidden_states,
            self.weights(),
            position_embeddings,
            attention_mask,
            self._kernel,
            cache,
            **kwargs,
        )
        return out, None


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def apply_layer_shapes(model: nn.Module, spec: dict, qkv_bias: bool, o_bias: bool) -> None:
    """Give every decoder layer of ``model`` the shapes recorded in ``spec``.

    :param qkv_bias: whether q/k/v carry a bias in this family; :param o_bias: whether o_proj
        does (a compensation bias recorded in ``spec`` adds one).
    """
    config = model.config
    d = config.hidden_size
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn  # its q/k norms (Qwen3), if any, are kept
        layer.self_attn = PrunedLlamaAttention.empty(
            config,
            i,
            spec["num_heads"][i],
            spec["num_kv_heads"][i],
            spec["kv_index"][i],
            bool(spec["o_bias"][i]) or o_bias,
            qkv_bias,
            getattr(attn, "q_norm", None),
            getattr(attn, "k_norm", None),
        )
        inter = spec["intermediate_size"][i]
        mlp = layer.mlp
        mlp.gate_proj = _linear(d, inter, mlp_bias)
        mlp.up_proj = _linear(d, inter, mlp_bias)
        mlp.down_proj = _linear(inter, d, mlp_bias or bool(spec["down_bias"][i]))


def _attention_biases(config, family: str) -> tuple[bool, bool]:
    """(q/k/v bias, o bias) of a family: Qwen2 always biases q/k/v and never o; LLaMA,
    Mistral and Qwen3 follow ``config.attention_bias`` for all four."""
    if family == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def _reshape(model: nn.Module, family: str) -> None:
    spec = getattr(model.config, PRUNED_LAYERS_KEY, None)
    if spec:
        apply_layer_shapes(model, spec, *_attention_biases(model.config, family))


class PrunekitLlamaForCausalLM(LlamaForCausalLM):
    """A LLaMA causal LM whose layers have the per-layer shapes of ``config.prunekit_layers``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        _reshape(self, "llama")


class PrunekitMistralForCausalLM(MistralForCausalLM):
    """A Mistral causal LM with the per-layer shapes of ``config.prunekit_layers``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        _reshape(self, "mistral")


class PrunekitQwen2ForCausalLM(Qwen2ForCausalLM):
    """A Qwen2 causal LM with the per-layer shapes of ``config.prunekit_layers``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        _reshape(self, "qwen2")


class PrunekitQwen3ForCausalLM(Qwen3ForCausalLM):
    """A Qwen3 causal LM with the per-layer shapes of ``config.prunekit_layers``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        _reshape(self, "qwen3")


def update_cache(cache, k: torch.Tensor, v: torch.Tensor, layer_idx: int, kwargs: dict):
    """``cache.update(k, v, layer_idx)``, also for a layer left without a K/V head (every head
    pruned, the attention sublayer dropped). Hugging Face's cache layers count their tokens
    from the stored keys and an empty tensor counts as none (``DynamicLayer`` returns 0 for
    ``numel() == 0``), so the model would read a sequence length of 0 from such a layer (the
    first layer's; the first full-attention layer's for the masks) and decode at wrong
    positions without an error. Such a layer stores one placeholder K/V head of width 1
    (zeros, two numbers per token), which every cache class counts. Returns the K/V to attend
    to (the empty ones as given: no head reads them)."""
    if k.shape[1]:
        return cache.update(k, v, layer_idx, kwargs=kwargs)
    b, _, t, _ = k.shape
    cache.update(k.new_zeros(b, 1, t, 1), v.new_zeros(b, 1, t, 1), layer_idx, kwargs=kwargs)
    return k, v


def _linear_of(x: torch.Tensor, weight, bias, modules, i: int) -> torch.Tensor:
    """``x`` through projection ``i``: the sliced module itself when the weights come whole from
    one (``modules``), so that what wraps it is applied (peft's LoRA adapters in recovery, the
    forward hooks calibration statistics are read with); else ``F.linear`` on the (gathered)
    weights. ``nn.Linear`` computes the same ``F.linear``: the results are identical."""
    return modules[i](x) if modules is not None else F.linear(x, weight, bias)
