"""User-facing errors.

Every error a user can cause (a bad recipe, a missing file, an unknown component) is a
:class:`PrunekitError`. The CLI prints its message without a traceback and exits with status 2.
Messages say what is wrong, where (file, line, key path) and how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
