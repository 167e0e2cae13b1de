"""Deprecated: model loading moved to :mod:`prunekit.loading` (``prunekit.models`` holds
architectures only). This name is the same module object, for one release."""

import sys
import warnings

import prunekit.loading as _loading

warnings.warn(
    "prunekit.models.loading moved to prunekit.loading; import it from there (the old "
    "path goes in the next release)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _loading
