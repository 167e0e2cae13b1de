"""Pruned SmolLM2 exported to GGUF and measured in llama.cpp: quality and speed where it is served.

For dense and every static method (``wanda-sp``, ``flap``, ``llm-pruner``, ``pp-calib``) at
``--ratios``: prune SmolLM2-135M-Instruct with the same calibration data, save, and export
with ``prunekit export`` at each ``--types`` (f16, q8_0, q4_0), the tokenizer from the source
GGUF. Then, in llama.cpp (llama-cpp-python, ``--threads`` threads for every model):

* **quality**: WikiText-2 test perplexity of every file on the paper's windows (random
  windows of ``--seq-len`` tokens, seed 0), beside prunekit's own fp32 perplexity on the same
  windows (the export's f16 within 0.5%, q8_0 within 2% is the bar);
* **speed**: prompt processing of a ``--prompt-tokens``-token prompt and greedy generation of
  ``--new-tokens`` tokens, every file timed in ``--rounds`` interleaved rounds after a warm-up
  round (medians, spread min-max); one dense time per type for the speed-ups;
* **bytes limits**: what a decoding step reads (every weight in the file, as the tied output
  embedding is read whole, plus the f16 KV cache averaged over the steps) and what a prompt
  computes (the adapter's decoder MACs plus the output layer), dense over pruned: the speed-up
  each allows at best;
* **memory**: the file size, and the peak resident memory of a fresh process that loads the
  file and generates (a subprocess per file).

    python benchmarks/llama_cpp_export.py            # ~1 h on 2 cores
    python benchmarks/llama_cpp_export.py --quick    # smoke test, not a result

Writes benchmarks/results/llama_cpp_export.json and benchmarks/llama_cpp_export.md; the
deployment section of docs/benchmarks.md is the table of that report.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import prunekit
from prunekit.data import eval_windows, locate_corpus
from prunekit.evaluation.costs import head_macs, structure_reduction
from prunekit.evaluation.perplexity import perplexity
from prunekit.export import export
from prunekit.export.check import LlamaCppRunner
from prunekit.loading import load_model
from prunekit.registry import resolve_adapter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _sections import splice  # noqa: E402  (a sibling module of this script)

CALIBRATION = {"dataset": "c4", "samples": 128, "seq_len": 512, "batch_size": 16}
METHODS = ["wanda-sp", "flap", "llm-pruner", "pp-calib"]

MEMORY_SCRIPT = """
import resource, sys
import numpy as np
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_batch=int(sys.argv[2]),
                      n_ubatch=512, n_threads=int(sys.argv[3]), verbose=False)
tokens = list(np.random.default_rng(0).integers(0, llm.n_vocab(), int(sys.argv[4])))
llm.eval(tokens)
for _ in range(int(sys.argv[5])):
    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
# VmHWM: the peak of this address space (ru_maxrss would keep the forking parent's across exec)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def llama_ppl(path: Path, windows: torch.Tensor, threads: int) -> float:
    runner = LlamaCppRunner(path, n_ctx=windows.shape[1], threads=threads, kv_f32=False)
    nll, count = 0.0, 0
    try:
        for row in windows.tolist():
            logits = runner.logits(row)[:-1].astype(np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            target = np.asarray(row[1:])
            nll -= float(logp[np.arange(len(target)), target].sum())
            count += len(target)
    finally:
        runner.close()
    return math.exp(nll / count)


class Timed:
    """One GGUF file loaded for timing: prompt processing and greedy generation."""

    def __init__(self, path: Path, n_ctx: int, threads: int) -> None:
        import llama_cpp

        # n_batch = n_ctx: llama-cpp-python keeps n_batch rows of last-token logits, indexed
        # by position, when it does not keep every position's (logits_all)
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - start
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return prefill, time.perf_counter() - start


def file_bytes(path: Path) -> tuple[int, int, dict]:
    """(tensor bytes read per decoding step, file size, the model's shapes) of a GGUF file:
    every tensor but an input embedding an output tensor exists beside (then only rows of it
    are read)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    names = {t.name: int(t.n_bytes) for t in reader.tensors}
    read = sum(names.values())
    if "output.weight" in names:
        read -= names["token_embd.weight"]
    arch = reader.fields["general.architecture"].contents()

    def field(key):
        f = reader.fields.get(f"{arch}.{key}")
        if f is None:
            return None
        return f.contents()

    shapes = {
        "layers": field("block_count"),
        "head_count_kv": field("attention.head_count_kv"),
        "head_dim": field("attention.key_length"),
    }
    return read, path.stat().st_size, shapes


def kv_bytes_per_step(shapes: dict, context: float, elem: int = 2) -> float:
    """K and V bytes attention reads per decoding step at ``context`` tokens (f16 cache)."""
    kv = shapes["head_count_kv"]
    kv = kv if isinstance(kv, list) else [kv] * shapes["layers"]
    return sum(2 * k * shapes["head_dim"] * context * elem for k in kv)


def quality(
    args,
    work: Path,
    calibration: dict,
    tokenizer,
    source_gguf,
    adapter,
    loaded,
    windows: torch.Tensor,
    batch: int,
) -> list[dict]:
    """Prune, save, evaluate in prunekit (fp32) and export every model at every type; then
    every file's perplexity through llama.cpp and what a decoding step reads."""
    models: list[dict] = []
    for method, ratio in [("dense", 0.0)] + [(m, r) for r in args.ratios for m in args.methods]:
        model = load_model("smollm2-135m-instruct", dtype="float32").model
        outcome = prunekit.prune(
            model, tokenizer, method=method, ratio=ratio, calibration=calibration
        )
        directory = work / f"{method}-{ratio}" / "model"
        outcome.save(str(directory))
        ppl = perplexity(outcome.model, windows, batch, description=f"{method} {ratio}")["ppl"]
        reduction = structure_reduction(
            adapter, outcome.structure, args.prompt_tokens, head_macs(loaded.model)
        )
        row = {
            "method": method,
            "ratio": ratio,
            "ppl_prunekit_fp32": ppl,
            "decoder_macs_kept_fraction": reduction["flops_kept_fraction"],
            "forward_macs_kept_fraction": reduction["forward_flops_kept_fraction"],
            "params": sum(p.numel() for p in outcome.model.parameters()),
            "files": {},
        }
        for type_name in args.types:
            report = export(directory, type=type_name, tokenizer_from=source_gguf, force=True)
            row["files"][type_name] = {
                "path": report["path"],
                "arch": report["arch"],
                "legalization": report["legalization"],
                "f16_fallback": len(report["f16_fallback"]),
            }
        models.append(row)
        log(f"{method} {ratio}: prunekit fp32 ppl {ppl:.3f}, exported {list(row['files'])}")
        del model, outcome
        gc.collect()

    # quality through llama.cpp
    for row in models:
        for type_name, f in row["files"].items():
            f["ppl_llamacpp"] = llama_ppl(Path(f["path"]), windows, args.threads)
            f["ppl_rel_diff"] = f["ppl_llamacpp"] / row["ppl_prunekit_fp32"] - 1
            read, size, shapes = file_bytes(Path(f["path"]))
            context = args.prompt_tokens + args.new_tokens / 2
            f.update(
                weight_bytes=read, file_bytes=size, kv_bytes=kv_bytes_per_step(shapes, context)
            )
            log(
                f"{row['method']} {row['ratio']} {type_name}: llama.cpp ppl "
                f"{f['ppl_llamacpp']:.3f} ({100 * f['ppl_rel_diff']:+.2f}%)"
            )

    return models


def speed(args, models: list[dict], prompt: list[int]) -> None:
    """Every file timed in interleaved rounds, then its peak memory in a fresh process."""
    # interleaved: every file loaded, one warm-up round, then the timed rounds
    n_ctx = args.prompt_tokens + args.new_tokens + 8
    timed = {
        (i, t): Timed(Path(f["path"]), n_ctx, args.threads)
        for i, row in enumerate(models)
        for t, f in row["files"].items()
    }
    times = {key: {"prefill": [], "decode": []} for key in timed}
    for r in range(args.rounds + 1):
        for key, t in timed.items():
            prefill, decode = t.run(prompt, args.new_tokens)
            if r:
                times[key]["prefill"].append(prefill)
                times[key]["decode"].append(decode)
        log(f"speed: round {r} done")
    for t in timed.values():
        t.llm.close()
    for (i, type_name), tt in times.items():
        f = models[i]["files"][type_name]
        f["prefill_s_all"], f["decode_s_all"] = tt["prefill"], tt["decode"]
        f["prefill_tokens_per_s"] = args.prompt_tokens / statistics.median(tt["prefill"])
        f["decode_tokens_per_s"] = args.new_tokens / statistics.median(tt["decode"])

    # peak memory of a fresh process per file
    for row in models:
        for f in row["files"].values():
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    MEMORY_SCRIPT,
                    f["path"],
                    str(n_ctx),
                    str(args.threads),
                    str(args.prompt_tokens),
                    str(args.new_tokens),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            f["peak_rss_bytes"] = int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workdir", default=None, help="keep the exported files here")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the workdir's exported files and quality results (quality.json) "
        "from an earlier run with the same settings; time them again",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test, not a result")
    args = parser.parse_args()
    calibration = dict(CALIBRATION)
    if args.quick:
        args.windows, args.seq_len, args.prompt_tokens, args.new_tokens = 2, 64, 64, 8
        args.rounds, args.ratios, args.methods, args.types = 1, [0.4], args.methods[:1], ["q8_0"]
        calibration.update(samples=16, seq_len=64)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llama_cpp_export-"))
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m-instruct", dtype="float32")
    tokenizer, source_gguf = loaded.tokenizer, loaded.info["gguf_path"]
    adapter = resolve_adapter(loaded.model)
    batch = min(20, args.windows)
    windows = eval_windows(
        tokenizer,
        locate_corpus("wikitext2", "test"),
        args.seq_len,
        args.windows,
        "random",
        seed=0,
        batch_size=batch,
    )
    prompt = eval_windows(
        tokenizer,
        locate_corpus("wikitext2", "test"),
        args.prompt_tokens,
        1,
        "random",
        seed=1,
        batch_size=1,
    )[0].tolist()

    settings = {
        k: v for k, v in vars(args).items() if k not in ("quick", "workdir", "resume", "rounds")
    }
    cached = work / "quality.json"
    if args.resume and cached.is_file() and json.loads(cached.read_text())["settings"] == settings:
        models = json.loads(cached.read_text())["models"]
        log(f"reusing {cached}: the pruned models, exports and perplexities")
    else:
        models = quality(
            args, work, calibration, tokenizer, source_gguf, adapter, loaded, windows, batch
        )
        cached.write_text(json.dumps({"settings": settings, "models": models}, indent=1) + "\n")
    speed(args, models, prompt)

    # speed-ups and limits against dense of the same type
    dense = models[0]["files"]
    for row in models:
        for type_name, f in row["files"].items():
            d = dense[type_name]
            f["decode_speedup"] = statistics.median(d["decode_s_all"]) / statistics.median(
                f["decode_s_all"]
            )
            f["decode_speedup_spread"] = [
                min(d["decode_s_all"]) / max(f["decode_s_all"]),
                max(d["decode_s_all"]) / min(f["decode_s_all"]),
            ]
            f["prefill_speedup"] = statistics.median(d["prefill_s_all"]) / statistics.median(
                f["prefill_s_all"]
            )
            f["decode_bytes_limit"] = (d["weight_bytes"] + d["kv_bytes"]) / (
                f["weight_bytes"] + f["kv_bytes"]
            )
            f["prefill_macs_limit"] = 1 / row["forward_macs_kept_fraction"]
            f["of_bytes_limit"] = f["decode_speedup"] / f["decode_bytes_limit"]
    report = {
        "command": (
            "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:])
        ).strip(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "prunekit": prunekit.__version__,
        "llama_cpp_python": _version("llama_cpp_python"),
        "gguf": _version("gguf"),
        "model": loaded.info["name"],
        "calibration": calibration,
        "settings": {k: v for k, v in vars(args).items() if k not in ("quick", "workdir")},
        "models": models,
    }
    suffix = "_quick" if args.quick else ""
    out = HERE / "results" / f"llama_cpp_export{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    if not args.quick:
        (HERE / "llama_cpp_export.md").write_text(text)
        splice(HERE.parent / "docs" / "benchmarks.md", deployment_section(report))
    print(text)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# Pruned {report['model']} in llama.cpp: quality against speed",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}, {report['threads']} threads for every model; "
        f"llama-cpp-python {report['llama_cpp_python']}, gguf {report['gguf']}, torch "
        f"{report['torch']}, prunekit {report['prunekit']}; {report['date']}.",
        "",
        f"Each model is pruned by prunekit (calibration: {report['calibration']['samples']} C4 "
        f"windows of {report['calibration']['seq_len']} tokens), saved and exported with "
        "`prunekit export` (tokenizer from the source GGUF), then run by llama.cpp. "
        f"**PPL**: WikiText-2 test, {s['windows']} random windows of {s['seq_len']} tokens "
        "(seed 0; the paper's protocol), through llama.cpp (default f16 KV cache), beside "
        "prunekit's own fp32 model on the same windows. **Speed**: a "
        f"{s['prompt_tokens']}-token prompt (prompt processing) and {s['new_tokens']} greedy "
        f"tokens (generation), every file in one process, one warm-up round, then {s['rounds']} "
        "interleaved rounds; medians, spread min-max; speed-ups against dense of the same type. "
        "**Limits**: decoding reads every weight in the file plus the KV cache once per token, so "
        "dense bytes over pruned bytes bound its speed-up; prompt processing is bound by MACs "
        "(decoder and output layer). **Memory**: the peak resident set of a fresh process that "
        "loads the file and generates.",
        "",
        "| method | ratio | type | arch | PPL llama.cpp | PPL prunekit fp32 | diff | file MiB "
        "| peak RSS MiB | prompt tok/s | speed-up (limit) | generation tok/s | speed-up "
        "(spread) | bytes limit | of limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["models"]:
        for type_name, f in row["files"].items():
            lo, hi = f["decode_speedup_spread"]
            lines.append(
                f"| {row['method']} | {row['ratio']} | {type_name} | {f['arch']} | "
                f"{f['ppl_llamacpp']:.3f} | {row['ppl_prunekit_fp32']:.3f} | "
                f"{100 * f['ppl_rel_diff']:+.2f}% | {f['file_bytes'] / 2**20:.1f} | "
                f"{f['peak_rss_bytes'] / 2**20:.0f} | {f['prefill_tokens_per_s']:.0f} | "
                f"{f['prefill_speedup']:.2f} ({f['prefill_macs_limit']:.2f}) | "
                f"{f['decode_tokens_per_s']:.1f} | {f['decode_speedup']:.2f} "
                f"({lo:.2f}-{hi:.2f}) | {f['decode_bytes_limit']:.2f} | "
                f"{100 * f['of_bytes_limit']:.0f}% |"
            )
    lines += [
        "",
        "Speed-ups of one type's files timed apart (only those files in the process) at several "
        "context lengths: `python benchmarks/llama_cpp_context.py --type TYPE`, "
        "[llama_cpp_context.md](llama_cpp_context.md).",
    ]
    return "\n".join(lines) + "\n"


def deployment_section(report: dict) -> str:
    """docs/benchmarks.md's deployment section: quality through llama.cpp against llama.cpp's
    generation speed, one point per method, ratio and type, dense and its quantized forms
    included, so that pruning can be weighed against quantizing one step further."""
    s = report["settings"]
    dense = report["models"][0]
    points = []
    for row in report["models"]:
        for type_name, f in row["files"].items():
            points.append((row, type_name, f))
    lines = [
        "<!-- deployment:start -->",
        "## Deployment: pruned and quantized in llama.cpp",
        "",
        "<!-- generated by benchmarks/llama_cpp_export.py; do not edit by hand -->",
        "",
        f"SmolLM2 pruned by prunekit, exported with `prunekit export` and run by llama.cpp "
        f"(llama-cpp-python {report['llama_cpp_python']}, {report['threads']} threads, this "
        f"project's CPU, {report['date']}): WikiText-2 perplexity through llama.cpp "
        f"({s['windows']} random windows of {s['seq_len']} tokens, the paper's windows) against "
        f"generation speed ({s['new_tokens']} greedy tokens after a {s['prompt_tokens']}-token "
        f"prompt), every file timed in interleaved rounds. The dense model at a lower bit width "
        "is the alternative to pruning: a method is worth it where it sits left of (faster) and "
        "below (better) the dense point one quantization step further. Details, spreads, "
        "prompt speed, memory and the bytes limits: "
        "[../benchmarks/llama_cpp_export.md](../benchmarks/llama_cpp_export.md).",
        "",
        "| model | type | PPL (llama.cpp) | generation tok/s | vs dense of the same type | "
        "vs dense f16 | file MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    f16 = dense["files"].get("f16") or next(iter(dense["files"].values()))
    for row, type_name, f in sorted(points, key=lambda p: -p[2]["decode_tokens_per_s"]):
        name = "dense" if row["method"] == "dense" else f"{row['method']} {row['ratio']}"
        lines.append(
            f"| {name} | {type_name} | {f['ppl_llamacpp']:.2f} | {f['decode_tokens_per_s']:.1f} | "
            f"{f['decode_speedup']:.2f}x | "
            f"{f['decode_tokens_per_s'] / f16['decode_tokens_per_s']:.2f}x | "
            f"{f['file_bytes'] / 2**20:.0f} |"
        )
    lines += ["", "<!-- deployment:end -->"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
