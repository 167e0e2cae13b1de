"""The plugin author's front: everything a prunekit plugin (a method, a component, an adapter,
an executor) imports, in one module.

    from prunekit.plugin import ATTN, MLP, StaticMethod, hookimpl, top_units

    class MyMethod(StaticMethod):
        name = "my-method"
        ...

    @hookimpl
    def prunekit_register_methods(register):
        register("my-method", MyMethod)

The built-in plugins import only this module (``tests/test_plugin_front.py`` checks it from
their syntax trees), so what they can do, a third-party package can do with the same imports.
:mod:`prunekit.testing` is the authors' test kit. The modules these names come from are the
engine's own and may move; the names here stay.

What it holds:

* **hooks**: :data:`hookimpl`, the marker of the hook implementations
  (:mod:`prunekit.hookspecs` lists the hooks);
* **methods**: :class:`Method`, :class:`StaticMethod` (score, allocate, slice),
  :class:`DynamicModel` and :class:`DynamicProtocol` (per-batch decisions),
  :class:`MethodSettings`, :class:`PruneOutcome`, :class:`Timers`;
* **the context** a method prunes in (:class:`PruneContext`) and the typed view of the run it
  and the class-level checks read (:class:`RunView` and its parts);
* **structure**: the unit kinds :data:`ATTN` and :data:`MLP`, :class:`Allocation`,
  :class:`UnitSlice`, and the helpers the built-ins use to choose units (:func:`top_units`,
  :func:`kept_heads`, :func:`kept_channels`, :func:`per_layer_ratio`, :func:`pooled_topk`);
* **adapters and components**: :class:`ModelAdapter`, :class:`LayerAdapter` and the component
  protocols (:class:`CalibrationStatistic`, :class:`ImportanceMetric`, :class:`Allocator`,
  :class:`Compensator`, :class:`Executor`);
* **devices**: :func:`input_device`, :func:`execution_device`, :func:`onloaded`,
  :func:`is_offloaded` (models dispatched across devices or offloaded by accelerate);
* **fine-tuning** (a method that trains, like LoRAPrune): :class:`FineTuneConfig`,
  :class:`LoraTrainer`, :func:`check_target_modules`, :data:`OVERLAP_TOKENS`;
* **budgets**: :class:`Budget` (``ctx.budget`` for a method that meets ``method.target``
  itself) and :class:`BudgetError`.
* **errors** to raise: :class:`RecipeError`, :class:`StateError`, :class:`ModelError`,
  :class:`DataError`, :class:`PluginError`, :class:`ExportError`;
* **utilities**: :func:`info` and :func:`track` (progress), :func:`sha256_file`,
  :data:`__version__`.
"""

from __future__ import annotations

from prunekit import __version__
from prunekit._files import sha256_file
from prunekit.budgets import Budget, BudgetError
from prunekit.components import (
    ATTN,
    MLP,
    Allocation,
    Allocator,
    CalibrationStatistic,
    Compensator,
    DynamicProtocol,
    Executor,
    ImportanceMetric,
    LayerAdapter,
    Method,
    MethodSettings,
    ModelAdapter,
    PruneOutcome,
    UnitSlice,
)
from prunekit.context import PruneContext
from prunekit.devices import execution_device, input_device, is_offloaded, onloaded
from prunekit.errors import (
    DataError,
    ExportError,
    ModelError,
    PluginError,
    PrunekitError,
    RecipeError,
    StateError,
)
from prunekit.hookspecs import hookimpl
from prunekit.progress import info, track
from prunekit.pruning.allocation import top_units
from prunekit.pruning.dynamic import DynamicModel, Timers
from prunekit.pruning.static import StaticMethod
from prunekit.ratios import kept_channels, kept_heads, per_layer_ratio
from prunekit.recipe import FineTuneConfig
from prunekit.recovery import OVERLAP_TOKENS, LoraTrainer, check_target_modules
from prunekit.rows import pooled_topk
from prunekit.views import (
    CalibrationView,
    EvaluationView,
    MethodView,
    ModelView,
    PerplexityView,
    RunView,
    SlotView,
)

__all__ = [
    "ATTN",
    "MLP",
    "OVERLAP_TOKENS",
    "Allocation",
    "Allocator",
    "Budget",
    "BudgetError",
    "CalibrationStatistic",
    "CalibrationView",
    "Compensator",
    "DataError",
    "DynamicModel",
    "DynamicProtocol",
    "EvaluationView",
    "Executor",
    "ExportError",
    "FineTuneConfig",
    "ImportanceMetric",
    "LayerAdapter",
    "LoraTrainer",
    "Method",
    "MethodSettings",
    "MethodView",
    "ModelAdapter",
    "ModelError",
    "ModelView",
    "PerplexityView",
    "PluginError",
    "PruneContext",
    "PruneOutcome",
    "PrunekitError",
    "RecipeError",
    "RunView",
    "SlotView",
    "StateError",
    "StaticMethod",
    "Timers",
    "UnitSlice",
    "__version__",
    "check_target_modules",
    "execution_device",
    "hookimpl",
    "info",
    "input_device",
    "is_offloaded",
    "kept_channels",
    "kept_heads",
    "onloaded",
    "per_layer_ratio",
    "pooled_topk",
    "sha256_file",
    "top_units",
    "track",
]

#: built-in architecture adapters a third-party adapter may extend (a family member that
#: differs in a detail, as IBM Granite does from LLaMA); imported when first asked for, so
#: that importing this module imports no architecture
_ADAPTER_BASES = {
    "LlamaAdapter": "prunekit.models.llama",
    "LlamaLayerAdapter": "prunekit.models.llama",
}


def __getattr__(name: str):
    module = _ADAPTER_BASES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib  # lazily: see _ADAPTER_BASES

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*__all__, *_ADAPTER_BASES])
