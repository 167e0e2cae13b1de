"""Recipes: YAML validated by a pydantic schema, ``--set a.b=c`` overrides, clear errors.

A recipe is the whole description of a run. Unknown keys are rejected (with the close match),
and every error names the file, the line and the key path. See ``docs/recipes.md`` for the
reference of every key.

Relative paths in a recipe (data files, ``data_dir``, ``output.dir``, ``method.state.load``)
are relative to the current working directory, like paths on the command line.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from prunekit.errors import RecipeError, did_you_mean

DTYPES = ("float32", "bfloat16", "float16")
#: top-level sections a recipe may leave out (None): a resolved recipe without one does not
#: spell it out, so adding such a section to prunekit changes no existing recipe's identity
OPTIONAL_SECTIONS = ("sweep", "recovery")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    id: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    attn_implementation: str | None = None
    #: the model adapter, by name (default: the first adapter that supports the model's
    #: config, third-party adapters asked before the built-in ones; see
    #: docs/plugins-reference.md, "Adapter resolution")
    adapter: str | None = None
    #: with ``device: auto``: the most memory each device may hold (GPU index, ``cpu`` or
    #: ``disk`` -> a size such as ``20GiB``, or bytes), normalised to bytes
    max_memory: dict[int | str, int | str] | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        ok = v in ("cpu", "cuda", "auto") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError("choose 'cpu', 'cuda', 'cuda:N' or 'auto'")
        return v

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, v: dict | None, info: ValidationInfo) -> dict[int | str, int] | None:
        device = info.data.get("device")
        if v is not None and device is not None and device != "auto":
            raise ValueError(
                f'applies only with model.device: auto (device_map="auto"), '
                f"not {device!r}; set model.device: auto or remove model.max_memory"
            )
        if v is None:
            return None
        return {cls._memory_device(k): cls._memory_size(k, size) for k, size in v.items()}

    _SIZE_UNITS: ClassVar[dict[str, int]] = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }

    @staticmethod
    def _memory_device(key: int | str) -> int | str:
        """A ``max_memory`` key as accelerate takes it: a GPU index (``0``, ``"cuda:0"``,
        ``"0"``), ``"cpu"`` or ``"disk"``."""
        text = str(key).strip().lower().removeprefix("cuda:")
        if text.isdigit():
            return int(text)
        if text in ("cpu", "disk"):
            return text
        raise ValueError(
            f"unknown device {key!r}: use a GPU index (0, 1, ... or cuda:N), 'cpu' or 'disk'"
        )

    @classmethod
    def _memory_size(cls, key: int | str, size: int | str) -> int:
        """A ``max_memory`` size in bytes: an integer, or a number with a unit (``20GiB``,
        ``500MB``; decimal and binary units, case-insensitive)."""
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = (match.group(2).upper() or "B") if match else ""
        if not match or unit not in cls._SIZE_UNITS:
            raise ValueError(
                f"{key}: {size!r} is not a memory size; give bytes or a number "
                "with a unit, e.g. 20GiB, 512MiB, 8GB"
            )
        return int(float(match.group(1)) * cls._SIZE_UNITS[unit])


class CalibrationConfig(_Strict):
    dataset: str | None = "c4"
    split: str | None = None
    path: str | None = None
    text_field: str = "text"
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=2)
    batch_size: int = Field(8, ge=1)
    #: start every window with the BOS token: ``auto`` when the model adapter needs it
    bos: Literal["auto"] | bool = "auto"


class SlotConfig(BaseModel):
    """``method.<slot>``: ``name`` of the component (default: the method's own), every other
    key is one of its options (e.g. ``--set method.probe.ratio_seq=0.1``)."""

    model_config = ConfigDict(extra="allow")
    name: str | None = None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StateConfig(_Strict):
    load: str | None = None


class MethodConfig(BaseModel):
    """``method``: fixed keys below, the slots, and method-specific options (e.g. ``mode``)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "dense"
    ratio: float = Field(0.0, ge=0.0, lt=1.0)
    skip_layers: list[int] = Field(default_factory=lambda: [0, 1, 2])
    round_to: int = Field(64, ge=1)
    #: a budget instead of a ratio: ``{macs: 0.6}`` (fraction of the dense decoder MACs),
    #: ``{params: 90e6}`` (parameters kept) or ``{kv_bytes_per_token: N}``; the engine finds
    #: the ratio that meets it (:mod:`prunekit.budgets`)
    target: dict[str, float] | None = None
    state: StateConfig = Field(default_factory=StateConfig)
    #: a second method applied to this one's result (a static, physically pruned model):
    #: e.g. drop attention sublayers, then width-prune what is left. Its ``target`` counts
    #: against the dense model like this one's
    then: MethodConfig | None = None
    # the engine's slot kinds; slots of kinds that plugins declare (PP's probe, fusion,
    # history...) are extra keys, read with slot()
    statistic: SlotConfig | None = None
    metric: SlotConfig | None = None
    allocator: SlotConfig | None = None
    compensator: SlotConfig | None = None

    @field_validator("skip_layers")
    @classmethod
    def _skip(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v):
            raise ValueError("layer indices must be >= 0")
        return sorted(set(v))

    @field_validator("target")
    @classmethod
    def _target(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return None
        from prunekit.budgets import TARGET_KINDS

        if len(v) != 1 or next(iter(v)) not in TARGET_KINDS:
            raise ValueError(
                f"name exactly one of {', '.join(TARGET_KINDS)} with its value, e.g. "
                f"{{macs: 0.6}}; got {v!r}"
            )
        ((kind, value),) = v.items()
        if kind == "macs" and not 0 < value <= 1:
            raise ValueError(
                f"macs is the fraction of the dense decoder MACs to keep, in (0, 1]; got {value}"
            )
        if value <= 0:
            raise ValueError(f"{kind} must be > 0, got {value}")
        return {kind: float(value)}

    @field_validator("then")
    @classmethod
    def _then_named(cls, v: MethodConfig | None) -> MethodConfig | None:
        # a stage without a name would be the default method, dense: a stage that does
        # nothing, silently (e.g. a sweep grid over method.then.ratio reaching a variant
        # that has no then)
        if v is not None and "name" not in v.model_fields_set:
            raise ValueError(
                "a method.then stage names its method, e.g. {name: wanda-sp, ratio: 0.2}; "
                f"got {v.model_dump(mode='json', exclude_unset=True)!r}"
            )
        return v

    @model_serializer(mode="wrap")
    def _omit_no_target(self, handler):
        # no target (every recipe before budgets existed) is dumped without the key, so a
        # resolved recipe, a sweep cell's key and a checkpoint's key stay what they were
        data = handler(self)
        if isinstance(data, dict):
            for key in ("target", "then"):  # keys newer than most recipes: omitted when unset
                if getattr(self, key) is None:
                    data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _target_or_ratio(self):
        if self.target is not None and "ratio" in self.model_fields_set and self.ratio > 0:
            raise ValueError(
                "set method.ratio or method.target, not both: the target decides the ratio"
            )
        return self

    @field_validator("statistic", "metric", "allocator", "compensator", mode="before")
    @classmethod
    def _slot_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @property
    def options(self) -> dict[str, Any]:
        """Every key that is not a fixed key or an engine slot: method-specific options, and
        the slots of kinds that plugins declare (``method.probe``...), which ``validate``
        tells apart with the registry."""
        return dict(self.model_extra or {})

    def slot(self, name: str) -> SlotConfig | None:
        """The ``method.<name>`` slot section (a mapping, or a component name as shorthand).

        :raises ValueError: when the key holds something else.
        """
        if name in type(self).model_fields:
            return getattr(self, name)
        raw = (self.model_extra or {}).get(name)
        if raw is None or isinstance(raw, SlotConfig):
            return raw
        if isinstance(raw, str):
            return SlotConfig(name=raw)
        if isinstance(raw, dict) and isinstance(raw.get("name", ""), (str, type(None))):
            return SlotConfig(**raw)
        raise ValueError(
            f"expected a mapping (name: and the component's options) or a "
            f"component name, got {raw!r}"
        )


class PerplexityConfig(_Strict):
    dataset: str | None = "wikitext2"
    split: str | None = None
    path: str | None = None
    text_field: str = "text"
    seq_len: int = Field(512, ge=2)
    windows: int | Literal["all"] = "all"
    batch_size: int = Field(8, ge=1)
    sampling: Literal["sequential", "random"] = "sequential"
    #: start every window with the BOS token: ``auto`` when the model adapter needs it (the
    #: reference protocol has none, which LLaMA-family models tolerate and Gemma does not)
    bos: Literal["auto"] | bool = "auto"
    #: score continuations of a prompt: the first ``prompt_tokens`` tokens of each window run
    #: first (a dynamic method decides on them), the rest continues them through the KV cache
    #: with those decisions and only its predictions are scored (None: every token is scored
    #: in one forward)
    prompt_tokens: int | None = Field(None, ge=1)

    @field_validator("windows")
    @classmethod
    def _windows(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("windows must be a positive integer or 'all'")
        return v

    @model_validator(mode="after")
    def _prompt_fits(self):
        if self.prompt_tokens is not None and self.prompt_tokens > self.seq_len - 2:
            raise ValueError(
                f"prompt_tokens {self.prompt_tokens} leaves fewer than 2 tokens of the "
                f"{self.seq_len}-token windows to continue and score; use at most "
                f"{self.seq_len - 2}, or raise seq_len"
            )
        return self

    @property
    def label(self) -> str:
        """The key of this dataset in ``results.json`` ``metrics``."""
        if self.path:
            return Path(self.path).stem.split(".")[0]
        return self.dataset if not self.split else f"{self.dataset}-{self.split}"


class TaskConfig(_Strict):
    """One entry of ``evaluation.tasks``: a built-in task (or the group ``commonsense``), or a
    user multiple-choice task from a JSON-lines file (``path``, ``context``, ``choices``,
    ``gold``). A bare string ``boolq`` is short for ``{name: boolq}``.

    The choices of a file's record are one list field (``choices: endings``), a fixed list
    for every question (``choices: [yes, no]``), or one field per choice
    (``choice_fields: [answerA, answerB, answerC]``, SocialIQA's layout; ``[sol1, sol2]``,
    PIQA's)."""

    name: str
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(20, ge=1)
    max_length: int = Field(512, ge=2)
    path: str | None = None
    context: str | None = None
    choices: str | list[str] | None = None
    #: the record's fields holding the choice texts, one per choice, in order
    choice_fields: list[str] | None = None
    gold: str | None = None
    continuation: str = " {choice}"
    gold_base: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _custom(self):
        custom = {
            "context": self.context,
            "choices": self.choices,
            "choice_fields": self.choice_fields,
            "gold": self.gold,
        }
        if self.path is None:
            given = [k for k, value in custom.items() if value is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} only apply to a task read from a file: "
                    "add `path:` (a JSON-lines file)"
                )
        else:
            if self.choices is not None and self.choice_fields is not None:
                raise ValueError(
                    "give either `choices:` (one list field, or a fixed list) or "
                    "`choice_fields:` (one field per choice), not both"
                )
            if self.choices is None and self.choice_fields is None:
                custom.pop("choice_fields")
            else:
                custom.pop("choices" if self.choices is None else "choice_fields")
            missing = [k for k, value in custom.items() if value is None]
            if missing:
                raise ValueError(
                    f"a task read from `path:` also needs {', '.join(missing)} "
                    "(the context template, the choices field or list or "
                    "choice_fields, the gold field)"
                )
            if isinstance(self.choices, list) and len(self.choices) < 2:
                raise ValueError("`choices:` as a list needs at least two choices")
            if self.choice_fields is not None and len(self.choice_fields) < 2:
                raise ValueError("`choice_fields:` needs at least two fields (one per choice)")
        return self


class LmEvalConfig(_Strict):
    """``evaluation.lm_eval``: tasks of EleutherAI's lm-evaluation-harness, by name, scored
    through the bridge (:mod:`prunekit.integrations.lm_eval`; ``pip install
    'prunekit[lm-eval]'``). A list of names is short for ``{tasks: [...]}``.

    ``include_path`` is a directory of lm-eval task configs (YAML) to add, e.g. tasks that
    read local files; ``include_defaults: false`` leaves out lm-eval's own tasks (faster to
    index). Each task's metrics are reported under ``lm_eval:<task>``."""

    tasks: list[str] = Field(min_length=1)
    include_path: str | None = None
    include_defaults: bool = True
    limit: int | None = Field(None, ge=1)
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(20, ge=1)
    max_length: int = Field(512, ge=2)

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, v):
        return {"tasks": v} if isinstance(v, list | str) else v

    @field_validator("tasks", mode="before")
    @classmethod
    def _one_name(cls, v):
        return [v] if isinstance(v, str) else v


class EvaluationConfig(_Strict):
    perplexity: list[PerplexityConfig] = Field(default_factory=lambda: [PerplexityConfig()])
    tasks: list[TaskConfig] = Field(default_factory=list)
    lm_eval: LmEvalConfig | None = None


#: the fewest timed calls per model a time is reported from (median and spread)
MIN_TIMED_CALLS = 5


class RuntimeConfig(_Strict):
    """``runtime``: dense and pruned timed in one process on the same first ``batches``
    batches of the first perplexity dataset: ``warmup`` untimed calls each, then ``repeats``
    interleaved rounds (each round times every batch once on each model, back to back), so at
    least :data:`MIN_TIMED_CALLS` timed calls per model give the median and its spread.
    ``interleave: false`` times the dense model before a static method prunes it in place
    instead of keeping a dense copy beside the pruned one (for models that do not fit twice;
    the result is then flagged as not interleaved). ``batches: 0`` skips the measurement."""

    batches: int = Field(2, ge=0)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, ge=1)
    interleave: bool = True

    @model_validator(mode="after")
    def _enough_calls(self) -> RuntimeConfig:
        calls = self.batches * self.repeats
        if self.batches and calls < MIN_TIMED_CALLS:
            need = -(-MIN_TIMED_CALLS // self.batches)
            raise ValueError(
                f"{self.batches} batch(es) x {self.repeats} round(s) = {calls} timed call(s) per "
                f"model: too few for a time with its spread; at least {MIN_TIMED_CALLS} "
                f"(set runtime.repeats: {need}, or runtime.batches: 0 to skip timing)"
            )
        return self


class FineTuneConfig(_Strict):
    """How a LoRA fine-tune runs (:class:`prunekit.recovery.LoraTrainer`): the ``recovery:``
    section's training keys, and LoRAPrune's ``method.finetune``."""

    #: optimizer steps; each sees batch_size x grad_accum windows
    steps: int = Field(200, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    #: a transformers scheduler name (linear, cosine, constant, constant_with_warmup, ...)
    scheduler: str = "linear"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    #: ``all-linear`` (every linear layer but the LM head) or module-name suffixes
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    #: save the adapters, optimizer and RNG state every N steps (0: never); a run started
    #: again with the same recipe resumes from the last one
    checkpoint_every: int = Field(50, ge=0)
    #: default: beside the output directory (``<output.dir>-recovery``, ``-loraprune``)
    checkpoint_dir: str | None = None
    #: keep the checkpoints after a finished run (default: removed once results are written)
    keep_checkpoints: bool = False

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        from transformers import SchedulerType

        names = [t.value for t in SchedulerType]
        if v not in names:
            raise ValueError(
                f"unknown scheduler {v!r}{did_you_mean(v, names)}; "
                f"transformers knows: {', '.join(names)}"
            )
        return v

    @model_validator(mode="after")
    def _check_training(self):
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError(
                "target_modules is empty: give module-name suffixes "
                "(e.g. [q_proj, v_proj]) or all-linear"
            )
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})"
            )
        return self


class KDConfig(_Strict):
    """``recovery.kd``: distillation from the dense parent (``recovery.loss: kd`` or
    ``ce+kd``; the definition is in docs/recovery.md and :func:`prunekit.recovery.kd_loss`)."""

    #: both distributions are softmax(logits / temperature); the KL is multiplied by
    #: temperature**2 (Hinton et al.), so the gradients keep their scale across temperatures
    temperature: float = 1.0
    #: the teacher's k most likely tokens per position, both distributions renormalised over
    #: them (null: the whole vocabulary); required with ``cache: true``
    top_k: int | None = Field(None, ge=1)
    #: ``loss: ce+kd`` is ``ce + weight * kd`` (with ``loss: kd`` the loss is the kd term alone)
    weight: float = 1.0
    #: run the teacher once over the recovery windows before pruning and keep only its top-k
    #: per position, so the fine-tune holds one model (default: the teacher runs beside it)
    cache: bool = False

    @field_validator("temperature")
    @classmethod
    def _positive_temperature(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(
                "the temperature divides the logits: a finite number above 0 (1.0: the "
                "plain distributions)"
            )
        return v

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0:
            raise ValueError("the weight of the kd term in ce + weight * kd: a finite number >= 0")
        return v


class RecoveryConfig(FineTuneConfig):
    """``recovery:``: LoRA fine-tuning of the pruned model, merged back into its weights (see
    docs/recovery.md). The text comes from the same sources as calibration (without a split,
    the dataset's calibration split), never from an evaluated text."""

    #: ``ce``: next-token loss; ``kd``: KL to the dense parent's distribution; ``ce+kd``:
    #: ``ce + kd.weight * kd``
    loss: Literal["ce", "kd", "ce+kd"] = "ce"
    #: the distillation settings (defaults with ``loss: kd`` or ``ce+kd`` and no ``kd``)
    kd: KDConfig | None = None

    dataset: str | None = "c4"
    split: str | None = None
    path: str | None = None
    text_field: str = "text"  # (``path`` wins over ``dataset``, as for calibration)
    #: training windows drawn from the corpus (cycled through in a seeded order)
    samples: int = Field(1000, ge=1)
    seq_len: int = Field(256, ge=2)
    bos: Literal["auto"] | bool = "auto"

    @model_validator(mode="after")
    def _check_text(self) -> RecoveryConfig:
        if self.dataset is None and self.path is None:
            raise ValueError("recovery needs a text: give recovery.dataset or recovery.path")
        return self

    @property
    def distillation(self) -> KDConfig | None:
        """The kd settings in force: None with ``loss: ce``, ``kd`` or its defaults else."""
        if self.loss == "ce":
            return None
        return self.kd if self.kd is not None else KDConfig()

    @model_serializer(mode="wrap")
    def _omit_plain_loss(self, handler):
        # ``loss: ce`` without ``kd`` (every recovery before distillation existed) is dumped
        # without the two keys, so a resolved recipe, a sweep cell's key and a checkpoint's
        # key stay what they were before the keys were added; a kd loss spells out its
        # settings (defaults included)
        data = handler(self)
        if isinstance(data, dict):
            if self.loss == "ce":
                data.pop("loss", None)
            if self.kd is None and self.loss == "ce":
                data.pop("kd", None)
            elif self.kd is None:
                data["kd"] = KDConfig().model_dump()
        return data


class OutputConfig(_Strict):
    dir: str | None = None
    save_model: bool = False
    save_predictions: bool = False  # predictions/<task>.jsonl: per question NLLs and picks


class ExecutorConfig(BaseModel):
    """``sweep.executor``: ``name`` of the executor component (``prunekit components
    executor``), every other key one of its options (e.g. ``jobs: 2`` for ``local``)."""

    model_config = ConfigDict(extra="allow")
    name: str = "local"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SweepConfig(_Strict):
    """``sweep``: what ``prunekit sweep`` runs (``prunekit apply`` ignores this section).

    The cells are the product of ``grid`` (recipe key -> values), ``variants`` (name -> a
    mapping of recipe keys to values, applied together) and ``seeds`` (``seed``, ``seed + 1``,
    ...). Each cell is one full ``apply`` in its own process.
    """

    dir: str | None = None
    #: where the cells live (default ``<dir>/cells``); sweeps that share it share their
    #: common cells, each run once
    cells: str | None = None
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seeds: int = Field(1, ge=1)
    #: results.json values to tabulate: ``wikitext2-test.ppl`` (a ``metrics`` label and key) or a
    #: dotted path into results.json (``reduction.flops_kept_fraction``); default: every
    #: perplexity, the tasks' average, the MACs kept and the speed-up when timed
    metrics: list[str] = Field(default_factory=list)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @field_validator("grid")
    @classmethod
    def _grid_values(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid key {key!r} has no values; give at least one")
            if key in ("seed", "sweep") or key.startswith("sweep."):
                raise ValueError(
                    f"grid key {key!r}: seeds are set with sweep.seeds, and a "
                    "cell has no sweep section"
                )
        return grid


class Recipe(_Strict):
    """A validated recipe (see docs/recipes.md)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    seed: int = 0
    data_dir: str | None = None
    sweep: SweepConfig | None = None
    recovery: RecoveryConfig | None = None

    def output_dir(self) -> Path:
        if self.output.dir:
            return Path(self.output.dir)
        return Path("runs") / f"{self.method.name}-r{self.method.ratio:g}"


# --------------------------------------------------------------------------------------------
# Loading, line numbers and overrides
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedRecipe:
    """A recipe with where each key came from (file line or ``--set``), for error messages."""

    recipe: Recipe
    path: Path | None = None
    lines: dict[tuple, int] = field(default_factory=dict)
    overrides: dict[tuple, str] = field(default_factory=dict)
    raw: dict = field(default_factory=dict)

    def where(self, key_path: tuple | str) -> str:
        """``file:line: a.b.c`` (or ``--set a.b=c``) for ``key_path``."""
        if isinstance(key_path, str):
            key_path = tuple(int(p) if p.isdigit() else p for p in key_path.split("."))
        dotted = ".".join(str(p) for p in key_path)
        plain = {
            tuple(p for p in k if not isinstance(p, int)): v for k, v in self.overrides.items()
        }
        # an override below this key (e.g. --set method.metric.power=2 for key method.metric)
        for path, expr in self.overrides.items():
            if len(path) > len(key_path) and tuple(path[: len(key_path)]) == tuple(key_path):
                return f"--set {expr}: {dotted}"
        for n in range(len(key_path), 0, -1):
            prefix = tuple(key_path[:n])
            if prefix in self.overrides:
                return f"--set {self.overrides[prefix]}: {dotted}"
            if tuple(p for p in prefix if not isinstance(p, int)) in plain:
                return (
                    f"--set {plain[tuple(p for p in prefix if not isinstance(p, int))]}: {dotted}"
                )
            if prefix in self.lines and self.path is not None:
                return f"{self.path}:{self.lines[prefix]}: {dotted}"
        return f"{self.path}: {dotted}" if self.path is not None else dotted

    def error(self, key_path: tuple | str, message: str) -> RecipeError:
        return RecipeError(f"{self.where(key_path)}: {message}")


#: a recipe is a small text file: larger files are refused before parsing
MAX_RECIPE_BYTES = 1 << 20
#: values a recipe may hold once YAML aliases are expanded (a few hundred bytes of nested
#: aliases can otherwise stand for hundreds of millions of values)
MAX_RECIPE_VALUES = 100_000


def _read_recipe_text(path: Path) -> str:
    if path.is_dir():
        raise RecipeError(
            f"recipe {path} is a directory; give a YAML file (recipes live in recipes/)"
        )
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found: check the path (recipes live in recipes/)")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(
                f"{path}: {size} bytes is not a recipe (a recipe is a YAML text "
                f"file of at most {MAX_RECIPE_BYTES} bytes); check the path"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"recipe {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}:{line}: not a text file (byte {exc.start} is not UTF-8); a "
            "recipe is a YAML text file"
        ) from None


def _check_expansion(node, path: Path) -> None:
    """Refuse a document whose aliases expand to more than :data:`MAX_RECIPE_VALUES` values
    (checked on the composed node graph, where aliases are shared, before anything walks the
    expanded tree)."""
    budget, stack = MAX_RECIPE_VALUES, [node] if node is not None else []
    while stack:
        n = stack.pop()
        budget -= 1
        if budget < 0:
            raise RecipeError(
                f"{path}: the recipe expands to more than {MAX_RECIPE_VALUES} values through "
                "YAML aliases (*name): nested aliases multiply; write the values out instead"
            )
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                stack += (key, value)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def _check_duplicate_keys(node, path: Path) -> None:
    """Refuse a mapping that names a key twice: YAML keeps the last value, so the first one
    would be lost without a word. Both lines are named."""
    stack = [node] if node is not None else []
    seen_nodes: set[int] = set()
    while stack:
        n = stack.pop()
        if id(n) in seen_nodes:  # an alias shares its node: check it once
            continue
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first: dict = {}
            for key_node, value_node in n.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if key is not None and key != "<<":  # "<<" merges a mapping in, by design
                    line = key_node.start_mark.line + 1
                    if key in first:
                        raise RecipeError(
                            f"{path}:{line}: key {key!r} appears twice in this mapping (first "
                            f"at line {first[key]}); YAML would keep only this one and drop the "
                            "first without a word: remove one of them"
                        )
                    first[key] = line
                stack += (key_node, value_node)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def _line_map(node, prefix: tuple = ()) -> dict[tuple, int]:
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, key_node.value)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_line_map(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = (*prefix, i)
            lines[path] = item.start_mark.line + 1
            lines.update(_line_map(item, path))
    return lines


def check_user_overrides(exprs) -> None:
    """The ``--set`` values a user gave name each key once: a key given twice would keep only
    the last value without a word. (Composed overrides, such as a sweep cell's on top of the
    user's, may repeat a key on purpose: the later wins.)"""
    first: dict[tuple, str] = {}
    for expr in exprs:
        key_path, _ = parse_override(expr)
        if key_path in first:
            raise RecipeError(
                f"--set {expr}: {'.'.join(map(str, key_path))} is already set by --set "
                f"{first[key_path]}; give each key once"
            )
        first[key_path] = expr


def parse_override(expr: str) -> tuple[tuple, Any]:
    """``"a.b=c"`` -> (("a", "b"), value), the value parsed as YAML (``0.4``, ``[1,2]``, ``true``)."""
    if "=" not in expr:
        raise RecipeError(f"--set {expr}: expected KEY=VALUE, e.g. --set method.ratio=0.4")
    key, _, text = expr.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {expr}: the key {key!r} is not a dotted key path like a.b.c")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    return path, value


def _set_path(data: dict, path: tuple, value: Any, expr: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError(
                    f"--set {expr}: no list item {part} at {'.'.join(map(str, path[:i]))}"
                )
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {expr}: {'.'.join(map(str, path[:i]))} is not a mapping")
        if node.get(part) is None:
            if part == "perplexity":
                node[part] = [{}]
            else:
                node[part] = {}
        node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError(f"--set {expr}: no list item {last}")
        node[last] = value
    elif isinstance(node, list):
        # `--set evaluation.perplexity.windows=8` applies to every entry of the list
        for j, item in enumerate(node):
            if isinstance(item, str):  # a bare task name: `{name: item}`
                node[j] = item = {"name": item}
            item[last] = value
    else:
        node[last] = value


def _schema_keys(model_cls: type[BaseModel], path: tuple) -> list[str]:
    """The allowed keys at ``path`` of the schema (for suggestions)."""
    cls: Any = model_cls
    for part in path:
        if isinstance(part, int):
            continue
        f = getattr(cls, "model_fields", {}).get(part)
        if f is None:
            return []
        ann = f.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)]
        for a in inner:
            if getattr(a, "__args__", None):
                inner.extend(x for x in a.__args__ if isinstance(x, type))
        nxt = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            args = getattr(ann, "__args__", ())
            nxt = next(
                (
                    a
                    for x in args
                    for a in getattr(x, "__args__", (x,))
                    if isinstance(a, type) and issubclass(a, BaseModel)
                ),
                None,
            )
        if nxt is None:
            return []
        cls = nxt
    return list(getattr(cls, "model_fields", {}))


def _format_validation(exc: ValidationError, loaded: LoadedRecipe) -> RecipeError:
    messages = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        # pydantic adds the union member name to the location of union errors
        loc = tuple(
            p for p in loc if not (isinstance(p, str) and p in ("int", "str", "literal['all']"))
        )
        where = loaded.where(loc)
        if err["type"] == "extra_forbidden":
            allowed = _schema_keys(Recipe, loc[:-1])
            hint = did_you_mean(loc[-1], allowed)
            messages.append(
                f"{where}: unknown key {loc[-1]!r}{hint}; allowed keys here: {', '.join(allowed)}"
            )
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            msg = err["msg"].removeprefix("Value error, ")  # our own validators' messages
            messages.append(f"{where}: {msg}{shown}")
    return RecipeError("invalid recipe:\n  " + "\n  ".join(messages))


def load_recipe(
    source: str | os.PathLike | dict | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> LoadedRecipe:
    """Read and validate a recipe from a YAML file (or a dict), applying ``--set`` overrides."""
    path: Path | None = None
    lines: dict[tuple, int] = {}
    if source is None:
        data: Any = {}
    elif isinstance(source, dict):
        data = yaml.safe_load(yaml.safe_dump(source))  # deep copy, YAML types only
    else:
        path = Path(source)
        text = _read_recipe_text(path)
        try:
            node = yaml.compose(text)
            _check_expansion(node, path)
            _check_duplicate_keys(node, path)
            data = yaml.safe_load(text)
            lines = _line_map(node) if node is not None else {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise RecipeError(f"{at}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        except RecursionError:
            raise RecipeError(f"{path}: nested too deeply to be a recipe") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'recipe'}: the top level must be a mapping of keys")
    loaded = LoadedRecipe(recipe=Recipe(), path=path, lines=lines)
    for expr in overrides:
        key_path, value = parse_override(expr)
        _set_path(data, key_path, value, expr)
        loaded.overrides[key_path] = expr
    loaded.raw = data
    try:
        loaded.recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _format_validation(exc, loaded) from None
    return loaded


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default spelled out)."""
    data = recipe.model_dump(mode="json", exclude_none=False)
    for section in OPTIONAL_SECTIONS:  # optional sections a run does not have
        if data.get(section) is None:
            data.pop(section, None)
    return yaml.safe_dump(data, sort_keys=False)
