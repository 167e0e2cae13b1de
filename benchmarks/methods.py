"""Every method on one model at several ratios: WikiText-2 perplexity, time per batch vs dense,
achieved decoder MACs. The paper's protocol: random WikiText-2 windows, batch 20.

For each method and ratio: a fresh copy of the model, the method applied through
``prunekit.prune`` with the same calibration data (statistics cached and shared), WikiText-2
test perplexity on the same random windows, and the achieved decoder MACs per token (the
model adapter's cost model). Timing comes last and is interleaved: every model (dense and each
pruned one) is warmed up once, then ``--rounds`` rounds each run every one of the same
``--timing-batches`` batches on every model back to back (the order rotating from round to
round), so drift of the machine hits all models alike. One dense time (median over all its
timed calls) serves the whole table; each cell reports the median ratio to it and the spread
(min-max over the timed calls). Dynamic models
are timed with their state preserved, so timing never changes what the metrics saw.

    python benchmarks/methods.py --model gemma3-270m --timing-batch-size 5 --rounds 3
                                      # the committed table (~1 h on 2 cores)
    python benchmarks/methods.py --model gemma3-270m --quick               # smoke test
    python benchmarks/methods.py --model gemma3-270m --seeds 0 1 --datasets wikitext2 ptb:validation \
        --rounds 0                 # quality only: two seeds, WikiText-2 and PTB (~1.5 h)

With several ``--seeds`` each seed draws its own calibration windows and evaluation windows
(the paper's protocol varies both); only the first seed's models are timed. ``--rounds 0``
skips timing (for a run that shares the machine: never time beside another job).

The defaults fit a 2-core AVX2 CPU: float32 (bfloat16 matmuls are far slower there), windows
of 256 tokens, one batch of 20 for the perplexity and the timing. On Gemma-3-270M a batch of
20x256 takes about a minute and a half there, most of it in the 262k-vocabulary LM head, so the
committed table times batches of 5 windows (``--timing-batch-size``).

Writes benchmarks/results/methods_<name>.json and benchmarks/methods_<name>.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.data import eval_windows, locate_corpus, sequence_bos
from prunekit.data.tasks import load_questions, locate_task
from prunekit.evaluation.costs import structure_reduction
from prunekit.evaluation.perplexity import perplexity
from prunekit.evaluation.runtime import Contender, time_interleaved
from prunekit.evaluation.zeroshot import evaluate_questions
from prunekit.loading import load_model
from prunekit.registry import resolve_adapter

HERE = Path(__file__).resolve().parent
METHODS = ["pp-fullbatch", "pp", "pp-history", "pp-calib", "wanda-sp", "flap", "llm-pruner"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_target(text: str) -> dict[str, float]:
    """``macs:0.85`` -> ``{"macs": 0.85}`` (a recipe's ``method.target``)."""
    kind, _, value = text.partition(":")
    if not value:
        raise SystemExit(f"--targets {text!r}: give KIND:VALUE, e.g. macs:0.67")
    return {kind: float(value)}


def target_label(target: dict[str, float]) -> str:
    ((kind, value),) = target.items()
    return f"{kind} {value:g}"


def interleaved_times(models: dict, batches, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every model on every batch, in interleaved rounds (the library's
    :func:`~prunekit.evaluation.runtime.time_interleaved`: one warm-up call each, then each
    batch on every model back to back, the order rotating each round)."""
    contenders = [Contender(name, model) for name, model in models.items()]
    timed = time_interleaved(
        contenders,
        batches,
        rounds,
        warmup=1,
        progress=lambda d, t: log(f"timing round {d}/{t} done"),
    )
    return {name: rec["s_all"] for name, rec in timed.items()}


def share_unpruned(model: torch.nn.Module, dense: torch.nn.Module) -> int:
    """Point every parameter of ``model`` equal to one of ``dense``'s (shape, dtype and values:
    the embedding, the LM head, the norms, the layers a method left whole) at the dense
    model's tensor, so that the models kept for timing hold one copy of them; returns the
    bytes freed. Matched by value, not by name (a dynamic method's wrapper renames its
    modules). The values, and so the computation and its time, are unchanged. Without it 22
    Gemma-3 models hold 22 copies of its 168M-parameter embedding and do not fit in 24 GiB."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for d in dense.parameters():
        by_shape.setdefault((tuple(d.shape), d.dtype), []).append(d)
    freed, seen = 0, set()
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            for d in by_shape.get((tuple(p.shape), p.dtype), []):
                if d is p:
                    break
                if torch.equal(d, p):
                    setattr(module, name, d)
                    freed += 0 if id(p) in seen else p.numel() * p.element_size()  # tied once
                    seen.add(id(p))
                    break
    return freed


def join_time(quality: dict, timed: dict) -> dict:
    """``quality`` (a ``--rounds 0`` report) with the time columns of ``timed`` (a
    ``--time-only`` run of the same cells, seed and settings): each timed model must have the
    structure of its quality row, or the join is refused."""
    for key in ("model", "settings"):
        a, b = quality[key], timed[key]
        if key == "settings":
            keep = ("windows", "seq_len", "seed", "targets", "calibration", "dtype")
            a, b = ({k: x.get(k) for k in keep} for x in (a, b))
        if a != b:
            raise SystemExit(f"--join-time: the two runs differ in {key}: {a} against {b}")
    times = {(r["method"], r["ratio"]): r for r in timed["rows"]}
    report = json.loads(json.dumps(quality))
    for row in report["rows"]:
        t = times.get((row["method"], row["ratio"]))
        if t is None or "time_vs_dense" not in t:
            continue
        if t["structure"] != row["structure"]:
            raise SystemExit(
                f"--join-time: {row['method']} at {row['ratio']} was timed with another "
                "structure than its quality row's: not the same model"
            )
        for k in ("s_per_batch", "time_vs_dense", "time_vs_dense_spread", "s_all"):
            row[k] = t[k]
    report["dense"] = {
        **quality["dense"],
        **{k: timed["dense"][k] for k in ("s_per_batch", "s_spread", "s_all")},
    }
    report["settings"] = {
        **quality["settings"],
        **{k: timed["settings"][k] for k in ("rounds", "timing_batches", "timing_batch_size")},
    }
    report["command"] = f"{quality['command']}`; time: `{timed['command']}"
    return report


def zero_shot(model, tokenizer, questions: dict, label: str) -> dict:
    """``{task: {acc_norm, acc_norm_stderr, acc, questions}}`` and their ``average``
    (acc_norm), prunekit's zero-shot scoring (reference formatting, batches of 20 choices)."""
    if not questions:
        return {}
    out = {}
    for task, qs in questions.items():
        r = evaluate_questions(model, tokenizer, qs, description=f"{label} {task}")
        out[task] = {k: r[k] for k in ("acc_norm", "acc_norm_stderr", "acc", "questions")}
        log(f"{label} {task}: acc_norm {r['acc_norm']:.4f} over {r['questions']} questions")
    norms = [v["acc_norm"] for v in out.values()]
    # the average's standard error, the tasks' errors taken as independent
    err = sum(v["acc_norm_stderr"] ** 2 for v in out.values()) ** 0.5 / len(out)
    out["average"] = {"acc_norm": sum(norms) / len(norms), "acc_norm_stderr": err}
    return out


def quality_markdown(report: dict) -> str:
    """The table of a run over several seeds or corpora: perplexity per corpus, mean over
    seeds with each seed's value (no timing columns unless the run timed)."""
    s = report["settings"]
    datasets, seeds = s["datasets"], s["seeds"]
    names = {"wikitext2": "WikiText-2", "ptb:validation": "PTB (validation)"}
    timed = s["rounds"] > 0
    lines = [
        f"# All methods on {report['model']} (CPU, {s['dtype']}): {len(seeds)} seeds",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; torch {report['torch']}; prunekit {report['prunekit']}.  ",
        f"Protocol: for each seed ({', '.join(map(str, seeds))}), {s['windows']} random test "
        f"windows of {s['seq_len']} tokens of each corpus (the test split unless named), batch {s['batch_size']} (the paper's "
        "protocol"
        + ("; every window starts with BOS, as the adapter asks" if s["bos_per_window"] else "")
        + f"), calibration {s['calibration']['samples']} C4 windows of "
        f"{s['calibration']['seq_len']} drawn with the same seed; skipped layers 0-2. A dynamic "
        "method decides on each evaluation batch of each corpus; its history starts from the "
        "calibration data, never from the evaluation corpus. Each cell: the mean over seeds, "
        "then each seed's value.",
        "",
        "Dense: "
        + "; ".join(
            f"{names.get(ds, ds)} {_mean(report['dense']['ppl_by_dataset'][ds]):.3f} "
            f"({', '.join(f'{v:.3f}' for v in report['dense']['ppl_by_dataset'][ds])})"
            for ds in datasets
        )
        + ".",
        "",
        "| method | ratio | "
        + " | ".join(f"{names.get(ds, ds)} PPL" for ds in datasets)
        + " | decoder MACs kept |"
        + (" time / dense (spread) |" if timed else ""),
        "|---|---|" + "---|" * len(datasets) + "---|" + ("---|" if timed else ""),
    ]
    for r in report["rows"]:
        cells = [
            f"{_mean(r['ppl_by_dataset'][ds]):.2f} "
            f"({', '.join(f'{v:.2f}' for v in r['ppl_by_dataset'][ds])})"
            for ds in datasets
        ]
        line = (
            f"| {r['method']} | {r['ratio']} | " + " | ".join(cells) + " | "
            f"{r['decoder_macs_kept_fraction']:.3f} |"
        )
        if timed:
            lo, hi = r["time_vs_dense_spread"]
            line += f" {r['time_vs_dense']:.3f} ({lo:.3f}-{hi:.3f}) |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def budget_markdown(report: dict) -> str:
    """The table of a run to budgets (``--targets``): per target, every method with the ratio
    the engine solved for, what it achieved, perplexity and (when timed) time per batch."""
    s, d = report["settings"], report["dense"]
    timed = s["rounds"] > 0
    datasets, tasks = s["datasets"], s.get("tasks", [])
    names = {"wikitext2": "WikiText-2", "ptb:validation": "PTB (validation)"}
    lines = [
        f"# Methods at equal budgets on {report['model']} (CPU, {s['dtype']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; torch {report['torch']}; prunekit {report['prunekit']}.  ",
        f"Protocol: seed {s['seed']}, {s['windows']} random test windows of {s['seq_len']} tokens "
        f"of each corpus, batch {s['batch_size']} (the paper's protocol"
        + ("; every window starts with BOS, as the adapter asks" if s["bos_per_window"] else "")
        + f"); calibration {s['calibration']['samples']} C4 windows of "
        f"{s['calibration']['seq_len']}; skipped layers 0-2 for every method. Each method is "
        "run to each `method.target` (the engine finds the smallest ratio, threshold or number "
        "of removed units meeting it, with the decoder MACs counted at "
        f"{next((r['target']['macs_seq_len'] for r in report['rows'] if 'target' in r), '?')} "
        "tokens); "
        f"`MACs kept` is counted again at the windows' {s['seq_len']} tokens. "
        + (
            f"Time: every model warmed up once, then {s['rounds']} interleaved rounds over "
            f"{s['timing_batches']} batch(es) of {s['timing_batch_size']} windows; one dense "
            "time (median of its calls), each cell the median ratio to it, spread = min-max."
            if timed
            else "Quality only: no timing in this run."
        ),
        "",
        "Dense: "
        + "; ".join(f"{names.get(ds, ds)} PPL {d['ppl_by_dataset'][ds][0]:.3f}" for ds in datasets)
        + (
            "; zero-shot acc_norm "
            + ", ".join(f"{t} {100 * d['tasks'][t]['acc_norm']:.1f}" for t in tasks)
            + f", average {_avg(d['tasks'])}"
            if tasks
            else ""
        )
        + (
            f"; {d['s_per_batch']:.3f} s per batch (spread {d['s_spread'][0]:.3f}-"
            f"{d['s_spread'][1]:.3f})"
            if timed
            else ""
        )
        + ".",
        "",
        "| target | method | ratio found | "
        + " | ".join(f"{names.get(ds, ds)} PPL" for ds in datasets)
        + "".join(f" | {t}" for t in tasks)
        + (" | zero-shot avg" if tasks else "")
        + " | MACs kept (target's) | MACs kept | params kept | removed |"
        + (" time / dense (spread) |" if timed else ""),
        "|---|---|---|"
        + "---|" * (len(datasets) + len(tasks) + bool(tasks))
        + "---|---|---|---|"
        + ("---|" if timed else ""),
    ]
    for r in report["rows"]:
        if "unreachable" in r:
            why = r["unreachable"].split("cannot be met: ", 1)[-1].split(" (dense")[0]
            lines.append(f"| {r['ratio']} | {r['method']} | cannot be met: {why} |")
            continue
        removed = r.get("removed_layers") or r.get("dropped_attention") or r.get("dropped_mlp")
        what = (
            "blocks " if "removed_layers" in r else "attention " if "dropped_attention" in r else ""
        )
        line = (
            f"| {r['ratio']} | {r['method']} | {r['solved_ratio']:.4f} | "
            + " | ".join(f"{r['ppl_by_dataset'][ds][0]:.2f}" for ds in datasets)
            + _task_cells(r.get("tasks"), tasks)
            + f" | {r['target']['achieved']:.3f} | {r['decoder_macs_kept_fraction']:.3f} | "
            f"{r['params_kept_fraction']:.3f} | " + (f"{what}{removed}" if removed else "") + " |"
        )
        if timed:
            lo, hi = r["time_vs_dense_spread"]
            line += f" {r['time_vs_dense']:.3f} ({lo:.3f}-{hi:.3f}) |"
        lines.append(line)
    if tasks:
        lines += [
            "",
            f"Zero-shot: acc_norm in % on the first {s.get('task_limit') or 'all'} questions of "
            f"each task (prunekit's scoring, reference formatting); the average's ± is its "
            "standard error, the tasks' taken as independent.",
        ]
    return "\n".join(lines) + "\n"


def _avg(tasks: dict) -> str:
    a = tasks["average"]
    return f"{100 * a['acc_norm']:.1f} ± {100 * a['acc_norm_stderr']:.1f}"


def _task_cells(row_tasks: dict | None, tasks: list[str]) -> str:
    if not tasks:
        return ""
    if not row_tasks:
        return " |" * (len(tasks) + 1)
    cells = "".join(f" | {100 * row_tasks[t]['acc_norm']:.1f}" for t in tasks)
    return cells + f" | {_avg(row_tasks)}"


def markdown(report: dict) -> str:
    s = report["settings"]
    if s.get("targets"):
        return budget_markdown(report)
    several = len(s.get("seeds", [s["seed"]])) > 1 or s.get("datasets") != ["wikitext2"]
    if several or not s["rounds"]:
        return quality_markdown(report)
    d = report["dense"]
    lines = [
        f"# All methods on {report['model']} (CPU, {s['dtype']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; torch {report['torch']}; prunekit {report['prunekit']}.  ",
        f"Protocol: WikiText-2 test, {s['windows']} random windows of {s['seq_len']} tokens "
        f"(seed {s['seed']}, the paper's protocol"
        + ("; every window starts with BOS, as the adapter asks" if s["bos_per_window"] else "")
        + f"), batch {s['batch_size']}; calibration "
        f"{s['calibration']['samples']} C4 windows of {s['calibration']['seq_len']} (train "
        "carve-out); LLM-Pruner gradients on 10 windows of 128; skipped layers 0-2. Time: every "
        f"model warmed up once, then {s['rounds']} interleaved rounds over the same "
        f"{s['timing_batches']} batches of {s.get('timing_batch_size', s['batch_size'])} "
        f"windows ({s['rounds'] * s['timing_batches']} timed calls per "
        "model); one dense time for the table (median of its calls), each cell the median of "
        "its calls over it, spread = min-max of the per-call ratios to the dense median. MACs: "
        "decoder-layer MACs per token from the adapter's cost model (embeddings and LM head "
        f"excluded: the LM head alone is {report['lm_head_macs_per_token'] / 1e6:.1f} M MACs per "
        f"token against {d['decoder_macs_per_token'] / 1e6:.1f} M for every decoder layer "
        "together).",
        "",
        f"Dense: perplexity {d['ppl']:.3f}, {d['s_per_batch']:.3f} s per batch "
        f"(spread {d['s_spread'][0]:.3f}-{d['s_spread'][1]:.3f} s).",
        "",
        "| method | ratio | WikiText-2 PPL | time / dense (spread) | decoder MACs kept | "
        "params kept | prune s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lo, hi = r["time_vs_dense_spread"]
        lines.append(
            f"| {r['method']} | {r['ratio']} | {r['ppl']:.3f} | {r['time_vs_dense']:.3f} "
            f"({lo:.3f}-{hi:.3f}) | {r['decoder_macs_kept_fraction']:.3f} | "
            f"{r['params_kept_fraction']:.3f} | {r['prune_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--name", default=None, help="report name (default: from the model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument(
        "--targets",
        nargs="+",
        default=None,
        metavar="KIND:VALUE",
        help="budgets instead of ratios (method.target): e.g. macs:0.85 macs:0.67 "
        "params:90e6; each method is run to each target and the row reports the ratio the "
        "engine found and what was achieved",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=METHODS,
        help="method names; FIRST@MACS+SECOND is a combination (method.then): FIRST to that "
        "share of the dense MACs, then SECOND to the cell's target or ratio",
    )
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--timing-batches", type=int, default=1)
    parser.add_argument(
        "--timing-batch-size",
        type=int,
        default=None,
        help="windows per timed batch (default: --batch-size); the first windows "
        "of the evaluation set, so every model is timed on the same tokens",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the seed of a one-seed run")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="several seeds (default: --seed)"
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["wikitext2"],
        help="evaluation corpora as name or name:split (default split test; offline, PTB has "
        "only ptb:validation): the first is the one the time columns go with",
    )
    parser.add_argument(
        "--suffix", default="", help="appended to the report's file names (methods_<name><suffix>)"
    )
    parser.add_argument(
        "--time-only",
        action="store_true",
        help="no perplexity: prune every cell and time the models (the quality of the same "
        "cells comes from a run with --rounds 0; the seed gives the same models)",
    )
    parser.add_argument(
        "--skip-done",
        type=Path,
        default=None,
        metavar="JSON",
        help="a report or partial file of an earlier run: its cells are not run again",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        metavar="TASK",
        help="zero-shot tasks (prunekit's registered names: piqa, arc_easy, hellaswag, ...) "
        "evaluated on every cell's first-seed model: acc_norm with its standard error",
    )
    parser.add_argument(
        "--task-limit", type=int, default=None, help="the first N questions of each task"
    )
    parser.add_argument(
        "--join-time",
        nargs=2,
        type=Path,
        metavar=("QUALITY", "TIME"),
        help="no run: write QUALITY's report (a --rounds 0 run) with the time columns of TIME "
        "(a --time-only run of the same cells) into QUALITY and its table",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test, not a result")
    args = parser.parse_args()
    if args.join_time:
        quality_path, time_path = args.join_time
        report = join_time(json.loads(quality_path.read_text()), json.loads(time_path.read_text()))
        quality_path.write_text(json.dumps(report, indent=2) + "\n")
        table = HERE / (quality_path.stem + ".md")
        table.write_text(markdown(report) + (f"\n{report['note']}\n" if report.get("note") else ""))
        log(f"wrote {quality_path} and {table}")
        return
    if args.quick:
        args.windows, args.timing_batches, args.ratios = 4, 1, [0.4]
        args.rounds = min(args.rounds, 1)
        args.batch_size, args.calibration_samples = 2, 32
    name = args.name or args.model.split("/")[-1].split("-")[0]
    calibration = {
        "dataset": "c4",
        "samples": args.calibration_samples,
        "seq_len": args.seq_len,
        "batch_size": 16,
    }

    seeds = args.seeds or [args.seed]
    loaded = load_model(args.model, dtype=args.dtype)
    dense_model, tokenizer = loaded.model, loaded.tokenizer
    adapter = resolve_adapter(dense_model)
    bos_id = sequence_bos("auto", adapter, tokenizer)  # as a recipe's default: the adapter says
    test_sets = {  # (seed, corpus) -> windows
        (seed, ds): eval_windows(
            tokenizer,
            locate_corpus(*(ds.split(":", 1) if ":" in ds else (ds, "test"))),
            args.seq_len,
            args.windows,
            "random",
            seed=seed,
            batch_size=args.batch_size,
            bos_id=bos_id,
        )
        for seed in seeds
        for ds in args.datasets
    }
    windows = test_sets[(seeds[0], args.datasets[0])]
    timing_size = args.timing_batch_size or args.batch_size
    timing = list(torch.split(windows, timing_size))[: args.timing_batches]
    dense_ppl = {
        ds: [
            perplexity(dense_model, test_sets[(seed, ds)], args.batch_size, description="dense")[
                "ppl"
            ]
            for seed in seeds
        ]
        for ds in ([] if args.time_only else args.datasets)
    }
    questions = {task: load_questions(locate_task(task), args.task_limit) for task in args.tasks}
    dense_tasks = zero_shot(dense_model, tokenizer, questions, "dense")
    dense_macs = structure_reduction(adapter, None, args.seq_len)["decoder_macs_per_token"]
    params = sum(p.numel() for p in dense_model.parameters())
    head = dense_model.get_output_embeddings().weight
    log(f"dense: ppl {dense_ppl}")

    rows, models = [], {"dense": dense_model}
    budgets: list[tuple[float, dict | None]] = (
        [(0.0, parse_target(t)) for t in args.targets]
        if args.targets
        else [(r, None) for r in args.ratios]
    )
    done = set()
    if args.skip_done:  # cells of an earlier run (its partial file) are not run again
        done = {(r["method"], r["ratio"]) for r in json.loads(args.skip_done.read_text())["rows"]}
    for ratio, target in budgets:
        for method in args.methods:
            label = target_label(target) if target else ratio
            if (method, label) in done:
                continue
            row = {"method": method, "ratio": label, "ppl_by_dataset": {}, "prune_s_all": []}
            budget = {"target": target} if target else {"ratio": ratio}
            method_name = method
            if "+" in method:  # a combination: FIRST@MACS+SECOND, the second to the cell's budget
                first, second = method.split("+", 1)
                method_name, _, share = first.partition("@")
                then = {"name": second, **budget}
                budget = {"target": {"macs": float(share)}, "then": then}
            for seed in seeds:
                model = load_model(args.model, dtype=args.dtype).model
                torch.manual_seed(seed)
                start = time.perf_counter()
                try:
                    outcome = prunekit.prune(
                        model,
                        tokenizer,
                        method=method_name,
                        calibration=calibration,
                        seed=seed,
                        **budget,
                    )
                except prunekit.PrunekitError as exc:
                    if not target:
                        raise
                    row["unreachable"] = str(exc)  # e.g. attn-drop cannot reach a low target
                    break
                row["prune_s_all"].append(time.perf_counter() - start)
                # a dynamic method starts each evaluation from its post-calibration state
                for ds in [] if args.time_only else args.datasets:
                    ppl = perplexity(
                        outcome.model, test_sets[(seed, ds)], args.batch_size, description=method
                    )["ppl"]
                    row["ppl_by_dataset"].setdefault(ds, []).append(ppl)
                if seed == seeds[0]:
                    if questions:
                        row["tasks"] = zero_shot(outcome.model, tokenizer, questions, method)
                    reduction = structure_reduction(adapter, outcome.structure, args.seq_len)
                    row.update(
                        dynamic=outcome.dynamic,
                        params_kept_fraction=(outcome.params_kept or params) / params,
                        decoder_macs_kept_fraction=reduction["flops_kept_fraction"],
                        structure=outcome.structure,
                    )
                    if target:  # the ratio the engine solved for, and what it achieved
                        row["target"] = outcome.extra["target"]
                        row["solved_ratio"] = outcome.extra["ratio"]
                    for key in ("removed_layers", "dropped_attention", "dropped_mlp"):
                        if key in outcome.extra:
                            row[key] = outcome.extra[key]
                    if args.rounds > 0:
                        share_unpruned(outcome.model, dense_model)
                        models[f"{method}@{label}"] = outcome.model
                del outcome, model
                gc.collect()
            if "unreachable" in row:
                rows.append(row)
                log(f"{method} at {label}: {row['unreachable']}")
                continue
            if not args.time_only:
                row["ppl"] = _mean(row["ppl_by_dataset"][args.datasets[0]])
            row["prune_s"] = statistics.median(row["prune_s_all"])
            rows.append(row)
            # what is done so far survives an interrupted run (a long one shares the machine)
            partial = HERE / "results" / f"methods_{name}{args.suffix}.partial.json"
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"dense_ppl": dense_ppl, "rows": rows}, indent=2))
            log(
                f"{method} at {label}: ppl {row['ppl_by_dataset']}, MACs kept "
                f"{row['decoder_macs_kept_fraction']:.3f}"
            )

    dense_median = None
    if args.rounds > 0:
        times = interleaved_times(models, timing, args.rounds)
        dense_median = statistics.median(times["dense"])
        for row in rows:
            key = f"{row['method']}@{row['ratio']}"
            if key not in times:  # a target the method cannot reach: nothing was timed
                continue
            ratios = [t / dense_median for t in times[key]]
            row["s_per_batch"] = statistics.median(times[key])
            row["time_vs_dense"] = row["s_per_batch"] / dense_median
            row["time_vs_dense_spread"] = [min(ratios), max(ratios)]
            row["s_all"] = times[key]
    report = {
        "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "prunekit": prunekit.__version__,
        "model": loaded.info["name"],
        "adapter": adapter.name,
        "settings": {
            "dtype": args.dtype,
            "windows": int(windows.shape[0]),
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "seed": seeds[0],
            "seeds": seeds,
            "datasets": args.datasets,
            "targets": args.targets,
            "timing_batches": len(timing),
            "timing_batch_size": timing_size,
            "rounds": args.rounds,
            "calibration": calibration,
            "sampling": "random",
            "bos_per_window": bos_id is not None,
            **({"tasks": args.tasks, "task_limit": args.task_limit} if args.tasks else {}),
        },
        "lm_head_macs_per_token": head.shape[0] * head.shape[1],
        "dense": {
            "ppl": None if args.time_only else _mean(dense_ppl[args.datasets[0]]),
            "ppl_by_dataset": dense_ppl,
            "s_per_batch": dense_median,
            "s_spread": [min(times["dense"]), max(times["dense"])] if dense_median else None,
            "s_all": times["dense"] if dense_median else None,
            "decoder_macs_per_token": dense_macs,
            **({"tasks": dense_tasks} if dense_tasks else {}),
        },
        "rows": rows,
    }
    suffix = args.suffix + ("_quick" if args.quick else "")
    out = HERE / "results" / f"methods_{name}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.time_only:  # no table of its own: its times go beside a quality run's rows
        return
    if not args.quick:
        (HERE / f"methods_{name}{suffix}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
