"""A third-party plugin package adds a model adapter for an architecture no built-in serves.

``tests/plugin_pkgs/prunekit-granite`` is its own distribution: it registers an adapter for
IBM Granite (``GraniteForCausalLM``) through the ``prunekit`` entry-point group, using only
prunekit's public API. It is installed with pip into a temporary directory, and the checks run
in a fresh Python process with that directory on ``PYTHONPATH``, so ``importlib.metadata``
finds its entry point exactly as for an installed package. This process never imports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).parent / "plugin_pkgs" / "prunekit-granite"
SUCCESS = "THIRD-PARTY GRANITE ADAPTER OK"

#: a tiny random GraniteForCausalLM (GQA; every multiplier different from LLaMA's)
TINY_GRANITE = """
import torch
from transformers import GraniteConfig, GraniteForCausalLM


def granite_config():
    return GraniteConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        residual_multiplier=0.5, attention_multiplier=0.3, embedding_multiplier=2.0,
        logits_scaling=1.5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )


def tiny_granite(seed=0):
    config = granite_config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = GraniteForCausalLM(config)
    with torch.no_grad():  # widen the tiny random init, as prunekit.testing's builders do
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()
"""

CHECKS = (
    TINY_GRANITE
    + f"""
import prunekit
from prunekit.registry import resolve_adapter
from prunekit.testing import check_adapter

# (a) the installed plugin's adapter serves Granite
adapter = resolve_adapter(tiny_granite())
assert adapter.name == "granite", adapter.name
assert type(adapter).__module__ == "prunekit_granite", type(adapter).__module__

# (b) the conformance kit ("reload" needs modelling code, which this plugin does not ship)
check_adapter(tiny_granite, checks=("supports", "block_forward", "full_kept_set",
                                    "kept_set_zeroed", "probe", "slicing", "cost_model"))

# (c) pruning methods run on it
ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(2))
calibration = torch.randint(3, 128, (24, 16), generator=torch.Generator().manual_seed(1))
for method in ("pp", "wanda-sp"):
    batches = 2 if method == "pp" else 1  # dynamic: a second batch after a history update
    model = tiny_granite()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        outcome = prunekit.prune(model, None, method=method, ratio=0.0,
                                 calibration=calibration, skip_layers=[0])
        for _ in range(batches):
            got = outcome.model(input_ids=ids).logits
            torch.testing.assert_close(got, dense, atol=1e-5, rtol=0,
                                       msg=lambda m: method + " at ratio 0: " + m)

        full = {{"heads": 4, "channels": 96}}
        outcome = prunekit.prune(tiny_granite(), None, method=method, ratio=0.4,
                                 calibration=calibration, skip_layers=[0], round_to=1)
        structure = outcome.structure
        assert structure is not None and len(structure) == 4, (method, structure)
        assert structure[0]["heads"] == 4 and structure[0]["channels"] == 96, (method, structure)
        for row in structure[1:]:
            assert row["heads"] < full["heads"] and row["channels"] < full["channels"], (
                method, structure)
        for _ in range(batches):
            logits = outcome.model(input_ids=ids).logits
            assert logits.shape == dense.shape and torch.isfinite(logits).all(), method
    print(method, "structure at ratio 0.4:", structure)

print({SUCCESS!r})
"""
)

NO_PLUGIN = (
    TINY_GRANITE
    + """
from prunekit.errors import ModelError
from prunekit.registry import adapter_class_for

try:
    adapter_class_for(granite_config())
except ModelError as exc:
    message = str(exc)
else:
    raise SystemExit("a granite adapter resolved without the plugin installed")
assert "granite" in message and "llama" in message, message
print("NO ADAPTER:", message)
"""
)


def _run(script: str, tmp_path: Path, pythonpath: str | None = None):
    path = tmp_path / "check.py"
    path.write_text(script)
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )


@pytest.fixture(scope="module")
def granite_plugin(install_plugin_package) -> Path:
    """The plugin package installed with pip into a fresh target directory."""
    return install_plugin_package(PACKAGE_DIR)


def test_installed_plugin_adapter_runs_pp_and_wanda_sp(granite_plugin, tmp_path):
    assert "prunekit_granite" not in sys.modules  # the plugin lives in the subprocess only
    proc = _run(CHECKS, tmp_path, pythonpath=str(granite_plugin))
    assert proc.returncode == 0, (
        f"the Granite checks failed (exit code {proc.returncode}):\n{proc.stderr[-6000:]}"
    )
    assert SUCCESS in proc.stdout, proc.stdout[-3000:]


def test_without_the_plugin_granite_has_no_adapter(tmp_path):
    proc = _run(NO_PLUGIN, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "NO ADAPTER" in proc.stdout, proc.stdout
