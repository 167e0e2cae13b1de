"""Progress display for long work (calibration, evaluation, benchmarks); silenced by --quiet."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_QUIET = os.environ.get("PRUNEKIT_QUIET", "").lower() in {"1", "true", "yes"}


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar on stderr (none when quiet or not a terminal)."""
    if _QUIET or not sys.stderr.isatty():
        yield from items
        return
    from rich.console import Console
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, total=total,
                          console=Console(stderr=True), transient=True)  # fmt: skip


def info(message: str) -> None:
    """A one-line status message on stderr (silenced by --quiet)."""
    if not _QUIET:
        print(message, file=sys.stderr, flush=True)
