"""Depth pruning: whole decoder blocks removed through the adapter (``remove_layers``), and the
``block-influence`` (ShortGPT) and ``angular`` (Gromov et al.) methods checked by hand."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from prunekit_plugins.depth import blocks_to_remove
from tiny_run import flow, write_recipe

import prunekit
from prunekit.cli import main
from prunekit.errors import ModelError
from prunekit.evaluation.costs import structure_reduction
from prunekit.models.llama import LlamaAdapter
from prunekit.pruning.static import save_pruned
from prunekit.registry import resolve_adapter
from prunekit.testing import (
    check_adapter,
    tiny_gemma3,
    tiny_llama,
    tiny_opt,
    tiny_qwen2,
)

CALIB = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(2))

ARCHS = {
    "llama-gqa": lambda: tiny_llama(heads=4, kv_heads=2, layers=4),
    "qwen2-sliding": lambda: tiny_qwen2(layers=4),  # layer 0 full, the others sliding
    "gemma3": lambda: tiny_gemma3(layers=4),
    "opt": lambda: tiny_opt(layers=4),
}


def _skipping(model, drop):
    """A copy of ``model`` whose layers ``drop`` pass their input through unchanged."""
    ref = copy.deepcopy(model)
    for i in drop:

        def identity(module, args, kwargs, output):
            h = args[0] if args else kwargs["hidden_states"]
            return (h, *output[1:]) if isinstance(output, tuple) else h

        resolve_adapter(ref).decoder_layers[i].register_forward_hook(identity, with_kwargs=True)
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_removed_blocks_equal_skipped_blocks_with_a_kv_cache(arch):
    model = ARCHS[arch]()
    types = getattr(model.config, "layer_types", None)
    ref = _skipping(model, [1, 2])
    adapter = resolve_adapter(model)
    shallow = adapter.remove_layers([2, 1])
    assert shallow.num_layers == 2 and adapter.num_layers == 4  # the old adapter is unchanged
    assert model.config.num_hidden_layers == 2
    if types is not None:
        assert model.config.layer_types == [types[0], types[3]]
    idx = [
        m.layer_idx
        for layer in shallow.decoder_layers
        for m in layer.modules()
        if isinstance(getattr(m, "layer_idx", None), int)
    ]
    assert sorted(set(idx)) == [0, 1]
    assert [la.cache_layer for la in shallow.layers()] == [0, 1]
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
        full = model(input_ids=IDS).logits
        torch.testing.assert_close(full, want, atol=1e-5, rtol=0)
        # a KV cache of two layers, filled by the prompt and continued one step at a time
        out = model(input_ids=IDS[:, :7], use_cache=True)
        cache = out.past_key_values
        for t in range(7, IDS.shape[1]):
            out = model(input_ids=IDS[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            torch.testing.assert_close(out.logits[:, -1], want[:, t], atol=1e-4, rtol=0)


def test_removal_is_refused_with_a_reason():
    class NoDepth(LlamaAdapter):
        name = "no-depth"
        removes_layers = False

    with pytest.raises(ModelError, match="'no-depth' cannot remove whole decoder layers"):
        NoDepth(tiny_llama()).remove_layers([1])
    adapter = LlamaAdapter(tiny_llama(layers=4))
    with pytest.raises(ModelError, match=r"layers \[4\] do not exist: the model has 4"):
        adapter.remove_layers([4])
    with pytest.raises(ModelError, match="named twice"):
        adapter.remove_layers([1, 1])
    with pytest.raises(ModelError, match="removing all 4 layers"):
        adapter.remove_layers([0, 1, 2, 3])
    assert adapter.model.config.num_hidden_layers == 4 and len(adapter.decoder_layers) == 4


class _NoRenumbering(LlamaAdapter):
    name = "no-renumbering"

    def renumber_layer(self, module, index):
        pass


class _SilentNoDepth(LlamaAdapter):
    name = "silent"
    removes_layers = False

    def remove_layers(self, indices):
        return self


def test_the_conformance_kit_checks_layer_removal(tmp_path):
    def make():
        return tiny_llama(heads=4, kv_heads=2, layers=3)

    check_adapter(make, LlamaAdapter, checks=("remove_layers",), tmp_dir=str(tmp_path))

    class NoDepth(LlamaAdapter):
        removes_layers = False

    check_adapter(make, NoDepth, checks=("remove_layers",))  # refuses: passes
    with pytest.raises(AssertionError, match=r"check_adapter\[remove_layers\]: KV-cache"):
        check_adapter(make, _NoRenumbering, checks=("remove_layers",))
    with pytest.raises(AssertionError, match="did not refuse"):
        check_adapter(make, _SilentNoDepth, checks=("remove_layers",))


def test_a_pruned_checkpoints_layer_shapes_are_cut_too():
    model = tiny_llama(layers=4)
    adapter = LlamaAdapter(model)
    model.config.prunekit_layers = adapter.layer_shapes()
    model.config.prunekit_layers["intermediate_size"] = [10, 11, 12, 13]
    adapter.remove_layers([0, 2])
    assert model.config.prunekit_layers["intermediate_size"] == [11, 13]
    assert len(model.config.prunekit_layers["kv_index"]) == 2


def test_removed_blocks_cost_nothing():
    model = tiny_llama(heads=4, kv_heads=2, layers=4)
    adapter = resolve_adapter(model)
    out = prunekit.prune(model, None, method="block-influence", ratio=0.5, calibration=CALIB)
    # skip_layers defaults to [0, 1, 2], leaving one block: floor(0.5 * 1) = 0 removed
    assert out.extra["removed_layers"] == [] and len(model.model.layers) == 4
    model = tiny_llama(heads=4, kv_heads=2, layers=4)
    adapter = resolve_adapter(model)
    out = prunekit.prune(
        model, None, method="block-influence", ratio=0.5, calibration=CALIB, skip_layers=[0]
    )
    removed = out.extra["removed_layers"]
    assert len(removed) == 1 and len(out.structure) == 4
    costs = structure_reduction(adapter, out.structure, 64)
    layer = adapter.layers()[0]
    per_layer = layer.macs_per_token(layer.num_heads, layer.intermediate_size, 64)
    assert costs["decoder_macs_per_token"] == pytest.approx(3 * per_layer)
    assert costs["flops_kept_fraction"] == pytest.approx(0.75)


def _hooked_states(model, windows):
    """Each block's input and output hidden states over ``windows`` (one batch), by hand."""
    ins, outs = {}, {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(
            layer.register_forward_pre_hook(
                lambda m, a, k, _i=i: ins.__setitem__(_i, a[0] if a else k["hidden_states"]),
                with_kwargs=True,
            )
        )
        handles.append(
            layer.register_forward_hook(
                lambda m, a, o, _i=i: outs.__setitem__(_i, o[0] if isinstance(o, tuple) else o)
            )
        )
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    return [ins[i] for i in range(len(ins))], [outs[i] for i in range(len(outs))]


def _cos_by_hand(a, b):
    a, b = a.double().flatten(0, 1), b.double().flatten(0, 1)
    return torch.stack([torch.dot(x, y) / (x.norm() * y.norm()) for x, y in zip(a, b, strict=True)])


def _near_identity(model, layer):
    """Make ``layer`` of a LLaMA model almost pass its input through (tiny output weights)."""
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight.mul_(1e-3)
        model.model.layers[layer].mlp.down_proj.weight.mul_(1e-3)
    return model


def test_block_influence_by_hand():
    model = _near_identity(tiny_llama(heads=4, kv_heads=2, layers=6), 3)
    dense = copy.deepcopy(model)
    ins, outs = _hooked_states(dense, CALIB)
    bi = [1 - _cos_by_hand(a, b).mean().item() for a, b in zip(ins, outs, strict=True)]
    out = prunekit.prune(
        model,
        None,
        method="block-influence",
        ratio=0.5,
        calibration=CALIB,
        skip_layers=[0, 5],
        round_to=1,
    )
    got = out.extra["block_influence"]
    assert got[0] is None and got[5] is None
    for i in range(1, 5):
        assert got[i] == pytest.approx(bi[i], abs=1e-6)
    # floor(0.5 * 4) = 2 blocks: the two lowest BI among layers 1..4; layer 3 is the lowest
    want = sorted(sorted(range(1, 5), key=lambda i: bi[i])[:2])
    assert 3 in want and out.extra["removed_layers"] == want
    assert model.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=IDS).logits,
            _skipping(dense, want)(input_ids=IDS).logits,
            atol=1e-5,
            rtol=0,
        )


def test_angular_by_hand():
    model = tiny_llama(heads=4, kv_heads=2, layers=6)
    for i in (2, 3):
        _near_identity(model, i)
    dense = copy.deepcopy(model)
    ins, outs = _hooked_states(dense, CALIB)
    n = 2  # floor(0.4 * 5)
    dist = {
        start: (torch.arccos(_cos_by_hand(ins[start], outs[start + n - 1]).clamp(-1, 1)) / math.pi)
        .mean()
        .item()
        for start in range(1, 5)  # windows start, start+1 inside layers 1..5
    }
    out = prunekit.prune(
        model, None, method="angular", ratio=0.4, calibration=CALIB, skip_layers=[0], round_to=1
    )
    got = out.extra["angular_distance"]
    assert got[0] is None and got[5] is None  # layer 0 skipped; no window 5..6
    for start, d in dist.items():
        assert got[start] == pytest.approx(d, abs=1e-6)
    best = min(dist, key=dist.get)
    assert best == 2 and out.extra["removed_layers"] == [2, 3]
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=IDS).logits,
            _skipping(dense, [2, 3])(input_ids=IDS).logits,
            atol=1e-5,
            rtol=0,
        )


def test_angular_windows_never_cross_a_skipped_layer():
    model = tiny_llama(heads=4, kv_heads=2, layers=6)
    out = prunekit.prune(
        model, None, method="angular", ratio=0.5, calibration=CALIB, skip_layers=[0, 3]
    )
    # floor(0.5 * 4) = 2 of layers 1, 2, 4, 5: windows (1, 2) or (4, 5) only
    got = out.extra["angular_distance"]
    assert [start for start, d in enumerate(got) if d is not None] == [1, 4]
    assert out.extra["removed_layers"] in ([1, 2], [4, 5])


@pytest.mark.parametrize("method", ["block-influence", "angular"])
def test_ratio_zero_reproduces_dense_logits(method):
    model, dense = tiny_llama(heads=4, kv_heads=2, layers=4), tiny_llama(heads=4, kv_heads=2)
    out = prunekit.prune(model, None, method=method, ratio=0.0, calibration=CALIB, skip_layers=[])
    assert out.extra["removed_layers"] == [] and model.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(
            out.model(input_ids=IDS).logits, dense(input_ids=IDS).logits, atol=0, rtol=0
        )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["block-influence", "angular"])
def test_every_adapter_prunes_depth(arch, method):
    dense = ARCHS[arch]()
    zero = prunekit.prune(
        copy.deepcopy(dense), None, method=method, ratio=0.0, calibration=CALIB, skip_layers=[0]
    )
    model = copy.deepcopy(dense)
    out = prunekit.prune(model, None, method=method, ratio=0.7, calibration=CALIB, skip_layers=[0])
    removed = out.extra["removed_layers"]
    assert len(removed) == 2 and 0 not in removed  # floor(0.7 * 3)
    scores = [s for s in next(v for k, v in out.extra.items() if k != "removed_layers") if s]
    assert scores and all(0 < s < 1 for s in scores)
    with torch.no_grad():
        want = dense(input_ids=IDS).logits
        torch.testing.assert_close(zero.model(input_ids=IDS).logits, want, atol=0, rtol=0)
        torch.testing.assert_close(
            model(input_ids=IDS).logits,
            _skipping(dense, removed)(input_ids=IDS).logits,
            atol=1e-5,
            rtol=0,
        )


def test_blocks_to_remove_rounds_down():
    assert blocks_to_remove(0.3, 13, [0, 1, 2]) == 3  # 0.3 * 10, not 2.9999
    assert blocks_to_remove(0.29, 13, [0, 1, 2]) == 2
    assert blocks_to_remove(0.5, 4, [0, 1, 2]) == 0
    assert blocks_to_remove(0.25, 4, [9]) == 1  # a layer the model lacks removes nothing


_RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
import prunekit
out = {}
with torch.no_grad():
    for path in json.loads(sys.argv[1]):
        ids = torch.load(path + "/ids.pt")
        plain = AutoModelForCausalLM.from_pretrained(path).eval()
        out[path] = {
            "layers": len(plain.model.decoder.layers if hasattr(plain.model, "decoder")
                          else plain.model.layers),
            "plain": plain(input_ids=ids).logits,
            "load_pruned": prunekit.load_pruned(path)(input_ids=ids).logits,
        }
torch.save(out, sys.argv[2])
"""


def test_shallow_models_reload_with_identical_logits_in_a_fresh_process(tmp_path):
    wanted = {}
    # through the method's own save (a plain checkpoint), and through save_pruned per adapter
    model = tiny_llama(heads=4, kv_heads=2, layers=5)
    out = prunekit.prune(
        model, None, method="angular", ratio=0.5, calibration=CALIB, skip_layers=[0]
    )
    path = tmp_path / "angular"
    out.save(str(path))
    meta = json.loads((path / "prunekit.json").read_text())
    assert meta["layout"] == "plain" and meta["method"] == "angular"
    assert meta["removed_layers"] == out.extra["removed_layers"] and meta["dense_layers"] == 5
    wanted[str(path)] = (model, 3)
    for arch in ("qwen2-sliding", "gemma3", "opt"):
        model = ARCHS[arch]()
        resolve_adapter(model).remove_layers([1, 2])
        path = tmp_path / arch
        save_pruned(model, None, str(path), {"method": "test"})
        assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 2
        wanted[str(path)] = (model, 2)
    for path in wanted:
        torch.save(IDS, f"{path}/ids.pt")
    result = tmp_path / "reloaded.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD, json.dumps(list(wanted)), str(result)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = torch.load(result)
    for path, (model, layers) in wanted.items():
        with torch.no_grad():
            want = model(input_ids=IDS).logits
        got = reloaded[path]
        assert got["layers"] == layers, path
        for how in ("plain", "load_pruned"):
            torch.testing.assert_close(got[how], want, atol=1e-5, rtol=0, msg=f"{path} {how}")


def _recipe(tmp, method, **keys):
    return write_recipe(tmp, flow(method, **keys))


def test_apply_reports_the_removed_blocks_and_their_macs(tiny_dir):
    recipe = _recipe(tiny_dir, "block-influence", ratio=0.4, skip_layers="[0]")
    assert main(["apply", recipe, "-q"]) == 0
    results = json.loads((tiny_dir / "run" / "results.json").read_text())
    removed = [r["layer"] for r in results["structure"] if r.get("removed")]
    assert len(removed) == 2  # floor(0.4 * 5)
    assert results["reduction"]["flops_kept_fraction"] == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    "method, keys, needle",
    [
        (
            "angular",
            {"ratio": 0.75, "skip_layers": "[0, 3]"},
            "the longest run of blocks outside skip_layers [0, 3] is 2",
        ),
        ("block-influence", {"target": "{macs: 0.3}"}, "cannot be met: removing 3 blocks"),
    ],
)
def test_bad_depth_recipes_fail_at_validate(tiny_dir, capsys, method, keys, needle):
    assert main(["validate", _recipe(tiny_dir, method, **keys)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_an_adapter_that_cannot_remove_layers_is_refused_at_validate(monkeypatch):
    from prunekit.models.llama import LlamaAdapter

    monkeypatch.setattr(LlamaAdapter, "removes_layers", False)
    recipe = {
        "method": {"name": "block-influence", "ratio": 0.25},
        "evaluation": {"perplexity": []},
    }
    with pytest.raises(prunekit.PrunekitError, match=r"method\.name.*adapter 'llama' cannot"):
        prunekit.validate(recipe)
