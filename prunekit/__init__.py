"""prunekit: structured pruning of decoder LLMs as composable plugins.

Public API (imported lazily so that ``import prunekit`` stays cheap)::

    import prunekit
    result = prunekit.apply("recipes/pp_smollm2.yaml")             # recipe -> results dict
    outcome = prunekit.prune(model, tokenizer, method="wanda-sp", ratio=0.4)
    prepared = prunekit.prepare("recipes/pp_smollm2.yaml")        # loaded + pruned, no eval
    model = prunekit.load_pruned("runs/wanda-sp/model")          # any per-layer shapes

Plugin authors use :data:`hookimpl` (see :mod:`prunekit.hookspecs`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunekit.errors import PrunekitError
from prunekit.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "PrunekitError",
    "__version__",
    "apply",
    "hookimpl",
    "load_pruned",
    "prepare",
    "prune",
    "validate",
]

if TYPE_CHECKING:
    from prunekit.pruning.static import load_pruned
    from prunekit.runner import apply, prepare, prune, validate


def __getattr__(name: str):
    if name == "load_pruned":
        from prunekit.pruning.static import load_pruned

        return load_pruned
    if name in ("apply", "prepare", "prune", "validate"):
        from prunekit import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
