"""The working directory of the tests that validate and apply whole recipes on a tiny model
(budgets, depth, sublayers, ``method.then``): a saved tiny LLaMA (GQA, 6 layers) with its
tokenizer, a local text, and recipes over them. The ``tiny_dir`` fixture (conftest.py) builds
the directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import prunekit
from prunekit.testing import tiny_llama, tiny_tokenizer


def make_tiny_dir(tmp: Path) -> Path:
    """``tmp/m`` (model and tokenizer) and ``tmp/text.txt``; returns ``tmp``."""
    tiny_llama(heads=4, kv_heads=2, layers=6, hidden=32, intermediate=96).save_pretrained(tmp / "m")
    tiny_tokenizer().save_pretrained(tmp / "m")
    (tmp / "text.txt").write_text(" ".join(f"w{i % 120 + 3}" for i in range(6000)))
    return tmp


def flow(name: str, **keys) -> str:
    """A method as a YAML flow mapping: ``{name: wanda-sp, ratio: 0.2}`` (values as written)."""
    return "{" + ", ".join([f"name: {name}", *(f"{k}: {v}" for k, v in keys.items())]) + "}"


def write_recipe(
    tmp: Path, method: str, *, samples: int = 8, windows: int = 2, save: bool = False
) -> str:
    """``tmp/r.yaml`` over the tiny directory with ``method`` (YAML after ``method:``: a flow
    mapping, or an indented block starting with a newline), output in ``tmp/run``."""
    path = tmp / "r.yaml"
    path.write_text(
        f"model: {{id: '{tmp / 'm'}'}}\n"
        f"method: {method}\n"
        f"calibration: {{path: '{tmp / 'text.txt'}', samples: {samples}, seq_len: 32}}\n"
        f"evaluation: {{perplexity: [{{path: '{tmp / 'text.txt'}', seq_len: 32, "
        f"windows: {windows}}}]}}\n"
        f"output: {{dir: '{tmp / 'run'}', save_model: {str(save).lower()}}}\n"
    )
    return str(path)


_RELOAD = """
import sys, torch, prunekit
ids = torch.load(sys.argv[1] + "/ids.pt")
with torch.no_grad():
    got = prunekit.load_pruned(sys.argv[1] + "/model")(input_ids=ids).logits
torch.save(got, sys.argv[1] + "/got.pt")
"""


def assert_reloads(recipe: str, run: Path, ids: torch.Tensor) -> None:
    """The model ``recipe`` saved under ``run/model`` (``apply`` ran) reloads in a fresh
    process (``load_pruned``) with the logits of the model ``prepare`` prunes here."""
    prepared = prunekit.prepare(recipe)
    with torch.no_grad():
        want = prepared.outcome.model(input_ids=ids).logits
    torch.save(ids, run / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(run)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(run / "got.pt"), want, atol=1e-5, rtol=0)
