"""The ``dense`` method: no pruning. The baseline every method is compared with."""

from __future__ import annotations

from prunekit.plugin import Method, PruneOutcome, hookimpl


class Dense(Method):
    """No pruning: the model as loaded (the baseline of every comparison)."""

    name = "dense"
    dynamic = False
    baseline = True
    slots: dict[str, str] = {}
    uses_calibration = False

    def prune(self, ctx) -> PruneOutcome:
        model = ctx.model
        params = sum(p.numel() for p in model.parameters())

        def save(path: str) -> None:
            ctx.save_hf_model(model, path)

        # The ratio is accepted (so `--set method.name=dense` works on any recipe) and ignored.
        extra = (
            {"note": "dense prunes nothing; method.ratio is ignored"} if ctx.settings.ratio else {}
        )
        return PruneOutcome(
            model=model,
            dynamic=False,
            structure=ctx.dense_structure(),
            params_kept=params,
            save=save,
            extra=extra,
        )


@hookimpl
def prunekit_register_methods(register):
    register("dense", Dense, description="no pruning (the baseline)")
