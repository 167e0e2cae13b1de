"""benchmarks/ablations.py and benchmarks/equal_compute.py: numbers come from sweep summaries
(synthetic here), verdicts and interpolation by hand."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stats(values):
    from prunekit.sweep import summarize

    return {**summarize(values), "values": values}


def _row(labels, ppl, macs):
    return {
        "labels": labels,
        "seeds": list(range(len(ppl))),
        "failed": [],
        "unfinished": 0,
        "metrics": {
            "wikitext2-test.ppl": _stats(ppl),
            "reduction.flops_kept_fraction": _stats(macs),
        },
    }


def test_ablation_verdicts_read_the_numbers():
    ab = _script("ablations")

    def seeded(values):
        return {**_stats(values), "seeds": [0, 1]}

    rows = {
        "default": seeded([20.0, 30.0]),
        "random": seeded([23.0, 31.0]),
        "mixed": seeded([19.0, 32.0]),
        "better": seeded([19.0, 29.5]),
    }
    # paired by seed: seed 1's windows are harder for every variant
    assert ab.verdict(rows, "default", "random").startswith("holds: ")
    assert "lower in 2 of 2" in ab.verdict(rows, "default", "random")
    assert ab.verdict(rows, "default", "mixed").startswith("mixed: ")
    assert ab.verdict(rows, "default", "better").startswith("**does not hold**")
    assert ab.verdict(rows, "default", "missing") is None


def test_a_claim_of_no_effect_holds_within_its_tolerance_on_every_seed():
    ab = _script("ablations")

    def seeded(values):
        return {
            "n": len(values),
            "mean": sum(values) / len(values),
            "values": values,
            "seeds": list(range(len(values))),
        }

    rows = {
        "default": seeded([100.0, 120.0]),
        "near": seeded([104.0, 115.0]),
        "far": seeded([110.0, 140.0]),
        "half": seeded([104.0, 140.0]),
    }
    assert ab.close(rows, "near", "default", 5).startswith("holds: ")
    assert "+4.0%, -4.2% over the same seeds, within 5% in 2 of 2" in ab.close(
        rows, "near", "default", 5
    )
    assert ab.close(rows, "far", "default", 5).startswith("**does not hold**")
    assert ab.close(rows, "half", "default", 5).startswith("mixed: ")
    assert ab.close(rows, "missing", "default", 5) is None
    summary = {
        "rows": [
            _row({"variant": "default"}, [100.0, 120.0], [0.7, 0.7]),
            _row({"variant": "calib-512"}, [104.0, 115.0], [0.7, 0.7]),
        ]
    }
    text = "\n".join(ab.render_one("calibration_size", summary))
    assert "- calib-512 within 5% of default: holds: " in text
    assert "- calib-2000 within 5% of default: not measured yet" in text


def test_ablation_section_shows_the_summary_values():
    ab = _script("ablations")
    summary = {
        "rows": [
            _row({"variant": "default"}, [20.0, 22.0], [0.7, 0.7]),
            _row({"variant": "random"}, [25.0, 27.0], [0.7, 0.7]),
        ]
    }
    text = "\n".join(ab.render_one("probe_ranking", summary))
    assert "| default | 2 | 21.00 ± 1.41 | 20.00, 22.00 |" in text
    want = (100 * (25 / 20 - 1) + 100 * (27 / 22 - 1)) / 2  # seed by seed
    assert f"| random | 2 | 26.00 ± 1.41 | 25.00, 27.00 | {want:+.1f}% |" in text
    assert "default below random: holds: default 21.00 vs random 26.00" in text
    assert "full-batch below default: not measured yet" in text


def test_equal_compute_interpolates_log_linearly_and_never_extrapolates():
    ec = _script("equal_compute")
    points = [(0.2, 0.6, 30.0), (0.4, 0.8, 20.0)]
    assert ec.interpolate(points, 0.6) == pytest.approx(30.0)
    mid = ec.interpolate(points, 0.7)
    assert mid == pytest.approx(math.sqrt(30.0 * 20.0))
    assert ec.interpolate(points, 0.9) is None and ec.interpolate(points, 0.5) is None


def test_equal_compute_table_compares_at_the_uniform_methods_macs(tmp_path):
    ec = _script("equal_compute")
    summary = {
        "rows": [
            _row({"variant": "pp", "method.ratio": "0.2"}, [20.0], [0.8]),
            _row({"variant": "pp", "method.ratio": "0.4"}, [30.0], [0.6]),
            _row({"variant": "flap", "method.ratio": "0.2"}, [24.0], [0.75]),
            _row({"variant": "flap", "method.ratio": "0.4"}, [40.0], [0.55]),
        ]
    }
    text = ec.markdown(summary, None)
    want = math.exp(0.75 * math.log(40.0) + 0.25 * math.log(24.0))  # flap at 0.6
    assert f"| 0.4 | 60.0% | 30.00 | {want:.2f} |" in text
    assert "| 0.2 | 80.0% | 20.00 | - |" in text  # beyond flap's measured range
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# table\n\nkept\n")
    ec.splice(doc, text)
    ec.splice(doc, text)  # replaced, not appended twice
    out = doc.read_text()
    assert out.startswith("# table\n\nkept\n") and out.count(ec.START) == 1


def test_equal_compute_time_table_and_figure_come_from_the_timing_stage(tmp_path):
    ec = _script("equal_compute")
    summary = {
        "rows": [
            _row({"variant": "pp", "method.ratio": "0.2"}, [20.0], [0.8]),
            _row({"variant": "pp", "method.ratio": "0.4"}, [30.0], [0.6]),
            _row({"variant": "flap", "method.ratio": "0.4"}, [40.0], [0.55]),
        ]
    }
    untimed = ec.markdown(summary, None)
    assert "run the timing stage" in untimed
    times = {
        "command": "python benchmarks/equal_compute.py --time",
        "rounds": 3,
        "batches": [[20, 512]],
        "machine": "x86_64, 2 torch threads",
        "dtype": "float32",
        "device": "cpu",
        "dense": {"s_all": [2.0, 2.0, 2.0], "s_median": 2.0},
        "rows": [
            {
                "labels": {"variant": "pp", "method.ratio": "0.4"},
                "seed": 0,
                "dynamic": True,
                "flops_kept_fraction": 0.6,
                "time_vs_dense": 0.75,
                "time_vs_dense_spread": [0.7, 0.8],
            },
            {
                "labels": {"variant": "pp", "method.ratio": "0.4"},
                "seed": 1,
                "dynamic": True,
                "flops_kept_fraction": 0.6,
                "time_vs_dense": 0.5,
                "time_vs_dense_spread": [0.5, 0.5],
            },
            {
                "labels": {"variant": "flap", "method.ratio": "0.4"},
                "seed": 0,
                "dynamic": False,
                "flops_kept_fraction": 0.55,
                "time_vs_dense": 0.6123,
                "time_vs_dense_spread": [0.6, 0.65],
            },
            {
                "labels": {"variant": "wanda-sp", "method.ratio": "0.4"},
                "seed": 0,
                "dynamic": False,
                "flops_kept_fraction": 0.6,
                "time_vs_dense": 0.6,
                "time_vs_dense_spread": [0.6, 0.6],
            },
        ],
    }
    text = ec.markdown(summary, "img.png", times)
    assert "| 0.4 | 0.750 [0.700-0.800] | 0.612 [0.600-0.650] |" in text  # seed 0's
    assert "| 0.2 | - | - |" in text and "2.00 s per batch" in text
    assert "1 batch of 20x512 tokens" in text
    # pp against the static method keeping its MACs (wanda-sp, not flap): 0.75 / 0.6
    assert "pp's time per batch is +25.0% to +25.0% against the static methods'" in text
    assert "measured time" in text
    assert ec.plot(summary, tmp_path / "p.png", times)
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_recovery_table_reads_the_sweep_and_pairs_rows(tmp_path):
    rec = _script("recovery")

    def row(variant, ratio, ppl, loss=None, key="recovery"):
        r = _row({"variant": variant, "method.ratio": ratio}, [ppl], [0.67])
        if loss:
            prefix = "recovery" if key == "recovery" else "loraprune.finetune"
            r["metrics"][f"{prefix}.loss_first"] = _stats([loss[0]])
            r["metrics"][f"{prefix}.loss_last"] = _stats([loss[1]])
        return r

    summary = {
        "rows": [
            row("llm-pruner", "0.4", 200.0),
            row("llm-pruner+lora", "0.4", 100.0, (4.0, 3.5)),
            row("loraprune", "0.4", 150.0, (3.9, 3.6), key="loraprune"),
        ]
    }
    text = rec.markdown(summary)
    assert "| 0.4 | llm-pruner+lora | 67.0% | 100.00 | 4.000 -> 3.500 |" in text
    assert "| 0.4 | loraprune | 67.0% | 150.00 | 3.900 -> 3.600 |" in text
    assert "| 0.4 | llm-pruner | 67.0% | 200.00 | - |" in text
    assert "- ratio 0.4, llm-pruner: 200.00 -> 100.00 (-50.0%)" in text
    assert "PP without any fine-tune" not in text  # no pp row in this summary
    summary["rows"].append(row("pp", "0.4", 120.0))
    text = rec.markdown(summary)
    assert "PP without any fine-tune at 0.4 (120.00) against each row" in text
    assert "- below llm-pruner (200.00, PP -40.0%)" in text
    assert "- above llm-pruner+lora (100.00, PP +20.0%)" in text
    assert "- below loraprune (150.00, PP -20.0%)" in text
    assert "PP without fine-tuning is below 0 of the 1 fine-tuned rows" in text
    doc = tmp_path / "b.md"
    doc.write_text("# t\n")
    rec.splice(doc, text)
    rec.splice(doc, text)
    assert doc.read_text().count(rec.START) == 1


def _kd_row(method, ratio, recovery, ppl, loss=None, rss=None):
    return {
        "name": f"{method}-r{ratio:g}-{recovery}",
        "method": method,
        "ratio": ratio,
        "recovery": recovery,
        "ppl": ppl,
        "loss_first": loss and loss[0],
        "loss_last": loss and loss[1],
        "recovery_s": None if loss is None else 600.0,
        "peak_rss_bytes": rss,
        "failed": None,
    }


def test_recovery_table_takes_the_lora_rows_from_the_distillation_cells_only_when_they_match():
    """--lora-rows-from: the static methods' +lora rows become the recovery_kd ce cells, marked;
    a different pruned model (its bare perplexity) or other windows (the first step's loss)
    refuse the join with a line saying which."""
    rec = _script("recovery")

    def row(variant, ppl, loss=None):
        r = _row({"variant": variant, "method.ratio": "0.4"}, [ppl], [0.67])
        if loss:
            r["metrics"]["recovery.loss_first"] = _stats([loss[0]])
            r["metrics"]["recovery.loss_last"] = _stats([loss[1]])
        return r

    summary = {
        "rows": [
            row("wanda-sp", 144.0),
            row("wanda-sp+lora", 91.0, (4.9, 4.5)),
            row("loraprune+lora", 148.0, (3.7, 5.3)),
            row("pp", 100.0),
        ]
    }
    kd = {
        "protocol": "recipes/sweeps/recovery_smollm2.yaml",
        "rows": [
            _kd_row("wanda-sp", 0.4, "none", 144.0),
            _kd_row("wanda-sp", 0.4, "ce", 84.0, (4.9, 4.4)),
            _kd_row("wanda-sp", 0.4, "kd", 80.0, (1.0, 0.5)),
        ],
    }
    text = rec.markdown(summary, kd, "k.json")
    assert "| 0.4 | wanda-sp+lora * | 67.0% | 84.00 | 4.900 -> 4.400 |" in text
    assert "| 0.4 | loraprune+lora | 67.0% | 148.00 | 3.700 -> 5.300 |" in text  # not a static row
    assert "`k.json` (`--lora-rows-from`): the rows marked * are the `ce` cells" in text
    assert "- ratio 0.4, wanda-sp: 144.00 -> 84.00 (-41.7%)" in text
    assert "- below wanda-sp+lora" not in text and "- above wanda-sp+lora (84.00" in text
    assert " * |" not in rec.markdown(summary)  # without the flag: the sweep's own rows

    other = {**kd, "rows": [_kd_row("wanda-sp", 0.4, "none", 150.0), *kd["rows"][1:]]}
    with pytest.raises(SystemExit, match="144.0 in the sweep: not the same pruned model"):
        rec.markdown(summary, other, "k.json")
    other = {**kd, "rows": [kd["rows"][0], _kd_row("wanda-sp", 0.4, "ce", 84.0, (4.8, 4.4))]}
    with pytest.raises(SystemExit, match="first fine-tune loss 4.800000 there, 4.900000"):
        rec.markdown(summary, other, "k.json")
    with pytest.raises(SystemExit, match="no finished wanda-sp ce and none cells at 0.4"):
        rec.markdown(summary, {**kd, "rows": kd["rows"][:1]}, "k.json")
    with pytest.raises(SystemExit, match="its protocol is 'elsewhere.yaml'"):
        rec.markdown(summary, {**kd, "protocol": "elsewhere.yaml"}, "k.json")


def test_the_paper_table_keeps_every_other_scripts_section_of_the_page():
    """benchmarks/paper_table.py rewrites docs/benchmarks.md: the sections other scripts own
    (whatever their names, recovery-kd's included) stay, in their order, once each."""
    pt = _script("paper_table")
    old = (
        "# old table\n\nstale\n\n<!-- recovery:start -->\nR\n<!-- recovery:end -->\n\n"
        "hand text\n\n<!-- recovery-kd-steps:start -->\nS\n<!-- recovery-kd-steps:end -->\n"
    )
    text = pt.keep_sections("# new table\n", old)
    assert text == (
        "# new table\n\n<!-- recovery:start -->\nR\n<!-- recovery:end -->\n\n"
        "<!-- recovery-kd-steps:start -->\nS\n<!-- recovery-kd-steps:end -->\n"
    )
    assert pt.keep_sections(text, text) == text


def test_distillation_findings_compare_every_loss_with_ce_by_hand():
    kdb = _script("recovery_kd")
    g = 2**30
    rows = [
        _kd_row("wanda-sp", 0.4, "none", 150.0),
        _kd_row("wanda-sp", 0.4, "ce", 80.0, (5.0, 4.5), 3 * g),
        _kd_row("wanda-sp", 0.4, "kd", 88.0, (1.0, 0.5), 4 * g),
        _kd_row("wanda-sp", 0.4, "ce+kd", 76.0, (6.0, 5.0), 4.5 * g),
        _kd_row("llm-pruner", 0.4, "none", 200.0),
        {**_kd_row("llm-pruner", 0.4, "ce", None), "failed": "prunekit apply exited 1"},
    ]
    text = "\n".join(kdb.findings(rows))
    assert "| method | none | ce | kd | ce+kd |" in text
    assert "| wanda-sp | 150.00 | 80.00 | 88.00 | **76.00** |" in text
    assert "| llm-pruner | 200.00 | - | - | - |" in text
    assert (
        "- 0.4, wanda-sp: against `ce` (80.00): `kd` 88.00 (+8.00, +10.0%), "
        "`ce+kd` 76.00 (-4.00, -5.0%)" in text
    )
    assert "llm-pruner: against" not in text  # its ce cell failed: nothing to compare with
    assert "- `ce`: 3.00 GiB - 3.00 GiB" in text and "- `kd`: 4.00 GiB - 4.00 GiB" in text


def test_a_report_reads_the_committed_copy_of_a_summary_when_runs_is_gone(tmp_path, monkeypatch):
    """runs/ is not committed: a live summary refreshes its copy under benchmarks/results/
    sweeps, and without the live file the copy is read, the same numbers."""
    import json

    snaps = _script("_snapshots")
    monkeypatch.setattr(snaps, "SNAPSHOTS", tmp_path / "sweeps")
    live = tmp_path / "runs" / "summary.json"
    assert snaps.sweep_summary(live, "demo") is None
    summary = {"rows": [_row({"variant": "a"}, [20.0], [0.8])]}
    live.parent.mkdir()
    live.write_text(json.dumps(summary))
    assert snaps.sweep_summary(live, "demo") == summary
    assert json.loads((tmp_path / "sweeps" / "demo.json").read_text()) == summary
    live.unlink()
    assert snaps.sweep_summary(live, "demo") == summary
    summary["rows"][0]["metrics"]["wikitext2-test.ppl"]["mean"] = 21.0  # a re-run: copy refreshed
    live.write_text(json.dumps(summary))
    snaps.sweep_summary(live, "demo")
    live.unlink()
    assert (
        snaps.sweep_summary(live, "demo")["rows"][0]["metrics"]["wikitext2-test.ppl"]["mean"]
        == 21.0
    )


def test_render_keeps_a_section_whose_summary_is_not_here(tmp_path, monkeypatch):
    """A sweep the report shows but whose summary is not on this machine keeps its section
    word for word (re-rendering one sweep never blanks the others); a sweep with a summary is
    rendered from it; a sweep the report never showed is listed as not run."""
    ab = _script("ablations")
    lost, fresh, never = list(ab.ABLATIONS)[:3]
    lost_section = (
        f"## {ab.ABLATIONS[lost][0]}\n\n| variant | seeds |\n|---|---|\n"
        "| default | 2 | 111.29 |\n\n**Here**: holds\n"
    )
    flap_section = f"## {ab.FLAP_TITLE}\n\n| running mean |\n| flap | 0.2 | 60.94 |\n"
    report = tmp_path / "ablations.md"
    report.write_text(
        f"# Ablations\n\nintro\n\n{lost_section}\n"
        f"## {ab.ABLATIONS[fresh][0]}\n\nold numbers 1.00\n\n{flap_section}"
    )
    summary = {"rows": [_row({"variant": "default"}, [20.0, 22.0], [0.7, 0.7])]}
    monkeypatch.setattr(ab, "load", lambda n: summary if n == fresh else None)
    assert ab.main(["--render-only", "--out", str(report)]) == 0
    text = report.read_text()
    assert lost_section in text and flap_section in text
    assert "old numbers" not in text and "| default | 2 | 21.00 ± 1.41 |" in text
    assert f"- `{never}`" in text and f"- `{lost}`" not in text
    assert text.index(ab.ABLATIONS[lost][0]) < text.index(ab.ABLATIONS[fresh][0])
    report.write_text("# Ablations\n")  # nothing shown yet: every sweep but one is not run
    assert ab.main(["--render-only", "--out", str(report)]) == 0
    assert f"- `{lost}`" in report.read_text() and "Not run yet." in report.read_text()


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    """mkstemp's 0600 would make sweep tables, summaries and caches unreadable to a group."""
    from prunekit._files import write_atomic

    write_atomic(tmp_path / "atomic.txt", "x")
    with open(tmp_path / "plain.txt", "w") as fh:
        fh.write("x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_calibration_coverage_finds_each_window_and_counts_distinct_text():
    """benchmarks/calibration_coverage.py: windows located in their documents, overlaps and
    re-drawn documents counted once, the pool being the documents longer than a window."""
    cc = _script("calibration_coverage")
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(5, 1000, (n,), generator=g) for n in (40, 12, 25, 8)]
    seq_len = 10
    index = cc._window_index(docs, seq_len, probe=4)
    places = [(0, 3), (0, 8), (2, 0), (0, 3)]  # overlapping, and one window drawn twice
    windows = torch.stack([docs[d][j : j + seq_len] for d, j in places])
    windows[:, 0] = 1  # a BOS in front: located from the tokens after it
    assert cc.locate(windows, docs, index, probe=4) == places
    got = cc.coverage(places, docs, seq_len)
    assert got["distinct_documents"] == 2 and got["pool_documents"] == 3  # 8 tokens: too short
    assert got["tokens_drawn"] == 40 and got["distinct_tokens"] == 15 + 10
    assert got["pool_tokens"] == 40 + 12 + 25
    assert got["distinct_share"] == 25 / 40
    stray = torch.randint(1000, 2000, (1, seq_len))
    with pytest.raises(SystemExit, match="matches no document"):
        cc.locate(stray, docs, index, probe=4)


def test_calibration_size_section_shows_the_measured_coverage():
    ab = _script("ablations")
    row = {
        "labels": {"variant": "calib-2000"},
        "seed": 0,
        "corpus": "c4/train (c4.jsonl)",
        "seq_len": 512,
        "windows": 2000,
        "tokens_drawn": 1024000,
        "distinct_documents": 277,
        "distinct_tokens": 252928,
        "distinct_share": 0.247,
        "pool_documents": 277,
        "pool_tokens": 314893,
        "pool_share_covered": 0.803,
    }
    text = "\n".join(
        ab.render_coverage({"command": "python benchmarks/calibration_coverage.py", "rows": [row]})
    )
    assert (
        "corpus, c4/train (c4.jsonl), has 277 documents longer than 512 tokens (314,893 tokens)"
        in text
    )
    assert "| calib-2000 | 0 | 2000 | 1,024,000 | 277 of 277 | 252,928 | 24.7% | 80.3% |" in text
    assert ab.render_coverage(None) == []
