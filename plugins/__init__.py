"""prunekit's built-in plugins, installed as ``prunekit_plugins``.

Each sub-package is a plugin exposed through the ``prunekit`` entry-point group in
pyproject.toml, exactly like a third-party plugin; it uses only prunekit's public API.
"""
