"""``method.target``: a budget (decoder MACs, parameters, KV bytes per token) instead of a
ratio. The engine finds the smallest ratio whose structure meets it, for every method with an
allocator, and reports the target beside what was achieved."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_run import flow, write_recipe

import prunekit
from prunekit.budgets import CostModel, cost_model
from prunekit.cli import main
from prunekit.registry import resolve_adapter
from prunekit.testing import tiny_llama

CALIB = torch.randint(3, 128, (40, 32), generator=torch.Generator().manual_seed(0))


def _model():
    return tiny_llama(heads=4, kv_heads=4, layers=6, hidden=32, intermediate=96)


def _macs_by_hand(structure, seq=512, d=32, hd=8):
    # q, k, v (MHA: K/V heads go with the kept heads), o, gate/up/down, scores and values
    return sum(
        d * hd * 3 * r["heads"]
        + r["heads"] * hd * d
        + 3 * d * r["channels"]
        + 2 * seq * r["heads"] * hd
        for r in structure
    )


def test_the_cost_model_matches_a_hand_count():
    model = _model()
    costs = cost_model(resolve_adapter(model), model, 512, "float32")
    dense = [{"heads": 4, "channels": 96}] * 6
    kept = [{"heads": 4, "channels": 96}] + [{"heads": 2, "channels": 40}] * 5
    assert costs.costs(kept)["macs"] == pytest.approx(_macs_by_hand(kept) / _macs_by_hand(dense))
    # parameters: 2 heads x (q, k, v rows and o columns) of 8 x 32, 56 channels x 3 x 32
    removed = 5 * (2 * 4 * 8 * 32 + 56 * 3 * 32)
    total = sum(p.numel() for p in model.parameters())
    assert costs.costs(kept)["params"] == total - removed
    # K and V of each kept head, 8 dims, 4 bytes, every layer
    assert costs.costs(kept)["kv_bytes_per_token"] == 2 * 8 * 4 * (4 + 5 * 2)
    assert costs.costs()["params"] == total and costs.costs()["macs"] == 1


@pytest.mark.parametrize("method", ["wanda-sp", "pp", "flap", "llm-pruner", "pp-calib"])
@pytest.mark.parametrize("target", [{"macs": 0.7}, {"params": 70_000}])
def test_the_smallest_ratio_that_meets_the_target(method, target):
    model = _model()
    costs = cost_model(resolve_adapter(model), model, 512, "float32")
    out = prunekit.prune(
        model, method=method, calibration=CALIB, target=target, skip_layers=[0], round_to=1
    )
    ((kind, value),) = target.items()
    got = out.extra["target"]
    assert got["kind"] == kind and got["value"] == value
    assert got["achieved"] <= value  # met
    assert costs.costs(out.structure)[kind] <= value  # by the structure itself
    if method != "flap":  # a lower ratio would miss it (FLAP's allocation is on the scores)
        lower = prunekit.prune(
            _model(),
            method=method,
            calibration=CALIB,
            ratio=max(out.extra["ratio"] - 2e-3, 0),
            skip_layers=[0],
            round_to=1,
        )
        assert costs.costs(lower.structure)[kind] > value


def test_a_target_of_the_dense_cost_reproduces_dense_logits():
    model, dense = _model(), _model()
    out = prunekit.prune(model, method="pp", calibration=CALIB, target={"macs": 1.0})
    assert out.extra["ratio"] == 0
    ids = CALIB[:2]
    with torch.no_grad():
        torch.testing.assert_close(out.model(input_ids=ids).logits, dense(input_ids=ids).logits)


def _recipe(tmp, method="wanda-sp", **keys):
    return write_recipe(
        tmp, flow(method, skip_layers="[0]", round_to=1, **keys), samples=40, windows=4
    )


def test_results_report_the_target_beside_what_was_achieved(tiny_dir, capsys):
    recipe = _recipe(tiny_dir, target="{macs: 0.75}")
    assert main(["apply", recipe, "-q"]) == 0
    results = json.loads((tiny_dir / "run" / "results.json").read_text())
    target = results["target"]
    assert target["kind"] == "macs" and target["value"] == 0.75
    assert target["achieved"] == pytest.approx(results["reduction"]["flops_kept_fraction"])
    assert target["achieved"] <= 0.75 and 0 < results["ratio"] < 1


@pytest.mark.parametrize(
    "keys, needle",
    [
        ({"target": "{macs: 0.6}", "ratio": 0.3}, "set method.ratio or method.target, not both"),
        ({"target": "{macs: 0.02}"}, "cannot be met: the most this method can prune"),
        ({"target": "{params: 1e12}"}, "is above the dense model's"),
        ({"target": "{kv_bytes_per_token: 100}"}, "shares its K/V heads (GQA)"),
        ({"target": "{flops: 0.5}"}, "name exactly one of macs, params, kv_bytes_per_token"),
        ({"target": "{macs: 1.5}"}, "in (0, 1]"),
    ],
)
def test_a_target_that_cannot_be_met_fails_at_validate(tiny_dir, capsys, keys, needle):
    recipe = _recipe(tiny_dir, **keys)
    assert main(["validate", recipe]) == 2
    err = capsys.readouterr().err
    assert "method" in err and needle in err and "Traceback" not in err


def test_a_method_without_an_allocator_has_no_target(tiny_dir, capsys):
    recipe = _recipe(tiny_dir, method="dense", target="{macs: 0.6}")
    assert main(["validate", recipe]) == 2
    assert "has no allocator slot" in capsys.readouterr().err


def test_cost_model_is_read_before_pruning():
    # a sliced layer's modules no longer show the dense parameters: the model keeps them
    model = _model()
    adapter = resolve_adapter(model)
    costs = CostModel(adapter, 512, sum(p.numel() for p in model.parameters()), 4)
    before = costs.costs([{"heads": 2, "channels": 48}] * 6)
    for la in adapter.layers():
        la.slice(torch.arange(2), torch.arange(48))
    assert costs.costs([{"heads": 2, "channels": 48}] * 6) == before


def test_a_recipe_without_a_target_dumps_as_before():
    # sweep cell keys and checkpoint keys hash the resolved recipe: no target, no key
    from prunekit.recipe import load_recipe
    from prunekit.sweep import cell_key

    recipe = load_recipe({"method": {"name": "pp", "ratio": 0.4}}).recipe
    assert "target" not in recipe.model_dump(mode="json")["method"]
    budget = load_recipe({"method": {"name": "pp", "target": {"macs": 0.6}}}).recipe
    assert budget.model_dump(mode="json")["method"]["target"] == {"macs": 0.6}
    assert cell_key(recipe) != cell_key(budget)


def test_the_highest_ratio_keeps_the_per_layer_ratio_below_one():
    from prunekit.budgets import highest_ratio
    from prunekit.components import MethodSettings
    from prunekit.pruning.allocation import Uniform

    model = _model()  # 6 layers, layer 0 skipped: round(6/5 r, 2) < 1 up to r = 0.8291...
    settings = MethodSettings(name="wanda-sp", skip_layers=[0])
    r = highest_ratio(Uniform(), resolve_adapter(model), settings)
    assert round(1.2 * r, 2) < 1 <= round(1.2 * (r + 2e-4), 2)


def test_a_budget_allocator_copies_and_reads_through_to_its_allocator():
    import copy

    from prunekit.budgets import BudgetAllocator
    from prunekit.pruning.allocation import Uniform

    model = _model()
    costs = cost_model(resolve_adapter(model), model, 512, "float32")
    wrapper = BudgetAllocator(Uniform(balanced_kv=True), costs, "macs", 0.7)
    assert wrapper.balanced_kv is True and callable(wrapper.counts)
    clone = copy.deepcopy(wrapper)
    assert clone.value == 0.7 and clone.balanced_kv is True
