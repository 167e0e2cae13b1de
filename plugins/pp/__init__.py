"""Probe Pruning (PP, ICLR 2025) as a prunekit plugin: its components and methods.

Registered: probes ``residual_rank``, ``random``, ``full_batch``; fusions
``importance_scaled``, ``fixed_ratio``, ``probe_only``, ``history_only``; histories ``ema``,
``running_mean``, ``frozen``; metric ``pp_score``; methods ``pp``, ``pp-fullbatch``,
``pp-history``, ``pp-calib`` (static). Uses only prunekit's public API, like any third-party plugin.
"""

from __future__ import annotations

from prunekit import hookimpl

from .fusion import FixedRatio, HistoryOnly, ImportanceScaled, ProbeOnly
from .history import Ema, Frozen, RunningMean
from .method import CalibrationOnly, FullBatchProbing, ProbePruning
from .method import HistoryOnly as HistoryOnlyMethod
from .metric import PPScore
from .probes import FullBatch, RandomProbe, ResidualRank


@hookimpl
def prunekit_register_probes(register):
    register("residual_rank", ResidualRank)
    register("random", RandomProbe)
    register("full_batch", FullBatch)


@hookimpl
def prunekit_register_fusions(register):
    register("importance_scaled", ImportanceScaled)
    register("fixed_ratio", FixedRatio)
    register("probe_only", ProbeOnly)
    register("history_only", HistoryOnly)


@hookimpl
def prunekit_register_histories(register):
    register("ema", Ema)
    register("running_mean", RunningMean)
    register("frozen", Frozen)


@hookimpl
def prunekit_register_metrics(register):
    register("pp_score", PPScore)


@hookimpl
def prunekit_register_methods(register):
    register("pp", ProbePruning)
    register("pp-fullbatch", FullBatchProbing)
    register("pp-history", HistoryOnlyMethod)
    register("pp-calib", CalibrationOnly)
