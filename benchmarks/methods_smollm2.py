"""Every method on SmolLM2-135M-Instruct (CPU): WikiText-2 perplexity and time per batch.

For each method and ratio: a fresh model, the method applied through ``prunekit.prune`` with
the same calibration data (statistics cached and shared), WikiText-2 test perplexity on
consecutive windows, and the time per batch of the pruned model next to the dense model's, in
one process, on the same batches (warm-up excluded; PP timed with its state preserved).

    python benchmarks/methods_smollm2.py            # the committed results
    python benchmarks/methods_smollm2.py --quick    # smoke test, not a result

Writes benchmarks/results/methods_smollm2.json and benchmarks/methods_smollm2.md.
"""

from __future__ import annotations

import argparse
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

HERE = Path(__file__).resolve().parent
CALIBRATION = {"dataset": "c4", "samples": 128, "seq_len": 512, "batch_size": 16}
METHODS = ["pp-fullbatch", "pp", "pp-calib", "wanda-sp", "flap", "llm-pruner"]
PAPER_ORDER = "full-batch <= PP < FLAP, Wanda-sp < LLM-Pruner"


def run_one(method, ratio, args, windows, timing, dense_model, dense_times):
    loaded = load_model("smollm2-135m-instruct", dtype=args.dtype)
    model = loaded.model
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    outcome = prunekit.prune(
        model, loaded.tokenizer, method=method, ratio=ratio, calibration=CALIBRATION
    )
    prune_s = time.perf_counter() - start
    result = perplexity(outcome.model, windows, args.batch_size, description=method)
    # interleaved with the one dense model of the table (kept in the process), 5 rounds
    timed = time_interleaved(
        [Contender("dense", dense_model), Contender("pruned", outcome.model)],
        timing,
        rounds=args.rounds,
        warmup=1,
    )
    pruned_times = timed["pruned"]["s_all"]
    overhead = phase_medians(timed["pruned"]["phases_s_all"])
    pairs = [p / d for p, d in zip(pruned_times, timed["dense"]["s_all"], strict=True)]
    dense_times += timed["dense"]["s_all"]
    row = {
        "method": method,
        "ratio": ratio,
        "dynamic": outcome.dynamic,
        "ppl": result["ppl"],
        "tokens": result["tokens"],
        "prune_s": prune_s,
        "params_kept_fraction": (outcome.params_kept or params) / params,
        "s_per_batch": statistics.median(pruned_times),
        "time_vs_dense": statistics.median(pairs),
        "time_vs_dense_spread": [min(pairs), max(pairs)],
        "overhead_s_per_batch": overhead,
        "structure_layer3": (outcome.structure or [{}] * 4)[3],
    }
    print(
        f"{method} r={ratio}: ppl {row['ppl']:.3f}, time vs dense {row['time_vs_dense']:.3f}, "
        f"prune {prune_s:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


def ordering(rows, ratio) -> dict:
    ppl = {r["method"]: r["ppl"] for r in rows if r["ratio"] == ratio}
    checks = {
        "full-batch <= PP": ppl["pp-fullbatch"] <= ppl["pp"],
        "PP < FLAP": ppl["pp"] < ppl["flap"],
        "PP < Wanda-sp": ppl["pp"] < ppl["wanda-sp"],
        "FLAP < LLM-Pruner": ppl["flap"] < ppl["llm-pruner"],
        "Wanda-sp < LLM-Pruner": ppl["wanda-sp"] < ppl["llm-pruner"],
    }
    return {"checks": checks, "holds": all(checks.values())}


def markdown(report) -> str:
    s = report["settings"]
    lines = [
        "# All methods on SmolLM2-135M-Instruct (CPU)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; torch {report['torch']}.  ",
        f"Model: {report['model']}, {s['dtype']}. WikiText-2 test, {s['windows']} consecutive "
        f"windows of 512 tokens, batch {s['batch_size']}; calibration {CALIBRATION['samples']} "
        f"C4 windows of {CALIBRATION['seq_len']} (train carve-out); LLM-Pruner gradients on 10 "
        "windows of 128. Time per batch: median over "
        f"{s['timing_batches']} batches of {s['batch_size']} x 512 after one warm-up batch, dense "
        "timed in the same process on the same batches.",
        "",
        "| method | ratio | WikiText-2 PPL | time / dense | params kept | prune s |",
        "|---|---|---|---|---|---|",
        f"| dense | 0 | {report['dense']['ppl']:.3f} | 1.000 | 1.000 | 0 |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['ratio']} | {r['ppl']:.3f} | "
            f"{r['time_vs_dense']:.3f} | {r['params_kept_fraction']:.3f} | "
            f"{r['prune_s']:.1f} |"
        )
    lines += ["", f"Paper's ordering ({PAPER_ORDER}):", ""]
    for ratio, o in report["ordering"].items():
        verdict = "holds" if o["holds"] else "does not hold"
        failed = [k for k, v in o["checks"].items() if not v]
        lines.append(
            f"- ratio {ratio}: {verdict}" + (f" (fails: {', '.join(failed)})" if failed else "")
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--timing-batches", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "methods_smollm2.json"))
    args = parser.parse_args()
    if args.quick:
        args.windows, args.timing_batches, args.ratios = 8, 1, [0.4]
        CALIBRATION["samples"] = 16
    loaded = load_model("smollm2-135m-instruct", dtype=args.dtype)
    source = locate_corpus("wikitext2", "test")
    windows = eval_windows(loaded.tokenizer, source, 512, args.windows)
    timing = list(torch.split(windows, args.batch_size))[: args.timing_batches]
    dense = perplexity(loaded.model, windows, args.batch_size, description="dense")
    dense_times: list[float] = []  # every dense call of the table (interleaved with each cell)
    report = {
        "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "prunekit": prunekit.__version__,
        "model": loaded.info["name"],
        "settings": {
            "dtype": args.dtype,
            "windows": args.windows,
            "batch_size": args.batch_size,
            "timing_batches": args.timing_batches,
            "calibration": CALIBRATION,
        },
        "dense": {"ppl": dense["ppl"]},
        "rows": [],
    }
    for ratio in args.ratios:
        for method in args.methods:
            report["rows"].append(
                run_one(method, ratio, args, windows, timing, loaded.model, dense_times)
            )
    report["dense"]["s_per_batch"] = statistics.median(dense_times)
    if set(METHODS) <= set(args.methods):
        report["ordering"] = {str(r): ordering(report["rows"], r) for r in args.ratios}
    else:
        report["ordering"] = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.quick:
        (HERE / "methods_smollm2.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
