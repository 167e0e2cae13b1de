"""Probe Pruning on the real offline model (SmolLM2-135M-Instruct, GQA 9 heads / 3 KV)."""

import json
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.cli import main

pytestmark = pytest.mark.smollm2
ROOT = Path(__file__).resolve().parents[1]


def test_pp_at_ratio_zero_reproduces_dense_logits(smollm2):
    model = smollm2.model
    ids = torch.randint(3, 40000, (2, 48), generator=torch.Generator().manual_seed(0))
    calib = torch.randint(3, 40000, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
        outcome = prunekit.prune(
            model, smollm2.tokenizer, method="pp", ratio=0.0, calibration=calib
        )
        try:
            pruned = outcome.model(ids).logits
        finally:
            outcome.model.remove()  # the session model is shared: restore its layers
    torch.testing.assert_close(pruned, dense, atol=1e-5, rtol=0)


def test_pp_kept_counts_follow_the_spec(smollm2):
    calib = torch.randint(3, 40000, (2, 64), generator=torch.Generator().manual_seed(1))
    outcome = prunekit.prune(
        smollm2.model, smollm2.tokenizer, method="pp", ratio=0.4, calibration=calib
    )
    try:
        # L=30, skip 0-2: r' = round(30/27*0.4, 2) = 0.44; heads 9 - floor(3.96) = 6;
        # MLP 1536 - floor(675.84) = 861 -> rounded up to a multiple of 64 = 896
        assert outcome.structure[0] == {"layer": 0, "heads": 9, "channels": 1536}
        assert all(
            r == {"layer": r["layer"], "heads": 6, "channels": 896} for r in outcome.structure[3:]
        )
        with torch.no_grad():
            out = outcome.model(torch.randint(3, 40000, (2, 32))).logits
        assert torch.isfinite(out).all()
    finally:
        outcome.model.remove()


def _apply(out, *sets):
    args = [
        "apply",
        str(ROOT / "recipes/pp_smollm2.yaml"),
        "--output",
        str(out),
        "--quiet",
        "--set",
        "calibration.samples=4",
        "--set",
        "calibration.seq_len=128",
        "--set",
        "calibration.batch_size=4",
        "--set",
        "evaluation.perplexity.0.windows=4",
        "--set",
        "evaluation.perplexity.0.seq_len=128",
        "--set",
        "evaluation.perplexity.0.batch_size=2",
        "--set",
        "runtime.batches=1",
        "--set",
        "runtime.repeats=5",
    ]
    for s in sets:
        args += ["--set", s]
    return main(args)


def test_saved_state_reloads_and_reproduces_metrics(smollm2, tmp_path, capsys):
    assert _apply(tmp_path / "a", "output.save_model=true") == 0
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    state = tmp_path / "a" / "model"
    assert (state / "state.json").is_file() and (state / "state.safetensors").is_file()
    meta = json.loads((state / "state.json").read_text())
    assert meta["model_fingerprint"] and meta["method"] == "pp"
    assert first["runtime"]["probe_flops_fraction"] > 0
    assert set(first["runtime"]["overhead_s_per_batch"]) == {"probe", "score", "gather", "history"}
    assert first["timings"]["calibration_s"] > 0

    assert _apply(tmp_path / "b", f"method.state.load={state}") == 0
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    assert second["metrics"] == first["metrics"]  # exactly, not approximately
    assert second["timings"]["calibration_s"] == 0

    # a state from another version is rejected before anything is written
    meta["prunekit"] = "0.0.1"
    (state / "state.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert _apply(tmp_path / "c", f"method.state.load={state}") == 2
    assert "prunekit 0.0.1" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_state_from_other_model_rejected(tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text(
        json.dumps(
            {
                "format": "prunekit-dynamic-state",
                "version": 1,
                "prunekit": prunekit.__version__,
                "model_id": "meta-llama/Llama-2-7b-hf",
                "statistic": "sq_mean",
            }
        )
    )
    assert (
        main(
            [
                "validate",
                str(ROOT / "recipes/pp_smollm2.yaml"),
                "--set",
                f"method.state.load={state}",
            ]
        )
        == 2
    )
    assert "computed for model 'meta-llama/Llama-2-7b-hf'" in capsys.readouterr().err
