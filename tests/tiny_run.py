"""The working directory of the tests that validate and apply whole recipes on a tiny model
(budgets, depth, sublayers, ``method.then``): a saved tiny LLaMA (GQA, 6 layers) with its
tokenizer, a local text, and recipes over them. The ``tiny_dir`` fixture (conftest.py) builds
the directory."""

from __future__ import annotations

from pathlib import Path

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
