"""``prunekit export --to gguf``: checked by llama.cpp itself, not by prunekit.

Every static method's saved model on every exportable adapter (tiny random models: MHA, GQA,
Qwen2's q/k/v biases, Mistral; Gemma-3 with one shape per layer), uniform and per-layer shapes,
is loaded by llama.cpp
(``llama-cpp-python``) and must give the fp32 model's logits and greedy tokens. CI installs
the bindings (``.ci/run``) and sets ``PRUNEKIT_REQUIRE_LLAMA_CPP=1``, so these tests cannot be
skipped there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.cli import main
from prunekit.errors import ExportError
from prunekit.export import export
from prunekit.testing import (
    tiny_gemma3,
    tiny_llama,
    tiny_mistral,
    tiny_opt,
    tiny_qwen2,
    tiny_qwen3,
)

if os.environ.get("PRUNEKIT_REQUIRE_LLAMA_CPP") == "1":
    import llama_cpp  # noqa: F401  (CI: a missing binding is a failure, not a skip)
else:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

MODELS = {
    "llama-mha": lambda: tiny_llama(heads=4, kv_heads=4, layers=4),
    "llama-gqa": lambda: tiny_llama(heads=6, kv_heads=2, layers=4),
    "qwen2": lambda: tiny_qwen2(layers=4, sliding_window=None),
    "mistral": lambda: tiny_mistral(layers=4, sliding_window=None),
}
#: (method, options): per-layer shapes (FLAP, skipped layers) and one shape for every layer
CASES = {
    "flap": ("flap", {}),
    "wanda-sp": ("wanda-sp", {}),
    "llm-pruner": ("llm-pruner", {}),
    "pp-calib": ("pp-calib", {}),
    "wanda-sp-uniform": (
        "wanda-sp",
        {"skip_layers": [], "allocator": {"name": "uniform", "balanced_kv": True}},
    ),
}
ATOL = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def _saved(tmp_path: Path, model_name: str, method: str, **options) -> Path:
    model = MODELS[model_name]()
    calibration = torch.randint(3, 128, (32, 32), generator=torch.Generator().manual_seed(1))
    options = {"skip_layers": [0], "round_to": 1, **options}
    outcome = prunekit.prune(
        model, None, method=method, ratio=0.4, calibration=calibration, **options
    )
    path = tmp_path / "run" / "model"
    outcome.save(str(path))
    return path


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_llama_cpp_computes_what_prunekit_computes(tmp_path, model_name, case):
    method, options = CASES[case]
    path = _saved(tmp_path, model_name, method, **options)
    report = export(
        path, type="f32", vocab="none", check=True, check_windows=2, check_tokens=24, threads=1
    )
    check = report["check"]
    assert check["max_abs_logit_diff"] < ATOL, check
    assert check["greedy_same"], check
    assert abs(check["ppl_rel_diff"]) < 1e-4, check
    if case != "wanda-sp-uniform":  # per-layer shapes: llama.cpp's deci
        assert report["arch"] == "deci", report
    elif model_name == "qwen2":  # balanced GQA at 0.4 keeps all 4 heads: qwen2 holds that
        assert report["arch"] == "qwen2", report
    else:
        assert report["arch"] == "llama", report
    assert not list(path.parent.glob(".*.tmp")), "a temporary file was left"


def test_uneven_gqa_groups_are_padded_exactly_and_the_cost_reported(tmp_path):
    """Kept query heads uneven across K/V groups (legal in prunekit, not in a GGUF): each
    group is padded with zero query heads; the exported model computes the same function."""
    from prunekit.components import ATTN, Allocation
    from prunekit.pruning.static import save_pruned, slice_model
    from prunekit.registry import resolve_adapter

    model = tiny_llama(heads=6, kv_heads=2, layers=2)
    kept = {(1, ATTN): torch.tensor([0, 1, 2, 4])}  # layer 1: groups of 3 and 1 query heads
    pruned = slice_model(resolve_adapter(model), Allocation(kept))
    path = tmp_path / "model"
    save_pruned(pruned, None, str(path), {})
    report = export(
        path, type="f32", vocab="none", check=True, check_windows=2, check_tokens=16, threads=1
    )
    assert report["arch"] == "llama"  # padded to 2 groups of 3: layer 0's shape again
    lg = report["legalization"]
    assert lg["padded_query_heads"] == 2 and lg["dropped_kv_heads"] == 0
    assert lg["extra_parameters"] == 2 * 2 * 96 * 16  # 2 heads x (q rows + o columns), d=96
    assert report["check"]["max_abs_logit_diff"] < ATOL


def test_quantized_types_shrink_the_file_and_stay_close(tmp_path):
    path = _saved(tmp_path, "llama-gqa", "flap")
    f32 = export(path, type="f32", vocab="none")
    q8 = export(
        path, type="q8_0", vocab="none", check=True, check_windows=2, check_tokens=24, threads=1
    )
    assert q8["bytes"] < 0.45 * f32["bytes"]
    assert q8["tensor_types"].get("Q8_0", 0) >= 1
    # round_to 1: matrices whose rows are not a multiple of 32 stay F16, listed
    assert all(name.startswith("blk.") for name in q8["f16_fallback"])
    # a random model's activations are far larger than a trained one's, and llama.cpp also
    # rounds activations to 8 bits: a loose bound here, the 2% one on SmolLM2 below
    assert abs(q8["check"]["ppl_rel_diff"]) < 0.05, q8["check"]


def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, capsys):
    path = _saved(tmp_path, "llama-gqa", "wanda-sp")
    out = tmp_path / "out.gguf"
    assert main(["export", str(path), "--type", "q3_k", "-o", str(out)]) == 2
    assert "unknown type 'q3_k'" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(path), "--to", "onnx", "-o", str(out)]) == 2
    assert "unknown format 'onnx'" in capsys.readouterr().err
    out.write_text("keep me")
    assert main(["export", str(path), "-o", str(out), "--vocab", "none"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main(["export", str(path), "-o", str(out), "--vocab", "none", "--force", "-q"]) == 0
    assert out.stat().st_size > 10_000
    # a run directory that saved no model, a dynamic method's run, no directory at all
    run = tmp_path / "nosave"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"method": "flap", "dynamic": False}))
    assert main(["export", str(run)]) == 2
    assert "saved no model" in capsys.readouterr().err
    (run / "results.json").write_text(json.dumps({"method": "pp", "dynamic": True}))
    assert main(["export", str(run)]) == 2
    err = capsys.readouterr().err
    assert "dynamic" in err and "pp-calib" in err and "Traceback" not in err
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    # a tiny word-level tokenizer has no llama.cpp equivalent: said, with the ways out
    from prunekit.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(path)
    assert main(["export", str(path), "-o", str(tmp_path / "t.gguf")]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer-from" in err and "--vocab none" in err
    assert not list(tmp_path.glob("*.gguf.*")) and not (tmp_path / "t.gguf").exists()


@pytest.mark.parametrize(
    "factory,words",
    [
        (lambda: tiny_opt(), "llama.cpp has no OPT architecture"),
        (lambda: tiny_gemma3(), "query_pre_attn_scalar is 24, not the head size 32"),
        (lambda: tiny_mistral(sliding_window=5), "sliding window of 5 tokens"),
        (lambda: tiny_qwen3(sliding_window=5), "layers \\[1, 2\\] .*sliding window of 5"),
    ],
)
def test_architectures_llama_cpp_cannot_hold_are_refused_before_writing(tmp_path, factory, words):
    path = tmp_path / "model"
    factory().save_pretrained(path)
    with pytest.raises(ExportError, match=words):
        export(path, type="f32", vocab="none", output=tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*gguf*"))


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_export_carries_its_gguf_tokenizer_and_matches_in_llama_cpp(smollm2, tmp_path):
    """A SmolLM2 FLAP model at 0.4 (per-layer shapes): exported f16 and q8_0 with the source
    GGUF's tokenizer; llama.cpp's perplexity on WikiText-2 windows within 0.5% (f16) and 2%
    (q8_0) of prunekit's fp32 model, the same greedy tokens in f16."""
    import copy

    model = copy.deepcopy(smollm2.model)
    outcome = prunekit.prune(
        model,
        smollm2.tokenizer,
        method="flap",
        ratio=0.4,
        calibration={"samples": 16, "seq_len": 128},
    )
    path = tmp_path / "model"
    outcome.save(str(path))
    source = smollm2.info["gguf_path"]  # a run directory's provenance names it by itself
    for type_name, tolerance in (("f16", 0.005), ("q8_0", 0.02)):
        report = export(
            path,
            type=type_name,
            check=True,
            check_windows=2,
            check_tokens=128,
            tokenizer_from=source,
        )
        assert report["arch"] == "deci" and report["tokenizer"].endswith(".gguf")
        c = report["check"]
        assert abs(c["ppl_rel_diff"]) < tolerance, (type_name, c)
        assert "WikiText-2" in c["windows"]
        if type_name == "f16":
            assert c["greedy_same"], c
    from gguf import GGUFReader

    fields = GGUFReader(report["path"]).fields
    assert "tokenizer.chat_template" in fields and "tokenizer.ggml.merges" in fields
    # without a source GGUF: the model directory's Hugging Face BPE tokenizer, converted; llama.cpp
    # then tokenizes text as the tokenizer does
    import llama_cpp

    hf = export(path, type="q8_0", output=tmp_path / "hf.gguf")
    assert hf["tokenizer"] == "hf"
    llm = llama_cpp.Llama(model_path=hf["path"], vocab_only=True, verbose=False)
    text = "The capital of France is Paris; it has 2,165,423 inhabitants."
    want = smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == want
    llm.close()


def test_a_loraprune_run_directory_exports_with_its_merged_weights(tmp_path):
    """LoRAPrune (per-layer shapes after an iterative fine-tune, LoRA merged): the export reads
    the run directory, finds its saved model and matches in llama.cpp."""
    pytest.importorskip("peft")
    from prunekit.testing import tiny_tokenizer

    tiny_llama(layers=3, seed=4).save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 60, (40, 60), generator=g).tolist()
    (tmp_path / "text.txt").write_text("\n".join(" ".join(f"w{i}" for i in r) for r in rows))
    recipe = {
        "model": {"id": str(tmp_path / "tiny"), "dtype": "float32"},
        "method": {
            "name": "loraprune",
            "ratio": 0.5,
            "skip_layers": [0],
            "round_to": 1,
            "prune_every": 4,
            "start": 0.1,
            "end": 0.2,
            "keep_lora": True,
            "finetune": {
                "steps": 12,
                "batch_size": 2,
                "lr": 5e-3,
                "dropout": 0.0,
                "checkpoint_every": 0,
            },
        },
        "calibration": {"path": str(tmp_path / "text.txt"), "samples": 16, "seq_len": 16},
        "evaluation": {"perplexity": []},
        "runtime": {"batches": 0},
        "output": {"save_model": True},
    }
    prunekit.apply(recipe, output=tmp_path / "run")
    report = export(
        tmp_path / "run",
        type="f32",
        vocab="none",
        check=True,
        check_windows=2,
        check_tokens=16,
        threads=1,
    )
    assert report["source"] == str(tmp_path / "run" / "model")
    assert report["arch"] == "deci" and report["check"]["max_abs_logit_diff"] < ATOL
    assert report["check"]["greedy_same"]


def _gemma3():
    model = tiny_gemma3(layers=3, sliding_window=4)
    model.config.query_pre_attn_scalar = model.config.head_dim  # what llama.cpp's gemma3 scales by
    return model


class _TableGelu(torch.nn.Module):
    """llama.cpp's CPU GELU (GGML_GELU_FP16): tanh-GELU read from a table indexed by the input
    rounded to fp16, stored in fp16; exact beyond |x| >= 10."""

    def forward(self, x):
        import torch.nn.functional as F

        y = F.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


@pytest.mark.parametrize("pruned", [False, True])
def test_gemma3_with_one_shape_in_every_layer_exports_as_gemma3(tmp_path, pruned):
    """Gemma-3 dense, or pruned to one shape in every layer, as llama.cpp's gemma3 (sandwich
    and q/k norms as 1 + weight, sliding windows, local RoPE base): its logits are the model's
    with llama.cpp's own GELU (an fp16 table) within 1e-3, and within 5e-3 of exact GELU."""
    model = _gemma3()
    path = tmp_path / "model"
    if pruned:
        calibration = torch.randint(3, 128, (32, 32), generator=torch.Generator().manual_seed(1))
        outcome = prunekit.prune(
            model,
            None,
            method="wanda-sp",
            ratio=0.4,
            round_to=1,
            calibration=calibration,
            skip_layers=[],
            allocator={"name": "uniform", "balanced_kv": True},
        )
        assert {(r["heads"], r["channels"]) for r in outcome.structure} == {(3, 58)}
        outcome.save(str(path))
    else:
        model.save_pretrained(path)
    report = export(
        path, type="f32", vocab="none", check=True, check_windows=2, check_tokens=24, threads=1
    )
    assert report["arch"] == "gemma3"
    assert report["check"]["max_abs_logit_diff"] < 5e-3 and report["check"]["greedy_same"]
    from prunekit.export.check import check_gguf

    reloaded = prunekit.load_pruned(str(path), dtype=torch.float32)
    for layer in reloaded.model.layers:
        layer.mlp.act_fn = _TableGelu()
    table = check_gguf(report["path"], reloaded, windows=2, tokens=24, threads=1)
    assert table["max_abs_logit_diff"] < 1e-3, table


def test_gemma3_with_per_layer_shapes_is_refused_with_what_would_export(tmp_path):
    calibration = torch.randint(3, 128, (32, 32), generator=torch.Generator().manual_seed(1))
    outcome = prunekit.prune(
        _gemma3(),
        None,
        method="wanda-sp",
        ratio=0.4,
        round_to=1,
        calibration=calibration,
        skip_layers=[0],
    )
    outcome.save(str(tmp_path / "model"))
    with pytest.raises(ExportError, match="per-layer shapes .*skip_layers: \\[\\]"):
        export(tmp_path / "model", vocab="none", output=tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def _byte_level_bpe(pre_tokenizer, byte_regex: bool):
    """A small byte-level BPE trained here, with this split before its ByteLevel step."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=byte_regex)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizer, byte_level]) if pre_tokenizer else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    corpus = ["f(hello) $world 12345 don't\n\n  x = 3.14159;", "The year 2024 had 366 days."] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_a_split_pattern_llama_cpp_knows_tokenizes_as_hugging_face_does(tmp_path, family):
    """Qwen2/2.5/3 (digits one by one) and LLaMA-3 (up to three digits) split text with their
    own pattern before BPE; written as llama.cpp's ``default`` they would give other tokens
    without an error (``12345`` as one piece), so the export names llama.cpp's pre-tokenizer
    for the pattern. The reference: the Hugging Face tokenizer on the same text."""
    import llama_cpp
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    from prunekit.export.gguf import _PRE_BY_PATTERN

    name = {"qwen2": "qwen2", "llama3": "llama-bpe"}[family]
    pattern = next(p for p, n in _PRE_BY_PATTERN.items() if n == name)
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    path = tmp_path / "m"
    # transformers rebuilds a qwen2 model's tokenizer as Qwen2Tokenizer (its own pattern); a
    # llama model's loads as saved
    model = (
        tiny_qwen2(layers=2, vocab=320, sliding_window=None)
        if family == "qwen2"
        else tiny_llama(layers=2, vocab=320)
    )
    model.save_pretrained(path)
    _byte_level_bpe(split, byte_regex=False).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)  # what the export reads, the reference
    assert pattern in tokenizer.backend_tokenizer.to_str().replace("\\\\", "\\")
    report = export(path, type="f32")
    llm = llama_cpp.Llama(model_path=report["path"], vocab_only=True, verbose=False)
    for text in ["f(hello) $world 12345 don't\n\n  x = 3.14159;", "In 2024, 366 days."]:
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == want, text
    llm.close()


def test_a_split_pattern_llama_cpp_has_no_name_for_is_refused(tmp_path):
    from tokenizers import pre_tokenizers

    # digits split one by one before GPT-2's regex (a SmolLM2-style tokenizer): no llama.cpp
    # pre-tokenizer is named for it here
    tokenizer = _byte_level_bpe(pre_tokenizers.Digits(individual_digits=True), byte_regex=True)
    path = tmp_path / "m"
    tiny_llama(layers=2, vocab=320).save_pretrained(path)
    tokenizer.save_pretrained(path)
    with pytest.raises(ExportError, match="pre-tokenizer prunekit cannot name for llama.cpp"):
        export(path, type="f32")
    assert not list(tmp_path.glob("*.gguf"))
