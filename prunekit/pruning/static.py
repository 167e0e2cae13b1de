"""Static physical pruning: replace projections by smaller ``nn.Linear`` layers.

After :func:`slice_model` the model has really smaller matrices; per-layer shapes may differ
and, with GQA, the kept query heads of a layer may be unevenly spread over the KV groups: each
pruned attention module carries ``kv_index`` (the KV head each kept query head uses).
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.components import ATTN, MLP, Allocation, Method, ModelAdapter, PruneOutcome
from prunekit.hookspecs import hookimpl
from prunekit.models.pruned_llama import PrunedLlamaAttention


def _sub_linear(linear: nn.Linear, rows: torch.Tensor | None = None,
                cols: torch.Tensor | None = None) -> nn.Linear:  # fmt: skip
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        b = b.index_select(0, rows.to(w.device)) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def slice_layer(adapter_layer, kept_heads: torch.Tensor | None,
                kept_channels: torch.Tensor | None) -> None:  # fmt: skip
    """Physically prune one LLaMA-family decoder layer in place."""
    layer = adapter_layer.layer
    if kept_heads is not None:
        w = adapter_layer.attention_weights(kept_heads)
        attn = layer.self_attn
        rows = adapter_layer.unit_channels(ATTN, kept_heads.to(attn.q_proj.weight.device))
        if adapter_layer.is_gqa:
            k_proj, v_proj = attn.k_proj, attn.v_proj
            kv_index = w.kv_index
        else:
            k_proj, v_proj = _sub_linear(attn.k_proj, rows), _sub_linear(attn.v_proj, rows)
            kv_index = torch.arange(kept_heads.numel())
        base_kv = getattr(attn, "kv_index", None)
        if base_kv is not None and adapter_layer.is_gqa:  # already pruned: compose mappings
            kv_index = base_kv.index_select(0, kept_heads.to(base_kv.device))
        layer.self_attn = PrunedLlamaAttention(
            adapter_layer.config, adapter_layer.kernel.layer_idx, adapter_layer.head_dim,
            _sub_linear(attn.q_proj, rows), k_proj, v_proj,
            _sub_linear(attn.o_proj, cols=rows), kv_index,
        )  # fmt: skip
    if kept_channels is not None:
        mlp = layer.mlp
        mlp.gate_proj = _sub_linear(mlp.gate_proj, kept_channels)
        mlp.up_proj = _sub_linear(mlp.up_proj, kept_channels)
        mlp.down_proj = _sub_linear(mlp.down_proj, cols=kept_channels)


def slice_model(adapter: ModelAdapter, allocation: Allocation) -> ModelAdapter:
    """Apply ``allocation`` physically; returns a fresh adapter of the pruned model.

    When anything is pruned, every layer's attention becomes a :class:`PrunedLlamaAttention`
    (unpruned layers keep all heads, sharing their weights), so that the saved checkpoint has
    the same module layout in every layer and each layer carries its ``kv_index``.
    """
    for layer in adapter.layers():
        slice_layer(layer, allocation.kept.get((layer.index, ATTN)),
                    allocation.kept.get((layer.index, MLP)))  # fmt: skip
    if allocation.kept:
        for layer in adapter.layers():
            attn = layer.layer.self_attn
            if not isinstance(attn, PrunedLlamaAttention):
                kv_index = layer.kv_heads_of(torch.arange(layer.num_heads))
                layer.layer.self_attn = PrunedLlamaAttention(
                    layer.config, layer.kernel.layer_idx, layer.head_dim,
                    attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, kv_index,
                )  # fmt: skip
    return type(adapter)(adapter.model)


# ------------------------------------------------------------------------------------------
# Compensation bias
# ------------------------------------------------------------------------------------------


def add_output_bias(layer_adapter, group: str, bias: torch.Tensor) -> None:
    """Add ``bias`` to the output projection of ``group`` (creating the bias if absent)."""
    block = layer_adapter.layer.self_attn if group == ATTN else layer_adapter.layer.mlp
    name = "o_proj" if group == ATTN else "down_proj"
    proj: nn.Linear = getattr(block, name)
    bias = bias.to(device=proj.weight.device, dtype=proj.weight.dtype)
    if proj.bias is None:
        new = nn.Linear(proj.in_features, proj.out_features, bias=True,
                        device=proj.weight.device, dtype=proj.weight.dtype)  # fmt: skip
        with torch.no_grad():
            new.weight.copy_(proj.weight)
            new.bias.copy_(bias)
        setattr(block, name, new)
    else:
        with torch.no_grad():
            proj.bias.add_(bias)


class NoCompensation:
    """No compensation: removed channels simply vanish."""

    def __call__(self, layer, group, kept, stats):
        return None


# ------------------------------------------------------------------------------------------
# The static method driver
# ------------------------------------------------------------------------------------------


def layer_shapes(model) -> dict:
    """Per-layer shapes of a (possibly pruned) LLaMA-family model, for saving."""
    from prunekit.models.pruned_llama import PrunedLlamaAttention

    config = model.config
    spec = {k: [] for k in ("num_heads", "num_kv_heads", "kv_index", "intermediate_size",
                            "o_bias", "down_bias")}  # fmt: skip
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        hd = getattr(attn, "head_dim", config.head_dim)
        nh, nkv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        if isinstance(attn, PrunedLlamaAttention):
            kv = attn.kv_index.tolist()
        else:
            kv = [h // (nh // nkv) for h in range(nh)]
        spec["num_heads"].append(nh)
        spec["num_kv_heads"].append(nkv)
        spec["kv_index"].append(kv)
        spec["intermediate_size"].append(mlp.down_proj.in_features)
        spec["o_bias"].append(attn.o_proj.bias is not None)
        spec["down_bias"].append(mlp.down_proj.bias is not None)
    return spec


class StaticMethod(Method):
    """Decide once from calibration statistics, then prune physically (smaller ``nn.Linear``).

    Slots: ``statistic`` (what calibration collects), ``metric`` (unit scores), ``allocator``
    (kept sets per layer), ``compensator`` (optional output bias for the removed channels).
    Subclasses only set ``name`` and ``slots``; Wanda-sp, FLAP and pp-calib are built this way.
    """

    dynamic = False

    def calibrate(self, ctx) -> dict:
        """Statistics per (layer, group) that the metric and compensator read (default: the
        ``statistic`` slot over the calibration windows, cached)."""
        stat = self.components["statistic"]
        return ctx.statistics([stat])[stat.name]

    def prune(self, ctx) -> PruneOutcome:
        adapter, settings = ctx.adapter, self.settings
        allocation = Allocation()
        stats = {}
        if settings.ratio > 0:
            stats = self.calibrate(ctx)
            metric = self.components["metric"]
            skip = set(settings.skip_layers)
            scores = {}
            for layer in adapter.layers():
                if layer.index in skip:
                    continue
                for group in (ATTN, MLP):
                    scores[(layer.index, group)] = metric.prepare(layer, group)(
                        stats.get((layer.index, group), {})
                    )
            allocation = self.components["allocator"](scores, adapter, settings)
        compensator = self.components.get("compensator")
        biases = {}
        if compensator is not None:
            for (index, group), kept in allocation.kept.items():
                layer = adapter.layers()[index]
                bias = compensator(layer, group, kept, stats.get((index, group), {}))
                if bias is not None:
                    biases[(index, group)] = bias
        structure = allocation.structure(adapter)
        pruned = slice_model(adapter, allocation)
        for (index, group), bias in biases.items():
            add_output_bias(pruned.layers()[index], group, bias)
        model = ctx.model
        if allocation.kept:
            model.config.prunekit_layers = layer_shapes(model)
        params = sum(p.numel() for p in model.parameters())

        def save(path: str) -> None:
            save_pruned(model, ctx.tokenizer, path, {"method": self.name, "ratio": settings.ratio,
                                                     "structure": structure})  # fmt: skip

        return PruneOutcome(model=model, dynamic=False, structure=structure, params_kept=params,
                            save=save)  # fmt: skip


# ------------------------------------------------------------------------------------------
# Saving and reloading
# ------------------------------------------------------------------------------------------

MODELING_FILE = "modeling_prunekit_llama.py"


def _plain_config(model, spec: dict):
    """A standard LlamaConfig for ``spec`` if it has one shape for every layer and balanced KV
    groups in order (so plain ``from_pretrained`` rebuilds it), else None."""
    config = model.config
    if len({*spec["num_heads"]}) != 1 or len({*spec["intermediate_size"]}) != 1:
        return None
    if len({*spec["num_kv_heads"]}) != 1:
        return None
    nh, nkv = spec["num_heads"][0], spec["num_kv_heads"][0]
    if nh % nkv:
        return None
    if any(kv != [h // (nh // nkv) for h in range(nh)] for kv in spec["kv_index"]):
        return None
    hd = config.head_dim
    if config.hidden_size % nh:  # LlamaConfig insists on hidden_size % num_attention_heads == 0
        return None
    data = config.to_dict()
    for key in ("prunekit_layers", "auto_map", "_name_or_path"):
        data.pop(key, None)
    data.update(num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd,
                intermediate_size=spec["intermediate_size"][0],
                attention_bias=bool(config.attention_bias) or any(spec["o_bias"]),
                mlp_bias=bool(config.mlp_bias) or any(spec["down_bias"]))  # fmt: skip
    return type(config).from_dict(data)


def _plain_model(model, config):
    """A standard ``LlamaForCausalLM`` holding ``model``'s weights (zero biases where needed)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".kv_index")}
    for name, param in plain.named_parameters():
        if name not in state and name.endswith(".bias"):
            state[name] = torch.zeros(param.shape, dtype=model.dtype)
    plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    return plain.eval()


def save_pruned(model, tokenizer, path: str, provenance: dict) -> None:
    """Save a (possibly pruned) model so that it reloads everywhere.

    * one shape for every layer and balanced KV groups: a plain Hugging Face checkpoint
      (``from_pretrained(path)``, no remote code);
    * otherwise: ``config.prunekit_layers`` plus ``modeling_prunekit_llama.py`` named in
      ``auto_map``: ``from_pretrained(path, trust_remote_code=True)``, or
      :func:`load_pruned` (no remote code needed where prunekit is installed).
    """
    import json
    import shutil
    from pathlib import Path

    from prunekit import __version__
    from prunekit.models import pruned_llama

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    spec = layer_shapes(model)
    plain = _plain_config(model, spec)
    if plain is not None:
        _plain_model(model, plain).save_pretrained(out, safe_serialization=True)
        layout = "plain"
    else:
        config = model.config
        config.prunekit_layers = spec
        config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.PrunekitLlamaForCausalLM"}
        try:
            model.save_pretrained(out, safe_serialization=True)
        finally:
            del config.auto_map
        shutil.copyfile(pruned_llama.__file__, out / MODELING_FILE)
        layout = "remote_code"
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    meta = {"prunekit": __version__, "layout": layout, **provenance}
    (out / "prunekit.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def load_pruned(path, dtype=None, device: str | None = None):
    """Reload a model saved by prunekit (any per-layer shapes), without remote code."""
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from prunekit.errors import ModelError
    from prunekit.models.pruned_llama import PRUNED_LAYERS_KEY, PrunekitLlamaForCausalLM

    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{path}: no config.json; give a directory written with "
                         "output.save_model: true (its 'model' subdirectory)")  # fmt: skip
    kwargs = {} if dtype is None else {"dtype": dtype}
    if PRUNED_LAYERS_KEY in json.loads(config_path.read_text()):
        model = PrunekitLlamaForCausalLM.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


@hookimpl
def prunekit_register_compensators(register):
    register("none", NoCompensation, description="no compensation")
