"""Static methods on SmolLM2 (GQA 9 heads over 3 KV heads): save, reload in a fresh process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunekit.cli import main

pytestmark = pytest.mark.smollm2
ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "calibration.samples=8",
    "calibration.seq_len=128",
    "calibration.batch_size=4",
    "evaluation.perplexity.0.windows=2",
    "evaluation.perplexity.0.seq_len=128",
    "evaluation.perplexity.0.batch_size=2",
    "runtime.batches=0",
]


def _apply(recipe, out, *sets):
    args = ["apply", str(ROOT / "recipes" / recipe), "--output", str(out), "--quiet"]
    for s in [*SMALL, *sets]:
        args += ["--set", s]
    return main(args)


def _fresh_logits(path, ids_path, out_path, how):
    load = {
        "remote": f"AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)",
        "plain": f"AutoModelForCausalLM.from_pretrained({str(path)!r})",
        "prunekit": f"prunekit.load_pruned({str(path)!r})",
    }[how]
    code = (
        "import torch, prunekit\nfrom transformers import AutoModelForCausalLM\n"
        f"m = {load}\nids = torch.load({str(ids_path)!r})\n"
        f"torch.save(m(ids).logits.detach(), {str(out_path)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    return torch.load(out_path)


def test_flap_per_layer_shapes_reload_everywhere(smollm2, tmp_path):
    import prunekit
    from prunekit.loading import load_model
    from prunekit.pruning.static import save_pruned

    fresh = load_model("smollm2-135m-instruct", cache_dir=Path(smollm2.info["path"]).parents[1])
    calib = torch.randint(3, 40000, (24, 128), generator=torch.Generator().manual_seed(1))
    outcome = prunekit.prune(
        fresh.model, fresh.tokenizer, method="flap", ratio=0.4, calibration=calib
    )
    counts = {(r["heads"], r["channels"]) for r in outcome.structure[3:]}
    assert len(counts) > 1  # FLAP's per-layer shapes differ
    ids = torch.randint(3, 40000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = outcome.model(ids).logits  # the in-memory pruned model
    model_dir = tmp_path / "model"
    save_pruned(outcome.model, fresh.tokenizer, str(model_dir), {"method": "flap"})
    assert json.loads((model_dir / "prunekit.json").read_text())["layout"] == "remote_code"
    kv = json.loads((model_dir / "config.json").read_text())["prunekit_layers"]["kv_index"]
    assert len(kv) == 30
    torch.save(ids, tmp_path / "ids.pt")
    for how in ("remote", "prunekit"):
        got = _fresh_logits(model_dir, tmp_path / "ids.pt", tmp_path / f"{how}.pt", how)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_apply_saves_a_static_model_that_reloads(smollm2, tmp_path):
    assert _apply("pp_calib_smollm2.yaml", tmp_path / "run") == 0
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["structure"][3] == {"layer": 3, "heads": 6, "channels": 896}
    assert 0 < result["reduction"]["params_removed_fraction"] < 1
    assert 0 < result["reduction"]["flops_removed_fraction"] < 1
    ids = torch.randint(3, 40000, (1, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    got = _fresh_logits(
        tmp_path / "run" / "model", tmp_path / "ids.pt", tmp_path / "o.pt", "remote"
    )
    assert torch.isfinite(got).all()


def test_balanced_wanda_exports_a_plain_checkpoint(smollm2, tmp_path):
    code = _apply(
        "wanda_sp_smollm2.yaml",
        tmp_path / "run",
        "method.skip_layers=[]",
        "method.allocator.balanced_kv=true",
    )
    assert code == 0
    model_dir = tmp_path / "run" / "model"
    assert json.loads((model_dir / "prunekit.json").read_text())["layout"] == "plain"
    ids = torch.randint(3, 40000, (1, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    plain = _fresh_logits(model_dir, tmp_path / "ids.pt", tmp_path / "plain.pt", "plain")
    ours = _fresh_logits(model_dir, tmp_path / "ids.pt", tmp_path / "ours.pt", "prunekit")
    torch.testing.assert_close(plain, ours, atol=1e-6, rtol=0)


def test_unsupported_model_exits_2_and_writes_nothing(smollm2, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=49152)).save_pretrained(
        model_dir
    )
    smollm2.tokenizer.save_pretrained(model_dir)
    assert _apply("wanda_sp_smollm2.yaml", tmp_path / "out", f"model.id={model_dir}") == 2
    assert "no model adapter supports model type 'gpt2'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
