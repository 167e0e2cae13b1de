"""LoRAPrune: the LoRA-guided importance against hand-computed values, the schedule's counts
per layer, physical pruning, w/o and with LoRA; on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from prunekit.components import ATTN, MLP, MethodSettings
from prunekit.errors import PrunekitError, RecipeError
from prunekit.pruning.allocation import Uniform
from prunekit.registry import resolve_adapter
from prunekit.runner import apply, prepare, validate
from prunekit.testing import tiny_llama, tiny_tokenizer

pytest.importorskip("peft")
lp = pytest.importorskip("prunekit_plugins.lora_prune")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loraprune")
    tiny_llama(layers=3, seed=4).save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 60, (40, 60), generator=g).tolist()
    (root / "text.txt").write_text("\n".join(" ".join(f"w{i}" for i in r) for r in rows[:30]))
    (root / "eval.txt").write_text("\n".join(" ".join(f"w{i}" for i in r) for r in rows[30:]))
    return root


def _recipe(root: Path, **method) -> dict:
    return {
        "model": {"id": str(root / "tiny"), "dtype": "float32"},
        "method": {
            "name": "loraprune",
            "ratio": 0.5,
            "skip_layers": [0],
            "round_to": 1,
            "prune_every": 4,
            "start": 0.1,
            "end": 0.2,
            "finetune": {
                "steps": 20,
                "batch_size": 2,
                "lr": 5e-3,
                "dropout": 0.0,
                "checkpoint_every": 0,
            },
            **method,
        },
        "calibration": {"path": str(root / "text.txt"), "samples": 16, "seq_len": 16},
        "evaluation": {
            "perplexity": [
                {"path": str(root / "eval.txt"), "seq_len": 16, "windows": 4, "batch_size": 2}
            ]
        },
        "runtime": {"batches": 0},
    }


def test_importance_matches_hand_computed_values():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(layers=1, heads=2, intermediate=6, vocab=32, seed=1)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # B is zero at init
    ids = torch.randint(0, 32, (2, 7), generator=g)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    layer = resolve_adapter(model).layers()[0]
    lora_of = {
        id(m.get_base_layer().weight): m
        for m in peft_model.modules()
        if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")
    }

    def by_hand(module, rows: bool, width: int) -> list[float]:
        """Σ over a unit's rows (or columns) of |Ĝ_ij (W_ij + s (BA)_ij)|, element by element,
        then divided by the L2 norm over units."""
        A, B = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
        gA, gB = module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad
        W, s = module.get_base_layer().weight.detach(), module.scaling["default"]
        out_f, in_f = W.shape
        units = (out_f if rows else in_f) // width
        per_unit = [0.0] * units
        for i in range(out_f):
            for j in range(in_f):
                G = sum(
                    float(gB[i, k] * A[k, j] + B[i, k] * gA[k, j] - gB[i, k] * gA[k, j])
                    for k in range(A.shape[0])
                )
                ba = sum(float(B[i, k] * A[k, j]) for k in range(A.shape[0]))
                per_unit[(i if rows else j) // width] += abs(G * (float(W[i, j]) + s * ba))
        norm = sum(v * v for v in per_unit) ** 0.5
        return [v / (norm + 1e-8) for v in per_unit]

    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    hd = layer.head_dim
    want_attn = [
        sum(v)
        for v in zip(
            *(
                by_hand(m, m is not attn.o_proj, hd)
                for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
            ),
            strict=True,
        )
    ]  # MHA: k, v too
    want_mlp = [
        sum(v)
        for v in zip(
            *(
                by_hand(m, m is not mlp.down_proj, 1)
                for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            ),
            strict=True,
        )
    ]
    got_attn = lp.unit_importance(layer, ATTN, lora_of)
    got_mlp = lp.unit_importance(layer, MLP, lora_of)
    assert torch.allclose(got_attn, torch.tensor(want_attn), rtol=1e-4, atol=1e-6)
    assert torch.allclose(got_mlp, torch.tensor(want_mlp), rtol=1e-4, atol=1e-6)


def test_cubic_schedule():
    assert lp.scheduled_ratio(1, 100, 0.5, 0.1, 0.2) == 0.0
    assert lp.scheduled_ratio(10, 100, 0.5, 0.1, 0.2) == 0.0
    assert lp.scheduled_ratio(80, 100, 0.5, 0.1, 0.2) == 0.5
    assert lp.scheduled_ratio(100, 100, 0.5, 0.1, 0.2) == 0.5
    mid = lp.scheduled_ratio(45, 100, 0.5, 0.1, 0.2)  # halfway through 10..80
    assert mid == pytest.approx(0.5 * (1 - 0.5**3))


def test_pruned_model_has_the_scheduled_counts_per_layer(workdir, tmp_path):
    result = apply(_recipe(workdir), output=tmp_path / "out")
    info = result["loraprune"]
    events = info["schedule"]
    assert [e["step"] for e in events] == sorted(e["step"] for e in events)
    assert events[-1]["ratio"] == 0.5 and all(0 < e["ratio"] <= 0.5 for e in events)
    assert all(e["step"] % 4 == 0 or e["step"] == 20 for e in events)
    assert len(events) >= 3  # iterative, not one shot
    adapter = resolve_adapter(tiny_llama(layers=3, seed=4))
    uniform = Uniform()
    for e in events:  # every step's masks hold the uniform rule's counts at its ratio
        counts = uniform.counts(adapter, MethodSettings("loraprune", e["ratio"], [0], 1))
        assert e["kept"] == {f"{i}.{g}": n for (i, g), n in counts.items() if i != 0}
    final = uniform.counts(adapter, MethodSettings("loraprune", 0.5, [0], 1))
    assert result["structure"] == [
        {"layer": i, "heads": final[(i, ATTN)], "channels": final[(i, MLP)]} for i in range(3)
    ]
    assert result["structure"][1]["heads"] < 4  # really pruned
    assert result["model"]["params_kept"] < result["model"]["params"]  # physically smaller
    assert info["finetune"]["steps"] == 20 and len(info["finetune"]["loss"]) == 20
    assert info["keep_lora"] is False


def test_without_lora_keeps_the_original_weights_and_with_lora_merges(workdir):
    dense = tiny_llama(layers=3, seed=4)
    without = prepare(_recipe(workdir)).model
    with_lora = prepare(_recipe(workdir, keep_lora=True)).model
    assert not any("lora" in n for n, _ in without.named_parameters())
    assert not any("lora" in n for n, _ in with_lora.named_parameters())
    # w/o LoRA: the kept rows of the dense weights, untouched
    kept_q = without.model.layers[1].self_attn.q_proj.weight
    dense_q = dense.model.layers[1].self_attn.q_proj.weight
    rows = [r for r in range(dense_q.shape[0]) if any(torch.equal(dense_q[r], k) for k in kept_q)]
    assert len(rows) == kept_q.shape[0]
    # with LoRA: the same structure, other weights
    assert with_lora.model.layers[1].self_attn.q_proj.weight.shape == kept_q.shape
    assert not torch.equal(with_lora.model.layers[1].self_attn.q_proj.weight, kept_q)
    assert torch.equal(
        without.model.layers[0].self_attn.q_proj.weight,
        dense.model.layers[0].self_attn.q_proj.weight,
    )  # skipped layer


def test_bad_loraprune_options_fail_at_validate(workdir):
    cases = [
        ({"finetune": {"steps": 0}}, "method.finetune"),
        ({"finetune": {"stepz": 3}}, "method.finetune"),
        ({"prune_every": 0}, "prune_every"),
        (
            {"start": 0.6, "end": 0.5},
            r"method\.end: method\.start \+ method\.end \(0\.6 \+ 0\.5\) must be below 1",
        ),
        ({"seq_len": 99}, "seq_len"),
        (
            {"finetune": {"target_modules": ["q_proj", "x_proj"]}},
            r"method\.finetune\.target_modules: target_modules \['x_proj'\]",
        ),
    ]
    for method, match in cases:
        with pytest.raises(RecipeError, match=match):
            validate(_recipe(workdir, **method), check_output=False)


def test_with_lora_never_trains_on_an_evaluated_text(workdir, tmp_path):
    """keep_lora: true keeps trained weights, so calibration windows sharing a run of tokens
    with an evaluated text are dropped (and counted), as in recovery; a calibration text that
    is all evaluation text is refused. Without LoRA every window is used."""
    mixed = tmp_path / "mixed.txt"  # half evaluation text, half other text
    eval_rows = (workdir / "eval.txt").read_text().splitlines()
    train_rows = (workdir / "text.txt").read_text().splitlines()
    mixed.write_text("\n".join(eval_rows + train_rows[: len(eval_rows)]))
    recipe = _recipe(workdir, keep_lora=True)
    recipe["calibration"]["path"] = str(mixed)
    info = apply(recipe, output=tmp_path / "with")["loraprune"]
    dropped = info["carve_out"]["windows_dropped"]
    assert info["carve_out"]["checked"] and 0 < dropped < 16
    assert len(info["carve_out"]["excluded"]) == 1  # the one evaluated text, by its label
    assert info["finetune"]["windows"] == 16 - dropped
    recipe = _recipe(workdir)  # w/o LoRA: nothing trained survives, every window is used
    recipe["calibration"]["path"] = str(mixed)
    info = apply(recipe, output=tmp_path / "without")["loraprune"]
    assert info["carve_out"] == {
        "windows_dropped": 0,
        "overlap_tokens": 32,
        "checked": False,
        "excluded": [],
    }
    recipe = _recipe(workdir, keep_lora=True)
    recipe["calibration"]["path"] = str(workdir / "eval.txt")
    recipe["calibration"]["samples"] = 4
    with pytest.raises(PrunekitError, match="would train on the evaluation text"):
        apply(recipe, output=tmp_path / "all")


def test_loraprune_then_recovery_saves_and_reloads(workdir, tmp_path):
    recipe = _recipe(workdir)
    recipe["recovery"] = {
        "path": str(workdir / "text.txt"),
        "samples": 8,
        "seq_len": 16,
        "steps": 3,
        "batch_size": 2,
        "checkpoint_every": 0,
    }
    recipe["output"] = {"save_model": True}
    result = apply(recipe, output=tmp_path / "out")
    assert result["recovery"]["steps"] == 3
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert saved["method"]["name"] == "loraprune"
    from prunekit.pruning.static import load_pruned

    model = load_pruned(tmp_path / "out" / "model")
    assert model.model.layers[1].self_attn.q_proj.weight.shape[0] == (
        result["structure"][1]["heads"] * 16
    )


def test_an_interrupted_loraprune_resumes_to_the_same_pruned_model(
    workdir, tmp_path, interrupted_apply
):
    """The masks and scores are saved with each checkpoint: a resumed run prunes the same
    units and ends with the same weights as an uninterrupted one."""
    from safetensors.torch import load_file

    recipe = _recipe(
        workdir,
        finetune={"steps": 12, "batch_size": 2, "lr": 5e-3, "dropout": 0.1, "checkpoint_every": 3},
    )
    recipe["output"] = {"save_model": True}
    whole = apply(recipe, output=tmp_path / "whole")
    # interrupted during step 8: after the checkpoint of step 6 and a mask decision at step 4
    interrupted_apply(recipe, tmp_path / "cut", at_step=8)
    assert (tmp_path / "cut-loraprune" / "step-000006").is_dir()
    resumed = apply(recipe, output=tmp_path / "cut")
    assert resumed["loraprune"]["finetune"]["resumed_from_step"] == 6
    assert resumed["loraprune"]["schedule"] == whole["loraprune"]["schedule"]
    assert resumed["structure"] == whole["structure"]
    a = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut-loraprune").exists()  # removed once it finished
