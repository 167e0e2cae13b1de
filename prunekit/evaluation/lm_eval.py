"""lm-evaluation-harness scoring of any prunekit model: :class:`BridgeLM`, and the tasks a
recipe names under ``evaluation.lm_eval`` (:func:`evaluate_by_name`).

The user-facing side (the ``prunekit`` model registered in lm-eval, built from a recipe, and
lm-eval's command line) is :mod:`prunekit.integrations.lm_eval`, whose docstring says how the
bridge scores and how that differs from prunekit's own task evaluation. This module needs
EleutherAI's lm-evaluation-harness and is imported only when lm-eval tasks run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

try:
    from lm_eval.api.model import LM
    from lm_eval.utils import (
        get_rolling_token_windows,
        make_disjoint_window,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lm-eval tasks need EleutherAI's lm-evaluation-harness: "
        f'pip install "prunekit[lm-eval]" (import failed: {exc})'
    ) from exc

from prunekit.devices import input_device
from prunekit.evaluation.zeroshot import (
    _pad_id,
    _prefix_token,
    encode_pair,
    prepare_model,
    score_requests,
)

__all__ = ["BridgeLM", "evaluate_by_name", "task_manager"]

logger = logging.getLogger(__name__)

#: lm-eval's default number of generated tokens when a task gives none.
DEFAULT_MAX_GEN_TOKS = 256


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` (an int, or a string of digits as lm-eval's CLI passes it) checked >= minimum."""
    message = f"{name} must be an integer >= {minimum}, got {value!r}"
    if isinstance(value, str) and value.strip().startswith("auto"):
        raise ValueError(message + " (PrunekitLM has no automatic batch size)")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(message)
    return value


class _StopOnStrings(StoppingCriteria):
    """Stopping criterion for one sequence: stop once the text generated after the prompt
    contains any of ``stops`` (checked on the decoded text, so a stop string split over
    several tokens is found too)."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        done = []
        for row in input_ids:
            text = self.tokenizer.decode(row[self.prompt_length :], skip_special_tokens=True)
            done.append(any(s in text for s in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


class BridgeLM(LM):
    """An lm-eval ``LM`` over a prunekit model (dense, static or dynamic) and its tokenizer.

    :param model: anything that answers like a Hugging Face causal LM (``input_ids``,
        ``attention_mask`` -> ``.logits``), e.g. ``PruneOutcome.model``.
    :param tokenizer: the model's Hugging Face tokenizer.
    :param batch_size: requests per forward pass (prunekit's task default, 20).
    :param max_length: tokens per scored input; longer inputs lose tokens on the left (the
        continuation is kept). For generation, the prompt is cut to
        ``max_length - max_gen_toks`` tokens.
    """

    def __init__(self, model, tokenizer, batch_size: int = 20, max_length: int = 512) -> None:
        super().__init__()
        if tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs the model's tokenizer")
        if not callable(model):
            raise TypeError(
                f"{type(self).__name__} needs a causal LM module, got {type(model).__name__}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_length = _positive_int(max_length, "max_length", minimum=2)
        #: set when built from a recipe (:meth:`prunekit.integrations.lm_eval.PrunekitLM.from_recipe`):
        #: the pruning outcome and the recipe it came from
        self.outcome = None
        self.recipe = None

    # -- construction from a recipe (lm_eval --model prunekit --model_args recipe=...) --------

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    def _score(self, pairs: list[tuple[list[int], list[int]]], description: str):
        return score_requests(
            self.model,
            pairs,
            batch_size=self.batch_size,
            max_length=self.max_length,
            pad_id=_pad_id(self.tokenizer),
            description=description,
            prepare=True,
        )

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), continuation is the greedy output)`` per request,
        in request order (see the module docstring for batching and tokenisation)."""
        pairs = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx, cont = encode_pair(self.tokenizer, context, continuation)
            if not cont:
                raise ValueError(
                    f"empty continuation for context {context[-60:]!r}: every "
                    "loglikelihood request needs at least one token to score"
                )
            pairs.append((ctx, cont))
        scores = self._score(pairs, "lm-eval loglikelihood")
        out = [(s.logprob, s.greedy) for s in scores]
        for req, result in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of each whole text, conditioned on the BOS token (else EOS).

        The text is tokenised without special tokens and cut into lm-eval's disjoint rolling
        windows of ``max_length`` tokens (every token predicted exactly once, each window with
        the most context that fits); windows of all requests are scored ``batch_size`` at a
        time and summed per request.
        """
        prefix = _prefix_token(self.tokenizer)
        windows, owners = [], []
        for i, req in enumerate(requests):
            tokens = list(self.tokenizer(req.args[0], add_special_tokens=False)["input_ids"])
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=tokens,
                    prefix_token=prefix,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, self._score(windows, "lm-eval rolling"), strict=True):
            totals[owner] += score.logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @staticmethod
    def _generation_settings(gen_kwargs: dict | None) -> tuple[list[str], int]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        if until is None:
            stops: list[str] = []
        elif isinstance(until, str):
            stops = [until]
        elif isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
            stops = list(until)
        else:
            raise ValueError(f"'until' must be a string or a list of strings, got {until!r}")
        max_gen = DEFAULT_MAX_GEN_TOKS
        for alias in ("max_gen_toks", "max_new_tokens", "max_tokens"):  # lm-eval's priority
            if kwargs.get(alias) is not None:
                max_gen = _positive_int(kwargs[alias], alias)
                break
        for alias in ("max_gen_toks", "max_new_tokens", "max_tokens"):
            kwargs.pop(alias, None)
        do_sample = kwargs.pop("do_sample", None)
        temperature = kwargs.pop("temperature", 0.0)
        if do_sample or (temperature is not None and float(temperature) > 0):
            raise ValueError(
                "PrunekitLM generates greedily only; the task asks for sampling "
                f"(do_sample={do_sample!r}, temperature={temperature!r})"
            )
        if kwargs:
            logger.warning("PrunekitLM ignores these generation settings: %s", sorted(kwargs))
        return stops, max_gen

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy continuation of each context, cut at the first stop string of ``until``.

        One request at a time (no padding), at most ``max_gen_toks`` new tokens (default 256),
        also stopping at the model's EOS. The prompt gets the tokenizer's special tokens, like
        loglikelihood contexts, and keeps its last ``max_length - max_gen_toks`` tokens.
        """
        generate = getattr(self.model, "generate", None)
        if generate is None:
            raise TypeError(
                f"{type(self.model).__name__} has no generate(); generate_until "
                "needs a Hugging Face causal LM (or a prunekit model wrapping one)"
            )
        prepare_model(self.model, None)  # a dynamic model starts from its post-calibration state
        hold = getattr(self.model, "hold", None)
        pad = _pad_id(self.tokenizer)
        out: list[str] = []
        for req in requests:
            context, gen_kwargs = req.args[0], req.args[1]
            stops, max_gen = self._generation_settings(gen_kwargs)
            room = self.max_length - max_gen
            if room < 1:
                raise ValueError(
                    f"max_gen_toks {max_gen} leaves no room for the prompt within "
                    f"max_length {self.max_length}; raise max_length"
                )
            ids = (
                list(self.tokenizer(context, add_special_tokens=True)["input_ids"])
                if context
                else [_prefix_token(self.tokenizer)]
            )
            ids = ids[-room:]
            input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
            criteria = StoppingCriteriaList(
                [_StopOnStrings(self.tokenizer, stops, len(ids))] if stops else []
            )
            # a dynamic model decides on the prompt and keeps that decision while decoding
            # (its KV cache holds only the kept heads' keys/values)
            with hold() if hold is not None else contextlib.nullcontext():
                sequence = generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_gen,
                    do_sample=False,
                    num_beams=1,
                    stopping_criteria=criteria,
                    pad_token_id=pad,
                )
            text = self.tokenizer.decode(sequence[0, len(ids) :], skip_special_tokens=True)
            text = _cut_at_stops(text, stops)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


def task_manager(include_path: str | os.PathLike | None = None, include_defaults: bool = True):
    """lm-eval's task index: its own tasks (``include_defaults``) and the task configs under
    ``include_path``. Indexing lm-eval's own tasks reads thousands of YAML files (seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=None if include_path is None else str(include_path),
        include_defaults=include_defaults,
    )


def _metric_name(key: str) -> str:
    """lm-eval's ``"acc,none"`` -> ``acc``; ``"exact_match,strict-match"`` ->
    ``exact_match_strict-match`` (the filter named when it is not the default one)."""
    metric, _, flt = key.partition(",")
    return metric if flt in ("", "none") else f"{metric}_{flt}"


def evaluate_by_name(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    manager=None,
    include_path: str | os.PathLike | None = None,
    include_defaults: bool = True,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 20,
    max_length: int = 512,
    seed: int = 0,
) -> dict[str, dict]:
    """Run lm-eval tasks by name on ``model`` through :class:`BridgeLM` (what a recipe's
    ``evaluation.lm_eval`` asks for): ``{"lm_eval:<task>": {metric: value, ...}}`` for every
    task and group lm-eval reports, with the numbers of questions scored (``samples``) and
    the task's version. Seeds are the run's."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager(include_path, include_defaults)
    lm = BridgeLM(model, tokenizer, batch_size=batch_size, max_length=max_length)
    out = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    metrics: dict[str, dict] = {}
    samples = out.get("n-samples", {})
    for name, values in out["results"].items():
        entry: dict[str, Any] = {
            _metric_name(k): v
            for k, v in values.items()
            if k != "alias" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        if name in samples:
            entry["samples"] = samples[name].get("effective")
        entry["version"] = out.get("versions", {}).get(name)
        entry.update({"source": "lm-eval", "limit": limit, "num_fewshot": num_fewshot})
        metrics[f"lm_eval:{name}"] = entry
    return metrics
