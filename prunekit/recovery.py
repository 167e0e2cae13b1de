"""Recovery fine-tuning: LoRA adapters on a (pruned) model, trained on local text, merged back.

A static method's pruned model keeps its really smaller matrices: peft's LoRA adapters are put
on its linear layers, a causal-LM fine-tune runs on windows of a local corpus (the same
sources as calibration), and the adapters are merged into the weights, so the model that is
evaluated and saved has exactly the pruned shapes and reloads like any pruned model.

* **No evaluation text is trained on.** :func:`carve_out` drops every training window that
  shares a run of :data:`OVERLAP_TOKENS` tokens with an evaluated text (the runner passes the
  token streams of every perplexity corpus); ``validate`` already refuses a recovery corpus
  that *is* an evaluated one.
* **Seeded and resumable.** The adapters' initialisation, the order of the windows (a function
  of the step alone) and dropout are seeded; every ``checkpoint_every`` steps the adapters,
  the optimizer, the scheduler and the RNG state are written (atomically) under the
  checkpoint directory, and a run started again with the same model, settings and data
  resumes from the last one and ends with the same weights as an uninterrupted run.
* **Distillation from the dense parent.** ``recovery.loss: kd`` or ``ce+kd`` adds the KL
  divergence from the dense model's distribution to the pruned model's (:func:`kd_loss`): the
  teacher runs beside the student on every batch (:class:`OnlineTeacher`), or once over the
  windows before pruning, keeping only its top-k per position (:class:`TeacherCache`,
  ``kd.cache: true``), so the fine-tune holds one model.
* **Open to methods.** :class:`LoraTrainer` is public: a method that prunes during
  fine-tuning (LoRAPrune) passes ``on_gradients`` (called after each accumulated backward, before the
  optimizer step) and ``extra_state`` (saved and restored with the checkpoints).

The training loop is written here rather than taken from ``transformers.Trainer`` because it
has to stop and resume bit-exactly on a physically pruned model, call a method between the
backward pass and the step, and stay a few dozen lines; peft provides the adapters and their
merge, transformers the learning-rate schedules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit._files import tensor_sha256
from prunekit.errors import PrunekitError, RecipeError
from prunekit.progress import info, progress_bar

logger = logging.getLogger(__name__)

#: a training window sharing a run of this many tokens with an evaluated text is dropped
OVERLAP_TOKENS = 32
#: checkpoint directories are ``step-000050`` and so on
STEP_PREFIX = "step-"
_HASH_BASE = 0x100000001B3  # the FNV prime: odd, so powers never vanish mod 2**64


class RecoveryError(PrunekitError):
    """Recovery cannot run as asked (no training text left, no layer to adapt...)."""


# --------------------------------------------------------------------------------------------
# The training text
# --------------------------------------------------------------------------------------------


def ngram_hashes(tokens: torch.Tensor, n: int = OVERLAP_TOKENS) -> torch.Tensor:
    """64-bit hashes of every run of ``n`` consecutive tokens: ``[L-n+1]`` for a 1-D stream,
    ``[R, L-n+1]`` for rows (polynomial hash, wrapping int64 arithmetic; vectorised)."""
    tokens = tokens.long()
    if tokens.shape[-1] < n:
        return tokens.new_empty((*tokens.shape[:-1], 0))
    powers = torch.ones(n, dtype=torch.long)
    for i in range(1, n):
        powers[i] = powers[i - 1] * _HASH_BASE  # wraps modulo 2**64
    runs = tokens.unfold(-1, n, 1)  # a view: [..., L-n+1, n]
    out = torch.zeros(runs.shape[:-1], dtype=torch.long)
    for i in range(n):  # column by column: no [..., L-n+1, n] product in memory
        out += runs[..., i] * powers[i]
    return out


def carve_out(
    windows: torch.Tensor, excluded: dict[str, torch.Tensor], n: int = OVERLAP_TOKENS
) -> tuple[torch.Tensor, list[int]]:
    """``windows`` without every row that shares a run of ``n`` tokens with one of the
    ``excluded`` token streams (by label); returns the kept rows and the dropped row indices.
    Windows shorter than ``n`` are checked with runs of their own length."""
    n = min(n, windows.shape[1])
    if not excluded or n == 0:
        return windows, []
    seen = torch.unique(torch.cat([ngram_hashes(s.flatten(), n) for s in excluded.values()]))
    hits = torch.isin(ngram_hashes(windows, n), seen).any(dim=1)
    dropped = hits.nonzero().flatten().tolist()
    return windows[~hits], dropped


def evaluated_token_streams(recipe, tokenizer, sources=None) -> dict[str, torch.Tensor]:
    """Label -> token stream of every perplexity corpus ``recipe`` evaluates: what
    :func:`carve_out` keeps out of any text a model is trained on. ``sources`` are the located
    corpora when the caller has them (the runner's plan); otherwise they are located here
    from the recipe, as ``validate`` does."""
    from prunekit.data import locate_corpus, token_stream

    entries = recipe.evaluation.perplexity
    if sources is None:
        sources = [
            locate_corpus(p.dataset, p.split, p.path, p.text_field, data_dir=recipe.data_dir)
            for p in entries
        ]
    return {
        cfg.label: token_stream(tokenizer, src) for cfg, src in zip(entries, sources, strict=True)
    }


def keep_out_evaluated(
    windows: torch.Tensor, recipe, tokenizer, sources=None, what: str = "recovery"
) -> tuple[torch.Tensor, list[int], list[str]]:
    """``windows`` minus every one sharing a run of :data:`OVERLAP_TOKENS` tokens with a text
    ``recipe`` evaluates (:func:`carve_out` against :func:`evaluated_token_streams`): the kept
    rows, the dropped row indices and the evaluated labels. A RecoveryError when none is left:
    ``what`` (the step training on the windows) would train on the evaluation text."""
    excluded = evaluated_token_streams(recipe, tokenizer, sources)
    kept, dropped = carve_out(windows, excluded)
    if kept.shape[0] == 0:
        raise RecoveryError(
            f"every one of the {windows.shape[0]} {what} windows shares a run of "
            f"{OVERLAP_TOKENS} tokens with an evaluated corpus "
            f"({', '.join(excluded)}): {what} would train on the evaluation "
            "text; train on another corpus or split"
        )
    return kept, dropped, list(excluded)


# --------------------------------------------------------------------------------------------
# The adapters
# --------------------------------------------------------------------------------------------


def lora_targets(model: nn.Module, target_modules: str | list[str] = "all-linear") -> list[str]:
    """Names of the linear layers LoRA adapts: every ``nn.Linear`` of the model but its output
    embedding (``all-linear``), or those whose name ends with one of ``target_modules``;
    layers pruned to nothing (a zero dimension) are left out."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not head and m.in_features > 0 and m.out_features > 0
    ]
    if target_modules == "all-linear":
        if not linear:
            raise RecoveryError("the model has no linear layer for LoRA to adapt")
        return linear
    wanted = list(target_modules)
    out = [n for n in linear if any(n == s or n.endswith("." + s) for s in wanted)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
    missing = [s for s in wanted if not any(n == s or n.endswith("." + s) for n in linear)]
    if missing:
        raise RecipeError(
            f"target_modules {missing} name no linear layer of this model; its "
            f"linear layers end with {suffixes} (or use all-linear)"
        )
    return out


def check_target_modules(model_id: str, target_modules: str | list[str]) -> str | None:
    """Why ``target_modules`` names no linear layer of ``model_id`` (None when it does, or
    when it cannot be told without loading weights): the model is built from its config on
    the meta device, so ``validate`` catches a misspelt suffix in a second. A config only the
    run can read (remote code, pruned shapes) is left for the run to check."""
    if target_modules == "all-linear":
        return None
    from prunekit.loading import peek_config

    try:
        config = peek_config(model_id)
        if config is None or not hasattr(config, "to_dict"):
            return None
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - anything the config cannot give is the run's to check
        return None
    try:
        lora_targets(skeleton, target_modules)
    except RecipeError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------


def kd_loss(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The distillation term: ``T² · mean over positions of KL(q_T ‖ q_S)``, in float32.

    Over the whole vocabulary (``teacher_indices`` None, ``teacher_values`` the teacher's
    logits): ``q_T = softmax(z_T / T)`` and ``q_S = softmax(z_S / T)``. With the teacher's
    top-k (``teacher_values`` its k largest logits, ``teacher_indices`` their token ids): both
    distributions are restricted to those k tokens and renormalised there,
    ``q_T = softmax(z_T[idx] / T)``, ``q_S = softmax(z_S[idx] / T)``; with k the whole
    vocabulary it is the full KL. ``student_logits`` ``[..., V]`` and ``teacher_values``
    ``[..., V or k]`` cover the same positions (the caller drops the last one, which predicts
    no token of the window, as the next-token loss does); the mean is over every position
    of the batch, as the next-token loss's is. ``T²`` keeps the gradients' scale independent
    of ``T`` (Hinton et al., 2015); at ``T = 1`` it is 1."""
    s = student_logits.float()
    if teacher_indices is not None:
        s = s.gather(-1, teacher_indices.long())
    t = teacher_values.float()
    if s.shape != t.shape:
        raise RecoveryError(
            f"kd_loss: student {tuple(s.shape)} and teacher {tuple(t.shape)} disagree (the "
            "same positions, and the vocabulary or the teacher's top-k, on both)"
        )
    log_qs = F.log_softmax(s / temperature, dim=-1)
    log_qt = F.log_softmax(t / temperature, dim=-1)
    # the sum over positions and tokens of q_T * (log q_T - log q_S)
    total = F.kl_div(log_qs, log_qt, log_target=True, reduction="sum")
    positions = t.numel() // t.shape[-1]
    return total / positions * temperature**2


def teacher_targets(
    logits: torch.Tensor, top_k: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What :func:`kd_loss` takes from the teacher's ``logits`` ``[B, T, V]``: positions
    ``0..T-2`` (those with a next token), as ``(logits, None)`` or, with ``top_k``, as the k
    largest logits and their token ids (int32) per position."""
    logits = logits[:, :-1]
    if top_k is None:
        return logits, None
    vocab = logits.shape[-1]
    if top_k > vocab:
        raise RecoveryError(
            f"recovery.kd.top_k is {top_k}, but the teacher's logits cover {vocab} tokens: "
            f"set top_k to at most {vocab}, or null for the whole vocabulary"
        )
    values, indices = torch.topk(logits, top_k, dim=-1)
    return values, indices.to(torch.int32)


class OnlineTeacher:
    """The dense model beside the student: a forward pass (no gradient, eval mode) on every
    micro-batch the student sees. ``source`` says where it came from (results.json)."""

    mode = "online"

    def __init__(self, model: nn.Module, top_k: int | None = None, source: str = "") -> None:
        self.model, self.top_k, self.source = model.eval(), top_k, source

    def targets(self, rows: list[int], ids: torch.Tensor):
        from prunekit.devices import input_device

        with torch.no_grad():
            out = self.model(input_ids=ids.to(input_device(self.model)), use_cache=False)
        return teacher_targets(out.logits, self.top_k)

    def describe(self) -> dict:
        return {"mode": self.mode, "source": self.source, "top_k": self.top_k}

    def release(self) -> None:
        self.model = None


class TeacherCache:
    """The teacher's top-k logits and token ids per position of every window the fine-tune
    will see, computed once (:meth:`build`) so that the teacher can be freed before it."""

    mode = "cache"

    def __init__(
        self,
        values: torch.Tensor,
        indices: torch.Tensor,
        slots: dict[int, int],
        source: str = "",
        info: dict | None = None,
    ) -> None:
        self.values, self.indices, self.slots = values, indices, slots
        self.top_k, self.source, self.info = int(values.shape[-1]), source, info or {}

    @classmethod
    def build(
        cls,
        model: nn.Module,
        windows: torch.Tensor,
        settings,
        seed: int = 0,
        source: str = "",
        description: str = "recovery teacher",
    ) -> TeacherCache:
        """Run ``model`` over the windows the fine-tune of ``settings`` will see (in its
        micro-batches, in its order: each window's targets are computed in the batch it is
        first trained in, so they equal an online teacher's there) and keep the top-k."""
        from prunekit.devices import input_device

        kd = settings.distillation
        if kd is None or kd.top_k is None:
            raise RecoveryError("recovery.kd.cache needs recovery.kd.top_k (what to keep)")
        windows = windows.long()
        n, micros = windows.shape[0], settings.steps * settings.grad_accum
        batches = [window_rows(m, n, settings.batch_size, seed) for m in range(micros)]
        slots: dict[int, int] = {}
        for rows in batches:
            for r in rows:
                slots.setdefault(r, len(slots))
        positions = windows.shape[1] - 1
        device = input_device(model)
        values = indices = None
        done: set[int] = set()
        t0 = time.perf_counter()
        peak = MemoryPeak(device)
        model.eval()
        with progress_bar(len(slots), description) as update, torch.no_grad():
            for rows in batches:
                new = [j for j, r in enumerate(rows) if r not in done]
                if not new:
                    continue
                out = model(input_ids=windows[rows].to(device), use_cache=False)
                v, i = teacher_targets(out.logits, kd.top_k)
                if values is None:
                    shape = (len(slots), positions, kd.top_k)
                    values = torch.empty(shape, dtype=v.dtype)
                    indices = torch.empty(shape, dtype=torch.int32)
                for j in new:
                    if rows[j] in done:  # twice in one micro-batch
                        continue
                    values[slots[rows[j]]] = v[j].cpu()
                    indices[slots[rows[j]]] = i[j].cpu()
                    done.add(rows[j])
                update(len(done))
        info = {
            "windows": len(slots),
            "positions": positions,
            "bytes": values.numel() * values.element_size() + indices.numel() * 4,
            "seconds": time.perf_counter() - t0,
            "memory": peak.read(),
        }
        return cls(values, indices, slots, source, info)

    def targets(self, rows: list[int], ids: torch.Tensor):
        at = [self.slots[r] for r in rows]
        return self.values[at].to(ids.device), self.indices[at].to(ids.device)

    def describe(self) -> dict:
        return {"mode": self.mode, "source": self.source, "top_k": self.top_k, **self.info}

    def release(self) -> None:
        self.values = self.indices = None


def cache_bytes(windows: int, seq_len: int, top_k: int, value_bytes: int = 4) -> int:
    """Bytes :class:`TeacherCache` holds for ``windows`` windows of ``seq_len`` tokens: a
    value (the logits' dtype) and an int32 token id per kept token and position."""
    return windows * (seq_len - 1) * top_k * (value_bytes + 4)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def process_peak_rss() -> int | None:
    """The process's peak resident set size so far, in bytes: ``VmHWM`` of
    ``/proc/self/status`` (Linux), else ``ru_maxrss``; None when neither is known. It counts
    what torch allocates outside Python's allocator (tracemalloc does not) and is never reset
    here (the runtime section reads the same high-water mark)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except (ImportError, OSError):  # pragma: no cover - Windows
        return None


class MemoryPeak:
    """Peak memory from now on: on CUDA, the allocated peak (the counter is reset here); on
    every device, the process's peak RSS before and after (a high-water mark of the whole
    process: a phase set a new one when ``after`` exceeds ``before``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.before = process_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict:
        out = {"process_peak_rss_bytes_before": self.before}
        out["process_peak_rss_bytes"] = process_peak_rss()
        if self.device.type == "cuda":
            out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out


def check_distillation(recipe, device: torch.device | None = None) -> tuple[tuple, str] | None:
    """``(recipe key, message)`` for ``recovery.loss`` and ``recovery.kd`` settings that cannot
    run, None when they can (or cannot be told without loading weights). The model's config
    (read without weights) gives the vocabulary; with ``device`` (the run happens on this
    machine) the memory the teacher needs is checked against what the device has in all:
    the online teacher is a second copy of the dense weights, the cached one keeps
    :func:`cache_bytes` in RAM beside the model."""
    r = recipe.recovery
    if r.kd is not None and r.loss == "ce":
        return (
            ("recovery", "kd"),
            "recovery.kd sets up distillation, but recovery.loss is ce (the next-token loss "
            "alone): set recovery.loss: kd or ce+kd, or remove recovery.kd",
        )
    kd = r.distillation
    if kd is None:
        return None
    if r.loss == "kd" and kd.weight != 1.0:  # 1.0, the default, is what a dump spells out
        return (
            ("recovery", "kd", "weight"),
            f"the weight ({kd.weight:g}) mixes the kd term into ce + weight * kd "
            "(recovery.loss: ce+kd); with recovery.loss: kd the loss is the kd term alone: "
            "remove kd.weight or use ce+kd",
        )
    if kd.cache and kd.top_k is None:
        return (
            ("recovery", "kd", "cache"),
            "the cache keeps the teacher's top-k logits per position (the whole vocabulary "
            "for every position of every window would not fit): set recovery.kd.top_k "
            "(e.g. 64), or cache: false to run the teacher beside the fine-tune",
        )
    from prunekit.errors import ModelError
    from prunekit.loading import peek_config

    try:
        config = peek_config(recipe.model.id)
    except ModelError:
        return None  # model.id's own check says why
    text = config
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        text = config.get_text_config()
    vocab = getattr(text, "vocab_size", None)
    if kd.top_k is not None and isinstance(vocab, int) and kd.top_k > vocab:
        return (
            ("recovery", "kd", "top_k"),
            f"top_k {kd.top_k} is above the vocabulary of {recipe.model.id} ({vocab} tokens): "
            f"set at most {vocab}, or null for the whole vocabulary",
        )
    if device is None or recipe.model.device == "auto":
        return None  # elsewhere, or spread by accelerate over what there is
    from prunekit.host import gib, memory_available, parameter_count
    from prunekit.loading.resolve import resolve_dtype

    n = parameter_count(recipe.model.id, config)
    if not n:
        return None
    itemsize = resolve_dtype(recipe.model.dtype).itemsize
    need = n * itemsize
    if not kd.cache:
        memory = memory_available(device)
        where = "this GPU" if device.type == "cuda" else "this machine (RAM and swap)"
        if memory is not None and 2 * need > memory[1]:
            return (
                ("recovery", "loss"),
                f"the online teacher is a second copy of the dense weights: with the model "
                f"being fine-tuned the run holds up to {gib(2 * need)}, more than {where} has "
                f"in all ({gib(memory[1])}): set recovery.kd.cache: true with a top_k (the "
                "teacher runs once before pruning, so one model is held), a smaller "
                "model.dtype, or recovery.loss: ce",
            )
        return None
    windows = min(r.samples, r.steps * r.grad_accum * r.batch_size)
    cached = cache_bytes(windows, r.seq_len, kd.top_k, itemsize)
    memory = memory_available(torch.device("cpu"))
    beside = need if device.type == "cpu" else 0
    if memory is not None and cached + beside > memory[1]:
        return (
            ("recovery", "kd", "top_k"),
            f"the teacher's cache of top-{kd.top_k} for {windows} windows of {r.seq_len} "
            f"tokens takes {gib(cached)}"
            + (f", beside the weights' {gib(need)}," if beside else "")
            + f" more than this machine's RAM and swap ({gib(memory[1])}): lower top_k, "
            "recovery.samples or recovery.steps",
        )
    return None


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def window_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of the ``n`` windows in pass ``epoch`` over them (seeded)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def window_rows(micro: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The windows of micro-batch ``micro``: ``batch_size`` consecutive places in the passes
    over the ``n`` windows, each pass in its :func:`window_order`."""
    rows, order = [], (None, None)
    for k in range(micro * batch_size, (micro + 1) * batch_size):
        epoch, i = divmod(k, n)
        if order[0] != epoch:
            order = (epoch, window_order(seed, epoch, n))
        rows.append(int(order[1][i]))
    return rows


class LoraTrainer:
    """LoRA fine-tuning of ``model`` on ``windows`` (``[N, T]`` token ids), seeded, with
    checkpoints and resumption.

    :param settings: a :class:`~prunekit.recipe.FineTuneConfig` (``recovery:``'s
        :class:`~prunekit.recipe.RecoveryConfig` is one).
    :param checkpoint_dir: where checkpoints go (None: none are written or resumed).
    :param identity: what makes a checkpoint resumable (e.g. the recipe's model and method);
        combined with the settings, the base weights and the windows into the checkpoints' key.
    :param teacher: with ``settings.loss`` ``kd`` or ``ce+kd``, the dense parent's targets:
        an :class:`OnlineTeacher` or a :class:`TeacherCache` (built on these ``windows``).
    """

    def __init__(
        self,
        model: nn.Module,
        settings,
        windows: torch.Tensor,
        seed: int = 0,
        checkpoint_dir: str | os.PathLike | None = None,
        identity: dict | None = None,
        description: str = "recovery",
        teacher: OnlineTeacher | TeacherCache | None = None,
    ) -> None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise RecoveryError("recovery needs peft: pip install 'prunekit[recovery]'") from exc
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise RecoveryError(
                f"recovery needs a [N, T] tensor of windows, got {tuple(windows.shape)}"
            )
        #: the kd settings in force (None: the next-token loss alone)
        self.kd = getattr(settings, "distillation", None)
        if self.kd is not None and teacher is None:
            raise RecoveryError(
                f"recovery.loss {settings.loss!r} distils from the dense model: give the "
                "trainer its teacher (OnlineTeacher or TeacherCache)"
            )
        if self.kd is None and teacher is not None:
            raise RecoveryError(
                "a teacher was given, but recovery.loss is ce (no distillation): set "
                "recovery.loss: kd or ce+kd, or give no teacher"
            )
        if teacher is not None and teacher.top_k != self.kd.top_k:
            raise RecoveryError(
                f"the teacher keeps top_k {teacher.top_k}, recovery.kd.top_k is "
                f"{self.kd.top_k}: build it from these settings"
            )
        self.teacher = teacher
        self.settings, self.windows, self.seed = settings, windows.long(), int(seed)
        self.description = description
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.targets = lora_targets(model, settings.target_modules)
        from prunekit.devices import is_offloaded

        modules = dict(model.named_modules())
        offloaded = [n for n in self.targets if is_offloaded(modules[n])]
        if offloaded:
            raise RecoveryError(
                f"{len(offloaded)} adapted layers (the first: {offloaded[0]}) are offloaded to "
                "the CPU or the disk (model.device: auto), where LoRA cannot train them: give "
                "model.max_memory room for the whole model on its devices, or adapt fewer "
                "layers (target_modules)"
            )
        base_digest = tensor_sha256(dict(model.state_dict()))
        torch.manual_seed(self.seed)  # the adapters' initialisation
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=self.targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft reads a property transformers 5 renamed
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
            )
            self.peft_model = get_peft_model(model, config)
        self.trainable = [(n, p) for n, p in self.peft_model.named_parameters() if p.requires_grad]
        self.key = hashlib.sha256(
            json.dumps(
                {
                    "settings": _settings_dump(settings),
                    "seed": self.seed,
                    "identity": identity or {},
                    "base": base_digest,
                    "windows": tensor_sha256({"w": self.windows}),
                    "trainable": [(n, list(p.shape)) for n, p in self.trainable],
                },
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()[:16]
        self.losses: list[float] = []
        #: per step, the next-token and the distillation term (KD runs only)
        self.loss_parts: dict[str, list[float]] = {"ce": [], "kd": []}
        self.memory: dict | None = None
        self.step = 0
        self.resumed_from: int | None = None

    # -- data ----------------------------------------------------------------------------
    def rows(self, micro: int) -> list[int]:
        """The windows (row indices) of the ``micro``-th micro-batch: a seeded order per pass
        over the data, a function of ``micro`` alone (so a resumed run sees what an
        uninterrupted one does; :func:`window_rows`)."""
        return window_rows(micro, self.windows.shape[0], self.settings.batch_size, self.seed)

    def batch(self, micro: int) -> torch.Tensor:
        """The ``micro``-th micro-batch's token ids (``[batch_size, T]``)."""
        return self.windows[self.rows(micro)]

    # -- the loop --------------------------------------------------------------------------
    def train(
        self,
        on_gradients: Callable[[int], None] | None = None,
        extra_state: tuple[Callable[[], dict], Callable[[dict], None]] | None = None,
    ) -> dict:
        """Run (or resume) the fine-tune; returns its record (settings, losses, timing).

        :param on_gradients: ``f(step)`` after each step's accumulated backward pass, before
            gradient clipping and the optimizer step (1-based step).
        :param extra_state: ``(get, set)``: a method's own state, saved with each checkpoint
            and given back on resumption.
        """
        from transformers import get_scheduler

        s = self.settings
        model = self.peft_model
        device = next(p.device for _, p in self.trainable)
        optimizer = torch.optim.AdamW(
            [p for _, p in self.trainable], lr=s.lr, weight_decay=s.weight_decay
        )
        scheduler = get_scheduler(
            s.scheduler, optimizer, num_warmup_steps=s.warmup_steps, num_training_steps=s.steps
        )
        torch.manual_seed(self.seed + 1)  # dropout
        self._resume(optimizer, scheduler, extra_state)
        t0 = time.perf_counter()
        peak = MemoryPeak(device)
        model.train()
        try:
            with progress_bar(s.steps, self.description, start=self.step) as update:
                while self.step < s.steps:
                    total = torch.zeros((), dtype=torch.float64)
                    parts = torch.zeros(2, dtype=torch.float64)
                    for m in range(s.grad_accum):
                        rows = self.rows(self.step * s.grad_accum + m)
                        ids = self.windows[rows].to(device)
                        out = model(input_ids=ids, labels=ids)
                        loss = out.loss
                        if self.kd is not None:
                            ce = loss
                            values, indices = self.teacher.targets(rows, ids)
                            kd = kd_loss(out.logits[:, :-1], values, indices, self.kd.temperature)
                            loss = kd if s.loss == "kd" else ce + self.kd.weight * kd
                            parts += torch.stack([ce.detach(), kd.detach()]).double().cpu()
                        if not torch.isfinite(loss):
                            raise RecoveryError(
                                f"the recovery loss is {loss.item()} at step {self.step + 1}: "
                                "lower recovery.lr, or check the model's dtype (float32 is safest)"
                            )
                        (loss / s.grad_accum).backward()
                        total += loss.detach().double().cpu()
                    self.step += 1
                    if on_gradients is not None:
                        on_gradients(self.step)
                    if s.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(
                            [p for _, p in self.trainable], s.max_grad_norm
                        )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    self.losses.append(float(total) / s.grad_accum)
                    note = f"loss {self.losses[-1]:.4f}"
                    if self.kd is not None:
                        self.loss_parts["ce"].append(float(parts[0]) / s.grad_accum)
                        self.loss_parts["kd"].append(float(parts[1]) / s.grad_accum)
                        note += (
                            f" (ce {self.loss_parts['ce'][-1]:.4f}, "
                            f"kd {self.loss_parts['kd'][-1]:.4f})"
                        )
                    update(self.step, note)
                    if (
                        self.checkpoint_dir is not None
                        and s.checkpoint_every
                        and self.step % s.checkpoint_every == 0
                        and self.step < s.steps
                    ):
                        self._save(optimizer, scheduler, extra_state)
        finally:
            model.eval()
            self.memory = peak.read()
        return self.record(time.perf_counter() - t0)

    def release_teacher(self) -> None:
        """Drop the teacher (its model or cache) once the fine-tune is done."""
        if self.teacher is not None:
            self.teacher.release()
        self.teacher = None

    def record(self, seconds: float) -> dict:
        settings = _settings_dump(self.settings)
        if hasattr(self.settings, "loss"):  # recovery's: spelled out, even when ce
            settings = {"loss": self.settings.loss, **settings}
        kd = None
        if self.kd is not None:
            kd = {
                "teacher": self.teacher.describe() if self.teacher is not None else None,
                "loss_ce": self.loss_parts["ce"],
                "loss_kd": self.loss_parts["kd"],
            }
        return {
            "settings": settings,
            "seed": self.seed,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n in self.targets}),
            "adapted_layers": len(self.targets),
            "trainable_params": sum(p.numel() for _, p in self.trainable),
            "windows": int(self.windows.shape[0]),
            "seq_len": int(self.windows.shape[1]),
            "steps": self.step,
            "resumed_from_step": self.resumed_from,
            "seconds": seconds,
            "loss": self.losses,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
            "kd": kd,
            "memory": self.memory,
        }

    def merge(self, check: torch.Tensor | None = None) -> tuple[nn.Module, float | None]:
        """Merge the adapters into the weights and remove them; returns the plain model and,
        given ``check`` token ids, the largest absolute logit difference between the adapter
        model and the merged one on them."""
        before = None
        if check is not None:
            with torch.no_grad():
                before = self.peft_model(input_ids=check).logits.float()
        model = self.peft_model.merge_and_unload()
        diff = None
        if before is not None:
            with torch.no_grad():
                diff = float((model(input_ids=check).logits.float() - before).abs().max())
        return model.eval(), diff

    def unload(self) -> nn.Module:
        """Remove the adapters without merging them (the base weights as they were)."""
        return self.peft_model.unload().eval()

    # -- checkpoints -----------------------------------------------------------------------
    def _checkpoints(self) -> list[Path]:
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.glob(f"{STEP_PREFIX}*") if p.is_dir())

    def _save(self, optimizer, scheduler, extra_state) -> None:
        from safetensors.torch import save_file

        root = self.checkpoint_dir
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{STEP_PREFIX}{self.step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            save_file(
                {n: p.detach().cpu().contiguous() for n, p in self.trainable},
                str(tmp / "adapters.safetensors"),
            )
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "extra": extra_state[0]() if extra_state else None,
                },
                tmp / "trainer.pt",
            )
            (tmp / "meta.json").write_text(
                json.dumps(
                    {
                        "key": self.key,
                        "step": self.step,
                        "losses": self.losses,
                        "loss_parts": self.loss_parts,
                    }
                )
                + "\n"
            )
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self._checkpoints():  # only the newest is kept
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def _resume(self, optimizer, scheduler, extra_state) -> None:
        from safetensors.torch import load_file

        for ckpt in reversed(self._checkpoints()):
            try:
                meta = json.loads((ckpt / "meta.json").read_text())
                if meta.get("key") != self.key:
                    logger.warning(
                        "recovery checkpoint %s is from another run (other model, "
                        "settings or data): starting from step 0",
                        ckpt,
                    )
                    return
                adapters = load_file(str(ckpt / "adapters.safetensors"))
                state = torch.load(ckpt / "trainer.pt", weights_only=True)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                logger.warning(
                    "recovery checkpoint %s is unreadable (%s): trying an older one", ckpt, exc
                )
                continue
            params = dict(self.trainable)
            if set(adapters) != set(params):
                logger.warning(
                    "recovery checkpoint %s has other adapters: starting from step 0", ckpt
                )
                return
            with torch.no_grad():
                for name, value in adapters.items():
                    params[name].copy_(value)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            if extra_state is not None and state.get("extra") is not None:
                extra_state[1](state["extra"])
            self.step, self.losses = int(meta["step"]), list(meta["losses"])
            parts = meta.get("loss_parts") or {}
            self.loss_parts = {k: list(parts.get(k, [])) for k in ("ce", "kd")}
            self.resumed_from = self.step
            info(f"{self.description}: resuming from step {self.step} ({ckpt})")
            return

    def remove_checkpoints(self) -> None:
        if self.checkpoint_dir is not None and self.checkpoint_dir.is_dir():
            for ckpt in self._checkpoints():
                shutil.rmtree(ckpt, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.checkpoint_dir.rmdir()  # only when empty


def _settings_dump(settings) -> dict:
    """The settings that change the trained weights (not where checkpoints go)."""
    data = (
        settings.model_dump(mode="json")
        if hasattr(settings, "model_dump")
        else dict(vars(settings))
    )
    for key in ("checkpoint_every", "checkpoint_dir", "keep_checkpoints"):
        data.pop(key, None)
    return data


def default_checkpoint_dir(output_dir: str | os.PathLike, what: str = "recovery") -> Path:
    """``<output.dir>-<what>`` beside the output directory (it outlives an interrupted run)."""
    out = Path(output_dir)
    return out.with_name(f"{out.name}-{what}")


__all__ = [
    "OVERLAP_TOKENS",
    "LoraTrainer",
    "MemoryPeak",
    "OnlineTeacher",
    "RecoveryError",
    "TeacherCache",
    "cache_bytes",
    "check_distillation",
    "carve_out",
    "check_target_modules",
    "default_checkpoint_dir",
    "evaluated_token_streams",
    "kd_loss",
    "keep_out_evaluated",
    "lora_targets",
    "ngram_hashes",
    "process_peak_rss",
    "teacher_targets",
    "window_order",
    "window_rows",
]
