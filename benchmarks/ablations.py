"""docs/ablations.md from the ablation sweeps (recipes/ablations/*.yaml).

Every number in the report is read from the sweeps' summaries (``runs/ablations/<name>/
summary.json``, written by ``prunekit sweep``); only the prose (what each ablation tests and
the paper's claim) is typed. Whether a claim holds is decided from those numbers: each claim is a
list of pairs "A has lower perplexity than B" (or, for a claim of no effect, "A is within a
stated percentage of B"), compared seed by seed (a seed fixes both the calibration draw and the
evaluation windows): it holds when it is true for every seed, does not hold when it is true for
none, and is mixed otherwise.

    python benchmarks/ablations.py                    # run every sweep (skipping finished cells), render
    python benchmarks/ablations.py --only fusion      # one ablation
    python benchmarks/ablations.py --render-only      # render from what has finished
    python benchmarks/ablations.py --sweep-args='--grid calibration.samples=128,512'

The sweeps share ``runs/ablations/cells``, so the common ``default`` cell runs once per seed.

A section whose sweep has no summary on this machine (neither ``runs/`` nor the committed copy
under ``benchmarks/results/sweeps/``) is kept as the existing report has it: it was generated
from a summary when that sweep ran, and one sweep can then be re-run and re-rendered alone
without blanking the others. A sweep that the report has never shown is listed as not run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _snapshots import sweep_summary  # noqa: E402  (a sibling module)

from prunekit._files import write_atomic  # noqa: E402

RECIPES = ROOT / "recipes" / "ablations"
METRIC = "wikitext2-test.ppl"
#: "changes little": the largest change of perplexity, on any seed, that a claim of no effect
#: allows (a typed threshold, stated in the report)
CLOSE_PERCENT = 5.0

#: name -> (title, what it varies, the paper's claim, the claim as (lower, higher) pairs or,
#: for a claim of no effect, (variant, reference, tolerance in percent) triples)
ABLATIONS: dict[str, tuple[str, str, str, list[tuple[str, str] | tuple[str, str, float]]]] = {
    "probe_size": (
        "Probe size",
        "the share of positions (`ratio_seq`, default 0.5) and of samples (`ratio_batch`, "
        "default 0.05: one sample of 20) that the probe keeps",
        "A probe of about 1.5% of the batch's FLOPs is enough, and a larger probe brings the "
        "result closer to full-batch probing: fewer positions should cost perplexity and more "
        "samples should gain a little.",
        [
            ("default", "tokens-0.1"),
            ("tokens-0.25", "tokens-0.1"),
            ("default", "tokens-0.25"),
            ("samples-0.2", "default"),
        ],
    ),
    "probe_ranking": (
        "Probe ranking",
        "how the probe's positions and samples are chosen: by residual norm (PP), at random, or "
        "the whole batch (with the history, unlike the method `pp-fullbatch`)",
        "Ranking by residual importance picks a better probe than a random one of the same "
        "size; the whole batch as probe is the upper bound.",
        [("default", "random"), ("full-batch", "default")],
    ),
    "fusion": (
        "Fusion",
        "how the probe's statistics are combined with the history: PP's importance-scaled "
        "fusion, a fixed 0.5/0.5 mix, the probe alone, the history alone",
        "Importance-scaled fusion beats the probe alone, the history alone and a fixed mix: "
        "the probe gives the batch's own signal and the history makes it reliable.",
        [("default", "fixed-0.5"), ("default", "probe-only"), ("default", "history-only")],
    ),
    "history": (
        "History update",
        "how the history moves after calibration: PP's EMA (momentum 0.99), never (frozen), or "
        "a cumulative running mean",
        "Updating the history with an EMA of the batches seen helps over a history frozen at "
        "calibration.",
        [("default", "frozen"), ("default", "running-mean")],
    ),
    "metric": (
        "Importance score",
        "PP's score `‖S_j · W[:, j]²‖` against the Wanda-sp metric `sqrt(S_j) · Σ|W[:, j]|`, "
        "both on the same fused probe statistics",
        "PP's importance score beats the Wanda-sp metric applied to the same probe states.",
        [("default", "wanda-sp-metric")],
    ),
    "granularity": (
        "Per batch or per sequence",
        "one kept set per batch (`pp`) against one per sequence (`pp-seq`, each row its own probe)",
        "(not in the paper) A kept set per sequence fits each sequence better than one shared "
        "by the batch.",
        [("per-sequence", "default")],
    ),
    "calibration_size": (
        "Calibration size",
        "the number of 512-token C4 windows the history starts from",
        "PP needs only a small calibration set: more calibration windows change little. "
        f"Taken here as: within {CLOSE_PERCENT:g}% of the default's perplexity on every seed.",
        [("calib-512", "default", CLOSE_PERCENT), ("calib-2000", "default", CLOSE_PERCENT)],
    ),
}


#: why a sweep may be missing from the report (shown only while it has no results)
#: (``<sweep>`` or ``<sweep>/<variant>``; a variant's reason shows in its table row)
NOT_RUN = {
    "calibration_size": "512 and 2,000 calibration windows of 512 tokens take about 11 and 42 "
    "minutes per seed on a 2-core CPU (measured); run it on a larger "
    "machine (`prunekit sweep recipes/ablations/calibration_size.yaml -j N`)",
    "calibration_size/calib-2000": "not run yet: 2,000 windows take about 42 minutes per seed "
    "on a 2-core CPU (512 take about 11); "
    "`prunekit sweep recipes/ablations/calibration_size.yaml` "
    "runs only the missing cells",
    "granularity": "queued last when this report was generated, and not reached; `pp-seq` "
    "runs one probe per row, so it costs more than `pp` on CPU",
}


def run_sweeps(names: list[str], extra: list[str]) -> None:
    for name in names:
        cmd = [sys.executable, "-m", "prunekit.cli", "sweep", str(RECIPES / f"{name}.yaml"), *extra]
        print("+", " ".join(cmd), flush=True)
        code = subprocess.call(cmd, cwd=ROOT)
        if code not in (0, 1):  # 1: a cell failed, recorded in the table
            raise SystemExit(f"sweep {name} exited with {code}")


def load(name: str) -> dict | None:
    return sweep_summary(ROOT / "runs" / "ablations" / name / "summary.json", f"ablations-{name}")


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def paired(a: dict, b: dict) -> list[tuple[float, float]]:
    """(a, b) perplexities of the seeds both have: the same seed means the same calibration
    draw and the same evaluation windows, so the pair differs only by the variant."""
    av = dict(zip(a.get("seeds", []), a["values"], strict=False))
    bv = dict(zip(b.get("seeds", []), b["values"], strict=False))
    return [(av[s], bv[s]) for s in av if s in bv]


def seed_pairs(rows: dict[str, dict], a: str, b: str) -> list[tuple[float, float]]:
    """:func:`paired` values of variants ``a`` and ``b`` (empty when either has none)."""
    x, y = rows.get(a), rows.get(b)
    if not x or not y or not x["n"] or not y["n"]:
        return []
    return paired(x, y)


def decide(true_for: int, pairs: int, said: str) -> str:
    """A claim checked seed by seed: true for every seed, for none, or for some."""
    if true_for == pairs:
        return f"holds: {said}"
    if true_for == 0:
        return f"**does not hold**: {said}"
    return f"mixed: {said}"


def verdict(rows: dict[str, dict], lower: str, higher: str) -> str | None:
    """Whether ``lower`` has the lower perplexity than ``higher``, seed by seed."""
    pairs = seed_pairs(rows, lower, higher)
    if not pairs:
        return None
    wins = sum(x < y for x, y in pairs)
    gap = sum(100 * (x / y - 1) for x, y in pairs) / len(pairs)
    said = (
        f"{lower} {fmt(rows[lower]['mean'])} vs {higher} {fmt(rows[higher]['mean'])}, "
        f"{gap:+.1f}% on average over the same seeds, lower in {wins} of {len(pairs)}"
    )
    return decide(wins, len(pairs), said)


def close(rows: dict[str, dict], a: str, b: str, percent: float) -> str | None:
    """Whether ``a``'s perplexity stays within ``percent`` of ``b``'s, seed by seed."""
    pairs = seed_pairs(rows, a, b)
    if not pairs:
        return None
    gaps = [100 * (u / v - 1) for u, v in pairs]
    inside = sum(abs(g) <= percent for g in gaps)
    said = (
        f"{a} {fmt(rows[a]['mean'])} vs {b} {fmt(rows[b]['mean'])}, "
        f"{', '.join(f'{g:+.1f}%' for g in gaps)} over the same seeds, "
        f"within {percent:g}% in {inside} of {len(pairs)}"
    )
    return decide(inside, len(pairs), said)


def render_one(name: str, summary: dict) -> list[str]:
    title, varies, claim, pairs = ABLATIONS[name]
    rows = {r["labels"].get("variant", ""): r for r in summary["rows"]}
    stats = {v: {**r["metrics"][METRIC], "seeds": r["seeds"]} for v, r in rows.items()}
    default = stats.get("default") or {}
    lines = [
        f"## {title}",
        "",
        f"Varies {varies}. Recipe: "
        f"[`recipes/ablations/{name}.yaml`](../recipes/ablations/{name}.yaml).",
        "",
        "| variant | seeds | WikiText-2 perplexity | per seed | vs default (same seeds) | "
        "MACs kept |",
        "|---|---|---|---|---|---|",
    ]
    for variant, r in rows.items():
        s = stats[variant]
        macs = r["metrics"].get("reduction.flops_kept_fraction", {}).get("mean")
        if not s["n"]:
            why = "; ".join(r["failed"]) or NOT_RUN.get(f"{name}/{variant}", "not run yet")
            lines.append(f"| {variant} | 0 | - | - | - | - ({why}) |")
            continue
        spread = ", ".join(fmt(v) for v in s["values"])
        same = paired(s, default) if default.get("n") and variant != "default" else []
        delta = f"{sum(100 * (x / y - 1) for x, y in same) / len(same):+.1f}%" if same else ""
        std = f" ± {fmt(s['std'])}" if s["n"] > 1 else ""
        lines.append(
            f"| {variant} | {s['n']} | {fmt(s['mean'])}{std} | {spread} | {delta} | "
            f"{fmt(macs, 3)} |"
        )
    lines.append("")
    if name in EXTRAS:
        lines += EXTRAS[name]()
    lines += [f"**The claim.** {claim}", ""]
    if pairs:
        lines.append("**Here** (lower perplexity is better):")
        lines.append("")
        for pair in pairs:
            if len(pair) == 3:  # a claim of no effect: within a tolerance
                a, b, percent = pair
                v = close(stats, a, b, percent)
                lines.append(f"- {a} within {percent:g}% of {b}: {v or 'not measured yet'}")
                continue
            lower, higher = pair
            v = verdict(stats, lower, higher)
            lines.append(f"- {lower} below {higher}: {v or 'not measured yet'}")
        lines.append("")
    return lines


#: benchmarks/calibration_coverage.py's measure of the calibration windows' distinct text
COVERAGE = HERE / "results" / "calibration_coverage.json"


def render_coverage(data: dict | None) -> list[str]:
    """How much distinct text each calibration-size variant's windows hold (a bounded corpus
    re-draws its documents: more windows is not proportionally more text)."""
    if not data or not data.get("rows"):
        return []
    rows = data["rows"]
    first = rows[0]
    lines = [
        "**The calibration text.** Each window draws a document *with replacement* among "
        "those longer than the window, then an offset (GPTQ's C4 protocol). The "
        f"calibration corpus, {first['corpus']}, has {first['pool_documents']} documents "
        f"longer than {first['seq_len']} tokens ({first['pool_tokens']:,} tokens), so more "
        "windows re-draw the same text and overlap; on the full C4 corpus every window "
        "would be new text. Measured by "
        "[`benchmarks/calibration_coverage.py`](../benchmarks/calibration_coverage.py) "
        f"(`{data['command']}`) on the windows each cell draws:",
        "",
        "| variant | seed | windows | tokens drawn | documents | distinct tokens | "
        "distinct / drawn | pool covered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['labels'].get('variant', '')} | {r['seed']} | {r['windows']} | "
            f"{r['tokens_drawn']:,} | {r['distinct_documents']} of "
            f"{r['pool_documents']} | {r['distinct_tokens']:,} | "
            f"{100 * r['distinct_share']:.1f}% | {100 * r['pool_share_covered']:.1f}% |"
        )
    return [*lines, ""]


#: sections with more than the sweep's table: name -> lines after the table
EXTRAS = {
    "calibration_size": lambda: render_coverage(
        json.loads(COVERAGE.read_text()) if COVERAGE.is_file() else None
    )
}

FLAP_TITLE = "FLAP as the paper ran it"


def render_flap(summary: dict | None) -> list[str]:
    """FLAP with its own running mean and with the PP reference code's, at each ratio."""
    lines = [
        f"## {FLAP_TITLE}",
        "",
        "FLAP's fluctuation statistic with FLAP's own running mean (`flap`, prunekit's "
        "default) and with the PP reference code's update (`reference`), whose baseline "
        "tends to the mean divided by the calibration batch size. The paper's FLAP rows "
        "come from the reference code ([methods.md](methods.md#flap)). Recipe: "
        "[`recipes/ablations/flap_running_mean.yaml`]"
        "(../recipes/ablations/flap_running_mean.yaml).",
        "",
    ]
    if summary is None:
        return [*lines, "Not run yet.", ""]
    lines += [
        "| running mean | ratio | seeds | WikiText-2 perplexity | decoder MACs kept |",
        "|---|---|---|---|---|",
    ]
    by: dict[tuple[str, str], dict] = {}
    for r in summary["rows"]:
        s = r["metrics"][METRIC]
        macs = r["metrics"].get("reduction.flops_kept_fraction", {}).get("mean")
        by[(r["labels"].get("variant", ""), r["labels"].get("method.ratio", ""))] = s
        value = (
            "-" if not s["n"] else fmt(s["mean"]) + (f" ± {fmt(s['std'])}" if s["n"] > 1 else "")
        )
        lines.append(
            f"| {r['labels'].get('variant')} | {r['labels'].get('method.ratio')} | "
            f"{s['n']} | {value} | {fmt(macs, 3)} |"
        )
    lines.append("")
    for ratio in sorted({k[1] for k in by}):
        own, ref = by.get(("flap", ratio)), by.get(("reference", ratio))
        if own and ref and own["n"] and ref["n"]:
            lines.append(
                f"- At {ratio}: the reference's running mean gives "
                f"{100 * (ref['mean'] / own['mean'] - 1):+.1f}% perplexity against "
                "FLAP's own."
            )
    return [*lines, ""]


def report_sections(text: str) -> dict[str, list[str]]:
    """The sections of a report by title: each from its ``## Title`` line up to the next."""
    sections = {}
    for part in re.split(r"(?m)^(?=## )", text)[1:]:
        lines = part.rstrip("\n").split("\n")
        sections[lines[0][3:].strip()] = lines
    return sections


def render(names: list[str], old: str = "") -> str:
    """The report from the sweeps' summaries; a sweep without one keeps its section of ``old``
    (the report as it stands), or is listed as not run when ``old`` has none."""
    kept = report_sections(old)
    lines = [
        "# Ablations of Probe Pruning on SmolLM2",
        "",
        "<!-- generated by benchmarks/ablations.py from runs/ablations/*/summary.json; do not "
        "edit by hand -->",
        "",
        "Each section is one sweep (`prunekit sweep recipes/ablations/<name>.yaml`) on "
        "SmolLM2-135M-Instruct (fp32, CPU) at ratio 0.4, with layers 0-2 skipped. Perplexity is "
        "measured on 40 **random** WikiText-2 test windows of 512 tokens in batches of 20 (the "
        "paper's protocol), and the history starts from 128 C4 windows. Each variant runs with "
        "several seeds; a seed changes both the calibration draw and the evaluation windows. The "
        "table shows the mean ± standard deviation over seeds and each seed's value. Every "
        "number below is read from the sweeps' summaries. The typed text is only what each "
        "ablation tests and the claim it checks, which is the paper's unless marked otherwise.",
        "",
        "Variants are compared **seed by seed**: a seed fixes both the calibration draw and "
        "the 40 evaluation windows, so the two runs of one seed differ only by the variant, "
        "while different seeds differ by far more (different windows). A claim *holds* when "
        "its better variant has the lower perplexity for every seed, *does not hold* when it "
        "has it for none, and is *mixed* otherwise. With two seeds, a small average gap is "
        "weak evidence either way.",
        "",
    ]
    missing = []
    for name in names:
        summary = load(name)
        if summary is not None:
            lines += render_one(name, summary)
        elif ABLATIONS[name][0] in kept:
            lines += [*kept[ABLATIONS[name][0]], ""]
            print(
                f"{name}: no summary here; its section is kept as the report has it",
                file=sys.stderr,
            )
        else:
            missing.append(name)
    flap = load("flap_running_mean")
    if flap is None and FLAP_TITLE in kept:
        lines += [*kept[FLAP_TITLE], ""]
        print(
            "flap_running_mean: no summary here; its section is kept as the report has it",
            file=sys.stderr,
        )
    else:
        lines += render_flap(flap)
    if missing:
        lines += [
            "## Not run yet",
            "",
            "These sweeps have no results in this report yet (their recipes are in "
            "`recipes/ablations/`):",
            "",
        ]
        lines += [f"- `{m}`" + (f": {NOT_RUN[m]}" if m in NOT_RUN else "") for m in missing]
        lines.append("")
    lines += [
        "## Reproducing",
        "",
        "```",
        "python benchmarks/ablations.py           # runs every sweep, then writes this file",
        "python benchmarks/ablations.py --render-only",
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=list(ABLATIONS))
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--sweep-args", default="", help="extra arguments for prunekit sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ablations.md")
    args = parser.parse_args(argv)
    names = args.only or list(ABLATIONS)
    if not args.render_only:
        run_sweeps(names, args.sweep_args.split())
    old = args.out.read_text() if args.out.is_file() else ""
    write_atomic(args.out, render(list(ABLATIONS), old))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
