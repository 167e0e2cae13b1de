"""The context a method prunes in and the typed view of the run (prunekit.context,
prunekit.views): what a plugin reads instead of the recipe, checked against direct
computations."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import prunekit
from prunekit.context import PruneContext
from prunekit.data import calibration_windows
from prunekit.plan import validate
from prunekit.ratios import per_layer_ratio
from prunekit.recipe import load_recipe
from prunekit.registry import resolve_adapter
from prunekit.testing import tiny_llama, tiny_tokenizer
from prunekit.views import RunView

RECIPE = {
    "calibration": {"dataset": "c4", "samples": 6, "seq_len": 32, "batch_size": 2},
    "method": {
        "name": "pp",
        "ratio": 0.4,
        "skip_layers": [0],
        "mode": "sync",
        "probe": {"name": "residual_rank"},
    },
    "evaluation": {
        "perplexity": [
            {"dataset": "wikitext2", "split": "test", "seq_len": 32, "windows": 2, "batch_size": 2}
        ]
    },
    "seed": 3,
}


def _context(override=None, recipe=RECIPE):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    loaded = load_recipe(recipe)
    plan = validate(loaded, model=model, check_output=False)
    ctx = PruneContext(
        model=model,
        tokenizer=tokenizer,
        adapter=resolve_adapter(model),
        settings=plan.settings,
        run_recipe=loaded.recipe,
        run=plan.run,
        calibration_source=plan.calibration_source,
        perplexity_sources=plan.perplexity_sources,
        calibration_windows_override=override,
    )
    return ctx, plan


def test_calibration_windows_of_any_size_are_the_corpus_draw():
    ctx, plan = _context()
    default = ctx.calibration_windows()
    assert default.shape == (6, 32)
    assert ctx.calibration_windows() is default  # drawn once per run
    assert ctx.calibration_windows(6, 32) is default
    want = calibration_windows(ctx.tokenizer, plan.calibration_source, 6, 32, seed=3)
    assert torch.equal(default, want)
    other = ctx.calibration_windows(3, 10)
    assert torch.equal(
        other, calibration_windows(ctx.tokenizer, plan.calibration_source, 3, 10, seed=3)
    )


def test_calibration_windows_given_as_a_tensor_are_cut_to_size():
    given = torch.arange(5 * 12).reshape(5, 12)
    ctx, _ = _context(override=given)
    assert ctx.calibration_windows() is given
    assert torch.equal(ctx.calibration_windows(2, 7), given[:2, :7])


def test_the_run_view_is_typed_frozen_and_keeps_the_recipes_paths():
    ctx, plan = _context()
    run = ctx.run
    assert isinstance(run, RunView) and run is plan.run
    assert (run.model.id, run.seed, run.method.name, run.method.ratio) == (
        plan.recipe.model.id,
        3,
        "pp",
        0.4,
    )
    assert run.method.skip_layers == (0,)
    assert run.calibration.seq_len == 32 and run.evaluation.perplexity[0].seq_len == 32
    assert run.evaluation.perplexity[0].label == plan.recipe.evaluation.perplexity[0].label
    # an option is not a slot; a plugin-declared slot is
    assert run.method.options["mode"] == "sync" and run.method.slot("mode") is None
    assert run.method.slot("probe").name == "residual_rank"
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.seed = 4
    with pytest.raises(TypeError):
        run.method.options["mode"] = "async_intra"
    identity = ctx.identity()
    assert identity == {
        "model": plan.recipe.model.model_dump(mode="json"),
        "method": plan.recipe.method.model_dump(mode="json"),
        "calibration": plan.recipe.calibration.model_dump(mode="json"),
    }
    identity["seed"] = 1  # a copy: the run's identity does not change
    assert "seed" not in ctx.identity()


def test_reading_the_recipe_from_the_context_is_deprecated():
    ctx, plan = _context()
    with pytest.warns(DeprecationWarning, match="ctx.run"):
        assert ctx.recipe is plan.recipe


def test_checkpoint_dir_is_the_recipes_or_beside_the_output(tmp_path):
    ctx, _ = _context(recipe={**RECIPE, "output": {"dir": str(tmp_path / "run")}})
    assert ctx.checkpoint_dir("loraprune") == tmp_path / "run-loraprune"
    assert ctx.checkpoint_dir("loraprune", tmp_path / "ck") == tmp_path / "ck"


def test_class_level_checks_receive_the_view(monkeypatch):
    from prunekit.registry import get_registry

    cls = get_registry().get("method", "wanda-sp").factory
    seen = {}

    def check_recipe(klass, run, num_layers):
        seen["check_recipe"] = run
        return []

    def layer_ratio(klass, run, num_layers):
        seen["layer_ratio"] = run
        return per_layer_ratio(run.method.ratio, num_layers, run.method.skip_layers)

    monkeypatch.setattr(cls, "check_recipe", classmethod(check_recipe))
    monkeypatch.setattr(cls, "layer_ratio", classmethod(layer_ratio))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="PruneContext.recipe")
        prunekit.prune(
            tiny_llama(),
            method="wanda-sp",
            ratio=0.4,
            skip_layers=[],
            calibration=torch.randint(0, 128, (4, 8)),
        )
    assert isinstance(seen["check_recipe"], RunView) and isinstance(seen["layer_ratio"], RunView)
