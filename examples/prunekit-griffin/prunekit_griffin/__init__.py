"""prunekit-griffin: a prunekit plugin in its own package (a worked example for plugin authors).

It registers, through the ``prunekit`` entry-point group (``griffin = "prunekit_griffin"`` in
its ``pyproject.toml``):

* the method ``griffin`` (:class:`~prunekit_griffin.griffin.Griffin`): GRIFFIN, arXiv
  2404.01365, training-free per-prompt MLP pruning, a dynamic method deciding on the prompt;
* the probe selector ``input_norm`` (:class:`~prunekit_griffin.probes.InputNormProbe`) for the
  ``probe`` kind that the built-in ``pp`` plugin declares: ``method: {name: pp, probe:
  input_norm}`` swaps it into Probe Pruning.

It imports prunekit's plugin front only (``prunekit.plugin``) and torch; nothing from
``prunekit_plugins`` (``tests/test_plugin_front.py`` checks it).
"""

from __future__ import annotations

from prunekit.plugin import hookimpl

from .griffin import Griffin, GriffinController, griffin_keep, griffin_scores
from .probes import InputNormProbe

__all__ = [
    "Griffin",
    "GriffinController",
    "InputNormProbe",
    "griffin_keep",
    "griffin_scores",
    "prunekit_register_components",
    "prunekit_register_methods",
]


@hookimpl
def prunekit_register_methods(register):
    register("griffin", Griffin)


@hookimpl
def prunekit_register_components(register):
    # "probe" is the pp plugin's kind: register the selector only while pp is there (it is
    # built in, but can be disabled), so that disabling pp does not break this package
    if "probe" in getattr(register, "kinds", ("probe",)):
        register("probe", "input_norm", InputNormProbe)
