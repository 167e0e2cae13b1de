"""Committed copies of sweep summaries, so that a report can be regenerated on a machine that
never ran the sweep (runs/ is not committed, and a cell costs up to an hour on 2 CPU cores).

A script that reads a sweep's ``summary.json`` calls :func:`sweep_summary`: the live file under
runs/ wins when it exists and is copied to ``benchmarks/results/sweeps/<name>.json``; without it
the committed copy is read. Either way every number in a report still comes from a sweep.
"""

from __future__ import annotations

import json
from pathlib import Path

from prunekit._files import write_atomic

SNAPSHOTS = Path(__file__).resolve().parent / "results" / "sweeps"


def snapshot_path(name: str) -> Path:
    return SNAPSHOTS / f"{name}.json"


def sweep_summary(live: Path, name: str) -> dict | None:
    """The summary at ``live`` (and refresh its committed copy), else the committed copy, else
    None."""
    snap = snapshot_path(name)
    if live.is_file():
        text = live.read_text()
        summary = json.loads(text)
        if not snap.is_file() or snap.read_text() != text:
            write_atomic(snap, text)
        return summary
    return json.loads(snap.read_text()) if snap.is_file() else None
