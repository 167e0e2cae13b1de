"""The working directory the sweep tests share (tests/test_sweep.py, tests/test_slurm.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from prunekit.testing import tiny_llama, tiny_tokenizer


def sweep_workdir(root: Path, **perplexity) -> Path:
    """Into ``root``: a tiny LLaMA (``tiny``), a copy whose weights file is corrupt
    (``broken``: its config validates, loading it fails, as a truncated download would), a
    text file and a Wanda-sp recipe on them (``r.yaml``; ``perplexity`` adds keys to its one
    perplexity evaluation). Returns ``root``."""
    tiny_llama(layers=2, seed=3).save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    shutil.copytree(root / "tiny", root / "broken")
    (root / "broken" / "model.safetensors").write_bytes(b"\0" * 64)
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(0, 60, (40, 50), generator=g).tolist()
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(f"w{i}" for i in r) for r in rows))
    recipe = {
        "model": {"id": str(root / "tiny"), "dtype": "float32"},
        "method": {"name": "wanda-sp", "ratio": 0.5, "skip_layers": []},
        "calibration": {"path": str(text), "samples": 4, "seq_len": 16, "batch_size": 4},
        "evaluation": {
            "perplexity": [
                {"path": str(text), "seq_len": 16, "windows": 4, "batch_size": 2, **perplexity}
            ]
        },
        "runtime": {"batches": 0},
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    return root
