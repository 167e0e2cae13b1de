"""Recovery (``recovery:``): LoRA fine-tuning merged into a pruned model; the carve-out of the
evaluation text; checkpoints and resumption; on a tiny model (each run takes seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prunekit.errors import RecipeError
from prunekit.recipe import RecoveryConfig
from prunekit.recovery import (
    OVERLAP_TOKENS,
    LoraTrainer,
    RecoveryError,
    carve_out,
    lora_targets,
    ngram_hashes,
)
from prunekit.runner import apply, prepare, validate
from prunekit.testing import tiny_llama, tiny_tokenizer

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny LLaMA and three texts: train (never evaluated), evaluation, and a mix that
    contains a long passage of the evaluation text."""
    root = tmp_path_factory.mktemp("recovery")
    tiny_llama(layers=2, seed=3).save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    g = torch.Generator().manual_seed(11)

    def words(rows: int, length: int) -> list[str]:
        ids = torch.randint(0, 60, (rows, length), generator=g).tolist()
        return [" ".join(f"w{i}" for i in r) for r in ids]

    train, evaluated = words(40, 60), words(20, 60)
    (root / "train.txt").write_text("\n".join(train))
    (root / "eval.txt").write_text("\n".join(evaluated))
    (root / "mixed.txt").write_text("\n".join(train[:10] + evaluated[:3] + train[10:20]))
    return root


def _recipe(root: Path, **recovery) -> dict:
    return {
        "model": {"id": str(root / "tiny"), "dtype": "float32"},
        "method": {"name": "wanda-sp", "ratio": 0.5, "skip_layers": []},
        "calibration": {
            "path": str(root / "train.txt"),
            "samples": 4,
            "seq_len": 16,
            "batch_size": 4,
        },
        "evaluation": {
            "perplexity": [
                {"path": str(root / "eval.txt"), "seq_len": 16, "windows": 6, "batch_size": 3}
            ]
        },
        "runtime": {"batches": 0},
        "recovery": {
            "path": str(root / "train.txt"),
            "samples": 24,
            "seq_len": 16,
            "steps": 6,
            "batch_size": 2,
            "lr": 5e-3,
            "dropout": 0.1,
            "checkpoint_every": 2,
            **recovery,
        },
    }


# ------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------


def test_ngram_hashes_match_equal_runs_only():
    a = torch.arange(40)
    rows = torch.stack([torch.arange(5, 45), torch.arange(100, 140)])
    ha, hr = ngram_hashes(a, 8), ngram_hashes(rows, 8)
    assert ha.shape == (33,) and hr.shape == (2, 33)
    assert torch.equal(hr[0, :28], ha[5:])  # the same 8 tokens, the same hash
    assert not torch.isin(hr[1], ha).any()
    assert ngram_hashes(torch.arange(5), 8).numel() == 0


def test_carve_out_drops_exactly_the_windows_sharing_a_run_with_the_evaluated_text():
    g = torch.Generator().manual_seed(0)
    evaluated = torch.randint(1000, 2000, (500,), generator=g)
    train = torch.randint(0, 1000, (6, 64), generator=g)
    train[2, 10 : 10 + OVERLAP_TOKENS] = evaluated[100 : 100 + OVERLAP_TOKENS]  # a whole run
    train[4, 0 : OVERLAP_TOKENS - 1] = evaluated[0 : OVERLAP_TOKENS - 1]  # one token short
    kept, dropped = carve_out(train, {"eval": evaluated})
    assert dropped == [2]
    assert torch.equal(kept, train[[0, 1, 3, 4, 5]])
    short = torch.stack([evaluated[7:19], torch.arange(12)])  # windows shorter than a run
    assert carve_out(short, {"eval": evaluated})[1] == [0]


def test_lora_targets_are_the_linear_layers_but_the_head(workdir):
    model = tiny_llama(layers=2, seed=3)
    names = lora_targets(model)
    assert "lm_head" not in names and len(names) == 2 * 7
    assert lora_targets(model, ["q_proj", "down_proj"]) == [
        n for n in names if n.endswith(("q_proj", "down_proj"))
    ]
    with pytest.raises(RecipeError, match="x_proj"):
        lora_targets(model, ["x_proj"])


def test_merged_logits_equal_the_adapter_model(workdir):
    """float32 at atol 1e-5, on a model at a trained LLM's weight scale (init std 0.02: the
    float32 rounding of its logits is about 3e-7; at tiny_llama's widened 0.2 it is itself
    about 1e-5, so the tolerance would measure the CPU), and float64 to 1e-10, where rounding
    cannot hide a wrong merge."""
    windows = torch.randint(0, 60, (8, 16), generator=torch.Generator().manual_seed(1))
    settings = RecoveryConfig(
        path="x", steps=5, batch_size=2, lr=1e-2, dropout=0.0, checkpoint_every=0
    )
    ids = windows[:3]
    trainer = LoraTrainer(
        tiny_llama(layers=2, seed=3, init_std=0.02).double(), settings, windows, seed=0
    )
    trainer.train()
    _, diff64 = trainer.merge(check=ids)
    assert diff64 is not None and diff64 < 1e-10
    trainer = LoraTrainer(tiny_llama(layers=2, seed=3, init_std=0.02), settings, windows, seed=0)
    record = trainer.train()
    assert record["steps"] == 5 and len(record["loss"]) == 5
    lora_b = [p for n, p in trainer.trainable if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)  # the adapters learned something
    with torch.no_grad():
        unmerged = trainer.peft_model(input_ids=ids).logits
    merged, diff = trainer.merge(check=ids)
    with torch.no_grad():
        after = merged(input_ids=ids).logits
    assert torch.allclose(after, unmerged, atol=1e-5, rtol=0)
    assert diff is not None and diff <= 1e-5
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear


# ------------------------------------------------------------------------------------------
# the recipe section
# ------------------------------------------------------------------------------------------


def test_recovery_never_trains_on_an_evaluated_text(workdir):
    recipe = _recipe(workdir, path=str(workdir / "eval.txt"))
    with pytest.raises(RecipeError, match="would train on the evaluation text"):
        validate(recipe, check_output=False)
    recipe = _recipe(workdir)
    recipe["method"] = {"name": "pp", "ratio": 0.5, "skip_layers": []}
    with pytest.raises(RecipeError, match="dynamic"):
        validate(recipe, check_output=False)
    for bad in ({"warmup_steps": 6}, {"target_modules": []}, {"rank": 0}):
        with pytest.raises(RecipeError, match="recovery"):
            validate(_recipe(workdir, **bad), check_output=False)


def test_windows_sharing_evaluation_text_are_left_out(workdir, tmp_path):
    """A recovery file holding passages of the evaluated text: those windows are dropped and
    no trained window shares a run of tokens with the evaluation text."""
    from prunekit.data import locate_corpus, token_stream

    prepared = prepare(
        _recipe(workdir, path=str(workdir / "mixed.txt"), samples=60, steps=2, checkpoint_every=0)
    )
    tok = prepared.tokenizer
    evaluated = token_stream(tok, locate_corpus(path=str(workdir / "eval.txt")))
    mixed = token_stream(tok, locate_corpus(path=str(workdir / "mixed.txt")))
    assert torch.isin(ngram_hashes(mixed), ngram_hashes(evaluated)).any()  # overlap exists
    del prepared
    result = apply(
        _recipe(workdir, path=str(workdir / "mixed.txt"), samples=60, steps=2, checkpoint_every=0),
        output=tmp_path / "out",
    )
    carve = result["recovery"]["carve_out"]
    assert carve["windows_dropped"] > 0 and carve["excluded"] == ["eval"]
    assert result["recovery"]["windows"] == 60 - carve["windows_dropped"]


def test_a_recovery_text_made_only_of_evaluation_text_is_refused_at_run_time(workdir, tmp_path):
    """Another file than the evaluated one (so validate lets it through) but holding only its
    text: every window is dropped and the run stops, naming the evaluated corpus."""
    copy = tmp_path / "copy.txt"
    copy.write_text((workdir / "eval.txt").read_text())
    with pytest.raises(
        RecoveryError,
        match=r"every one of the 4 recovery windows .*\(eval\)"
        r".*would train on the evaluation text",
    ):
        apply(
            _recipe(workdir, path=str(copy), samples=4, steps=2, checkpoint_every=0),
            output=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_saved_recovered_model_reloads_identically_in_a_fresh_process(workdir, tmp_path):
    recipe = _recipe(workdir)
    recipe["output"] = {"save_model": True}
    result = apply(recipe, output=tmp_path / "out")
    rec = result["recovery"]
    assert rec["steps"] == 6 and len(rec["loss"]) == 6 and rec["merge_max_abs_logit_diff"] <= 1e-5
    assert rec["resumed_from_step"] is None and rec["settings"]["rank"] == 8
    assert result["recovery"]["checkpoint_dir"] == str(tmp_path / "out-recovery")
    assert not (tmp_path / "out-recovery").exists()  # removed once the results were written
    # the same recipe built again in this process (deterministic: the same seed)
    model = prepare(recipe).model
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        here = model(input_ids=ids).logits
    saved = tmp_path / "out" / "model"
    assert (saved / "model.safetensors").is_file()
    assert not [k for k in load_file(str(saved / "model.safetensors")) if "lora" in k]
    script = (
        "import sys, torch\nfrom prunekit.pruning.static import load_pruned\n"
        f"m = load_pruned({str(saved)!r})\nids = torch.tensor({ids.tolist()})\n"
        f"torch.save(m(input_ids=ids).logits.detach(), {str(tmp_path / 'l.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.equal(torch.load(tmp_path / "l.pt"), here)
    # and the recovery changed the pruned model (not the dense one only)
    recipe.pop("recovery")
    plain = prepare(recipe).model
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, here)


def test_an_interrupted_recovery_resumes_to_the_same_weights(workdir, tmp_path, interrupted_apply):
    recipe = _recipe(workdir, steps=7, checkpoint_every=2)
    recipe["output"] = {"save_model": True}
    whole = apply(recipe, output=tmp_path / "whole")

    interrupted_apply(recipe, tmp_path / "cut", at_step=6)  # checkpoints at 2 and 4 written
    assert not (tmp_path / "cut").exists()  # nothing half-written
    ckpts = sorted(p.name for p in (tmp_path / "cut-recovery").iterdir())
    assert ckpts == ["step-000004"]
    resumed = apply(recipe, output=tmp_path / "cut")
    assert resumed["recovery"]["resumed_from_step"] == 4
    assert resumed["recovery"]["loss"] == whole["recovery"]["loss"]
    a = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["metrics"] == whole["metrics"]


def test_a_checkpoint_from_another_run_is_not_resumed(workdir, tmp_path, monkeypatch):
    recipe = _recipe(workdir, steps=4, checkpoint_every=2, keep_checkpoints=True)
    first = apply(recipe, output=tmp_path / "a")
    assert (tmp_path / "a-recovery" / "step-000002").is_dir()  # kept as asked
    other = _recipe(
        workdir, steps=4, checkpoint_every=2, lr=1e-3, checkpoint_dir=str(tmp_path / "a-recovery")
    )
    second = apply(other, output=tmp_path / "b")
    assert second["recovery"]["resumed_from_step"] is None
    assert second["recovery"]["loss"][0] == first["recovery"]["loss"][0]  # same start
    assert second["recovery"]["loss"] != first["recovery"]["loss"]


def test_recovery_records_its_settings_in_results_and_recipe(workdir, tmp_path):
    result = apply(_recipe(workdir, steps=2, checkpoint_every=0), output=tmp_path / "o")
    rec = result["recovery"]
    assert rec["settings"]["steps"] == 2 and rec["settings"]["lr"] == 5e-3
    assert rec["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert rec["trainable_params"] > 0 and rec["corpus"].startswith("file ")
    saved = yaml.safe_load((tmp_path / "o" / "recipe.yaml").read_text())
    assert saved["recovery"]["steps"] == 2
    assert json.loads((tmp_path / "o" / "results.json").read_text())["recovery"]["loss"]


def test_target_modules_are_checked_at_validate_from_the_config(workdir):
    with pytest.raises(
        RecipeError, match=r"recovery\.target_modules: target_modules .*x_proj.*q_proj"
    ):
        validate(_recipe(workdir, target_modules=["q_proj", "x_proj"]), check_output=False)
    validate(_recipe(workdir, target_modules=["q_proj", "down_proj"]), check_output=False)
