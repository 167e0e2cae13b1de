"""Depth pruning: remove whole decoder blocks, chosen by how little they change the hidden states.

Both methods run the calibration windows through the dense model once, read each block's input
and output hidden states with forward hooks on the adapter's ``decoder_layers`` (no
architecture names), and remove blocks physically (:meth:`ModelAdapter.remove_layers`: the
saved model is a plain Hugging Face checkpoint with fewer layers).

* ``block-influence`` (ShortGPT, Men et al. 2024): ``BI_l = 1 - mean_t cos(h_in_l[t],
  h_out_l[t])`` over every calibration token; the ``n`` blocks of lowest BI are removed.
* ``angular`` (Gromov et al. 2024): for ``n`` blocks, ``d_l = mean_t arccos(cos(h_in_l[t],
  h_out_{l+n-1}[t])) / pi``; the ``n`` consecutive blocks ``l..l+n-1`` of smallest ``d_l`` are
  removed (the paper reads the last token only; here every calibration token counts).

* ``attn-drop`` (He et al. 2024, "What matters in transformers? Not all attention is
  needed"): the same similarity on each attention sublayer, ``1 - mean_t cos(r[t], r[t] +
  update[t])`` with ``r`` the sublayer's residual input and ``update`` what it adds to it
  (the adapter's :meth:`~prunekit.components.LayerAdapter.add_output` of the output
  projection's output: post-norms included); the ``n`` attention sublayers of lowest score
  are dropped: sliced to no head, their K/V projections and KV-cache entries gone (the
  adapter declares it in :attr:`~prunekit.components.ModelAdapter.sublayers`). ``mlp-drop``
  does the same with MLP sublayers.

``n = floor(method.ratio * (L - len(skip_layers)))``: the ratio is the fraction of the units
(blocks or sublayers) that may be removed (those of layers not in ``skip_layers``, which are
never removed), rounded down, with no ``L / (L - skipped)`` inflation. Ratio 0 removes
nothing and reads no data. Cosines are computed in fp64 from the model's hidden states; ties
go to the lower layer index.

With ``method.target`` (``macs``, ``params``, ``kv_bytes_per_token``) the methods remove
units in their own order (lowest score first; for ``angular``, the best run of each length)
until the target is met: the smallest ``n`` that meets it. One calibration pass scores every
``n`` (angular's distances for every run length are accumulated together).
"""

from __future__ import annotations

import json
import math
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import torch

from prunekit.plugin import ATTN, MLP, Allocation, Budget, RecipeError, StaticMethod, hookimpl, info


def blocks_to_remove(ratio: float, num_layers: int, skip_layers) -> int:
    """``floor(ratio * (num_layers - skipped))``, the number of blocks a depth method removes
    (a tolerance of 1e-9 keeps ``0.3 * 10`` at 3)."""
    prunable = num_layers - len({i for i in skip_layers if 0 <= i < num_layers})
    return max(0, math.floor(ratio * prunable + 1e-9))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per token (``[..., d]`` -> ``[...]``), in fp64: a block that barely
    changes its input has a cosine within 1e-7 of 1, where fp32 would round the angle."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)


def _record_input(module, index: int, seen: dict[int, torch.Tensor]):
    """A forward pre-hook on decoder layer ``module`` recording its input as ``seen[index]``."""

    def pre(module, args, kwargs):
        seen[index] = (args[0] if args else kwargs["hidden_states"]).detach()

    return module.register_forward_pre_hook(pre, with_kwargs=True)


def _passes(model, windows: torch.Tensor, batch_size: int, device, handles, seen: list[dict]):
    """Run the calibration windows through ``model`` batch by batch, without gradients, with
    the hooks ``handles`` recording into the dicts ``seen`` (emptied before each batch);
    yields after each batch's forward. The hooks are removed at the end, or when the caller
    stops early."""
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                for d in seen:
                    d.clear()
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
                yield
    finally:
        for h in handles:
            h.remove()


def block_hidden_states(model, adapter, windows: torch.Tensor, batch_size: int, device):
    """Yield, per calibration batch, ``(inputs, outputs)``: each block's input and output
    hidden states ``[B, T, d]``, read by forward hooks on ``adapter.decoder_layers``."""
    layers = adapter.decoder_layers
    seen_in: dict[int, torch.Tensor] = {}
    seen_out: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):

        def post(module, args, kwargs, output, _i=i):
            seen_out[_i] = (output[0] if isinstance(output, tuple) else output).detach()

        handles.append(_record_input(layer, i, seen_in))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    n = len(layers)
    with closing(_passes(model, windows, batch_size, device, handles, [seen_in, seen_out])) as ps:
        for _ in ps:
            yield [seen_in[i] for i in range(n)], [seen_out[i] for i in range(n)]


def sublayer_residuals(model, adapter, windows: torch.Tensor, batch_size: int, device, group):
    """Yield, per calibration batch, ``(before, after)``: the residual stream entering and
    leaving ``group``'s sublayer of every layer ``[B, T, d]``. Read by a pre-hook on each
    decoder layer (its input) and forward hooks on the groups' output projections, then
    rebuilt through the adapter, ``r_next = add_output(group, r, output)`` in the layer's
    group order (post-norms included), so no architecture is named."""
    layers = adapter.layers()
    seen_in: dict[int, torch.Tensor] = {}
    seen_out: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for la in layers:
        handles.append(_record_input(adapter.decoder_layers[la.index], la.index, seen_in))
        for g in la.groups:

            def post(module, args, output, _key=(la.index, g)):
                seen_out[_key] = output.detach()

            handles.append(la.output_projection(g).register_forward_hook(post))
    with closing(_passes(model, windows, batch_size, device, handles, [seen_in, seen_out])) as ps:
        for _ in ps:
            before, after = [], []
            for la in layers:
                r = seen_in[la.index]
                for g in la.groups:
                    nxt = la.add_output(g, r, seen_out[(la.index, g)])
                    if g == group:
                        before.append(r)
                        after.append(nxt)
                    r = nxt
            yield before, after


class DepthMethod(StaticMethod):
    """Remove ``n`` whole blocks (see the module's docstring) chosen by :meth:`choose` from
    per-block scores that :meth:`accumulate` sums over calibration tokens; with
    ``method.target``, the smallest ``n`` whose removal meets it."""

    slots: dict[str, str] = {}
    removes_layers = True
    solves_target = True
    #: the name of the scores in ``results.json``'s ``extra``, and of the removed units
    score_name = ""
    removed_key = "removed_layers"
    #: what a unit is, in messages
    unit = "blocks"
    #: whether the scores depend on ``n`` (angular's runs of ``n`` blocks)
    depends_on_n = False

    @classmethod
    def layer_ratio(cls, recipe, num_layers: int) -> float:
        """The ratio is the fraction of the unskipped units removed: no inflation."""
        m = recipe.method
        if len({i for i in m.skip_layers if 0 <= i < num_layers}) >= num_layers:
            raise ValueError("every layer is skipped")
        return m.ratio

    # -- what can be removed, and what it leaves ---------------------------------------------
    @classmethod
    def max_units(cls, num_layers: int, skip_layers) -> int:
        """The most units the method may remove: every block outside ``skip_layers``, less one
        when none is skipped (a model keeps a layer)."""
        prunable = sum(1 for i in range(num_layers) if i not in set(skip_layers))
        return min(prunable, num_layers - 1)

    @classmethod
    def rows(cls, adapter, removed) -> list[dict]:
        """The structure with ``removed`` gone (rows of ``heads``, ``channels``, ``removed``)."""
        gone = set(removed)
        return [
            {**row, "heads": 0, "channels": 0, "removed": True} if row["layer"] in gone else row
            for row in Allocation().structure(adapter)
        ]

    @classmethod
    def lowest_removal(cls, adapter, skip_layers, top: int, cost) -> list[int]:
        """The ``top`` units whose removal leaves the least ``cost(rows)``: the bound a
        target is checked against before any score is known (greedy by each unit's own
        saving; exact when units cost the same or add up)."""
        skip = set(skip_layers)
        own = sorted(
            (cost(cls.rows(adapter, [i])), i) for i in range(adapter.num_layers) if i not in skip
        )
        return [i for _, i in own[:top]]

    @classmethod
    def check_target(cls, costs, settings, kind, value):
        adapter = costs.adapter
        top = cls.max_units(adapter.num_layers, settings.skip_layers)

        def cost(rows):
            return costs.costs(rows)[kind]

        lowest = cost(
            cls.rows(adapter, cls.lowest_removal(adapter, settings.skip_layers, top, cost))
        )
        if lowest > value:
            budget = Budget(kind, value, costs)
            return str(budget.unreachable(cls._most(top, settings.skip_layers), lowest))
        return None

    @classmethod
    def _most(cls, top: int, skip_layers) -> str:
        return f"removing {top} {cls.unit} (the most skip_layers {list(skip_layers)} allow)"

    # -- scores ------------------------------------------------------------------------------
    def statistics(self):
        return []

    def accumulate(self, sums: torch.Tensor, inputs, outputs, n: int) -> None:
        """Add this batch's per-token sums to ``sums`` (one entry per candidate)."""
        raise NotImplementedError

    def choose(self, scores: list[float | None], n: int) -> list[int]:
        """The units to remove from the per-candidate ``scores`` (None: not a candidate)."""
        raise NotImplementedError

    def candidates(self, num_layers: int, n: int) -> list[bool]:
        """Whether each entry of the scores is a candidate (default: each unskipped block)."""
        skip = set(self.settings.skip_layers)
        return [i not in skip for i in range(num_layers)]

    def batches(self, ctx):
        """Per calibration batch, the inputs and outputs the scores compare, per layer."""
        return block_hidden_states(
            ctx.model,
            ctx.adapter,
            ctx.calibration_windows(),
            ctx.run.calibration.batch_size,
            ctx.device,
        )

    def scores(self, ctx, ns: list[int]) -> dict[int, list[float | None]]:
        """Mean per-token score of every candidate over the calibration windows, for each
        ``n`` of ``ns`` (one pass over the windows)."""
        num = ctx.adapter.num_layers
        sums = {n: torch.zeros(num, dtype=torch.float64) for n in ns}
        tokens = 0
        for inputs, outputs in self.batches(ctx):
            for n in ns:
                self.accumulate(sums[n], inputs, outputs, n)
            tokens += inputs[0].shape[0] * inputs[0].shape[1]
        out = {}
        for n in ns:
            mean = (sums[n] / tokens).tolist()
            ok = self.candidates(num, n)
            out[n] = [v if c else None for v, c in zip(mean, ok, strict=True)]
        return out

    def decide(self, ctx) -> tuple[list[int], list[float | None]]:
        """``(removed, scores)``: ``n`` from the ratio, or the smallest ``n`` meeting
        ``ctx.budget``."""
        adapter, settings = ctx.adapter, self.settings
        num = adapter.num_layers
        budget = getattr(ctx, "budget", None)
        if budget is None:
            n = blocks_to_remove(settings.ratio, num, settings.skip_layers)
            if n == 0:
                return [], [None] * num
            scores = self.scores(ctx, [n])[n]
            return sorted(self.choose(scores, n)), scores
        if budget.met(self.rows(adapter, [])):
            return [], [None] * num
        top = self.max_units(num, settings.skip_layers)
        if top < 1:
            raise budget.unreachable(
                self._most(0, settings.skip_layers), budget.achieved(self.rows(adapter, []))
            )
        table = self.scores(ctx, list(range(1, top + 1)) if self.depends_on_n else [1])
        removed: list[int] = []
        for n in range(1, top + 1):
            scores = table[n if self.depends_on_n else 1]
            removed = sorted(self.choose(scores, n))
            if budget.met(self.rows(adapter, removed)):
                return removed, scores
        raise budget.unreachable(
            self._most(top, settings.skip_layers), budget.achieved(self.rows(adapter, removed))
        )

    # -- removing ----------------------------------------------------------------------------
    def prune(self, ctx):
        removed, scores = self.decide(ctx)
        prunable = sum(
            1 for i in range(ctx.adapter.num_layers) if i not in set(self.settings.skip_layers)
        )
        structure = self.rows(ctx.adapter, removed)
        if removed:
            info(f"{self.name}: removed {self.unit} {removed} of {ctx.adapter.num_layers}")
        outcome = self.remove(ctx, removed)
        outcome.structure = structure
        outcome.extra = {self.removed_key: removed, self.score_name: scores}
        if getattr(ctx, "budget", None) is not None:  # the ratio the target came to
            outcome.extra["ratio"] = len(removed) / max(1, prunable)
        return outcome

    def remove(self, ctx, removed: list[int]):
        """Remove the blocks physically; the saved model records them."""
        num = ctx.adapter.num_layers
        shallow = ctx.adapter.remove_layers(removed) if removed else ctx.adapter
        view = SimpleNamespace(
            adapter=shallow,
            model=ctx.model,
            tokenizer=ctx.tokenizer,
            model_info=getattr(ctx, "model_info", None),
        )
        outcome = self.sliced_outcome(view, Allocation())
        save = outcome.save

        def save_with_depth(path: str) -> None:
            save(path)
            meta_path = Path(path) / "prunekit.json"
            meta = json.loads(meta_path.read_text())
            meta["removed_layers"] = removed
            meta["dense_layers"] = num
            meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")

        outcome.save = save_with_depth
        return outcome


def _lowest_first(scores: list[float | None], n: int) -> list[int]:
    ranked = sorted((s, i) for i, s in enumerate(scores) if s is not None)
    return [i for _, i in ranked[:n]]


def _influence(sums: torch.Tensor, inputs, outputs) -> None:
    for i, (a, b) in enumerate(zip(inputs, outputs, strict=True)):
        sums[i] += (1 - _cos(a, b)).double().sum().cpu()


class BlockInfluence(DepthMethod):
    """ShortGPT: remove the ``n`` blocks of lowest ``1 - mean cos(h_in, h_out)``."""

    name = "block-influence"
    score_name = "block_influence"

    def accumulate(self, sums, inputs, outputs, n):
        _influence(sums, inputs, outputs)

    def choose(self, scores, n):
        return _lowest_first(scores, n)


class Angular(DepthMethod):
    """Gromov et al.: remove the ``n`` consecutive blocks whose input and output are closest
    in angular distance ``arccos(cos) / pi``."""

    name = "angular"
    score_name = "angular_distance"
    depends_on_n = True

    @classmethod
    def max_units(cls, num_layers, skip_layers):
        longest = run = 0
        skip = set(skip_layers)
        for i in range(num_layers):
            run = 0 if i in skip else run + 1
            longest = max(longest, run)
        return min(longest, num_layers - 1)

    @classmethod
    def lowest_removal(cls, adapter, skip_layers, top, cost):
        skip = set(skip_layers)
        runs = [
            list(range(s, s + top))
            for s in range(adapter.num_layers - top + 1)
            if not skip.intersection(range(s, s + top))
        ]
        return min(runs, key=lambda r: cost(cls.rows(adapter, r))) if runs else []

    @classmethod
    def _most(cls, top, skip_layers):
        return (
            f"removing {top} consecutive blocks (the longest run outside skip_layers "
            f"{list(skip_layers)})"
        )

    @classmethod
    def check_recipe(cls, recipe, num_layers):
        m = recipe.method
        if num_layers is None or m.ratio <= 0:
            return []
        n = blocks_to_remove(m.ratio, num_layers, m.skip_layers)
        longest = cls.max_units(num_layers, m.skip_layers)
        if n > longest:
            return [
                f"method.ratio: angular removes {n} consecutive blocks at ratio {m.ratio}, but "
                f"the longest run of blocks outside skip_layers {sorted(set(m.skip_layers))} is "
                f"{longest} of {num_layers}; lower the ratio to at most {longest} blocks or skip "
                "fewer layers"
            ]
        return []

    def candidates(self, num_layers, n):
        skip = set(self.settings.skip_layers)
        return [
            start + n <= num_layers and not skip.intersection(range(start, start + n))
            for start in range(num_layers)
        ]

    def accumulate(self, sums, inputs, outputs, n):
        for start in range(len(inputs) - n + 1):
            c = _cos(inputs[start], outputs[start + n - 1]).clamp(-1.0, 1.0)
            sums[start] += (torch.arccos(c) / math.pi).double().sum().cpu()

    def choose(self, scores, n):
        ranked = sorted((s, start) for start, s in enumerate(scores) if s is not None)
        if not ranked:
            raise RecipeError(
                f"method.ratio: angular found no {n} consecutive blocks outside skip_layers"
            )
        start = ranked[0][1]
        return list(range(start, start + n))


class SublayerDrop(DepthMethod):
    """Drop the ``n`` attention (``attn-drop``) or MLP (``mlp-drop``) sublayers of lowest
    ``1 - mean cos(r, r + update)``: sliced to zero units, which removes the whole sublayer
    where the adapter declares it (:attr:`ModelAdapter.sublayers`)."""

    removes_layers = False
    group = ATTN

    @classmethod
    def max_units(cls, num_layers, skip_layers):
        return sum(1 for i in range(num_layers) if i not in set(skip_layers))

    @classmethod
    def rows(cls, adapter, removed):
        key = "heads" if cls.group == ATTN else "channels"
        gone = set(removed)
        return [
            {**row, key: 0} if row["layer"] in gone else row
            for row in Allocation().structure(adapter)
        ]

    def batches(self, ctx):
        return sublayer_residuals(
            ctx.model,
            ctx.adapter,
            ctx.calibration_windows(),
            ctx.run.calibration.batch_size,
            ctx.device,
            self.group,
        )

    def accumulate(self, sums, inputs, outputs, n):
        _influence(sums, inputs, outputs)

    def choose(self, scores, n):
        return _lowest_first(scores, n)

    def remove(self, ctx, removed):
        none = torch.zeros(0, dtype=torch.long)
        return self.sliced_outcome(ctx, Allocation({(i, self.group): none for i in removed}))


class AttnDrop(SublayerDrop):
    name = "attn-drop"
    score_name = "attention_influence"
    removed_key = "dropped_attention"
    unit = "attention sublayers"
    group = ATTN
    drops_sublayers = (ATTN,)


class MlpDrop(SublayerDrop):
    name = "mlp-drop"
    score_name = "mlp_influence"
    removed_key = "dropped_mlp"
    unit = "MLP sublayers"
    group = MLP
    drops_sublayers = (MLP,)


@hookimpl
def prunekit_register_methods(register):
    register(
        "block-influence",
        BlockInfluence,
        description="ShortGPT: remove the blocks whose output is most like their input",
    )
    register(
        "angular",
        Angular,
        description="Gromov et al.: remove the n consecutive blocks of least angular change",
    )
    register(
        "attn-drop",
        AttnDrop,
        description="drop the attention sublayers whose update changes the residual least",
    )
    register(
        "mlp-drop",
        MlpDrop,
        description="drop the MLP sublayers whose update changes the residual least",
    )
