"""Phi-3 as llama.cpp's ``phi3`` architecture reads it, for ``prunekit export``
(:func:`phi3_gguf_model`).

llama.cpp's conventions for ``phi3`` (its ``conversion/phi.py`` and ``src/models/phi3.cpp``;
facts, not code, carried over):

* per block ``attn_norm``, a fused ``attn_qkv`` (q rows, then k, then v, as ``qkv_proj``),
  ``attn_output``, ``ffn_norm``, ``ffn_up`` holding gate then up (``gate_up_proj`` as it is;
  llama.cpp's SwiGLU takes the first half as the gate) and ``ffn_down``; no biases;
* RoPE rotates halves as Hugging Face does (no reordering of q/k rows), on the first
  ``rope.dimension_count`` dims of each head (``partial_rotary_factor``);
* long-rope: ``rope_factors_long`` / ``rope_factors_short`` tensors (one factor per rotated
  pair), ``rope.scaling.original_context_length`` and ``rope.scaling.attn_factor`` (the cos/sin
  scale transformers computes, read from the model's rotary embedding);
* query head ``h`` attends with K/V head ``h // (n_head / n_head_kv)``; one head count, K/V head
  count and FFN width for every layer (read from layer 0), and ``attn_qkv``'s q part and
  ``attn_output`` sized by the hidden size: ``n_head * head_dim == hidden_size``.

**What exports.** One MLP width in every layer (skip_layers: [] with the uniform allocator),
no compensation bias, SiLU, no sliding window shorter than the context. Pruned query heads
cannot be held as fewer heads (llama.cpp sizes q and the output projection by the hidden
size), so they are restored as zero heads, exactly: a zero head's q rows and output columns
are zero and its output adds exactly nothing. Each K/V group is filled to ``n_head / n_head_kv``
query heads that way, and with MHA a pruned head's K/V rows are zero too. The attention then
has the dense model's size in the file (``legalization`` reports the zero heads and the
parameters they add); the MLP keeps its pruned width.

**Long-rope factors.** transformers picks the long factors when a forward's longest position
exceeds ``original_max_position_embeddings``, llama.cpp when its context size (``n_ctx``,
rounded up to a multiple of 256) does: the two agree when the context and the sequences are
on the same side of it.
"""

from __future__ import annotations

import torch

from prunekit.errors import ExportError
from prunekit.export.gguf import GgufModel, GgufTensor


def _refuse_before_shapes(config) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ExportError(
            f"hidden_act is {act!r}: llama.cpp's phi3 architecture computes SwiGLU (SiLU "
            "gate), so the exported model would compute another function"
        )
    window = getattr(config, "sliding_window", None)
    if window is not None and window < getattr(config, "max_position_embeddings", window):
        raise ExportError(
            f"the model attends within a sliding window of {window} tokens, which llama.cpp's "
            "phi3 architecture does not apply (it disables Phi-3's window and would attend to "
            f"every earlier token past {window}); a model whose config has sliding_window: "
            "null, or a window no shorter than max_position_embeddings, exports"
        )


def _rope(adapter) -> tuple[dict, list[GgufTensor]]:
    """llama.cpp's RoPE keys and long-rope factor tensors for the model's rotary embedding."""
    config = adapter.model.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    hd = adapter.layers()[0].head_dim
    n_rot = int(hd * params.get("partial_rotary_factor", 1.0))
    fields: dict = {
        "rope_dimension_count": n_rot,
        "rope_freq_base": float(params.get("rope_theta", 10000.0)),
    }
    tensors: list[GgufTensor] = []
    if kind == "default":
        return fields, tensors
    if kind != "longrope":
        raise ExportError(f"RoPE scaling {kind!r} has no llama.cpp phi3 export (default, longrope)")
    short, long = params.get("short_factor"), params.get("long_factor")
    if not short or not long or len(short) != n_rot // 2 or len(long) != n_rot // 2:
        raise ExportError(
            f"long-rope needs short_factor and long_factor of {n_rot // 2} entries each "
            f"(one per rotated pair of the {n_rot} rotated dims)"
        )
    fields["rope_scaling_orig_ctx_len"] = int(params["original_max_position_embeddings"])
    fields["rope_scaling_attn_factors"] = float(adapter.model.model.rotary_emb.attention_scaling)
    tensors += [
        GgufTensor("rope_factors_long.weight", torch.tensor(long, dtype=torch.float32), False),
        GgufTensor("rope_factors_short.weight", torch.tensor(short, dtype=torch.float32), False),
    ]
    return fields, tensors


def _zero_bias_or_refuse(linear, where: str) -> None:
    b = linear.bias
    if b is not None and bool(b.detach().abs().any()):
        raise ExportError(
            f"{where} has a bias (a compensation bias: flap), and llama.cpp's phi3 "
            "architecture reads none; a method without bias compensation (wanda-sp, "
            "llm-pruner, pp-calib) exports"
        )


def _padded_attention(la, n_head: int, n_kv: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attn_qkv, attn_output)`` of layer ``la`` with ``n_head`` query heads over ``n_kv``
    K/V heads in equal consecutive groups: each kept head in a slot of its K/V head's group,
    the other slots zero heads, missing K/V heads zero."""
    hd, g = la.head_dim, n_head // n_kv
    qkv, o = la.attn.qkv_proj.weight.detach(), la.attn.o_proj.weight.detach()
    h_now, kv_now = la.num_heads, la.num_kv_heads
    kv_of = la.kv_heads_of(torch.arange(h_now)).tolist() if h_now else []
    slots: list[int | None] = [None] * n_head
    filled = [0] * n_kv
    for h, j in enumerate(kv_of):
        if filled[j] == g:
            raise ExportError(
                f"layer {la.index}: {filled[j] + 1} query heads read K/V head {j}, more than "
                f"the {g} a group of llama.cpp's phi3 holds"
            )
        slots[j * g + filled[j]] = h
        filled[j] += 1
    zero = qkv.new_zeros(hd, d)
    q = [zero if h is None else qkv[h * hd : (h + 1) * hd] for h in slots]
    k0, v0 = h_now * hd, (h_now + kv_now) * hd
    k = [qkv[k0 + j * hd : k0 + (j + 1) * hd] if j < kv_now else zero for j in range(n_kv)]
    v = [qkv[v0 + j * hd : v0 + (j + 1) * hd] if j < kv_now else zero for j in range(n_kv)]
    cols = o.new_zeros(d, hd)
    out = [cols if h is None else o[:, h * hd : (h + 1) * hd] for h in slots]
    return torch.cat(q + k + v), torch.cat(out, 1)


def phi3_gguf_model(adapter) -> GgufModel:
    """A Phi-3 model as llama.cpp's ``phi3`` architecture reads it (see the module docstring
    for what exports and how pruned heads are held); every refusal is raised before any
    tensor is built."""
    model = adapter.model
    config = model.config
    layers = adapter.layers()
    _refuse_before_shapes(config)
    head_dims = {la.head_dim for la in layers}
    if len(head_dims) != 1:
        raise ExportError(f"layers have different head sizes {sorted(head_dims)}")
    hd = head_dims.pop()
    d = config.hidden_size
    if d % hd:
        raise ExportError(
            f"the head size {hd} does not divide the hidden size {d}: llama.cpp's phi3 sizes "
            "the query heads by the hidden size"
        )
    n_head = d // hd
    widths = sorted({max(la.intermediate_size, 1) for la in layers})
    if len(widths) != 1:
        per_layer = [la.intermediate_size for la in layers]
        raise ExportError(
            f"this Phi-3 has per-layer MLP widths {per_layer[:6]}"
            f"{' ...' if len(per_layer) > 6 else ''}, which llama.cpp cannot hold for Phi-3: "
            "its phi3 architecture reads one FFN width for every layer, and deci (per-layer "
            "shapes) has no partial rotary embedding or long-rope factors; prune every layer "
            "to one shape (skip_layers: [], the uniform allocator with balanced_kv: true)"
        )
    n_ff = widths[0]
    for la in layers:
        _zero_bias_or_refuse(la.attn.o_proj, f"layer {la.index}: the attention output")
        _zero_bias_or_refuse(la.mlp.down_proj, f"layer {la.index}: the MLP output")
    # the fewest K/V heads in equal groups that hold every layer's: with GQA the model's own
    # (never pruned), with pruned MHA heads the next divisor of n_head above the most kept
    stored = max(la.num_kv_heads for la in layers)
    n_kv = next(c for c in range(max(stored, 1), n_head + 1) if n_head % c == 0)
    rope_fields, rope_tensors = _rope(adapter)
    tensors: list[GgufTensor] = [
        GgufTensor("token_embd.weight", model.get_input_embeddings().weight),
        *rope_tensors,
    ]
    padded_q = padded_kv = 0
    for la in layers:
        qkv, o = _padded_attention(la, n_head, n_kv, d)
        padded_q += n_head - la.num_heads
        padded_kv += n_kv - la.num_kv_heads
        mlp = la.mlp
        gate_up, down = mlp.gate_up_proj.weight.detach(), mlp.down_proj.weight.detach()
        if la.intermediate_size == 0:  # one zero channel: its output adds nothing
            gate_up, down = gate_up.new_zeros(2, d), down.new_zeros(d, 1)
        i = la.index
        tensors += [
            GgufTensor(f"blk.{i}.attn_norm.weight", la.input_norm("attn").weight, False),
            GgufTensor(f"blk.{i}.attn_qkv.weight", qkv),
            GgufTensor(f"blk.{i}.attn_output.weight", o),
            GgufTensor(f"blk.{i}.ffn_norm.weight", la.input_norm("mlp").weight, False),
            GgufTensor(f"blk.{i}.ffn_up.weight", gate_up),
            GgufTensor(f"blk.{i}.ffn_down.weight", down),
        ]
    tensors.append(GgufTensor("output_norm.weight", model.model.norm.weight, False))
    head = model.get_output_embeddings()
    if (
        head is not None
        and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    ):
        tensors.append(GgufTensor("output.weight", head.weight))
    legalization = {}
    if padded_q or padded_kv:
        legalization = {
            "padded_query_heads": padded_q,
            "padded_kv_heads": padded_kv,
            "dropped_kv_heads": 0,
            "extra_parameters": padded_q * 2 * d * hd + padded_kv * 2 * d * hd,
            "why": "llama.cpp's phi3 holds no pruned head count: pruned heads are zero heads",
        }
    vocab = model.get_input_embeddings().weight.shape[0]
    fields = {
        "block_count": len(layers),
        "context_length": int(getattr(config, "max_position_embeddings", 4096)),
        "embedding_length": d,
        "feed_forward_length": n_ff,
        "head_count": n_head,
        "head_count_kv": n_kv,
        "key_length": hd,
        "value_length": hd,
        "layer_norm_rms_eps": float(config.rms_norm_eps),
        **rope_fields,
        "vocab_size": vocab,
    }
    return GgufModel("phi3", fields, tensors, legalization, vocab)
