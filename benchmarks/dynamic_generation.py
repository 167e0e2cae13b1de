"""Dynamic methods in generation's regime: the prompt decides, the continuation is scored.

GRIFFIN (the outside package examples/prunekit-griffin, MLP channels per sequence, decided on
the prompt) beside ``pp`` (one kept set per batch) and ``pp-seq`` (one per sequence), at the
same ratios, on the offline SmolLM2-135M-Instruct:

* perplexity of continuations: random WikiText-2 test windows; the first ``--prompt-tokens``
  tokens of each window are the prompt (run with a KV cache; every method decides there) and
  the rest continues it through the cache with those decisions; only the continuation's own
  predictions are scored (``evaluation.perplexity[].prompt_tokens``);
* zero-shot accuracy on a few commonsense tasks (the first ``--limit`` questions each; a method
  that decides on the prompt sees the question as its prompt and the answer as continuation);
* greedy generation throughput: the first ``--gen-batch`` windows cut to ``--gen-prompt``
  tokens, ``--new-tokens`` new tokens each; every model (dense and each pruned one) warmed up
  once, then ``--rounds`` interleaved rounds; one dense time for the table; prefill and decode
  timed apart (:func:`prunekit.evaluation.generation.greedy`).

    pip install -e examples/prunekit-griffin
    PRUNEKIT_DATA_DIR=../shared/data python benchmarks/dynamic_generation.py   # ~15 min, 2 cores

Writes benchmarks/results/dynamic_generation.json and benchmarks/dynamic_generation.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

import prunekit
from prunekit.data import eval_windows, locate_corpus, sequence_bos
from prunekit.data.tasks import load_questions, locate_task
from prunekit.evaluation.costs import structure_reduction
from prunekit.evaluation.generation import greedy, time_generation
from prunekit.evaluation.perplexity import perplexity
from prunekit.evaluation.zeroshot import evaluate_questions
from prunekit.loading import load_model
from prunekit.registry import resolve_adapter

HERE = Path(__file__).resolve().parent
TASKS = ["arc_easy", "piqa", "boolq"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--methods", nargs="+", default=["griffin", "pp", "pp-seq"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--tasks", nargs="*", default=TASKS)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--gen-prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke test, not a result")
    args = parser.parse_args()
    if args.quick:
        args.windows, args.batch_size, args.limit, args.rounds = 4, 2, 8, 1
        args.ratios, args.tasks, args.gen_batch, args.new_tokens = [0.5], args.tasks[:1], 2, 4
        args.calibration_samples = 16
    calibration = {
        "dataset": "c4",
        "samples": args.calibration_samples,
        "seq_len": args.seq_len,
        "batch_size": 16,
    }

    loaded = load_model(args.model, dtype="float32")
    dense_model, tokenizer = loaded.model, loaded.tokenizer
    adapter = resolve_adapter(dense_model)
    bos_id = sequence_bos("auto", adapter, tokenizer)
    windows = eval_windows(
        tokenizer,
        locate_corpus("wikitext2", "test"),
        args.seq_len,
        args.windows,
        "random",
        seed=args.seed,
        batch_size=args.batch_size,
        bos_id=bos_id,
    )
    questions = {t: load_questions(locate_task(t), args.limit) for t in args.tasks}
    gen_ids = windows[: args.gen_batch, : args.gen_prompt]
    gen_mask = torch.ones_like(gen_ids)

    def evaluate(model, name: str) -> dict:
        ppl = perplexity(
            model, windows, args.batch_size, description=name, prompt_tokens=args.prompt_tokens
        )["ppl"]
        acc = {
            t: evaluate_questions(model, tokenizer, q, batch_size=20, description=f"{name} {t}")[
                "acc_norm"
            ]
            for t, q in questions.items()
        }
        return {
            "ppl": ppl,
            "acc_norm": acc,
            "acc_norm_mean": statistics.mean(acc.values()) if acc else None,
        }

    dense = evaluate(dense_model, "dense")
    log(f"dense: {dense}")
    rows, models = [], {"dense": dense_model}
    for ratio in args.ratios:
        for method in args.methods:
            model = load_model(args.model, dtype="float32").model
            outcome = prunekit.prune(
                model,
                tokenizer,
                method=method,
                ratio=ratio,
                calibration=calibration,
                seed=args.seed,
            )
            row = {"method": method, "ratio": ratio, **evaluate(outcome.model, method)}
            reduction = structure_reduction(adapter, outcome.structure, args.seq_len)
            row["decoder_macs_kept_fraction"] = reduction["flops_kept_fraction"]
            row["decides"] = outcome.model.protocol.decides
            rows.append(row)
            models[f"{method}@{ratio}"] = outcome.model
            log(f"{method} r={ratio}: {row}")
            gc.collect()

    # generation throughput, interleaved; dynamic states preserved (timing leaves no trace)
    def run(model):
        keep = getattr(model, "preserved_state", None)
        with keep() if keep else contextlib.nullcontext():
            return greedy(model, gen_ids, gen_mask, args.new_tokens)

    speeds = time_generation(
        {name: (lambda m=model: run(m)) for name, model in models.items()},
        int(gen_mask.sum()),
        args.gen_batch * (args.new_tokens - 1),
        rounds=args.rounds,
        warmup=1,
    )

    dense["generation"] = speeds["dense"]
    for row in rows:
        g = row["generation"] = speeds[f"{row['method']}@{row['ratio']}"]
        row["decode_speedup"] = dense["generation"]["decode_s"] / g["decode_s"]
        row["decode_speedup_spread"] = [
            dense["generation"]["decode_s"] / max(g["decode_s_all"]),
            dense["generation"]["decode_s"] / min(g["decode_s_all"]),
        ]
        row["prefill_speedup"] = dense["generation"]["prefill_s"] / g["prefill_s"]
    report = {
        "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "prunekit": prunekit.__version__,
        "model": loaded.info["name"],
        "settings": {k: v for k, v in vars(args).items() if k != "quick"},
        "dense": dense,
        "rows": rows,
    }
    suffix = "_quick" if args.quick else ""
    out = HERE / "results" / f"dynamic_generation{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    if not args.quick:
        (HERE / "dynamic_generation.md").write_text(text)
    print(text)


def markdown(report: dict) -> str:
    s, d = report["settings"], report["dense"]
    tasks = list(d["acc_norm"])
    g = d["generation"]
    lines = [
        f"# Dynamic methods in generation's regime on {report['model']} (CPU, float32)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; torch {report['torch']}; prunekit {report['prunekit']}.",
        "",
        f"Continuation perplexity: WikiText-2 test, {s['windows']} random windows of "
        f"{s['seq_len']} tokens (seed {s['seed']}), batch {s['batch_size']}; the first "
        f"{s['prompt_tokens']} tokens are the prompt (every method decides there), the "
        f"{s['seq_len'] - s['prompt_tokens'] - 1} predictions of the continuation are scored. "
        f"Zero-shot: acc_norm on the first {s['limit']} questions of {', '.join(tasks) or '-'}. "
        f"Generation: greedy, {s['gen_batch']} prompts of {s['gen_prompt']} tokens, "
        f"{s['new_tokens']} new tokens each; every model warmed up once, then {s['rounds']} "
        "interleaved rounds; medians, one dense time for the table; spread = min-max over rounds. "
        f"Calibration (pp, pp-seq): {s['calibration_samples']} C4 windows. Ratio: the nominal "
        "ratio r. pp and pp-seq: layers 0-2 dense, the other layers pruned at round(L/(L-3) r, "
        "2) (PP's rule), heads and MLP channels, MLP counts rounded up to a multiple of 64. "
        "GRIFFIN: the MLP channels of every layer at r (its default; attention whole).",
        "",
        f"Dense: continuation PPL {d['ppl']:.3f}; prefill {g['prefill_s']:.3f} s "
        f"({g['prefill_tokens_per_s']:.0f} tok/s), decode {g['decode_s']:.3f} s "
        f"({g['decode_tokens_per_s']:.1f} tok/s).",
        "",
        "| method | decides | ratio | continuation PPL | "
        + " | ".join(tasks)
        + (" | " if tasks else "")
        + "mean acc_norm | decoder MACs kept | decode speed-up (spread) | prefill speed-up |",
        "|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|",
        "| dense | - | 0 | "
        + f"{d['ppl']:.3f} | "
        + "".join(f"{100 * d['acc_norm'][t]:.1f} | " for t in tasks)
        + (f"{100 * d['acc_norm_mean']:.1f}" if d["acc_norm_mean"] is not None else "-")
        + " | 1.000 | 1.00 | 1.00 |",
    ]
    for r in report["rows"]:
        lo, hi = r["decode_speedup_spread"]
        lines.append(
            f"| {r['method']} | {r['decides']} | {r['ratio']} | {r['ppl']:.3f} | "
            + "".join(f"{100 * r['acc_norm'][t]:.1f} | " for t in tasks)
            + (f"{100 * r['acc_norm_mean']:.1f}" if r["acc_norm_mean"] is not None else "-")
            + f" | {r['decoder_macs_kept_fraction']:.3f} | {r['decode_speedup']:.2f} "
            f"({lo:.2f}-{hi:.2f}) | {r['prefill_speedup']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
