"""The ``prunekit`` command line: a thin layer over :mod:`prunekit.runner`.

User errors (:class:`prunekit.errors.PrunekitError`) print one clear message, no traceback,
and exit with status 2.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from prunekit.errors import (
    PrunekitError,
    StorageError,
    Terminated,
    sigterm_as_exception,
    storage_error,
    storage_failure,
)
from prunekit.recipe import check_user_overrides

app = typer.Typer(
    name="prunekit",
    help="Structured pruning of decoder LLMs: Probe Pruning, Wanda-sp, FLAP, LLM-Pruner.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key: --set method.ratio=0.4 (repeatable)."),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
PromptOption = Annotated[
    list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable: one batch).")
]
MaxNewTokensOption = Annotated[
    int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate per prompt.")
]


@app.callback()
def main_options(
    strict: Annotated[
        bool, typer.Option("--strict", help="A plugin that fails to load is an error.")
    ] = False,
    disable_plugin: Annotated[
        list[str] | None,
        typer.Option("--disable-plugin", help="Do not load this plugin (repeatable)."),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """prunekit: prune, evaluate and save decoder LLMs from a recipe."""
    if strict:
        os.environ["PRUNEKIT_STRICT"] = "1"
    if disable_plugin:
        current = [p for p in os.environ.get("PRUNEKIT_DISABLE_PLUGINS", "").split(",") if p]
        os.environ["PRUNEKIT_DISABLE_PLUGINS"] = ",".join([*current, *disable_plugin])
    if quiet:
        _quiet(True)


def _quiet(quiet: bool) -> None:
    if quiet:
        from prunekit.progress import set_quiet

        set_quiet(True)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


@app.command()
def apply(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output directory (overrides output.dir).")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Prune, evaluate and save as the recipe says; writes results.json."""
    from prunekit.runner import apply as run_apply

    _quiet(quiet)
    check_user_overrides(set_ or ())
    result = run_apply(recipe, set_ or (), output=output)
    _print_summary(result, output)


def _print_summary(result: dict, output: Path | None) -> None:
    out_dir = output or result.get("output_dir")
    lines = [f"{result['method']} (ratio {result['ratio']:.4g}) on {result['model']['name']}"]
    target = result.get("target")
    if target:
        lines.append(
            f"  target {target['kind']} {target['value']:g}: achieved {target['achieved']:.6g}"
        )
    for label, metric in result["metrics"].items():
        if "ppl" in metric:
            lines.append(f"  {label} perplexity: {metric['ppl']:.4f} ({metric['tokens']} tokens)")
        elif "questions" in metric:
            lines.append(
                f"  {label}: acc {100 * metric['acc']:.2f}%, acc_norm "
                f"{100 * metric['acc_norm']:.2f}% ({metric['questions']} questions)"
            )
        elif "acc_norm" in metric:
            lines.append(
                f"  average over {len(metric['tasks'])} tasks: acc_norm "
                f"{100 * metric['acc_norm']:.2f}%, acc {100 * metric['acc']:.2f}%"
            )
    runtime = result.get("runtime") or {}
    if runtime.get("speedup"):
        from prunekit.evaluation.runtime import describe_speedup

        lines.append(
            f"  time per batch (median): dense {runtime['dense_s_per_batch']:.3f} s, "
            f"pruned {runtime['pruned_s_per_batch']:.3f} s; speed-up "
            f"{describe_speedup(runtime)}"
        )
        if runtime.get("overhead_fraction") is not None:
            parts = ", ".join(
                f"{k} {1000 * v:.1f} ms" for k, v in runtime["overhead_s_per_batch"].items()
            )
            lines.append(
                f"  method overhead: {100 * runtime['overhead_fraction']:.1f}% of the "
                f"pruned time ({parts})"
            )
    typer.echo("\n".join(lines))
    if out_dir:
        typer.echo(f"  results: {Path(out_dir) / 'results.json'}")


@app.command()
def bench(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output directory (default: <output.dir>-bench)."),
    ] = None,
    batches: Annotated[
        int | None, typer.Option(help="Batches to time (overrides runtime.batches; default 2).")
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(
            help="Interleaved rounds, each timing every batch once on dense and "
            "pruned (overrides runtime.repeats; default: enough for 5 timed calls, "
            "at least 3)."
        ),
    ] = None,
    warmup: Annotated[
        int | None, typer.Option(help="Untimed calls first (overrides runtime.warmup).")
    ] = None,
    generate: Annotated[
        bool,
        typer.Option(
            "--generate",
            help="Time greedy generation (prefill and decode tokens/s) instead of scoring batches.",
        ),
    ] = False,
    prompt: PromptOption = None,
    prompt_tokens: Annotated[
        int,
        typer.Option(
            min=1,
            help="With --generate: prompt length in tokens (prompts are "
            "cut to it; default prompts: the first perplexity batch).",
        ),
    ] = 64,
    max_new_tokens: MaxNewTokensOption = 32,
    quiet: QuietOption = False,
) -> None:
    """Time dense and pruned in one process on the same batches; no accuracy evaluation.

    The batches are the first ones of the recipe's first evaluation.perplexity entry. Writes
    results.json with its `runtime` section (median, spread, tokens/s, memory, the method's
    overhead by phase). With --generate: a `generation` section instead (greedy generation
    from the same prompts, dense and pruned: prefill and decode seconds and tokens/s; a
    dynamic method decides on each prompt and its decoding steps reuse those decisions).
    """
    from prunekit.errors import RecipeError
    from prunekit.recipe import MIN_TIMED_CALLS, RuntimeConfig, load_recipe
    from prunekit.runner import GenerationBench, run_plan
    from prunekit.runner import validate as run_validate

    _quiet(quiet)
    check_user_overrides(set_ or ())
    loaded = load_recipe(recipe, set_ or ())
    rt = loaded.recipe.runtime
    explicit = {o.split("=", 1)[0].strip() for o in (set_ or ())}
    if generate:
        out_dir = Path(output or f"{loaded.recipe.output_dir()}-bench")
        loaded.recipe.output.dir = str(out_dir)
        rt.batches = 0  # generation only
        spec = GenerationBench(
            prompts=list(prompt) if prompt else None,
            prompt_tokens=prompt_tokens,
            max_new_tokens=max_new_tokens,
            rounds=repeats or MIN_TIMED_CALLS,
            warmup=warmup if warmup is not None else 1,
        )
        plan = run_validate(loaded)
        context = plan.context  # read from the config by validate
        if context is not None and prompt_tokens + max_new_tokens > context:
            raise RecipeError(
                f"--prompt-tokens {prompt_tokens} plus --max-new-tokens "
                f"{max_new_tokens} is {prompt_tokens + max_new_tokens} tokens, "
                f"past the model's context ({context} positions); lower one "
                "of them"
            )
        result = run_plan(plan, out_dir, evaluate=False, generation=spec)
        _print_generation(result["generation"], result)
        typer.echo(f"  results: {out_dir / 'results.json'}")
        return
    n_batches = batches if batches is not None else (rt.batches or 2)
    n_rounds = rt.repeats
    if repeats is not None:
        n_rounds = repeats
    elif "runtime.repeats" not in explicit:
        n_rounds = max(rt.repeats, 3, -(-MIN_TIMED_CALLS // max(n_batches, 1)))
    if n_batches * n_rounds < MIN_TIMED_CALLS:
        raise RecipeError(
            f"{recipe}: {n_batches} batch(es) x {n_rounds} round(s) gives "
            f"{n_batches * n_rounds} timed calls per model, too few for a time "
            f"with its spread; at least {MIN_TIMED_CALLS} (--batches, --repeats)"
        )
    loaded.recipe.runtime = RuntimeConfig(
        **{
            **rt.model_dump(),
            "batches": n_batches,
            "repeats": n_rounds,
            **({"warmup": warmup} if warmup is not None else {}),
        }
    )
    if not loaded.recipe.evaluation.perplexity:
        raise RecipeError(
            f"{recipe}: bench times the batches of evaluation.perplexity[0], "
            "and the recipe has no evaluation.perplexity entry; add one"
        )
    out_dir = Path(output or f"{loaded.recipe.output_dir()}-bench")
    loaded.recipe.output.dir = str(out_dir)  # validated (and recorded) where bench writes
    plan = run_validate(loaded)
    result = run_plan(plan, out_dir, evaluate=False)
    _print_summary(result, out_dir)


def _print_generation(gen: dict, result: dict) -> None:
    def spread(values: list[float]) -> str:
        return f"{min(values):.3f}-{max(values):.3f} s"

    lines = [
        f"{result['method']} (ratio {result['ratio']:g}): greedy generation, "
        f"{gen['batch']} prompts ({gen['prompt_tokens']} tokens), "
        f"{gen['max_new_tokens']} new tokens each, median of {gen['rounds']}"
    ]
    for name in ("dense", "pruned"):
        g = gen[name]
        lines.append(
            f"  {name:<6} prefill {g['prefill_s']:.3f} s ({spread(g['prefill_s_all'])}, "
            f"{g['prefill_tokens_per_s']:.0f} tok/s), decode {g['decode_s']:.3f} s "
            f"({spread(g['decode_s_all'])}, {g['decode_tokens_per_s']:.1f} tok/s)"
        )
    lines.append(
        f"  speed-up: prefill {gen['prefill_speedup']:.2f}x, decode "
        f"{gen['decode_speedup']:.2f}x (bytes limit {gen['decode_bytes_limit']:.2f}x)"
        + ("" if gen["interleaved"] else " (dense timed before pruning)")
    )
    step = gen["pruned"]["step"]
    lines.append(
        f"  a decoding step reads {step['weight_bytes'] / 2**20:.1f} MiB of weights "
        f"(dense {gen['dense']['step']['weight_bytes'] / 2**20:.1f}) and "
        f"{step['kv_bytes'] / 2**20:.1f} MiB of KV cache; gathered weights held for "
        f"the continuation: {step['held_weight_bytes'] / 2**20:.1f} MiB"
    )
    typer.echo("\n".join(lines))


@app.command("generate")
def generate_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    prompt: PromptOption = None,
    max_new_tokens: MaxNewTokensOption = 32,
    set_: SetOption = None,
    quiet: QuietOption = False,
) -> None:
    """Prune as the recipe says, then continue each --prompt greedily (batched, left-padded).

    A dynamic method decides its kept sets on the prompts (per prompt where it decides per
    sequence) and every decoding step reuses them. Nothing is written.
    """
    import torch

    from prunekit.data import sequence_bos
    from prunekit.errors import RecipeError
    from prunekit.evaluation.generation import left_padded
    from prunekit.evaluation.zeroshot import _pad_id
    from prunekit.plan import model_context
    from prunekit.runner import prepare

    _quiet(quiet)
    if not prompt:
        raise RecipeError("generate needs at least one --prompt TEXT")
    check_user_overrides(set_ or ())
    prepared = prepare(recipe, set_ or ())
    tokenizer, model = prepared.tokenizer, prepared.model
    if tokenizer is None:
        raise RecipeError(f"{recipe}: the model has no tokenizer, so prompts cannot be encoded")
    bos = sequence_bos("auto", prepared.loaded.adapter, tokenizer)
    ids, mask = left_padded(tokenizer, prompt, bos)
    context = model_context(getattr(model, "config", None))
    if context is not None and ids.shape[1] + max_new_tokens > context:
        raise RecipeError(
            f"the longest prompt ({ids.shape[1]} tokens) plus --max-new-tokens "
            f"{max_new_tokens} is {ids.shape[1] + max_new_tokens} tokens, past "
            f"the model's context ({context} positions); shorten the prompt or "
            f"lower --max-new-tokens"
        )
    from prunekit.devices import input_device

    device = input_device(model)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=_pad_id(tokenizer),
        )
    for text, row in zip(prompt, out[:, ids.shape[1] :], strict=True):
        typer.echo(f"> {text}\n{tokenizer.decode(row, skip_special_tokens=True)}\n")


@app.command()
def sweep(
    recipe: Annotated[
        Path | None,
        typer.Argument(help="Recipe YAML file (its sweep: section, if any, is the default grid)."),
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            "-g",
            help="A grid axis: --grid method.ratio=0.2,0.4 (repeatable; "
            "the cells are the product of every axis).",
        ),
    ] = None,
    seeds: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Seeds per cell: seed, seed+1, ... (mean and spread over them in the table).",
        ),
    ] = None,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", min=1, help="Cells at once (local executor).")
    ] = None,
    executor: Annotated[
        str | None,
        typer.Option(
            help="Where the cells run: local, submitit, or a plugin's "
            "executor (prunekit components executor)."
        ),
    ] = None,
    executor_option: Annotated[
        list[str] | None,
        typer.Option(
            "--executor-option",
            "-x",
            help="An option of the executor: -x "
            "partition=gpu, -x cluster=local, -x sbatch={account: me} (repeatable).",
        ),
    ] = None,
    partition: Annotated[str | None, typer.Option(help="submitit: Slurm partition.")] = None,
    gpus_per_cell: Annotated[
        int | None, typer.Option(min=0, help="submitit: GPUs per cell.")
    ] = None,
    cpus_per_cell: Annotated[
        int | None, typer.Option(min=1, help="submitit: CPUs per cell.")
    ] = None,
    mem_gb: Annotated[float | None, typer.Option(help="submitit: memory per cell (GB).")] = None,
    time_min: Annotated[
        int | None, typer.Option(min=1, help="submitit: time limit per cell (minutes).")
    ] = None,
    sbatch: Annotated[
        list[str] | None,
        typer.Option(
            "--sbatch",
            help="submitit: an extra #SBATCH option, --sbatch account=myproj (repeatable).",
        ),
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            "-m",
            help="A results.json value to tabulate: wikitext2-test.ppl, "
            "reduction.flops_kept_fraction, runtime.speedup (repeatable).",
        ),
    ] = None,
    set_: SetOption = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Sweep directory (overrides sweep.dir; default runs/sweep-<recipe name>).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Run finished cells again.")] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the cells and the executor's job settings (array size, resources, "
            "sbatch parameters) and write nothing.",
        ),
    ] = False,
    detach: Annotated[
        bool,
        typer.Option("--detach", help="Submit and return (submitit); collect later with --status."),
    ] = False,
    status: Annotated[
        Path | None,
        typer.Option(
            "--status", help="Report on a sweep directory and rewrite its table, running nothing."
        ),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Run a recipe over a grid: each cell a full apply in its own process and directory.

    Finished cells are skipped when the sweep is run again; a failing cell is recorded with
    its error while the others run. Writes table.md and table.csv (mean and spread over
    seeds) and plot.png into the sweep directory. Exit status 1 when a cell failed.
    """
    from prunekit.errors import RecipeError
    from prunekit.recipe import parse_override
    from prunekit.sweep import SweepFailed, collect, resolve_sweep, run_sweep
    from prunekit.sweep import dry_run as dry_run_sweep

    _quiet(quiet)
    if status is not None:
        if recipe is not None:
            raise RecipeError("--status DIR reports on a sweep directory; give no recipe with it")
        _print_sweep(collect(status))
        return
    if recipe is None:
        raise RecipeError("sweep needs a RECIPE (or --status DIR)")
    options: dict = {}
    for expr in executor_option or ():
        path, value = parse_override(expr)
        if len(path) != 1:
            raise RecipeError(f"--executor-option {expr}: expected NAME=VALUE")
        options[path[0]] = value
    flags = {
        "jobs": jobs,
        "partition": partition,
        "gpus_per_cell": gpus_per_cell,
        "cpus_per_cell": cpus_per_cell,
        "mem_gb": mem_gb,
        "time_min": time_min,
    }
    options.update({k: v for k, v in flags.items() if v is not None})
    for expr in sbatch or ():
        key, eq, value = expr.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"--sbatch {expr}: expected OPTION=VALUE, e.g. --sbatch qos=high")
        options.setdefault("sbatch", {})[key.strip()] = value.strip()
    check_user_overrides(set_ or ())
    resolved = resolve_sweep(
        recipe, set_ or (), grid or (), seeds, metric or (), output, executor, options
    )
    if dry_run:
        _print_dry_run(dry_run_sweep(resolved))
        return
    report = None if quiet else typer.echo
    summary = run_sweep(resolved, force=force, wait=not detach, report=report)
    if detach:
        typer.echo(f"submitted; collect with: prunekit sweep --status {resolved.dir}")
        return
    _print_sweep(summary)
    failed = summary["states"]["failed"]
    if failed:
        raise SweepFailed(
            f"{failed} of {summary['cells']} cells failed (the others finished); "
            f"their errors are in {Path(summary['dir']) / 'table.md'}"
        )


def _print_dry_run(plan: dict) -> None:
    """``prunekit sweep --dry-run``: the cells and the submission, as JSON-like lines."""
    typer.echo(f"sweep {plan['dir']} (dry run: nothing written, nothing submitted)")
    for cell in plan["cells"]:
        labels = ", ".join(f"{k}={v}" for k, v in cell["labels"].items()) or "the recipe"
        state = (
            f"invalid: {cell['invalid']}"
            if "invalid" in cell
            else ("finished" if cell["finished"] else "to run")
        )
        typer.echo(f"  cell {cell['key']} ({labels}, seed {cell['seed']}): {state}")
    typer.echo(f"{plan['to_run']} cell(s) to run; executor: " + json.dumps(plan["executor"]))


def _print_sweep(summary: dict) -> None:
    from prunekit.sweep import markdown_table

    typer.echo(markdown_table(summary).rstrip())
    where = Path(summary["dir"])
    files = ["table.md", "table.csv", *(["plot.png"] if summary.get("plot") else [])]
    typer.echo("  written: " + ", ".join(str(where / f) for f in files))


@app.command("export")
def export_cmd(
    source: Annotated[
        Path,
        typer.Argument(
            help="A run directory written with output.save_model: true, or its model directory."
        ),
    ],
    to: Annotated[str, typer.Option("--to", help="The format: gguf (llama.cpp).")] = "gguf",
    type_: Annotated[
        str,
        typer.Option("--type", help="Tensor type: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0."),
    ] = "f16",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="The file to write (default: beside the model directory)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    tokenizer_from: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer-from",
            help="A GGUF file whose tokenizer the export carries (default: "
            "the GGUF the dense model came from, else the model's Hugging Face tokenizer).",
        ),
    ] = None,
    vocab: Annotated[
        str, typer.Option("--vocab", help="auto, or none: no tokenizer (a file read by token ids).")
    ] = "auto",
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Run the file in llama.cpp and compare logits, perplexity and greedy "
            "tokens with the model's own (needs llama-cpp-python).",
        ),
    ] = False,
    check_windows: Annotated[
        int, typer.Option("--check-windows", min=1, help="Windows compared by --check.")
    ] = 4,
    check_tokens: Annotated[
        int, typer.Option("--check-tokens", min=2, help="Tokens per window compared by --check.")
    ] = 128,
    quiet: QuietOption = False,
) -> None:
    """Export a saved (statically pruned) model to a serving engine's format: GGUF for
    llama.cpp, per-layer shapes through its deci architecture, quantized with the gguf
    package. Nothing is written when it fails."""
    from prunekit.export import export

    _quiet(quiet)
    report = export(
        source,
        to,
        type_,
        output,
        force=force,
        tokenizer_from=tokenizer_from,
        vocab=vocab,
        check=check,
        check_windows=check_windows,
        check_tokens=check_tokens,
    )
    types = ", ".join(f"{n} {k}" for k, n in report["tensor_types"].items())
    lines = [
        f"{report['path']}: {report['arch']} ({report['type']}), "
        f"{report['bytes'] / 2**20:.1f} MiB, tensors {types}; tokenizer: {report['tokenizer']}"
    ]
    if report["f16_fallback"]:
        lines.append(
            f"  {len(report['f16_fallback'])} matrices kept in F16 (their rows are "
            f"not a multiple of the {report['type']} block): "
            f"{', '.join(report['f16_fallback'][:4])}"
            + (" ..." if len(report["f16_fallback"]) > 4 else "")
        )
    if report["legalization"]:
        lg = report["legalization"]
        lines.append(
            f"  legalized for llama.cpp, exactly: {lg['padded_query_heads']} zero query "
            f"heads padding uneven GQA groups, {lg['dropped_kv_heads']} unused K/V heads "
            f"dropped, {lg['extra_parameters']} extra parameters"
        )
    c = report.get("check")
    if c:
        lines.append(
            f"  llama.cpp check on {c['windows']}: max |logit difference| "
            f"{c['max_abs_logit_diff']:.2e}; perplexity {c['ppl_llamacpp']:.4f} vs "
            f"prunekit {c['ppl_prunekit']:.4f} ({100 * c['ppl_rel_diff']:+.3f}%); "
            f"greedy tokens {'the same' if c['greedy_same'] else 'DIFFER'} "
            f"({c['greedy_tokens']} tokens)"
        )
    typer.echo("\n".join(lines))


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    quiet: QuietOption = False,
) -> None:
    """Check a recipe (keys, types, method, components, model, data files) without running."""
    from prunekit.runner import validate as run_validate

    _quiet(quiet)
    check_user_overrides(set_ or ())
    # validate checks what holds anywhere; the host's devices and disk are checked where the
    # recipe runs (a recipe is often written on a laptop for a GPU node)
    plan = run_validate(recipe, set_ or (), here=False)
    r = plan.recipe

    def budget(m) -> str:
        if m.target:
            return ", ".join(f"target {k} {v:g}" for k, v in m.target.items())
        return f"ratio {m.ratio:g}"

    methods, m = [], r.method
    while m is not None:  # method.then stages: "attn-drop (target macs 0.9), then wanda-sp (...)"
        methods.append(f"{m.name} ({budget(m)})")
        m = m.then
    parts = [f"{recipe}: valid", "method " + ", then ".join(methods)]
    from prunekit.loading import locate_model, peek_config

    if locate_model(r.model.id)["source"] == "hub":
        cached = peek_config(r.model.id) is not None
        parts.append(
            f"model.id {r.model.id!r} is a Hugging Face hub id: "
            + (
                "its cached config was checked; the download itself is not checked"
                if cached
                else "not checked offline (not in the local hub cache; "
                "it is downloaded when the run starts)"
            )
        )
    if plan.component_info:
        parts.append(
            "components " + ", ".join(f"{k}={v['name']}" for k, v in plan.component_info.items())
        )
    if r.recovery is not None:
        rec = r.recovery
        where = plan.recovery_source.describe() if plan.recovery_source else rec.path or rec.dataset
        parts.append(f"recovery: {rec.steps} steps of LoRA rank {rec.rank} on {where}, merged")
    typer.echo("; ".join(parts))
    for note in plan.elsewhere:
        typer.echo(f"not checked on this machine: {note}")


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the plugins, their versions, what they register, and load errors."""
    from prunekit.plugins import get_plugin_manager
    from prunekit.registry import get_registry

    pm = get_plugin_manager()
    registry = get_registry(pm)
    rows = []
    for name, plugin_info in sorted(pm.infos.items()):
        row = plugin_info.as_dict()
        row["kinds"] = [k.name for k in registry.kinds.values() if k.plugin == name]
        row["components"] = [f"{e.kind}:{e.name}" for e in registry if e.plugin == name]
        rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        tag = " [built-in]" if row["builtin"] else ""
        version = f" {row['version']}" if row["version"] else ""
        typer.echo(f"{row['name']}{tag} ({row['distribution'] or row['module']}{version})")
        if row["error"]:
            typer.echo(f"    FAILED TO LOAD: {row['error']}")
        for kind in row["kinds"]:
            typer.echo(f"    declares kind {kind}")
        for comp in row["components"]:
            typer.echo(f"    {comp}")


@app.command()
def components(
    kind: Annotated[
        str | None, typer.Argument(help="Only this kind (method, metric, ...).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    kinds: Annotated[
        bool,
        typer.Option(
            "--kinds",
            help="List the component kinds instead (who declared each, its protocol and default).",
        ),
    ] = False,
) -> None:
    """List the registered components (with their plugin and options)."""
    from prunekit.errors import RecipeError, did_you_mean
    from prunekit.registry import get_registry

    registry = get_registry()
    if kinds:
        rows = [k.as_dict() for k in registry.kinds.values()]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        for r in rows:
            by = f"plugin {r['plugin']}" if r["plugin"] else "prunekit"
            extra = "".join(f", {k} {r[k]}" for k in ("protocol", "default") if r[k])
            typer.echo(
                f"{r['kind']:<12} [{by}{', slot' if r['slot'] else ''}{extra}] {r['description']}"
            )
        return
    if kind is not None and kind not in registry.kinds:
        names = list(registry.kinds)
        raise RecipeError(
            f"unknown kind {kind!r}{did_you_mean(kind, names)}; kinds: {', '.join(names)}"
        )
    entries = [e for e in registry if kind is None or e.kind == kind]
    if as_json:
        typer.echo(json.dumps([e.as_dict() for e in entries], indent=2, default=str))
        return
    for e in entries:
        opts = ", ".join(f"{k}={v!r}" for k, v in e.as_dict()["options"].items())
        typer.echo(
            f"{e.kind:<12} {e.name:<18} [{e.plugin}] {e.description}"
            + (f"\n{'':<32}options: {opts}" if opts else "")
        )


def _own_code() -> tuple[str, ...]:
    """The folders of prunekit's own code: the package and its built-in plugins."""
    import importlib.util

    spec = importlib.util.find_spec("prunekit_plugins")
    folders = [Path(__file__).resolve().parent]
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p).resolve() for p in spec.submodule_search_locations]
    return tuple(str(f) + os.sep for f in folders)


def _warning_printer(previous):
    """``warnings.showwarning`` for the command line: a warning raised from prunekit's own code
    is a message to the user, printed as ``warning: ...`` like errors are, without the file,
    line and source line Python adds; any other warning (torch, transformers, a third-party
    plugin) is shown as ``previous`` shows it."""

    own = _own_code()

    def show(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(own):
            print(f"warning: {message}", file=file or sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the app, turning user errors into exit status 2, Ctrl-C into
    130 and SIGTERM into 143, in each case after the run has removed its partial outputs."""
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(warnings.showwarning)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        with sigterm_as_exception():
            # typer turns Ctrl-C into Exit(130) and, outside standalone mode, returns the code
            code = app(args=argv, standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            return code
    except PrunekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (the run's partial outputs were removed)", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated by SIGTERM (the run's partial outputs were removed)", file=sys.stderr)
        return 143
    except Exception as exc:  # click usage errors, a full disk outside any plugin's code
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return 2
        reason = storage_failure(exc)
        if reason is not None:
            print(f"error: {storage_error(reason, 'the run')}", file=sys.stderr)
            return StorageError.exit_code
        raise
    return 0


def _console() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _console()
