"""lm-evaluation-harness bridge: run lm-eval tasks on any prunekit model.

:class:`PrunekitLM` wraps a dense Hugging Face causal LM, a statically pruned model, or the
dynamic :class:`~prunekit.pruning.dynamic.DynamicModel` of ``prunekit.prune(...)`` (its
:attr:`~prunekit.components.PruneOutcome.model`), together with its tokenizer, as an lm-eval
``LM`` registered under the name ``prunekit``::

    import lm_eval
    from prunekit.integrations.lm_eval import PrunekitLM

    outcome = prunekit.prune(model, tokenizer, method="pp", ratio=0.4, calibration=...)
    results = lm_eval.simple_evaluate(model=PrunekitLM(outcome.model, tokenizer),
                                      tasks=["arc_easy"])

From the command line, a recipe is loaded and pruned (not evaluated) first::

    python -m prunekit.integrations.lm_eval --model prunekit \\
        --model_args recipe=recipes/pp_smollm2.yaml --tasks arc_easy

Scoring is prunekit's own (:mod:`prunekit.evaluation.zeroshot`): a ``(context,
continuation)`` request is tokenised by :func:`~prunekit.evaluation.zeroshot.encode_pair` and
scored by :func:`~prunekit.evaluation.zeroshot.score_requests`, ``batch_size`` requests per
forward, right-padded, each input cut from the left to ``max_length`` tokens. How this differs
from prunekit's own task evaluation and from lm-eval's ``hf`` model:

* **Batches, and so dynamic decisions.** Requests are scored in the order lm-eval hands them
  over (the tasks' requests one after the other, question by question, choice by choice), cut
  into groups of ``batch_size`` that may span questions and tasks. A dynamic method decides its
  kept units per batch and updates its state after every batch, so its scores depend on which
  requests share a batch and on what came before: through the bridge they differ from
  prunekit's own evaluation, which batches each task separately. Each call of
  :meth:`PrunekitLM.loglikelihood` (and of ``loglikelihood_rolling``) starts like prunekit's
  evaluation of a task does: state reset, then one unscored warm-up batch. Dense and static
  models are not affected (up to floating-point noise from the padding width).
* **Tokenisation.** ``encode_pair`` is lm-eval's rule (``context + continuation`` tokenised
  once, the continuation being the tokens after the context's), with the context's special
  tokens: a LLaMA tokenizer puts BOS in front, as the Probe Pruning reference does. lm-eval
  0.4.13's ``hf`` model does the same by default (``add_bos_token=None``: the tokenizer's
  default); older lm-eval releases defaulted to ``add_bos_token=False``. One difference
  remains: when the boundary merges context and continuation into one token (rare; none of
  the 1,100 requests of the cross-check), prunekit tokenises the continuation on its own,
  where lm-eval keeps the split of the joint tokenisation.
* **acc_norm.** lm-eval computes a multiple-choice task's ``acc_norm`` itself from the
  log-likelihoods this bridge returns, normalising by the length of each choice *in
  characters* (``acc_bytes``: in UTF-8 bytes); prunekit's ``acc_norm`` normalises by the
  number of continuation *tokens*. ``acc`` is the same rule in both (highest summed
  log-likelihood, first choice on ties).

Generation (:meth:`PrunekitLM.generate_until`) is greedy, one request at a time, through the
model's ``generate``; a dynamic model decides on the prompt and holds that decision for every
decoding step (:meth:`~prunekit.pruning.dynamic.DynamicModel.hold`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

try:
    from lm_eval.api.registry import register_model
    from lm_eval.utils import simple_parse_args_string
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "prunekit.integrations.lm_eval needs EleutherAI's lm-evaluation-harness: "
        f'pip install "prunekit[lm-eval]" (import failed: {exc})'
    ) from exc

import prunekit
from prunekit.evaluation.lm_eval import BridgeLM, evaluate_by_name, task_manager

__all__ = ["PrunekitLM", "evaluate_by_name", "main", "task_manager"]

_MODEL_ARGS = ("recipe", "set", "batch_size", "max_length", "device", "dtype")


@register_model("prunekit")
class PrunekitLM(BridgeLM):
    """An lm-eval ``LM`` over a prunekit model (dense, static or dynamic) and its tokenizer,
    registered in lm-eval as ``prunekit`` and buildable from a recipe (:meth:`from_recipe`,
    ``--model_args recipe=...``); the scoring is :class:`prunekit.evaluation.lm_eval.BridgeLM`'s.

    :param model: anything that answers like a Hugging Face causal LM (``input_ids``,
        ``attention_mask`` -> ``.logits``), e.g. ``PruneOutcome.model``.
    :param tokenizer: the model's Hugging Face tokenizer.
    :param batch_size: requests per forward pass (prunekit's task default, 20).
    :param max_length: tokens per scored input; longer inputs lose tokens on the left (the
        continuation is kept). For generation, the prompt is cut to
        ``max_length - max_gen_toks`` tokens.
    """

    @classmethod
    def from_recipe(
        cls,
        recipe: str | os.PathLike | dict,
        overrides: Sequence[str] = (),
        *,
        batch_size: int = 20,
        max_length: int = 512,
    ) -> PrunekitLM:
        """Load the recipe's model and prune it with the recipe's method (no evaluation).

        The recipe is validated like ``prunekit validate`` does (so the data files it names
        must be found); past that, ``evaluation``, ``runtime`` and ``output`` are ignored.
        ``overrides`` are
        ``--set``-style ``key=value`` strings, e.g. ``["method.ratio=0.2", "model.device=cuda"]``.
        The :class:`~prunekit.components.PruneOutcome` is kept as :attr:`outcome`.
        """
        prepared = prunekit.prepare(recipe, list(overrides))  # the public API
        bridge = cls(
            prepared.model, prepared.tokenizer, batch_size=batch_size, max_length=max_length
        )
        bridge.outcome, bridge.recipe = prepared.outcome, prepared.plan.recipe
        return bridge

    @classmethod
    def _from_args(cls, args: dict, additional_config: dict | None) -> PrunekitLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        unknown = sorted(set(args) - set(_MODEL_ARGS))
        if unknown:
            raise ValueError(
                f"unknown model_args {unknown} for --model prunekit; allowed: "
                f"{', '.join(_MODEL_ARGS)}"
            )
        recipe = args.get("recipe")
        if not recipe:
            raise ValueError(
                "--model prunekit needs model_args recipe=<recipe.yaml> (e.g. --model_args "
                "recipe=recipes/pp_smollm2.yaml,batch_size=20); from Python, wrap a model you "
                "already have: PrunekitLM(model, tokenizer)"
            )
        overrides = [s.strip() for s in str(args.get("set") or "").split(";") if s.strip()]
        # lm-eval's --device is not used: its command line passes cuda:0 when none is given,
        # and the recipe says where the model goes (model.device, or device= here)
        if args.get("device") is not None:
            overrides.append(f"model.device={args['device']}")
        if args.get("dtype") is not None:
            overrides.append(f"model.dtype={args['dtype']}")
        # model_args win over lm-eval's --batch_size (whose command-line default is 1)
        batch_size = args.get("batch_size", extra.get("batch_size", 20))
        return cls.from_recipe(
            recipe, overrides, batch_size=batch_size, max_length=args.get("max_length", 512)
        )

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> PrunekitLM:
        """``--model_args recipe=PATH[,set=KEY=VALUE;KEY=VALUE][,batch_size=N][,max_length=N]
        [,device=cuda][,dtype=bfloat16]``: load and prune a recipe (see :meth:`from_recipe`).

        Several ``--set`` overrides are separated by ``;`` (lm-eval splits model_args at
        commas, so override values cannot contain commas). ``batch_size`` falls back to
        lm-eval's ``--batch_size`` (default 1 on its command line), then 20; the device is the
        recipe's ``model.device`` unless ``device=`` is given here (lm-eval's ``--device`` is
        not used).
        """
        return cls._from_args(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict, additional_config: dict | None = None
    ) -> PrunekitLM:
        """Like :meth:`create_from_arg_string`, from a dict (``model_args`` given as a dict)."""
        return cls._from_args(dict(arg_dict), additional_config)

    # -- lm-eval's interface -------------------------------------------------------------------


def main() -> None:
    """lm-eval's command line with the ``prunekit`` model registered
    (``python -m prunekit.integrations.lm_eval --model prunekit --model_args recipe=...``)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
