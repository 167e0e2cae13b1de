"""Faults leave nothing half-done: interrupts at every stage (in a subprocess, SIGTERM and
Ctrl-C), corrupted cache entries and saved states, concurrent runs sharing a cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from prunekit.cli import main
from prunekit.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny LLaMA checkpoint, a text file and a wanda-sp recipe saving its model."""
    root = tmp_path_factory.mktemp("faults")
    tiny_llama(layers=2, seed=3).save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(0, 60, (40, 50), generator=g).tolist()
    (root / "text.txt").write_text("\n".join(" ".join(f"w{i}" for i in r) for r in rows))
    text = str(root / "text.txt")
    recipe = {
        "model": {"id": str(root / "tiny"), "dtype": "float32"},
        "method": {"name": "wanda-sp", "ratio": 0.5, "skip_layers": []},
        "calibration": {"path": text, "samples": 4, "seq_len": 16, "batch_size": 4},
        "evaluation": {
            "perplexity": [{"path": text, "seq_len": 16, "windows": 4, "batch_size": 2}]
        },
        "runtime": {"batches": 0},
        "output": {"save_model": True},
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    return root


#: stage -> the function whose first call sends the signal (what runs in that stage)
STAGES = {
    "calibration": "prunekit.calibration:_stream",
    "pruning": "prunekit_plugins.wanda_sp:WandaSpScore.prepare",
    "evaluation": "prunekit.evaluation.perplexity:perplexity",
    "saving": "prunekit.runner:_write_json",
}

FAULT = textwrap.dedent("""\
    import importlib, os, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    module_name, attr = sys.argv[1].split(":")
    sig = getattr(signal, sys.argv[2])
    module = importlib.import_module(module_name)
    owner, name = module, attr
    if "." in attr:
        cls, name = attr.split(".")
        owner = getattr(module, cls)
    original = getattr(owner, name)

    def faulty(*args, **kwargs):
        os.kill(os.getpid(), sig)  # delivered at once: raises in this thread
        return original(*args, **kwargs)

    setattr(owner, name, faulty)
    from prunekit.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def _run(args: list[str], cache: Path, fault: tuple[str, str] | None = None, **kw):
    env = {**os.environ, "PRUNEKIT_CACHE_DIR": str(cache), "PRUNEKIT_QUIET": "1"}
    if fault is None:
        cmd = [sys.executable, "-m", "prunekit.cli", *args]
    else:
        cmd = [sys.executable, "-c", FAULT, fault[0], fault[1], *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def _finish(proc) -> tuple[int, str]:
    out, err = proc.communicate(timeout=240)
    return proc.returncode, err


def _leftovers(directory: Path) -> list[str]:
    """Hidden staging directories and temporary files left in ``directory`` (recursive)."""
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.name.startswith(".") or p.suffix == ".tmp"
    )


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> dict:
    """The uninterrupted run's results."""
    cache = tmp_path_factory.mktemp("ref-cache")
    out = tmp_path_factory.mktemp("ref") / "out"
    code, err = _finish(_run(["apply", str(tiny / "r.yaml"), "-o", str(out), "-q"], cache))
    assert code == 0, err
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigterm_at_each_stage_leaves_nothing_and_the_next_run_works(
    tiny, reference, tmp_path, stage
):
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    out = work / "out"
    args = ["apply", str(tiny / "r.yaml"), "-o", str(out), "-q"]
    code, err = _finish(_run(args, cache, fault=(STAGES[stage], "SIGTERM")))
    assert code == 143, err
    assert "terminated by SIGTERM" in err and "Traceback" not in err
    assert not out.exists() and os.listdir(work) == []  # no output, no staging directory
    assert not cache.exists() or _leftovers(cache) == []  # no half-written cache entry
    code, err = _finish(_run(args, cache))
    assert code == 0, err
    again = json.loads((out / "results.json").read_text())
    assert again["metrics"] == reference["metrics"]
    assert again["structure"] == reference["structure"]


def test_ctrl_c_during_evaluation_keeps_the_previous_outputs(tiny, reference, tmp_path):
    """An interrupted re-run into an existing output directory leaves it as it was."""
    out = tmp_path / "out"
    args = ["apply", str(tiny / "r.yaml"), "-o", str(out), "-q"]
    assert _finish(_run(args, tmp_path / "cache"))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, err = _finish(_run(args, tmp_path / "cache", fault=(STAGES["evaluation"], "SIGINT")))
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert _leftovers(tmp_path) == []


def test_two_runs_sharing_a_cache_at_once_both_succeed(tiny, reference, tmp_path):
    cache = tmp_path / "cache"  # fresh: both runs compute and write the calibration entry
    procs = [
        _run(["apply", str(tiny / "r.yaml"), "-o", str(tmp_path / f"out{i}"), "-q"], cache)
        for i in range(2)
    ]
    for proc in procs:
        code, err = _finish(proc)
        assert code == 0, err
    for i in range(2):
        result = json.loads((tmp_path / f"out{i}" / "results.json").read_text())
        assert result["metrics"] == reference["metrics"]
    assert len(list((cache / "calibration").glob("*.safetensors"))) == 1
    assert _leftovers(cache) == []


# ------------------------------------------------------------------------------------------
# corrupted caches and states
# ------------------------------------------------------------------------------------------


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":  # one byte in the tensor data: the file still parses
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"not a safetensors file")


@pytest.mark.parametrize("how", ["truncate", "flip", "garbage"])
def test_a_corrupted_calibration_entry_is_rebuilt(tiny, reference, tmp_path, monkeypatch, how):
    from prunekit.runner import apply

    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    first = apply(tiny / "r.yaml", output=tmp_path / "a")
    (entry,) = (tmp_path / "cache" / "calibration").glob("*.safetensors")
    _corrupt(entry, how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = apply(tiny / "r.yaml", output=tmp_path / "b")
    assert any("calibration cache entry" in str(w.message) for w in caught)
    assert second["metrics"] == first["metrics"] == reference["metrics"]
    with warnings.catch_warnings(record=True) as caught:  # rebuilt: valid again
        warnings.simplefilter("always")
        apply(tiny / "r.yaml", output=tmp_path / "c")
    assert not any("calibration cache entry" in str(w.message) for w in caught)


def test_an_older_calibration_entry_gets_its_sha256(tiny, tmp_path, monkeypatch):
    """An entry written before the sha256 was recorded is used, and its sha256 recorded."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from prunekit.runner import apply

    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    first = apply(tiny / "r.yaml", output=tmp_path / "a")
    (entry,) = (tmp_path / "cache" / "calibration").glob("*.safetensors")
    with safe_open(str(entry), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(entry)), str(entry), metadata={"key": meta["key"]})
    assert apply(tiny / "r.yaml", output=tmp_path / "b")["metrics"] == first["metrics"]
    with safe_open(str(entry), framework="pt") as f:
        assert f.metadata()["sha256"] == meta["sha256"]


def test_an_altered_saved_state_is_refused_at_validate(tiny, tmp_path, monkeypatch, capsys):
    from prunekit.runner import apply

    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    sets = ["method.name=pp", "method.ratio=0.5"]
    apply(tiny / "r.yaml", sets, output=tmp_path / "pp")
    state = tmp_path / "pp" / "model"
    assert json.loads((state / "state.json").read_text())["state_sha256"]
    load = [*sets, f"method.state.load={state}"]
    assert main(["validate", str(tiny / "r.yaml"), *sum((["--set", s] for s in load), [])]) == 0
    _corrupt(state / "state.safetensors", "flip")
    code = main(
        [
            "apply",
            str(tiny / "r.yaml"),
            "-o",
            str(tmp_path / "x"),
            *sum((["--set", s] for s in load), []),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "sha256 differs" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    (state / "state.json").write_text("{not json")
    code = main(["validate", str(tiny / "r.yaml"), *sum((["--set", s] for s in load), [])])
    assert code == 2 and "unreadable" in capsys.readouterr().err


def test_a_damaged_converted_checkpoint_is_not_used(tmp_path, caplog):
    """The converted-model cache: the marker records each weight file's sha256; a file that
    no longer has it makes the checkpoint unusable (it is converted again), and a marker from
    before the hashes were recorded is given them."""
    from safetensors.torch import save_file

    from prunekit import loading
    from prunekit.loading import aliases

    ckpt = tmp_path / "smollm2-135m-instruct-q4_1-abc"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(ckpt / "model.safetensors"))
    (ckpt / loading.COMPLETE_MARKER).write_text("")  # an older, empty marker
    assert aliases._usable(ckpt)
    marker = json.loads((ckpt / loading.COMPLETE_MARKER).read_text())
    assert list(marker["weights_sha256"]) == ["model.safetensors"]
    assert aliases._usable(ckpt)
    _corrupt(ckpt / "model.safetensors", "flip")
    with caplog.at_level("WARNING", logger="prunekit.loading"):
        assert not aliases._usable(ckpt)
    assert "does not have the sha256 recorded at conversion" in caplog.text
    (ckpt / "model.safetensors").unlink()
    assert not aliases._usable(ckpt)  # a missing weight file
