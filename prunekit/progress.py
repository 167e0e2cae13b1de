"""Progress display for long work (calibration, evaluation, benchmarks); silenced by --quiet."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
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

    yield from rich_track(
        items, description=description, total=total, console=Console(stderr=True), transient=True
    )


@contextlib.contextmanager
def progress_bar(
    total: int, description: str, start: int = 0, every_s: float = 30.0
) -> Iterator[Callable[[int, str], None]]:
    """A progress bar with a status text (e.g. the loss) on stderr; yields ``update(done,
    status)``. Without a terminal, a line every ``every_s`` seconds and at the end; nothing
    when quiet."""
    if _QUIET:
        yield lambda done, status="": None
        return
    if not sys.stderr.isatty():
        last = [time.monotonic()]

        def log(done: int, status: str = "") -> None:
            if done >= total or time.monotonic() - last[0] >= every_s:
                last[0] = time.monotonic()
                info(f"{description}: {done}/{total} {status}".rstrip())

        yield log
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total, completed=start, status="")
        yield lambda done, status="": bar.update(task, completed=done, status=status)


def info(message: str) -> None:
    """A one-line status message on stderr (silenced by --quiet)."""
    if not _QUIET:
        print(message, file=sys.stderr, flush=True)
