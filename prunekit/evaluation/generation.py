"""Generation with pruned models: prompts in, continuations out, and its throughput.

Every model (dense, static, dynamic) generates the same way: the prompts are left-padded into
one batch with their true positions, the prompt runs once with a KV cache (prefill; a dynamic
method decides its kept sets there), and each new token runs through the cache (decode; a
dynamic model reuses the prompt's kept sets, see :mod:`prunekit.pruning.dynamic`).

:func:`greedy` is the loop that :func:`time_generation` times (prefill and decode apart,
which ``generate`` does not report); ``prunekit generate`` uses Hugging Face ``generate``
(stopping at EOS), which runs the same forwards.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from prunekit.evaluation.perplexity import cache_keyword, output_cache
from prunekit.evaluation.zeroshot import _pad_id
from prunekit.pruning.dynamic import true_positions


def left_padded(
    tokenizer, prompts: Sequence[str], bos_id: int | None = None, max_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``prompts``, left-padded to the longest.

    :param bos_id: prepended to each prompt when given (and not already its first token).
    :param max_tokens: keep each prompt's last ``max_tokens`` tokens.
    """
    rows = []
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos_id is not None and (not ids or ids[0] != bos_id):
            ids = [bos_id, *ids]
        if max_tokens is not None:
            ids = ids[-max_tokens:]
        if not ids:
            raise ValueError(f"prompt {text!r} has no tokens")
        rows.append(ids)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), _pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids) :] = 1
    return input_ids, mask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int
) -> tuple[torch.Tensor, float, float]:
    """Greedy decoding of ``max_new_tokens`` tokens per row (no early stop, so every row and
    every run does the same work).

    :returns: ``(new tokens [B, N], prefill seconds, decode seconds)``.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = input_ids.device
    keyword = cache_keyword(model)
    mask = attention_mask
    _sync(device)
    start = time.perf_counter()
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        use_cache=True,
        position_ids=true_positions(mask, input_ids.shape[1]),
    )
    token = out.logits[:, -1].argmax(-1)
    _sync(device)
    prefill = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            use_cache=True,
            position_ids=true_positions(mask, 1),
            **{keyword: output_cache(out)},
        )
        token = out.logits[:, -1].argmax(-1)
        tokens.append(token)
    _sync(device)
    return torch.stack(tokens, 1), prefill, time.perf_counter() - start


def _cache_bytes(cache) -> int:
    """Bytes of the K/V tensors a cache holds (what attention reads per step)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            t = t[0] if isinstance(t, tuple) else t
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def weight_bytes(model) -> int:
    """Bytes of the weights a decoding step of a plain (dense or statically pruned) model
    reads: every parameter, but an input embedding not tied to the output one (indexed)."""
    from prunekit.pruning.dynamic import _outside_blocks_bytes

    return _outside_blocks_bytes(model, set())


@torch.no_grad()
def decode_bytes(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    dense: bool = False,
) -> dict:
    """What a greedy generation of ``max_new_tokens`` tokens reads per decoding step, measured
    on a prefill and one step: ``weight_bytes`` (the weights a step's matmuls read: a dynamic
    model's gathered ones), ``kv_bytes`` (the K/V cache attention reads, averaged over the
    steps) and ``held_weight_bytes`` (gathered weights held for the continuation, beyond the
    model's own). ``dense``: a dynamic model through its ``dense()`` layers.

    Decoding is bound by reading these bytes, so ``dense total / pruned total`` is the limit a
    decode speed-up can reach (the *bytes limit*).
    """
    import contextlib

    keyword = cache_keyword(model)
    keep = getattr(model, "preserved_state", None)
    dense_ctx = model.dense() if dense else contextlib.nullcontext()
    with dense_ctx, keep() if keep else contextlib.nullcontext():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=True,
            position_ids=true_positions(attention_mask, input_ids.shape[1]),
        )
        cache = output_cache(out)
        before = _cache_bytes(cache)
        mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
        token = out.logits[:, -1:].argmax(-1)
        model(
            input_ids=token,
            attention_mask=mask,
            use_cache=True,
            position_ids=true_positions(mask, 1),
            **{keyword: cache},
        )
        after = _cache_bytes(cache)
        if hasattr(model, "step_weight_bytes") and not dense:
            weights, held = model.step_weight_bytes(cache), model.held_weight_bytes()
        else:
            target = getattr(model, "model", model) if hasattr(model, "runtime") else model
            weights, held = weight_bytes(target), 0
    per_token = after - before
    # steps 1..n-1 read the cache at prompt + 1 .. prompt + n - 1 tokens
    kv = before + per_token * max_new_tokens / 2
    return {
        "weight_bytes": int(weights),
        "kv_bytes": int(kv),
        "held_weight_bytes": int(held),
        "total_bytes": int(weights + kv),
    }


def time_generation(
    runs: dict[str, Callable[[], tuple[torch.Tensor, float, float]]],
    prompt_tokens: int,
    new_tokens: int,
    rounds: int = 3,
    warmup: int = 1,
) -> dict:
    """Time several ways of generating (e.g. ``{"dense": ..., "pruned": ...}``) in interleaved
    rounds on the same prompts; each callable returns what :func:`greedy` does.

    :param prompt_tokens: real prompt tokens per run (for prefill tokens/s).
    :param new_tokens: tokens the decode loop produces per run, all rows (for decode
        tokens/s; the first new token of each row comes from the prefill).
    :returns: per name: median prefill and decode seconds, their spread (min, max), tokens/s.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            _, prefill, decode = run()
            times[name]["prefill"].append(prefill)
            times[name]["decode"].append(decode)
    out = {}
    for name, t in times.items():
        p, d = statistics.median(t["prefill"]), statistics.median(t["decode"])
        out[name] = {
            "prefill_s": p,
            "prefill_s_all": t["prefill"],
            "decode_s": d,
            "decode_s_all": t["decode"],
            "prefill_tokens_per_s": prompt_tokens / p if p else None,
            "decode_tokens_per_s": new_tokens / d if d else None,
        }
    return out
