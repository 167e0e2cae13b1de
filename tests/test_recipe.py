from pathlib import Path

import pytest

from prunekit.cli import main
from prunekit.errors import RecipeError
from prunekit.recipe import dump_recipe, load_recipe, parse_override
from prunekit.runner import per_layer_ratio, validate

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_and_round_trip():
    r = load_recipe(None).recipe
    assert r.model.id == "smollm2-135m-instruct"
    assert r.method.skip_layers == [0, 1, 2] and r.method.round_to == 64
    assert load_recipe(__import__("yaml").safe_load(dump_recipe(r))).recipe == r


def test_unknown_key_names_file_line_and_close_match(tmp_path):
    p = write(
        tmp_path, "model:\n  id: smollm2-135m-instruct\nmethod:\n  name: dense\n  ration: 0.4\n"
    )
    with pytest.raises(RecipeError) as err:
        validate(p)
    msg = str(err.value)
    assert f"{p}:5" in msg and "method.ration" in msg and "did you mean 'ratio'" in msg


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, "evaluaton:\n  perplexity: []\n")
    with pytest.raises(
        RecipeError, match=r"r.yaml:1: evaluaton: unknown key .*did you mean 'evaluation'"
    ):
        load_recipe(p)


def test_wrong_type(tmp_path):
    p = write(tmp_path, "calibration:\n  samples: lots\n")
    with pytest.raises(RecipeError, match=r"r.yaml:2: calibration.samples: .*integer"):
        load_recipe(p)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_range_in_file(tmp_path, ratio):
    p = write(tmp_path, f"method:\n  name: dense\n  ratio: {ratio}\n")
    with pytest.raises(RecipeError, match=r"r.yaml:3: method.ratio"):
        load_recipe(p)


def test_ratio_outside_range_by_set():
    with pytest.raises(RecipeError, match=r"--set method.ratio=1.2: method.ratio"):
        load_recipe(None, ["method.ratio=1.2"])


def test_set_coerces_types():
    r = load_recipe(
        None,
        [
            "method.skip_layers=[0, 1]",
            "seed=7",
            "output.save_model=true",
            "evaluation.perplexity.windows=4",
        ],
    ).recipe
    assert r.method.skip_layers == [0, 1] and r.seed == 7 and r.output.save_model is True
    assert r.evaluation.perplexity[0].windows == 4
    assert parse_override("a.b=0.25") == (("a", "b"), 0.25)
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_override("method.ratio")


def test_unknown_method_suggests_and_lists():
    with pytest.raises(RecipeError) as err:
        validate(load_recipe(None, ["method.name=dens"]))
    message = str(err.value)
    assert "did you mean 'dense'" in message and "registered methods: " in message
    listed = message.split("registered methods: ")[1].split(", ")
    assert "dense" in listed and listed == sorted(listed)


def test_slot_not_offered_by_method():
    with pytest.raises(RecipeError, match="method 'dense' has no slot 'probe'"):
        validate(load_recipe(None, ["method.probe.name=random"]))


def test_missing_data_file(tmp_path):
    p = write(tmp_path, "evaluation:\n  perplexity:\n    - path: no/such/file.txt\n")
    with pytest.raises(
        RecipeError, match=r"r.yaml:3: evaluation.perplexity.0.path.*no/such/file.txt"
    ):
        validate(p)


def test_unknown_dataset_suggests():
    with pytest.raises(RecipeError, match="did you mean 'wikitext2'"):
        validate(load_recipe({"evaluation": {"perplexity": [{"dataset": "wikitxt2"}]}}))


def test_inflated_ratio_must_stay_below_one():
    assert per_layer_ratio(0.4, 32, [0, 1, 2]) == 0.44
    assert per_layer_ratio(0.2, 40, [0, 1, 2]) == 0.22
    assert per_layer_ratio(0.4, 40, [0, 1, 2]) == 0.43
    # SmolLM2 has 30 layers: 0.95 * 30/27 = 1.06
    with pytest.raises(RecipeError, match="becomes 1.06 per pruned layer"):
        validate(load_recipe(None, ["method.ratio=0.95"]))


def test_skip_layers_beyond_model():
    with pytest.raises(RecipeError, match="do not exist: the model has 30 layers"):
        validate(load_recipe(None, ["method.skip_layers=[0, 40]"]))


def test_committed_recipes_validate():
    import torch

    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        # a GPU recipe on a machine without one fails on model.device (tested in
        # test_bad_inputs); everything else in it must still validate
        gpu = load_recipe(recipe).recipe.model.device.startswith("cuda")
        extra = ["--set", "model.device=cpu"] if gpu and not torch.cuda.is_available() else []
        assert main(["validate", str(recipe), "--quiet", *extra]) == 0, recipe


def test_cli_validate_errors_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path, "method:\n  name: dense\n  ratio: 2\noutput:\n  dir: out\n")
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert "method.ratio" in err and "Traceback" not in err
    assert main(["apply", str(p)]) == 2
    assert not (tmp_path / "out").exists()
    assert (
        main(
            [
                "apply",
                str(ROOT / "recipes/dense_smollm2.yaml"),
                "--set",
                "method.ratio=1.5",
                "--output",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "o2").exists()


def test_set_error_below_a_slot_points_at_the_override():
    with pytest.raises(RecipeError, match=r"--set method.metric.power=2"):
        validate(
            load_recipe(
                ROOT / "recipes/dense_smollm2.yaml", ["method.name=pp", "method.metric.power=2"]
            )
        )


def test_duplicate_perplexity_labels_rejected():
    entries = [{"dataset": "wikitext2"}, {"dataset": "wikitext2"}]
    with pytest.raises(RecipeError, match="same label 'wikitext2'"):
        validate(load_recipe({"evaluation": {"perplexity": entries}}))


def test_c4_calibration_defaults_to_the_train_carve_out():
    plan = validate(load_recipe(None, ["method.name=pp", "method.ratio=0.2"]))
    assert plan.calibration_source.dataset == "c4" and plan.calibration_source.split == "train"


def _committed_sweeps():
    return sorted(
        [
            *(ROOT / "recipes" / "ablations").glob("*.yaml"),
            *(ROOT / "recipes" / "sweeps").glob("*.yaml"),
        ]
    )


@pytest.mark.parametrize("recipe", _committed_sweeps(), ids=lambda p: p.stem)
def test_every_cell_of_the_committed_sweeps_validates(recipe, tmp_path, monkeypatch):
    """A sweep runs its valid cells and records the others as invalid, so a cell broken by a
    change would only show up hours into a sweep: every cell is checked here (no weights)."""
    from prunekit.sweep import resolve_sweep, validate_cells

    monkeypatch.chdir(tmp_path)  # the recipes' relative runs/ paths land here
    sweep = resolve_sweep(recipe, output=tmp_path / "sweep")
    assert len(sweep.cells) >= 2
    assert validate_cells(sweep) == {}


def test_every_row_of_the_paper_table_script_validates():
    """benchmarks/paper_table.py builds its cells' recipes itself (the LoRA rows add
    method.finetune or a recovery section): each row at each ratio validates, quick or not."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "paper_table", ROOT / "benchmarks" / "paper_table.py"
    )
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    methods = [*table.METHODS, *table.ROWS]
    assert set(table.ROWS) <= set(table.TITLES)
    for quick in (True, False):
        args = argparse.Namespace(
            quick=quick,
            dtype="bfloat16",
            methods=methods,
            ratios=[0.2, 0.4],
            seeds=[0],
            windows=None,
            limit=None,
            timing_dtype="float32",
            timing_ratios=None,
        )
        settings = table.settings_from(args)
        for method, ratio, seed, full in table.cells_of(settings):
            recipe = table.cell_recipe(settings, method, ratio, seed, full)
            validate(load_recipe(recipe), check_output=False)
            if method in table.ROWS:
                name, _, recovery = table.ROWS[method]
                assert recipe["method"]["name"] == name
                assert ("recovery" in recipe) == (recovery is not None)
