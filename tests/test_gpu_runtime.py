"""benchmarks/gpu_runtime.py on its tiny CPU shape: the JSON's structure and invariants
(never its timings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import prunekit

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "gpu_runtime", ROOT / "benchmarks" / "gpu_runtime.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _script()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: no oversubscription
    yield
    torch.set_num_threads(threads)


def test_tiny_run_writes_its_report(bench, tmp_path, one_thread):
    bench.main(["--tiny", "--output", str(tmp_path), "--rounds", "1", "--batches", "1"])
    report = json.loads((tmp_path / "gpu_runtime_tiny.json").read_text())
    assert (tmp_path / "gpu_runtime_tiny.md").is_file()

    s = report["settings"]
    assert s["tiny"] and s["dtype"] == "float32" and report["device"] == "cpu"
    assert report["device_name"] and report["torch"] == torch.__version__
    assert report["command"].startswith("python benchmarks/gpu_runtime.py --tiny")
    assert s["ratios"] == [0.2, 0.4] and s["layers"] == 4

    # one dense time for the table, every other model timed on as many calls
    calls = s["timed_calls_per_model"]
    assert len(report["dense"]["s_all"]) == calls == 1
    assert [(r["model"], r["ratio"]) for r in report["rows"]] == [
        ("pp", 0.2),
        ("static", 0.2),
        ("pp", 0.4),
        ("static", 0.4),
    ]
    for row in report["rows"]:
        rt = row["runtime"]
        for key in (
            "speedup",
            "speedup_spread",
            "time_ratio",
            "flop_limit",
            "beyond_flop_limit",
            "forward_flops_kept_fraction",
        ):
            assert key in rt, key
        assert rt["dense_s_all"] == report["dense"]["s_all"]
        assert len(rt["pruned_s_all"]) == calls
        fraction = report["reduction"][str(row["ratio"])]["forward_flops_kept_fraction"]
        assert rt["forward_flops_kept_fraction"] == fraction and 0 < fraction < 1
        assert rt["flop_limit"] == pytest.approx(1 / fraction) and rt["flop_limit"] > 1
        assert set(row["memory"]) >= {"param_bytes", "peak_allocated_bytes"}
        assert row["memory"]["peak_allocated_bytes"] is None  # CPU: no CUDA peak
        if row["model"] == "pp":
            assert {"probe", "score", "gather", "history"} <= set(rt["overhead_s_per_batch"])
            assert 0 < row["probe_flops_fraction"] < 1
            assert row["memory"]["state_bytes"] > 0
            assert "pp_vs_static_time" in row and len(row["pp_vs_static_spread"]) == 2
    # more pruning keeps fewer FLOPs
    assert report["rows"][2]["runtime"]["flop_limit"] > report["rows"][0]["runtime"]["flop_limit"]

    # the static model has pp's kept counts in every layer (layer 0 skipped: dense)
    for ratio in ("0.2", "0.4"):
        st = report["structures"][ratio]
        assert st["static_matches_pp"] and st["static"] == st["pp"]
        assert st["pp"][0] == {"layer": 0, "heads": 4, "channels": 352}
        assert all(r["heads"] < 4 and r["channels"] < 352 for r in st["pp"][1:])

    # pp keeping every unit, and pp's dense mode, reproduce the dense logits
    checks = report["checks"]
    assert checks["dense_logits_finite"]
    assert checks["pp_ratio0_logits_max_abs_diff"] < 1e-4
    assert checks["pp_dense_mode_logits_max_abs_diff"] == 0

    blocks = report["blocks"]
    assert blocks["layer"] == 2 and blocks["input_shape"] == [4, 32, 128]
    for group, units in (("attn", 4), ("mlp", 352)):
        g = blocks[group]
        assert g["dense_ms"] > 0
        kinds = {(r["kind"], r["ratio"]) for r in g["rows"]}
        assert kinds == {(k, r) for k in ("gathered", "pp") for r in (0.2, 0.4)}
        for r in g["rows"]:
            assert r["units"] == units and 0 < r["kept"] < units
            assert r["runtime"]["flop_limit"] > 1 and "time_ratio" in r["runtime"]
            assert len(r["runtime"]["pruned_s_all"]) == bench.BLOCK_CALLS
            if r["kind"] == "pp":  # pp's own per-block phases
                assert {"probe", "score", "gather", "run", "history"} <= set(
                    r["runtime"]["overhead_s_per_batch"]
                )
        # the MLP block's FLOP limit is exactly channels / kept channels
        for r in g["rows"]:
            if group == "mlp":
                assert r["runtime"]["flop_limit"] == pytest.approx(units / r["kept"])
    text = (tmp_path / "gpu_runtime_tiny.md").read_text()
    assert "## Whole model" in text and "## Blocks of layer 2" in text and torch.__version__ in text


def test_shared_clone_shares_weights_and_static_slices_a_copy(bench, one_thread):
    model = bench.build_model(bench.TINY, 2, torch.device("cpu"), torch.float32, seed=0)
    clone = bench.shared_clone(model)
    assert clone is not model and clone.model.layers[0] is not model.model.layers[0]
    assert all(a is b for a, b in zip(clone.parameters(), model.parameters(), strict=True))
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    structure = [
        {"layer": 0, "heads": 4, "channels": 352},
        {"layer": 1, "heads": 2, "channels": 128},
    ]
    static = bench.static_like(clone, structure)
    assert bench.live_shape(static) == structure
    assert bench.live_shape(model)[1] == {"layer": 1, "heads": 4, "channels": 352}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_pp_at_ratio_zero_gives_the_dense_logits(bench, one_thread):
    model = bench.build_model(bench.TINY, 3, torch.device("cpu"), torch.float32, seed=1)
    ids = torch.randint(3, 512, (3, 24), generator=torch.Generator().manual_seed(2))
    calib = torch.randint(3, 512, (4, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        outcome = prunekit.prune(
            bench.shared_clone(model), method="pp", ratio=0.0, calibration=calib, skip_layers=[0]
        )
        torch.testing.assert_close(outcome.model(input_ids=ids).logits, dense, rtol=0, atol=1e-5)
