"""Recovery by distillation from the dense parent against plain next-token recovery, at the
same budget: Wanda-sp and LLM-Pruner at 0.2 and 0.4 on SmolLM2, recovered with ``ce``,
``kd`` and ``ce+kd``; WikiText-2 perplexity, wall time and peak memory per cell.

The protocol is the recovery table's (``recipes/sweeps/recovery_smollm2.yaml``, read here so
the two cannot drift apart): SmolLM2-135M-Instruct in fp32 on the CPU, seed 0, 40 random
WikiText-2 test windows of 512 tokens; every recovery 200 steps of 4 C4 training windows of
128 tokens, LoRA rank 8 on every linear layer, lr 2e-4. KD: temperature 1, the whole
vocabulary, weight 1 (``ce+kd`` = ce + kd), the teacher online (the dense model loaded again
beside the student). At 0.4 one more row per method runs ``ce+kd`` with the cached teacher
(``kd.cache: true``, top-64): the memory trade-off. Rows without recovery give the starting
point.

    python benchmarks/recovery_kd.py            # the results (each recovered cell: 10-16 min
                                                # alone on 2 CPU cores; about 3 h in all)
    python benchmarks/recovery_kd.py --quick    # smoke test, not a result: a few steps

Each cell is one ``prunekit apply`` in its own process (its peak RSS is its own), under
``runs/recovery_kd/<cell>``; a cell with results is not run again, and an interrupted one
resumes from its recovery checkpoint. Writes benchmarks/results/recovery_kd.json,
benchmarks/recovery_kd.md and the ``recovery-kd`` section of docs/benchmarks.md. ``--quick``
writes only under runs/recovery_kd_quick/ and benchmarks/results/recovery_kd_quick.json
(both ignored by git).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _sections import splice  # noqa: E402  (a sibling module of this script)

SWEEP = ROOT / "recipes" / "sweeps" / "recovery_smollm2.yaml"
PPL = "wikitext2-test"
METHODS = ("wanda-sp", "llm-pruner")
RATIOS = (0.2, 0.4)
#: label -> (recovery keys over the sweep's, or None: no recovery; the ratios it runs at)
VARIANTS: dict[str, tuple[dict | None, tuple[float, ...]]] = {
    "none": (None, RATIOS),
    "ce": ({}, RATIOS),
    "kd": ({"loss": "kd"}, RATIOS),
    "ce+kd": ({"loss": "ce+kd"}, RATIOS),
    "ce+kd, cached top-64": ({"loss": "ce+kd", "kd": {"top_k": 64, "cache": True}}, (0.4,)),
}
START, END = "<!-- recovery-kd:start -->", "<!-- recovery-kd:end -->"
STEP_START, STEP_END = "<!-- recovery-kd-steps:start -->", "<!-- recovery-kd-steps:end -->"


def base_recipe() -> tuple[dict, dict]:
    """The sweep's recipe without its sweep section, and its recovery settings."""
    data = yaml.safe_load(SWEEP.read_text())
    recovery = data["sweep"]["variants"]["wanda-sp+lora"]["recovery"]
    data.pop("sweep")
    return data, recovery


def cells(quick: bool) -> list[dict]:
    base, recovery = base_recipe()
    out = []
    methods, ratios = (("wanda-sp",), (0.4,)) if quick else (METHODS, RATIOS)
    for ratio in ratios:
        for method in methods:
            for label, (keys, at) in VARIANTS.items():
                if ratio not in at and not quick:
                    continue
                recipe = copy.deepcopy(base)
                recipe["method"].update(name=method, ratio=ratio)
                if keys is not None:
                    recipe["recovery"] = {**recovery, **copy.deepcopy(keys)}
                    recipe["recovery"]["checkpoint_every"] = 50
                if quick:
                    recipe["calibration"].update(samples=8, batch_size=8)
                    recipe["evaluation"]["perplexity"][0].update(windows=4, batch_size=4)
                    if keys is not None:
                        recipe["recovery"].update(samples=16, steps=3, checkpoint_every=2)
                name = f"{method}-r{ratio:g}-{label.replace(', ', '-').replace(' ', '')}"
                out.append({"name": name, "method": method, "ratio": ratio, "recovery": label,
                            "recipe": recipe})  # fmt: skip
    return out


def run_cell(cell: dict, root: Path) -> dict:
    """Run (or read back) one cell; its row for the table."""
    where = root / cell["name"]
    path, wall = write_recipe(cell["recipe"], where), None
    results = where / "out" / "results.json"
    if not results.is_file():
        print(f"== {cell['name']}", flush=True)
        t0 = time.perf_counter()
        code = apply_in_process(path)
        wall = time.perf_counter() - t0
        if code != 0:
            return {**_keys(cell), "failed": f"prunekit apply exited {code}"}
    return row(cell, json.loads(results.read_text()), wall)


def write_recipe(recipe: dict, where: Path) -> Path:
    """``recipe`` as ``where/recipe.yaml``, writing under ``where``; results of another recipe
    there are refused."""
    where.mkdir(parents=True, exist_ok=True)
    recipe = dict(recipe)
    recipe["output"] = {"dir": str(where / "out")}
    if "recovery" in recipe:
        recipe["recovery"] = {**recipe["recovery"], "checkpoint_dir": str(where / "ckpt")}
    text = yaml.safe_dump(recipe, sort_keys=False)
    path, results = where / "recipe.yaml", where / "out" / "results.json"
    if results.is_file() and path.is_file() and path.read_text() != text:
        raise SystemExit(
            f"{where}: its results are for another recipe than this script's; move the "
            "directory away to run the cell again"
        )
    path.write_text(text)
    return path


def apply_in_process(path: Path) -> int:
    """``prunekit apply`` of the recipe at ``path`` in a process of its own (its peak RSS is
    its own)."""
    return subprocess.run([sys.executable, "-m", "prunekit.cli", "apply", str(path)]).returncode


#: the losses timed per step (Wanda-sp at 0.4), in the order each round runs them
STEP_TIME = ("ce", "kd", "ce+kd", "ce+kd, cached top-64")


def time_steps(steps: int, rounds: int, root: Path) -> dict:
    """Seconds per recovery step of each loss, measured apart from the table's cells (whose
    wall times depend on what else the machine ran): Wanda-sp at 0.4, each loss ``steps``
    steps of the table's recovery (no perplexity), the losses interleaved, ``rounds`` rounds.
    The cached teacher's pass covers exactly the windows those steps see, so its seconds per
    step are what the 200-step run pays per step too."""
    runs = [c for c in cells(False) if c["method"] == "wanda-sp" and c["ratio"] == 0.4]
    runs = sorted((c for c in runs if c["recovery"] in STEP_TIME),
                  key=lambda c: STEP_TIME.index(c["recovery"]))  # fmt: skip
    times: dict[str, list[dict]] = {c["recovery"]: [] for c in runs}
    for r in range(rounds):
        for cell in runs:
            recipe = copy.deepcopy(cell["recipe"])
            recipe["recovery"].update(steps=steps, checkpoint_every=0)
            recipe["evaluation"]["perplexity"] = []
            where = root / f"{cell['name']}-{steps}steps-round{r}"
            shutil.rmtree(where, ignore_errors=True)
            print(f"== {cell['recovery']}, round {r + 1} of {rounds}", flush=True)
            if apply_in_process(write_recipe(recipe, where)) != 0:
                raise SystemExit(f"{where}: prunekit apply failed")
            rec = json.loads((where / "out" / "results.json").read_text())["recovery"]
            teacher = (rec.get("kd") or {}).get("teacher") or {}
            times[cell["recovery"]].append(
                {
                    "loop_s": rec["seconds"],
                    "cache_s": teacher.get("seconds"),
                    "cache_windows": teacher.get("windows"),
                    "peak_rss_bytes": rec["memory"]["process_peak_rss_bytes"],
                }
            )
    rows = []
    for label, runs_ in times.items():
        per_step = [(t["loop_s"] + (t["cache_s"] or 0.0)) / steps for t in runs_]
        rows.append(
            {
                "recovery": label,
                "s_per_step": statistics.median(per_step),
                "s_per_step_all": per_step,
                "cache_s_per_step": (
                    statistics.median(t["cache_s"] / steps for t in runs_)
                    if runs_[0]["cache_s"] is not None
                    else None
                ),
                "runs": runs_,
            }
        )
    base = rows[0]["s_per_step"]
    for row_ in rows:
        row_["vs_ce"] = row_["s_per_step"] / base
    return {"steps": steps, "rounds": rounds, "rows": rows}


def step_time_markdown(report: dict) -> str:
    t = report["step_time"]
    out = [
        STEP_START,
        "",
        "## Recovery by distillation: seconds per step, by loss",
        "",
        "Measured apart from the distillation table's cells (their wall times shared the "
        "machine with other work): "
        f"Wanda-sp at 0.4, each loss {t['steps']} steps of the same recovery (4 windows of 128 "
        f"tokens per step, no perplexity), the losses interleaved, {t['rounds']} rounds, the "
        "machine otherwise idle. `cached` adds the teacher's pass over the windows those steps "
        "see, per step (the 200-step run's pass covers its windows the same way). Median "
        f"(min-max) over the rounds; 200 steps = 200 x the median. Generated by "
        f"`{report['command']}` ({report['machine']}).",
        "",
        "| recovery | s / step | vs ce | of which the teacher's cache pass | 200 steps |",
        "|---|---|---|---|---|",
    ]
    for r in t["rows"]:
        low, high = min(r["s_per_step_all"]), max(r["s_per_step_all"])
        cache = "-" if r["cache_s_per_step"] is None else f"{r['cache_s_per_step']:.2f} s"
        out.append(
            f"| {r['recovery']} | {r['s_per_step']:.2f} ({low:.2f}-{high:.2f}) | "
            f"{r['vs_ce']:.2f} | {cache} | {_minutes(200 * r['s_per_step'])} |"
        )
    out += ["", STEP_END]
    return "\n".join(out) + "\n"


def _keys(cell: dict) -> dict:
    return {k: cell[k] for k in ("name", "method", "ratio", "recovery")}


def row(cell: dict, result: dict, wall: float | None) -> dict:
    rec = result.get("recovery") or {}
    kd = rec.get("kd") or {}
    memory = rec.get("memory") or {}
    teacher = kd.get("teacher") or {}
    return {
        **_keys(cell),
        "ppl": result["metrics"][PPL]["ppl"],
        "params_kept_fraction": result["reduction"]["params_kept_fraction"],
        "recovery_s": result["timings"].get("recovery_s"),
        "total_s": result["timings"].get("total_s"),
        "process_s": wall,
        "loss_first": rec.get("loss_first"),
        "loss_last": rec.get("loss_last"),
        "ce_last": (kd.get("loss_ce") or [None])[-1],
        "kd_last": (kd.get("loss_kd") or [None])[-1],
        "teacher": {k: v for k, v in teacher.items() if k != "memory"} or None,
        "peak_rss_bytes": memory.get("process_peak_rss_bytes"),
        "cuda_peak_allocated_bytes": memory.get("cuda_peak_allocated_bytes"),
        "failed": None,
    }


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _minutes(s) -> str:
    return "-" if s is None else f"{s / 60:.1f} min"


def markdown(report: dict) -> str:
    out = [
        START,
        "",
        "## Recovery by distillation from the dense parent",
        "",
        "The recovery table's protocol (SmolLM2-135M-Instruct, fp32, CPU, seed 0; WikiText-2 "
        "perplexity on 40 random test windows of 512 tokens; every recovery 200 steps of 4 C4 "
        "windows of 128 tokens, LoRA rank 8 on every linear layer, lr 2e-4), with "
        "`recovery.loss` `ce` (next-token loss), `kd` (KL from the dense model's "
        "distribution, temperature 1, whole vocabulary) and `ce+kd` (their sum); "
        "`cached top-64` runs the teacher once before pruning and keeps its 64 most likely "
        "tokens per position (`kd.cache: true`, `top_k: 64`). Recovery wall time: "
        "`timings.recovery_s`, the whole fine-tune with the teacher's load or pass; each cell "
        "ran alone on the 2-core machine, one after another over two sessions (the four 0.4 "
        "cells that first shared the machine with other work were run again), so for the "
        "losses' relative cost read the per-step table, whose runs are interleaved. Peak RSS: "
        "the process's high-water mark at the end of the fine-tune. Generated by "
        f"`{report['command']}`.",
        "",
        "| ratio | method | recovery | WikiText-2 PPL | recovery wall time | peak RSS | "
        "loss (first -> last step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r.get("failed"):
            out.append(f"| {r['ratio']:g} | {r['method']} | {r['recovery']} | failed | | | |")
            continue
        loss = "-" if r["loss_first"] is None else f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"
        out.append(
            f"| {r['ratio']:g} | {r['method']} | {r['recovery']} | {r['ppl']:.2f} | "
            f"{_minutes(r['recovery_s'])} | {_gib(r['peak_rss_bytes'])} | {loss} |"
        )
    out += findings(report["rows"])
    out += ["", END]
    return "\n".join(out) + "\n"


def findings(rows: list[dict]) -> list[str]:
    """Perplexity by loss, one table per ratio (the lowest recovered perplexity in bold), and
    per method and ratio each loss against ``ce``; then peak RSS by loss. Read from ``rows``
    alone: nothing here is typed."""
    done = [r for r in rows if not r.get("failed")]
    labels = [v for v in VARIANTS if any(r["recovery"] == v for r in done)]
    out: list[str] = []
    for ratio in sorted({r["ratio"] for r in done}):
        at = {(r["method"], r["recovery"]): r["ppl"] for r in done if r["ratio"] == ratio}
        out += [
            "",
            f"Perplexity by loss at {ratio:g} (lowest after recovery in bold):",
            "",
            "| method | " + " | ".join(labels) + " |",
            "|---" * (len(labels) + 1) + "|",
        ]
        for method in METHODS:
            recovered = [at[(method, v)] for v in labels if v != "none" and (method, v) in at]
            cells_ = []
            for v in labels:
                ppl = at.get((method, v))
                text = "-" if ppl is None else f"{ppl:.2f}"
                cells_.append(f"**{text}**" if recovered and ppl == min(recovered) else text)
            if any(c != "-" for c in cells_):
                out.append(f"| {method} | " + " | ".join(cells_) + " |")
    lines = []
    for ratio in sorted({r["ratio"] for r in done}):
        for method in METHODS:
            at = {
                r["recovery"]: r["ppl"]
                for r in done
                if r["ratio"] == ratio and r["method"] == method
            }
            if "ce" not in at or len(at) < 3:
                continue
            ce = at["ce"]
            versus = ", ".join(
                f"`{v}` {at[v]:.2f} ({at[v] - ce:+.2f}, {100 * (at[v] / ce - 1):+.1f}%)"
                for v in labels
                if v not in ("none", "ce") and v in at
            )
            lines.append(f"- {ratio:g}, {method}: against `ce` ({ce:.2f}): {versus}")
    if lines:
        out += ["", "Each loss against `ce` at the same budget (one seed, one fine-tune each):", ""]
        out += lines
    rss = {}
    for r in done:
        if r["peak_rss_bytes"] is not None:
            rss.setdefault(r["recovery"], []).append(r["peak_rss_bytes"])
    if rss:
        out += ["", "Peak RSS of the fine-tune by loss (min-max over the cells):", ""]
        for v in labels:
            if v in rss:
                out.append(f"- `{v}`: {_gib(min(rss[v]))} - {_gib(max(rss[v]))}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps: not a result")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="CELL",
        help="run only these cells (e.g. wanda-sp-r0.4-kd); the report then holds them alone "
        "and goes to results/recovery_kd_partial.json and recovery_kd_partial.md (docs untouched)",
    )
    parser.add_argument(
        "--step-time",
        type=int,
        metavar="STEPS",
        help="instead of the table: seconds per step of each loss, each run for STEPS steps "
        "(results/recovery_kd_step_time.json, recovery_kd_step_time.md, and the "
        "recovery-kd-steps section of docs/benchmarks.md)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="--step-time rounds (default 3)")
    args = parser.parse_args(argv)
    import torch

    import prunekit

    root = ROOT / "runs" / ("recovery_kd_quick" if args.quick else "recovery_kd")
    report = {
        "command": "python benchmarks/recovery_kd.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "prunekit": prunekit.__version__,
        "protocol": str(SWEEP.relative_to(ROOT)),
        "rows": [],
    }
    if args.step_time:
        report["command"] += f" --step-time {args.step_time} --rounds {args.rounds}"
        report["step_time"] = time_steps(args.step_time, args.rounds, root / "step_time")
        section = step_time_markdown(report)
        where = root if args.quick else HERE  # --quick: not a result, nothing committed
        (where / "results").mkdir(exist_ok=True)
        (where / "results" / "recovery_kd_step_time.json").write_text(
            json.dumps(report, indent=2) + "\n"
        )
        (where / "recovery_kd_step_time.md").write_text(
            "# Recovery by distillation (SmolLM2): seconds per step\n\n" + section
        )
        if not args.quick:
            splice(ROOT / "docs" / "benchmarks.md", section)
        print(section)
        return 0
    todo = cells(args.quick)
    if args.only:
        unknown = sorted(set(args.only) - {c["name"] for c in todo})
        if unknown:
            names = ", ".join(c["name"] for c in todo)
            raise SystemExit(f"--only: no cell {unknown}; the cells are {names}")
        todo = [c for c in todo if c["name"] in args.only]
        report["command"] += " --only " + " ".join(args.only)
    for cell in todo:
        report["rows"].append(run_cell(cell, root))
    section = markdown(report)
    if args.only and not args.quick:
        out = HERE / "results" / "recovery_kd_partial.json"
        (HERE / "recovery_kd_partial.md").write_text(
            "# Recovery by distillation (SmolLM2): the cells run so far\n\n" + section
        )
    elif args.quick:
        out = HERE / "results" / "recovery_kd_quick.json"
        (root / "recovery_kd.md").write_text("# Recovery KD (quick: not a result)\n\n" + section)
    else:
        out = HERE / "results" / "recovery_kd.json"
        (HERE / "recovery_kd.md").write_text("# Recovery by distillation (SmolLM2)\n\n" + section)
        splice(ROOT / "docs" / "benchmarks.md", section)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(section)
    failed = [r["name"] for r in report["rows"] if r.get("failed")]
    if failed:
        print(f"failed cells: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
