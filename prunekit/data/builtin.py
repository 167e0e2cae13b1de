"""The built-in data sources, registered as a plugin like any other: the corpora of
:data:`prunekit.data.corpora.DATASETS` (kind ``corpus``) and the tasks of
:data:`prunekit.data.tasks.TASKS` (kind ``task``)."""

from __future__ import annotations

from prunekit.data.corpora import DATASETS
from prunekit.data.tasks import TASKS
from prunekit.hookspecs import hookimpl


@hookimpl
def prunekit_register_corpora(register):
    for name, info in DATASETS.items():
        register(name, info, description=info.description)


@hookimpl
def prunekit_register_tasks(register):
    for name, spec in TASKS.items():
        register(name, spec, description=spec.title)
