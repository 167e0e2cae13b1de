"""Probe Pruning's runtime on a LLaMA-2-7B-shaped model with random weights (GPU).

Models, all on the device in the target dtype (fp16 by default) and timed in one
``time_interleaved`` call on the same random batches (20 x 1024 by default, the paper's): the
dense model (timed once for the whole table), ``pp`` at each ratio (0.2, 0.4) and, per ratio, a
static model physically sliced to pp's kept counts per layer (the same shapes, kept sets chosen
once). Each ``pp`` model and each static model is built on a structural copy of the dense model
that shares its parameter tensors (only sliced weights are new), so the weights are held once.

Per model: median seconds per batch, speed-up over dense with its paired spread, the limit the
kept FLOPs of the whole forward put on it (``1 / forward_flops_kept_fraction``, LM head
included), pp's own phases per batch (probe, score, gather, history) and, on CUDA, the peak
allocated memory during its calls. Blocks: for one middle decoder layer, its attention block
and its MLP block on the hidden state captured at that layer's input, dense vs run on
gathered kept weights vs pp's whole per-block work (probe, score, gather, run, history update),
with the block's FLOP limit. Weights are random (``initializer_range`` 0.02) and so is the
calibration (random token ids): the runtimes are those of the real shapes, the kept sets mean
nothing. The timed forwards build no KV cache (``use_cache`` off), as in perplexity evaluation.

    python benchmarks/gpu_runtime.py                         # the run to commit (one big GPU)
    python benchmarks/gpu_runtime.py --dtype bfloat16        # bf16 instead of fp16
    python benchmarks/gpu_runtime.py --layers 16             # a GPU with less memory
    python benchmarks/gpu_runtime.py --tiny                  # tiny float32 model on CPU, seconds
    python benchmarks/gpu_runtime.py --tiny --device cuda    # the same, as a smoke test on CUDA

Memory: the 32-layer fp16 model is 13.5 GB; with both static copies, two pp models' state
(their per-position calibration history, kept for every block) and a batch's activations the
run needs about 50 GB. ``--layers N`` builds fewer layers for smaller GPUs.

Writes benchmarks/results/gpu_runtime.json and benchmarks/gpu_runtime.md; with ``--tiny``
both go to ``--output`` (default benchmarks/results/) as gpu_runtime_tiny.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

import prunekit
from prunekit.components import ATTN, MLP
from prunekit.evaluation.costs import head_macs, structure_reduction
from prunekit.evaluation.runtime import (
    Contender,
    describe_speedup,
    memory_info,
    paired_speedups,
    phase_medians,
    summarize,
    time_interleaved,
)
from prunekit.pruning.dynamic import BatchState
from prunekit.pruning.static import same_shape
from prunekit.registry import resolve_adapter

HERE = Path(__file__).resolve().parent
#: LLaMA-2-7B's shape (meta-llama/Llama-2-7b-hf config.json)
LLAMA2_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
#: ``--tiny``: seconds on a CPU
TINY = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
#: timed calls of each block per round (a block is much shorter than a forward)
BLOCK_CALLS = 10
GB = 1024**3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_model(shape: dict, layers: int, device: torch.device, dtype: torch.dtype, seed: int):
    """A random ``LlamaForCausalLM`` created directly on ``device`` in ``dtype`` (no fp32 copy
    on the CPU), with ``use_cache`` off."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{**shape, "num_hidden_layers": layers}, use_cache=False, tie_word_embeddings=False
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def shared_clone(model):
    """A copy of ``model``'s modules holding the *same* parameter and buffer tensors: a
    second module tree to wrap (pp) or to slice (static) without a second copy of the weights.
    Slicing replaces modules of the copy and never writes into the shared tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def static_like(clone, structure):
    """``clone`` (a copy of the dense model) physically sliced to ``structure``'s kept counts."""
    return same_shape(clone, structure)


def live_shape(model) -> list[dict]:
    """Heads and MLP channels of every layer of ``model`` as its modules are now."""
    shapes = resolve_adapter(model).layer_shapes()
    return [
        {"layer": i, "heads": h, "channels": c}
        for i, (h, c) in enumerate(
            zip(shapes["num_heads"], shapes["intermediate_size"], strict=True)
        )
    ]


def prune_pp(model, ratio: float, calibration: torch.Tensor, args):
    keys = {"skip_layers": args.skip_layers} if args.skip_layers is not None else {}
    if args.round_to is not None:
        keys["round_to"] = args.round_to
    return prunekit.prune(
        model, None, method="pp", ratio=ratio, calibration=calibration, seed=args.seed, **keys
    )


def state_bytes(pp_model) -> dict:
    """Bytes of pp's own state: its calibration history, the history policy's state (what
    ``preserved_state`` copies during timing) and the post-calibration copy of both that
    ``reset`` restores."""

    def size(obj) -> int:
        total, stack = 0, [obj]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                total += item.numel() * item.element_size()
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
        return total

    controller = pp_model.controller
    live = size(getattr(controller, "history", None)) + size(
        getattr(controller, "history_state", None)
    )
    return {"live": live, "initial_copy": size(getattr(controller, "_initial", None))}


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _free(device: torch.device) -> None:
    gc.collect()
    if _cuda(device):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


class BlockCall:
    """One block as a ``time_interleaved`` contender: ``call(input_ids=...)`` runs ``fn`` (the
    batch is ignored; the block's input was captured). ``runtime`` (a DynamicModel's) lets
    ``time_interleaved`` collect pp's phase timers, ``preserved_state`` undo its history
    updates."""

    def __init__(self, fn, device: torch.device, pp_model=None) -> None:
        self.fn = fn
        self.device = device
        if pp_model is not None:
            self.runtime = pp_model.runtime
            self.preserved_state = pp_model.preserved_state

    def __call__(self, input_ids=None, use_cache=False):
        return self.fn()


def capture_layer_input(model, index: int, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden state entering decoder layer ``index`` on ``batch`` and the keyword arguments
    the model passes that layer (position embeddings, mask...)."""
    layer = resolve_adapter(model).decoder_layers[index]
    seen: dict = {}

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        seen["h"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = kwargs

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=batch.to(_device_of(model)), use_cache=False)
    finally:
        handle.remove()
    return seen["h"], seen["kwargs"]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def block_macs(la, group: str, units: int, seq_len: int) -> float:
    """MACs per token of one block of layer ``la`` with ``units`` kept (the adapter's cost
    model is a sum of an attention and an MLP part)."""
    h = la.num_heads
    if group == ATTN:
        return la.macs_per_token(units, 0, seq_len)
    return la.macs_per_token(h, units, seq_len) - la.macs_per_token(h, 0, seq_len)


def time_blocks(
    dense_model, pp_models: dict, index: int, batch: torch.Tensor, args, device: torch.device
) -> dict:
    """Layer ``index``'s attention and MLP blocks: dense, on gathered kept weights, and pp's
    whole per-block work, timed in interleaved rounds."""
    h, kwargs = capture_layer_input(dense_model, index, batch)
    la = resolve_adapter(dense_model).layers()[index]
    bsz, seq = h.shape[:2]
    state = BatchState(
        torch.ones(bsz, seq, dtype=torch.bool, device=h.device),
        torch.arange(seq, device=h.device).expand(bsz, seq),
    )
    out = {"layer": index, "input_shape": list(h.shape)}
    residual = h
    for group in (ATTN, MLP):
        x = la.group_input(group, residual)
        full = la.gather(group, None)
        contenders = [
            Contender(
                "dense", BlockCall(lambda g=group, x=x, w=full: la.run(g, x, w, **kwargs), device)
            )
        ]
        fractions, kept_units = {}, {}
        for ratio, pp_model in pp_models.items():
            ctl = pp_model.controller
            pla = pp_model.runtime.adapter.layers()[index]
            kept = ctl.decide(pla, group, x, residual, state)  # this batch's kept set
            kept_units[ratio] = int(kept.numel()) if kept is not None else pla.units(group)
            fractions[ratio] = block_macs(la, group, kept_units[ratio], seq) / block_macs(
                la, group, la.units(group), seq
            )
            weights = pla.gather(group, kept)
            gathered = BlockCall(
                lambda g=group, x=x, w=weights, p=pla: p.run(g, x, w, **kwargs), device
            )
            whole = BlockCall(
                _pp_block(pp_model, pla, group, x, residual, state, kwargs), device, pp_model
            )
            contenders += [
                Contender(f"gathered@{ratio}", gathered),
                Contender(f"pp@{ratio}", whole),
            ]
        timed = time_interleaved(
            contenders, [batch[:1, :1]] * BLOCK_CALLS, args.rounds, args.warmup
        )
        dense_s = timed["dense"]["s_all"]
        rows = []
        for ratio in pp_models:
            for kind in ("gathered", "pp"):
                rec = timed[f"{kind}@{ratio}"]
                runtime = summarize(
                    dense_s,
                    rec["s_all"],
                    (bsz, seq),
                    phase_medians(rec["phases_s_all"]) or None,
                    args.rounds,
                    flops_kept_fraction=fractions[ratio],
                )
                rows.append(
                    {
                        "kind": kind,
                        "ratio": ratio,
                        "kept": kept_units[ratio],
                        "units": la.units(group),
                        "runtime": runtime,
                    }
                )
        out[group] = {
            "dense_ms": 1e3 * statistics.median(dense_s),
            "dense_ms_spread": [1e3 * min(dense_s), 1e3 * max(dense_s)],
            "rows": rows,
        }
        if group == ATTN:  # the MLP block's input: the residual after the dense attention
            with torch.no_grad():
                residual = la.add_output(ATTN, h, la.run(ATTN, x, full, **kwargs))
    return out


def _pp_block(pp_model, la, group, x, residual, state, kwargs):
    """What pp's runtime does for one block: decide (probe, score), gather, run, and update
    the history from the kept activations; phases on the runtime's timers."""
    rt = pp_model.runtime
    ctl, timers = rt.controller, rt.timers

    def run():
        kept = ctl.decide(la, group, x, residual, state)
        with timers("gather", x.device):
            weights = la.gather(group, kept)
        observe = rt.observes_activations and ctl.wants_activations(la, group)
        with timers("run", x.device):
            out = la.run(group, x, weights, observe=observe, **kwargs)
        if observe:
            out, act = out
            ctl.observe(la, group, kept, act, state)
        return out

    return run


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny model (4 layers, hidden 128), batch 4 x 32, float32 on CPU",
    )
    parser.add_argument("--device", default=None, help="default: cpu with --tiny, else cuda")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float16", "bfloat16", "float32"],
        help="default: float16 (float32 with --tiny)",
    )
    parser.add_argument("--layers", type=int, default=None, help="default 32 (4 with --tiny)")
    parser.add_argument("--batch", type=int, default=None, help="default 20 (4 with --tiny)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 1024 (32 with --tiny)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=2, help="timed batches per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per model")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument(
        "--calibration-samples",
        type=int,
        default=None,
        help="random calibration windows of --seq-len (default 32; 8 with --tiny)",
    )
    parser.add_argument(
        "--skip-layers",
        nargs="*",
        type=int,
        default=None,
        help="layers pp leaves dense (default: prunekit's, 0 1 2; 0 with --tiny)",
    )
    parser.add_argument(
        "--round-to",
        type=int,
        default=None,
        help="MLP channels kept in multiples of this (default: prunekit's, 64; 8 with --tiny)",
    )
    parser.add_argument(
        "--block-layer",
        type=int,
        default=None,
        help="the layer of the block timings (default: the middle one)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        type=Path,
        default=HERE / "results",
        help="directory of the JSON (and, with --tiny, of the report)",
    )
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = {
        "device": "cpu" if tiny else "cuda",
        "dtype": "float32" if tiny else "float16",
        "layers": 4 if tiny else 32,
        "batch": 4 if tiny else 20,
        "seq_len": 32 if tiny else 1024,
        "calibration_samples": 8 if tiny else 32,
        "skip_layers": [0] if tiny else None,
        "round_to": 8 if tiny else None,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def device_name(device: torch.device) -> str:
    if _cuda(device):
        return torch.cuda.get_device_name(device)
    return (
        f"CPU ({platform.machine()}, {platform.processor() or 'unknown'}), "
        f"{torch.get_num_threads()} torch threads"
    )


def run(args) -> dict:
    device = torch.device(args.device)
    if _cuda(device) and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --tiny (CPU) or --device cpu")
    if _cuda(device) and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    shape = TINY if args.tiny else LLAMA2_7B
    gen = torch.Generator().manual_seed(args.seed)
    vocab = shape["vocab_size"]
    batches = [
        torch.randint(3, vocab, (args.batch, args.seq_len), generator=gen)
        for _ in range(args.batches)
    ]
    calibration = torch.randint(3, vocab, (args.calibration_samples, args.seq_len), generator=gen)

    log(f"building the random model ({args.layers} layers, {args.dtype}) on {device}")
    dense = build_model(shape, args.layers, device, dtype, args.seed)
    adapter = resolve_adapter(dense)
    lm_head = head_macs(dense)
    n_params = sum(p.numel() for p in dense.parameters())
    check_ids = batches[0][: min(2, args.batch)].to(device)
    with torch.no_grad():
        dense_logits = dense(input_ids=check_ids).logits.float()
    checks = {"dense_logits_finite": bool(torch.isfinite(dense_logits).all())}

    log("pp at ratio 0 (every unit kept) against dense")
    zero = prune_pp(shared_clone(dense), 0.0, calibration, args)
    with torch.no_grad():
        diff = (zero.model(input_ids=check_ids).logits.float() - dense_logits).abs().max()
    checks["pp_ratio0_logits_max_abs_diff"] = float(diff)
    checks["dense_logits_max_abs"] = float(dense_logits.abs().max())
    del zero
    _free(device)

    pp_models, statics, structures, reductions = {}, {}, {}, {}
    for ratio in args.ratios:
        log(f"pp at ratio {ratio} and its same-shape static model")
        outcome = prune_pp(shared_clone(dense), ratio, calibration, args)
        pp_models[ratio] = outcome.model
        statics[ratio] = static_like(shared_clone(dense), outcome.structure)
        structures[ratio] = {
            "pp": [{k: r[k] for k in ("layer", "heads", "channels")} for r in outcome.structure],
            "static": live_shape(statics[ratio]),
        }
        structures[ratio]["static_matches_pp"] = (
            structures[ratio]["static"] == structures[ratio]["pp"]
        )
        reductions[ratio] = structure_reduction(adapter, outcome.structure, args.seq_len, lm_head)
        _free(device)
    last = pp_models[args.ratios[-1]]
    with torch.no_grad(), last.dense():
        diff = (last(input_ids=check_ids).logits.float() - dense_logits).abs().max()
    checks["pp_dense_mode_logits_max_abs_diff"] = float(diff)
    del dense_logits

    contenders = [Contender("dense", dense)]
    for ratio in args.ratios:
        contenders += [
            Contender(f"pp@{ratio}", pp_models[ratio]),
            Contender(f"static@{ratio}", statics[ratio]),
        ]
    states = {ratio: state_bytes(m) for ratio, m in pp_models.items()}
    resident = None
    if _cuda(device):  # what stays allocated while each model runs: every model, and the
        # snapshot of each pp model's state that time_interleaved keeps meanwhile
        resident = torch.cuda.memory_allocated(device) + sum(v["live"] for v in states.values())
    log(
        f"timing {len(contenders)} models: {args.batches} batch(es) of {args.batch} x "
        f"{args.seq_len}, {args.rounds} interleaved round(s) after {args.warmup} warm-up "
        "call(s)"
    )
    timed = time_interleaved(
        contenders, batches, args.rounds, args.warmup, progress=lambda r, n: log(f"  round {r}/{n}")
    )
    dense_s = timed["dense"]["s_all"]
    batch_shape = (args.batch, args.seq_len)

    def memory(name, model, state=None) -> dict:
        extra = sum(state.values()) if state else 0
        out = {"param_bytes": memory_info(model, device)["param_bytes"], "state_bytes": extra}
        peak = timed[name]["peak_allocated_bytes"]
        out["peak_allocated_bytes"] = peak
        if peak is not None:
            out["activation_peak_bytes"] = peak - resident
            out["alone_estimate_bytes"] = out["param_bytes"] + extra + peak - resident
        return out

    rows = []
    for ratio in args.ratios:
        pp_model, static = pp_models[ratio], statics[ratio]
        fraction = reductions[ratio]["forward_flops_kept_fraction"]
        pp_s, static_s = timed[f"pp@{ratio}"]["s_all"], timed[f"static@{ratio}"]["s_all"]
        pp_vs_static = paired_speedups(pp_s, static_s)  # pp / static time, per call
        rows.append(
            {
                "model": "pp",
                "ratio": ratio,
                "runtime": summarize(
                    dense_s,
                    pp_s,
                    batch_shape,
                    phase_medians(timed[f"pp@{ratio}"]["phases_s_all"]),
                    args.rounds,
                    flops_kept_fraction=fraction,
                ),
                "pp_vs_static_time": statistics.median(pp_s) / statistics.median(static_s),
                "pp_vs_static_spread": [min(pp_vs_static), max(pp_vs_static)],
                "probe_flops_fraction": pp_model.controller.probe_flops_fraction(*batch_shape),
                "memory": memory(f"pp@{ratio}", pp_model, states[ratio]),
            }
        )
        rows.append(
            {
                "model": "static",
                "ratio": ratio,
                "runtime": summarize(
                    dense_s, static_s, batch_shape, None, args.rounds, flops_kept_fraction=fraction
                ),
                "memory": memory(f"static@{ratio}", static),
            }
        )

    index = args.block_layer
    if index is None:  # the middle layer, or the first pruned one after it
        skip = set(args.skip_layers if args.skip_layers is not None else [0, 1, 2])
        index = next(
            (i for i in range(args.layers // 2, args.layers) if i not in skip), args.layers // 2
        )
    log(f"timing layer {index}'s attention and MLP blocks")
    del statics, static, contenders  # the blocks need the dense and the pp models only
    _free(device)
    blocks = time_blocks(dense, pp_models, index, batches[0], args, device)

    return {
        "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(args.argv),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": __import__("transformers").__version__,
        "prunekit": prunekit.__version__,
        "settings": {
            "tiny": args.tiny,
            "dtype": args.dtype,
            "layers": args.layers,
            "shape": {**shape, "num_hidden_layers": args.layers},
            "attn_implementation": dense.config._attn_implementation,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "batches": args.batches,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "timed_calls_per_model": args.rounds * args.batches,
            "block_calls_per_round": BLOCK_CALLS,
            "ratios": args.ratios,
            "calibration": {
                "samples": args.calibration_samples,
                "seq_len": args.seq_len,
                "data": "random token ids",
            },
            "skip_layers": args.skip_layers,
            "round_to": args.round_to,
            "seed": args.seed,
            "weights": "random (LlamaConfig initializer_range 0.02)",
            "use_cache": False,
        },
        "model": {
            "params": n_params,
            "param_bytes": memory_info(dense, device)["param_bytes"],
            "lm_head_macs_per_token": lm_head,
            "resident_bytes_before_timing": resident,
        },
        "checks": checks,
        "dense": {
            "s_per_batch": statistics.median(dense_s),
            "s_spread": [min(dense_s), max(dense_s)],
            "s_all": dense_s,
            "memory": memory("dense", dense),
        },
        "rows": rows,
        "reduction": {str(r): v for r, v in reductions.items()},
        "structures": {str(r): v for r, v in structures.items()},
        "blocks": blocks,
    }


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _gb(n) -> str:
    return "-" if n is None else f"{n / GB:.3g}"


def markdown(report: dict) -> str:
    s = report["settings"]
    sh = s["shape"]
    d = report["dense"]
    title = "tiny model, a smoke test" if s["tiny"] else "LLaMA-2-7B shape"
    lines = [
        f"# Probe Pruning runtime on {report['device_name']} ({title}, {s['dtype']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Device: {report['device_name']} (`{report['device']}`); torch {report['torch']}"
        + (f" (CUDA {report['cuda']})" if report["cuda"] else "")
        + f", transformers {report['transformers']}, prunekit {report['prunekit']}.  ",
        f"Model: `LlamaForCausalLM` with random weights, {s['layers']} layers, hidden "
        f"{sh['hidden_size']}, MLP {sh['intermediate_size']}, {sh['num_attention_heads']} heads, "
        f"vocabulary {sh['vocab_size']} ({report['model']['params'] / 1e6:,.1f} M parameters, "
        f"{_gb(report['model']['param_bytes'])} GB), attention `{s['attn_implementation']}`, "
        "no KV cache.  ",
        f"PP: `pp` at {', '.join(str(r) for r in s['ratios'])}, calibrated on "
        f"{s['calibration']['samples']} windows of {s['seq_len']} random token ids (random "
        "weights: the kept sets mean nothing, the shapes and runtimes are real); skipped layers "
        f"{s['skip_layers'] if s['skip_layers'] is not None else 'prunekit default (0, 1, 2)'}; "
        "the static model is physically sliced to pp's kept counts per layer.  ",
        f"Timing: {s['batches']} random batches of {s['batch']} x {s['seq_len']}, every model "
        f"warmed up ({s['warmup']} call), then {s['rounds']} interleaved rounds "
        f"({s['timed_calls_per_model']} timed calls per model, CUDA-synchronised on a GPU), "
        "one dense time for the whole table; speed-up = dense median / model median, spread = "
        "min-max of the per-call paired ratios; FLOP limit = 1 / (kept MACs of the whole "
        "forward, LM head included).",
        "",
        f"Checks: pp at ratio 0 vs dense logits, max abs diff "
        f"{report['checks']['pp_ratio0_logits_max_abs_diff']:.3g} (logits up to "
        f"{report['checks']['dense_logits_max_abs']:.3g}); pp's dense mode vs dense "
        f"{report['checks']['pp_dense_mode_logits_max_abs_diff']:.3g}; static kept counts = "
        "pp's in every layer: "
        + ", ".join(f"{r}: {v['static_matches_pp']}" for r, v in report["structures"].items())
        + ".",
        "",
        "## Whole model",
        "",
        f"Dense: {d['s_per_batch']:.4f} s per batch (spread {d['s_spread'][0]:.4f}-"
        f"{d['s_spread'][1]:.4f}), peak allocated {_gb(d['memory']['peak_allocated_bytes'])} GB "
        "while it ran (every model resident).",
        "",
        "| model | ratio | s / batch | speed-up (spread) | FLOP limit | pp / static time | "
        "PP phases s / batch | peak GB (all resident) | alone est. GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        rt, mem = row["runtime"], row["memory"]
        spread = rt["speedup_spread"]
        phases = ", ".join(
            f"{k} {v:.4f}" for k, v in sorted((rt.get("overhead_s_per_batch") or {}).items())
        )
        vs = (
            f"{row['pp_vs_static_time']:.3f} ({row['pp_vs_static_spread'][0]:.3f}-"
            f"{row['pp_vs_static_spread'][1]:.3f})"
            if row["model"] == "pp"
            else "-"
        )
        lines.append(
            f"| {row['model']} | {row['ratio']} | {rt['pruned_s_per_batch']:.4f} | "
            f"{rt['speedup']:.3f}x ({spread[0]:.3f}-{spread[1]:.3f})"
            + (" **beyond the FLOP limit**" if rt["beyond_flop_limit"] else "")
            + f" | {rt['flop_limit']:.3f}x | {vs} | {phases or '-'} | "
            f"{_gb(mem['peak_allocated_bytes'])} | {_gb(mem.get('alone_estimate_bytes'))} |"
        )
    lines += [
        "",
        "Peak GB: `torch.cuda.max_memory_allocated` during the model's calls, with every model "
        "of the table resident. Alone est.: the model's parameters (shared tensors counted) "
        "+ pp's state (calibration history) + its activation peak over what was resident "
        "before timing. pp / static time: the medians' ratio (spread: per-call ratios on the "
        "same batch); above 1, pp's probing and gathering cost more than its kept shapes "
        "save over the static model.",
        "",
    ]
    for row in report["rows"]:
        if row["model"] == "pp":
            lines.append(
                f"- pp {row['ratio']}: {describe_speedup(row['runtime'])}; PP overhead "
                f"{100 * (row['runtime'].get('overhead_fraction') or 0):.1f}% of its "
                f"batch time; probe FLOPs {100 * row['probe_flops_fraction']:.2f}% of "
                f"dense; state {_gb(row['memory']['state_bytes'])} GB."
            )
    b = report["blocks"]
    lines += [
        "",
        f"## Blocks of layer {b['layer']} (input {' x '.join(map(str, b['input_shape']))})",
        "",
        "dense: the block on its full weights; gathered: on weights gathered to pp's kept set "
        "for this batch (gathered once, outside the timing); pp: pp's whole per-block work "
        f"(probe, score, gather, run, history update). {s['rounds']} interleaved rounds x "
        f"{s['block_calls_per_round']} calls; ms = median per call; ratio = time / dense.",
        "",
        "| block | ratio | kept | dense ms | gathered ms | gathered / dense | pp ms | pp / dense "
        "| FLOP limit | pp phases ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group in (ATTN, MLP):
        g = b[group]
        by = {(r["kind"], r["ratio"]): r for r in g["rows"]}
        for ratio in s["ratios"]:
            ga, pp = by[("gathered", ratio)], by[("pp", ratio)]
            gr, pr = ga["runtime"], pp["runtime"]
            phases = ", ".join(
                f"{k} {1e3 * v:.3f}"
                for k, v in sorted((pr.get("overhead_s_per_batch") or {}).items())
            )
            lines.append(
                f"| {group} | {ratio} | {ga['kept']}/{ga['units']} | {g['dense_ms']:.3f} | "
                f"{1e3 * gr['pruned_s_per_batch']:.3f} | {gr['time_ratio']:.3f} | "
                f"{1e3 * pr['pruned_s_per_batch']:.3f} | {pr['time_ratio']:.3f} | "
                f"{gr['flop_limit']:.3f}x | {phases} |"
            )
    lines += [
        "",
        "FLOP limit of a block: dense block MACs / kept block MACs (its speed-up "
        "cannot exceed it; time / dense cannot go below its inverse).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    report = run(args)
    name = "gpu_runtime_tiny" if args.tiny else "gpu_runtime"
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"{name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    md = (args.output if args.tiny else HERE) / f"{name}.md"
    text = markdown(report)
    md.write_text(text)
    log(f"wrote {out} and {md}")
    print(text)
    return report


if __name__ == "__main__":
    main()
