"""What the run needs from the machine it runs on (memory for the weights, disk for a saved
model): checked by validate where the run happens, before any weight loads, and left to that
host by ``prunekit validate`` (which says so)."""

from __future__ import annotations

import time

import pytest

import prunekit
from prunekit import host
from prunekit.cli import main
from prunekit.loading import peek_config
from prunekit.testing import tiny_llama, tiny_tokenizer


@pytest.fixture
def tiny_dir(tmp_path):
    model = tiny_llama(layers=4)
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", sum(p.numel() for p in model.parameters())


def _recipe(tmp_path, model_dir, **output) -> str:
    path = tmp_path / "r.yaml"
    out = ", ".join(f"{k}: {str(v).lower()}" for k, v in output.items())
    path.write_text(
        f"model: {{id: '{model_dir}'}}\nmethod: {{name: dense}}\nevaluation: {{perplexity: []}}\n"
        f"output: {{dir: '{tmp_path / 'run'}'{', ' + out if out else ''}}}\n"
    )
    return str(path)


def test_the_weights_are_counted_without_loading_them(tiny_dir, tmp_path):
    path, n = tiny_dir
    config = peek_config(str(path))
    assert host.parameter_count(str(path), config) == n  # the safetensors headers
    # without weights on this machine (a hub id): built on the meta device from the config
    assert host._meta_elements(config) == n
    config.auto_map = {"AutoModelForCausalLM": "modeling_x.X"}  # remote code is never run
    assert host._meta_elements(config) is None


def test_weights_larger_than_the_machine_fail_at_validate_and_apply(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    path, n = tiny_dir
    monkeypatch.setattr(host, "memory_available", lambda device: (n, n * 3))  # 4 bytes each
    recipe = _recipe(tmp_path, path)
    start = time.perf_counter()
    code = main(["apply", recipe, "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{recipe}:1: model.id: the weights alone need" in err
    assert "more than this machine (RAM and swap) has in all" in err
    assert "model.dtype" in err and not (tmp_path / "run").exists()
    assert time.perf_counter() - start < 30
    # prunekit validate leaves it to the host that runs the recipe, and says so
    assert main(["validate", recipe]) == 0
    out = capsys.readouterr().out
    assert "not checked on this machine: memory for the weights" in out
    # bfloat16 halves the need: it fits in the machine, but not in what is free now
    monkeypatch.setattr(host, "memory_available", lambda device: (n, n * 3))
    with pytest.warns(UserWarning, match="more than the .* free now"):
        prunekit.validate(recipe, ["model.dtype=bfloat16"])


def test_a_saved_model_larger_than_the_free_disk_fails_at_validate(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    path, n = tiny_dir
    monkeypatch.setattr(host, "free_disk", lambda p: n)  # float32 needs 4n bytes
    recipe = _recipe(tmp_path, path, save_model=True)
    code = main(["apply", recipe, "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "output.save_model: saving the model may need up to" in err
    assert "free" in err and not (tmp_path / "run").exists()
    # without saving the model nothing is written that large
    assert prunekit.validate(_recipe(tmp_path, path, save_model=False))
