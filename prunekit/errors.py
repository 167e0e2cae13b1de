"""User-facing errors.

Every error a user can cause (a bad recipe, a missing file, an unknown component) is a
:class:`PrunekitError`. The CLI prints its message without a traceback and exits with status 2.
Messages say what is wrong, where (file, line, key path) and how to fix it.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import signal
from collections.abc import Iterable, Iterator


class PrunekitError(Exception):
    """Base class of every error caused by user input or the environment."""

    exit_code = 2


class RecipeError(PrunekitError):
    """A recipe is invalid: unknown key, wrong type, out-of-range value, unknown component."""


class DataError(PrunekitError):
    """A dataset or data file cannot be found or read."""


class ModelError(PrunekitError):
    """A model cannot be loaded or is not supported by any adapter."""


class PluginError(PrunekitError):
    """A plugin failed to load, or two plugins registered the same component."""


class StateError(PrunekitError):
    """A saved method state or pruned checkpoint does not match the run."""


class ExportError(PrunekitError):
    """A model cannot be exported as asked: no saved model, a dynamic method, an architecture
    or shape the target engine cannot hold, an existing output, an unknown type."""


class StorageError(PrunekitError):
    """The disk refused a write: full, over quota or read-only. Not a bug of prunekit or of a
    plugin, whichever of them was writing."""


#: errno values of a disk that refuses writes, and the OS's messages for them, which libraries
#: wrapping the OSError in their own type keep (safetensors: "I/O error: No space left on
#: device (os error 28)")
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_STORAGE_MESSAGES = tuple(os.strerror(e) for e in _STORAGE_ERRNOS)


def storage_failure(exc: BaseException | None) -> str | None:
    """The OS's reason when ``exc``, or an exception it was raised from, is the disk refusing a
    write (no space, quota, read-only); else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
            return os.strerror(exc.errno)
        text = str(exc)
        for message in _STORAGE_MESSAGES:
            if message in text:
                return message
        exc = exc.__cause__ or exc.__context__
    return None


def storage_error(reason: str, stage: str) -> StorageError:
    """The user-facing error for a write the disk refused during ``stage``."""
    return StorageError(
        f"the disk refused a write during {stage} ({reason}): free some space, "
        "or point the output (--output, output.dir) and the cache "
        "(PRUNEKIT_CACHE_DIR) at a disk with room, then run again"
    )


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


class Terminated(BaseException):
    """SIGTERM (a scheduler's kill, ``kill PID``) turned into an exception, so that a run cleans
    up as on Ctrl-C: ``apply`` removes its staging directory and leaves nothing half-written.
    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` swallows it."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (in the main thread; elsewhere
    the process's handler is left alone). The CLI and sweep cells run under it."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
