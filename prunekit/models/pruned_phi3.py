"""Pruned Phi-3 modelling, self-contained (imports only torch and transformers).

Part of prunekit **and** copied verbatim into every saved Phi-3 checkpoint whose layers have
per-layer shapes, as ``modeling_prunekit_phi3.py``, named in the config's ``auto_map``:
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` rebuilds the pruned
model without prunekit (``prunekit.load_pruned`` uses the installed copy instead). Keep it free
of prunekit imports.

Phi-3 fuses its projections: ``qkv_proj`` holds the rows of every query head, then of every
K/V head's key, then of its value; ``gate_up_proj`` the gate rows, then the up rows (the MLP
chunks its output in two). A pruned layer keeps that layout: the kept heads' q rows (with MHA
also their k and v rows) gathered into one smaller ``qkv_proj``, the kept channels' gate rows
then their up rows into one smaller ``gate_up_proj``, so it runs the same two input matmuls as
the original. With GQA the K/V heads are never pruned and each kept query head reads its own
through ``kv_index``. RoPE rotates the first ``rotary_dim`` dimensions of each head
(``partial_rotary_factor``) with the cos/sin of the model's own rotary embedding (long-rope
scaling included); every layer attends within ``config.sliding_window`` when it is set. The
forward functions here are also what the prunekit adapter runs on gathered weights.

Per-layer shapes live in ``config.prunekit_layers``: ``num_heads``, ``num_kv_heads``,
``kv_index``, ``intermediate_size``, ``o_bias``, ``down_bias``, lists indexed by layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Phi3ForCausalLM

PRUNED_LAYERS_KEY = "prunekit_layers"


def head_dim_of(config) -> int:
    """The head size, as ``Phi3Attention`` reads it (``config.head_dim`` when set)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass
class Phi3AttentionWeights:
    """Attention weights for one kept set: ``qkv`` is ``[(heads + 2 * kv_heads) * head_dim, d]``
    (the kept heads' q rows, then the K/V rows), as ``qkv_proj`` lays them out."""

    qkv: torch.Tensor
    o: torch.Tensor
    o_bias: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    #: K/V head of each kept query head (None: one K/V head per query head, in order, or
    #: ``kv_repeat`` consecutive query heads per K/V head)
    kv_index: torch.Tensor | None
    #: with ``kv_index`` None: consecutive query heads per K/V head (GQA left whole), handed to
    #: the attention kernel instead of copying K/V per query head
    kv_repeat: int = 1
    #: with ``kv_index`` (uneven groups): each kept query head's slot in ``kv_repeat`` slots per
    #: K/V head (:func:`kv_slots`), so that a decoding step runs the kernel on zero-padded
    #: queries against the cached K/V as they are
    kv_slots: torch.Tensor | None = None
    #: the sliced module's projections when these are its whole weights (``weights()``), called
    #: instead of ``F.linear`` on the tensors (see :func:`_linear_of`); None for gathered weights
    modules: tuple | None = None


@dataclass
class Phi3MlpWeights:
    """Gated-MLP weights for one kept set: ``gate_up`` is ``[2 * channels, d]`` (gate rows, then
    up rows), ``down`` ``[d, channels]``."""

    gate_up: torch.Tensor
    down: torch.Tensor
    down_bias: torch.Tensor | None = None


def kv_slots(kv_index: torch.Tensor) -> tuple[torch.Tensor, int]:
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


def phi3_mlp_forward(
    x: torch.Tensor,
    w: Phi3MlpWeights,
    act,
    return_down_input: bool = False,
    unit_mask: torch.Tensor | None = None,
):
    """``down(up * act(gate))`` with ``gate, up`` the two halves of one ``gate_up`` matmul
    (``Phi3MLP``'s operations, in its order); with ``return_down_input`` also the input of
    down_proj; ``unit_mask`` ([B, channels]) removes channels per row."""
    gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
    h = mask_units(up * act(gate), unit_mask)
    y = F.linear(h, w.down, w.down_bias)
    return (y, h) if return_down_input else y


class Phi3Kernel:
    """What Hugging Face's attention functions read from ``module``: K/V come pre-expanded."""

    def __init__(self, config, layer_idx: int) -> None:
        self.config = config
        self.layer_idx = layer_idx
        #: Phi-3 applies the window to every layer when the config sets one
        self.sliding_window = getattr(config, "sliding_window", None)
        self.is_causal = True
        self.training = False
        self.num_key_value_groups = 1


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` dims of each head of ``x`` [B, H, T, d] (cos/sin
    [B, T, rotary_dim]); the other dims pass unchanged (``partial_rotary_factor`` < 1)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([(x_rot * cos) + (_rotate_half(x_rot) * sin), x_pass], dim=-1)


def split_qkv(x: torch.Tensor, w: Phi3AttentionWeights):
    """Queries, keys, values of ``x`` [B, T, d] ([B, H, T, d_h]) from one fused matmul."""
    bsz, seq = x.shape[:2]
    hd = w.head_dim
    qkv = _linear_of(x, w.qkv, None, w.modules, 0)
    q, k, v = qkv.split([w.num_heads * hd, w.num_kv_heads * hd, w.num_kv_heads * hd], dim=-1)
    q = q.reshape(bsz, seq, -1, hd).transpose(1, 2)
    k = k.reshape(bsz, seq, -1, hd).transpose(1, 2)
    v = v.reshape(bsz, seq, -1, hd).transpose(1, 2)
    return q, k, v


def project_qkv(x: torch.Tensor, w: Phi3AttentionWeights, cos, sin):
    """Queries, keys, values of ``x`` [B, T, d], RoPE applied to q and k at cos/sin."""
    q, k, v = split_qkv(x, w)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def phi3_attention_forward(
    x,
    w: Phi3AttentionWeights,
    position_embeddings,
    attention_mask,
    kernel: Phi3Kernel,
    cache=None,
    return_o_input: bool = False,
    unit_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """Phi-3 attention of normalised input ``x`` [B, T, d] with the weights ``w``.

    Runs real matmuls of the given (possibly gathered) shapes; the attention kernel is Hugging
    Face's (``config._attn_implementation``), fed with K/V expanded to one K/V head per query
    head through ``kv_index``. Returns the block output, and with ``return_o_input`` also the
    input of o_proj ([B, T, heads * head_dim]). ``unit_mask`` ([B, heads]) removes heads per
    row (their output is zeroed before o_proj).
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.phi3.modeling_phi3 import eager_attention_forward

    bsz, seq = x.shape[:2]
    hd = w.head_dim
    q, k, v = project_qkv(x, w, *position_embeddings)
    if cache is not None:
        k, v = update_cache(cache, k, v, kernel.layer_idx, kwargs)
    repeat, slots = w.kv_repeat, None
    if w.kv_index is not None and w.kv_slots is not None and seq == 1 and q.shape[1]:
        # a decoding step: pad the queries into equal groups (zero queries, dropped after) and
        # let the kernel repeat the cached K/V itself instead of copying it per query head
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
        kernel.num_key_value_groups = repeat
        out, _ = fn(kernel, q, k, v, attention_mask, dropout=dropout, scaling=hd**-0.5, **kw)
        if slots is not None:  # [B, T, slots, d]: the kept heads' own outputs
            out = out.index_select(2, slots)
        out = mask_units(out.reshape(bsz, seq, -1).contiguous(), unit_mask, hd)
    y = _linear_of(out, w.o, w.o_bias, w.modules, 1)
    return (y, out) if return_o_input else y


class PrunedPhi3Attention(nn.Module):
    """Phi-3 attention with a subset of query heads; drop-in for ``Phi3Attention``.

    ``qkv_proj`` holds the kept heads' q rows, then the stored K/V heads' k rows, then their v
    rows; ``kv_index[i]`` is the K/V head of kept query head ``i`` (``arange`` with MHA, where
    k/v rows are pruned with their query head; with GQA groups may be unequal).
    """

    def __init__(
        self,
        config,
        layer_idx: int,
        head_dim: int,
        qkv_proj: nn.Linear,
        o_proj: nn.Linear,
        kv_index: torch.Tensor,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        self.register_buffer(
            "kv_index", kv_index.long().clone().to(qkv_proj.weight.device), persistent=True
        )
        self._identity: bool | None = None  # see _kv_identity
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.is_causal = True
        self.sliding_window = getattr(config, "sliding_window", None)
        self._kernel = Phi3Kernel(config, layer_idx)

    @classmethod
    def empty(
        cls,
        config,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        kv_index: list[int],
        o_bias: bool,
    ) -> PrunedPhi3Attention:
        """Modules of the right shapes (weights are loaded afterwards)."""
        hd, d = head_dim_of(config), config.hidden_size
        return cls(
            config,
            layer_idx,
            hd,
            nn.Linear(d, (num_heads + 2 * num_kv_heads) * hd, bias=False),
            nn.Linear(num_heads * hd, d, bias=o_bias),
            torch.tensor(kv_index, dtype=torch.long),
        )

    @property
    def num_heads(self) -> int:
        return self.o_proj.in_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return (self.qkv_proj.out_features // self.head_dim - self.num_heads) // 2

    def _kv_identity(self) -> bool:
        """Whether kept head ``i`` reads K/V head ``i`` (no index needed). Decided once, not
        per forward (the test synchronises a GPU), and again after a state dict loads."""
        if self._identity is None:
            n = self.kv_index.numel()
            self._identity = n == self.num_kv_heads and bool(
                (self.kv_index == torch.arange(n, device=self.kv_index.device)).all()
            )
        return self._identity

    def _load_from_state_dict(self, *args, **kwargs):
        self._identity = None
        return super()._load_from_state_dict(*args, **kwargs)

    def weights(self) -> Phi3AttentionWeights:
        return Phi3AttentionWeights(
            self.qkv_proj.weight,
            self.o_proj.weight,
            self.o_proj.bias,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            None if self._kv_identity() else self.kv_index,
            modules=(self.qkv_proj, self.o_proj),
        )

    def forward(
        self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs
    ):
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        self._kernel.training = self.training  # eager attention's dropout reads it
        out = phi3_attention_forward(
            hidden_states,
            self.weights(),
            position_embeddings,
            attention_mask,
            self._kernel,
            cache,
            dropout=self.attention_dropout if self.training else 0.0,
            **kwargs,
        )
        return out, None


def apply_layer_shapes(model: nn.Module, spec: dict) -> None:
    """Give every decoder layer of ``model`` the shapes recorded in ``spec``."""
    config = model.config
    d = config.hidden_size
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = PrunedPhi3Attention.empty(
            config,
            i,
            spec["num_heads"][i],
            spec["num_kv_heads"][i],
            spec["kv_index"][i],
            bool(spec["o_bias"][i]),
        )
        inter = spec["intermediate_size"][i]
        layer.mlp.gate_up_proj = nn.Linear(d, 2 * inter, bias=False)
        layer.mlp.down_proj = nn.Linear(inter, d, bias=bool(spec["down_bias"][i]))


class PrunekitPhi3ForCausalLM(Phi3ForCausalLM):
    """A Phi-3 causal LM whose layers have the per-layer shapes of ``config.prunekit_layers``."""

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
