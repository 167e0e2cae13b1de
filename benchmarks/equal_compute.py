"""Methods compared at equal compute: perplexity against the decoder MACs each method keeps.

At one nominal ratio the methods do not remove the same compute: FLAP's global threshold and
the rounding of kept units give it other shapes than the uniform methods. This report takes the
ratio sweep of every method (``recipes/sweeps/equal_compute_smollm2.yaml``, run by ``prunekit
sweep``) and puts each method's perplexity against its *achieved* decoder MACs
(``reduction.flops_kept_fraction`` of results.json), then interpolates each method's
perplexity at the MACs the uniform methods keep at each nominal ratio. Every number is read from
the sweep's summary; nothing is typed.

    prunekit sweep recipes/sweeps/equal_compute_smollm2.yaml    # the cells (~80 min on 2 cores)
    python benchmarks/equal_compute.py --time --batch-size 4    # timing stage (~15 min), alone
    python benchmarks/equal_compute.py                          # table + figure

The timing stage rebuilds every finished cell's pruned model from the cell's own resolved
recipe in one process (checking that it has the structure the cell measured), loads the dense
model once, and times them all interleaved on the same evaluation batches (one dense time for
the whole table): benchmarks/results/equal_compute_time.json. It needs the machine to itself.

Writes benchmarks/equal_compute.md, docs/img/equal_compute.png, and the equal-compute section of
docs/benchmarks.md (between its markers; benchmarks/paper_table.py keeps that section when it
rewrites the file).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _sections import splice  # noqa: E402  (a sibling module of this script)
from _snapshots import sweep_summary  # noqa: E402

SWEEP_DIR = ROOT / "runs" / "equal_compute"
SUMMARY = SWEEP_DIR / "summary.json"
TIMES = HERE / "results" / "equal_compute_time.json"
PPL, MACS = "wikitext2-test.ppl", "reduction.flops_kept_fraction"
START, END = "<!-- equal-compute:start -->", "<!-- equal-compute:end -->"


def curves(summary: dict) -> dict[str, list[tuple[float, float, float]]]:
    """method -> [(nominal ratio, decoder MACs kept, mean perplexity)] sorted by MACs."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for row in summary["rows"]:
        ppl, macs = row["metrics"][PPL], row["metrics"][MACS]
        if not ppl["n"] or not macs["n"]:
            continue
        method = row["labels"]["variant"]
        out.setdefault(method, []).append(
            (float(row["labels"]["method.ratio"]), macs["mean"], ppl["mean"])
        )
    return {m: sorted(points, key=lambda p: p[1]) for m, points in out.items()}


def interpolate(points: list[tuple[float, float, float]], macs: float) -> float | None:
    """Perplexity at ``macs`` by linear interpolation of log-perplexity between the two
    measured points around it; None outside the measured range (no extrapolation)."""
    for (_, x0, y0), (_, x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= macs <= x1:
            if x1 == x0:
                return y0
            t = (macs - x0) / (x1 - x0)
            return math.exp((1 - t) * math.log(y0) + t * math.log(y1))
    for _, x, y in points:
        if abs(x - macs) < 1e-9:
            return y
    return None


def targets(lines: dict[str, list]) -> list[tuple[float, float]]:
    """(nominal ratio, MACs kept) of the uniform methods (the MACs every method is compared
    at): those of the first method whose MACs are the same for the same ratio as another's."""
    by_ratio: dict[float, set[float]] = {}
    for points in lines.values():
        for ratio, macs, _ in points:
            by_ratio.setdefault(ratio, set()).add(round(macs, 6))
    reference = next((m for m in ("pp", "wanda-sp", "llm-pruner") if m in lines), None)
    if reference is None:
        reference = next(iter(lines))
    return sorted(((r, m) for r, m, _ in lines[reference]), key=lambda p: p[0])


def time_cells(
    sweep_dir: Path, rounds: int, batches: int | None, batch_size: int | None = None
) -> dict:
    """Rebuild every finished cell's model from its own recipe and time them all, with the
    dense model, interleaved in this process on the same evaluation batches (the first
    ``batches`` batches of ``batch_size`` windows; default: the evaluation's batches)."""
    import gc
    import platform
    import statistics

    import torch

    import prunekit
    from prunekit.evaluation.costs import structure_reduction
    from prunekit.evaluation.runtime import Contender, time_interleaved
    from prunekit.loading import load_model
    from prunekit.plan import perplexity_windows
    from prunekit.runner import prepare
    from prunekit.sweep import cell_state, load_sweep

    _, cells = load_sweep(sweep_dir)
    done = [c for c in cells if cell_state(c) == "done"]
    if not done:
        raise SystemExit(f"{sweep_dir}: no finished cell to time; run the sweep first")
    contenders, rows, windows, first = [], [], None, None
    for cell in done:
        result = cell.result()
        prepared = prepare(cell.dir / "recipe.yaml")  # the cell's resolved recipe, as it ran
        seq_len = result["reduction"]["seq_len"]
        got = structure_reduction(prepared.loaded.adapter, prepared.outcome.structure, seq_len)
        if abs(got["decoder_macs_per_token"] - result["reduction"]["decoder_macs_per_token"]) > 0.5:
            raise SystemExit(
                f"cell {cell.key} ({cell.labels}): the rebuilt model keeps "
                f"{got['decoder_macs_per_token']} decoder MACs per token, the cell "
                f"measured {result['reduction']['decoder_macs_per_token']}; the "
                "cells are stale (re-run the sweep with --force)"
            )
        if windows is None:
            first = prepared
            windows, _ = perplexity_windows(
                prepared.plan, 0, prepared.tokenizer, prepared.loaded.adapter
            )
            size = batch_size or prepared.plan.recipe.evaluation.perplexity[0].batch_size
            windows = list(torch.split(windows, size))[:batches]
        name = ", ".join(f"{k}={v}" for k, v in cell.labels.items()) + f", seed {cell.seed}"
        contenders.append(Contender(name, prepared.model))
        rows.append(
            {
                "key": cell.key,
                "labels": cell.labels,
                "seed": cell.seed,
                "name": name,
                "dynamic": prepared.outcome.dynamic,
                "flops_kept_fraction": result["reduction"]["flops_kept_fraction"],
            }
        )
        print(f"rebuilt {name}", file=sys.stderr, flush=True)
        gc.collect()
    recipe = first.plan.recipe
    dense = load_model(recipe.model.id, dtype=recipe.model.dtype, device=recipe.model.device).model
    contenders.insert(0, Contender("dense", dense))
    timed = time_interleaved(contenders, windows, rounds=rounds, warmup=1)
    dense_s = timed["dense"]["s_all"]
    dense_median = statistics.median(dense_s)
    for row in rows:
        s_all = timed[row["name"]]["s_all"]
        ratios = [t / d for t, d in zip(s_all, dense_s, strict=True)]  # paired: same batch
        row.update(
            s_all=s_all,
            s_median=statistics.median(s_all),
            time_vs_dense=statistics.median(s_all) / dense_median,
            time_vs_dense_spread=[min(ratios), max(ratios)],
        )
    return {
        "command": "python benchmarks/equal_compute.py " + " ".join(sys.argv[1:]),
        "sweep": str(sweep_dir.relative_to(ROOT) if sweep_dir.is_relative_to(ROOT) else sweep_dir),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "prunekit": prunekit.__version__,
        "model": recipe.model.id,
        "dtype": recipe.model.dtype,
        "device": recipe.model.device,
        "batches": [list(b.shape) for b in windows],
        "rounds": rounds,
        "warmup": 1,
        "dense": {"s_all": dense_s, "s_median": dense_median},
        "rows": rows,
    }


def time_points(times: dict | None) -> dict[tuple[str, float], dict]:
    """(method, nominal ratio) -> timing row (seed 0's when there are several)."""
    out: dict[tuple[str, float], dict] = {}
    for row in (times or {}).get("rows", []):
        key = (row["labels"]["variant"], float(row["labels"]["method.ratio"]))
        if key not in out or row["seed"] < out[key]["seed"]:
            out[key] = row
    return out


def time_table(summary: dict, times: dict | None) -> list[str]:
    """The measured time per batch relative to dense, per method and nominal ratio."""
    if not times:
        return [
            "",
            "Measured time is not on this table: run the timing stage "
            "(`python benchmarks/equal_compute.py --time --batch-size 4`, about 15 minutes with the machine to itself; a batch of 20 x 512 takes about a minute per model on 2 cores).",
        ]
    points, lines_ = time_points(times), curves(summary)
    ratios = sorted({r for pts in lines_.values() for r, _, _ in pts})
    shapes = Counter("x".join(str(d) for d in b) for b in times["batches"])
    shape = ", ".join(f"{n} batch{'es' if n > 1 else ''} of {s}" for s, n in shapes.items())
    out = [
        "",
        f"Time per batch relative to dense (median over {times['rounds']} interleaved "
        f"rounds on the first evaluation windows ({shape} tokens), min-max of the paired ratios "
        f"in brackets; one dense time, {times['dense']['s_median']:.2f} s per batch; "
        f"{times['machine']}, {times['dtype']}, {times['device']}; "
        f"`{times['command'].strip()}`):",
        "",
        "| nominal ratio | " + " | ".join(lines_) + " |",
        "|---|" + "---|" * len(lines_),
    ]
    for ratio in ratios:
        cells = []
        for m in lines_:
            row = points.get((m, ratio))
            cells.append(
                "-"
                if row is None
                else "{:.3f} [{:.3f}-{:.3f}]".format(
                    row["time_vs_dense"], *row["time_vs_dense_spread"]
                )
            )
        out.append(f"| {ratio:g} | " + " | ".join(cells) + " |")
    return out + overhead_lines(times)


def overhead_lines(times: dict) -> list[str]:
    """Each dynamic method's time against the static methods' that keep the same decoder
    MACs (within 0.1 point): what its own per-batch work (probe, scores, gathers) costs."""
    rows = list(time_points(times).values())  # each cell's lowest seed, as in the table
    out = []
    for dyn in sorted({r["labels"]["variant"] for r in rows if r["dynamic"]}):
        extra = []
        for row in (r for r in rows if r["labels"]["variant"] == dyn):
            same = [
                r["time_vs_dense"]
                for r in rows
                if not r["dynamic"]
                and abs(r["flops_kept_fraction"] - row["flops_kept_fraction"]) < 1e-3
            ]
            if same:
                extra.append((row["time_vs_dense"] / statistics.median(same) - 1) * 100)
        if extra:
            out.append(
                f"- At the same decoder MACs, {dyn}'s time per batch is {min(extra):+.1f}% "
                f"to {max(extra):+.1f}% against the static methods' (the median of those "
                f"keeping those MACs; {len(extra)} ratios): the cost of its own "
                "per-batch work (probe, scores, gathers) on these batches."
            )
    return ["", *out] if out else []


def markdown(summary: dict, image: str | None, times: dict | None = None) -> str:
    lines_ = curves(summary)
    methods = list(lines_)
    out = [
        START,
        "",
        "## Methods at equal compute",
        "",
        "At one nominal ratio the methods do not remove the same compute. This table puts each "
        "method's WikiText-2 perplexity (40 random test windows of 512 tokens, batches of 20, "
        "seed 0; fp32, CPU) at the **decoder MACs it really keeps**. Each method's perplexity "
        "is interpolated (log-linearly, between its two measured ratios around that point; "
        "`-` outside its measured range) at the MACs the uniform methods keep at each nominal "
        "ratio. Generated by `benchmarks/equal_compute.py` from the sweep "
        "`recipes/sweeps/equal_compute_smollm2.yaml`.",
        "",
    ]
    out += [
        "| nominal ratio | decoder MACs kept | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for ratio, macs in targets(lines_):
        cells = []
        for m in methods:
            v = interpolate(lines_[m], macs)
            cells.append("-" if v is None else f"{v:.2f}")
        out.append(f"| {ratio:g} | {100 * macs:.1f}% | " + " | ".join(cells) + " |")
    out += ["", "What each method measured (nominal ratio: decoder MACs kept, perplexity):", ""]
    for m, points in lines_.items():
        pts = ", ".join(f"{r:g}: {100 * x:.1f}%, {y:.2f}" for r, x, y in sorted(points))
        out.append(f"- **{m}**: {pts}")
    failed = [f"{r['labels']}: {'; '.join(r['failed'])}" for r in summary["rows"] if r["failed"]]
    if failed:
        out += ["", "Failed cells: " + " / ".join(failed)]
    out += time_table(summary, times)
    if image:
        what = "decoder MACs kept and measured time" if times else "decoder MACs kept"
        out += ["", f"![perplexity against {what}]({image})"]
    out += ["", END]
    return "\n".join(out) + "\n"


def plot(summary: dict, path: Path, times: dict | None = None) -> bool:
    """Perplexity against decoder MACs kept, and (with the timing stage) against measured time
    relative to dense: one figure, every method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = time_points(times)
    panels = 2 if timed else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), squeeze=False)
    for method, points in curves(summary).items():
        series = [("decoder MACs kept (%)", [(r, 100 * x, y) for r, x, y in points])]
        if timed:
            series.append(
                (
                    "time per batch / dense (%)",
                    [
                        (r, 100 * timed[(method, r)]["time_vs_dense"], y)
                        for r, _, y in points
                        if (method, r) in timed
                    ],
                )
            )
        for ax, (xlabel, pts) in zip(axes[0], series, strict=False):
            pts = sorted(pts, key=lambda p: p[1])
            ax.plot([x for _, x, _ in pts], [y for *_, y in pts], marker="o", label=method)
            for r, x, y in pts:
                ax.annotate(f"{r:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(xlabel)
    for ax in axes[0]:
        ax.set_ylabel("WikiText-2 perplexity")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M: perplexity at equal compute (labels: nominal ratio)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", type=Path, default=SUMMARY)
    parser.add_argument(
        "--time",
        action="store_true",
        help="timing stage: rebuild and time every finished cell (the machine "
        "to itself), then render",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument(
        "--batches", type=int, default=None, help="evaluation batches to time (default: all)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per timed batch (default: the evaluation's; on 2 CPU "
        "cores a batch of 20 x 512 takes about a minute per model)",
    )
    parser.add_argument(
        "--times", type=Path, default=TIMES, help="timing stage results (read when present)"
    )
    args = parser.parse_args(argv)
    summary = sweep_summary(args.summary, "equal_compute")
    if summary is None:
        raise SystemExit(
            f"{args.summary} not found (nor its committed copy): run prunekit "
            "sweep recipes/sweeps/equal_compute_smollm2.yaml first"
        )
    if args.time:
        measured = time_cells(args.summary.parent, args.rounds, args.batches, args.batch_size)
        args.times.parent.mkdir(parents=True, exist_ok=True)
        args.times.write_text(json.dumps(measured, indent=1) + "\n")
    times = json.loads(args.times.read_text()) if args.times.is_file() else None
    image = ROOT / "docs" / "img" / "equal_compute.png"
    drawn = plot(summary, image, times)
    (HERE / "equal_compute.md").write_text(
        "# Equal compute (SmolLM2)\n\n"
        + markdown(summary, "../docs/img/equal_compute.png" if drawn else None, times)
    )
    splice(
        ROOT / "docs" / "benchmarks.md",
        markdown(summary, "img/equal_compute.png" if drawn else None, times),
    )
    print("wrote benchmarks/equal_compute.md, docs/benchmarks.md (equal-compute section)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
