"""Helpers for tests of prunekit and of third-party plugins (our ``pytester``).

* ``tiny_llama``, ``tiny_mistral``, ``tiny_qwen2``, ``tiny_opt``, ``tiny_gemma3``, ``tiny_phi3``,
  ``tiny_qwen3`` build small random models of each built-in architecture in a second, offline;
  ``tiny_tokenizer`` is a word-level tokenizer for their vocabulary.
* :func:`check_adapter` is the conformance kit an adapter author runs on a tiny random model of
  their architecture; :class:`AdapterConformance` runs the same checks as pytest tests.
* :func:`isolated_plugin_manager` is a context manager giving a fresh plugin manager with the
  built-in plugins (and optionally extra ones) registered, restored afterwards; the pytest
  fixture ``prunekit_pm`` (enabled by ``pytest_plugins = ["prunekit.testing"]``) wraps it.
* :func:`prunekit_imports` lists what a plugin's source imports of prunekit, so that its tests
  can check it uses only the plugin front (``prunekit.plugin``).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from prunekit.components import ATTN, MLP, ModelAdapter
from prunekit.plugins import (
    PrunekitPluginManager,
    load_entry_points,
    new_plugin_manager,
    set_plugin_manager,
)

# --------------------------------------------------------------------------------------------
# Tiny random models
# --------------------------------------------------------------------------------------------


def _widen(model, seed: int, dtype: torch.dtype):
    """Random init is tiny; widen the matrices so pruning decisions are not ties."""
    torch.manual_seed(seed)
    model = model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
            elif p.dim() == 1 and p.numel() > 1:  # biases and norms: non-trivial, still small
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _tiny(config_cls, model_cls, attn_implementation: str, seed: int, dtype, **fields):
    config = config_cls(**fields)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return _widen(model_cls(config), seed, dtype)


def tiny_llama(
    *,
    heads: int = 4,
    kv_heads: int | None = None,
    layers: int = 4,
    hidden: int | None = None,
    intermediate: int = 96,
    vocab: int = 128,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.2,
):
    """A small random ``LlamaForCausalLM`` (GQA when ``kv_heads < heads``), in eval mode.

    ``init_std``: the 2-D weights' standard deviation. The default 0.2 (the historical init)
    makes pruning decisions well separated; 0.02 (Hugging Face's init, the scale of trained
    LLMs' weights) keeps activations, and so float32 rounding, at a real model's scale."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden or heads * 16,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # 2-D weights at init_std, norms left at 1
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, init_std)
    return model.eval()


def tiny_mistral(
    *,
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 3,
    sliding_window: int = 5,
    intermediate: int = 64,
    vocab: int = 128,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """A small random ``MistralForCausalLM`` whose sliding window is shorter than test inputs."""
    from transformers import MistralConfig, MistralForCausalLM

    return _tiny(
        MistralConfig,
        MistralForCausalLM,
        attn_implementation,
        seed,
        dtype,
        vocab_size=vocab,
        hidden_size=heads * 16,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        sliding_window=sliding_window,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
    )


def tiny_qwen2(
    *,
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 3,
    sliding_window: int = 5,
    intermediate: int = 64,
    vocab: int = 128,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """A small random ``Qwen2ForCausalLM`` (q/k/v biases; the layers from 1 on use a sliding
    window shorter than test inputs, layer 0 full attention)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _tiny(
        Qwen2Config,
        Qwen2ForCausalLM,
        attn_implementation,
        seed,
        dtype,
        vocab_size=vocab,
        hidden_size=heads * 16,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        use_sliding_window=sliding_window is not None,
        sliding_window=sliding_window,
        max_window_layers=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
    )


def tiny_opt(
    *,
    heads: int = 4,
    layers: int = 3,
    hidden: int = 64,
    ffn: int = 96,
    vocab: int = 128,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """A small random ``OPTForCausalLM`` (pre-LN, biases everywhere, ReLU, learned positions)."""
    from transformers import OPTConfig, OPTForCausalLM

    return _tiny(
        OPTConfig,
        OPTForCausalLM,
        attn_implementation,
        seed,
        dtype,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=ffn,
        num_attention_heads=heads,
        max_position_embeddings=512,
        word_embed_proj_dim=hidden,
        do_layer_norm_before=True,
        dropout=0.0,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )


def tiny_gemma3(
    *,
    heads: int = 4,
    kv_heads: int = 1,
    layers: int = 3,
    head_dim: int = 32,
    hidden: int = 64,
    intermediate: int = 96,
    sliding_window: int = 4,
    vocab: int = 128,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """A small random ``Gemma3ForCausalLM`` (text): q/k norms, sliding and full layers (full
    every third), GELU-tanh gated MLP, head_dim independent of hidden, scaled embeddings and
    ``query_pre_attn_scalar`` different from ``head_dim``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(layers)]
    return _tiny(
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        attn_implementation,
        seed,
        dtype,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        sliding_window=sliding_window,
        layer_types=types,
        query_pre_attn_scalar=head_dim * 3 // 4,
        max_position_embeddings=512,
        pad_token_id=0,
    )


def tiny_phi3(
    *,
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 3,
    head_dim: int = 16,
    intermediate: int = 64,
    partial_rotary_factor: float = 1.0,
    longrope: int | None = None,
    sliding_window: int | None = None,
    tie_word_embeddings: bool = False,
    vocab: int = 128,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """A small random ``Phi3ForCausalLM``: fused ``qkv_proj`` and ``gate_up_proj``, GQA when
    ``kv_heads < heads``, RoPE on the first ``partial_rotary_factor * head_dim`` dims of each
    head. ``longrope``: long-rope scaling with ``original_max_position_embeddings=longrope``
    (shorter than test inputs to use the long factors) and distinct short and long factor
    lists; ``sliding_window``: every layer attends within it."""
    from transformers import Phi3Config, Phi3ForCausalLM

    rope: dict = {"rope_type": "default", "rope_theta": 10000.0}
    if longrope is not None:
        n = int(head_dim * partial_rotary_factor) // 2
        rope = {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(n)],
            "long_factor": [1.5 + 0.75 * i for i in range(n)],
            "original_max_position_embeddings": longrope,
        }
    rope["partial_rotary_factor"] = partial_rotary_factor
    return _tiny(
        Phi3Config,
        Phi3ForCausalLM,
        attn_implementation,
        seed,
        dtype,
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rope_parameters=rope,
        original_max_position_embeddings=longrope or 512,
        sliding_window=sliding_window,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_qwen3(
    *,
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 3,
    head_dim: int = 24,
    hidden: int = 64,
    intermediate: int = 64,
    sliding_window: int | None = None,
    max_window_layers: int = 1,
    attention_bias: bool = False,
    tie_word_embeddings: bool = False,
    vocab: int = 128,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """A small random ``Qwen3ForCausalLM``: q/k RMSNorms over ``head_dim`` (random weights, so
    they matter), ``head_dim`` independent of ``hidden / heads``, GQA when ``kv_heads < heads``.
    With ``sliding_window`` the layers from ``max_window_layers`` on attend within it (shorter
    than test inputs), the first ones fully; ``attention_bias`` gives q/k/v/o biases."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _tiny(
        Qwen3Config,
        Qwen3ForCausalLM,
        attn_implementation,
        seed,
        dtype,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        attention_bias=attention_bias,
        use_sliding_window=sliding_window is not None,
        sliding_window=sliding_window,
        max_window_layers=max_window_layers,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
    )


# --------------------------------------------------------------------------------------------
# Plugin managers
# --------------------------------------------------------------------------------------------


def tiny_tokenizer(*, add_bos: bool = False):
    """A word-level tokenizer for the tiny models' 128-token vocabulary, built offline:
    ``w3``..``w127`` are ids 3..127, ``<unk>`` is 0 (also the pad), ``<s>`` 1, ``</s>`` 2.
    With ``add_bos`` every encoded text starts with ``<s>``, as a LLaMA tokenizer's does.
    Saved beside a tiny model (``save_pretrained``), it makes a checkpoint a recipe can run."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
    )


def prunekit_imports(source: str | ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of prunekit in ``source`` (Python text or a parsed
    tree), at the top level and inside functions: ``import prunekit.x`` gives ``prunekit.x``,
    ``from prunekit.x import y`` gives ``prunekit.x``. A plugin that imports only the front
    has nothing here but ``prunekit.plugin`` (and ``prunekit.testing`` in its tests)."""
    tree = ast.parse(source) if isinstance(source, str) else source
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [
                (node.lineno, a.name)
                for a in node.names
                if a.name == "prunekit" or a.name.startswith("prunekit.")
            ]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and (node.module == "prunekit" or node.module.startswith("prunekit."))
        ):
            out.append((node.lineno, node.module))
    return out


@contextlib.contextmanager
def isolated_plugin_manager(
    *plugins: object, autoload: bool = True
) -> Iterator[PrunekitPluginManager]:
    """A fresh process-wide plugin manager for the duration of the block.

    ``plugins`` are registered on top of the entry points (each under its class or module
    name). The previous manager is restored on exit.
    """
    pm = new_plugin_manager(autoload=False)
    if autoload:
        load_entry_points(pm)
    for i, plugin in enumerate(plugins):
        name = getattr(plugin, "__name__", type(plugin).__name__) + f"-{i}"
        pm.register_plugin(plugin, name)
    previous = set_plugin_manager(pm)
    try:
        yield pm
    finally:
        set_plugin_manager(previous)


try:  # pytest fixtures, only when pytest is importable
    import pytest

    @pytest.fixture
    def prunekit_pm():
        """A fresh plugin manager with the installed plugins; register throwaway ones on it."""
        with isolated_plugin_manager() as pm:
            yield pm

except ImportError:  # pragma: no cover
    pass


# --------------------------------------------------------------------------------------------
# The adapter conformance kit
# --------------------------------------------------------------------------------------------

CHECKS = (
    "supports",
    "block_forward",
    "full_kept_set",
    "kept_set_zeroed",
    "probe",
    "slicing",
    "cost_model",
    "reload",
    "remove_layers",
    "sublayers",
)


def _fail(check: str, layer: int | None, message: str):
    where = f" layer {layer}" if layer is not None else ""
    raise AssertionError(f"check_adapter[{check}]{where}: {message}")


def _close(check: str, layer: int | None, got, want, atol: float, rtol: float = 0.0) -> None:
    try:
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    except AssertionError as exc:
        _fail(check, layer, str(exc).splitlines()[0] + " " + " ".join(str(exc).splitlines()[1:4]))


def _inputs(model, batch: int = 2, seq: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)


def _capture_layers(model, adapter: ModelAdapter, ids: torch.Tensor) -> list[dict]:
    """Input, keyword arguments and output of every decoder layer on ``ids``."""
    captured: list[dict] = [{} for _ in adapter.layers()]
    handles = []
    for i, module in enumerate(adapter.decoder_layers):

        def hook(module, args, kwargs, output, _i=i):
            captured[_i]["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured[_i]["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            captured[_i]["out"] = output[0] if isinstance(output, tuple) else output

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def _kept_sets(adapter: ModelAdapter, seed: int = 0) -> dict[tuple[int, str], torch.Tensor]:
    """Different, non-empty kept sets per layer (uneven GQA groups included)."""
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for la in adapter.layers():
        for group in la.groups:
            n = la.units(group)
            keep = max(1, n - 1 - (la.index % max(1, n - 1))) if n > 1 else 1
            kept[(la.index, group)] = torch.randperm(n, generator=g)[:keep].sort().values
    return kept


def _zeroed_copy(model, adapter_cls, kept) -> torch.nn.Module:
    """A copy of ``model`` whose removed units' output-projection columns are zero."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for la in adapter_cls(ref).layers():
            for group in la.groups:
                units = kept.get((la.index, group))
                if units is None:
                    continue
                proj = la.output_projection(group)
                keep = torch.zeros(proj.in_features, dtype=torch.bool)
                keep[la.unit_channels(group, units)] = True
                proj.weight[:, ~keep] = 0
    return ref


def _reload_script(path: str, remote_code: bool, plain: bool) -> str:
    return f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
import prunekit
ids = torch.load({path!r} + "/ids.pt")
out = {{}}
out["load_pruned"] = prunekit.load_pruned({path!r})(input_ids=ids).logits
if {remote_code!r}:
    m = AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True).eval()
    out["remote_code"] = m(input_ids=ids).logits
if {plain!r}:
    m = AutoModelForCausalLM.from_pretrained({path!r}).eval()
    out["plain"] = m(input_ids=ids).logits
torch.save(out, {path!r} + "/reloaded.pt")
"""


def _check_reload(
    model_factory, adapter_cls, kept, atol: float, ids, tmp: Path, rtol: float = 0.0
) -> None:
    """A sliced model saved with ``save_pruned`` reloads identically in a fresh process."""
    from prunekit.components import Allocation
    from prunekit.pruning.static import save_pruned, slice_model

    model = model_factory()
    adapter = slice_model(adapter_cls(model), Allocation(dict(kept)))
    la = adapter.layers()[-1]
    la.add_output_bias(MLP, torch.linspace(-0.1, 0.1, la.hidden_size))  # a compensation bias
    adapter = adapter_cls(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    path = tmp / "saved"
    save_pruned(adapter, None, str(path), {"method": "check_adapter"})
    _reload_and_compare("reload", path, ids, want, atol, rtol)


def _reload_and_compare(check: str, path: Path, ids, want, atol: float, rtol: float) -> None:
    """Reload the checkpoint ``path`` in a fresh process every way its layout allows and
    compare its logits on ``ids`` with ``want``."""
    layout = json.loads((path / "prunekit.json").read_text())["layout"]
    torch.save(ids, path / "ids.pt")
    script = _reload_script(str(path), layout == "remote_code", layout == "plain")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch\nwith torch.no_grad():\n"
            + "\n".join("    " + line for line in script.splitlines()),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        _fail(check, None, f"reloading in a fresh process failed:\n{proc.stderr[-2000:]}")
    for how, logits in torch.load(path / "reloaded.pt").items():
        try:
            _close(check, None, logits, want, atol, rtol)
        except AssertionError as exc:
            raise AssertionError(f"{exc} (reloaded with {how}, {layout} layout)") from None


def _same_decoding(check: str, model, ref, ids, atol: float, rtol: float) -> None:
    """``model`` equals ``ref`` on ``ids`` in one forward, and decoding the second half token
    by token with a KV cache, against the reference decoding the same way (the same matmul
    shapes: decoding steps differ from one full forward by float rounding)."""
    # the cache's keyword and output field are ``cache`` from transformers 5.24 and
    # ``past_key_values`` before (the old name warns now and goes in 5.40)
    from prunekit.evaluation.perplexity import cache_keyword, output_cache

    key, ref_key = cache_keyword(model), cache_keyword(ref)
    with torch.no_grad():
        _close(check, None, model(input_ids=ids).logits, ref(input_ids=ids).logits, atol, rtol)
        split = ids.shape[1] // 2
        out = model(input_ids=ids[:, :split], use_cache=True)
        ref_out = ref(input_ids=ids[:, :split], use_cache=True)
        for t in range(split, ids.shape[1]):
            step = ids[:, t : t + 1]
            out = model(input_ids=step, use_cache=True, **{key: output_cache(out)})
            ref_out = ref(input_ids=step, use_cache=True, **{ref_key: output_cache(ref_out)})
            _close(check, None, out.logits[:, -1], ref_out.logits[:, -1], atol, rtol)


def _check_removal(
    model_factory, adapter_cls, kept, atol: float, ids, tmp: Path, rtol: float = 0.0
) -> None:
    """Removing decoder layer 1 equals the dense model with that layer passing its input
    through, a KV cache included; a sliced model with a layer removed saves and reloads
    identically in a fresh process. An adapter that does not declare ``removes_layers`` must
    refuse with :class:`prunekit.errors.ModelError`."""
    from prunekit.components import Allocation
    from prunekit.errors import ModelError
    from prunekit.pruning.static import save_pruned, slice_model

    model = model_factory()
    adapter = adapter_cls(model)
    n = adapter.num_layers
    if not adapter_cls.removes_layers:
        try:
            adapter.remove_layers([0])
        except ModelError:
            return
        _fail("remove_layers", None, "removes_layers is False, yet remove_layers did not refuse")
    if n < 2:
        _fail("remove_layers", None, f"the model needs 2 layers or more to remove one (has {n})")
    ref = model_factory()

    def identity(module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    adapter_cls(ref).decoder_layers[1].register_forward_hook(identity, with_kwargs=True)
    shallow = adapter.remove_layers([1])
    if shallow.num_layers != n - 1 or model.config.num_hidden_layers != n - 1:
        _fail(
            "remove_layers",
            None,
            f"{n - 1} layers expected after removing one, the adapter has "
            f"{shallow.num_layers} and config.num_hidden_layers is "
            f"{model.config.num_hidden_layers}",
        )
    caches = [la.cache_layer for la in shallow.layers()]
    if caches != list(range(n - 1)):
        _fail("remove_layers", None, f"KV-cache indices {caches} after removing layer 1")
    _same_decoding("remove_layers", model, ref, ids, atol, rtol)
    sliced = model_factory()
    slice_model(adapter_cls(sliced), Allocation(dict(kept)))
    shallow = adapter_cls(sliced).remove_layers([1])
    with torch.no_grad():
        want = sliced(input_ids=ids).logits
    path = tmp / "shallow"
    save_pruned(shallow, None, str(path), {"method": "check_adapter"})
    _reload_and_compare("remove_layers", path, ids, want, atol, rtol)


def _check_sublayers(model_factory, adapter_cls, atol: float, ids, tmp: Path, rtol: float) -> None:
    """Every group in :attr:`ModelAdapter.sublayers` sliced to zero units (the first declared
    group in layer 0, whose cache entries the model reads its sequence length from, the next
    in layer 1): equals the dense model with that sublayer's output projection zeroed, a KV
    cache continued token by token included; the sliced layers' parameters equal ``params``
    (K/V projections gone), their MACs ``macs_per_token``; and the model saves and reloads in
    a fresh process with the same logits."""
    from prunekit.components import Allocation
    from prunekit.pruning.static import save_pruned, slice_model

    groups = adapter_cls.sublayers
    if not groups:
        return
    model = model_factory()
    dense = adapter_cls(model_factory())  # its params() read the live (dense) modules
    kept = {
        (la.index, g): torch.arange(la.units(g))
        if la.index >= len(groups) or g != groups[la.index]
        else torch.zeros(0, dtype=torch.long)
        for la in dense.layers()
        for g in la.groups
    }
    ref = _zeroed_copy(model, adapter_cls, kept)
    sliced = slice_model(adapter_cls(model), Allocation(dict(kept)))
    _same_decoding("sublayers", model, ref, ids, atol, rtol)
    for la in dense.layers():
        n = sum(p.numel() for p in sliced.decoder_layers[la.index].parameters())
        want = la.params(len(kept[(la.index, ATTN)]), len(kept[(la.index, MLP)]))
        if n != want:
            _fail("sublayers", la.index, f"params() says {want}, the sliced layer has {n}")
    _check_cost(model, sliced, dense, kept, ids)
    path = tmp / "sublayers"
    save_pruned(sliced, None, str(path), {"method": "check_adapter"})
    with torch.no_grad():
        want = model(input_ids=ids).logits
    _reload_and_compare("sublayers", path, ids, want, atol, rtol)


def check_adapter(
    model_factory: Callable[[], torch.nn.Module],
    adapter_cls: type[ModelAdapter] | None = None,
    *,
    atol: float = 1e-5,
    rtol: float = 0.0,
    checks: tuple[str, ...] = CHECKS,
    tmp_dir: str | None = None,
) -> None:
    """Check a model adapter on a tiny random model of its architecture (fp32).

    :param model_factory: builds a fresh model each call (slicing changes a model in place).
    :param adapter_cls: the adapter to check (default: the registered one for the model).
    :param atol: the absolute tolerance of every comparison (fp32; tiny models: 1e-5).
    :param rtol: a relative tolerance on top (real models, whose massive activations at the
        first token make float summation-order differences large in absolute terms).
    :param checks: a subset of :data:`CHECKS`.

    Checks, each failing with ``check_adapter[<check>] layer <i>: ...``:

    * ``supports``: the adapter says it supports the model's config;
    * ``block_forward``: ``run_block`` equals the Hugging Face layer on the inputs the model
      passes it;
    * ``full_kept_set``: every unit kept equals dense;
    * ``kept_set_zeroed``: a kept set equals the dense layer whose removed units' output
      columns are zero;
    * ``probe``: ``probe`` on every token of every row equals the output projection's input of
      the dense forward (positions, masks, windows, scaling);
    * ``slicing``: the physically sliced model equals the zeroed dense model, the sliced
      layers' parameters equal ``params``, and an adapter of the sliced model (uneven K/V
      groups) runs and probes its layers like the Hugging Face forward;
    * ``cost_model``: ``macs_per_token`` equals the MACs counted by
      :class:`torch.utils.flop_counter.FlopCounterMode` on the sliced layers (eager attention);
    * ``reload``: the sliced model (per-layer shapes, a compensation bias) saved with
      :func:`prunekit.pruning.static.save_pruned` reloads in a fresh Python process with the
      same logits, through ``prunekit.load_pruned`` and through ``trust_remote_code`` (or plain
      ``from_pretrained`` when saved as a plain checkpoint).
    * ``remove_layers``: with :attr:`ModelAdapter.removes_layers`, removing layer 1 equals the
      dense model with that layer passing its input through (a KV cache continued token by
      token included), the remaining layers' cache indices are renumbered, and a sliced model
      with a layer removed reloads in a fresh process with the same logits; without it,
      ``remove_layers`` raises :class:`prunekit.errors.ModelError`.
    * ``sublayers``: each group of :attr:`ModelAdapter.sublayers` sliced to zero units equals
      the dense model with that sublayer's output projection zeroed (decoding with a KV cache
      included), with the parameters and MACs the cost model says, and reloads in a fresh
      process.
    """
    from prunekit.components import Allocation
    from prunekit.pruning.static import slice_model
    from prunekit.registry import adapter_class_for

    model = model_factory()
    adapter_cls = adapter_cls or adapter_class_for(model.config)
    if "supports" in checks and not adapter_cls.supports(model.config):
        _fail(
            "supports",
            None,
            f"{adapter_cls.__name__}.supports() is False for "
            f"model_type {getattr(model.config, 'model_type', None)!r}",
        )
    adapter = adapter_cls(model)
    ids = _inputs(model)
    io = _capture_layers(model, adapter, ids)
    kept = _kept_sets(adapter)
    with torch.no_grad():
        for la in adapter.layers():
            h, kw = io[la.index]["hidden"], io[la.index]["kwargs"]
            dense = la.run_block(h, **kw)
            if "block_forward" in checks:
                _close("block_forward", la.index, dense, io[la.index]["out"], atol, rtol)
            if "full_kept_set" in checks:
                full = {g: torch.arange(la.units(g)) for g in la.groups}
                _close("full_kept_set", la.index, la.run_block(h, full, **kw), dense, atol, rtol)
            if "probe" in checks:
                _check_probe(la, h, kw, atol, rtol)
        if "kept_set_zeroed" in checks:
            ref = _zeroed_copy(model, adapter_cls, kept)
            for la in adapter.layers():
                h, kw = io[la.index]["hidden"], io[la.index]["kwargs"]
                layer_kept = {g: kept[(la.index, g)] for g in la.groups}
                ref_layer = adapter_cls(ref).decoder_layers[la.index]
                want = ref_layer(h, **kw)
                want = want[0] if isinstance(want, tuple) else want
                _close(
                    "kept_set_zeroed", la.index, la.run_block(h, layer_kept, **kw), want, atol, rtol
                )
    if "slicing" in checks or "cost_model" in checks:
        sliced_model = model_factory()
        sliced = slice_model(adapter_cls(sliced_model), Allocation(dict(kept)))
        if "slicing" in checks:
            ref = _zeroed_copy(model_factory(), adapter_cls, kept)
            with torch.no_grad():
                _close(
                    "slicing",
                    None,
                    sliced_model(input_ids=ids).logits,
                    ref(input_ids=ids).logits,
                    atol,
                    rtol,
                )
            for la in adapter.layers():
                n = sum(p.numel() for p in sliced.decoder_layers[la.index].parameters())
                want = la.params(len(kept[(la.index, ATTN)]), len(kept[(la.index, MLP)]))
                if n != want:
                    _fail("slicing", la.index, f"params() says {want}, the sliced layer has {n}")
            # an adapter of the sliced model (uneven K/V groups) runs and probes it too
            sliced_io = _capture_layers(sliced_model, sliced, ids)
            with torch.no_grad():
                for la in sliced.layers():
                    h, kw = sliced_io[la.index]["hidden"], sliced_io[la.index]["kwargs"]
                    _close(
                        "slicing",
                        la.index,
                        la.run_block(h, **kw),
                        sliced_io[la.index]["out"],
                        atol,
                        rtol,
                    )
                    _check_probe(la, h, kw, atol, rtol)
        if "cost_model" in checks:
            _check_cost(sliced_model, sliced, adapter, kept, ids)
    if "reload" in checks:
        with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
            _check_reload(model_factory, adapter_cls, kept, atol, ids, Path(tmp), rtol)
    if "remove_layers" in checks:
        with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
            _check_removal(model_factory, adapter_cls, kept, atol, ids, Path(tmp), rtol)
    if "sublayers" in checks:
        with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
            _check_sublayers(model_factory, adapter_cls, atol, ids, Path(tmp), rtol)


def _check_probe(la, h, kw, atol: float, rtol: float) -> None:
    """The probe over the whole batch equals the dense forward's output-projection input;
    :meth:`~prunekit.components.LayerAdapter.normalized` agrees with ``group_input`` and
    reports the residual's true mean of squares."""

    def driver(layer, group, x, residual, run, residual_sq_mean=None):
        _close("group input", layer.index, x, layer.group_input(group, residual), atol, rtol)
        if residual_sq_mean is not None:  # what a norm reports is the residual's mean square
            want = residual.float().pow(2).mean(-1, keepdim=True)
            _close("residual mean of squares", layer.index, residual_sq_mean, want, atol, rtol)
        y, activations = run(layer.gather(group, None), observe=True)
        bsz, seq = x.shape[:2]
        pos = torch.arange(seq).expand(bsz, seq)
        mask = torch.ones(bsz, seq, dtype=torch.bool)
        _close("probe", layer.index, layer.probe(group, x, pos, mask), activations, atol, rtol)
        return y

    la.run_block(h, driver=driver, **kw)


def _check_cost(sliced_model, sliced: ModelAdapter, dense: ModelAdapter, kept, ids) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    config = sliced_model.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"  # FlopCounterMode counts the eager matmuls
    try:
        io = _capture_layers(sliced_model, sliced, ids)
        bsz, seq = ids.shape
        for la in dense.layers():
            module = sliced.decoder_layers[la.index]
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                module(io[la.index]["hidden"], **io[la.index]["kwargs"])
            macs = counter.get_total_flops() / 2 / (bsz * seq)
            want = la.macs_per_token(len(kept[(la.index, ATTN)]), len(kept[(la.index, MLP)]), seq)
            if abs(macs - want) > 1e-6 * want:
                _fail("cost_model", la.index, f"macs_per_token says {want}, counted {macs}")
    finally:
        config._attn_implementation = previous


class AdapterConformance:
    """:func:`check_adapter` as pytest tests, one per check; subclasses define
    ``make_model()`` (a fresh tiny model per call) and may set ``adapter_class``.

    Example::

        class TestMyAdapter(AdapterConformance):
            adapter_class = MyAdapter
            def make_model(self):
                return tiny_my_model()
    """

    adapter_class: type | None = None
    atol = 1e-5
    rtol = 0.0
    #: checks of :data:`CHECKS` to leave out (e.g. ``("reload",)`` on a large real model)
    skip_checks: tuple[str, ...] = ()

    def make_model(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def _check(self, *checks: str, tmp_path=None) -> None:
        checks = tuple(c for c in checks if c not in self.skip_checks)
        if not checks:
            import pytest

            pytest.skip(f"{type(self).__name__} skips {', '.join(self.skip_checks)}")
        check_adapter(
            self.make_model,
            self.adapter_class,
            atol=self.atol,
            rtol=self.rtol,
            checks=checks,
            tmp_dir=str(tmp_path) if tmp_path is not None else None,
        )

    def test_supports(self):
        self._check("supports")

    def test_every_layer_has_units(self):
        model = self.make_model()
        from prunekit.registry import adapter_class_for

        adapter = (self.adapter_class or adapter_class_for(model.config))(model)
        for layer in adapter.layers():
            assert layer.num_heads > 0, f"layer {layer.index}: no attention heads"
            assert layer.intermediate_size > 0, f"layer {layer.index}: no MLP channels"
            assert layer.num_heads % layer.num_kv_heads == 0, f"layer {layer.index}: bad GQA"

    def test_block_forward_matches_hf(self):
        self._check("block_forward", "full_kept_set")

    def test_kept_set_equals_zeroed_dense(self):
        self._check("kept_set_zeroed")

    def test_probe_equals_dense_activations(self):
        self._check("probe")

    def test_slicing_and_cost_model(self):
        self._check("slicing", "cost_model")

    def test_saved_model_reloads_in_a_fresh_process(self, tmp_path):
        self._check("reload", tmp_path=tmp_path)

    def test_layer_removal(self, tmp_path):
        self._check("remove_layers", tmp_path=tmp_path)

    def test_sublayer_removal(self, tmp_path):
        self._check("sublayers", tmp_path=tmp_path)
