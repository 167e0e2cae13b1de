"""Decoding speed of dynamic methods against dense, at batch 1 and batch 8, with the bytes limit.

Greedy generation on the offline SmolLM2-135M-Instruct (fp32, CPU): real WikiText-2 test
prompts of ``--prompt-tokens`` tokens, ``--new-tokens`` new tokens each. For every batch size,
dense and every configuration run in one process on the same prompts, warmed up once, then
``--rounds`` interleaved rounds (medians, spread = min-max over rounds, one dense time per
table). Beside each figure, the *bytes limit*: decoding is bound by reading weights and the KV
cache, so ``dense bytes per step / pruned bytes per step`` is the speed-up a step can reach at
best (:func:`prunekit.evaluation.generation.decode_bytes`, measured on the same prompts).

Configurations:

* ``griffin`` (examples/prunekit-griffin) at keep 0.5 of every MLP layer, every layer pruned
  (GRIFFIN's setting), with and without ``pool`` (each prompt chooses inside the batch's best
  fraction of channels, so the union a batch decodes on shrinks);
* ``pp-seq`` (PP per sequence) at 0.4, with and without ``pool``;
* ``pp`` (one kept set per batch) at 0.4.

Quality: continuation perplexity on random WikiText-2 test windows of ``--ppl-seq-len``
tokens, batch ``--ppl-batch``: the first ``--prompt-tokens`` tokens are the prompt (every
method decides there), only the continuation's predictions are scored (the ``pool`` option's
quality cost depends on the batch, so it is measured at the generation batch size).

    pip install -e examples/prunekit-griffin
    PRUNEKIT_DATA_DIR=../shared/data python benchmarks/decode_speed.py   # ~30 min, 2 cores

Writes benchmarks/results/decode_speed.json and benchmarks/decode_speed.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.data import eval_windows, locate_corpus, sequence_bos
from prunekit.evaluation.generation import decode_bytes, greedy
from prunekit.evaluation.perplexity import perplexity
from prunekit.loading import load_model
from prunekit.registry import resolve_adapter

HERE = Path(__file__).resolve().parent

#: name -> (method, ratio, options, batch sizes)
CONFIGS = {
    "griffin": ("griffin", 0.5, {}, (1, 8)),
    "griffin pool 0.6": ("griffin", 0.5, {"pool": 0.6}, (8,)),
    "pp-seq": ("pp-seq", 0.4, {}, (1, 8)),
    "pp-seq pool 0.6": ("pp-seq", 0.4, {"pool": 0.6}, (8,)),
    "pp": ("pp", 0.4, {}, (1, 8)),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ppl-windows", type=int, default=24)
    parser.add_argument("--ppl-seq-len", type=int, default=256)
    parser.add_argument("--ppl-batch", type=int, default=8)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke test, not a result")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.rounds, args.ppl_windows, args.calibration_samples = 8, 1, 8, 8
        args.prompt_tokens = 32
    calibration = {
        "dataset": "c4",
        "samples": args.calibration_samples,
        "seq_len": 512,
        "batch_size": 16,
    }

    loaded = load_model(args.model, dtype="float32")
    dense_model, tokenizer = loaded.model, loaded.tokenizer
    adapter = resolve_adapter(dense_model)
    bos_id = sequence_bos("auto", adapter, tokenizer)
    source = locate_corpus("wikitext2", "test")
    ppl_windows = eval_windows(
        tokenizer,
        source,
        args.ppl_seq_len,
        args.ppl_windows,
        "random",
        seed=args.seed,
        batch_size=args.ppl_batch,
        bos_id=bos_id,
    )
    prompts = eval_windows(
        tokenizer,
        source,
        args.prompt_tokens,
        max(args.batches),
        "random",
        seed=args.seed + 1,
        batch_size=max(args.batches),
        bos_id=bos_id,
    )

    def quality(model, name: str) -> float:
        return perplexity(
            model, ppl_windows, args.ppl_batch, description=name, prompt_tokens=args.prompt_tokens
        )["ppl"]

    models: dict[str, torch.nn.Module] = {"dense": dense_model}
    rows: dict[str, dict] = {
        "dense": {
            "method": "dense",
            "ratio": 0.0,
            "options": {},
            "batches": list(args.batches),
            "ppl": quality(dense_model, "dense"),
        }
    }
    for name in args.configs:
        method, ratio, options, batches = CONFIGS[name]
        model = load_model(args.model, dtype="float32").model
        kw = dict(options)
        if method != "griffin":
            kw["calibration"] = calibration
        outcome = prunekit.prune(model, tokenizer, method=method, ratio=ratio, seed=args.seed, **kw)
        models[name] = outcome.model
        rows[name] = {
            "method": method,
            "ratio": ratio,
            "options": options,
            "batches": [b for b in batches if b in args.batches],
            "pruned_layers": [
                r["layer"]
                for r in outcome.structure
                if r["channels"] < adapter.layers()[r["layer"]].units("mlp")
            ],
            "ppl": quality(outcome.model, name),
        }
        log(f"{name}: continuation ppl {rows[name]['ppl']:.3f}")
        gc.collect()

    def run(model, ids, mask):
        keep = getattr(model, "preserved_state", None)
        with keep() if keep else contextlib.nullcontext():
            return greedy(model, ids, mask, args.new_tokens)

    tables = {}
    for bsz in args.batches:
        ids = prompts[:bsz]
        mask = torch.ones_like(ids)
        names = [n for n in models if bsz in rows[n]["batches"]]
        step = {n: decode_bytes(models[n], ids, mask, args.new_tokens) for n in names}
        times = {n: {"prefill": [], "decode": []} for n in names}
        tokens = {}
        for r in range(args.rounds + 1):  # round 0 warms every model up, untimed
            for n in names:
                out, prefill, decode = run(models[n], ids, mask)
                tokens[n] = out
                if r:
                    times[n]["prefill"].append(prefill)
                    times[n]["decode"].append(decode)
            log(f"batch {bsz}: round {r} done")
        dense_decode = statistics.median(times["dense"]["decode"])
        dense_prefill = statistics.median(times["dense"]["prefill"])
        table = {}
        for n in names:
            d, p = times[n]["decode"], times[n]["prefill"]
            limit = step["dense"]["total_bytes"] / step[n]["total_bytes"]
            speedup = dense_decode / statistics.median(d)
            table[n] = {
                "decode_s": statistics.median(d),
                "decode_s_all": d,
                "prefill_s": statistics.median(p),
                "prefill_s_all": p,
                "decode_tokens_per_s": bsz * (args.new_tokens - 1) / statistics.median(d),
                "prefill_tokens_per_s": bsz * args.prompt_tokens / statistics.median(p),
                "decode_speedup": speedup,
                "decode_speedup_spread": [dense_decode / max(d), dense_decode / min(d)],
                "prefill_speedup": dense_prefill / statistics.median(p),
                "bytes_limit": limit,
                "of_limit": speedup / limit,
                "step": step[n],
                "memory_bytes": _param_bytes(models[n])
                + step[n]["held_weight_bytes"]
                + step[n]["kv_bytes"],
                "same_tokens_as_dense": bool(torch.equal(tokens[n], tokens["dense"])),
            }
        tables[str(bsz)] = table
    report = {
        "command": (
            "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:])
        ).strip(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "prunekit": prunekit.__version__,
        "model": loaded.info["name"],
        "date": time.strftime("%Y-%m-%d"),
        "num_layers": adapter.num_layers,
        "settings": {k: v for k, v in vars(args).items() if k != "quick"},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rows": rows,
        "tables": tables,
    }
    suffix = "_quick" if args.quick else ""
    out = HERE / "results" / f"decode_speed{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    if not args.quick:
        (HERE / "decode_speed.md").write_text(text)
    print(text)


def _param_bytes(model) -> int:
    target = getattr(model, "model", model) if hasattr(model, "runtime") else model
    return sum(p.numel() * p.element_size() for p in target.parameters())


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# Decoding speed of dynamic methods on {report['model']} (CPU, float32)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; torch {report['torch']}; prunekit {report['prunekit']}; "
        f"{report['date']}.",
        "",
        f"Greedy generation: real WikiText-2 test prompts of {s['prompt_tokens']} tokens (random "
        f"windows, seed {s['seed'] + 1}), {s['new_tokens']} new tokens per prompt. Per batch "
        f"size, dense and every configuration in one process on the same prompts: one warm-up "
        f"round, then {s['rounds']} interleaved rounds; medians, spread = min-max over rounds, "
        "one dense time per table. **Bytes limit**: dense bytes read per decoding step (weights "
        "plus the KV cache, averaged over the steps) over the configuration's, the speed-up a "
        "step bound by reading memory can reach; **of limit**: the measured decode speed-up "
        "over it. Memory: the model's parameters, the gathered weights it holds for the "
        "continuation, and the KV cache at the end (computed); the process's peak RSS was "
        f"{report['peak_rss_bytes'] / 2**30:.2f} GiB with every model loaded.",
        "",
        f"Quality: continuation perplexity on {s['ppl_windows']} random WikiText-2 test windows "
        f"of {s['ppl_seq_len']} tokens (seed {s['seed']}) in batches of {s['ppl_batch']}: the "
        f"first {s['prompt_tokens']} tokens are the prompt (every method decides there), the "
        f"{s['ppl_seq_len'] - s['prompt_tokens'] - 1} predictions of the continuation are "
        "scored. Not the paper's protocol (whole windows, batch 20), which scores a prompt "
        "method's prompt densely.",
        "",
        "| configuration | method | ratio | layers pruned | continuation PPL |",
        "|---|---|---|---|---|",
    ]
    layers = report["num_layers"]
    for name, r in report["rows"].items():
        n = len(r.get("pruned_layers", []))
        pruned = "-" if name == "dense" else ("every layer" if n == layers else f"{n} of {layers}")
        lines.append(f"| {name} | {r['method']} | {r['ratio']} | {pruned} | {r['ppl']:.3f} |")
    for bsz, table in report["tables"].items():
        dense = table["dense"]
        lines += [
            "",
            f"## Batch {bsz}",
            "",
            f"Dense: prefill {dense['prefill_s']:.3f} s ({dense['prefill_tokens_per_s']:.0f} "
            f"tok/s), decode {dense['decode_s']:.3f} s ({dense['decode_tokens_per_s']:.1f} "
            f"tok/s); a step reads {_mib(dense['step']['weight_bytes'])} MiB of weights and "
            f"{_mib(dense['step']['kv_bytes'])} MiB of KV cache.",
            "",
            "| configuration | decode tok/s | decode speed-up (spread) | bytes limit | of limit "
            "| prefill speed-up | weights/step MiB | KV/step MiB | held MiB | memory MiB "
            "| same tokens as dense |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, t in table.items():
            lo, hi = t["decode_speedup_spread"]
            lines.append(
                f"| {name} | {t['decode_tokens_per_s']:.1f} | {t['decode_speedup']:.2f} "
                f"({lo:.2f}-{hi:.2f}) | {t['bytes_limit']:.2f} | {100 * t['of_limit']:.0f}% | "
                f"{t['prefill_speedup']:.2f} | {_mib(t['step']['weight_bytes'])} | "
                f"{_mib(t['step']['kv_bytes'])} | {_mib(t['step']['held_weight_bytes'])} | "
                f"{_mib(t['memory_bytes'])} | {'yes' if t['same_tokens_as_dense'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
