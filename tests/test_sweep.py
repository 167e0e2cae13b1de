"""`prunekit sweep`: cells, executors (local, submitit's local, a third-party one), failures,
re-runs, concurrent sweeps, the table; on a tiny model (each cell is a process of seconds)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from sweep_setup import sweep_workdir

from prunekit import hookimpl
from prunekit.cli import main
from prunekit.errors import RecipeError
from prunekit.runner import apply
from prunekit.sweep import (
    collect,
    load_sweep,
    parse_grid,
    resolve_sweep,
    run_cell,
    run_sweep,
    split_values,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny LLaMA, a copy whose weights file is corrupt (its config validates; loading it
    fails, as a truncated download would), a text file, and a recipe."""
    return sweep_workdir(tmp_path_factory.mktemp("sweep"), sampling="random")


def _models(root: Path) -> str:
    return f"model.id={root / 'tiny'},{root / 'broken'}"


# ------------------------------------------------------------------------------------------
# building cells
# ------------------------------------------------------------------------------------------


def test_grid_values_split_at_top_level_commas_and_parse_as_yaml():
    assert split_values("0.2, 0.4,[1, 2],{a: 1, b: 2},'x,y'") == [
        "0.2",
        "0.4",
        "[1, 2]",
        "{a: 1, b: 2}",
        "'x,y'",
    ]
    assert parse_grid(["method.ratio=0.2,0.4", "method.skip_layers=[],[0, 1]"]) == {
        "method.ratio": [0.2, 0.4],
        "method.skip_layers": [[], [0, 1]],
    }
    for bad in ("method.ratio", "=0.2", "method.ratio=0.2,,0.4"):
        with pytest.raises(RecipeError, match="--grid"):
            parse_grid([bad])


def test_cells_are_the_product_of_variants_grid_and_seeds(workdir, tmp_path):
    recipe = yaml.safe_load((workdir / "r.yaml").read_text())
    recipe["seed"] = 5
    recipe["sweep"] = {
        "grid": {"method.ratio": [0.25, 0.5]},
        "seeds": 2,
        "variants": {"wanda": {}, "flap": {"method.name": "flap"}},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    sweep = resolve_sweep(path, output=tmp_path / "out")
    assert len(sweep.cells) == 2 * 2 * 2 and len({c.key for c in sweep.cells}) == 8
    assert sweep.label_keys == ["variant", "method.ratio"]
    first = sweep.cells[0]
    assert first.labels == {"variant": "wanda", "method.ratio": "0.25"} and first.seed == 5
    assert [c.seed for c in sweep.cells[:2]] == [5, 6]
    assert first.recipe.sweep is None and first.recipe.method.ratio == 0.25
    flap = [c for c in sweep.cells if c.labels["variant"] == "flap"]
    assert all(c.recipe.method.name == "flap" for c in flap)
    # the command line adds a grid axis and replaces the seeds; the key is the recipe's
    wider = resolve_sweep(path, grid=["method.round_to=1,2"], seeds=1, output=tmp_path / "o2")
    assert len(wider.cells) == 2 * 2 * 2
    again = resolve_sweep(path, output=tmp_path / "elsewhere")
    assert [c.key for c in again.cells] == [c.key for c in sweep.cells]  # not output.dir


def test_bad_sweeps_fail_before_anything_runs(workdir, tmp_path):
    r = workdir / "r.yaml"
    with pytest.raises(
        RecipeError,
        match=r"(?s)sweep cell \(runtime\.batchez=1.*sweep value runtime.batchez=1: .*unknown key",
    ):
        resolve_sweep(r, grid=["runtime.batchez=1"])
    with pytest.raises(RecipeError, match="same recipe"):
        resolve_sweep(r, grid=["method.ratio=0.5,0.50"])
    with pytest.raises(RecipeError, match="sweep.seeds"):
        resolve_sweep(r, grid=["seed=1,2"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecipeError, match="existing file"):
        resolve_sweep(r, output=tmp_path / "file")
    # every cell invalid: the sweep is wrong, nothing is written
    out = tmp_path / "none"
    code = main(["sweep", str(r), "--grid", "method.name=nope,nada", "-o", str(out), "-q"])
    assert code == 2 and not out.exists()
    code = main(["sweep", str(r), "--grid", "method.ratoi=0.2,0.3", "-o", str(out), "-q"])
    assert code == 2 and not out.exists()  # a method option the method does not take
    assert main(["sweep", str(r), "--detach", "-o", str(out), "-q"]) == 2  # local can't detach
    assert main(["sweep", str(r), "-x", "jobz=2", "-o", str(out), "-q"]) == 2
    assert main(["sweep", "--status", str(tmp_path), "-q"]) == 2
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# running: local executor, a failing cell, re-runs, equality with apply
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_sweep(workdir):
    out = workdir / "local"
    code = main(
        [
            "sweep",
            str(workdir / "r.yaml"),
            "--grid",
            _models(workdir),
            "--seeds",
            "2",
            "-j",
            "2",
            "-o",
            str(out),
            "-q",
        ]
    )
    return code, out


def test_a_failing_cell_is_recorded_and_the_others_finish(local_sweep, workdir, capsys):
    code, out = local_sweep
    assert code == 1  # some cells failed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["states"]["done"] == 2 and summary["states"]["failed"] == 2
    good, bad = summary["rows"]
    assert good["labels"] == {"model.id": str(workdir / "tiny")} and good["seeds"] == [0, 1]
    ppl = good["metrics"]["text.ppl"]
    assert ppl["n"] == 2 and ppl["min"] <= ppl["mean"] <= ppl["max"]
    assert bad["seeds"] == [] and "could not load" in bad["failed"][0]
    table = (out / "table.md").read_text()
    assert "seeds 0, 1: could not load local model directory" in table
    assert "2 done, 2 failed" in table
    assert summary["unknown_metrics"] == []
    csv_head = (out / "table.csv").read_text().splitlines()[0]
    assert csv_head.startswith("model.id,seeds,text.ppl_mean,text.ppl_std")
    assert (out / "plot.png").stat().st_size > 1000


def test_rerun_skips_finished_cells(local_sweep, workdir):
    _, out = local_sweep
    _, cells = load_sweep(out)
    done = [c for c in cells if c.status()["state"] == "done"]
    before = {c.key: (c.dir / "status.json").read_text() for c in done}
    code = main(
        [
            "sweep",
            str(workdir / "r.yaml"),
            "--grid",
            _models(workdir),
            "--seeds",
            "2",
            "-o",
            str(out),
            "-q",
        ]
    )
    assert code == 1  # the broken cells ran (and failed) again
    assert {c.key: (c.dir / "status.json").read_text() for c in done} == before
    assert all(json.loads(t)["attempt"] == 1 for t in before.values())


def test_sweep_numbers_equal_apply_one_by_one(local_sweep, workdir, tmp_path):
    _, out = local_sweep
    _, cells = load_sweep(out)
    for cell in cells:
        if cell.status()["state"] != "done":
            continue
        swept = cell.result()
        # the base recipe with the cell's overrides, as one would type them
        overrides = json.loads((cell.dir / "cell.json").read_text())["overrides"]
        alone = apply(workdir / "r.yaml", overrides, output=tmp_path / cell.key)
        assert alone["metrics"]["text"]["ppl"] == swept["metrics"]["text"]["ppl"]
        assert alone["structure"] == swept["structure"] and alone["seed"] == cell.seed
    # and `prunekit apply` of the cell's own recipe.yaml
    cell = next(c for c in cells if c.status()["state"] == "done")
    assert main(["apply", str(cell.dir / "recipe.yaml"), "-o", str(tmp_path / "again"), "-q"]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["metrics"]["text"]["ppl"] == cell.result()["metrics"]["text"]["ppl"]


def test_a_metric_no_cell_has_is_named_with_what_exists(local_sweep, capsys):
    _, out = local_sweep
    manifest = json.loads((out / "sweep.json").read_text())
    manifest["sweep"]["metrics"] = ["wikitext2.ppl"]  # the label is `text` here
    (out / "sweep.json").write_text(json.dumps(manifest))
    try:
        summary = collect(out)
        assert summary["unknown_metrics"] == ["wikitext2.ppl"]
        assert (
            "No finished cell has wikitext2.ppl; metrics they have include text.ppl"
            in (out / "table.md").read_text()
        )
    finally:
        manifest["sweep"]["metrics"] = []
        (out / "sweep.json").write_text(json.dumps(manifest))
        collect(out)


def test_force_runs_finished_cells_again(workdir, tmp_path):
    out = tmp_path / "f"
    args = ["sweep", str(workdir / "r.yaml"), "-o", str(out), "-q"]
    assert main(args) == 0
    (cell,) = load_sweep(out)[1]
    assert cell.status()["attempt"] == 1
    assert main([*args, "--force"]) == 0
    assert cell.status()["attempt"] == 2 and cell.status()["state"] == "done"


# ------------------------------------------------------------------------------------------
# submitit (its local executor), detaching, --status
# ------------------------------------------------------------------------------------------


def test_submitit_local_executor_records_the_failure_too(local_sweep, workdir, tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "sub"
    code = main(
        [
            "sweep",
            str(workdir / "r.yaml"),
            "--grid",
            _models(workdir),
            "--executor",
            "submitit",
            "-x",
            "cluster=local",
            "--time-min",
            "5",
            "-o",
            str(out),
            "-q",
        ]
    )
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["states"]["done"] == 1 and summary["states"]["failed"] == 1
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["executor_info"]["cluster"] == "local"
    assert len(manifest["executor_info"]["job_ids"]) == 2
    # the same cell (seed 0) as the local executor's, the same number
    local = {
        r["labels"]["model.id"]: r
        for r in json.loads((local_sweep[1] / "summary.json").read_text())["rows"]
    }
    row = summary["rows"][0]
    assert (
        row["metrics"]["text.ppl"]["values"]
        == local[row["labels"]["model.id"]]["metrics"]["text.ppl"]["values"][:1]
    )


def test_detach_then_status_collects(workdir, tmp_path, capsys):
    pytest.importorskip("submitit")
    out = tmp_path / "det"
    code = main(
        [
            "sweep",
            str(workdir / "r.yaml"),
            "--grid",
            "method.ratio=0.25,0.5",
            "--executor",
            "submitit",
            "-x",
            "cluster=local",
            "--detach",
            "-o",
            str(out),
        ]
    )
    assert code == 0 and "prunekit sweep --status" in capsys.readouterr().out
    _, cells = load_sweep(out)
    deadline = time.time() + 240
    while time.time() < deadline and any(c.status()["state"] != "done" for c in cells):
        time.sleep(0.5)
    assert main(["sweep", "--status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 cells: 2 done" in printed and "| 0.25 |" in printed


def test_submitit_executor_options_are_checked():
    from prunekit.registry import get_registry

    registry = get_registry()
    with pytest.raises(RecipeError, match="time_min"):
        registry.create("executor", "submitit", {"time_min": -1})
    with pytest.raises(RecipeError, match="cluster"):
        registry.create("executor", "submitit", {"cluster": "k8s"})
    with pytest.raises(RecipeError, match="unknown option 'gpus'"):
        registry.create("executor", "submitit", {"gpus": 1})
    ex = registry.create("executor", "submitit", {"partition": "gpu", "sbatch": {"qos": "hi"}})
    assert ex.options["sbatch"] == {"qos": "hi"} and ex.detaches


def test_cluster_flags_reach_the_executor(workdir, tmp_path, monkeypatch):
    """--partition, --gpus-per-cell, --sbatch ... end up in the submitit executor's options
    (nothing is submitted: run_sweep is replaced)."""
    import prunekit.sweep as sweep_module

    seen = {}

    def fake_run(sweep, force=False, wait=True, report=None, registry=None):
        seen["executor"], seen["wait"] = sweep.config.executor, wait
        raise RecipeError("stop here")

    monkeypatch.setattr(sweep_module, "run_sweep", fake_run)
    code = main(
        [
            "sweep",
            str(workdir / "r.yaml"),
            "--executor",
            "submitit",
            "--partition",
            "gpu",
            "--gpus-per-cell",
            "1",
            "--cpus-per-cell",
            "8",
            "--mem-gb",
            "32",
            "--time-min",
            "90",
            "--sbatch",
            "account=me",
            "--sbatch",
            "qos=high",
            "--detach",
            "-o",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2 and seen["wait"] is False
    ex = seen["executor"]
    assert ex.name == "submitit" and ex.options == {
        "partition": "gpu",
        "gpus_per_cell": 1,
        "cpus_per_cell": 8,
        "mem_gb": 32.0,
        "time_min": 90,
        "sbatch": {"account": "me", "qos": "high"},
    }


def test_requeue_resubmits_the_same_cell():
    pytest.importorskip("submitit")
    from prunekit.sweep.executors import CellJob

    again = CellJob().checkpoint("/some/cell")
    assert isinstance(again.function, CellJob) and again.args == ("/some/cell",)


# ------------------------------------------------------------------------------------------
# concurrency, third-party executors
# ------------------------------------------------------------------------------------------


def test_two_sweeps_on_one_directory_run_each_cell_once(workdir, tmp_path):
    out = tmp_path / "shared"
    sweeps = [
        resolve_sweep(workdir / "r.yaml", grid=["method.ratio=0.25,0.5"], output=out)
        for _ in range(2)
    ]
    results, errors = [], []

    def go(sweep):
        try:
            results.append(run_sweep(sweep))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(s,)) for s in sweeps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 2
    assert all(r["states"]["done"] == 2 for r in results)
    for cell in load_sweep(out)[1]:
        assert cell.status()["attempt"] == 1  # the second sweep waited, then skipped it
    assert collect(out)["states"]["done"] == 2
    assert not [p for p in out.rglob(".*") if p.name != ".lock"]  # no temporary files left


class InlineExecutor:
    """A third-party executor: runs the cells in this process, one after the other."""

    detaches = False

    def __init__(self, tag: str = "inline"):
        self.tag = tag

    def run(self, cells, folder, wait=True):
        return {"tag": self.tag, "states": [run_cell(c)["state"] for c in cells]}


class InlinePlugin:
    @hookimpl
    def prunekit_register_executors(self, register):
        register("inline", InlineExecutor, "cells in this process")


def test_a_plugin_executor_runs_a_sweep(workdir, tmp_path, prunekit_pm):
    from prunekit.registry import get_registry

    prunekit_pm.register_plugin(InlinePlugin(), "inline-plugin")
    registry = get_registry(prunekit_pm)
    assert registry.get("executor", "inline").plugin == "inline-plugin"
    out = tmp_path / "inline"
    sweep = resolve_sweep(
        workdir / "r.yaml",
        grid=["method.ratio=0.25,0.5"],
        output=out,
        executor="inline",
        executor_options={"tag": "mine"},
    )
    summary = run_sweep(sweep, registry=registry)
    assert summary["states"]["done"] == 2
    info = json.loads((out / "sweep.json").read_text())["executor_info"]
    assert info == {"tag": "mine", "states": ["done", "done"]}


def test_sweeps_sharing_a_cells_directory_run_common_cells_once(workdir, tmp_path, prunekit_pm):
    from prunekit.registry import get_registry

    prunekit_pm.register_plugin(InlinePlugin(), "inline-plugin")
    registry = get_registry(prunekit_pm)
    shared = tmp_path / "cells"

    def sweep(name, ratios):  # the recipe's own sweep section, with sweep.cells shared
        recipe = yaml.safe_load((workdir / "r.yaml").read_text())
        recipe["sweep"] = {
            "cells": str(shared),
            "dir": str(tmp_path / name),
            "grid": {"method.ratio": ratios},
            "executor": {"name": "inline"},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return resolve_sweep(path)

    first = run_sweep(sweep("a", [0.5]), registry=registry)
    assert first["states"]["done"] == 1
    second_sweep = sweep("b", [0.25, 0.5])
    summary = run_sweep(second_sweep, registry=registry)
    assert summary["states"]["done"] == 2
    info = json.loads((tmp_path / "b" / "sweep.json").read_text())
    assert info["executor_info"]["states"] == ["done"]  # only the 0.25 cell ran
    assert sorted(p.name for p in shared.iterdir()) == sorted(c.key for c in second_sweep.cells)
    assert all(c.status()["attempt"] == 1 for c in second_sweep.cells)
    assert (tmp_path / "a" / "table.md").is_file() and (tmp_path / "b" / "table.md").is_file()


def test_equal_compute_timing_stage_rebuilds_and_times_every_finished_cell(local_sweep):
    """benchmarks/equal_compute.py --time: each finished cell rebuilt from its own recipe (its
    structure checked against what the cell measured) and timed with one dense model."""
    import importlib.util

    _, out = local_sweep
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "equal_compute.py"
    spec = importlib.util.spec_from_file_location("equal_compute", path)
    ec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ec)
    times = ec.time_cells(out, rounds=2, batches=1, batch_size=1)
    _, cells = load_sweep(out)
    done = {c.key for c in cells if c.status()["state"] == "done"}
    assert {r["key"] for r in times["rows"]} == done and len(done) == 2  # the failed are left
    assert len(times["dense"]["s_all"]) == 2 and times["batches"] == [[1, 16]]
    for row in times["rows"]:
        assert len(row["s_all"]) == 2 and row["time_vs_dense"] > 0
        low, high = row["time_vs_dense_spread"]
        assert low <= high
    # a stale cell (its recorded MACs differ from its recipe's) is refused, not timed
    cell = next(c for c in cells if c.key in done)
    results = cell.run_dir / "results.json"
    saved = results.read_text()
    try:
        data = json.loads(saved)
        data["reduction"]["decoder_macs_per_token"] += 1000
        results.write_text(json.dumps(data))
        with pytest.raises(SystemExit, match="stale"):
            ec.time_cells(out, rounds=1, batches=1)
    finally:
        results.write_text(saved)


def test_an_absent_optional_section_changes_no_cell_key(workdir):
    """Cells run before prunekit gained an optional section (recovery) keep their keys: a
    recipe without it neither spells it out in its resolved form nor hashes it."""
    import hashlib

    from prunekit.recipe import dump_recipe, load_recipe
    from prunekit.sweep import cell_key

    recipe = load_recipe(workdir / "r.yaml").recipe
    assert "recovery" not in yaml.safe_load(dump_recipe(recipe))
    data = recipe.model_dump(mode="json")
    for section in ("sweep", "recovery"):
        data.pop(section)
    data["output"].pop("dir")
    before = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    assert cell_key(recipe) == before  # the key the section-less prunekit computed
    with_recovery = load_recipe(workdir / "r.yaml", ["recovery.path=x.txt"]).recipe
    assert cell_key(with_recovery) != before


def test_a_gpu_sweep_submits_from_a_machine_without_a_gpu(workdir, tmp_path, monkeypatch):
    """A cuda recipe is submitted when GPUs are requested for each cell (the login node has
    none); each cell checks its device first on its own node and fails fast there (here, on
    this CPU machine, through submitit's local executor). Without GPUs requested it is an
    error at submission."""
    pytest.importorskip("submitit")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = [
        "sweep",
        str(workdir / "r.yaml"),
        "--set",
        "model.device=cuda",
        "--grid",
        "method.ratio=0.25,0.5",
        "--executor",
        "submitit",
        "-x",
        "cluster=local",
        "--time-min",
        "5",
        "-q",
    ]
    code = main([*base, "-o", str(tmp_path / "none")])
    assert code == 2 and not (tmp_path / "none").exists()
    out = tmp_path / "gpus"
    code = main([*base, "--gpus-per-cell", "1", "-o", str(out)])
    assert code == 1  # submitted; every cell failed on its node
    summary = json.loads((out / "summary.json").read_text())
    assert summary["states"]["failed"] == 2
    for status in out.glob("cells/*/status.json"):
        record = json.loads(status.read_text())
        assert record["state"] == "failed" and "model.device" in record["error"]
        assert "not available" in record["error"]


def test_a_dry_run_shows_the_submission_and_writes_nothing(workdir, tmp_path, capsys):
    pytest.importorskip("submitit")
    out = tmp_path / "dry"
    code = main(
        [
            "sweep",
            str(workdir / "r.yaml"),
            "--grid",
            "method.ratio=0.25,0.5",
            "--executor",
            "submitit",
            "-x",
            "cluster=slurm",
            "--partition",
            "gpu",
            "--gpus-per-cell",
            "2",
            "--sbatch",
            "qos=high",
            "--time-min",
            "30",
            "-o",
            str(out),
            "--dry-run",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "dry run: nothing written, nothing submitted" in text
    assert text.count(": to run") == 2 and "method.ratio=0.25" in text
    executor = json.loads(text.strip().splitlines()[-1].split("executor: ", 1)[1])
    assert executor["cluster"] == "slurm" and executor["array_size"] == 2
    assert executor["parameters"] == {
        "timeout_min": 30,
        "name": "prunekit-sweep",
        "gpus_per_node": 2,
        "slurm_partition": "gpu",
        "slurm_additional_parameters": {"qos": "high"},
    }


def test_a_method_then_variant_sweeps_like_any_method(workdir, tmp_path):
    """``method.then`` in a variant, with a grid over the later stage's target: each cell is
    the chain (its stages in results.json), keyed apart by the later target, and gives the
    numbers of ``apply`` of the same recipe."""
    recipe = yaml.safe_load((workdir / "r.yaml").read_text())
    recipe["sweep"] = {
        "variants": {
            "width": {},
            "attn+width": {
                "method.name": "attn-drop",
                "method.ratio": 0.5,
                "method.then": {"name": "wanda-sp", "ratio": 0.25, "skip_layers": []},
            },
        },
        "grid": {"method.then.ratio": [0.25, 0.5]},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    # a grid over a key only a variant sets: the width variant has no ``then`` to set it in
    with pytest.raises(RecipeError, match="method.then"):
        resolve_sweep(path, output=tmp_path / "bad")
    recipe["sweep"]["variants"].pop("width")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "out"
    sweep = resolve_sweep(path, output=out)
    assert len({c.key for c in sweep.cells}) == 2
    summary = run_sweep(sweep)
    assert summary["states"]["done"] == 2, summary
    for cell in sweep.cells:
        swept = cell.result()
        stages = [s["method"] for s in swept["stages"]]
        assert stages == ["attn-drop", "wanda-sp"], stages
        alone = apply(cell.dir / "recipe.yaml", output=tmp_path / f"alone-{cell.key}")
        assert alone["structure"] == swept["structure"]
        assert alone["metrics"]["text"]["ppl"] == swept["metrics"]["text"]["ppl"]
    a, b = (c.result() for c in sweep.cells)
    assert a["structure"] != b["structure"]  # the later stage's ratio reached each cell
