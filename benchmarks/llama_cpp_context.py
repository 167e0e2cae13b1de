"""Pruned exports in llama.cpp, timed apart: decoding speed-up against context length.

``llama_cpp_export.py`` times every file (27 of them) in one process, after a 512-token
prompt. This script re-times one type's files (dense and every method at ``--ratio``) with
only those files loaded, after prompts of several lengths, interleaved, one warm-up round.
It sets the speed-ups beside the bytes limit (weights plus the KV cache) at each context.
Two questions are checked this way: whether a shortfall against the bytes limit grows with
the context, and whether it depends on how many files share the process.

    python benchmarks/llama_cpp_export.py --workdir /tmp/lcx   # the files (or --resume)
    python benchmarks/llama_cpp_context.py                     # ~5 min on 2 cores

Reads the files named in benchmarks/results/llama_cpp_export.json (``--report``). Writes
benchmarks/results/llama_cpp_context.json and benchmarks/llama_cpp_context.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from llama_cpp_export import _version, file_bytes, kv_bytes_per_step, log  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", default=str(HERE / "results" / "llama_cpp_export.json"))
    parser.add_argument("--type", default="q4_0")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--contexts", nargs="+", type=int, default=[16, 128, 512])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    import llama_cpp

    report = json.loads(Path(args.report).read_text())
    rows = [r for r in report["models"] if r["method"] == "dense" or r["ratio"] == args.ratio]
    files = {}
    for r in rows:
        path = Path(r["files"][args.type]["path"])
        if not path.is_file():
            sys.exit(
                f"error: {path} is gone: run benchmarks/llama_cpp_export.py with "
                "--workdir first (or point --report at a report whose files exist)"
            )
        files[r["method"]] = path
    n_ctx = max(args.contexts) + args.new_tokens + 8
    llms = {
        m: llama_cpp.Llama(
            model_path=str(p),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=512,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            verbose=False,
        )
        for m, p in files.items()
    }
    rng = np.random.default_rng(0)
    vocab = next(iter(llms.values())).n_vocab()
    prompts = {c: [int(t) for t in rng.integers(0, vocab, c)] for c in args.contexts}
    times: dict = {(m, c): [] for m in llms for c in args.contexts}
    for r in range(args.rounds + 1):
        for c in args.contexts:
            for m, llm in llms.items():
                llm.reset()
                llm.eval(prompts[c])
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                start = time.perf_counter()
                for _ in range(args.new_tokens):
                    llm.eval([token])
                    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if r:
                    times[(m, c)].append(time.perf_counter() - start)
        log(f"round {r} done")
    for llm in llms.values():
        llm.close()

    results = []
    shapes = {m: file_bytes(p) for m, p in files.items()}
    for c in args.contexts:
        mean_context = c + (args.new_tokens + 1) / 2
        dense_t = times[("dense", c)]
        d_read, _, d_shapes = shapes["dense"]
        d_bytes = d_read + kv_bytes_per_step(d_shapes, mean_context)
        for m in llms:
            t = times[(m, c)]
            read, _, s = shapes[m]
            limit = d_bytes / (read + kv_bytes_per_step(s, mean_context))
            speedup = statistics.median(dense_t) / statistics.median(t)
            results.append(
                {
                    "method": m,
                    "context": c,
                    "decode_s_all": t,
                    "tokens_per_s": args.new_tokens / statistics.median(t),
                    "speedup": speedup,
                    "speedup_spread": [min(dense_t) / max(t), max(dense_t) / min(t)],
                    "bytes_limit": limit,
                    "of_limit": speedup / limit,
                }
            )
    out = {
        "command": (
            "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:])
        ).strip(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        "llama_cpp_python": _version("llama_cpp_python"),
        "settings": {k: v for k, v in vars(args).items()},
        "results": results,
    }
    (HERE / "results" / "llama_cpp_context.json").write_text(json.dumps(out, indent=2) + "\n")
    text = markdown(out)
    (HERE / "llama_cpp_context.md").write_text(text)
    print(text)


def markdown(out: dict) -> str:
    s = out["settings"]
    lines = [
        f"# Pruned SmolLM2 ({s['type']}, ratio {s['ratio']}) in llama.cpp: decoding speed-up "
        "against context length",
        "",
        f"Command: `{out['command']}`  ",
        f"Machine: {out['machine']}, {out['threads']} threads; llama-cpp-python "
        f"{out['llama_cpp_python']}; {out['date']}.",
        "",
        f"These are the files of `llama_cpp_export.md`. Each decodes {s['new_tokens']} greedy "
        "tokens after a random-token prompt of the given length (default f16 KV cache, no flash "
        f"attention). Every file and context is timed in one process, one warm-up round, then "
        f"{s['rounds']} interleaved rounds. Figures are medians, with the min-max spread of the "
        "speed-up against dense at the same context. The bytes limit counts weights plus the "
        "KV cache at the mean context of the generation.",
        "",
        "| context | method | generation tok/s | speed-up (spread) | bytes limit | of limit |",
        "|---|---|---|---|---|---|",
    ]
    for r in out["results"]:
        lo, hi = r["speedup_spread"]
        lines.append(
            f"| {r['context']} | {r['method']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} "
            f"({lo:.2f}-{hi:.2f}) | {r['bytes_limit']:.2f} | {100 * r['of_limit']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
