"""Probe Pruning on SmolLM2-135M-Instruct (CPU): runtime and quality, in one process.

Runtime: for each dtype and ratio, dense vs ``pp`` vs a static model with the same kept
counts (physically sliced), timed on the same WikiText-2 batches of 20 x 512, warm-up
excluded, rounds interleaved so that drift hits every model alike.
Quality: WikiText-2 perplexity of dense, pp, pp-fullbatch and pp-history at each ratio.

    python benchmarks/pp_smollm2.py                 # the committed results (about 45 min)
    python benchmarks/pp_smollm2.py --quick         # smoke test, a few minutes

Writes benchmarks/results/pp_smollm2.json and benchmarks/pp_smollm2.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.data import eval_windows, locate_corpus
from prunekit.evaluation.perplexity import perplexity
from prunekit.evaluation.runtime import Contender, phase_medians, time_interleaved
from prunekit.loading import load_model
from prunekit.pruning.static import same_shape

HERE = Path(__file__).resolve().parent
CALIBRATION = {"dataset": "c4", "samples": 128, "seq_len": 512, "batch_size": 16}


def static_like(clone, structure):
    """``clone`` (a copy of the dense model) physically sliced to ``structure``'s kept counts."""
    return same_shape(clone, structure)


def runtime_block(model, tokenizer, batches, ratio, rounds, warmup):
    clone = copy.deepcopy(model)
    outcome = prunekit.prune(model, tokenizer, method="pp", ratio=ratio, calibration=CALIBRATION)
    pp_model = outcome.model
    static = static_like(clone, outcome.structure)
    # one interleaved table: dense (pp's own dense layers), pp and static on the same batches
    timed = time_interleaved(
        [
            Contender("dense", pp_model, dense=True),
            Contender("pp", pp_model),
            Contender("static", static),
        ],
        batches,
        rounds,
        warmup,
        lambda done, total: print(f"  round {done}/{total}", file=sys.stderr, flush=True),
    )
    times = {k: v["s_all"] for k, v in timed.items()}
    fraction = pp_model.controller.probe_flops_fraction(*batches[0].shape)
    pp_model.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    phases = timed["pp"]["phases_s_all"]
    overhead = phase_medians(phases)
    # the overhead fraction per call (its own phases over its own time), then the median
    per_call = [sum(ph[i] for ph in phases.values()) / t for i, t in enumerate(times["pp"])]
    return {
        "ratio": ratio,
        "structure_sample": outcome.structure[3],
        "params_kept_fraction": outcome.params_kept / sum(p.numel() for p in model.parameters()),
        "s_per_batch": med,
        "spread": {k: [min(v), max(v)] for k, v in times.items()},
        "pp_vs_dense": med["pp"] / med["dense"],
        "static_vs_dense": med["static"] / med["dense"],
        "pp_vs_static": med["pp"] / med["static"],
        "pp_vs_static_spread": _spread(
            [p / q for p, q in zip(times["pp"], times["static"], strict=True)]
        ),
        "s_all": times,
        "pp_overhead_s_per_batch": overhead,
        "pp_overhead_fraction": statistics.median(per_call),
        "pp_overhead_fraction_spread": _spread(per_call),
        "probe_flops_fraction": fraction,
    }


def _spread(values: list[float]) -> list[float]:
    return [min(values), max(values)]


def quality_block(model, tokenizer, windows, ratios, methods, batch_size):
    rows = [
        {
            "method": "dense",
            "ratio": 0.0,
            **perplexity(model, windows, batch_size, description="dense"),
        }
    ]
    for ratio in ratios:
        for method in methods:
            outcome = prunekit.prune(
                model, tokenizer, method=method, ratio=ratio, calibration=CALIBRATION
            )
            try:
                result = perplexity(outcome.model, windows, batch_size, description=method)
            finally:
                outcome.model.remove()
            rows.append({"method": method, "ratio": ratio, **result})
            print(f"  {method} r={ratio}: ppl {result['ppl']:.3f}", file=sys.stderr, flush=True)
    return rows


def markdown(report) -> str:
    s = report["settings"]
    lines = [
        "# Probe Pruning on SmolLM2-135M-Instruct (CPU)",
        "",
        "Commands: "
        + ", ".join(f"`{c}`" for c in report.get("commands", [report["command"]]))
        + "  ",
        f"Machine: {report['machine']}; torch {report['torch']}, {torch.get_num_threads()} threads.  ",
        f"Model: {report['model']}. Batches of {s['batch'][0]} x {s['batch'][1]} tokens from "
        f"WikiText-2 test; calibration {CALIBRATION['samples']} C4 windows of "
        f"{CALIBRATION['seq_len']} (train carve-out).  ",
        f"Timing: {s['rounds']} interleaved rounds x {s['timing_batches']} batches per model "
        "(rows re-measured with --update: as their command says; "
        + ", ".join(
            f"{d} {b['ratio']}: {b['rounds']} x {b['timing_batches']}"
            for d, rows in report["runtime"].items()
            for b in rows
            if "rounds" in b
        )
        + "), warm-up excluded, median seconds per batch; the static model has PP's kept "
        "counts, physically sliced. Compare ratios across rows measured by different commands, "
        "not seconds.",
        "",
        "## Runtime",
        "",
        "| dtype | ratio | dense s/batch | pp s/batch | static s/batch | pp/dense | static/dense "
        "| pp/static (spread) | PP overhead (spread) | probe FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, blocks in report["runtime"].items():
        for b in blocks:
            t = b["s_per_batch"]
            vs = b.get("pp_vs_static_spread")
            vs = f" ({vs[0]:.3f}-{vs[1]:.3f})" if vs else ""
            ov = b.get("pp_overhead_fraction_spread")
            ov = f" ({100 * ov[0]:.2f}-{100 * ov[1]:.2f}%)" if ov else ""
            lines.append(
                f"| {dtype} | {b['ratio']} | {t['dense']:.2f} | {t['pp']:.2f} | "
                f"{t['static']:.2f} | {b['pp_vs_dense']:.3f} | {b['static_vs_dense']:.3f} | "
                f"{b['pp_vs_static']:.3f}{vs} | {100 * b['pp_overhead_fraction']:.2f}%{ov} | "
                f"{100 * b['probe_flops_fraction']:.2f}% |"
            )
    lines += [
        "",
        "PP overhead per batch (seconds): "
        + "; ".join(
            f"{dtype} r={b['ratio']}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(b["pp_overhead_s_per_batch"].items()))
            for dtype, blocks in report["runtime"].items()
            for b in blocks
        ),
        "",
    ]
    lines += [
        "Targets (issue 13: ratio 0.4, float32 and bfloat16): pp within 1.05x of the same-shape "
        "static model, PP's own overhead under 3% of its batch time, probe FLOPs under 2%. "
        "pp/static and the overhead are medians of per-call values (paired calls on the same "
        "batch), the spread their min-max.",
        "",
    ]
    for dtype, blocks in report["runtime"].items():
        for b in blocks:
            if b["ratio"] == 0.4:
                checks = [
                    ("pp/static <= 1.05", b["pp_vs_static"] <= 1.05),
                    ("overhead < 3%", b["pp_overhead_fraction"] < 0.03),
                    ("probe FLOPs < 2%", b["probe_flops_fraction"] < 0.02),
                ]
                lines.append(
                    f"- {dtype}, ratio 0.4: "
                    + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in checks)
                )
    lines.append("")
    q = report.get("quality")
    if q:
        lines += [
            "## Quality",
            "",
            f"WikiText-2 test perplexity, {q['windows']} consecutive windows of "
            f"{q['seq_len']} tokens, batch {q['batch_size']}, {q['dtype']}.",
            "",
            "| method | ratio | perplexity |",
            "|---|---|---|",
        ]
        lines += [f"| {r['method']} | {r['ratio']} | {r['ppl']:.3f} |" for r in q["rows"]]
        lines += ["", "Expected ordering: pp-fullbatch <= pp < pp-history.", ""]
        for ratio in sorted({r["ratio"] for r in q["rows"] if r["method"] != "dense"}):
            p = {r["method"]: r["ppl"] for r in q["rows"] if r["ratio"] == ratio}
            ok = p["pp-fullbatch"] <= p["pp"] < p["pp-history"]
            lines.append(
                f"- ratio {ratio}: {'holds' if ok else 'does not hold'} "
                f"({p['pp-fullbatch']:.2f} / {p['pp']:.2f} / {p['pp-history']:.2f})"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--timing-batches", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quality-windows", type=int, default=80)
    parser.add_argument("--quality-dtype", default="float32")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, not a result")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the Markdown report from --out without measuring",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="replace only the measured (dtype, ratio) runtime rows in --out",
    )
    parser.add_argument("--out", default=str(HERE / "results" / "pp_smollm2.json"))
    args = parser.parse_args()
    if args.render_only:
        (HERE / "pp_smollm2.md").write_text(markdown(json.loads(Path(args.out).read_text())))
        return
    if args.quick:
        args.dtypes, args.ratios, args.timing_batches, args.rounds = ["bfloat16"], [0.4], 1, 1
        args.quality_windows, args.quality_dtype = 20, "bfloat16"
        CALIBRATION["samples"] = 16
    torch.manual_seed(0)
    report = {
        "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, {platform.platform()}",
        "torch": torch.__version__,
        "prunekit": prunekit.__version__,
        "settings": {
            "batch": [20, 512],
            "timing_batches": args.timing_batches,
            "rounds": args.rounds,
            "calibration": CALIBRATION,
        },
        "runtime": {},
    }
    started = time.time()
    for dtype in args.dtypes:
        loaded = load_model("smollm2-135m-instruct", dtype=dtype)
        report["model"] = loaded.info["name"]
        source = locate_corpus("wikitext2", "test")
        windows = eval_windows(loaded.tokenizer, source, 512, 20 * args.timing_batches)
        batches = list(torch.split(windows, 20))
        report["runtime"][dtype] = []
        for ratio in args.ratios:
            print(f"runtime {dtype} ratio {ratio}", file=sys.stderr, flush=True)
            report["runtime"][dtype].append(
                runtime_block(loaded.model, loaded.tokenizer, batches, ratio, args.rounds, 1)
                | {"rounds": args.rounds, "timing_batches": args.timing_batches}
            )
        if dtype == args.quality_dtype and args.quality_windows:
            windows = eval_windows(loaded.tokenizer, source, 512, args.quality_windows)
            report["quality"] = {
                "dtype": dtype,
                "windows": args.quality_windows,
                "seq_len": 512,
                "batch_size": 20,
                "rows": quality_block(
                    loaded.model,
                    loaded.tokenizer,
                    windows,
                    args.ratios,
                    ["pp", "pp-fullbatch", "pp-history"],
                    20,
                ),
            }
        del loaded
    report["elapsed_s"] = time.time() - started
    out = Path(args.out)
    if args.update and out.is_file():
        old = json.loads(out.read_text())
        for dtype, rows in report["runtime"].items():  # replace the measured (dtype, ratio) rows
            measured = {row["ratio"] for row in rows}
            kept = [row for row in old["runtime"].get(dtype, []) if row["ratio"] not in measured]
            old["runtime"][dtype] = sorted(kept + rows, key=lambda row: row["ratio"])
        old["commands"] = [*old.get("commands", [old["command"]]), report["command"]]
        if "quality" in report:
            old["quality"] = report["quality"]
        report = old
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.quick:
        (HERE / "pp_smollm2.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
