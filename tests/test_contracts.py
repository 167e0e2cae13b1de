"""Open component kinds, needs/provides checks, the dynamic-method contract and fault
attribution: what a third-party plugin relies on, exercised through plugins registered here."""

from __future__ import annotations

import copy
from typing import Protocol, runtime_checkable

import pytest
import torch

import prunekit
from prunekit.components import MLP, DynamicProtocol, Method, MethodSettings, PruneOutcome
from prunekit.errors import PluginError, RecipeError, StorageError, storage_failure
from prunekit.evaluation.perplexity import perplexity
from prunekit.pruning.allocation import top_units
from prunekit.pruning.dynamic import DynamicModel
from prunekit.registry import get_registry
from prunekit.testing import tiny_llama, tiny_tokenizer

CAL = torch.randint(3, 128, (16, 16), generator=torch.Generator().manual_seed(1))


def _ids(seed: int, rows: int = 3, cols: int = 12) -> torch.Tensor:
    return torch.randint(3, 128, (rows, cols), generator=torch.Generator().manual_seed(seed))


# -- a plugin that declares its own kind ------------------------------------------------------


@runtime_checkable
class ChannelRanker(Protocol):
    """Ranks the MLP channels of a layer: higher is kept first."""

    def rank(self, layer) -> torch.Tensor: ...


class DownNorm:
    """Rank channels by the norm of their down-projection column."""

    def __init__(self, power: float = 2.0) -> None:
        self.power = power

    def rank(self, layer) -> torch.Tensor:
        return layer.output_projection(MLP).weight.detach().float().norm(p=self.power, dim=0)


class Reversed(DownNorm):
    """The opposite order (an ablation)."""

    def rank(self, layer) -> torch.Tensor:
        return -super().rank(layer)


class NotARanker:
    """Registered under the kind, but without ``rank``."""


class RankedPrune(Method):
    """Static: keep the top channels of a ranker (a slot of the plugin-declared kind)."""

    name = "ranked"
    slots = {"ranker": None}  # the kind's declared default
    uses_calibration = False

    def prune(self, ctx) -> PruneOutcome:
        from prunekit.components import Allocation
        from prunekit.pruning.static import slice_model
        from prunekit.ratios import kept_channels

        ranker, allocation = self.components["ranker"], Allocation()
        for la in ctx.adapter.layers():
            keep = kept_channels(la.intermediate_size, self.settings.ratio, 1)
            allocation.kept[(la.index, MLP)] = top_units(ranker.rank(la), keep)
        slice_model(ctx.adapter, allocation)
        return PruneOutcome(model=ctx.model, structure=allocation.structure(ctx.adapter))


class RankerPlugin:
    @prunekit.hookimpl
    def prunekit_register_kinds(self, register):
        register("ranker", ChannelRanker, "MLP channel rankers (test kind)", default="down_norm")

    @prunekit.hookimpl
    def prunekit_register_components(self, register):
        register("ranker", "down_norm", DownNorm)
        register("ranker", "reversed", Reversed)
        register("ranker", "not_a_ranker", NotARanker)
        register("method", "ranked", RankedPrune)


def test_a_plugin_declares_a_kind_and_a_method_uses_it(prunekit_pm):
    prunekit_pm.register_plugin(RankerPlugin(), "rankers")
    registry = get_registry(prunekit_pm)
    assert registry.kinds["ranker"].plugin == "rankers"
    assert "ranker" in registry.slot_kinds()
    for name in ("down_norm", "reversed"):
        out = prunekit.prune(
            tiny_llama(layers=2),
            method="ranked",
            ratio=0.5,
            skip_layers=[],
            ranker={"name": name, "power": 1.0},
        )
        assert all(row["channels"] == 48 for row in out.structure)
    # the default comes from the kind, a recipe line swaps it (string shorthand too)
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    default = prunekit.prune(copy.deepcopy(model), method="ranked", ratio=0.5, skip_layers=[])
    swapped = prunekit.prune(
        copy.deepcopy(model), method="ranked", ratio=0.5, skip_layers=[], ranker="reversed"
    )
    x = _ids(0)
    assert not torch.allclose(default.model(input_ids=x).logits, swapped.model(input_ids=x).logits)


def test_a_component_that_breaks_its_kinds_protocol_fails_at_validate(prunekit_pm):
    prunekit_pm.register_plugin(RankerPlugin(), "rankers")
    with pytest.raises(
        PluginError,
        match=r"ranker 'not_a_ranker' of plugin 'rankers' is not a "
        r"ChannelRanker \(it lacks rank\)",
    ):
        prunekit.prune(tiny_llama(), method="ranked", ratio=0.5, ranker="not_a_ranker")


def test_a_method_whose_kind_is_missing_fails_at_validate(prunekit_pm):
    class OnlyMethod:
        @prunekit.hookimpl
        def prunekit_register_methods(self, register):
            register("ranked", RankedPrune)

    prunekit_pm.register_plugin(OnlyMethod(), "only-method")
    with pytest.raises(RecipeError, match="slot 'ranker', but no installed plugin declares"):
        prunekit.prune(tiny_llama(), method="ranked", ratio=0.5)


@pytest.mark.parametrize(
    "problem, expected",
    [
        # the documented form: located at the key, the message whole (colons inside kept)
        (
            "method.power: 2 is too high: use at most 1",
            r"method\.power: 2 is too high: use at most 1$",
        ),
        # no key (a third-party method may write one): located at `method`, never cut short
        ("this model is too small to rank", r"method: this model is too small to rank$"),
        ("the ranker failed: see above", r"method: the ranker failed: see above$"),
    ],
)
def test_a_methods_recipe_problem_is_reported_whole(prunekit_pm, problem, expected):
    class Picky(RankedPrune):
        @classmethod
        def check_recipe(cls, recipe, num_layers):
            return [problem]

    class Plugin(RankerPlugin):
        @prunekit.hookimpl
        def prunekit_register_components(self, register):
            register("ranker", "down_norm", DownNorm)
            register("method", "ranked", Picky)

    prunekit_pm.register_plugin(Plugin(), "picky")
    with pytest.raises(RecipeError, match=expected):
        prunekit.prune(tiny_llama(layers=2), method="ranked", ratio=0.5, skip_layers=[])


def test_kind_declared_twice_and_unknown_kinds_name_the_plugins(prunekit_pm):
    class Again:
        @prunekit.hookimpl
        def prunekit_register_kinds(self, register):
            register("probe")

    prunekit_pm.register_plugin(Again(), "again")
    with pytest.raises(
        PluginError, match="kind 'probe' is declared twice: by plugin 'pp' and by plugin 'again'"
    ):
        get_registry(prunekit_pm)
    prunekit_pm.unregister(name="again")

    class Stray:
        @prunekit.hookimpl
        def prunekit_register_components(self, register):
            register("rankr", "x", DownNorm)

    prunekit_pm.register_plugin(Stray(), "stray")
    with pytest.raises(
        PluginError, match="plugin 'stray' registered a component of unknown kind 'rankr'"
    ):
        get_registry(prunekit_pm)


def test_an_old_style_hook_is_reported_not_ignored(prunekit_pm):
    class OldStyle:
        @prunekit.hookimpl
        def prunekit_register_probes(self, register):
            raise AssertionError("never called")

    prunekit_pm.register_plugin(OldStyle(), "old-style")
    with pytest.warns(
        RuntimeWarning,
        match="prunekit_register_probes, which is not a prunekit "
        "hook.*prunekit_register_components",
    ):
        get_registry(prunekit_pm)


def test_the_pp_kinds_come_from_the_pp_plugin():
    registry = get_registry()
    for kind in ("probe", "fusion", "history"):
        assert registry.kinds[kind].plugin == "pp"
    import prunekit.components as components

    assert not hasattr(components, "ProbeSelector")


# -- needs and provides -------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, swap, needle",
    [
        (
            "wanda-sp",
            {"metric": "flap"},
            "method.metric: metric 'flap' (plugin 'flap') needs "
            "'fluctuation', which this run does not provide: method.statistic 'sq_mean' (plugin "
            "'calibration') provides sq_mean",
        ),
        ("flap", {"statistic": "sq_mean"}, "Choose a statistic that provides it (fluctuation)"),
        (
            "wanda-sp",
            {"compensator": "bias_mean"},
            "compensator 'bias_mean' (plugin 'flap') needs 'mean'",
        ),
        (
            "pp-fullbatch",
            {"fusion": "history_only"},
            "fusion 'history_only' (plugin 'pp') needs 'history'",
        ),
        ("wanda-sp", {"metric": "taylor"}, "needs 'gradients'"),
        ("pp", {"statistic": "fluctuation"}, "method 'pp' (plugin 'pp') needs 'sq_mean'"),
    ],
)
def test_a_swap_that_cannot_work_fails_at_validate_naming_both(method, swap, needle):
    recipe = {
        "method": {"name": method, "ratio": 0.4, **{k: {"name": v} for k, v in swap.items()}},
        "evaluation": {"perplexity": []},
    }
    with pytest.raises(RecipeError) as err:
        prunekit.validate(recipe, check_files=False)
    assert needle in str(err.value)


def test_swaps_that_work_still_validate():
    for method, swap in (
        ("pp-calib", {"metric": "wanda_sp"}),
        ("wanda-sp", {"metric": "pp_score"}),
        ("flap", {"compensator": "none"}),
        ("pp", {"fusion": "fixed_ratio"}),
    ):
        recipe = {
            "method": {"name": method, "ratio": 0.4, **{k: {"name": v} for k, v in swap.items()}},
            "evaluation": {"perplexity": []},
        }
        prunekit.validate(recipe, check_files=False)


# -- the dynamic contract ------------------------------------------------------------------


class CountingController:
    """Keeps the MLP channels with the largest running |activation|; counts what it is asked."""

    def __init__(self, adapter, keep):
        self.keep = keep
        self.score = {la.index: torch.zeros(la.intermediate_size) for la in adapter.layers()}
        self.calls = {"decide": 0, "observe": 0, "reset": 0, "snapshot": 0}
        self._initial = copy.deepcopy(self.score)

    def decide(self, layer, group, x, residual, batch):
        if group != MLP:
            return None
        self.calls["decide"] += 1
        return top_units(self.score[layer.index], self.keep)

    def wants_activations(self, layer, group):
        return group == MLP

    def observe(self, layer, group, kept, activations, batch):
        self.calls["observe"] += 1
        a = activations.detach().float().abs()[batch.token_mask].mean(0)
        self.score[layer.index][kept] += a

    def snapshot(self):
        self.calls["snapshot"] += 1
        return copy.deepcopy(self.score)

    def restore(self, snap):
        self.score = copy.deepcopy(snap)

    def reset(self):
        self.calls["reset"] += 1
        self.restore(self._initial)

    def figures(self, batch_size, seq_len):
        return {"decisions_per_batch": self.calls["decide"]}


def _running_method(protocol: DynamicProtocol):
    class Running(Method):
        name = "running"
        dynamic = True
        uses_calibration = False

        def prune(self, ctx):
            controller = CountingController(ctx.adapter, keep=48)
            model = DynamicModel(ctx.model, ctx.adapter, controller, protocol=type(self).protocol)
            return PruneOutcome(model=model, dynamic=True, figures=controller.figures)

    Running.protocol = protocol
    return Running


@pytest.mark.parametrize(
    "protocol",
    [
        DynamicProtocol(reset=True, warmup_batches=2, stateful=True),
        DynamicProtocol(reset=False, warmup_batches=0, stateful=True),
        DynamicProtocol(observes=(), reset=True, warmup_batches=1),
    ],
)
def test_evaluation_follows_the_declared_protocol(protocol):
    method = _running_method(protocol)
    outcome = method(MethodSettings("running", 0.5), {}).prune(_ctx(tiny_llama(layers=2)))
    calls = outcome.model.controller.calls
    windows = torch.cat([_ids(s, rows=2) for s in range(3)])  # 3 batches of 2
    perplexity(outcome.model, windows, batch_size=2)
    layers = 2
    assert calls["reset"] == (1 if protocol.reset else 0)
    assert calls["decide"] == layers * (3 + protocol.warmup_batches)
    observed = "activations" in protocol.observes
    assert calls["observe"] == (layers * (3 + protocol.warmup_batches) if observed else 0)
    # a warm-up leaves no trace: the state after the evaluation equals a run without it
    if protocol.warmup_batches and observed:
        scored = copy.deepcopy(outcome.model.controller.score)
        outcome.model.controller.reset()
        for batch in windows.split(2):
            outcome.model(input_ids=batch)
        for i in scored:
            torch.testing.assert_close(scored[i], outcome.model.controller.score[i])


def test_zero_shot_and_the_lm_eval_bridge_follow_the_declared_protocol():
    """score_requests is the path of zero-shot tasks and of the lm-eval bridge's loglikelihood."""
    from prunekit.evaluation.zeroshot import score_requests

    protocol = DynamicProtocol(reset=True, warmup_batches=3, stateful=True)
    outcome = _running_method(protocol)(MethodSettings("running", 0.5), {}).prune(
        _ctx(tiny_llama(layers=2))
    )
    pairs = [([3, 4, 5], [6]), ([7], [8, 9]), ([10, 11], [12]), ([13], [14])]
    score_requests(outcome.model, pairs, batch_size=2)
    calls = outcome.model.controller.calls
    assert calls["reset"] == 1
    assert calls["decide"] == 2 * (2 + 3)  # 2 layers x (2 scored batches + 3 warm-up runs)


def test_a_stateful_protocol_needs_snapshot_and_restore():
    class Forgetful(CountingController):
        snapshot = None

    model = tiny_llama(layers=2)
    adapter = prunekit.registry.resolve_adapter(model)
    with pytest.raises(TypeError, match="stateful dynamic method's controller needs snapshot"):
        DynamicModel(
            model, adapter, Forgetful(adapter, 48), protocol=DynamicProtocol(stateful=True)
        )


def test_protocol_values_are_checked():
    with pytest.raises(ValueError, match="decides='token'"):
        DynamicProtocol(decides="token")
    with pytest.raises(ValueError, match="unknown"):
        DynamicProtocol(observes=("gradients",))


def test_the_runner_reports_the_methods_figures_and_never_calls_hooks_per_batch(
    prunekit_pm, tmp_path
):
    class Plugin:
        @prunekit.hookimpl
        def prunekit_register_methods(self, register):
            register("running", _running_method(DynamicProtocol(stateful=True)))

    registrations: list[str] = []

    class Counting:
        @prunekit.hookimpl
        def prunekit_register_kinds(self, register):
            registrations.append("kinds")

        @prunekit.hookimpl
        def prunekit_register_metrics(self, register):
            registrations.append("metrics")

        @prunekit.hookimpl
        def prunekit_register_components(self, register):
            registrations.append("components")

    prunekit_pm.register_plugin(Plugin(), "running-plugin")
    prunekit_pm.register_plugin(Counting(), "counting")
    calls: list[str] = []
    undo = prunekit_pm.add_hookcall_monitoring(
        lambda name, impls, kw: calls.append(name), lambda *a: None
    )
    try:
        result = _apply_tiny(tmp_path, "running")
    finally:
        undo()
    assert result["runtime"]["decisions_per_batch"] > 0
    # every registration hook once (the registry is built once per run), and through the
    # plugin manager only the two run observers, once each: nothing per batch
    assert registrations == ["kinds", "metrics", "components"]
    assert calls == ["prunekit_run_started", "prunekit_result_ready"]


def test_an_error_inside_a_component_names_its_plugin(prunekit_pm, tmp_path):
    class Exploding(DownNorm):
        def rank(self, layer):
            raise ZeroDivisionError("boom")

    _register_ranker(prunekit_pm, "explosives", "exploding", Exploding)
    with pytest.raises(
        PluginError,
        match=r"plugin 'explosives' \(distribution \?\) failed "
        r"during calibration and pruning: ZeroDivisionError: boom \(raised at "
        r".*test_contracts.py:\d+\)",
    ):
        _apply_tiny(tmp_path, "ranked", ["method.ranker.name=exploding"])
    assert not (tmp_path / "out").exists()
    # a user's mistake stays a user error
    with pytest.raises(RecipeError):
        _apply_tiny(tmp_path, "ranked", ["method.ranker.name=down_norm", "method.ranker.pwr=1"])


def test_a_full_disk_is_a_storage_error_not_a_plugin_bug(prunekit_pm, tmp_path):
    """safetensors wraps ENOSPC in its own exception type ("I/O error: No space left on device
    (os error 28)"); whoever was writing, the user is told the disk is full and how to make
    room, not to report a bug, and the run leaves nothing behind."""

    class Writing(DownNorm):
        def rank(self, layer):
            raise RuntimeError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )

    _register_ranker(prunekit_pm, "writer", "writing", Writing)
    with pytest.raises(
        StorageError,
        match=r"during calibration and pruning \(No space left on "
        r"device\): free some space.*PRUNEKIT_CACHE_DIR",
    ) as err:
        _apply_tiny(tmp_path, "ranked", ["method.ranker.name=writing"])
    assert "writer" not in str(err.value) and "report" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_storage_failures_are_recognised_by_errno_message_and_cause():
    import errno
    import os

    assert storage_failure(OSError(errno.EROFS, "x")) == os.strerror(errno.EROFS)
    assert storage_failure(OSError(errno.ENOENT, "missing")) is None
    assert storage_failure(ValueError("bad value")) is None
    try:
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError as inner:
            raise RuntimeError("could not save") from inner
    except RuntimeError as outer:
        assert storage_failure(outer) == os.strerror(errno.EDQUOT)


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    """A write refused outside any plugin's code (the runner's own results.json) is one line
    on stderr and exit status 2, not a traceback; the staging directory is gone."""
    import errno
    import os

    import yaml

    from prunekit import cli, runner

    _save_tiny(tmp_path / "tiny")
    rows = _ids(7, rows=40, cols=50).tolist()
    (tmp_path / "text.txt").write_text("\n".join(" ".join(f"w{i}" for i in r) for r in rows))
    text = str(tmp_path / "text.txt")
    recipe = {
        "model": {"id": str(tmp_path / "tiny"), "dtype": "float32"},
        "method": {"name": "wanda-sp", "ratio": 0.5, "skip_layers": []},
        "calibration": {"path": text, "samples": 4, "seq_len": 16, "batch_size": 4},
        "evaluation": {
            "perplexity": [{"path": text, "seq_len": 16, "windows": 4, "batch_size": 2}]
        },
        "runtime": {"batches": 0},
        "output": {"dir": str(tmp_path / "out"), "save_model": False},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(runner, "_write_json", full)
    assert cli.main(["apply", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err  # (with the loader's progress bars)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: the disk refused a write"), err
    assert "Traceback" not in err and "No space left on device" in lines[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# -- helpers -------------------------------------------------------------------------------


def _register_ranker(pm, plugin_name: str, ranker_name: str, ranker) -> None:
    """A plugin ``plugin_name`` registering ``ranker`` (beside down_norm) and the ranked method."""

    class Plugin(RankerPlugin):
        @prunekit.hookimpl
        def prunekit_register_components(self, register):
            register("ranker", "down_norm", DownNorm)
            register("ranker", ranker_name, ranker)
            register("method", "ranked", RankedPrune)

    pm.register_plugin(Plugin(), plugin_name)


def _ctx(model):
    from types import SimpleNamespace

    from prunekit.registry import resolve_adapter

    return SimpleNamespace(model=model, adapter=resolve_adapter(model))


def _save_tiny(path):
    """A tiny LLaMA with a word-level tokenizer, saved like a checkpoint."""
    tiny_llama(layers=2, seed=3).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _apply_tiny(tmp_path, method, overrides=()):
    model_dir = tmp_path / "tiny"
    if not model_dir.is_dir():
        _save_tiny(model_dir)
        rows = _ids(7, rows=40, cols=50).tolist()
        (tmp_path / "text.txt").write_text("\n".join(" ".join(f"w{i}" for i in r) for r in rows))
    text = str(tmp_path / "text.txt")
    recipe = {
        "model": {"id": str(model_dir), "dtype": "float32"},
        "method": {"name": method, "ratio": 0.5, "skip_layers": []},
        "calibration": {"path": text, "samples": 4, "seq_len": 16, "batch_size": 4},
        "evaluation": {
            "perplexity": [{"path": text, "seq_len": 16, "windows": 4, "batch_size": 2}]
        },
        "runtime": {"batches": 1, "warmup": 0, "repeats": 5},
        "output": {"dir": str(tmp_path / "out"), "save_model": False},
    }
    return prunekit.apply(recipe, list(overrides))
