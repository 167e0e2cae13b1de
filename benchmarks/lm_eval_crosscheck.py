"""Cross-check: prunekit's own task evaluation vs lm-eval through the PrunekitLM bridge.

Dense SmolLM2-135M-Instruct (float32, CPU) on the first N items of each of the 7 zero-shot
tasks, scored three ways:

1. prunekit: ``load_questions`` + ``evaluate_questions`` (what ``prunekit apply`` reports);
2. lm-eval with :class:`prunekit.integrations.lm_eval.PrunekitLM` and the ``pk_*`` task
   configs of ``benchmarks/lm_eval_tasks`` (same formatting as prunekit, local files);
3. lm-eval's own ``hf`` model (``HFLM``) on the same configs and the same in-memory model:
   independent tokenisation and scoring code (skip with ``--no-hflm``).

Per task it compares, item by item: the request strings (context, continuation) lm-eval built
with prunekit's, the gold index, the ``acc`` prediction (argmax log-likelihood), the
``acc_norm`` prediction (lm-eval: per character; prunekit: per token; and lm-eval's
log-likelihoods divided by prunekit's token counts), and the log-likelihoods themselves.

    PRUNEKIT_DATA_DIR=/path/to/shared/data python benchmarks/lm_eval_crosscheck.py [--limit 50]
    python benchmarks/lm_eval_crosscheck.py --render-only   # rewrite the .md from the .json

Writes benchmarks/results/lm_eval_crosscheck.json and benchmarks/lm_eval_crosscheck.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
JSON_OUT = HERE / "results" / "lm_eval_crosscheck.json"
MD_OUT = HERE / "lm_eval_crosscheck.md"
MODEL = "smollm2-135m-instruct"


def _pk_tasks():
    """benchmarks/lm_eval_tasks/pk_tasks.py (renders the task configs)."""
    spec = importlib.util.spec_from_file_location(
        "pk_tasks", HERE / "lm_eval_tasks" / "pk_tasks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argmax(values) -> int:
    """Index of the largest value, the first one on ties (numpy's and prunekit's rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _lls(sample: dict) -> list[float]:
    return [float(r[0]) for r in sample["filtered_resps"]]


def compare_task(
    task: str,
    questions,
    prunekit_result: dict,
    samples: list[dict],
    hflm_samples: list[dict] | None,
    hflm_pairs_differ: int | None,
) -> dict:
    """Item-by-item comparison of one task (see the module docstring)."""
    records = prunekit_result["records"]
    samples = sorted(samples, key=lambda s: s["doc_id"])
    if len(samples) != len(questions):
        raise RuntimeError(
            f"{task}: lm-eval scored {len(samples)} items, prunekit {len(questions)}"
        )
    multiple_input = task == "winogrande"
    out = {
        "requests_identical": 0,
        "gold_identical": 0,
        "acc_pred_agree": 0,
        "acc_norm_pred_agree": None if multiple_input else 0,
        "token_norm_pred_agree": 0,
        "max_abs_ll_diff": 0.0,
        "disagreements": [],
    }
    hflm = None
    if hflm_samples is not None:
        hflm = {"acc_pred_agree": 0, "max_abs_ll_diff": 0.0}
        hflm_samples = sorted(hflm_samples, key=lambda x: x["doc_id"])
    for i, (q, rec, s) in enumerate(zip(questions, records, samples, strict=True)):
        requests = [tuple(a[:2]) for a in s["arguments"]]
        out["requests_identical"] += requests == list(zip(q.contexts, q.continuations, strict=True))
        gold = s["doc"]["pk_gold"]
        out["gold_identical"] += gold == q.gold
        lls = _lls(s)
        pk_lls = [-x for x in rec["nll"]]
        out["max_abs_ll_diff"] = max(
            out["max_abs_ll_diff"], *(abs(a - b) for a, b in zip(lls, pk_lls, strict=True))
        )
        pred = _argmax(lls)
        out["acc_pred_agree"] += pred == rec["pred"]
        if pred != rec["pred"]:
            top = sorted(pk_lls, reverse=True)
            out["disagreements"].append(
                {
                    "item": i,
                    "gold": q.gold,
                    "prunekit_pred": rec["pred"],
                    "lm_eval_pred": pred,
                    "prunekit_margin": top[0] - top[1],
                }
            )
        if not multiple_input:  # lm-eval's acc_norm: log-likelihood per character of the choice
            lengths = [len(c) for c in s["doc"]["pk_choices"]]
            out["acc_norm_pred_agree"] += (
                _argmax([ll / n for ll, n in zip(lls, lengths, strict=True)]) == rec["pred_norm"]
            )
        per_token = [ll / n for ll, n in zip(lls, rec["tokens"], strict=True)]
        out["token_norm_pred_agree"] += _argmax(per_token) == rec["pred_norm"]
        if hflm is not None:
            h_lls = _lls(hflm_samples[i])
            hflm["acc_pred_agree"] += _argmax(h_lls) == rec["pred"]
            hflm["max_abs_ll_diff"] = max(
                hflm["max_abs_ll_diff"], *(abs(a - b) for a, b in zip(h_lls, pk_lls, strict=True))
            )
    if hflm is not None:
        hflm["requests_tokenised_differently"] = hflm_pairs_differ
    out["hflm"] = hflm
    return out


def _metrics(result: dict, task: str) -> dict:
    r = result["results"][f"pk_{task}"]
    return {"acc": r.get("acc,none"), "acc_norm": r.get("acc_norm,none")}


def run(args) -> dict:
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    import prunekit
    from prunekit.data.tasks import load_questions, locate_task
    from prunekit.evaluation.zeroshot import encode_pair, evaluate_questions
    from prunekit.integrations.lm_eval import PrunekitLM
    from prunekit.loading import load_model

    data_dir = args.data_dir or os.environ.get("PRUNEKIT_DATA_DIR")
    if not data_dir:
        sys.exit("give --data-dir or set PRUNEKIT_DATA_DIR (the local data directory)")
    tasks = args.tasks
    loaded = load_model(MODEL, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    questions, prunekit_results = {}, {}
    for task in tasks:
        questions[task] = load_questions(locate_task(task, data_dir), args.limit)
        prunekit_results[task] = evaluate_questions(
            model,
            tokenizer,
            questions[task],
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    timings["prunekit_s"] = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="pk-lm-eval-tasks-") as tmp:
        _pk_tasks().render(tmp, data_dir, tuple(tasks))
        manager = TaskManager(include_path=tmp, include_defaults=False)
        names = [f"pk_{t}" for t in tasks]
        common = {
            "tasks": names,
            "task_manager": manager,
            "limit": args.limit,
            "log_samples": True,
            "bootstrap_iters": 0,
        }
        t0 = time.perf_counter()
        bridge = lm_eval.simple_evaluate(
            model=PrunekitLM(
                model, tokenizer, batch_size=args.batch_size, max_length=args.max_length
            ),
            **common,
        )
        timings["lm_eval_bridge_s"] = time.perf_counter() - t0
        hflm_result, hflm_differ = None, {t: None for t in tasks}
        if args.hflm:
            from lm_eval.models.huggingface import HFLM

            hf = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=args.batch_size,
                max_length=args.max_length,
            )
            t0 = time.perf_counter()
            hflm_result = lm_eval.simple_evaluate(model=hf, **common)
            timings["lm_eval_hflm_s"] = time.perf_counter() - t0
            for task in tasks:
                hflm_differ[task] = sum(
                    tuple(map(list, hf._encode_pair(*a[:2]))) != encode_pair(tokenizer, *a[:2])
                    for s in hflm_result["samples"][f"pk_{task}"]
                    for a in s["arguments"]
                )

    rows = []
    for task in tasks:
        pk = prunekit_results[task]
        row = {
            "task": task,
            "questions": pk["questions"],
            "choices": pk["choices"],
            "prunekit": {"acc": pk["acc"], "acc_norm": pk["acc_norm"]},
            "lm_eval_bridge": _metrics(bridge, task),
            "lm_eval_hflm": _metrics(hflm_result, task) if hflm_result else None,
        }
        row.update(
            compare_task(
                task,
                questions[task],
                pk,
                bridge["samples"][f"pk_{task}"],
                hflm_result["samples"][f"pk_{task}"] if hflm_result else None,
                hflm_differ[task],
            )
        )
        rows.append(row)

    argv = " ".join(sys.argv[1:])
    env = "" if args.data_dir else f"PRUNEKIT_DATA_DIR={data_dir} "
    return {
        "command": f"{env}python benchmarks/{Path(__file__).name} {argv}".strip(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{platform.platform()}",
        "versions": {
            "prunekit": prunekit.__version__,
            "torch": torch.__version__,
            "lm_eval": lm_eval.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "model": loaded.info.get("name", MODEL),
        "settings": {
            "model": MODEL,
            "dtype": "float32",
            "device": "cpu",
            "limit": args.limit,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "data_dir": str(data_dir),
            "hflm": args.hflm,
        },
        "timings": timings,
        "tasks": rows,
    }


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def _count(k, n) -> str:
    return "—" if k is None else f"{k}/{n}"


def markdown(report: dict) -> str:
    """The Markdown report, every number taken from ``report`` (the JSON)."""
    s = report["settings"]
    v = report["versions"]
    hflm = s["hflm"]
    lines = [
        "# lm-eval cross-check: prunekit's task evaluation vs lm-eval through PrunekitLM",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; prunekit {v['prunekit']}, torch {v['torch']}, "
        f"transformers {v['transformers']}, lm-eval {v['lm_eval']}.  ",
        f"Model: {report['model']}, {s['dtype']}, {s['device']}. First {s['limit']} items of each "
        f"task, batch {s['batch_size']}, max_length {s['max_length']}. Task configs: "
        "`benchmarks/lm_eval_tasks/pk_*.yaml` (prunekit's formatting, local files).  ",
        "Time: "
        + ", ".join(f"{k.removesuffix('_s')} {t:.0f} s" for k, t in report["timings"].items())
        + ".",
        "",
        "## Accuracy",
        "",
        "`prunekit`: `evaluate_questions` (acc_norm per token). `bridge`: "
        "`lm_eval.simple_evaluate` with `PrunekitLM` (acc_norm computed by lm-eval, per "
        "character)." + (" `hf`: lm-eval's own `HFLM` on the same model." if hflm else ""),
        "",
    ]
    head = "| task | items | prunekit acc | bridge acc | prunekit acc_norm | bridge acc_norm |"
    rule = "|---|---|---|---|---|---|"
    if hflm:
        head += " hf acc | hf acc_norm |"
        rule += "---|---|"
    lines += [head, rule]
    for r in report["tasks"]:
        row = (
            f"| {r['task']} | {r['questions']} | {_fmt(r['prunekit']['acc'])} | "
            f"{_fmt(r['lm_eval_bridge']['acc'])} | {_fmt(r['prunekit']['acc_norm'])} | "
            f"{_fmt(r['lm_eval_bridge']['acc_norm'])} |"
        )
        if hflm:
            row += f" {_fmt(r['lm_eval_hflm']['acc'])} | {_fmt(r['lm_eval_hflm']['acc_norm'])} |"
        lines.append(row)
    lines += [
        "",
        "## Item-by-item agreement with prunekit",
        "",
        "Counts of items (out of the task's items) where the bridge run agrees with prunekit's "
        "own evaluation: identical request strings (every choice's context and continuation) "
        "and gold index; the same `acc` prediction (argmax log-likelihood); the same "
        "normalised prediction with lm-eval's per-character rule and with lm-eval's "
        "log-likelihoods divided by prunekit's token counts; and the largest difference of "
        "one choice's log-likelihood.",
        "",
    ]
    head = (
        "| task | requests identical | gold identical | acc pred agree | acc_norm pred agree "
        "(per char) | per-token pred agree | max abs Δ loglik |"
    )
    rule = "|---|---|---|---|---|---|---|"
    if hflm:
        head += " hf acc pred agree | hf max abs Δ loglik | hf requests tokenised differently |"
        rule += "---|---|---|"
    lines += [head, rule]
    for r in report["tasks"]:
        n = r["questions"]
        row = (
            f"| {r['task']} | {_count(r['requests_identical'], n)} | "
            f"{_count(r['gold_identical'], n)} | {_count(r['acc_pred_agree'], n)} | "
            f"{_count(r['acc_norm_pred_agree'], n)} | {_count(r['token_norm_pred_agree'], n)} | "
            f"{r['max_abs_ll_diff']:.1e} |"
        )
        if hflm:
            h = r["hflm"]
            row += (
                f" {_count(h['acc_pred_agree'], n)} | {h['max_abs_ll_diff']:.1e} | "
                f"{_count(h['requests_tokenised_differently'], r['choices'])} |"
            )
        lines.append(row)
    lines += ["", "## Differences, explained", ""]
    lines += _explanations(report)
    return "\n".join(lines) + "\n"


def _explanations(report: dict) -> list[str]:
    rows = report["tasks"]
    n_items = sum(r["questions"] for r in rows)
    same_requests = sum(r["requests_identical"] for r in rows)
    same_gold = sum(r["gold_identical"] for r in rows)
    acc_agree = sum(r["acc_pred_agree"] for r in rows)
    max_diff = max(r["max_abs_ll_diff"] for r in rows)
    normed = [r for r in rows if r["acc_norm_pred_agree"] is not None]
    char_agree = sum(r["acc_norm_pred_agree"] for r in normed)
    char_items = sum(r["questions"] for r in normed)
    token_agree = sum(r["token_norm_pred_agree"] for r in rows)
    # lm-eval sends the tasks' requests as one stream: its batches are prunekit's per-task
    # batches exactly when every task but the last has a multiple of batch_size requests
    size = report["settings"]["batch_size"]
    aligned = all(r["choices"] % size == 0 for r in rows[:-1])
    batches = (
        f"here every task but the last has a multiple of {size} requests, so the bridge's "
        "batches are exactly prunekit's and the log-likelihoods are "
        + ("bit-identical" if max_diff == 0 else f"within {max_diff:.1e}")
        if aligned
        else "here batches span tasks and are padded to other widths, which moves "
        f"log-likelihoods by floating-point noise only: at most {max_diff:.1e}"
    )
    out = [
        f"- **Formatting.** {same_requests}/{n_items} items gave lm-eval exactly prunekit's "
        f"request strings and {same_gold}/{n_items} the same gold index: the `pk_*` configs "
        "reproduce `prunekit/data/tasks.py`.",
        f"- **acc.** {acc_agree}/{n_items} items have the same prediction. The bridge scores "
        "with prunekit's own `encode_pair`/`score_requests`; only the batch composition can "
        f"differ (lm-eval sends all tasks' requests in one stream): {batches}. The `hf` "
        "columns show the effect of other batches and padding.",
    ]
    disagreements = [(r["task"], d) for r in rows for d in r["disagreements"]]
    if disagreements:
        out.append(
            "  Items predicted differently (near-ties: prunekit's margin between its "
            "two best choices): "
            + "; ".join(
                f"{t} item {d['item']} (margin {d['prunekit_margin']:.1e})"
                for t, d in disagreements
            )
            + "."
        )
    out += [
        f"- **acc_norm.** lm-eval divides each choice's log-likelihood by the choice's length in "
        f"characters, prunekit by its number of tokens; the normalised predictions agree on "
        f"{char_agree}/{char_items} items. Dividing lm-eval's log-likelihoods by prunekit's "
        f"token counts instead gives prunekit's prediction on {token_agree}/{n_items} items, so "
        "the acc_norm gap is the normalisation rule alone. WinoGrande has no lm-eval acc_norm: "
        "its choices are contexts, so the per-character rule would divide by the context "
        "length (lm-eval's own `winogrande` task reports acc only, and so does `pk_winogrande`).",
        "- **Tokenisation boundaries.** prunekit tokenises `context + continuation` once and "
        "takes the continuation's tokens as what follows the context's tokens, with the "
        "context's special tokens, which is also what lm-eval's `hf` model does by default "
        "(lm-eval 0.4.13: `add_bos_token=None`, the tokenizer's default); SmolLM2's tokenizer "
        "adds no special tokens anyway. Both move a context's trailing whitespace into the "
        "continuation. The one rule that differs: when the boundary merges context and "
        "continuation into one token, prunekit tokenises the continuation on its own, lm-eval "
        "keeps the joint split (see the `hf` columns for how often the tokens differ).",
    ]
    if report["settings"]["hflm"]:
        h_agree = sum(r["hflm"]["acc_pred_agree"] for r in rows)
        h_diff = max(r["hflm"]["max_abs_ll_diff"] for r in rows)
        h_tok = sum(r["hflm"]["requests_tokenised_differently"] for r in rows)
        n_req = sum(r["choices"] for r in rows)
        out.append(
            f"- **lm-eval's own `hf` model.** Independent tokenisation and scoring code (it sorts "
            f"requests by length and batches them its own way): {h_tok}/{n_req} requests "
            f"tokenised differently from `encode_pair`, {h_agree}/{n_items} items with "
            f"prunekit's acc prediction, log-likelihoods within {h_diff:.1e}."
        )
    out.append(
        "- **Dynamic methods** (not run here): their kept units are decided per batch, so "
        "through the bridge they see lm-eval's batches, not prunekit's per-task ones, and "
        "their scores differ from prunekit's own evaluation by more than noise "
        "(see docs/lm-eval.md)."
    )
    return out


def main() -> None:
    from prunekit.data.tasks import TASKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50, help="items per task (default 50)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--data-dir", default=None, help="default: $PRUNEKIT_DATA_DIR")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--no-hflm", dest="hflm", action="store_false", help="skip the run of lm-eval's own HFLM"
    )
    parser.add_argument("--out", default=str(JSON_OUT), help="JSON output path")
    parser.add_argument(
        "--render-only", action="store_true", help="only rewrite the Markdown report from the JSON"
    )
    args = parser.parse_args()
    out = Path(args.out)
    if args.render_only:
        report = json.loads(out.read_text())
    else:
        report = run(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    if out.resolve() == JSON_OUT.resolve():
        MD_OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
