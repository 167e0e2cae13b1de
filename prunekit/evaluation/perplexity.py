"""Perplexity = exp(mean token NLL), computed the same way for every method.

The model is called like a Hugging Face causal LM (``model(input_ids=...).logits``); static,
dynamic and dense models share this path. The NLL is the shifted causal-LM cross-entropy on
fp32 logits, summed over every target token of every window, then divided by the token count
(all windows have the same length, so this is also the mean of per-batch mean losses, the
reference's aggregation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prunekit.progress import track
from prunekit.pruning.dynamic import begin_evaluation


@torch.no_grad()
def batch_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """(summed NLL, number of target tokens) of one batch; pad positions are ignored.

    The cross-entropy runs one row at a time on fp32 logits, so that its temporaries (an fp32
    copy, the log-softmax) are the size of one row's logits, not of the batch's: with a large
    vocabulary (Gemma-3: 262,144 tokens) the model's own fp32 logits of a 20 x 512 batch are
    already ~10 GB. The row sums are added in float64.
    """
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    logits = model(input_ids=input_ids, **kwargs).logits
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    nll = 0.0
    for row in range(logits.shape[0]):
        nll += float(F.cross_entropy(logits[row, :-1].float(), targets[row], ignore_index=-100,
                                     reduction="sum"))  # fmt: skip
    return nll, int((targets != -100).sum())


def perplexity(
    model,
    windows: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    description: str = "perplexity",
) -> dict:
    """Perplexity of ``model`` over token ``windows`` ([N, T]), in batches of ``batch_size``.

    Returns ``{"ppl", "nll", "tokens", "windows", "seq_len"}``.
    """
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError("windows must be a non-empty [N, T] tensor")
    device = device or next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    batches = list(torch.split(windows, batch_size))
    begin_evaluation(model, batches[0].to(device))  # a dynamic method's protocol
    for batch in track(batches, description, total=len(batches)):
        nll, tokens = batch_nll(model, batch.to(device))
        total_nll += nll
        total_tokens += tokens
    mean = total_nll / total_tokens
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": total_tokens,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
    }
