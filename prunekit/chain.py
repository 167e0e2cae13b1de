"""``method.then``: a second method applied to the first one's result.

The first method must be static (it leaves a physically smaller model); the second runs on
that model with a fresh adapter, as if it were the model of the recipe: e.g. drop attention
sublayers, then width-prune what is left, or remove blocks, then prune heads and channels. A
``then`` may have its own ``then``.

What the user writes counts against the dense model: a stage's ``target: {macs: v}`` is the
fraction of the *dense* decoder MACs (the stage's cost model scales its own fractions by what
the stages before it kept, so what it reports and refuses is in the user's terms; a stage
whose target is already met prunes nothing). ``params`` and ``kv_bytes_per_token`` targets
are absolute. ``skip_layers`` and layer indices of a later stage number the layers of the
model it receives (after blocks were removed, fewer).

The outcome is the last stage's model, with the structure over the dense model's layers
(removed blocks kept as ``removed`` rows), and each stage's own ``extra`` under ``stages``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from prunekit.budgets import CostModel, cost_model, macs_seq_len
from prunekit.components import Allocation, ModelAdapter, PruneOutcome
from prunekit.evaluation.costs import structure_reduction


def stage_plan(stage, dense: ModelAdapter, structure: list[dict], seq_len: int):
    """``stage`` (a :class:`~prunekit.plan.Plan`) for the model whose structure so far over the
    dense model is ``structure``: its ``macs`` fractions (target, achieved, messages) are of the
    dense model's MACs."""
    done = structure_reduction(dense, structure, seq_len)["flops_kept_fraction"]
    return dataclasses.replace(stage, macs_scale=done)


def merged_structure(first: list[dict], later: list[dict]) -> list[dict]:
    """The structure over the dense model's layers: ``first``'s removed rows, and ``later``'s
    rows (over the layers that were left, in order) for the others."""
    rows = iter(later)
    out = []
    for row in first:
        out.append(row if row.get("removed") else {**next(rows), "layer": row["layer"]})
    return out


def dense_costs(plan, adapter: ModelAdapter, model) -> CostModel | None:
    """The dense model's cost model when ``plan`` has a ``then`` (its targets are reported
    against the dense model), else None. Taken before the first stage prunes: a cost model
    reads each layer's parameters when it is built."""
    if plan.then is None:
        return None
    return cost_model(adapter, model, macs_seq_len(plan.recipe), plan.recipe.model.dtype)


def run_then(
    plan,
    outcome: PruneOutcome,
    dense: ModelAdapter,
    costs: CostModel | None,
    prune_stage: Callable[[Any, Any, ModelAdapter], PruneOutcome],
) -> PruneOutcome:
    """Apply ``plan.then`` (and its own ``then``) to ``outcome``'s model, each stage once.

    :param dense: the adapter taken before any pruning (its dims are the dense model's).
    :param costs: :func:`dense_costs` of the plan, taken before the first stage pruned.
    :param prune_stage: ``(stage plan, model, adapter) -> outcome``: runs one stage's method
        (not its ``then``: this loop runs those) the way the caller runs a method (the
        runner, or :func:`prunekit.prune`).
    """
    seq_len = macs_seq_len(plan.recipe)
    stages = [{"method": plan.settings.name, **outcome.extra}]
    while plan.then is not None:
        first = outcome.structure or Allocation().structure(dense)
        stage = stage_plan(plan.then, dense, first, seq_len)
        model = outcome.model
        adapter = stage.adapter_cls(model) if stage.adapter_cls else type(dense)(model)
        later = prune_stage(stage, model, adapter)
        structure = merged_structure(first, later.structure or Allocation().structure(adapter))
        stages.append({"method": stage.settings.name, **later.extra})
        outcome = dataclasses.replace(later, structure=structure)
        plan = plan.then
        target = plan.recipe.method.target
        if target and costs is not None:  # what the user asked, against the dense model
            ((kind, value),) = target.items()
            achieved = costs.costs(structure)
            if outcome.params_kept is not None:
                achieved["params"] = outcome.params_kept
            outcome.extra["target"] = {
                **outcome.extra.get("target", {}),
                "value": value,
                "achieved": achieved[kind],
                "costs": achieved,
            }
    extra = {k: v for stage in stages for k, v in stage.items() if k != "method"}
    outcome.extra = {**extra, **outcome.extra, "stages": stages}
    return outcome
