"""Committed copies of sweep summaries, so that a report can be regenerated on a machine that
never ran the sweep (runs/ is not committed, and a cell costs up to an hour on 2 CPU cores).

A script that reads a sweep's ``summary.json`` calls :func:`sweep_summary`: the live file under
runs/ wins when it exists and is copied to ``benchmarks/results/sweeps/<name>.json``; without it
the committed copy is read. Either way every number in a report still comes from a sweep.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

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
            snap.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=snap.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would follow the file into git
            os.replace(tmp, snap)
        return summary
    return json.loads(snap.read_text()) if snap.is_file() else None
