"""Static physical pruning: replace projections by smaller ``nn.Linear`` layers, save, reload.

After :func:`slice_model` the model has really smaller matrices (each layer sliced by its
model adapter); per-layer shapes may differ and, with GQA, the kept query heads of a layer may
be unevenly spread over the KV groups. Saving asks the adapter for a standard Hugging Face
model when the shapes allow one, else writes the per-layer shapes and the adapter's
self-contained modelling file. Nothing here knows an architecture.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import torch

from prunekit.components import (  # noqa: F401 (PRUNED_LAYERS_KEY: still importable here)
    ATTN,
    MLP,
    PRUNED_LAYERS_KEY,
    Allocation,
    Method,
    ModelAdapter,
    PruneOutcome,
)
from prunekit.devices import onloaded, restored
from prunekit.errors import ModelError
from prunekit.hookspecs import hookimpl


def same_shape(model, structure: list[dict]):
    """``model`` physically sliced in place to ``structure``'s kept counts (per layer
    ``{"heads", "channels"}``, as in a result's ``structure``), keeping the first heads and
    channels of each layer: a static model of the same shapes as a dynamic method's kept sets,
    to time a dynamic method against (benchmarks). Returns ``model``."""
    from prunekit.registry import resolve_adapter

    adapter = resolve_adapter(model)
    allocation = Allocation()
    for row, layer in zip(structure, adapter.layers(), strict=True):
        if row["heads"] < layer.num_heads:
            allocation.kept[(layer.index, ATTN)] = torch.arange(row["heads"])
        if row["channels"] < layer.intermediate_size:
            allocation.kept[(layer.index, MLP)] = torch.arange(row["channels"])
    slice_model(adapter, allocation)
    return model


def slice_model(
    adapter: ModelAdapter,
    allocation: Allocation,
    biases: dict[tuple[int, str], torch.Tensor] | None = None,
) -> ModelAdapter:
    """Apply ``allocation`` physically; returns a fresh adapter of the pruned model.

    When anything is pruned, every layer is sliced (unpruned groups with ``None``), so that
    the adapter brings every layer to the same module layout and a saved checkpoint has one.

    :param biases: output biases to add after slicing (a compensator's), by (layer, group).

    A layer offloaded by accelerate is sliced on its execution device and stored again where
    it was (see :func:`prunekit.devices.restored`).
    """
    if not allocation.kept:
        return adapter
    for layer in adapter.layers():
        with restored(layer.module):
            layer.slice(
                allocation.kept.get((layer.index, ATTN)), allocation.kept.get((layer.index, MLP))
            )
    pruned = type(adapter)(adapter.model)
    for (index, group), bias in (biases or {}).items():
        layer = pruned.layers()[index]
        with restored(layer.module):
            layer.add_output_bias(group, bias)
    return pruned


class NoCompensation:
    """No compensation: removed channels simply vanish."""

    def __call__(self, layer, group, kept, stats):
        return None


# ------------------------------------------------------------------------------------------
# The static method driver
# ------------------------------------------------------------------------------------------


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
                with onloaded(layer.module):  # the metric reads the layer's weights
                    for group in layer.groups:
                        if not layer.units(group):  # a sublayer dropped before: nothing to score
                            continue
                        scores[(layer.index, group)] = metric.prepare(layer, group)(
                            stats.get((layer.index, group), {})
                        )
            allocation = self.components["allocator"](scores, adapter, settings)
        compensator = self.components.get("compensator")
        biases = {}
        if compensator is not None:
            for (index, group), kept in allocation.kept.items():
                layer = adapter.layers()[index]
                with onloaded(layer.module):
                    bias = compensator(layer, group, kept, stats.get((index, group), {}))
                if bias is not None:
                    biases[(index, group)] = bias
        return self.sliced_outcome(ctx, allocation, biases)

    def sliced_outcome(
        self, ctx, allocation: Allocation, biases: dict[tuple[int, str], torch.Tensor] | None = None
    ) -> PruneOutcome:
        """Slice ``ctx.model`` physically to ``allocation`` (adding a compensator's
        ``biases``) and return the outcome: structure, parameters kept, and a ``save`` that
        writes a checkpoint :func:`load_pruned` reloads. For methods that decide their kept
        sets their own way (e.g. during a fine-tune) and prune like every static method."""
        adapter = ctx.adapter
        structure = allocation.structure(adapter)
        pruned = slice_model(adapter, allocation, biases)
        model = ctx.model
        if allocation.kept:
            setattr(model.config, PRUNED_LAYERS_KEY, pruned.layer_shapes())
        params = sum(p.numel() for p in model.parameters())
        provenance = {"method": self.name, "ratio": self.settings.ratio, "structure": structure}
        # the dense model it came from: `prunekit export` takes a GGUF's tokenizer from there
        source = {
            k: v
            for k, v in (getattr(ctx, "model_info", None) or {}).items()
            if k in ("id", "name", "source", "gguf_file", "gguf_path", "gguf_sha256")
        }
        if source:
            provenance["source_model"] = source

        def save(path: str) -> None:
            save_pruned(type(pruned)(model), ctx.tokenizer, path, provenance)

        return PruneOutcome(
            model=model, dynamic=False, structure=structure, params_kept=params, save=save
        )


# ------------------------------------------------------------------------------------------
# Saving and reloading
# ------------------------------------------------------------------------------------------


def _resolve(model_or_adapter) -> ModelAdapter:
    if isinstance(model_or_adapter, ModelAdapter):
        return model_or_adapter
    from prunekit.registry import resolve_adapter

    return resolve_adapter(model_or_adapter)


def _modeling_class(adapter_cls: type[ModelAdapter]):
    """The module and class named by ``adapter_cls.modeling`` (``"module:Class"``)."""
    if not adapter_cls.modeling:
        raise ModelError(
            f"adapter {adapter_cls.name!r} declares no modelling code (ModelAdapter.modeling), so "
            f"a model whose layers have different shapes cannot be saved or reloaded; prune with "
            f"one shape for every layer (skip_layers: [] and a uniform allocator) to get a plain "
            f"Hugging Face checkpoint"
        )
    module_name, _, class_name = adapter_cls.modeling.partition(":")
    module = importlib.import_module(module_name)
    return module, getattr(module, class_name)


def save_pruned(model, tokenizer, path: str, provenance: dict) -> None:
    """Save a (possibly pruned) model so that it reloads everywhere.

    :param model: the model, or its :class:`~prunekit.components.ModelAdapter`.

    * the adapter can express the shapes in the architecture's own config (one shape for every
      layer, balanced KV groups...): a plain Hugging Face checkpoint
      (``from_pretrained(path)``, no remote code);
    * otherwise: ``config.prunekit_layers`` plus the adapter's self-contained modelling file,
      ``modeling_prunekit_<adapter>.py``, named in ``auto_map``:
      ``from_pretrained(path, trust_remote_code=True)``, or :func:`load_pruned` (no remote
      code: the installed prunekit's copy is used).

    ``prunekit.json`` records the layout, the adapter and ``provenance``.
    """
    from prunekit import __version__

    adapter = _resolve(model)
    model = adapter.model
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    shapes = adapter.layer_shapes()
    plain = adapter.plain_model(shapes)
    if plain is not None:
        plain.save_pretrained(out, safe_serialization=True)
        layout = "plain"
    else:
        module, cls = _modeling_class(type(adapter))
        file_name = f"modeling_prunekit_{adapter.name.replace('-', '_')}.py"
        config = model.config
        setattr(config, PRUNED_LAYERS_KEY, shapes)
        previous = getattr(config, "auto_map", None)
        config.auto_map = {
            **(previous or {}),
            "AutoModelForCausalLM": f"{file_name[:-3]}.{cls.__name__}",
        }
        try:
            model.save_pretrained(out, safe_serialization=True)
        finally:
            if previous is None:
                del config.auto_map
            else:
                config.auto_map = previous
        shutil.copyfile(module.__file__, out / file_name)
        layout = "remote_code"
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    meta = {"prunekit": __version__, "layout": layout, "adapter": adapter.name, **provenance}
    (out / "prunekit.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def _check_remote_code(path: Path, module) -> None:
    """Compare the checkpoint's ``modeling_prunekit_*.py`` (what ``from_pretrained(...,
    trust_remote_code=True)`` would run) with the installed prunekit's copy, which is what
    :func:`load_pruned` runs instead. A difference is reported, never executed: the file was
    written by another prunekit version, or edited."""
    import hashlib
    import warnings

    ours = Path(module.__file__).read_bytes()
    for candidate in sorted(path.glob("modeling_prunekit_*.py")):
        if hashlib.sha256(candidate.read_bytes()).digest() != hashlib.sha256(ours).digest():
            warnings.warn(
                f"{candidate} differs from the installed prunekit's "
                f"{Path(module.__file__).name}; load_pruned uses the installed copy and "
                "never runs the checkpoint's, but from_pretrained(..., "
                "trust_remote_code=True) would run the checkpoint's file: re-save the "
                "model with this prunekit, or inspect the file",
                UserWarning,
                stacklevel=3,
            )


def load_pruned(path, dtype=None, device: str | None = None):
    """Reload a model saved by prunekit (any per-layer shapes), without remote code.

    A checkpoint with per-layer shapes is rebuilt by the modelling class of the adapter that
    saved it (``prunekit.json``), or of the adapter that supports its config, from the
    installed prunekit: the checkpoint's own ``modeling_*.py`` is never executed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunekit.registry import adapter_class_for, adapter_order, get_registry

    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ModelError(
            f"{path}: no config.json; give a directory written with "
            "output.save_model: true (its 'model' subdirectory)"
        )
    kwargs = {} if dtype is None else {"dtype": dtype}
    if PRUNED_LAYERS_KEY in json.loads(config_path.read_text()):
        meta_path = Path(path) / "prunekit.json"
        saved_by = None
        if meta_path.is_file():
            saved_by = json.loads(meta_path.read_text()).get("adapter")
        registry = get_registry()
        if saved_by and ("adapter", saved_by) in registry:
            adapter_cls = registry.get("adapter", saved_by).factory
        else:  # the first adapter serving the config that can rebuild per-layer shapes
            config = AutoConfig.from_pretrained(path)
            adapter_cls = next(
                (
                    e.factory
                    for e in adapter_order(registry)
                    if e.factory.modeling and e.factory.supports(config)
                ),
                None,
            ) or adapter_class_for(config, registry)
        module, cls = _modeling_class(adapter_cls)
        _check_remote_code(Path(path), module)
        model = cls.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


@hookimpl
def prunekit_register_compensators(register):
    register("none", NoCompensation, description="no compensation")
