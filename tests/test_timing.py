"""Interleaved timing and the runtime summary: structure, pairing, the FLOP-limit flag (never
a timed value: no assertion depends on how fast anything ran)."""

import pytest
import torch

import prunekit
from prunekit.evaluation.runtime import (
    Contender,
    describe_speedup,
    flop_limit,
    paired_speedups,
    summarize,
    time_interleaved,
)
from prunekit.testing import tiny_llama


class Recorder(torch.nn.Module):
    """A model that records which batch it saw, in call order, into a shared log."""

    def __init__(self, name: str, log: list) -> None:
        super().__init__()
        self.name, self.log = name, log
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids=None, use_cache=None):
        assert use_cache is False  # a scoring pass never fills a KV cache
        self.log.append((self.name, int(input_ids[0, 0])))
        return input_ids


def test_interleaved_rounds_pair_every_call_on_the_same_batch():
    log: list = []
    batches = [torch.full((1, 2), i) for i in range(2)]
    models = [Contender(n, Recorder(n, log)) for n in ("a", "b", "c")]
    timed = time_interleaved(models, batches, rounds=3, warmup=1)
    assert log[:3] == [("a", 0), ("b", 0), ("c", 0)]  # one warm-up call each, first batch
    calls = log[3:]
    assert len(calls) == 3 * 2 * 3 and all(len(timed[n]["s_all"]) == 6 for n in "abc")
    # each batch runs on every model back to back; the order rotates from round to round
    groups = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert [{b for _, b in g} for g in groups] == [{0}, {1}, {0}, {1}, {0}, {1}]
    firsts = [g[0][0] for g in groups]
    assert firsts == ["a", "a", "b", "b", "c", "c"]
    with pytest.raises(ValueError, match="unique"):
        time_interleaved([models[0], models[0]], batches)


def test_dynamic_model_keeps_its_state_and_times_its_phases():
    torch.manual_seed(0)
    model = tiny_llama(heads=4, kv_heads=4, layers=3, intermediate=48)
    cal = torch.randint(3, 100, (8, 16), generator=torch.Generator().manual_seed(1))
    pp = prunekit.prune(
        model, None, method="pp", ratio=0.4, calibration=cal, skip_layers=[0], round_to=1
    ).model
    before = {k: v.clone() for k, v in pp.controller.history.items()}
    batches = [
        torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)
    ]
    timed = time_interleaved(
        [Contender("dense", pp, dense=True), Contender("pp", pp)], batches, rounds=3, warmup=1
    )
    for k, v in pp.controller.history.items():  # timing left no trace in the EMA history
        assert torch.equal(v, before[k])
    phases = timed["pp"]["phases_s_all"]
    assert {"probe", "score", "gather", "history"} <= set(phases)
    assert all(len(v) == 6 for v in phases.values())
    assert timed["dense"]["phases_s_all"] == {}  # the dense layers run no method


def test_summary_pairs_calls_and_flags_a_speedup_beyond_the_flop_limit():
    dense, pruned = [2.0, 2.2, 1.8, 2.0, 2.1], [1.0, 1.1, 1.2, 0.9, 1.0]
    rt = summarize(dense, pruned, (20, 512), flops_kept_fraction=0.7)
    assert rt["timed_calls"] == 5 and rt["interleaved"]
    assert rt["speedup"] == pytest.approx(2.0 / 1.0)
    pairs = paired_speedups(dense, pruned)
    assert rt["speedup_spread"] == [min(pairs), max(pairs)] == [1.5, 2.0 / 0.9]
    assert rt["flop_limit"] == pytest.approx(1 / 0.7) and rt["beyond_flop_limit"]
    text = describe_speedup(rt)
    assert "beyond the 1.43x" in text and "not a result" in text and "1.50-2.22" in text
    honest = summarize(dense, [1.6, 1.7, 1.5, 1.6, 1.65], (20, 512), flops_kept_fraction=0.7)
    assert not honest["beyond_flop_limit"] and "beyond" not in describe_speedup(honest)
    assert flop_limit(None) is None and flop_limit(0.5) == 2.0
    apart = summarize(dense, pruned[:4], (20, 512), interleaved=False)
    assert apart["speedup_spread"] == [1.8 / 1.2, 2.2 / 0.9] and not apart["interleaved"]


def test_too_few_timed_calls_are_refused_before_anything_runs(tmp_path):
    from prunekit.runner import apply

    with pytest.raises(prunekit.PrunekitError, match="4 timed call.*at least 5"):
        apply({"runtime": {"batches": 2, "repeats": 2}}, output=tmp_path / "o")
    assert not (tmp_path / "o").exists()
