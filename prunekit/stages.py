"""What the runner's stages hand each other: the load stage's result (:class:`Loaded`), read
by the pruning, timing, evaluation and writing stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.components import ModelAdapter


@dataclass
class Loaded:
    """The load stage's result: the dense model, its tokenizer and adapter, provenance."""

    model: torch.nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    info: dict
    params: int
    timings: dict = field(default_factory=dict)
    #: MACs per token of the LM head, taken before pruning (see :func:`head_macs`)
    head_macs: float = 0.0
