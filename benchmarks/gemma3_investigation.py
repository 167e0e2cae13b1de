"""Why PP loses to Wanda-sp on Gemma-3-270M at ratio 0.4 (issue 31, section 3): measurements.

Three parts, on the committed table's protocol (20 random WikiText-2 test windows of 256
tokens, seed 0, batch 20, every window starting with BOS; calibration 64 C4 windows of 256;
layers 0-2 skipped):

1. **What the methods see** (dense model, forward hooks): per pruned layer, the residual norm
   of the BOS position against the median of the other positions (what PP's probe ranks on),
   and the share of the squared activations entering ``o_proj`` and ``down_proj`` that sit at
   position 0 (what every squared-activation statistic sums), on the evaluation batch and on
   the calibration windows. Also the kept counts per layer that ``ratio`` gives.
2. **One component swapped at a time** from ``pp`` (and from ``pp-calib``, ``wanda-sp``,
   ``flap``): perplexity of each variant, so that the gap is attributed to a component
   (probe ranking, fusion, metric, history; FLAP's compensation and allocation).
3. **Which group loses**: every method's kept sets recorded, then applied statically to one
   group only (the other dense): perplexity of attention-only and MLP-only pruning, per
   method, plus how often two methods drop the same head.

    python benchmarks/gemma3_investigation.py            # ~40 min on 2 cores
    python benchmarks/gemma3_investigation.py --quick    # smoke test, not a result

Writes benchmarks/results/gemma3_investigation.json; the findings are written up by hand in
benchmarks/methods_gemma3.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.components import ATTN, MLP
from prunekit.data import calibration_windows, eval_windows, locate_corpus, sequence_bos
from prunekit.evaluation.perplexity import perplexity
from prunekit.loading import load_model
from prunekit.pruning import allocation as allocation_module
from prunekit.registry import resolve_adapter

HERE = Path(__file__).resolve().parent

#: (name, method, method keys): one component changed per row against its base method
VARIANTS = [
    ("pp", "pp", {}),
    ("pp, probe ranked on the normalised input", "pp", {"probe": {"rank_on": "normalized"}}),
    ("pp, whole batch as probe (with history)", "pp", {"probe": {"name": "full_batch"}}),
    ("pp, probe only (no history)", "pp", {"fusion": {"name": "probe_only"}}),
    ("pp, history only at the probe positions", "pp", {"fusion": {"name": "history_only"}}),
    ("pp, Wanda-sp metric", "pp", {"metric": {"name": "wanda_sp"}}),
    ("pp, head score summed", "pp", {"metric": {"name": "pp_score", "heads": "sum"}}),
    ("pp, random probe", "pp", {"probe": {"name": "random"}}),
    ("pp-fullbatch", "pp-fullbatch", {}),
    ("pp-fullbatch, Wanda-sp metric", "pp-fullbatch", {"metric": {"name": "wanda_sp"}}),
    ("pp-calib", "pp-calib", {}),
    ("pp-calib, Wanda-sp metric", "pp-calib", {"metric": {"name": "wanda_sp"}}),
    ("pp-calib, head score summed", "pp-calib", {"metric": {"name": "pp_score", "heads": "sum"}}),
    ("wanda-sp", "wanda-sp", {}),
    ("wanda-sp, PP metric", "wanda-sp", {"metric": {"name": "pp_score"}}),
    ("flap", "flap", {}),
    ("flap, no bias compensation", "flap", {"compensator": {"name": "none"}}),
    ("flap, uniform allocation", "flap", {"allocator": {"name": "uniform"}}),
    (
        "flap, uniform allocation, no compensation",
        "flap",
        {"allocator": {"name": "uniform"}, "compensator": {"name": "none"}},
    ),
]
#: methods whose kept sets part 3 applies one group at a time
DECOMPOSE = ["pp", "pp-fullbatch", "pp-calib", "wanda-sp", "flap"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- part 1: what the methods see --------------------------------------------------------------
def activation_profile(model, adapter, windows: torch.Tensor, batch_size: int) -> dict:
    """Per layer: BOS residual norm / median residual norm of the other positions (layer
    input), and the share of Σ x² at position 0 in the inputs of o_proj and down_proj."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    norms: dict[int, list[float]] = {}
    hooks = []

    def energy(key):
        def hook(_module, args):
            x = args[0].detach().float().square().sum(-1)  # [B, T]: Σ over channels
            total = sums.setdefault(key, torch.zeros(2))
            total += torch.stack([x[:, 0].sum(), x.sum()])

        return hook

    def residual(index):
        def hook(_module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).detach().float()
            n = h.norm(dim=-1)  # [B, T]
            norms.setdefault(index, []).append(float(n[:, 0].mean() / n[:, 1:].median()))

        return hook

    for layer in adapter.layers():
        hooks.append(
            layer.output_projection(ATTN).register_forward_pre_hook(energy((layer.index, ATTN)))
        )
        hooks.append(
            layer.output_projection(MLP).register_forward_pre_hook(energy((layer.index, MLP)))
        )
        hooks.append(
            layer.module.register_forward_pre_hook(residual(layer.index), with_kwargs=True)
        )
    try:
        with torch.no_grad():
            for batch in torch.split(windows, batch_size):
                model(input_ids=batch)
    finally:
        for h in hooks:
            h.remove()
    return {
        layer.index: {
            "bos_residual_norm_over_median": sum(norms[layer.index]) / len(norms[layer.index]),
            "o_proj_input_energy_at_bos": float(
                sums[(layer.index, ATTN)][0] / sums[(layer.index, ATTN)][1]
            ),
            "down_proj_input_energy_at_bos": float(
                sums[(layer.index, MLP)][0] / sums[(layer.index, MLP)][1]
            ),
        }
        for layer in adapter.layers()
    }


# -- recording kept sets -----------------------------------------------------------------------
@contextlib.contextmanager
def recording(kept: dict):
    """Record the kept units of every decision: PP's per-batch decisions (the last batch's
    win) and the static allocators' (uniform, FLAP's global)."""
    from prunekit_plugins import flap
    from prunekit_plugins.pp import method as pp_method

    originals = {}

    def wrap_decide(cls):
        original = cls.decide

        def decide(self, layer, group, x, residual, batch):
            out = original(self, layer, group, x, residual, batch)
            if out is not None:
                kept[(layer.index, group)] = out.detach().cpu().sort().values
            return out

        originals[(cls, "decide")] = original
        cls.decide = decide

    def wrap_allocate(cls):
        original = cls.__call__

        def call(self, *args, **kwargs):
            allocation = original(self, *args, **kwargs)
            kept.update({k: v.detach().cpu().sort().values for k, v in allocation.kept.items()})
            return allocation

        originals[(cls, "__call__")] = original
        cls.__call__ = call

    wrap_decide(pp_method.PPController)
    wrap_allocate(allocation_module.Uniform)
    wrap_allocate(flap.FlapGlobal)
    try:
        yield kept
    finally:
        for (cls, attr), original in originals.items():
            setattr(cls, attr, original)


def apply_group(model, kept: dict, group: str) -> None:
    """Slice ``model`` statically to the recorded kept units of ``group`` only."""
    adapter = resolve_adapter(model)
    for layer in adapter.layers():
        units = kept.get((layer.index, group))
        if units is None:
            continue
        if group == ATTN:
            layer.slice(units, None)
        else:
            layer.slice(None, units)


# -- part 1b: how each metric aggregates a head -------------------------------------------------
def head_score_profile(model_id: str, samples: int, seq_len: int, seed: int) -> dict:
    """Per pruned layer (3 and up), on the calibration statistics ``S_j = Σ_t E[x_tj²]`` of the
    attention output projection's input: how concentrated each metric's head score is (the
    share of a head's score that its top 1% of channels carry: PP's ``‖S_j c_j‖₂`` with
    ``c_j = sqrt(Σ_i W_ij⁴)``, squared as the L2 adds them; Wanda-sp's ``Σ_j sqrt(S_j) Σ_i
    |W_ij|``), the share of ``S`` at position 0, and the head each metric would drop first."""
    loaded = load_model(model_id, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = resolve_adapter(model)
    bos_id = sequence_bos("auto", adapter, tokenizer)
    calib = calibration_windows(
        tokenizer, locate_corpus("c4", "train"), samples, seq_len, seed=seed, bos_id=bos_id
    )
    sums: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in adapter.layers():

        def hook(_module, args, index=layer.index):
            x = args[0].detach().float().square().sum(0)  # [T, D]
            sums[index] = sums.get(index, 0) + x

        hooks.append(layer.output_projection(ATTN).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in torch.split(calib, 16):
                model(input_ids=batch)
    finally:
        for h in hooks:
            h.remove()
    rows = {}
    for layer in adapter.layers()[3:]:
        H = sums[layer.index] / calib.shape[0]  # [T, D]: mean of squares per position
        S = H.sum(0)
        W = layer.output_projection(ATTN).weight.detach().float()
        width = layer.unit_width(ATTN)
        top = max(1, width // 100)
        pp = (S * W.pow(4).sum(0).sqrt()).view(-1, width).square()  # L2 adds squares
        wanda = (S.sqrt() * W.abs().sum(0)).view(-1, width)
        rows[str(layer.index)] = {
            "pp_top1pct_share": [
                round(float(v), 3) for v in pp.topk(top, dim=1).values.sum(1) / pp.sum(1)
            ],
            "wanda_top1pct_share": [
                round(float(v), 3) for v in wanda.topk(top, dim=1).values.sum(1) / wanda.sum(1)
            ],
            "S_share_at_position_0": float(H[0].sum() / H.sum()),
            "pp_drops_head": int(pp.sum(1).argmin()),
            "wanda_drops_head": int(wanda.sum(1).argmin()),
        }
    del model
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run")
    parser.add_argument("--quick", action="store_true", help="smoke test, not a result")
    parser.add_argument(
        "--head-scores",
        nargs="+",
        default=None,
        metavar="MODEL",
        help="only part 1b, on these models: writes results/gemma3_head_scores.json",
    )
    args = parser.parse_args()
    if args.head_scores:
        out = HERE / "results" / "gemma3_head_scores.json"
        report = {
            "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
            "calibration": f"{args.calibration_samples} C4 windows of {args.seq_len}, seed {args.seed}",
            **{
                m: head_score_profile(m, args.calibration_samples, args.seq_len, args.seed)
                for m in args.head_scores
            },
        }
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return
    if args.quick:
        args.windows, args.calibration_samples = 4, 32
    batch_size = args.windows  # one batch: the paper's batch of 20
    calibration = {
        "dataset": "c4",
        "samples": args.calibration_samples,
        "seq_len": args.seq_len,
        "batch_size": 16,
    }
    started = time.perf_counter()
    loaded = load_model(args.model, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = resolve_adapter(model)
    bos_id = sequence_bos("auto", adapter, tokenizer)
    windows = eval_windows(
        tokenizer,
        locate_corpus("wikitext2", "test"),
        args.seq_len,
        args.windows,
        "random",
        seed=args.seed,
        batch_size=batch_size,
        bos_id=bos_id,
    )
    calib = calibration_windows(
        tokenizer,
        locate_corpus("c4", "train"),
        args.calibration_samples,
        args.seq_len,
        seed=args.seed,
        bos_id=bos_id,
    )
    report: dict = {
        "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
        "model": loaded.info["name"],
        "ratio": args.ratio,
        "windows": int(windows.shape[0]),
        "seq_len": args.seq_len,
        "calibration": calibration,
        "seed": args.seed,
    }
    dense_ppl = perplexity(model, windows, batch_size, description="dense")["ppl"]
    report["dense_ppl"] = dense_ppl
    log(f"dense {dense_ppl:.3f}")

    profile_eval = activation_profile(model, adapter, windows, batch_size)
    profile_calib = activation_profile(model, adapter, calib, 16)
    report["profile"] = {
        str(i): {
            **{f"eval_{k}": v for k, v in profile_eval[i].items()},
            **{f"calibration_{k}": v for k, v in profile_calib[i].items()},
        }
        for i in profile_eval
    }
    settings_counts = {}
    variants = [v for v in VARIANTS if args.only is None or v[0] in args.only]
    rows, kept_sets = [], {}
    for name, method, keys in variants:
        fresh = load_model(args.model, dtype="float32").model
        kept: dict = {}
        with recording(kept):
            torch.manual_seed(args.seed)
            outcome = prunekit.prune(
                fresh,
                tokenizer,
                method=method,
                ratio=args.ratio,
                calibration=calibration,
                seed=args.seed,
                **keys,
            )
            ppl = perplexity(outcome.model, windows, batch_size, description=name)["ppl"]
        rows.append({"variant": name, "method": method, "keys": keys, "ppl": ppl})
        if not settings_counts and outcome.structure:
            settings_counts = {str(r["layer"]): r for r in outcome.structure}
        if name in DECOMPOSE:
            kept_sets[name] = kept
        log(f"{name}: {ppl:.3f}")
        del outcome, fresh
        gc.collect()
    report["kept_counts"] = settings_counts
    report["variants"] = rows

    decomposition = []
    for name, kept in kept_sets.items():
        row = {"method": name}
        for group in (ATTN, MLP):
            fresh = load_model(args.model, dtype="float32").model
            apply_group(fresh, kept, group)
            row[f"{group}_only_ppl"] = perplexity(fresh, windows, batch_size, description=group)[
                "ppl"
            ]
            del fresh
            gc.collect()
        row["dropped_heads"] = {
            str(i): sorted(set(range(adapter.layers()[i].num_heads)) - set(v.tolist()))
            for (i, g), v in kept.items()
            if g == ATTN
        }
        decomposition.append(row)
        log(
            f"{name}: attention only {row['attn_only_ppl']:.3f}, MLP only {row['mlp_only_ppl']:.3f}"
        )
    report["one_group_at_a_time"] = decomposition
    agreement = {}
    names = list(kept_sets)
    for a in names:
        for b in names:
            if a < b:
                same = [
                    kept_sets[a].get((i, ATTN)) is not None
                    and kept_sets[b].get((i, ATTN)) is not None
                    and torch.equal(kept_sets[a][(i, ATTN)], kept_sets[b][(i, ATTN)])
                    for i in range(adapter.num_layers)
                    if (i, ATTN) in kept_sets[a]
                ]
                agreement[f"{a} | {b}"] = f"{sum(same)} of {len(same)} layers"
    report["same_heads_kept"] = agreement
    report["seconds"] = time.perf_counter() - started
    suffix = "_quick" if args.quick else ""
    out = HERE / "results" / f"gemma3_investigation{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.only is not None and out.is_file():  # more variants for the same report
        previous = json.loads(out.read_text())
        names = {r["variant"] for r in rows}
        previous["variants"] = [r for r in previous["variants"] if r["variant"] not in names]
        previous["variants"] += [{**r, "command": report["command"]} for r in rows]
        report = previous
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
