"""The LLaMA family (LLaMA, Mistral, Qwen2) and Gemma-3 as llama.cpp reads them, for
``prunekit export`` (:func:`llama_gguf_model`, :func:`gemma3_gguf_model`).

llama.cpp's own conventions (its ``convert_hf_to_gguf.py``; facts, not code, carried over):

* tensor names ``token_embd``, ``output_norm``, ``output`` (absent when tied to the input
  embedding) and per block ``blk.N.attn_norm``, ``attn_q/k/v/output``, ``ffn_norm``,
  ``ffn_gate/up/down``, with their optional biases;
* the ``llama`` and ``deci`` architectures rotate pairs of adjacent dimensions, Hugging Face
  rotates the two halves of each head: the q and k rows of every head are reordered
  (:func:`permute`), exactly, the same permutation for weights and biases;
* query head ``h`` attends with K/V head ``h // (n_head / n_head_kv)``: consecutive, equal
  groups;
* one shape for every layer fits the family's own architecture (``llama``; ``qwen2`` only
  unpruned, as llama.cpp's ``qwen2`` holds no pruned head count and no output biases);
  per-layer shapes use ``deci``, which reads the head count, the K/V head count and the FFN
  width per layer (``<arch>.attention.head_count`` as an array...).

**Legalization** (exact: the exported model computes the same function). A pruned GQA layer
may keep unequal numbers of query heads per K/V head (prunekit's ``kv_index``); GGUF needs
equal, consecutive groups, so every used K/V group is padded to the largest with query heads
whose q rows and o columns are zero (such a head's output is exactly zero), and K/V heads no
kept query head uses are dropped. A layer with no kept head or channel keeps one zero head
or channel (llama.cpp's attention-free and FFN-free layers drop the attention output, or its
compensation bias). The padding's cost (extra query heads, parameters) is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.errors import ExportError
from prunekit.export.gguf import GgufModel, GgufTensor


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q or k (or their bias) from Hugging Face's rotate-half layout to llama.cpp's
    pairwise one, head by head (llama.cpp's ``LlamaModel.permute``)."""
    if n_head == 0:
        return weights
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _rows(t: torch.Tensor | None, heads: list[int | None], width: int, dim: int = 0):
    """``t`` with its unit blocks (``width`` rows, or columns with ``dim=1``) reordered to
    ``heads``; None in ``heads`` is a zero block."""
    if t is None:
        return None
    parts = []
    for h in heads:
        if h is None:
            shape = list(t.shape)
            shape[dim] = width
            parts.append(t.new_zeros(shape))
        else:
            parts.append(t.narrow(dim, h * width, width))
    if not parts:
        shape = list(t.shape)
        shape[dim] = 0
        return t.new_zeros(shape)
    return torch.cat(parts, dim)


def _rope_fields(config) -> tuple[dict, list[GgufTensor]]:
    """llama.cpp's RoPE keys (and the llama3 frequency factors) for ``config``."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    fields: dict = {"rope_freq_base": float(theta)}
    tensors: list[GgufTensor] = []
    if kind == "default":
        return fields, tensors
    if kind == "linear":
        from gguf import RopeScalingType

        fields["rope_scaling_type"] = RopeScalingType.LINEAR
        fields["rope_scaling_factor"] = float(params["factor"])
        return fields, tensors
    if kind == "llama3":  # the frequency factors llama.cpp's converter writes
        import math

        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        freqs = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        factor = params.get("factor", 8.0)
        low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
        old = params.get("original_max_position_embeddings", 8192)
        low_wave, high_wave = old / low, old / high
        factors = []
        for f in freqs.tolist():
            wave = 2 * math.pi / f
            if wave < high_wave:
                factors.append(1.0)
            elif wave > low_wave:
                factors.append(factor)
            else:
                smooth = (old / wave - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        tensors.append(GgufTensor("rope_freqs.weight", torch.tensor(factors), quantize=False))
        return fields, tensors
    raise ExportError(
        f"RoPE scaling {kind!r} has no llama.cpp export in prunekit yet (default, "
        "linear and llama3 do)"
    )


@dataclass
class LegalLayer:
    """One decoder layer's attention and MLP in shapes llama.cpp holds (see the module
    docstring), as ``(GGUF name suffix, tensor or None, quantize)`` triples in Hugging Face's
    rotate-half layout (reordering for llama.cpp's RoPE is the caller's)."""

    n_head: int
    n_kv: int
    n_ff: int
    attention: list[tuple[str, torch.Tensor | None, bool]]
    mlp: list[tuple[str, torch.Tensor | None, bool]]
    padded: int = 0
    dropped_kv: int = 0
    extra: int = 0


def _head_dim(layers) -> int:
    head_dims = {la.head_dim for la in layers}
    if len(head_dims) != 1:
        raise ExportError(
            f"layers have different head sizes {sorted(head_dims)}; llama.cpp "
            "holds one head size per model"
        )
    return head_dims.pop()


def legal_layer(la, hd: int, d: int) -> LegalLayer:
    """``la``'s q/k/v/o and gate/up/down, legalized exactly: each used K/V group padded to the
    largest with zero query heads, unused K/V heads dropped, an empty attention or MLP kept as
    one zero head or channel."""
    a, m = la.attn, la.mlp
    n_q = a.q_proj.out_features // hd
    kv_of = la.kv_heads_of(torch.arange(n_q)).tolist() if n_q else []
    groups: dict[int, list[int]] = {}
    for h, j in enumerate(kv_of):
        groups.setdefault(j, []).append(h)
    dropped = a.k_proj.out_features // hd - len(groups)
    if groups:
        g = max(len(v) for v in groups.values())
        used: list[int | None] = sorted(groups)
        order = [h for j in used for h in groups[j] + [None] * (g - len(groups[j]))]
    else:  # every head pruned: one zero head (its output is the o bias, if any)
        used, order = [None], [None]
    pad = sum(1 for h in order if h is None)
    extra = pad * 2 * d * hd + (2 * d * hd if not groups else 0)
    attention = [
        ("attn_q.weight", _rows(a.q_proj.weight, order, hd), True),
        ("attn_q.bias", _rows(a.q_proj.bias, order, hd), False),
        ("attn_k.weight", _rows(a.k_proj.weight, used, hd), True),
        ("attn_k.bias", _rows(a.k_proj.bias, used, hd), False),
        ("attn_v.weight", _rows(a.v_proj.weight, used, hd), True),
        ("attn_v.bias", _rows(a.v_proj.bias, used, hd), False),
        ("attn_output.weight", _rows(a.o_proj.weight, order, hd, dim=1), True),
        ("attn_output.bias", a.o_proj.bias, False),
    ]
    gate, up, down = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight
    gb, ub = m.gate_proj.bias, m.up_proj.bias
    if m.down_proj.in_features == 0:  # one zero channel: its output is the down bias, if any
        gate, up, down = gate.new_zeros(1, d), up.new_zeros(1, d), down.new_zeros(d, 1)
        gb = gb.new_zeros(1) if gb is not None else None
        ub = ub.new_zeros(1) if ub is not None else None
        extra += 3 * d
    mlp = [
        ("ffn_gate.weight", gate, True),
        ("ffn_gate.bias", gb, False),
        ("ffn_up.weight", up, True),
        ("ffn_up.bias", ub, False),
        ("ffn_down.weight", down, True),
        ("ffn_down.bias", m.down_proj.bias, False),
    ]
    return LegalLayer(
        len(order), len(used), int(gate.shape[0]), attention, mlp, pad, dropped, extra
    )


def legalization_report(legal: list[LegalLayer]) -> dict:
    """What legalizing cost over the model (empty when nothing changed)."""
    padded = sum(lg.padded for lg in legal)
    dropped = sum(lg.dropped_kv for lg in legal)
    extra = sum(lg.extra for lg in legal)
    if not (padded or dropped or extra):
        return {}
    return {"padded_query_heads": padded, "dropped_kv_heads": dropped, "extra_parameters": extra}


def llama_gguf_model(
    adapter, own_arch: str = "llama", own_arch_pruned: bool = True, rotate_half: bool = False
) -> GgufModel:
    """A LLaMA-family model (any per-layer shapes) as llama.cpp reads it.

    :param own_arch: the family's llama.cpp architecture, used when every layer has one shape.
    :param own_arch_pruned: whether ``own_arch`` holds pruned shapes and output biases
        (``qwen2`` does not: it assumes ``heads * head_dim == hidden``).
    :param rotate_half: ``own_arch`` rotates halves as Hugging Face does (``qwen2``), so its
        q/k need no reordering (``deci`` always does).
    """
    model = adapter.model
    config = model.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if (
        window is not None
        and (not layer_types or "sliding_attention" in layer_types)
        and (window < getattr(config, "max_position_embeddings", window))
    ):
        raise ExportError(
            f"the model attends within a sliding window of {window} tokens, which llama.cpp's "
            "llama and deci architectures do not apply (they would attend to every earlier "
            f"token past {window}); a model whose config has sliding_window: null exports"
        )
    layers = adapter.layers()
    hd = _head_dim(layers)
    d = config.hidden_size
    legal = [legal_layer(la, hd, d) for la in layers]
    heads = [lg.n_head for lg in legal]
    kv_heads = [lg.n_kv for lg in legal]
    ffn = [lg.n_ff for lg in legal]
    layer_tensors = [
        [
            ("attn_norm.weight", la.input_norm("attn").weight, False),
            *lg.attention,
            ("ffn_norm.weight", la.input_norm("mlp").weight, False),
            *lg.mlp,
        ]
        for la, lg in zip(layers, legal, strict=True)
    ]
    uniform = len(set(zip(heads, kv_heads, ffn, strict=True))) == 1
    has_out_bias = any(
        t is not None
        for ts in layer_tensors
        for n, t, _ in ts
        if n in ("attn_output.bias", "ffn_down.bias")
    )
    dense_shape = heads[0] * hd == d
    use_own = uniform and (own_arch_pruned or (dense_shape and not has_out_bias))
    arch = own_arch if use_own else "deci"
    reorder = not (use_own and rotate_half)
    tensors: list[GgufTensor] = [
        GgufTensor("token_embd.weight", model.get_input_embeddings().weight),
    ]
    rope_fields, rope_tensors = _rope_fields(config)
    tensors += rope_tensors
    for i, (ts, n_head, n_kv) in enumerate(zip(layer_tensors, heads, kv_heads, strict=True)):
        for name, t, quantize in ts:
            if t is None:
                continue
            if reorder and name.startswith("attn_q."):
                t = permute(t, n_head)
            elif reorder and name.startswith("attn_k."):
                t = permute(t, n_kv)
            tensors.append(GgufTensor(f"blk.{i}.{name}", t, quantize))
    tensors.append(GgufTensor("output_norm.weight", model.model.norm.weight, quantize=False))
    head = model.get_output_embeddings()
    if (
        head is not None
        and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    ):
        tensors.append(GgufTensor("output.weight", head.weight))
    vocab = model.get_input_embeddings().weight.shape[0]
    fields = {
        "block_count": len(layers),
        "context_length": int(getattr(config, "max_position_embeddings", 2048)),
        "embedding_length": d,
        "feed_forward_length": ffn[0] if use_own else ffn,
        "head_count": heads[0] if use_own else heads,
        "head_count_kv": kv_heads[0] if use_own else kv_heads,
        "rope_dimension_count": hd,
        "key_length": hd,
        "value_length": hd,
        "layer_norm_rms_eps": float(config.rms_norm_eps),
        **rope_fields,
        "vocab_size": vocab,
    }
    return GgufModel(arch, fields, tensors, legalization_report(legal), vocab)


def gemma3_gguf_model(adapter) -> GgufModel:
    """A Gemma-3 (text) model as llama.cpp's ``gemma3`` architecture reads it: one head count
    and FFN width for every layer (llama.cpp's gemma3 reads layer 0's for all), its sandwich
    norms and q/k norms stored as ``1 + weight`` (Gemma's RMSNorm; llama.cpp's converter does
    the same), RoPE halves as Hugging Face rotates them (no reordering), the local RoPE base
    and the sliding window on the layers ``layer_types`` marks sliding."""
    model = adapter.model
    config = model.config
    layers = adapter.layers()
    hd = _head_dim(layers)
    d = config.hidden_size
    legal = [legal_layer(la, hd, d) for la in layers]
    shapes = {(lg.n_head, lg.n_kv, lg.n_ff) for lg in legal}
    if len(shapes) != 1:
        found = sorted(shapes)
        raise ExportError(
            f"this Gemma-3 has per-layer shapes {found[:3]}{' ...' if len(found) > 3 else ''} "
            "(query heads, K/V heads, FFN width), which llama.cpp cannot hold for Gemma-3: its "
            "gemma3 architecture reads one shape for every layer, and deci (per-layer shapes) "
            "has no Gemma-3 sandwich norms, embedding scale or sliding windows; prune every "
            "layer to one shape (skip_layers: [], the uniform allocator with balanced_kv: true)"
        )
    scalar = getattr(config, "query_pre_attn_scalar", hd)
    if scalar != hd:
        raise ExportError(
            f"query_pre_attn_scalar is {scalar}, not the head size {hd}: llama.cpp's gemma3 "
            "scales attention scores by 1/sqrt(head size) (by its model size for 27B), so the "
            "exported model would compute another function"
        )
    n_head, n_kv, n_ff = shapes.pop()
    tensors: list[GgufTensor] = [
        GgufTensor("token_embd.weight", model.get_input_embeddings().weight),
    ]

    def norm(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float() + 1.0

    for i, (la, lg) in enumerate(zip(layers, legal, strict=True)):
        layer, attn = la.layer, la.attn
        named = [
            ("attn_norm.weight", norm(layer.input_layernorm.weight), False),
            *lg.attention,
            ("attn_q_norm.weight", norm(attn.q_norm.weight), False),
            ("attn_k_norm.weight", norm(attn.k_norm.weight), False),
            ("post_attention_norm.weight", norm(layer.post_attention_layernorm.weight), False),
            ("ffn_norm.weight", norm(layer.pre_feedforward_layernorm.weight), False),
            *lg.mlp,
            ("post_ffw_norm.weight", norm(layer.post_feedforward_layernorm.weight), False),
        ]
        for name, t, quantize in named:
            if t is None:
                continue
            if name.endswith(".bias") and not bool(t.abs().any()):
                continue  # llama.cpp's gemma3 reads no biases: only zero ones may be dropped
            if name.endswith(".bias"):
                raise ExportError(
                    f"layer {i}: {name} is not zero (a compensation bias), and "
                    "llama.cpp's gemma3 architecture reads no biases"
                )
            tensors.append(GgufTensor(f"blk.{i}.{name}", t, quantize))
    tensors.append(GgufTensor("output_norm.weight", norm(model.model.norm.weight), False))
    head = model.get_output_embeddings()
    if (
        head is not None
        and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    ):
        tensors.append(GgufTensor("output.weight", head.weight))
    rope = dict(getattr(config, "rope_parameters", None) or {})
    full = rope.get("full_attention", rope)
    local = rope.get("sliding_attention", full)
    for kind, params in (("full", full), ("sliding", local)):
        if (params.get("rope_type") or "default") != "default":
            raise ExportError(
                f"Gemma-3's {kind} layers use RoPE scaling "
                f"{params.get('rope_type')!r}, which prunekit does not export yet"
            )
    types = getattr(config, "layer_types", None) or ["full_attention"] * len(layers)
    vocab = model.get_input_embeddings().weight.shape[0]
    fields = {
        "block_count": len(layers),
        "context_length": int(getattr(config, "max_position_embeddings", 2048)),
        "embedding_length": d,
        "feed_forward_length": n_ff,
        "head_count": n_head,
        "head_count_kv": n_kv,
        "key_length": hd,
        "value_length": hd,
        "layer_norm_rms_eps": float(config.rms_norm_eps),
        "rope_freq_base": float(full.get("rope_theta", 1_000_000.0)),
        "rope_freq_base_swa": float(local.get("rope_theta", 10_000.0)),
        "vocab_size": vocab,
    }
    if "sliding_attention" in types:
        fields["sliding_window"] = int(config.sliding_window)
        fields["sliding_window_pattern"] = [t == "sliding_attention" for t in types]
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        fields["final_logit_softcapping"] = float(softcap)
    return GgufModel("gemma3", fields, tensors, legalization_report(legal), vocab)
