"""Checking an exported GGUF file with llama.cpp itself (``prunekit export --check``).

The file is loaded by ``llama-cpp-python`` (llama.cpp's bindings) with an f32 KV cache (its
default f16 cache alone moves logits by ~0.05) and run on the same token windows as the model
it came from: the largest logit difference, the perplexity both give, and whether greedy
decoding picks the same tokens.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.errors import ExportError


def require_llama_cpp():
    """The ``llama_cpp`` module, or an :class:`ExportError` saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            "checking an export runs it in llama.cpp, through llama-cpp-python: "
            "pip install 'prunekit[llama]' (it builds llama.cpp from source: cmake and a C++ "
            "compiler, several minutes)"
        ) from None
    return llama_cpp


class LlamaCppRunner:
    """One GGUF file loaded in llama.cpp for scoring: every position's logits, f32 KV cache."""

    def __init__(
        self, path: str | Path, n_ctx: int, threads: int | None = None, kv_f32: bool = True
    ) -> None:
        llama_cpp = require_llama_cpp()
        kw = {}
        if kv_f32:
            kw = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            logits_all=True,
            verbose=False,
            n_threads=threads or torch.get_num_threads(),
            n_threads_batch=threads or torch.get_num_threads(),
            **kw,
        )

    def logits(self, tokens: list[int]) -> np.ndarray:
        """``[len(tokens), vocab]`` fp32 logits of one sequence from an empty cache."""
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt`` (argmax of each step's logits, no sampler)."""
        self.llm.reset()
        self.llm.eval(prompt)
        out = []
        for _ in range(new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            self.llm.eval([token])
        return out

    def close(self) -> None:
        self.llm.close()


def _nll(logits: np.ndarray, tokens: list[int]) -> tuple[float, int]:
    """Summed next-token NLL of ``tokens`` under ``logits`` (float64) and the count."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    target = np.asarray(tokens[1:])
    return float(-logp[np.arange(len(target)), target].sum()), len(target)


def check_windows(
    model_dir: Path | None,
    vocab: int,
    windows: int,
    tokens: int,
    text: bool,
    seed: int = 0,
    adapter=None,
) -> tuple[torch.Tensor, str]:
    """The windows to compare on: random WikiText-2 test windows (starting with BOS where the
    adapter needs it) when the model directory has its tokenizer, else random token ids."""
    tokenizer = None
    if text and model_dir is not None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError):
            tokenizer = None
    if tokenizer is not None:
        from prunekit.data import eval_windows, locate_corpus, sequence_bos

        bos = sequence_bos("auto", adapter, tokenizer) if adapter is not None else None
        ids = eval_windows(
            tokenizer,
            locate_corpus("wikitext2", "test"),
            tokens,
            windows,
            "random",
            seed=seed,
            batch_size=windows,
            bos_id=bos,
        )
        return ids, f"{windows} random WikiText-2 test windows of {tokens} tokens (seed {seed})"
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (windows, tokens), generator=g)
    return ids, f"{windows} windows of {tokens} random token ids (seed {seed})"


@torch.no_grad()
def check_gguf(
    path: str | Path,
    model,
    adapter=None,
    *,
    windows: int = 4,
    tokens: int = 128,
    threads: int | None = None,
    text: bool = False,
    model_dir: Path | None = None,
    new_tokens: int = 16,
    ids: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Run the GGUF at ``path`` in llama.cpp and ``model`` (fp32, prunekit) on the same
    windows: the largest absolute logit difference, both perplexities, and whether a greedy
    continuation of the first window's first half gives the same tokens."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if ids is None:
        ids, described = check_windows(model_dir, vocab, windows, tokens, text, adapter=adapter)
    else:
        described = f"{ids.shape[0]} given windows of {ids.shape[1]} tokens"
    model = model.float().eval()
    runner = LlamaCppRunner(path, n_ctx=ids.shape[1] + new_tokens, threads=threads)
    try:
        diffs, nll_ours, nll_theirs, count = [], 0.0, 0.0, 0
        for row in ids.tolist():
            theirs = runner.logits(row)
            ours = model(input_ids=torch.tensor([row])).logits[0].float().numpy()
            diffs.append(float(np.abs(theirs - ours).max()))
            a, n = _nll(ours, row)
            b, _ = _nll(theirs, row)
            nll_ours, nll_theirs, count = nll_ours + a, nll_theirs + b, count + n
        prompt = ids[0, : max(1, ids.shape[1] // 2)].tolist()
        theirs_tokens = runner.greedy(prompt, new_tokens)
    finally:
        runner.close()
    seq = torch.tensor([prompt])
    ours_tokens = []
    for _ in range(new_tokens):
        token = int(model(input_ids=seq).logits[0, -1].argmax())
        ours_tokens.append(token)
        seq = torch.cat([seq, torch.tensor([[token]])], 1)
    ppl_ours, ppl_theirs = math.exp(nll_ours / count), math.exp(nll_theirs / count)
    return {
        "windows": described,
        "max_abs_logit_diff": max(diffs),
        "max_abs_logit_diff_per_window": diffs,
        "ppl_prunekit": ppl_ours,
        "ppl_llamacpp": ppl_theirs,
        "ppl_rel_diff": ppl_theirs / ppl_ours - 1,
        "greedy_tokens": new_tokens,
        "greedy_same": ours_tokens == theirs_tokens,
        "greedy_prunekit": ours_tokens,
        "greedy_llamacpp": theirs_tokens,
        "kv_cache": "f32",
        "threads": threads or torch.get_num_threads(),
        "llama_cpp_python": _version(),
    }


def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:  # noqa: BLE001 - a version string only
        return os.environ.get("LLAMA_CPP_PYTHON_VERSION")
