"""What recovery buys: static methods with and without LoRA recovery, and LoRAPrune w/o and
with LoRA, beside Probe Pruning without any fine-tune, from the sweep
``recipes/sweeps/recovery_smollm2.yaml``. Every number is read from
the sweep's summary; nothing is typed.

    prunekit sweep recipes/sweeps/recovery_smollm2.yaml    # the cells (over 30 min each on 2 cores)
    python benchmarks/recovery.py                          # the table

Writes benchmarks/recovery.md and the recovery section of docs/benchmarks.md (between its
markers; benchmarks/paper_table.py keeps that section when it rewrites the file).

    python benchmarks/recovery.py --lora-rows-from benchmarks/results/recovery_kd.json

takes the static methods' fine-tuned rows (``llm-pruner+lora``, ``wanda-sp+lora``) from the
distillation table's ``ce`` cells instead (``benchmarks/recovery_kd.py``, which builds its
recipes from this sweep's): the committed sweep summary's rows for them were measured before
LoRA adapters on a sliced attention acted. The join is checked: the same sweep file, the same
recovery settings, each method's perplexity without recovery equal in both (the same pruned
structure) and the first step's fine-tune loss equal (the same windows, before any update); the
table marks the rows it replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _sections import splice  # noqa: E402  (a sibling module of this script)
from _snapshots import sweep_summary  # noqa: E402

SUMMARY = ROOT / "runs" / "recovery" / "summary.json"
PPL, MACS = "wikitext2-test.ppl", "reduction.flops_kept_fraction"
LOSSES = (
    ("recovery.loss_first", "recovery.loss_last"),
    ("loraprune.finetune.loss_first", "loraprune.finetune.loss_last"),
)
START, END = "<!-- recovery:start -->", "<!-- recovery:end -->"
#: (row without a fine-tune after pruning, the same with one)
PAIRS = (
    ("llm-pruner", "llm-pruner+lora"),
    ("wanda-sp", "wanda-sp+lora"),
    ("loraprune", "loraprune+lora"),
)
#: the row every other is compared with: Probe Pruning, no fine-tune at all
REFERENCE = "pp"
#: the sweep's fine-tuned static variants -> their method in benchmarks/recovery_kd.py
LORA_ROWS = {"llm-pruner+lora": "llm-pruner", "wanda-sp+lora": "wanda-sp"}


def table(summary: dict) -> dict[float, dict[str, dict]]:
    """ratio -> variant -> {ppl, macs, loss: (first, last) or None, failed}."""
    out: dict[float, dict[str, dict]] = {}
    for row in summary["rows"]:
        m = row["metrics"]
        loss = None
        for first, last in LOSSES:
            if m.get(first, {}).get("n") and m.get(last, {}).get("n"):
                loss = (m[first]["mean"], m[last]["mean"])
        out.setdefault(float(row["labels"]["method.ratio"]), {})[row["labels"]["variant"]] = {
            "ppl": m[PPL]["mean"] if m.get(PPL, {}).get("n") else None,
            "macs": m[MACS]["mean"] if m.get(MACS, {}).get("n") else None,
            "loss": loss,
            "failed": row.get("failed") or [],
        }
    return out


def replace_lora_rows(rows: dict[float, dict[str, dict]], kd_report: dict, source: str) -> int:
    """Put the distillation table's ``ce`` cells in place of ``LORA_ROWS`` in ``rows`` (in
    place), after checking that they are the same experiment; how many rows were replaced."""
    import yaml
    from recovery_kd import SWEEP, base_recipe

    def refuse(why: str) -> SystemExit:
        return SystemExit(f"--lora-rows-from {source}: {why}; not joined")

    if kd_report.get("protocol") != str(SWEEP.relative_to(ROOT)):
        raise refuse(
            f"its protocol is {kd_report.get('protocol')!r}, not {SWEEP.relative_to(ROOT)}"
        )
    variants = yaml.safe_load(SWEEP.read_text())["sweep"]["variants"]
    recovery = base_recipe()[1]
    cells = {(r["method"], float(r["ratio"]), r["recovery"]): r for r in kd_report["rows"]}
    replaced = 0
    for ratio, at in rows.items():
        for variant, method in LORA_ROWS.items():
            if variant not in at:
                continue
            if variants[variant].get("recovery") != recovery:
                raise refuse(f"the sweep's {variant} recovers otherwise than its ce cells")
            ce, none = cells.get((method, ratio, "ce")), cells.get((method, ratio, "none"))
            if not ce or ce.get("failed") or not none or none.get("failed"):
                raise refuse(f"no finished {method} ce and none cells at {ratio:g}")
            bare = at.get(method, {}).get("ppl")
            if bare is None or abs(none["ppl"] - bare) > 1e-6 * bare:
                raise refuse(
                    f"{method} at {ratio:g} without recovery is {none['ppl']:.4f} there and "
                    f"{bare} in the sweep: not the same pruned model"
                )
            old = at[variant].get("loss")
            if old and abs(old[0] - ce["loss_first"]) > 1e-6 * abs(old[0]):
                # the first step's loss comes before any update: the same windows on the same
                # pruned model give the same one, whatever the adapters later learn
                raise refuse(
                    f"{variant} at {ratio:g}: first fine-tune loss {ce['loss_first']:.6f} there, "
                    f"{old[0]:.6f} in the sweep: not the same windows or model"
                )
            at[variant] = {
                **at[variant],
                "ppl": ce["ppl"],
                "loss": (ce["loss_first"], ce["loss_last"]),
                "failed": [],
                "from_kd": True,
            }
            replaced += 1
    return replaced


def planned_ratios() -> list[float]:
    """The ratios the sweep recipe asks for (its grid), so a partial summary says what is left."""
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "sweeps" / "recovery_smollm2.yaml").read_text())
    return [float(r) for r in recipe["sweep"]["grid"]["method.ratio"]]


def markdown(summary: dict, kd_report: dict | None = None, kd_source: str = "") -> str:
    rows = table(summary)
    replaced = replace_lora_rows(rows, kd_report, kd_source) if kd_report else 0
    out = [
        START,
        "",
        "## What recovery buys",
        "",
        "Static methods without and with the `recovery:` step (LoRA adapters through peft, "
        "trained on C4 training documents, merged back), LoRAPrune w/o LoRA (adapters "
        "dropped, the paper's rows) and with LoRA (merged), and PP with no fine-tune at "
        "all (`pp`, the reference). SmolLM2-135M-Instruct, fp32, "
        "CPU, seed 0; WikiText-2 perplexity on 40 random test windows of 512 tokens in "
        "batches of 20 (the paper's protocol). Every fine-tune: 200 steps of 4 windows of "
        "128 tokens, LoRA rank 8 on every linear layer, lr 2e-4. Generated by "
        "`benchmarks/recovery.py` from the sweep `recipes/sweeps/recovery_smollm2.yaml`"
        + (
            f" and `{kd_source}` (`--lora-rows-from`): the rows marked * are the `ce` cells of "
            "the distillation table below (the same recipes, run again after the fix that "
            "made LoRA adapters on a sliced attention's projections act; the sweep's own rows "
            "for them predate it)."
            if replaced
            else "."
        ),
        "",
        "| ratio | method | decoder MACs kept | WikiText-2 PPL | fine-tune loss (first -> "
        "last step) |",
        "|---|---|---|---|---|",
    ]
    for ratio in sorted(rows):
        for variant, v in rows[ratio].items():
            ppl = (
                "failed"
                if v["failed"]
                else ("not run yet" if v["ppl"] is None else f"{v['ppl']:.2f}")
            )
            macs = "-" if v["macs"] is None else f"{100 * v['macs']:.1f}%"
            loss = "-" if v["loss"] is None else f"{v['loss'][0]:.3f} -> {v['loss'][1]:.3f}"
            mark = " *" if v.get("from_kd") else ""
            out.append(f"| {ratio:g} | {variant}{mark} | {macs} | {ppl} | {loss} |")
    missing = [r for r in planned_ratios() if r not in rows]
    if missing:
        out += [
            "",
            f"Not in this summary yet: ratio {', '.join(f'{r:g}' for r in missing)} (each "
            "fine-tuned cell takes 10-50 min on 2 CPU cores; `prunekit sweep "
            "recipes/sweeps/recovery_smollm2.yaml` runs only the missing cells).",
        ]
    out += ["", "Perplexity change from the fine-tune (with vs without, same structure):", ""]
    for ratio in sorted(rows):
        for before, after in PAIRS:
            a, b = rows[ratio].get(before), rows[ratio].get(after)
            if a and b and a["ppl"] and b["ppl"]:
                out.append(
                    f"- ratio {ratio:g}, {before}: {a['ppl']:.2f} -> {b['ppl']:.2f} "
                    f"({100 * (b['ppl'] / a['ppl'] - 1):+.1f}%)"
                )
    out += reference_lines(rows)
    out += ["", END]
    return "\n".join(out) + "\n"


def reference_lines(rows: dict[float, dict[str, dict]]) -> list[str]:
    """Per ratio, PP (no fine-tune) against every other row at the same ratio: lower
    perplexity or not, and by how much (read from the numbers; one seed)."""
    out = []
    for ratio in sorted(rows):
        ref = rows[ratio].get(REFERENCE)
        if not ref or not ref["ppl"]:
            continue
        others = [(v, r) for v, r in rows[ratio].items() if v != REFERENCE and r["ppl"]]
        if not others:
            continue
        below = [v for v, r in others if ref["ppl"] < r["ppl"]]
        out += [
            "",
            f"PP without any fine-tune at {ratio:g} ({ref['ppl']:.2f}) against each row "
            "(seed 0: every row on the same windows, but one calibration draw and one fine-tune "
            "each, so a gap of a few percent is weak evidence):",
            "",
        ]
        for variant, r in others:
            word = "below" if ref["ppl"] < r["ppl"] else "above"
            out.append(
                f"- {word} {variant} ({r['ppl']:.2f}, PP {100 * (ref['ppl'] / r['ppl'] - 1):+.1f}%)"
            )
        tuned = [v for v, _ in others if v.endswith("+lora")]
        beaten = [v for v in tuned if v in below]
        if tuned:
            out += [
                "",
                f"PP without fine-tuning is below {len(beaten)} of the {len(tuned)} "
                f"fine-tuned rows with their adapters kept at {ratio:g}"
                + (f" ({', '.join(beaten)})." if beaten else "."),
            ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", type=Path, default=SUMMARY)
    parser.add_argument(
        "--lora-rows-from",
        type=Path,
        metavar="RECOVERY_KD_JSON",
        help="take llm-pruner+lora and wanda-sp+lora from this benchmarks/recovery_kd.py "
        "report's ce cells (checked to be the same experiment)",
    )
    args = parser.parse_args(argv)
    summary = sweep_summary(args.summary, "recovery")
    if summary is None:
        raise SystemExit(
            f"{args.summary} not found (nor its committed copy): run prunekit "
            "sweep recipes/sweeps/recovery_smollm2.yaml first"
        )
    kd_report, kd_source = None, ""
    if args.lora_rows_from:
        if not args.lora_rows_from.is_file():
            raise SystemExit(f"--lora-rows-from {args.lora_rows_from}: no such file")
        kd_report = json.loads(args.lora_rows_from.read_text())
        path = args.lora_rows_from.resolve()
        kd_source = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    section = markdown(summary, kd_report, kd_source)
    (HERE / "recovery.md").write_text("# Recovery (SmolLM2)\n\n" + section)
    splice(ROOT / "docs" / "benchmarks.md", section)
    print("wrote benchmarks/recovery.md, docs/benchmarks.md (recovery section)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
