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
# The trainer
# --------------------------------------------------------------------------------------------


class LoraTrainer:
    """LoRA fine-tuning of ``model`` on ``windows`` (``[N, T]`` token ids), seeded, with
    checkpoints and resumption.

    :param settings: a :class:`~prunekit.recipe.FineTuneConfig` (``recovery:``'s
        :class:`~prunekit.recipe.RecoveryConfig` is one).
    :param checkpoint_dir: where checkpoints go (None: none are written or resumed).
    :param identity: what makes a checkpoint resumable (e.g. the recipe's model and method);
        combined with the settings, the base weights and the windows into the checkpoints' key.
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
    ) -> None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise RecoveryError("recovery needs peft: pip install 'prunekit[recovery]'") from exc
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise RecoveryError(
                f"recovery needs a [N, T] tensor of windows, got {tuple(windows.shape)}"
            )
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
        self.step = 0
        self.resumed_from: int | None = None

    # -- data ----------------------------------------------------------------------------
    def batch(self, micro: int) -> torch.Tensor:
        """The ``micro``-th micro-batch: windows in a seeded order per pass over the data, a
        function of ``micro`` alone (so a resumed run sees what an uninterrupted one does)."""
        n, size = self.windows.shape[0], self.settings.batch_size
        start = micro * size
        rows = []
        for k in range(start, start + size):
            epoch, i = divmod(k, n)
            rows.append(int(self._order(epoch)[i]))
        return self.windows[rows]

    def _order(self, epoch: int) -> torch.Tensor:
        cache = getattr(self, "_orders", None)
        if cache is None or cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            cache = (epoch, torch.randperm(self.windows.shape[0], generator=g))
            self._orders = cache
        return cache[1]

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
        model.train()
        try:
            with progress_bar(s.steps, self.description, start=self.step) as update:
                while self.step < s.steps:
                    total = torch.zeros((), dtype=torch.float64)
                    for m in range(s.grad_accum):
                        ids = self.batch(self.step * s.grad_accum + m).to(device)
                        loss = model(input_ids=ids, labels=ids).loss
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
                    update(self.step, f"loss {self.losses[-1]:.4f}")
                    if (
                        self.checkpoint_dir is not None
                        and s.checkpoint_every
                        and self.step % s.checkpoint_every == 0
                        and self.step < s.steps
                    ):
                        self._save(optimizer, scheduler, extra_state)
        finally:
            model.eval()
        return self.record(time.perf_counter() - t0)

    def record(self, seconds: float) -> dict:
        return {
            "settings": _settings_dump(self.settings),
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
                json.dumps({"key": self.key, "step": self.step, "losses": self.losses}) + "\n"
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
    "RecoveryError",
    "carve_out",
    "check_target_modules",
    "default_checkpoint_dir",
    "evaluated_token_streams",
    "keep_out_evaluated",
    "lora_targets",
    "ngram_hashes",
]
