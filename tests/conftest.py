"""Shared fixtures: real data from ../shared/data, a throwaway plugin manager."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["prunekit.testing"]

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _prunekit_env(monkeypatch, tmp_path_factory):
    """Tests read data from ../shared/data and keep caches in one session temp dir."""
    if SHARED_DATA.is_dir():
        monkeypatch.setenv("PRUNEKIT_DATA_DIR", str(SHARED_DATA))
    cache = tmp_path_factory.getbasetemp() / "prunekit-cache"
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(cache))
    monkeypatch.setenv("PRUNEKIT_QUIET", "1")
