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

``n = floor(method.ratio * (L - len(skip_layers)))``: the ratio is the fraction of the blocks
that may be removed (the ones not in ``skip_layers``, which are never removed), rounded down,
with no ``L / (L - skipped)`` inflation. Ratio 0 removes nothing and reads no data. Cosines
are computed in fp64 from the model's hidden states; ties go to the lower layer index.
``method.target`` is refused at validate (depth methods have no allocator slot to solve a
budget with, yet).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch

from prunekit.plugin import Allocation, RecipeError, StaticMethod, hookimpl, info


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


def block_hidden_states(model, adapter, windows: torch.Tensor, batch_size: int, device):
    """Yield, per calibration batch, ``(inputs, outputs)``: each block's input and output
    hidden states ``[B, T, d]``, read by forward hooks on ``adapter.decoder_layers``."""
    layers = adapter.decoder_layers
    seen_in: dict[int, torch.Tensor] = {}
    seen_out: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):

        def pre(module, args, kwargs, _i=i):
            seen_in[_i] = (args[0] if args else kwargs["hidden_states"]).detach()

        def post(module, args, kwargs, output, _i=i):
            seen_out[_i] = (output[0] if isinstance(output, tuple) else output).detach()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                seen_in.clear()
                seen_out.clear()
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
                n = len(layers)
                yield [seen_in[i] for i in range(n)], [seen_out[i] for i in range(n)]
    finally:
        for h in handles:
            h.remove()


class DepthMethod(StaticMethod):
    """Remove ``n`` whole blocks (see the module's docstring) chosen by :meth:`choose` from
    per-block scores that :meth:`accumulate` sums over calibration tokens."""

    slots: dict[str, str] = {}
    removes_layers = True
    #: the name of the scores in ``results.json``'s ``extra``
    score_name = ""

    @classmethod
    def layer_ratio(cls, recipe, num_layers: int) -> float:
        """The ratio is the fraction of the unskipped blocks removed: no inflation."""
        m = recipe.method
        if len({i for i in m.skip_layers if 0 <= i < num_layers}) >= num_layers:
            raise ValueError("every layer is skipped")
        return m.ratio

    def statistics(self):
        return []

    def accumulate(self, sums: torch.Tensor, inputs, outputs, n: int) -> None:
        """Add this batch's per-token sums to ``sums`` (one entry per candidate)."""
        raise NotImplementedError

    def choose(self, scores: list[float | None], n: int) -> list[int]:
        """The blocks to remove from the per-candidate ``scores`` (None: not a candidate)."""
        raise NotImplementedError

    def candidates(self, num_layers: int, n: int) -> list[bool]:
        """Whether each entry of the scores is a candidate (default: each unskipped block)."""
        skip = set(self.settings.skip_layers)
        return [i not in skip for i in range(num_layers)]

    def scores(self, ctx, n: int) -> list[float | None]:
        """Mean per-token score of every candidate over the calibration windows."""
        adapter = ctx.adapter
        num = adapter.num_layers
        sums = torch.zeros(num, dtype=torch.float64)
        tokens = 0
        windows = ctx.calibration_windows()
        batches = block_hidden_states(
            ctx.model, adapter, windows, ctx.run.calibration.batch_size, ctx.device
        )
        for inputs, outputs in batches:
            self.accumulate(sums, inputs, outputs, n)
            tokens += inputs[0].shape[0] * inputs[0].shape[1]
        mean = (sums / tokens).tolist()
        ok = self.candidates(num, n)
        return [v if c else None for v, c in zip(mean, ok, strict=True)]

    def prune(self, ctx):
        adapter, settings = ctx.adapter, self.settings
        num = adapter.num_layers
        n = blocks_to_remove(settings.ratio, num, settings.skip_layers)
        scores: list[float | None] = [None] * num
        removed: list[int] = []
        if n > 0:
            scores = self.scores(ctx, n)
            removed = sorted(self.choose(scores, n))
        structure = []
        for row in Allocation().structure(adapter):
            if row["layer"] in removed:
                row = {**row, "heads": 0, "channels": 0, "removed": True}
            structure.append(row)
        shallow = adapter.remove_layers(removed) if removed else adapter
        if removed:
            info(f"{self.name}: removed blocks {removed} of {num}")
        view = SimpleNamespace(
            adapter=shallow,
            model=ctx.model,
            tokenizer=ctx.tokenizer,
            model_info=getattr(ctx, "model_info", None),
        )
        outcome = self.sliced_outcome(view, Allocation())
        outcome.structure = structure
        outcome.extra = {"removed_layers": removed, self.score_name: scores}
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


class BlockInfluence(DepthMethod):
    """ShortGPT: remove the ``n`` blocks of lowest ``1 - mean cos(h_in, h_out)``."""

    name = "block-influence"
    score_name = "block_influence"

    def accumulate(self, sums, inputs, outputs, n):
        for i, (a, b) in enumerate(zip(inputs, outputs, strict=True)):
            sums[i] += (1 - _cos(a, b)).double().sum().cpu()

    def choose(self, scores, n):
        ranked = sorted((s, i) for i, s in enumerate(scores) if s is not None)
        return [i for _, i in ranked[:n]]


class Angular(DepthMethod):
    """Gromov et al.: remove the ``n`` consecutive blocks whose input and output are closest
    in angular distance ``arccos(cos) / pi``."""

    name = "angular"
    score_name = "angular_distance"

    @classmethod
    def check_recipe(cls, recipe, num_layers):
        m = recipe.method
        if num_layers is None or m.ratio <= 0:
            return []
        n = blocks_to_remove(m.ratio, num_layers, m.skip_layers)
        longest = run = 0
        skip = set(m.skip_layers)
        for i in range(num_layers):
            run = 0 if i in skip else run + 1
            longest = max(longest, run)
        if n > longest:
            return [
                f"method.ratio: angular removes {n} consecutive blocks at ratio {m.ratio}, but "
                f"the longest run of blocks outside skip_layers {sorted(skip)} is {longest} of "
                f"{num_layers}; lower the ratio to at most {longest} blocks or skip fewer layers"
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
