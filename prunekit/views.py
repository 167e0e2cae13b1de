"""What a plugin may read of a run's recipe: frozen, typed views.

A method's class-level checks (``check_recipe``, ``layer_ratio``, ``check_state``) and its
:class:`~prunekit.context.PruneContext` (``ctx.run``) see a :class:`RunView`, never the
pydantic recipe. The view keeps the recipe's attribute paths for what it exposes
(``run.method.options``, ``run.calibration.seq_len``, ``run.model.id``,
``run.evaluation.perplexity[i].seq_len``, ``run.seed``), so a check written against the
recipe reads the same. It leaves out what belongs to the engine (output, runtime, sweep,
recovery, data_dir), and it cannot be changed: a plugin cannot alter the run it is checked
in. The recipe schema can then change without breaking plugins.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

#: the slot kinds the engine itself declares (plugins declare more: PP's probe, fusion...)
ENGINE_SLOTS = ("statistic", "metric", "allocator", "compensator")


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(copy.deepcopy(dict(mapping)))


@dataclass(frozen=True)
class ModelView:
    """``model``: which model, in which dtype, on which device."""

    id: str
    dtype: str
    device: str
    #: the adapter the recipe names (None: found from the model's config)
    adapter: str | None = None


@dataclass(frozen=True)
class SlotView:
    """``method.<slot>``: the component's name (None: the method's default) and options."""

    name: str | None
    options: Mapping[str, Any]


@dataclass(frozen=True)
class StateView:
    """``method.state``: a saved state to load (a directory), or None."""

    load: str | None = None


@dataclass(frozen=True)
class MethodView:
    """``method``: name, ratio, layers left dense, rounding, the method's own options and the
    slots the recipe sets."""

    name: str
    ratio: float
    skip_layers: tuple[int, ...]
    round_to: int
    #: every key that is not a fixed key or an engine slot (the method's options, and slots
    #: of kinds that plugins declare)
    options: Mapping[str, Any]
    state: StateView
    slots: Mapping[str, SlotView]

    def slot(self, kind: str) -> SlotView | None:
        """The ``method.<kind>`` section the recipe sets, or None."""
        return self.slots.get(kind)


@dataclass(frozen=True)
class CalibrationView:
    """``calibration``: the corpus (``dataset``/``split`` or ``path``) and how much of it."""

    dataset: str | None
    split: str | None
    path: str | None
    text_field: str
    samples: int
    seq_len: int
    batch_size: int
    bos: str | bool


@dataclass(frozen=True)
class PerplexityView:
    """One ``evaluation.perplexity`` entry."""

    label: str
    dataset: str | None
    split: str | None
    path: str | None
    seq_len: int
    windows: int | str
    batch_size: int
    sampling: str
    bos: str | bool
    prompt_tokens: int | None


@dataclass(frozen=True)
class EvaluationView:
    """``evaluation``: the perplexity entries (what a method may size itself by)."""

    perplexity: tuple[PerplexityView, ...]


@dataclass(frozen=True)
class RunView:
    """The part of a recipe a plugin may read (see the module's docstring)."""

    model: ModelView
    method: MethodView
    calibration: CalibrationView
    evaluation: EvaluationView
    seed: int
    #: JSON of the model, method and calibration sections as the recipe gives them: what a
    #: plugin keys its caches and checkpoints by (:meth:`identity`)
    _identity: Mapping[str, Any]

    def identity(self) -> dict[str, Any]:
        """What identifies the run's inputs (model, method, calibration), as JSON-ready data:
        a checkpoint or cache made under another identity is not this run's."""
        return copy.deepcopy(dict(self._identity))

    @classmethod
    def of(cls, recipe: Any, slot_kinds: Any = ENGINE_SLOTS) -> RunView:
        """The view of a :class:`prunekit.recipe.Recipe`.

        :param slot_kinds: the component kinds that are slots (the registry's
            ``slot_kinds()``; default: the engine's own), so that a method option is never
            taken for a slot.
        """
        m, c = recipe.method, recipe.calibration
        slots = {}
        for kind in slot_kinds:
            try:
                cfg = m.slot(kind)
            except ValueError:
                continue  # validate reports it
            if cfg is not None:
                slots[kind] = SlotView(cfg.name, _frozen(cfg.options))
        return cls(
            model=ModelView(
                recipe.model.id, recipe.model.dtype, recipe.model.device, recipe.model.adapter
            ),
            method=MethodView(
                m.name,
                m.ratio,
                tuple(m.skip_layers),
                m.round_to,
                _frozen(m.options),
                StateView(m.state.load),
                MappingProxyType(slots),
            ),
            calibration=CalibrationView(
                c.dataset, c.split, c.path, c.text_field, c.samples, c.seq_len, c.batch_size, c.bos
            ),
            evaluation=EvaluationView(
                tuple(
                    PerplexityView(
                        p.label,
                        p.dataset,
                        p.split,
                        p.path,
                        p.seq_len,
                        p.windows,
                        p.batch_size,
                        p.sampling,
                        p.bos,
                        p.prompt_tokens,
                    )
                    for p in recipe.evaluation.perplexity
                )
            ),
            seed=recipe.seed,
            _identity=_frozen(
                {
                    "model": recipe.model.model_dump(mode="json"),
                    "method": m.model_dump(mode="json"),
                    "calibration": c.model_dump(mode="json"),
                }
            ),
        )
