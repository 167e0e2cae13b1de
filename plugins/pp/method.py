"""Probe Pruning: the methods ``pp``, ``pp-fullbatch``, ``pp-history`` and their controller.

Per batch and per pruned block (attention, MLP): select a probe (rows and positions of the
batch), push it through the block's input projections with full weights (attention among the
probe tokens only), fuse the probe's per-position mean of squares with the history at the same
true positions, score every head / channel with the metric, keep the top units (counts from
the allocator), run the full batch on the gathered kept weights, then update the history from
the full batch's kept activations. Layers in ``skip_layers`` run dense.

Modes (``method.mode``):

* ``sync`` (reference default): the probe is the current block's own input.
* ``async_intra``: the attention probe of layer l comes from the previous layer's residual
  after its attention (before its MLP); the MLP probe of layer l from layer l's input before
  attention. Each probe skips the block just before it, so it could run concurrently with it;
  here it runs sequentially (as the reference's LLaMA code does).
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from prunekit.plugin import (
    ATTN,
    MLP,
    DynamicModel,
    DynamicProtocol,
    Method,
    PruneOutcome,
    RecipeError,
    StateError,
    StaticMethod,
    Timers,
    __version__,
    execution_device,
    onloaded,
    pooled_topk,
    sha256_file,
    top_units,
)

MODES = ("sync", "async_intra")
STATE_FORMAT = "prunekit-dynamic-state"
STATE_VERSION = 1


class PPController:
    """The per-batch decision logic shared by every PP variant."""

    def __init__(
        self,
        adapter,
        settings,
        components: dict[str, Any],
        history: dict[tuple[int, str], torch.Tensor] | None,
        mode: str = "sync",
        calibration_samples: int = 0,
    ) -> None:
        self.adapter = adapter
        self.settings = settings
        self.mode = mode
        self.probe = components.get("probe")
        self.fusion = components.get("fusion")
        self.history_policy = components.get("history")
        counts = components["allocator"].counts(adapter, settings)
        self.counts = counts
        self.active = {
            key for key, keep in counts.items() if keep < adapter.layers()[key[0]].units(key[1])
        }
        metric = components["metric"]
        self.scorers = {}
        for key in self.active:  # a metric reads weights: real ones even when offloaded
            layer = adapter.layers()[key[0]]
            with onloaded(layer.module):
                self.scorers[key] = metric.prepare(layer, key[1])
        self.history = history
        self.history_state = {}
        if history is not None and self.history_policy is not None:
            self.history_state = {
                key: self.history_policy.init_state(h, calibration_samples)
                for key, h in history.items()
            }
        self.update_history = True
        #: probe tokens of each block on the last batch (an int, or a 0-d tensor read only
        #: when reported, so that deciding never waits for the device)
        self.probe_tokens: dict[tuple[int, str], int | torch.Tensor] = {}
        self.timers = Timers()  # replaced by the runtime's timers once wrapped
        self._initial = self.snapshot()

    # -- state -------------------------------------------------------------------------------
    def snapshot(self):
        return copy.deepcopy((self.history, self.history_state))

    def restore(self, snap) -> None:
        self.history, self.history_state = copy.deepcopy(snap)

    def reset(self) -> None:
        """Back to the post-calibration state (before any evaluation batch)."""
        self.restore(self._initial)

    # -- decisions ---------------------------------------------------------------------------
    def _probe_inputs(self, layer, group, x, residual, batch):
        """``(probe input, rank source, rank key)``: what the probe runs on, the residual its
        tokens are ranked on and that residual's key in the batch state."""
        if self.mode == "async_intra":
            if group == ATTN:  # the previous layer's residual before its MLP
                prev = batch.residuals.get((layer.index - 1, MLP))
                if prev is not None:
                    return layer.group_input(ATTN, prev), prev, (layer.index - 1, MLP)
            else:  # this layer's residual before its attention
                h_in = batch.residuals[(layer.index, ATTN)]
                return layer.group_input(MLP, h_in), h_in, (layer.index, ATTN)
        return x, residual, (layer.index, group)

    def _select(self, xs, rank, rank_key, batch):
        """The probe's ``(rows, cols)``; a selector ranking on the residual norm gets the norms
        from the layer's own RMSNorm when it computed them (no second pass over the residual)."""
        if getattr(self.probe, "rank_on", "residual") == "normalized":
            return self.probe(xs, batch.token_mask)
        sq_mean = batch.residual_sq_means.get(rank_key)
        if sq_mean is not None and getattr(self.probe, "takes_norms", False):
            norms = (sq_mean[..., 0] * rank.shape[-1]).sqrt()
            return self.probe(rank, batch.token_mask, norms=norms)
        return self.probe(rank, batch.token_mask)

    def _history_rows(self, key, positions, mask):
        """The history at each probe position: the mean over the probe's rows of ``H`` at
        their true positions (``mask`` None: every probe token is real)."""
        h = self.history[key]
        positions = positions.clamp(max=h.shape[0] - 1)
        if mask is None and positions.shape[0] == 1:  # one row: its history rows themselves
            return h.index_select(0, positions[0])
        rows = h[positions]  # [b', t', D]
        if mask is None:  # exactly the masked mean below with an all-true mask
            return rows.sum(0) / rows.shape[0]
        m = mask.unsqueeze(-1).to(rows.dtype)
        return (rows * m).sum(0) / m.sum(0).clamp(min=1)

    def decide(self, layer, group, x, residual, batch):
        key = (layer.index, group)
        if key not in self.active:
            return None
        device = x.device
        if self.probe is None:  # history only: the mask comes from the (EMA-updated) history
            positions = int(batch.position_ids[batch.token_mask].max()) + 1
            S = self.history[key][:positions].sum(0)
        else:
            with self.timers("probe", device):
                S = self._probe_importance(key, layer, group, x, residual, batch)
        with self.timers("score", device):
            scores = self.scorers[key]({"S": S})
            return top_units(scores, self.counts[key])

    def _probe_importance(self, key, layer, group, x, residual, batch) -> torch.Tensor:
        xs, rank, rank_key = self._probe_inputs(layer, group, x, residual, batch)
        rows, cols = self._select(xs, rank, rank_key, batch)
        xp = xs.index_select(0, rows).index_select(1, cols)
        pos = batch.position_ids.index_select(0, rows).index_select(1, cols)
        # an unpadded batch builds and applies no masks (the same numbers as an all-true mask)
        mask = (
            None if batch.unpadded else batch.token_mask.index_select(0, rows).index_select(1, cols)
        )
        sq = layer.probe(group, xp, pos, mask).float().square()
        if mask is None:  # one probe row (the default 5% of 20): its own squares, no mean
            P = sq[0] if sq.shape[0] == 1 else sq.sum(0) / sq.shape[0]  # [t', D]
            self.probe_tokens[key] = pos.numel()
        else:
            sq = torch.where(mask.unsqueeze(-1), sq, 0.0)
            P = sq.sum(0) / mask.sum(0).clamp(min=1).unsqueeze(-1)  # [t', D]
            self.probe_tokens[key] = mask.sum()  # a tensor: read when reported, no sync here
        G = self._history_rows(key, pos, mask) if self.history is not None else None
        return self.fusion(P, G)

    def wants_activations(self, layer, group) -> bool:
        return (
            self.update_history
            and self.history is not None
            and self.history_policy is not None
            and (layer.index, group) in self.active
        )

    def observe(self, layer, group, kept, activations, batch) -> None:
        key = (layer.index, group)
        channels = None if kept is None else layer.unit_channels(group, kept)
        with torch.no_grad(), self.timers("history", activations.device):
            self.history_policy.update(
                self.history[key],
                self.history_state.get(key, {}),
                channels,
                activations,
                batch.token_mask,
                batch.position_ids,
            )

    # -- reporting ---------------------------------------------------------------------------
    def figures(self, batch_size: int, seq_len: int) -> dict[str, float]:
        """PP's own figures for a timed batch (``runtime`` section of results.json)."""
        return {"probe_flops_fraction": self.probe_flops_fraction(batch_size, seq_len)}

    def probe_flops_fraction(self, batch_size: int, seq_len: int) -> float:
        """Probe MACs / dense decoder-layer MACs for the last batch (pp-spec section 8).

        Probe: the input projections (q, k, v; gate, up) on the probe tokens, from the
        adapter's ``input_macs``; the probe's own attention matmuls and the scoring are not
        counted (the reference's convention). Dense: the adapter's ``macs_per_token``.
        """
        probe = dense = 0.0
        tokens = batch_size * seq_len
        for layer in self.adapter.layers():
            dense += tokens * layer.macs_per_token(
                layer.num_heads, layer.intermediate_size, seq_len
            )
            for group in (ATTN, MLP):
                probe += int(self.probe_tokens.get((layer.index, group), 0)) * layer.input_macs(
                    group
                )
        return probe / dense if dense else 0.0


class SequenceController(PPController):
    """PP decided per sequence: each row of the batch is its own probe (its top positions by
    the selector's ranking, with the full batch's selector run on that row alone), fused with
    the history at its true positions, scored, and given its own kept set (``[B, k]``)."""

    def decide(self, layer, group, x, residual, batch):
        key = (layer.index, group)
        if key not in self.active:
            return None
        with self.timers("probe", x.device):
            S = self._row_importance(key, layer, group, x, residual, batch)
        with self.timers("score", x.device):
            scorer, keep = self.scorers[key], self.counts[key]
            pool = self.settings.options.get("pool")
            if pool is None:
                return torch.stack([top_units(scorer({"S": s}), keep) for s in S])
            # each row inside the batch's best fraction: the union the batch decodes on shrinks
            units = layer.units(group)
            scores = torch.stack([scorer({"S": s}) for s in S])
            return pooled_topk(scores, keep, math.ceil(pool * units))

    def _row_importance(self, key, layer, group, x, residual, batch) -> list[torch.Tensor]:
        xs, rank, _ = self._probe_inputs(layer, group, x, residual, batch)
        if getattr(self.probe, "rank_on", "residual") == "normalized":
            rank = xs
        token_mask = batch.token_mask
        bsz, device = xs.shape[0], xs.device
        picks = []
        for b in range(bsz):  # the selector sees one row at a time
            if bool(token_mask[b].any()):
                picks.append(self.probe(rank[b : b + 1], token_mask[b : b + 1])[1])
            else:  # an all-pad row: nothing to probe
                picks.append(torch.zeros(0, dtype=torch.long, device=device))
        width = max(1, max(p.numel() for p in picks))
        cols = torch.zeros(bsz, width, dtype=torch.long, device=device)
        valid = torch.zeros(bsz, width, dtype=torch.bool, device=device)
        for b, p in enumerate(picks):
            cols[b, : p.numel()] = p
            valid[b, : p.numel()] = True
        xp = xs.gather(1, cols[..., None].expand(-1, -1, xs.shape[-1]))
        pos = batch.position_ids.gather(1, cols)
        mask = token_mask.gather(1, cols) & valid
        zz = layer.probe(group, xp, pos, mask).float().square()  # [B, t', D]
        G = None
        if self.history is not None:
            h = self.history[key]
            G = h[pos.clamp(max=h.shape[0] - 1)]
        self.probe_tokens[key] = mask.sum()
        return [
            self.fusion(zz[b][mask[b]], None if G is None else G[b][mask[b]]) for b in range(bsz)
        ]


def kept_parameters(adapter, counts: dict[tuple[int, str], int], model) -> int:
    """Parameters a forward really uses with these kept counts (embeddings and norms included),
    from the adapter's cost model."""
    total = sum(p.numel() for p in model.parameters())
    for la in adapter.layers():
        total -= la.params(la.num_heads, la.intermediate_size) - la.params(
            counts[(la.index, ATTN)], counts[(la.index, MLP)]
        )
    return total


class ProbePruning(Method):
    """Probe Pruning (PP, ICLR 2025): probe, fuse with history, score, prune per batch."""

    name = "pp"
    dynamic = True
    slots = {
        "statistic": "sq_mean",
        "probe": "residual_rank",
        "fusion": "importance_scaled",
        "history": "ema",
        "metric": "pp_score",
        "allocator": "uniform",
    }
    option_defaults = {"mode": "sync"}
    #: the metric reads the fused importance S; a fusion may read the history
    provides = ("S", "history")
    #: the history starts from the calibration mean of squares
    needs = ("sq_mean",)
    #: the reference's protocol: each evaluation from the post-calibration history, after one
    #: unscored warm-up batch; the EMA history carries over from batch to batch
    protocol = DynamicProtocol(
        decides="batch", observes=("activations",), reset=True, warmup_batches=1, stateful=True
    )
    controller_class: type[PPController] = PPController

    @property
    def uses_history(self) -> bool:
        return "history" in self.slots

    @classmethod
    def check_recipe(cls, recipe, num_layers):
        problems = []
        mode = recipe.method.options.get("mode", "sync")
        if mode not in MODES:
            problems.append(f"method.mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        pool = recipe.method.options.get("pool")
        if (
            "pool" in cls.option_defaults
            and pool is not None
            and (isinstance(pool, bool) or not isinstance(pool, int | float) or not 0 < pool <= 1)
        ):
            problems.append(
                f"method.pool: {pool!r} is not a fraction of a block's units in "
                "(0, 1]; give e.g. 0.6, or null for no pool"
            )
        if "history" in cls.slots:
            cal = recipe.calibration.seq_len
            for i, p in enumerate(recipe.evaluation.perplexity):
                if p.seq_len > cal:
                    problems.append(
                        f"evaluation.perplexity.{i}.seq_len: {p.seq_len} tokens is longer than "
                        f"the calibration windows ({cal}); {cls.name} keeps its history per "
                        f"token position, so calibrate with calibration.seq_len >= {p.seq_len}"
                    )
        return problems

    @classmethod
    def check_state(cls, path: str, recipe) -> None:
        if "history" not in cls.slots:
            raise StateError(f"method {cls.name!r} keeps no history, so it has no state to load")
        meta = read_state_meta(path)
        check_state_meta(meta, path, recipe.model.id, cls.name)
        check_state_file(path, meta)  # before any weight loads
        positions = (meta.get("calibration") or {}).get("seq_len")
        for i, p in enumerate(recipe.evaluation.perplexity):
            if positions is not None and p.seq_len > positions:
                raise StateError(
                    f"{path}: the saved history covers {positions} positions, but "
                    f"evaluation.perplexity.{i}.seq_len is {p.seq_len}; recalibrate with "
                    f"calibration.seq_len >= {p.seq_len} (remove method.state.load)"
                )

    def statistics(self):
        return [self.components["statistic"]] if self.uses_history else []

    def _history(self, ctx, active_keys) -> dict[tuple[int, str], torch.Tensor]:
        """The calibration history of every block (kept for all blocks, so that a saved state
        serves any ratio or skipped-layer setting); only active blocks are ever updated."""
        load = ctx.run.method.state.load
        if load:
            history = load_state(load, ctx, self)
            missing = sorted(set(active_keys) - set(history))
            if missing:
                raise StateError(
                    f"{load}: the saved state has no history for blocks {missing}; "
                    "remove method.state.load to recalibrate"
                )
            return history
        stat = self.components["statistic"]
        stats = ctx.statistics([stat])[stat.name]
        out = {}
        for key in stats:
            device = execution_device(ctx.adapter.layers()[key[0]].module)  # the block's own
            tensors = stats[key]
            if "sq_mean" not in tensors:
                raise RecipeError(
                    f"method.statistic: {stat.name!r} gives {sorted(tensors)}, but {self.name} "
                    "needs a per-position 'sq_mean' history"
                )
            out[key] = tensors["sq_mean"].to(device=device, dtype=torch.float32).clone()
        return out

    def prune(self, ctx) -> PruneOutcome:
        adapter, settings = ctx.adapter, self.settings
        allocator = self.components["allocator"]
        if not hasattr(allocator, "counts"):
            raise RecipeError(
                f"method.allocator: {self.name} decides per batch and needs an allocator with "
                "fixed per-layer counts (e.g. 'uniform')"
            )
        counts = allocator.counts(adapter, settings)
        active = [k for k, keep in counts.items() if keep < adapter.layers()[k[0]].units(k[1])]
        history = self._history(ctx, active) if self.uses_history else None
        controller = self.controller_class(
            adapter,
            settings,
            self.components,
            history,
            mode=settings.options.get("mode", "sync"),
            calibration_samples=ctx.run.calibration.samples,
        )
        model = DynamicModel(ctx.model, adapter, controller, protocol=self.protocol)
        structure = [
            {
                "layer": la.index,
                "heads": counts[(la.index, ATTN)],
                "channels": counts[(la.index, MLP)],
            }
            for la in adapter.layers()
        ]

        def save(path: str) -> None:
            save_state(path, controller, ctx, self)

        return PruneOutcome(
            model=model,
            dynamic=True,
            structure=structure,
            params_kept=kept_parameters(adapter, counts, ctx.model),
            save=save,
            figures=controller.figures,
        )


class SequenceProbePruning(ProbePruning):
    """PP per sequence (``pp-seq``): one probe and one kept set per row of the batch.

    Each row's probe is its own top tokens (``probe.ratio_seq`` of its positions, 10% by
    default: 2x PP's default probe budget at batch 20); fusion with the history, score and
    allocation as ``pp``. Rows that happen to share a kept set run together; the runtime runs
    the others as separate gathered matmuls. The history's EMA averages each channel over the
    rows that kept it. Meant for batches of unrelated passages, where one kept set per batch
    fits none of them well."""

    name = "pp-seq"
    slot_options = {"probe": {"ratio_seq": 0.1}}
    #: ``pool``: each row keeps its units inside the batch's best ``pool`` fraction of each
    #: block's units (None: anywhere), so that the union a batch decodes on stays small
    option_defaults = {"mode": "sync", "pool": None}
    protocol = DynamicProtocol(
        decides="sequence", observes=("activations",), reset=True, warmup_batches=1, stateful=True
    )
    controller_class = SequenceController


class FullBatchProbing(ProbePruning):
    """Full-batch probing: the whole batch is the probe; no calibration, no history.

    An oracle-like upper bound (an extra dense pass through q/k/v and gate/up), not an
    accelerator."""

    name = "pp-fullbatch"
    slots = {
        "probe": "full_batch",
        "fusion": "probe_only",
        "metric": "pp_score",
        "allocator": "uniform",
    }
    uses_calibration = False
    provides = ("S",)
    needs = ()
    protocol = DynamicProtocol(decides="batch", observes=(), reset=True, warmup_batches=1)


class HistoryOnly(ProbePruning):
    """No probe: each batch's mask comes from the calibration history as updated by the EMA
    after earlier batches (the paper's history-only ablation)."""

    name = "pp-history"
    slots = {"statistic": "sq_mean", "history": "ema", "metric": "pp_score", "allocator": "uniform"}
    option_defaults = {}
    provides = ("S",)


class CalibrationOnly(StaticMethod):
    """PP's score on the calibration statistics only (``S_j = Σ_t H[t, j]``), decided once and
    pruned physically like the other static methods (the calibration-only ablation)."""

    name = "pp-calib"
    slots = {
        "statistic": "sq_mean",
        "metric": "pp_score",
        "allocator": "uniform",
        "compensator": "none",
    }


# ------------------------------------------------------------------------------------------
# Saved state: the post-calibration history, versioned, tied to the model fingerprint
# ------------------------------------------------------------------------------------------


def _state_meta(ctx, method: Method) -> dict:
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "prunekit": __version__,
        "method": method.name,
        "statistic": getattr(method.components.get("statistic"), "name", None),
        "model_id": ctx.run.model.id,
        "model_fingerprint": ctx.model_info.get("fingerprint"),
        "calibration": ctx.identity()["calibration"],
        "seed": ctx.run.seed,
    }


def save_state(path: str, controller: PPController, ctx, method: Method) -> None:
    """Write the post-calibration history (not the evaluation-updated one)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    history, _ = controller._initial
    tensors = {
        f"{layer}.{group}": t.detach().cpu().contiguous()
        for (layer, group), t in (history or {}).items()
    }
    save_file(tensors, os.path.join(path, "state.safetensors"))
    meta = _state_meta(ctx, method)
    # checked by load_state: a truncated or altered state is refused, never used
    meta["state_sha256"] = sha256_file(Path(path, "state.safetensors"))
    Path(path, "state.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_state_meta(path: str) -> dict:
    meta_path = Path(path) / "state.json"
    if not meta_path.is_file():
        raise StateError(
            f"{path}: no state.json; give a directory written by a dynamic method "
            "with output.save_model: true (its 'model' subdirectory)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise StateError(
            f"{meta_path}: unreadable ({exc}); the state is damaged: save it again "
            "or remove method.state.load to recalibrate"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        meta = meta if isinstance(meta, dict) else {}
        raise StateError(
            f"{path}: not a prunekit dynamic-method state (format {meta.get('format')!r})"
        )
    return meta


def check_state_file(path: str, meta: dict) -> Path:
    """``state.safetensors``, checked against the sha256 that state.json recorded."""
    tensors_path = Path(path) / "state.safetensors"
    if not tensors_path.is_file():
        raise StateError(
            f"{path}: state.safetensors is missing; save the state again or remove "
            "method.state.load to recalibrate"
        )
    recorded = meta.get("state_sha256")
    if recorded is not None and sha256_file(tensors_path) != recorded:
        raise StateError(
            f"{tensors_path}: its sha256 differs from the one recorded in state.json "
            "when it was saved (truncated or altered); save the state again or "
            "remove method.state.load to recalibrate"
        )
    return tensors_path


def check_state_meta(meta: dict, path: str, model_id: str | None, method: str | None) -> None:
    if meta.get("version") != STATE_VERSION or meta.get("prunekit") != __version__:
        raise StateError(
            f"{path}: state written by prunekit {meta.get('prunekit')} (state format "
            f"{meta.get('version')}); this is prunekit {__version__} (format {STATE_VERSION}). "
            "Recalibrate: remove method.state.load."
        )
    if model_id is not None and meta.get("model_id") != model_id:
        raise StateError(
            f"{path}: state was computed for model {meta.get('model_id')!r}, "
            f"not {model_id!r}; remove method.state.load to recalibrate"
        )


def load_state(path: str, ctx, method: Method) -> dict[tuple[int, str], torch.Tensor]:
    from safetensors.torch import load_file

    meta = read_state_meta(path)
    check_state_meta(meta, path, ctx.run.model.id, method.name)
    fingerprint = ctx.model_info.get("fingerprint")
    if fingerprint and meta.get("model_fingerprint") not in (None, fingerprint):
        raise StateError(
            f"{path}: state belongs to other weights (fingerprint {meta['model_fingerprint']}, "
            f"this model {fingerprint}); remove method.state.load to recalibrate"
        )
    if meta.get("statistic") != getattr(method.components.get("statistic"), "name", None):
        raise StateError(
            f"{path}: state holds statistic {meta.get('statistic')!r}, "
            f"the recipe asks for another; remove method.state.load"
        )
    out = {}
    layers = ctx.adapter.layers()
    tensors_path = check_state_file(path, meta)
    try:
        tensors = load_file(str(tensors_path))
    except Exception as exc:
        raise StateError(
            f"{tensors_path}: unreadable ({type(exc).__name__}); save the state "
            "again or remove method.state.load to recalibrate"
        ) from None
    for flat, tensor in tensors.items():
        layer, group = flat.split(".")
        if int(layer) >= len(layers):
            raise StateError(
                f"{path}: state holds layer {layer}, the model has {len(layers)} "
                "layers; remove method.state.load to recalibrate"
            )
        device = execution_device(layers[int(layer)].module)
        out[(int(layer), group)] = tensor.to(device=device, dtype=torch.float32)
    return out
