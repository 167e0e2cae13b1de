"""The context a method prunes in (:class:`PruneContext`): what a plugin may use of the run."""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit.calibration import collect_statistics
from prunekit.components import Allocation, MethodSettings, ModelAdapter
from prunekit.data import (
    calibration_windows,
    locate_calibration_corpus,
    sequence_bos,
    source_sha256,
)
from prunekit.devices import input_device
from prunekit.recipe import Recipe
from prunekit.recovery import default_checkpoint_dir, keep_out_evaluated
from prunekit.views import RunView


@dataclass
class PruneContext:
    """Everything a method may use of the run: the model, its adapter and tokenizer, the
    method's settings, a typed view of the run (:attr:`run`), calibration windows of any size,
    the statistics the method declared, the carve-out of evaluated text, the run's identity
    and checkpoint location, and the timings it may add to.

    A plugin reads the run through this context, never the recipe: ``ctx.run`` holds what
    it may read of it (:class:`prunekit.views.RunView`).
    """

    model: torch.nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    settings: MethodSettings
    #: the engine's recipe (plugins read :attr:`run` instead)
    run_recipe: Recipe
    model_info: dict = field(default_factory=dict)
    calibration_source: Any = None
    calibration_windows_override: torch.Tensor | None = None
    timings: dict = field(default_factory=dict)
    use_cache: bool = True
    #: the view of the run plugins read (built from ``run_recipe`` when not given)
    run: RunView | None = None
    #: the located perplexity corpora (the plan's), for the carve-out
    perplexity_sources: list | None = None
    #: ``method.target`` for a method that meets it itself (``Method.solves_target``): a
    #: :class:`prunekit.budgets.Budget`; None otherwise
    budget: Any = None
    _windows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.run is None:
            self.run = RunView.of(self.run_recipe)

    @property
    def recipe(self) -> Recipe:
        """Deprecated: the pydantic recipe. Read :attr:`run` (a typed view) instead."""
        warnings.warn(
            "PruneContext.recipe is deprecated and goes in the next release: read "
            "ctx.run (a typed view of the run) and the context's methods "
            "(calibration_windows, keep_out_evaluated, checkpoint_dir, identity)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.run_recipe

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    @property
    def seed(self) -> int:
        return self.run.seed

    def calibration_windows(
        self, samples: int | None = None, seq_len: int | None = None
    ) -> torch.Tensor:
        """Calibration token windows, ``[samples, seq_len]`` (default: the recipe's
        ``calibration.samples`` and ``seq_len``, drawn once per run), from the calibration
        corpus with the run's seed. Windows given as a tensor (``prunekit.prune``) are cut
        to the size asked for."""
        c = self.run.calibration
        n = c.samples if samples is None else int(samples)
        seq = c.seq_len if seq_len is None else int(seq_len)
        if self.calibration_windows_override is not None:
            if samples is None and seq_len is None:
                return self.calibration_windows_override
            return self.calibration_windows_override[:n, :seq]
        if (n, seq) == (c.samples, c.seq_len):
            if self._windows is None:
                self._windows = self._draw(n, seq)
            return self._windows
        return self._draw(n, seq)

    def _draw(self, samples: int, seq_len: int) -> torch.Tensor:
        if self.calibration_source is None:
            c = self.run.calibration
            self.calibration_source = locate_calibration_corpus(
                c.dataset, c.split, c.path, c.text_field, data_dir=self.run_recipe.data_dir
            )
        return calibration_windows(
            self.tokenizer,
            self.calibration_source,
            samples,
            seq_len,
            seed=self.run.seed,
            bos_id=self.calibration_bos_id(),
        )

    def calibration_bos_id(self) -> int | None:
        """The token every calibration window starts with (``calibration.bos``), or None."""
        return sequence_bos(self.run.calibration.bos, self.adapter, self.tokenizer)

    def calibration_key(self) -> dict | None:
        """What identifies the calibration data and model, for the statistics cache."""
        if not self.use_cache or not self.model_info.get("fingerprint"):
            return None

        c = self.run.calibration
        windows = self.calibration_windows()
        if self.calibration_windows_override is not None:
            data = {"windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()}
        else:
            data = {
                "source": self.calibration_source.location,
                "split": self.calibration_source.split,
                "sha256": source_sha256(self.calibration_source),
                "samples": c.samples,
                "seq_len": c.seq_len,
                "seed": self.run.seed,
            }
            if self.calibration_bos_id() is not None:  # only then: older keys stay valid
                data["bos"] = self.calibration_bos_id()
        return {
            "model": self.model_info["fingerprint"],
            "data": data,
            "tokenizer": getattr(self.tokenizer, "name_or_path", ""),
        }

    def statistics(self, stats=None) -> dict:
        """The calibration statistics ``stats`` (a method passes its own:
        ``ctx.statistics(self.statistics())``), collected over the calibration windows and
        cached on disk."""
        stats = list(stats or [])
        start = time.perf_counter()
        out = collect_statistics(
            self.model,
            self.adapter,
            self.calibration_windows(),
            stats,
            batch_size=self.run.calibration.batch_size,
            cache_key=self.calibration_key(),
        )
        self.timings["calibration_s"] = self.timings.get("calibration_s", 0.0) + (
            time.perf_counter() - start
        )
        return out

    def keep_out_evaluated(
        self, windows: torch.Tensor, what: str
    ) -> tuple[torch.Tensor, list[int], list[str]]:
        """The carve-out: ``windows`` minus every one that shares a run of tokens with a text
        the run evaluates (kept rows, dropped row indices, evaluated labels). Anything a
        method trains weights on goes through it; ``what`` names that step in the error
        raised when nothing is left."""
        return keep_out_evaluated(
            windows, self.run_recipe, self.tokenizer, self.perplexity_sources, what=what
        )

    def checkpoint_dir(self, what: str, explicit: str | os.PathLike | None = None) -> Path:
        """Where a step of the method (``what``) keeps checkpoints that outlive an interrupted
        run: ``explicit`` when the recipe names one, else ``<output.dir>-<what>``."""
        if explicit:
            return Path(explicit)
        return default_checkpoint_dir(self.run_recipe.output_dir(), what)

    def identity(self) -> dict:
        """What identifies the run's inputs (model, method and calibration sections), for a
        method's checkpoints and caches: one made under another identity is not this run's."""
        return self.run.identity()

    def dense_structure(self) -> list[dict]:
        return Allocation().structure(self.adapter)

    def save_hf_model(self, model, path: str) -> None:
        """Save a Hugging Face model and the tokenizer into ``path``."""
        model.save_pretrained(path, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
