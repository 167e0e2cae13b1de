"""The structure of Probe Pruning's main table, regenerated on the offline model (SmolLM2).

Rows: dense and every method at every ratio; columns: WikiText-2 perplexity, zero-shot accuracy
on the 7 commonsense tasks (each task and the average), time per batch vs dense, and the
headline metric, degradation per unit runtime reduction
``(PPL_pruned - PPL_dense) / (1 - t_pruned / t_dense)`` with each method's value relative to
PP's (see prunekit/evaluation/headline.py).

A *cell* is one (method, ratio, seed): ``prunekit.apply`` of one recipe, in this process,
with dense and pruned timed side by side on the same batches. The first seed of a cell gets the
full evaluation (perplexity, tasks, runtime); further seeds evaluate perplexity only (their
calibration draw and perplexity windows differ), which gives the perplexity spread cheaply.
Each cell's results are cached under ``--cells`` (keyed by its exact recipe), so an
interrupted run continues where it stopped; calibration statistics are shared between cells
through prunekit's statistics cache.

    python benchmarks/paper_table.py                 # the committed table (bf16; ~1 h on 2 cores)
    python benchmarks/paper_table.py --quick         # smoke test (< 10 min), not a result
    python benchmarks/paper_table.py --render-only   # rewrite the report from the cached cells

Needs ``pip install "prunekit[bench]"`` (matplotlib) and the task files: a data directory laid
out like ../shared/data (``--data-dir`` or ``$PRUNEKIT_DATA_DIR``; default ../shared/data).
Writes benchmarks/results/paper_table.json (raw results), docs/benchmarks.md and
docs/img/paper_table.png; ``--quick`` writes under runs/paper_table_quick/ instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
METHODS = ["pp-fullbatch", "wanda-sp", "flap", "llm-pruner", "pp"]
TITLES = {
    "dense": "Dense",
    "pp-fullbatch": "Full-batch probing",
    "wanda-sp": "Wanda-sp",
    "flap": "FLAP",
    "llm-pruner": "LLM-Pruner",
    "pp": "PP (Probe Pruning)",
    "pp-calib": "PP metric, calibration only",
    "pp-history": "PP, history only",
    "loraprune": "LoRAPrune w/o LoRA",
    "loraprune+lora": "LoRAPrune with LoRA",
    "llm-pruner+lora": "LLM-Pruner with LoRA recovery",
    "wanda-sp+lora": "Wanda-sp with LoRA recovery",
}
#: the LoRA fine-tunes of the table's rows (CPU-sized: 200 steps of 4 C4 windows of 128 tokens;
#: the paper's fine-tunes are far longer)
FINETUNE = {
    "steps": 200,
    "batch_size": 4,
    "lr": 2.0e-4,
    "rank": 8,
    "alpha": 16,
    "checkpoint_every": 0,
}
RECOVERY = {"dataset": "c4", "samples": 1000, "seq_len": 128, **FINETUNE}
#: rows that are not a method name alone: (method, its extra keys, a recovery section or None).
#: LLM-Pruner "w/o LoRA" is the plain ``llm-pruner`` row.
ROWS = {
    "loraprune": ("loraprune", {"seq_len": 128, "keep_lora": False, "finetune": FINETUNE}, None),
    "loraprune+lora": (
        "loraprune",
        {"seq_len": 128, "keep_lora": True, "finetune": FINETUNE},
        None,
    ),
    "llm-pruner+lora": ("llm-pruner", {}, RECOVERY),
    "wanda-sp+lora": ("wanda-sp", {}, RECOVERY),
}
#: sections of docs/benchmarks.md that other scripts write (kept when the table is rewritten):
#: every ``<!-- name:start -->`` ... ``<!-- name:end -->`` pair the page holds
SECTION = re.compile(r"<!-- ([\w-]+):start -->")
TASK_TITLES = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "hellaswag": "HellaS",
    "winogrande": "WinoG",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
}


# --------------------------------------------------------------------------------------------
# Settings and cells
# --------------------------------------------------------------------------------------------


def settings_from(args) -> dict:
    quick = args.quick
    return {
        "quick": quick,
        "model": "smollm2-135m-instruct",
        "dtype": args.dtype,
        "methods": ["dense", *args.methods],
        "ratios": args.ratios,
        "seeds": args.seeds,
        "calibration": {
            "dataset": "c4",
            "samples": 16 if quick else 128,
            "seq_len": 512,
            "batch_size": 8 if quick else 16,
        },
        "perplexity": {
            "dataset": "wikitext2",
            "split": "test",
            "seq_len": 512,
            "windows": args.windows or (4 if quick else 40),
            "batch_size": 20,
            "sampling": "random",
        },
        "tasks": {
            "limit": args.limit or (2 if quick else 100),
            "batch_size": 20,
            "max_length": 512,
        },
        # cells measure quality only; times come from one interleaved timing stage
        "runtime": {"batches": 0, "warmup": 0, "repeats": 1},
        "timing": {
            "dtype": args.timing_dtype or args.dtype,
            "batches": 1,
            "rounds": 5 if not quick else 5,
            "warmup": 1,
            "ratios": args.timing_ratios or args.ratios,
        },
        "skip_layers": [0, 1, 2],
    }


def cell_recipe(settings: dict, method: str, ratio: float, seed: int, full: bool) -> dict:
    """The recipe of one cell; ``full`` adds the tasks and the runtime measurement."""
    ppl = dict(settings["perplexity"])
    ppl["batch_size"] = min(ppl["batch_size"], ppl["windows"])
    runtime = settings["runtime"]
    tasks = [{"name": "commonsense", **settings["tasks"]}] if full else []
    name, extra, recovery = ROWS.get(method, (method, {}, None))
    recipe = {
        "model": {"id": settings["model"], "dtype": settings["dtype"], "device": "cpu"},
        "calibration": settings["calibration"],
        "method": {"name": name, "ratio": ratio, "skip_layers": settings["skip_layers"], **extra},
        "evaluation": {"perplexity": [ppl], "tasks": tasks},
        "runtime": runtime,
        "seed": seed,
    }
    if recovery is not None:
        recipe["recovery"] = recovery
    return recipe


def cell_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def cells_of(settings: dict) -> list[tuple[str, float, int, bool]]:
    out = []
    for i, seed in enumerate(settings["seeds"]):
        out.append(("dense", 0.0, seed, i == 0))
        for ratio in settings["ratios"]:
            for method in settings["methods"][1:]:
                out.append((method, ratio, seed, i == 0))
    return out


def run_cell(recipe: dict, data_dir: str) -> dict:
    from prunekit.runner import apply

    with tempfile.TemporaryDirectory() as tmp:
        recipe = {**recipe, "data_dir": data_dir}
        start = time.perf_counter()
        result = apply(recipe, output=Path(tmp) / "run")
        result["cell_wall_s"] = time.perf_counter() - start
    result.pop("output_dir", None)
    return result


def run_cells(settings: dict, cells_dir: Path, data_dir: str) -> list[dict]:
    cells_dir.mkdir(parents=True, exist_ok=True)
    out = []
    todo = cells_of(settings)
    for n, (method, ratio, seed, full) in enumerate(todo, start=1):
        recipe = cell_recipe(settings, method, ratio, seed, full)
        key = cell_key(recipe)
        path = cells_dir / f"{method}-r{ratio:g}-s{seed}-{key}.json"
        if path.is_file():
            cell = json.loads(path.read_text())
            print(f"[{n}/{len(todo)}] {path.name}: cached", file=sys.stderr)
        else:
            print(
                f"[{n}/{len(todo)}] {method} r={ratio:g} seed={seed} "
                f"({'full' if full else 'perplexity only'})",
                file=sys.stderr,
                flush=True,
            )
            result = run_cell(recipe, data_dir)
            cell = {
                "method": method,
                "ratio": ratio,
                "seed": seed,
                "full": full,
                "key": key,
                "recipe": recipe,
                "result": result,
            }
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cell, indent=1, default=str))
            os.replace(tmp, path)  # a cell is either complete on disk or absent
            print(f"    {result['cell_wall_s']:.0f} s", file=sys.stderr, flush=True)
        out.append(cell)
    return out


# --------------------------------------------------------------------------------------------
# Timing stage: one process, one dense time, every method interleaved on the same batches
# --------------------------------------------------------------------------------------------


def timing_settings(settings: dict) -> dict:
    """What the timing stage depends on (its cache key)."""
    t = settings["timing"]
    return {
        "model": settings["model"],
        "dtype": t["dtype"],
        "methods": settings["methods"][1:],
        "ratios": t["ratios"],
        "calibration": settings["calibration"],
        "skip_layers": settings["skip_layers"],
        "perplexity": settings["perplexity"],
        "batches": t["batches"],
        "rounds": t["rounds"],
        "warmup": t["warmup"],
        "seed": settings["seeds"][0],
    }


def run_timing(settings: dict, out_dir: Path, data_dir: str) -> dict:
    """Dense and every (method, ratio) of the timing settings, each pruned once (first seed)
    on its own copy of the model, then timed in interleaved rounds on the first batches of the
    first seed's WikiText-2 windows (:func:`prunekit.evaluation.runtime.time_interleaved`):
    one dense time for the table, and for each model its per-call ratios to the dense call on
    the same batch in the same round. Cached under ``out_dir`` by its settings."""
    import copy

    import torch

    import prunekit
    from prunekit.data import eval_windows, locate_corpus
    from prunekit.evaluation.costs import head_macs, structure_reduction
    from prunekit.evaluation.runtime import Contender, flop_limit, phase_medians, time_interleaved
    from prunekit.loading import load_model
    from prunekit.registry import resolve_adapter

    ts = timing_settings(settings)
    key = hashlib.sha256(json.dumps(ts, sort_keys=True).encode()).hexdigest()[:16]
    path = out_dir / f"paper_table_timing-{key}.json"
    if path.is_file():
        print(f"timing: {path.name} cached", file=sys.stderr)
        return json.loads(path.read_text())
    ppl = dict(ts["perplexity"])
    ppl["batch_size"] = min(ppl["batch_size"], ppl["windows"])
    loaded = load_model(ts["model"], dtype=ts["dtype"])
    dense, tokenizer = loaded.model, loaded.tokenizer
    adapter, head = resolve_adapter(dense), head_macs(dense)
    windows = eval_windows(
        tokenizer,
        locate_corpus(ppl["dataset"], ppl["split"], data_dir=data_dir),
        ppl["seq_len"],
        ppl["windows"],
        ppl["sampling"],
        seed=ts["seed"],
        batch_size=ppl["batch_size"],
    )
    batches = list(torch.split(windows, ppl["batch_size"]))[: ts["batches"]]
    contenders, reductions = [Contender("dense", dense)], {}
    for ratio in ts["ratios"]:
        for method in ts["methods"]:
            name = f"{method}@{ratio:g}"
            print(f"timing: pruning {name}", file=sys.stderr, flush=True)
            # a recovered row has its method's shapes (recovery merges into them): its time
            # is measured on the method's model, without the fine-tune
            base, extra, _ = ROWS.get(method, (method, {}, None))
            outcome = prunekit.prune(
                copy.deepcopy(dense),
                tokenizer,
                method=base,
                ratio=ratio,
                calibration=dict(ts["calibration"]),
                seed=ts["seed"],
                skip_layers=ts["skip_layers"],
                **extra,
            )
            contenders.append(Contender(name, outcome.model))
            reductions[name] = structure_reduction(adapter, outcome.structure, ppl["seq_len"], head)

    def progress(done, total):
        print(f"timing: round {done}/{total}", file=sys.stderr, flush=True)

    timed = time_interleaved(contenders, batches, ts["rounds"], ts["warmup"], progress)
    d = timed["dense"]["s_all"]
    models = {}
    for name, rec in timed.items():
        if name == "dense":
            continue
        pairs = [p / q for p, q in zip(rec["s_all"], d, strict=True)]
        kept = reductions[name]["forward_flops_kept_fraction"]
        limit = flop_limit(kept)
        models[name] = {
            "s_all": rec["s_all"],
            "s_per_batch": statistics.median(rec["s_all"]),
            "time_ratio": statistics.median(pairs),
            "time_ratios": pairs,
            "time_ratio_spread": [min(pairs), max(pairs)],
            "overhead_s_per_batch": phase_medians(rec["phases_s_all"]) or None,
            "forward_flops_kept_fraction": kept,
            "flop_limit": limit,
            # a speed-up beyond what the kept FLOPs allow is timing noise, not a result
            "beyond_flop_limit": bool(limit and 1 / statistics.median(pairs) > limit),
        }
    result = {
        "settings": ts,
        "key": key,
        "batch_shape": list(batches[0].shape),
        "timed_calls": len(d),
        "dense": {"s_all": d, "s_per_batch": statistics.median(d), "s_spread": [min(d), max(d)]},
        "models": models,
        "machine": machine(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return result


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(settings: dict, cells: list[dict], timing: dict | None) -> dict:
    """One row per (method, ratio): perplexity over the seeds and the first seed's tasks from
    the cells; time and headline from the timing stage (one dense time for the table).

    The headline is ``mean_seeds(PPL - PPL_dense) / (1 - time)`` with ``time`` the median
    per-call ratio to dense; its spread is the min-max over every (seed, timed call) pair, so
    it carries the timing repeats as well as the seeds."""
    from prunekit.evaluation.headline import degradation_per_runtime_reduction, relative_to

    by = {(c["method"], c["ratio"], c["seed"]): c for c in cells}
    seeds = settings["seeds"]
    first = seeds[0]
    dense_ppl = {
        s: by[("dense", 0.0, s)]["result"]["metrics"]["wikitext2-test"]["ppl"] for s in seeds
    }
    timed_models = (timing or {}).get("models", {})
    rows = []
    for method in settings["methods"]:
        for ratio in [0.0] if method == "dense" else settings["ratios"]:
            full = by[(method, ratio, first)]["result"]
            metrics = full["metrics"]
            ppls = [
                by[(method, ratio, s)]["result"]["metrics"]["wikitext2-test"]["ppl"] for s in seeds
            ]
            timed = None if method == "dense" else timed_models.get(f"{method}@{ratio:g}")
            t_ratio = 1.0 if method == "dense" else (timed or {}).get("time_ratio")
            headline = spread = None
            if timed is not None:
                loss = statistics.fmean(p - dense_ppl[s] for p, s in zip(ppls, seeds, strict=True))
                headline = degradation_per_runtime_reduction(loss, 0.0, t_ratio, 1.0)
                combos = [
                    degradation_per_runtime_reduction(p, dense_ppl[s], r, 1.0)
                    for p, s in zip(ppls, seeds, strict=True)
                    for r in timed["time_ratios"]
                ]
                if headline is not None and all(h is not None for h in combos):
                    spread = [min(combos), max(combos)]
            tasks = {
                t: {
                    "acc": metrics[t]["acc"],
                    "acc_norm": metrics[t]["acc_norm"],
                    "questions": metrics[t]["questions"],
                }
                for t in TASK_TITLES
                if t in metrics
            }
            average = metrics.get("tasks_average", {})
            ppl_mean, ppl_std = _mean_std(ppls)
            rows.append(
                {
                    "method": method,
                    "ratio": ratio,
                    "dynamic": full["dynamic"],
                    "ppl": ppl_mean,
                    "ppl_std": ppl_std,
                    "ppl_seeds": ppls,
                    "tasks": tasks,
                    "acc_norm_avg": average.get("acc_norm"),
                    "acc_avg": average.get("acc"),
                    "time_ratio": t_ratio,
                    "time_ratio_spread": (timed or {}).get("time_ratio_spread"),
                    "beyond_flop_limit": (timed or {}).get("beyond_flop_limit"),
                    "flop_limit": (timed or {}).get("flop_limit"),
                    "overhead_s_per_batch": (timed or {}).get("overhead_s_per_batch"),
                    "params_kept_fraction": full["reduction"]["params_kept_fraction"],
                    "flops_kept_fraction": full["reduction"]["flops_kept_fraction"],
                    "headline": headline,
                    "headline_spread": spread,
                    "cell_wall_s": full.get("cell_wall_s"),
                }
            )
    for ratio in settings["ratios"]:
        here = [r for r in rows if r["ratio"] == ratio]
        rel = relative_to({r["method"]: r["headline"] for r in here}, "pp")
        for r in here:
            r["headline_vs_pp"] = rel.get(r["method"])
    return {"rows": rows, "verdict": verdict(rows, max(settings["ratios"]))}


def baselines(settings: dict, data_dir: str) -> dict:
    """Per task, on the evaluated questions: the majority-class accuracy (always answering the
    most frequent gold index) and the chance accuracy (mean of 1 / number of choices)."""
    from collections import Counter

    from prunekit.data.tasks import load_questions, locate_task

    out = {}
    for task in TASK_TITLES:
        questions = load_questions(locate_task(task, data_dir), settings["tasks"]["limit"])
        counts = Counter(q.gold for q in questions)
        out[task] = {
            "majority": max(counts.values()) / len(questions),
            "chance": statistics.fmean(1 / q.num_choices for q in questions),
        }
    return out


def verdict(rows: list[dict], ratio: float) -> dict:
    """PP's headline value vs the best (lowest) static method's at ``ratio``."""
    here = [r for r in rows if r["ratio"] == ratio]
    pp = next((r for r in here if r["method"] == "pp"), None)
    static = [
        r for r in here if not r["dynamic"] and r["method"] != "dense" and r["headline"] is not None
    ]
    if pp is None or pp["headline"] is None or not static:
        return {"ratio": ratio, "holds": None, "reason": "PP or every static method has no value"}
    best = min(static, key=lambda r: r["headline"])
    factor = best["headline"] / pp["headline"] if pp["headline"] > 0 else None
    # beyond the spread: every (seed, call) value of one below every value of the other
    pp_s, best_s = pp.get("headline_spread"), best.get("headline_spread")
    separated = None
    if pp_s and best_s:
        separated = pp_s[1] < best_s[0] or best_s[1] < pp_s[0]
    return {
        "ratio": ratio,
        "pp": pp["headline"],
        "pp_spread": pp_s,
        "best_static": best["method"],
        "best_static_value": best["headline"],
        "best_static_spread": best_s,
        "factor": factor,
        "separated": separated,
        "holds": factor is not None and factor > 1.0,
        "paper_factor": 2.56,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _f(x, fmt="{:.2f}", none="n/a"):
    return none if x is None else fmt.format(x)


def _pct(x):
    return _f(None if x is None else 100 * x, "{:.1f}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["aggregate"]["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in report["settings"]["methods"]:
        pts = [r for r in rows if r["method"] == method and r["time_ratio"] is not None]
        if not pts:
            continue
        xs, ys = [r["time_ratio"] for r in pts], [r["ppl"] for r in pts]
        ax.plot(
            xs,
            ys,
            marker="o",
            linestyle="-" if len(pts) > 1 else "",
            label=TITLES.get(method, method),
        )
        for r in pts:
            if r["method"] != "dense":
                ax.annotate(
                    f"{r['ratio']:.0%}",
                    (r["time_ratio"], r["ppl"]),
                    fontsize=7,
                    xytext=(4, 2),
                    textcoords="offset points",
                )
    ax.set_xlabel("time per batch / dense (same process, same batches)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_yscale("log")
    s = report["settings"]
    ax.set_title(f"SmolLM2-135M, {s['dtype']}, CPU: perplexity vs runtime")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report: dict, image: str) -> str:
    s, agg = report["settings"], report["aggregate"]
    rows = agg["rows"]
    tasks = [t for t in TASK_TITLES if any(t in r["tasks"] for r in rows)]
    seeds = s["seeds"]
    lines = [
        "# Benchmarks: Probe Pruning's main table on the offline model",
        "",
        "<!-- generated by benchmarks/paper_table.py; do not edit by hand -->",
        "",
        *(
            [
                "**Smoke test (`--quick`): a few windows and questions per cell, timings of one "
                "small batch. Not a result.**",
                "",
            ]
            if s.get("quick")
            else []
        ),
        f"Command: `{report['command']}` ({report['elapsed_min']:.0f} min of cell time on "
        f"{report['machine']['cpu_count']} CPU cores, torch {report['machine']['torch']}, "
        f"prunekit {report['machine']['prunekit']}). Raw results: "
        "[benchmarks/results/paper_table.json](../benchmarks/results/paper_table.json).",
        "",
        "## Settings",
        "",
        f"- Model: SmolLM2-135M-Instruct (`{s['model']}`, the offline default: Q4_1 GGUF "
        f"dequantised), **{s['dtype']}**, CPU; layers {s['skip_layers']} are never pruned and the "
        "other layers get the compensated ratio, as in the paper.",
        f"- Calibration (all methods that calibrate): C4 (bundled sample, documents 1000-1999), "
        f"{s['calibration']['samples']} windows of {s['calibration']['seq_len']} tokens.",
        f"- WikiText-2 (raw, test): {s['perplexity']['windows']} windows of "
        f"{s['perplexity']['seq_len']} tokens at random offsets (the reference's sampling), "
        f"batches of {s['perplexity']['batch_size']}; seeds {seeds}. PPL is the mean over the "
        "seeds, ± the standard deviation across seeds (calibration draw and windows change with "
        "the seed).",
        f"- Zero-shot tasks: the first **{s['tasks']['limit']} questions** of each task "
        f"(seed {seeds[0]} only), batches of {s['tasks']['batch_size']} choices, reference "
        "formatting; accuracy is `acc_norm` (NLL per continuation token, the reference's "
        "plotted metric), in %. `acc` (summed NLL) is in the raw JSON and its average in the "
        "last accuracy column.",
        *(
            _timing_lines(report)
            if report.get("timing")
            else ["- Runtime: not measured (no timing stage in this report)."]
        ),
        "- Headline: degradation per unit runtime reduction, `mean over seeds of (PPL - "
        "PPL_dense) / (1 - time)`, lower is better, with its min-max over every (seed, timed "
        "call) pair in brackets; `n/a` where a method is not faster than dense or was not "
        "timed; `vs PP` is the method's value divided by PP's at the same ratio.",
        "",
        "## Table",
        "",
        "| method | ratio | WikiText-2 PPL | "
        + " | ".join(TASK_TITLES[t] for t in tasks)
        + " | avg acc_norm | avg acc | time | headline | vs PP |",
        "|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|",
    ]
    for r in rows:
        ppl = _f(r["ppl"]) + (f" ± {r['ppl_std']:.2f}" if r["ppl_std"] is not None else "")
        cells = [_pct(r["tasks"].get(t, {}).get("acc_norm")) for t in tasks]
        hs = r.get("headline_spread")
        headline = _f(r["headline"], "{:.1f}") + (f" ({hs[0]:.1f}-{hs[1]:.1f})" if hs else "")
        ts = r.get("time_ratio_spread")
        time_ = _f(r["time_ratio"], "{:.3f}") + (f" ({ts[0]:.3f}-{ts[1]:.3f})" if ts else "")
        if r.get("beyond_flop_limit"):
            time_ += " ⚠"
        lines.append(
            f"| {TITLES.get(r['method'], r['method'])} | {r['ratio']:.0%} | {ppl} | "
            + " | ".join(cells)
            + f" | {_pct(r['acc_norm_avg'])} | {_pct(r['acc_avg'])} | {time_}"
            + f" | {headline if r['method'] != 'dense' else '—'}"
            + f" | {_f(r.get('headline_vs_pp'), '{:.2f}×') if r['method'] != 'dense' else '—'} |"
        )
    base = report.get("baselines")
    if base:
        for key, title in (("chance", "Chance"), ("majority", "Majority class")):
            values = [base[t][key] for t in tasks]
            lines.append(
                f"| *{title}* | — | — | "
                + " | ".join(_pct(x) for x in values)
                + f" | {_pct(statistics.fmean(values))} | — | — | — | — |"
            )
    v = agg["verdict"]
    lines += [
        "",
        f"![perplexity vs runtime]({image})",
        "",
        "## Does PP's headline advantage hold?",
        "",
    ]
    if v.get("holds") is None:
        lines.append(f"Not decidable at {v['ratio']:.0%}: {v['reason']}.")
    else:
        word = "holds" if v["holds"] else "does not hold"
        ps, bs = v.get("pp_spread"), v.get("best_static_spread")
        spreads = (
            (
                f" (spreads over seeds and timed calls: PP {ps[0]:.1f}-{ps[1]:.1f}, "
                f"{TITLES[v['best_static']]} {bs[0]:.1f}-{bs[1]:.1f})"
            )
            if ps and bs
            else ""
        )
        lines.append(
            f"At {v['ratio']:.0%}, PP gives up {v['pp']:.1f} perplexity points per unit of "
            f"runtime reduction; the best static method, {TITLES[v['best_static']]}, gives up "
            f"{v['best_static_value']:.1f}{spreads}. "
            + (
                f"PP's value is {v['factor']:.2f}× lower than the best static method's"
                if v["factor"] is not None and v["holds"]
                else f"PP's value is {1 / v['factor']:.2f}× higher than the best static method's"
                if v["factor"]
                else "PP's value is not positive"
            )
            + f", so the advantage **{word}** on this model"
            + (
                " and the two spreads do not overlap"
                if v.get("separated")
                else " but the two spreads overlap: the timing and seed noise is as large as "
                "the difference"
                if v.get("separated") is False
                else ""
            )
            + f" (the paper: {v['paper_factor']}× lower on LLaMA-2-7B)."
        )
    lines += [
        "",
        "## Reading the numbers",
        "",
        "- SmolLM2-135M is a 30-layer model with 9 query heads over 3 KV heads; structured "
        "pruning hurts it much more than a 7B model, so absolute perplexities and accuracies "
        "are far from the paper's. Several tasks sit near chance for the dense model already "
        "(BoolQ, ARC-c, OBQA), so accuracy differences between methods there are within the "
        f"noise of {s['tasks']['limit']} questions (standard errors per task are in the raw "
        "JSON).",
        *(
            [
                f"- The last two rows are what no model is needed for, on the same questions: "
                "chance (1 / choices) and always answering the most frequent gold index. A pruned "
                "model can beat the dense one on a task by shifting its prior over the choices: on "
                f"BoolQ (yes/no) the majority class scores {_pct(base['boolq']['majority'])}% while "
                f"dense scores {_pct(rows[0]['tasks']['boolq']['acc_norm'])}%, so BoolQ alone moves "
                "the 7-task average by several points between methods."
            ]
            if base and "boolq" in rows[0]["tasks"]
            else []
        ),
        "- Timings are CPU wall-clock on a 2-core machine; on this hardware a dynamic "
        "method's fixed costs (probe, scoring, gathering weights) weigh more than on a GPU. "
        "Full-batch probing runs every batch twice, so it is slower than dense and has no "
        "headline value.",
        "- Dynamic methods decide per batch, so their perplexity depends on what shares a "
        "batch. With the reference's random windows, a batch mixes 20 unrelated passages; "
        "[benchmarks/methods_smollm2.md](../benchmarks/methods_smollm2.md) evaluates "
        "consecutive windows (fp32), where a batch is one stretch of text and PP's perplexity "
        "advantage over the static methods is larger.",
        "- Accuracy here uses the first questions of each task, not the full sets; "
        "`prunekit apply` with `evaluation.tasks: [commonsense]` runs the full sets.",
    ]
    return "\n".join(lines) + "\n"


def _timing_lines(report: dict) -> list[str]:
    t = report["timing"]
    ts, d = t["settings"], t["dense"]
    same = ts["dtype"] == report["settings"]["dtype"]
    return [
        f"- Runtime: one timing stage in one process: dense and every method at "
        f"{', '.join(f'{r:.0%}' for r in ts['ratios'])} (each pruned once, seed {ts['seed']}), "
        f"warmed up, then {ts['rounds']} interleaved rounds over the same {ts['batches']} "
        f"batch(es) of {t['batch_shape'][0]}×{t['batch_shape'][1]} WikiText-2 tokens "
        f"({t['timed_calls']} timed calls per model, the order rotating each round). One dense "
        f"time for the table: {d['s_per_batch']:.2f} s per batch (spread "
        f"{d['s_spread'][0]:.2f}-{d['s_spread'][1]:.2f} s). `time` is the median of each "
        "call's ratio to the dense call of the same round, its min-max in brackets (lower is "
        "faster); ⚠ marks a speed-up beyond what the kept FLOPs allow (timing noise, not a "
        "result). Dynamic methods are timed with their state preserved."
        + (
            ""
            if same
            else f" **Timed in {ts['dtype']}**, while perplexity and accuracy are "
            f"{report['settings']['dtype']}: this machine has no native bf16 matmuls (AVX2 "
            "only), where a bf16 batch is several times slower than fp32 and dominated by "
            "emulation, not by the pruned shapes."
        ),
    ]


def machine() -> dict:
    import torch

    import prunekit

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "prunekit": prunekit.__version__,
        "python": platform.python_version(),
    }


def keep_sections(text: str, old: str) -> str:
    """``text`` (this script's page) followed by every marked section of ``old`` (the page it
    replaces), in their order: those belong to other scripts (equal_compute.py, recovery.py,
    recovery_kd.py, llama_cpp_export.py, ...)."""
    for name in SECTION.findall(old):
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if end in old and start not in text:
            section = old[old.index(start) : old.index(end) + len(end)]
            text = text.rstrip("\n") + "\n\n" + section + "\n"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test, not a result")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="questions per task")
    parser.add_argument("--windows", type=int, default=None, help="WikiText-2 windows")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument(
        "--timing-dtype",
        default=None,
        choices=["bfloat16", "float32"],
        help="dtype of the timing stage (default: --dtype); on a CPU without "
        "native bf16 matmuls a bf16 batch takes minutes",
    )
    parser.add_argument(
        "--timing-ratios",
        nargs="+",
        type=float,
        default=None,
        help="ratios the timing stage covers (default: --ratios); the others "
        "get no time and no headline",
    )
    parser.add_argument("--data-dir", default=os.environ.get("PRUNEKIT_DATA_DIR") or DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the report")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if not Path(args.data_dir).is_dir():
        parser.error(
            f"data directory {args.data_dir} not found; give --data-dir (laid out like "
            "../shared/data)"
        )
    os.environ.setdefault("PRUNEKIT_QUIET", "1")
    settings = settings_from(args)
    if args.quick:
        out = args.out or ROOT / "runs" / "paper_table_quick"
        json_path, md_path, png_path = (
            out / "paper_table.json",
            out / "benchmarks.md",
            out / "paper_table.png",
        )
        image = "paper_table.png"
    else:
        out = args.out or HERE / "results"
        json_path = out / "paper_table.json"
        md_path, png_path = (
            ROOT / "docs" / "benchmarks.md",
            ROOT / "docs" / "img" / "paper_table.png",
        )
        image = "img/paper_table.png"
    cells_dir = out / "paper_table_cells"
    command = "python benchmarks/paper_table.py" + " ".join(
        [""] + [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--render-only"]
    )
    if args.render_only:
        report = json.loads(json_path.read_text())
    else:
        start = time.perf_counter()
        cells = run_cells(settings, cells_dir, str(args.data_dir))
        timing = run_timing(settings, cells_dir, str(args.data_dir))
        report = {
            "command": command.strip(),
            "settings": settings,
            "machine": machine(),
            "elapsed_min": sum(c["result"].get("cell_wall_s", 0) for c in cells) / 60,
            "session_min": (time.perf_counter() - start) / 60,
            "timing": timing,
            "aggregate": aggregate(settings, cells, timing),
            "baselines": baselines(settings, str(args.data_dir)),
            "cells": [
                {k: c[k] for k in ("method", "ratio", "seed", "full", "key")}
                | {
                    "metrics": c["result"]["metrics"],
                    "runtime": c["result"].get("runtime"),
                    "reduction": c["result"]["reduction"],
                    "timings": c["result"]["timings"],
                }
                for c in cells
            ],
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    plot(report, png_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(report, image)
    old = md_path.read_text() if md_path.is_file() else ""
    md_path.write_text(keep_sections(text, old))
    print(f"wrote {json_path}, {md_path}, {png_path}", file=sys.stderr)
    if args.quick and not args.out:
        shutil.rmtree(cells_dir, ignore_errors=True)  # a smoke test keeps no cache
    return 0


if __name__ == "__main__":
    sys.exit(main())
