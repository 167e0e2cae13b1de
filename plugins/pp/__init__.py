"""Probe Pruning (PP, ICLR 2025) as a prunekit plugin: its components and methods.

Declares the component kinds ``probe``, ``fusion`` and ``history`` (protocols in
:mod:`.protocols`). Registered: probes ``residual_rank``, ``random``, ``full_batch``; fusions
``importance_scaled``, ``fixed_ratio``, ``probe_only``, ``history_only``; histories ``ema``,
``running_mean``, ``frozen``; metric ``pp_score``; methods ``pp``, ``pp-seq``, ``pp-fullbatch``,
``pp-history``, ``pp-calib`` (static). Uses only prunekit's public API, like any third-party plugin.
"""

from __future__ import annotations

from prunekit.plugin import hookimpl

from .fusion import FixedRatio, HistoryOnly, ImportanceScaled, ProbeOnly
from .history import Ema, Frozen, RunningMean
from .method import CalibrationOnly, FullBatchProbing, ProbePruning, SequenceProbePruning
from .method import HistoryOnly as HistoryOnlyMethod
from .metric import PPScore
from .probes import FullBatch, RandomProbe, ResidualRank
from .protocols import FusionPolicy, HistoryPolicy, ProbeSelector


@hookimpl
def prunekit_register_kinds(register):
    register(
        "probe",
        ProbeSelector,
        "probe selectors: which rows and positions of a batch form the probe (dynamic methods)",
        default="residual_rank",
    )
    register(
        "fusion",
        FusionPolicy,
        "fusion policies: how probe statistics combine with the history",
        default="importance_scaled",
    )
    register(
        "history",
        HistoryPolicy,
        "history policies: how the history evolves after each batch",
        default="ema",
    )


@hookimpl
def prunekit_register_components(register):
    register("probe", "residual_rank", ResidualRank)
    register("probe", "random", RandomProbe)
    register("probe", "full_batch", FullBatch)
    register("fusion", "importance_scaled", ImportanceScaled)
    register("fusion", "fixed_ratio", FixedRatio)
    register("fusion", "probe_only", ProbeOnly)
    register("fusion", "history_only", HistoryOnly)
    register("history", "ema", Ema)
    register("history", "running_mean", RunningMean)
    register("history", "frozen", Frozen)


@hookimpl
def prunekit_register_metrics(register):
    register("pp_score", PPScore)


@hookimpl
def prunekit_register_methods(register):
    register("pp", ProbePruning)
    register("pp-seq", SequenceProbePruning)
    register("pp-fullbatch", FullBatchProbing)
    register("pp-history", HistoryOnlyMethod)
    register("pp-calib", CalibrationOnly)
