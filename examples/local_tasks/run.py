"""Multiple-choice data three ways on SmolLM2, from one recipe: a built-in task, a local file
whose answers sit in separate fields, and an lm-eval task by name.

1. **PIQA-style** (``sol1``/``sol2``, 0-based ``label``): the shared PIQA validation file with
   its labels merged in, read as a local task with ``choice_fields: [sol1, sol2]``. Its
   questions are the built-in ``piqa`` task's, so the two accuracies must be equal.
2. **SocialIQA-style** (three or more answer fields, 1-based ``label``): the ARC-Easy test
   questions with exactly four choices, written as ``answerA``..``answerD`` and ``label``
   ``"1"``..``"4"``. The same questions are also written in ARC's own layout (a ``choices``
   list field and an ``answerKey`` letter), and the two must agree.
3. **lm-eval by name**: ``evaluation.lm_eval: {tasks: [pk_piqa], include_path: ...}``, where
   pk_piqa is lm-eval's config of prunekit's PIQA formatting
   (``benchmarks/lm_eval_tasks``), scored through the bridge. lm-eval's ``acc`` must equal
   the built-in ``piqa``'s. Its ``acc_norm`` normalises by characters, prunekit's by tokens.

    PRUNEKIT_DATA_DIR=../shared/data python examples/local_tasks/run.py          # ~8 min, 2 cores
    PRUNEKIT_DATA_DIR=../shared/data python examples/local_tasks/run.py --limit 20   # quick

The recipe is dense SmolLM2 (``--method``/``--ratio`` prune it first). The script writes
examples/local_tasks/results.md and results.json, and exits non-zero if an equality fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import prunekit
from prunekit.data.tasks import locate_task

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def _pk_tasks():
    spec = importlib.util.spec_from_file_location(
        "pk_tasks", ROOT / "benchmarks" / "lm_eval_tasks" / "pk_tasks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare(work: Path) -> dict:
    """The local files: PIQA with labels, ARC-Easy (4 choices) in SocialIQA's and ARC's
    layouts, and the rendered lm-eval config of pk_piqa."""
    pk = _pk_tasks()
    include = pk.render(work / "lm_eval_tasks", None, ("piqa",))
    piqa = include / pk.PIQA_MERGED
    arc = Path(locate_task("arc_easy").location)
    fields, listed = work / "arc_easy-fields.jsonl", work / "arc_easy-list.jsonl"
    n = 0
    with open(arc) as src, open(fields, "w") as f_out, open(listed, "w") as l_out:
        for line in src:
            rec = json.loads(line)
            if isinstance(rec["choices"], dict):  # the hub's layout: {text, label} + answerKey
                texts = rec["choices"]["text"]
                gold = [str(x) for x in rec["choices"]["label"]].index(str(rec["answerKey"]))
            else:  # the shared data's: a list + a 0-based gold index
                texts, gold = rec["choices"], int(rec["gold"])
            if len(texts) != 4:
                continue
            f_out.write(
                json.dumps(
                    {
                        "question": rec["question"],
                        **{f"answer{'ABCD'[i]}": t for i, t in enumerate(texts)},
                        "label": str(gold + 1),
                    }
                )
                + "\n"
            )
            l_out.write(
                json.dumps(
                    {"question": rec["question"], "choices": texts, "answerKey": "ABCD"[gold]}
                )
                + "\n"
            )
            n += 1
    return {"include": include, "piqa": piqa, "fields": fields, "listed": listed, "arc_4": n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=300, help="questions per task")
    parser.add_argument("--method", default="dense")
    parser.add_argument("--ratio", type=float, default=0.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="local_tasks-"))
    files = prepare(work)
    limit = args.limit
    arc_context = "Question: {question}\nAnswer:"  # the built-in arc_easy's formatting
    recipe = {
        "model": {"id": "smollm2-135m-instruct", "dtype": "float32"},
        "method": {"name": args.method, "ratio": args.ratio},
        "calibration": {"samples": 32},
        "runtime": {"batches": 0},
        "evaluation": {
            "perplexity": [],
            "tasks": [
                {"name": "piqa", "limit": limit},
                {
                    "name": "piqa_fields",
                    "path": str(files["piqa"]),
                    "context": "{goal}",
                    "choice_fields": ["sol1", "sol2"],
                    "gold": "label",
                    "limit": limit,
                },
                {
                    "name": "arc4_fields",
                    "path": str(files["fields"]),
                    "context": arc_context,
                    "choice_fields": ["answerA", "answerB", "answerC", "answerD"],
                    "gold": "label",
                    "gold_base": 1,
                    "limit": limit,
                },
                {
                    "name": "arc4_list",
                    "path": str(files["listed"]),
                    "context": arc_context,
                    "choices": "choices",
                    "gold": "answerKey",
                    "limit": limit,
                },
            ],
            "lm_eval": {
                "tasks": ["pk_piqa"],
                "include_path": str(files["include"]),
                "include_defaults": False,
                "limit": limit,
            },
        },
        "output": {"dir": str(work / "run")},
    }
    start = time.perf_counter()
    result = prunekit.apply(recipe)
    seconds = time.perf_counter() - start
    m = result["metrics"]
    checks = {
        "piqa_fields acc == piqa acc": m["piqa_fields"]["acc"] == m["piqa"]["acc"],
        "piqa_fields acc_norm == piqa acc_norm": m["piqa_fields"]["acc_norm"]
        == m["piqa"]["acc_norm"],
        "arc4_fields acc == arc4_list acc": m["arc4_fields"]["acc"] == m["arc4_list"]["acc"],
        "lm_eval:pk_piqa acc == piqa acc": m["lm_eval:pk_piqa"]["acc"] == m["piqa"]["acc"],
    }
    rows = [
        ("piqa", "built-in task"),
        ("piqa_fields", "local file, choice_fields [sol1, sol2]"),
        ("arc4_fields", "local file, SocialIQA layout (answerA..D, label 1-4)"),
        ("arc4_list", "local file, ARC layout (choices list, answerKey)"),
        ("lm_eval:pk_piqa", "lm-eval task by name (include_path), through the bridge"),
    ]
    lines = [
        "# Multiple-choice data from a recipe: built-in, local files by field, lm-eval by name",
        "",
        f"Command: `PRUNEKIT_DATA_DIR=../shared/data python examples/local_tasks/run.py "
        f"--limit {limit}{'' if args.method == 'dense' else f' --method {args.method} --ratio {args.ratio}'}`  ",
        f"Model: SmolLM2-135M-Instruct, fp32, {args.method} at ratio {args.ratio}; the first "
        f"{limit} questions of each task; {seconds:.0f} s on this machine; prunekit "
        f"{prunekit.__version__}, {time.strftime('%Y-%m-%d')}.",
        "",
        f"The ARC-Easy test questions with exactly four choices ({files['arc_4']}) are written "
        "in two layouts; PIQA's validation questions are the built-in task's.",
        "",
        "| task | how it is read | questions | acc | acc_norm |",
        "|---|---|---|---|---|",
    ]
    for key, how in rows:
        r = m[key]
        n = r.get("questions", r.get("samples"))
        lines.append(
            f"| {key} | {how} | {n} | {r['acc']:.4f} | {r.get('acc_norm', float('nan')):.4f} |"
        )
    lines += [
        "",
        "lm-eval's acc_norm divides by each choice's length in characters, prunekit's by "
        "its tokens, so only acc is compared across the two.",
        "",
        "Checks:",
        "",
    ]
    lines += [f"- {name}: {'PASS' if ok else 'FAIL'}" for name, ok in checks.items()]
    text = "\n".join(lines) + "\n"
    suffix = "" if limit == 300 and args.method == "dense" else "_quick"
    (HERE / f"results{suffix}.md").write_text(text)
    (HERE / f"results{suffix}.json").write_text(
        json.dumps(
            {
                "metrics": {k: m[k] for k, _ in rows},
                "checks": checks,
                "seconds": seconds,
                "limit": limit,
                "method": args.method,
                "ratio": args.ratio,
            },
            indent=2,
        )
        + "\n"
    )
    print(text)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
