"""Building blocks for model adapters, architecture-neutral (names no architecture).

What most adapters repeat: smaller copies of ``nn.Linear`` layers, the coupled slices of a
projection, attention among a probe's tokens with their true positions, and a standard Hugging
Face model built around pruned weights. The built-in adapters use these; so can a third-party
adapter (see docs/plugins-reference.md, "The toolkit").
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.components import UnitSlice


def rows(linear: nn.Linear, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight rows, bias entries)`` of ``linear`` at ``index`` (output features)."""
    w = linear.weight.index_select(0, index)
    b = linear.bias.index_select(0, index) if linear.bias is not None else None
    return w, b


def unit_columns(weight: torch.Tensor, units: torch.Tensor, width: int) -> torch.Tensor:
    """Input columns of ``weight`` ``[out, units * width]`` owned by ``units`` (unit ``u`` owns
    columns ``u*width .. u*width+width-1``), as a contiguous ``[out, k * width]`` copy.

    The same values as ``weight.index_select(1, unit columns)``, gathered as blocks of
    ``width`` contiguous columns (a head's): several times faster than a per-column gather,
    which reads one element per column (this runs for every block of every batch).
    """
    units = units.to(weight.device)
    if width == 1:
        return weight.index_select(1, units)
    out = weight.shape[0]
    return weight.view(out, -1, width).index_select(1, units).reshape(out, -1)


def sub_linear(
    linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    """A new, smaller ``nn.Linear`` holding ``linear``'s weight at ``rows`` (output features,
    with their bias) and ``cols`` (input features; the bias is kept whole)."""
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        b = b.index_select(0, rows.to(w.device)) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    # a dropped sublayer's projection has a zero dimension: torch warns that initialising it
    # is a no-op, which is what is meant
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def linear_slices(projections: list[tuple[str, nn.Linear, int]], width: int) -> list[UnitSlice]:
    """The :class:`~prunekit.components.UnitSlice` entries of projections pruned along ``dim``
    (0: output rows, with the bias; 1: input columns), ``width`` features per unit."""
    out = []
    for name, linear, dim in projections:
        out.append(UnitSlice(f"{name}.weight", linear.weight, dim, width))
        if dim == 0 and linear.bias is not None:
            out.append(UnitSlice(f"{name}.bias", linear.bias, 0, width))
    return out


def causal_problem(config) -> str | None:
    """Why a config's attention is not the causal attention every built-in adapter's probe,
    per-row runtime and KV-cache handling assume (None when it is): ``is_causal: false``
    (transformers' mask functions read it for any decoder) or Gemma's
    ``use_bidirectional_attention`` (EmbeddingGemma)."""
    if getattr(config, "is_causal", True) is False:
        return (
            "is_causal=False: transformers builds bidirectional attention masks for this "
            "config, and prunekit's probes attend causally"
        )
    if getattr(config, "use_bidirectional_attention", False):
        return (
            "use_bidirectional_attention=True: the model attends bidirectionally, and "
            "prunekit's probes attend causally"
        )
    return None


def probe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_ids: torch.Tensor,
    token_mask: torch.Tensor | None,
    *,
    scale: float,
    kv_index: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention among a probe's tokens only, at their true positions.

    :param q: ``[b', H, t', d_h]`` queries (positional encoding already applied);
    :param k: ``[b', H_kv, t', d_h]`` keys; :param v: values like ``k``;
    :param kv_index: the K/V head of each query head (GQA, or a pruned layer's mapping), None
        when query head ``h`` reads K/V head ``h``;
    :param sliding_window: key ``j`` is seen by query ``i`` only if ``pos[i] - pos[j] < window``.
    :returns: ``[b', t', H * d_h]``: the output projection's input for the probe. Query ``i``
        attends to key ``j`` of its row when ``pos[j] <= pos[i]`` and ``j`` is a real token.
    """
    b, _, t, _ = q.shape
    if kv_index is not None:
        k, v = k.index_select(1, kv_index), v.index_select(1, kv_index)
    allowed = position_ids[:, None, :] <= position_ids[:, :, None]  # [b', t'(q), t'(k)]
    if sliding_window is not None:
        allowed = allowed & (position_ids[:, :, None] - position_ids[:, None, :] < sliding_window)
    if token_mask is not None:
        allowed = allowed & token_mask[:, None, :]
    # a query with no allowed key (a pad query) would give NaN: let it see itself
    allowed = allowed | torch.eye(t, dtype=torch.bool, device=q.device)[None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)
    return out.transpose(1, 2).reshape(b, t, -1)


def uniform_shapes(shapes: dict[str, list]) -> tuple[int, int, int] | None:
    """``(heads, kv_heads, intermediate)`` if every layer has the same shapes and its kept query
    heads are balanced over the KV heads in order (what a standard config can describe)."""
    if any(
        len(set(map(str, shapes[k]))) != 1
        for k in ("num_heads", "num_kv_heads", "intermediate_size")
    ):
        return None
    nh, nkv = shapes["num_heads"][0], shapes["num_kv_heads"][0]
    if nh % nkv:
        return None
    if any(kv != [h // (nh // nkv) for h in range(nh)] for kv in shapes["kv_index"]):
        return None
    return nh, nkv, shapes["intermediate_size"][0]


def plain_config(config, drop: tuple[str, ...] = (), **updates):
    """A copy of a Hugging Face ``config`` with ``updates``, or None when its class refuses
    them (some config classes insist on ``hidden_size % num_attention_heads == 0``)."""
    data = config.to_dict()
    for key in ("auto_map", "_name_or_path", *drop):
        data.pop(key, None)
    data.update(updates)
    try:
        return type(config).from_dict(data)
    except (ValueError, TypeError):
        return None
    except Exception as exc:  # huggingface_hub's strict config validation (transformers 5.25)
        if type(exc).__name__.startswith("StrictDataclass"):
            return None
        raise


def plain_model_from(model: nn.Module, config) -> nn.Module:
    """A standard Hugging Face model of ``config`` holding ``model``'s weights.

    Buffers the standard model does not have (``kv_index``) are dropped; a bias the standard
    model has and ``model`` lacks is filled with zeros (e.g. q/k/v biases when a compensation
    bias made the config's ``attention_bias`` true). Built on the meta device for saving: its
    non-persistent buffers (rotary ``inv_freq``) stay there, so save it and reload it rather
    than running it.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    from prunekit.devices import stored_tensor

    # offloaded weights (accelerate) are meta tensors in state_dict(): read them from their store
    state = {
        k: (stored_tensor(model, k) if v.is_meta else v)
        for k, v in model.state_dict().items()
        if not k.endswith(".kv_index")
    }
    dtype = next(model.parameters()).dtype
    for name, param in plain.named_parameters():
        if name not in state and name.endswith(".bias"):
            state[name] = torch.zeros(param.shape, dtype=dtype)
    result = plain.load_state_dict(state, strict=False, assign=True)
    unexpected = [k for k in result.unexpected_keys if not k.endswith(".kv_index")]
    missing = [k for k in result.missing_keys if k not in state]
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # tie_weights fills it
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"the standard {type(plain).__name__} does not take these weights: "
            f"unexpected {unexpected[:5]}, missing {sorted(set(missing) - tied)[:5]}"
        )
    plain.tie_weights()
    return plain.eval()
