"""``method.then``: a second method applied to a static method's result, written as a recipe.

References: the same two methods run one after the other by hand (``prunekit.prune`` twice on
the same calibration windows), the dense model's costs counted by hand, and a fresh process
reloading the saved model. Also: LoRA adapters on a sliced model's attention projections act
(recovery trains them), checked against peft's own merge.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_run import assert_reloads, write_recipe
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.cli import main
from prunekit.errors import RecipeError
from prunekit.evaluation.costs import structure_reduction
from prunekit.registry import resolve_adapter
from prunekit.testing import tiny_gemma3, tiny_llama, tiny_opt, tiny_phi3

CALIB = torch.randint(3, 100, (6, 16), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(
    "first, second",
    [
        ({"method": "attn-drop", "ratio": 0.3}, {"name": "wanda-sp", "ratio": 0.25}),
        ({"method": "block-influence", "ratio": 0.3}, {"name": "llm-pruner", "ratio": 0.25}),
        ({"method": "wanda-sp", "ratio": 0.2}, {"name": "mlp-drop", "ratio": 0.3}),
    ],
)
def test_then_equals_the_two_methods_run_by_hand(first, second):
    model = tiny_llama(heads=4, kv_heads=2, layers=8)
    by_hand = copy.deepcopy(model)
    keys = {"skip_layers": [0]}
    out = prunekit.prune(model, None, calibration=CALIB, **first, **keys, then={**second, **keys})
    one = prunekit.prune(by_hand, None, calibration=CALIB, **first, **keys)
    two = prunekit.prune(
        one.model,
        None,
        method=second["name"],
        ratio=second["ratio"],
        calibration=CALIB,
        **keys,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            out.model(input_ids=IDS).logits, two.model(input_ids=IDS).logits, atol=0, rtol=0
        )
    assert [s["method"] for s in out.extra["stages"]] == [first["method"], second["name"]]
    # the structure is over the dense model's 8 layers: removed blocks keep their rows
    assert [r["layer"] for r in out.structure] == list(range(8))
    removed = {r["layer"] for r in out.structure if r.get("removed")}
    assert removed == set(one.extra.get("removed_layers", []))
    later = iter(two.structure)
    for row in out.structure:
        if not row.get("removed"):
            assert {k: v for k, v in next(later).items() if k != "layer"} == {
                k: v for k, v in row.items() if k != "layer"
            }


def test_a_then_target_counts_against_the_dense_model():
    model = tiny_llama(heads=4, kv_heads=2, layers=8)
    dense = resolve_adapter(copy.deepcopy(model))
    out = prunekit.prune(
        model,
        None,
        method="attn-drop",
        calibration=CALIB,
        target={"macs": 0.9},
        skip_layers=[0],
        then={"name": "wanda-sp", "target": {"macs": 0.7}, "skip_layers": [0]},
    )
    first, second = out.extra["stages"]
    achieved = structure_reduction(dense, out.structure, 512)["flops_kept_fraction"]
    assert out.extra["target"]["value"] == 0.7
    assert out.extra["target"]["achieved"] == pytest.approx(achieved) and achieved <= 0.7
    assert first["target"]["achieved"] <= 0.9
    # the second stage reports in the user's terms: 0.7 asked, its achieved of the dense MACs
    assert second["target"]["value"] == 0.7
    assert second["target"]["achieved"] == pytest.approx(achieved, rel=1e-9)


def test_an_unreachable_then_target_is_told_in_the_users_terms():
    """The stage's cost model counts against the dense model: the message names 0.3 (what the
    user wrote, not 0.3 over what the first stage kept), what the most pruning leaves of the
    dense MACs, and what the model the stage received kept."""
    model = tiny_llama(heads=4, kv_heads=2, layers=8)
    dense = resolve_adapter(copy.deepcopy(model))
    kw = dict(method="attn-drop", calibration=CALIB, ratio=0.25, skip_layers=[0])
    first = prunekit.prune(copy.deepcopy(model), None, **kw)
    kept = structure_reduction(dense, first.structure, 512)["flops_kept_fraction"]
    with pytest.raises(RecipeError) as err:
        prunekit.prune(
            model,
            None,
            **kw,
            then={"name": "wanda-sp", "target": {"macs": 0.3}, "skip_layers": [0]},
        )
    message = str(err.value)
    assert message.startswith("method.then.target: macs 0.3000 of the dense MACs cannot be met")
    assert f"the model this stage receives: {kept:.4f} of the dense MACs" in message
    lowest = float(message.split("leaves ")[1].split(" of")[0])
    assert 0.3 < lowest < kept


@pytest.mark.parametrize(
    "factory", [tiny_llama, tiny_gemma3, tiny_opt, tiny_phi3], ids=lambda f: f.__name__
)
def test_lora_on_a_sliced_attention_acts(factory):
    """peft wraps the sliced attention's projections: their adapters change the output, and the
    merged model equals the adapted one (before, the sliced attention read the base weights
    and its adapters trained nothing)."""
    from peft import LoraConfig, get_peft_model

    model = factory(layers=4, dtype=torch.float64)  # the merge's rounding stays below 1e-9
    out = prunekit.prune(
        model, None, method="wanda-sp", ratio=0.3, calibration=CALIB, skip_layers=[0]
    )
    pruned = out.model
    with torch.no_grad():
        base = pruned(input_ids=IDS).logits
    names = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in pruned.named_modules()
            if n.endswith(("q_proj", "qkv_proj", "o_proj", "out_proj"))
        }
    )
    torch.manual_seed(0)
    peft_model = get_peft_model(
        pruned, LoraConfig(r=2, target_modules=names, init_lora_weights=False)
    )
    with torch.no_grad():
        adapted = peft_model(input_ids=IDS).logits
        assert (adapted - base).abs().max() > 1e-3
        merged = peft_model.merge_and_unload()(input_ids=IDS).logits
    torch.testing.assert_close(merged, adapted, atol=1e-9, rtol=0)


def _recipe(tmp, method: str, save: bool = False) -> str:
    return write_recipe(tmp, "\n" + method, save=save)


def test_apply_with_then_saves_a_model_that_reloads(tiny_dir):
    method = (
        "  name: block-influence\n  ratio: 0.4\n"
        "  then: {name: wanda-sp, target: {macs: 0.7}, skip_layers: [0]}\n"
    )
    recipe = _recipe(tiny_dir, method, save=True)
    assert main(["apply", recipe, "-q"]) == 0
    run = tiny_dir / "run"
    results = json.loads((run / "results.json").read_text())
    assert [s["method"] for s in results["stages"]] == ["block-influence", "wanda-sp"]
    assert results["target"]["achieved"] <= 0.7
    assert results["reduction"]["flops_kept_fraction"] == pytest.approx(
        results["target"]["achieved"], rel=1e-6
    )
    assert_reloads(recipe, run, IDS)


@pytest.mark.parametrize(
    "method, needle",
    [
        ("  name: pp\n  ratio: 0.2\n  then: {name: wanda-sp, ratio: 0.2}\n", "is dynamic"),
        ("  name: attn-drop\n  ratio: 0.2\n  then: {name: nope}\n", "method.then.name"),
        ("  name: attn-drop\n  ratio: 0.2\n  then: {ratio: 0.2}\n", "names its method"),
        (
            "  name: attn-drop\n  ratio: 0.2\n  then: {name: pp, ratio: 0.2}\n",
            "follows a static method",
        ),
        (
            "  name: attn-drop\n  ratio: 0.2\n  then: {name: wanda-sp, ratio: 0.2, target: {macs: 0.5}}\n",
            "method.then",
        ),
    ],
)
def test_bad_then_fails_at_validate(tiny_dir, capsys, method, needle):
    assert main(["validate", _recipe(tiny_dir, method, save=True)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_three_stages_run_each_stage_once(tiny_dir):
    """attn-drop, then mlp-drop, then wanda-sp through the runner (``prepare``): each stage
    runs once, and the model equals the three methods run by hand on the same windows."""
    method = (
        "  name: attn-drop\n  ratio: 0.34\n"
        "  then: {name: mlp-drop, ratio: 0.34, then: {name: wanda-sp, ratio: 0.2}}\n"
    )
    prepared = prunekit.prepare(_recipe(tiny_dir, method))
    out = prepared.outcome
    assert [s["method"] for s in out.extra["stages"]] == ["attn-drop", "mlp-drop", "wanda-sp"]
    windows = prepared.context.calibration_windows()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "m")
    for name, ratio in (("attn-drop", 0.34), ("mlp-drop", 0.34), ("wanda-sp", 0.2)):
        model = prunekit.prune(model, None, method=name, ratio=ratio, calibration=windows).model
    with torch.no_grad():
        torch.testing.assert_close(
            out.model(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("kv", [4, 2], ids=["mha", "gqa"])
def test_pp_seq_after_dropped_attention_rows_match_running_alone(kv):
    """PP on a model whose attention sublayers a first stage dropped: at ratio 0 it is that
    model; pruning, each row's logits are the row's alone (per-sequence decisions), and the
    layers without attention stay without it."""
    model = tiny_llama(heads=4, kv_heads=kv, intermediate=96, layers=6)
    first = dict(method="attn-drop", ratio=0.4, skip_layers=[0], calibration=CALIB)
    dropped_only = prunekit.prune(copy.deepcopy(model), None, **first)
    dropped = dropped_only.extra["dropped_attention"]
    assert len(dropped) == 2
    ids = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(5))
    then = {"name": "pp-seq", "skip_layers": [0]}
    with torch.no_grad():
        same = prunekit.prune(copy.deepcopy(model), None, **first, then={**then, "ratio": 0.0})
        torch.testing.assert_close(
            same.model(input_ids=ids).logits,
            dropped_only.model(input_ids=ids).logits,
            atol=1e-5,
            rtol=0,
        )
        dyn = prunekit.prune(model, None, **first, then={**then, "ratio": 0.5}).model
        dyn.reset_state()
        together = dyn(input_ids=ids).logits
        for layer in dropped:  # nothing to decide in a layer without attention
            assert dyn.controller.counts[(layer, "attn")] == 0
            assert dyn.decisions[(layer, "attn")] is None
        assert dyn.controller.counts[(1, "attn")] == 2 and dyn.decisions[(1, "attn")] is not None
        for b in range(ids.shape[0]):
            dyn.reset_state()
            alone = dyn(input_ids=ids[b : b + 1]).logits
            torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=0)
