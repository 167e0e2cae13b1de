"""Zero-shot multiple-choice accuracy: every choice scored by the NLL of its continuation.

Scoring (pp-spec section 7.3): for each choice, the summed token NLL of the continuation given
its context. ``acc`` picks the choice with the smallest sum; ``acc_norm`` the smallest NLL *per
continuation token* (the reference's ``CsrAccuracyNorm``; not lm-eval's per-character
normalisation). Ties go to the first choice. Accuracies are fractions in ``[0, 1]``.

Batching: the choices of all questions are flattened in order (question by question, choice
by choice) and cut into groups of ``batch_size``; each group is right-padded to its longest
sequence with an attention mask. Unlike the reference, the last partial group is kept, so no
question loses a choice. Every model (dense, static, dynamic) is called the same way, like a
Hugging Face causal LM with ``input_ids`` and ``attention_mask``; a dynamic model gets the same
start as in perplexity evaluation (state reset, one unscored warm-up batch) before each task.

Tokenisation (:func:`encode_pair`) follows lm-eval: the whole ``context + continuation`` is
tokenised once and the continuation is what follows the context's tokens, with trailing whitespace
of the context moved to the continuation. The context gets the tokenizer's special tokens (BOS
for LLaMA, as in the reference; SmolLM2's tokenizer adds none); an empty context is replaced by
the BOS (else EOS) token so that the first continuation token is predicted from something. Each
input is cut from the left to ``max_length`` tokens, keeping the continuation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prunekit.data.tasks import Question, TaskSource, load_questions
from prunekit.devices import input_device
from prunekit.progress import info, track
from prunekit.pruning.dynamic import begin_evaluation

__all__ = ["ChoiceScore", "accuracy", "encode_pair", "evaluate_questions", "score_requests"]


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _prefix_token(tokenizer) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError(
        "the tokenizer has neither a BOS nor an EOS token to stand for an empty context"
    )


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as it follows that context."""
    spaces = len(context) - len(context.rstrip())  # every trailing whitespace, like lm-eval
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [_prefix_token(tokenizer)], _encode(tokenizer, continuation, special=False)
    whole = _encode(tokenizer, context + continuation, special=True)
    ctx = _encode(tokenizer, context, special=True)
    cont = whole[len(ctx) :]
    if whole[: len(ctx)] != ctx or not cont:
        # the boundary merged into one token (rare): tokenise the two sides separately
        cont = _encode(tokenizer, continuation, special=False)
    return ctx, cont


@dataclass(frozen=True)
class ChoiceScore:
    """Log-likelihood of one continuation: summed log-prob, scored tokens, greedy or not."""

    logprob: float
    tokens: int
    greedy: bool

    @property
    def nll(self) -> float:
        return -self.logprob

    @property
    def nll_per_token(self) -> float:
        return -self.logprob / max(self.tokens, 1)


def _pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _make_batch(pairs, max_length: int, pad_id: int):
    """Right-padded input ids, attention mask and, per row, (start, targets) of the scored
    continuation tokens."""
    rows, spans = [], []
    for ctx, cont in pairs:
        full = (list(ctx) + list(cont))[-(max_length + 1) :]
        inp, targets = full[:-1], full[1:]
        n = min(len(cont), len(targets))
        rows.append(inp)
        spans.append((len(inp) - n, targets[len(targets) - n :]))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask, spans


def _prompt_then_continuation(
    model, pairs, max_length: int, pad_id: int, device, split: str = "context"
):
    """For a method that decides on the prompt: each context runs as a (left-padded) prompt,
    then its continuation (right-padded) through the prompt's KV cache, as in generation.

    With ``split="last_token"`` (GRIFFIN's reference classification mode) the prompt is every
    input token but the last (``context + continuation[:-1]`` minus its last token) and only
    that last input token runs through the cache: the continuation's earlier tokens are
    predicted by the (dense) prompt, its last one by the pruned token.

    Returns the logits and, per row, ``(start, targets)`` as :func:`_make_batch` does (the
    first continuation token is predicted by the prompt's last position, as generation's first
    new token is).
    """
    from prunekit.evaluation.perplexity import continuation_logits

    contexts, continuations, targets = [], [], []
    for ctx, cont in pairs:
        full = (list(ctx) + list(cont))[-(max_length + 1) :]
        n = min(len(cont), len(full) - 1)
        targets.append(full[len(full) - n :])
        if split == "last_token":
            if len(full) < 3:
                raise ValueError(
                    "the last_token protocol needs at least 3 tokens of context "
                    "and continuation, so that the prompt has one"
                )
            contexts.append(full[:-2])
            continuations.append(full[-2:-1])  # the last input token: runs pruned
        else:
            contexts.append(full[: len(full) - n])
            continuations.append(full[len(full) - n :])
    bsz = len(pairs)
    p_width, c_width = max(map(len, contexts)), max(map(len, continuations))
    ids = torch.full((bsz, p_width + c_width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
        ids[i, p_width - len(ctx) : p_width] = torch.tensor(ctx, dtype=torch.long)
        ids[i, p_width : p_width + len(cont)] = torch.tensor(cont, dtype=torch.long)
        mask[i, p_width - len(ctx) : p_width + len(cont)] = 1
    if split == "last_token":  # the prompt predicts every target but the last
        k = max(len(t) for t in targets) - 1
        last, rest = continuation_logits(model, ids.to(device), p_width, mask.to(device), max(k, 1))
        logits = torch.cat([last[:, last.shape[1] - k :], rest[:, :1]], 1)
        return logits, [(k - len(t) + 1, t) for t in targets]
    last, rest = continuation_logits(model, ids.to(device), p_width, mask.to(device))
    logits = torch.cat([last, rest], 1)
    spans = [(0, cont) for cont in continuations]
    return logits, spans


def prepare_model(model, first_batch: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """The start every evaluation gets: what a dynamic method's protocol asks (reset, warm-up
    on the first batch); nothing for dense and static models."""
    if first_batch is None:
        begin_evaluation(model)
        return
    device = input_device(model)
    begin_evaluation(model, first_batch[0].to(device), first_batch[1].to(device))


@torch.no_grad()
def score_requests(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 20,
    max_length: int = 512,
    pad_id: int = 0,
    description: str = "scoring",
    prepare: bool = True,
) -> list[ChoiceScore]:
    """Score ``(context ids, continuation ids)`` pairs in order, ``batch_size`` at a time.

    :param prepare: reset a dynamic model's state and run its warm-up batch first.
    """
    if batch_size < 1 or max_length < 1:
        raise ValueError("batch_size and max_length must be positive")
    if any(len(cont) == 0 for _, cont in pairs):
        raise ValueError("every continuation needs at least one token")
    device = input_device(model)
    groups = list(_batches(pairs, batch_size))
    if prepare and groups:
        ids, mask, _ = _make_batch(groups[0], max_length, pad_id)
        prepare_model(model, (ids, mask))
    out: list[ChoiceScore] = []
    on_prompt = getattr(getattr(model, "protocol", None), "decides", None) == "prompt"
    for group in track(groups, description, total=len(groups)):
        if on_prompt:
            logits, spans = _prompt_then_continuation(
                model, group, max_length, pad_id, device, model.protocol.prompt_split
            )
        else:
            ids, mask, spans = _make_batch(group, max_length, pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i, (start, targets) in enumerate(spans):
            # log-softmax only over the scored positions (a [T, vocab] fp32 copy per batch
            # would dominate memory for large vocabularies)
            rows = logits[i, start : start + len(targets)].float().log_softmax(-1)
            target = torch.tensor(targets, device=rows.device)
            logprob = rows.gather(1, target[:, None]).sum().item()
            greedy = bool((rows.argmax(-1) == target).all())
            out.append(ChoiceScore(logprob, len(targets), greedy))
    return out


def _stderr(p: float, n: int) -> float | None:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def accuracy(questions: Sequence[Question], scores: Sequence[ChoiceScore]) -> dict:
    """``acc`` / ``acc_norm`` (with standard errors) and one record per question."""
    needed = sum(q.num_choices for q in questions)
    if len(scores) != needed:
        raise ValueError(f"{len(scores)} scores for {needed} choices")
    records, pos = [], 0
    correct = correct_norm = 0
    for q in questions:
        s = scores[pos : pos + q.num_choices]
        pos += q.num_choices
        nll = [c.nll for c in s]
        per_token = [c.nll_per_token for c in s]
        pred = min(range(len(nll)), key=nll.__getitem__)
        pred_norm = min(range(len(per_token)), key=per_token.__getitem__)
        correct += pred == q.gold
        correct_norm += pred_norm == q.gold
        records.append(
            {
                "id": q.id,
                "gold": q.gold,
                "pred": pred,
                "pred_norm": pred_norm,
                "nll": nll,
                "tokens": [c.tokens for c in s],
            }
        )
    n = len(questions)
    acc = correct / n if n else float("nan")
    acc_norm = correct_norm / n if n else float("nan")
    return {
        "acc": acc,
        "acc_norm": acc_norm,
        "acc_stderr": _stderr(acc, n),
        "acc_norm_stderr": _stderr(acc_norm, n),
        "questions": n,
        "choices": needed,
        "records": records,
    }


def evaluate_questions(
    model,
    tokenizer,
    questions: Sequence[Question],
    *,
    batch_size: int = 20,
    max_length: int = 512,
    description: str = "accuracy",
) -> dict:
    """Accuracy of ``model`` on ``questions`` (see :func:`accuracy` for the result)."""
    if not questions:
        raise ValueError("no questions to evaluate")
    pairs = [
        encode_pair(tokenizer, ctx, cont)
        for q in questions
        for ctx, cont in zip(q.contexts, q.continuations, strict=True)
    ]
    scores = score_requests(
        model,
        pairs,
        batch_size=batch_size,
        max_length=max_length,
        pad_id=_pad_id(tokenizer),
        description=description,
    )
    result = accuracy(questions, scores)
    result.update(
        batch_size=batch_size, max_length=max_length, tokens_scored=sum(c.tokens for c in scores)
    )
    return result


#: ``metrics`` key of the average over the evaluated tasks (reserved: no task may use it).
AVERAGE_KEY = "tasks_average"


def evaluate_tasks(model, tokenizer, tasks: list[tuple], output_dir: Path | None = None) -> dict:
    """Accuracy metrics of every planned task, and their average when there are several."""
    metrics: dict[str, dict] = {}
    for label, cfg, source in tasks:
        if isinstance(source, TaskSource):
            questions = load_questions(source, cfg.limit)
            origin = {"source": source.kind, "location": source.location}
        else:
            questions = source.load(cfg.limit)
            origin = {"source": "file", "location": str(Path(source.path).resolve())}
        result = evaluate_questions(
            model,
            tokenizer,
            questions,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            description=f"accuracy {label}",
        )
        records = result.pop("records")
        if output_dir is not None:
            (output_dir / "predictions").mkdir(exist_ok=True)
            with open(output_dir / "predictions" / f"{label}.jsonl", "w") as fh:
                for rec in records:
                    fh.write(json.dumps(rec) + "\n")
        metrics[label] = {**result, "limit": cfg.limit, **origin}
        info(
            f"{label}: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} over "
            f"{result['questions']} questions"
        )
    if len(metrics) > 1:
        metrics[AVERAGE_KEY] = {
            "acc_norm": sum(m["acc_norm"] for m in metrics.values()) / len(metrics),
            "acc": sum(m["acc"] for m in metrics.values()) / len(metrics),
            "tasks": list(metrics),
        }
    return metrics
