"""`prunekit bench`: the runtime section's structure (never its values: no timed assertions)."""

import json
from pathlib import Path

import pytest

from prunekit.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "calibration.samples=4",
    "calibration.seq_len=64",
    "calibration.batch_size=4",
    "evaluation.perplexity.0.windows=4",
    "evaluation.perplexity.0.seq_len=64",
    "evaluation.perplexity.0.batch_size=2",
]


def _bench(out, *extra, sets=()):
    args = ["bench", str(ROOT / "recipes" / "pp_smollm2.yaml"), "--output", str(out), "--quiet"]
    for s in [*SMALL, *sets]:
        args += ["--set", s]
    return main([*args, *extra])


@pytest.mark.smollm2
def test_bench_writes_runtime_only(smollm2, tmp_path, capsys):
    assert _bench(tmp_path / "b", "--batches", "2", "--repeats", "3", "--warmup", "0") == 0
    result = json.loads((tmp_path / "b" / "results.json").read_text())
    assert result["metrics"] == {}  # no evaluation
    rt = result["runtime"]
    assert rt["timed_batches"] == 2 and rt["repeats"] == 3 and rt["interleaved"]
    assert len(rt["dense_s_all"]) == len(rt["pruned_s_all"]) == 6
    lo, hi = rt["speedup_spread"]  # paired per-call ratios
    kept = rt["forward_flops_kept_fraction"]  # the whole forward's, LM head included
    assert lo <= hi and rt["flop_limit"] == pytest.approx(1 / kept)
    assert kept == pytest.approx(result["reduction"]["forward_flops_kept_fraction"])
    assert 0 < kept < 1 and isinstance(rt["beyond_flop_limit"], bool)
    assert rt["batch_shape"] == [2, 64]
    assert set(rt["overhead_s_per_batch"]) >= {"probe", "score", "gather"}
    assert rt["memory"]["dense"]["param_bytes"] == rt["memory"]["pruned"]["param_bytes"]  # PP
    out = capsys.readouterr().out
    assert "time per batch" in out and "method overhead" in out and "spread" in out


def test_bench_refuses_too_few_timed_calls(tmp_path, capsys):
    assert _bench(tmp_path / "few", "--batches", "2", "--repeats", "2") == 2
    assert "4 timed calls" in capsys.readouterr().err
    assert not (tmp_path / "few").exists()


@pytest.mark.smollm2
def test_bench_static_model_has_fewer_param_bytes(smollm2, tmp_path):
    assert _bench(tmp_path / "s", "--batches", "1", sets=["method.name=wanda-sp"]) == 0
    runtime = json.loads((tmp_path / "s" / "results.json").read_text())["runtime"]
    memory = runtime["memory"]
    assert memory["pruned"]["param_bytes"] < memory["dense"]["param_bytes"]
    # a static method is timed against a dense copy, interleaved (5 rounds of one batch)
    assert runtime["interleaved"] and len(runtime["dense_s_all"]) == 5


@pytest.mark.smollm2
def test_bench_without_interleaving_says_so(smollm2, tmp_path):
    assert (
        _bench(
            tmp_path / "n",
            "--batches",
            "1",
            sets=["method.name=wanda-sp", "runtime.interleave=false"],
        )
        == 0
    )
    runtime = json.loads((tmp_path / "n" / "results.json").read_text())["runtime"]
    # dense timed before pruning, in place: not paired, and the result says so
    assert runtime["interleaved"] is False and len(runtime["dense_s_all"]) == 5


def test_bench_needs_a_perplexity_entry(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("evaluation: {perplexity: []}\n")
    assert main(["bench", str(recipe), "--output", str(tmp_path / "o")]) == 2
    assert "evaluation.perplexity" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
