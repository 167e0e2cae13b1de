"""Perplexity = exp(mean token NLL), computed the same way for every method.

The model is called like a Hugging Face causal LM (``model(input_ids=...).logits``); static,
dynamic and dense models share this path. The NLL is the shifted causal-LM cross-entropy on
fp32 logits, summed over every target token of every window, then divided by the token count
(all windows have the same length, so this is also the mean of per-batch mean losses, the
reference's aggregation).

With ``prompt_tokens`` (the ``evaluation.perplexity[].prompt_tokens`` recipe key) each window
is a prompt and its continuation: the prompt runs first, with a KV cache, and the
continuation runs through that cache, so a dynamic method decides on the prompt and the
continuation is scored with those decisions (generation's regime, e.g. GRIFFIN's).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from prunekit.devices import input_device
from prunekit.progress import track
from prunekit.pruning.dynamic import begin_evaluation


def cache_keyword(model) -> str:
    """The KV-cache keyword of ``model``'s forward: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (before); a dynamic model answers for the model it wraps."""
    target = getattr(model, "model", model) if hasattr(model, "runtime") else model
    params = inspect.signature(target.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned (``cache``, or ``past_key_values`` before 5.24)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def continuation_logits(
    model,
    input_ids: torch.Tensor,
    prompt_tokens: int,
    attention_mask: torch.Tensor | None = None,
    last: int = 1,
):
    """``(prompt's last logits [B, last, V], continuation logits)``: the prompt
    ``input_ids[:, :prompt_tokens]`` runs with a KV cache and the continuation
    ``input_ids[:, prompt_tokens:]`` through that cache (a dynamic method decides on the prompt
    and every continuation token reuses those decisions, as in generation).

    :param attention_mask: ``[B, T]`` over prompt and continuation (e.g. left-padded prompts,
        right-padded continuations).
    :param last: how many of the prompt's last positions to return.
    """
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask[:, :prompt_tokens]}
    out = model(input_ids=input_ids[:, :prompt_tokens], use_cache=True, **kwargs)
    cache, last = output_cache(out), out.logits[:, -last:].clone()
    del out  # the prompt's full logits are not kept through the continuation
    if cache is None:
        raise RuntimeError(
            f"{type(model).__name__} returned no KV cache; prompt_tokens needs a "
            "model that caches keys and values"
        )
    if attention_mask is not None:
        kwargs = {"attention_mask": attention_mask}
    rest = input_ids[:, prompt_tokens:]
    logits = model(input_ids=rest, use_cache=True, **{cache_keyword(model): cache}, **kwargs).logits
    return last, logits


@torch.no_grad()
def batch_nll(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prompt_tokens: int | None = None,
):
    """(summed NLL, number of target tokens) of one batch; pad positions are ignored.

    With ``prompt_tokens``, only the continuation's own predictions are scored (the tokens
    after the first continuation token), see :func:`continuation_logits`.

    The cross-entropy runs one row at a time on fp32 logits, so that its temporaries (an fp32
    copy, the log-softmax) are the size of one row's logits, not of the batch's: with a large
    vocabulary (Gemma-3: 262,144 tokens) the model's own fp32 logits of a 20 x 512 batch are
    already ~10 GB. The row sums are added in float64.
    """
    if prompt_tokens:
        _, logits = continuation_logits(model, input_ids, prompt_tokens, attention_mask)
        first = prompt_tokens
    else:
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        logits = model(input_ids=input_ids, **kwargs).logits
        first = 0
    targets = input_ids[:, first + 1 :]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, first + 1 :] == 0, -100)
    nll = 0.0
    for row in range(logits.shape[0]):
        nll += float(
            F.cross_entropy(
                logits[row, :-1].float(), targets[row], ignore_index=-100, reduction="sum"
            )
        )
    return nll, int((targets != -100).sum())


def perplexity(
    model,
    windows: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    description: str = "perplexity",
    prompt_tokens: int | None = None,
) -> dict:
    """Perplexity of ``model`` over token ``windows`` ([N, T]), in batches of ``batch_size``.

    :param prompt_tokens: score each window's continuation of its first ``prompt_tokens``
        tokens only (see :func:`continuation_logits`).

    Returns ``{"ppl", "nll", "tokens", "windows", "seq_len"}`` (and ``prompt_tokens``).
    """
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError("windows must be a non-empty [N, T] tensor")
    device = device or input_device(model)
    total_nll, total_tokens = 0.0, 0
    batches = list(torch.split(windows, batch_size))
    begin_evaluation(model, batches[0].to(device))  # a dynamic method's protocol
    for batch in track(batches, description, total=len(batches)):
        nll, tokens = batch_nll(model, batch.to(device), prompt_tokens=prompt_tokens)
        total_nll += nll
        total_tokens += tokens
    mean = total_nll / total_tokens
    result = {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": total_tokens,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
    }
    if prompt_tokens:
        result["prompt_tokens"] = int(prompt_tokens)
    return result
