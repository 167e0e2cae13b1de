"""Recovery by distillation from the dense parent (``recovery.loss: kd | ce+kd``): the loss
against a hand computation, weight 0 against plain ``ce`` bit for bit, the cached teacher
against the online one, resumption, the teacher being the dense parent after every kind of
pruning, and the recipe checks; on a tiny model (the file takes about a minute on 2 cores)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prunekit.errors import RecipeError
from prunekit.recipe import Recipe, RecoveryConfig
from prunekit.recovery import (
    LoraTrainer,
    OnlineTeacher,
    RecoveryError,
    TeacherCache,
    cache_bytes,
    kd_loss,
    teacher_targets,
    window_rows,
)
from prunekit.runner import apply, prepare, recovery_windows, validate
from prunekit.testing import tiny_llama, tiny_tokenizer

pytest.importorskip("peft")

VOCAB = 128  # tiny_llama's


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny LLaMA, a training text and an evaluated text."""
    root = tmp_path_factory.mktemp("recovery_kd")
    tiny_llama(layers=2, seed=3).save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    g = torch.Generator().manual_seed(11)

    def words(rows: int, length: int) -> list[str]:
        ids = torch.randint(0, 60, (rows, length), generator=g).tolist()
        return [" ".join(f"w{i}" for i in r) for r in ids]

    (root / "train.txt").write_text("\n".join(words(40, 60)))
    (root / "eval.txt").write_text("\n".join(words(20, 60)))
    return root


def _recipe(root: Path, method: dict | None = None, **recovery) -> dict:
    return {
        "model": {"id": str(root / "tiny"), "dtype": "float32"},
        "method": method or {"name": "wanda-sp", "ratio": 0.5, "skip_layers": []},
        "calibration": {
            "path": str(root / "train.txt"),
            "samples": 8,
            "seq_len": 16,
            "batch_size": 4,
        },
        "evaluation": {
            "perplexity": [
                {"path": str(root / "eval.txt"), "seq_len": 16, "windows": 6, "batch_size": 3}
            ]
        },
        "runtime": {"batches": 0},
        "recovery": {
            "path": str(root / "train.txt"),
            "samples": 24,
            "seq_len": 16,
            "steps": 6,
            "batch_size": 2,
            "lr": 5e-3,
            "dropout": 0.1,
            "checkpoint_every": 2,
            **recovery,
        },
    }


def _hand_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float, k=None) -> float:
    """The definition, position by position in float64 Python arithmetic: the teacher's k
    largest logits (all without k), both distributions softmax(z / T) over those tokens,
    KL(teacher || student) summed over them, averaged over positions, times T**2."""
    total, count = 0.0, 0
    for s_row, t_row in zip(student.reshape(-1, student.shape[-1]).tolist(),
                            teacher.reshape(-1, teacher.shape[-1]).tolist(), strict=True):  # fmt: skip
        kept = sorted(range(len(t_row)), key=lambda i: -t_row[i])[:k] if k else range(len(t_row))
        zt = [t_row[i] / temperature for i in kept]
        zs = [s_row[i] / temperature for i in kept]
        lt = max(zt) + math.log(sum(math.exp(z - max(zt)) for z in zt))
        ls = max(zs) + math.log(sum(math.exp(z - max(zs)) for z in zs))
        total += sum(math.exp(a - lt) * ((a - lt) - (b - ls)) for a, b in zip(zt, zs, strict=True))
        count += 1
    return total / count * temperature**2


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------


def test_kd_loss_equals_a_hand_computation_on_a_tiny_model():
    """Teacher and student are two different tiny models on the same tokens; the loss over
    the whole vocabulary and over the teacher's top-5, at T = 1 and T = 2, against the
    definition computed by hand."""
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    teacher, student = (
        _logits(tiny_llama(layers=2, seed=3), ids),
        _logits(tiny_llama(layers=2, seed=8), ids),
    )
    for temperature in (1.0, 2.0):
        for k in (None, 5):
            values, indices = teacher_targets(teacher, k)
            assert values.shape == (2, 6, k or VOCAB)  # the last position predicts nothing
            got = kd_loss(student[:, :-1], values, indices, temperature)
            want = _hand_kd(student[:, :-1], teacher[:, :-1], temperature, k)
            assert got.item() == pytest.approx(want, rel=1e-5), (temperature, k)
    full = kd_loss(student[:, :-1], *teacher_targets(teacher, None), 2.0)
    every = kd_loss(student[:, :-1], *teacher_targets(teacher, VOCAB), 2.0)
    top5 = kd_loss(student[:, :-1], *teacher_targets(teacher, 5), 2.0)
    assert every.item() == pytest.approx(full.item(), rel=1e-5)  # top-k over all = full KL
    assert abs(top5.item() - full.item()) > 1e-3 * full.item()  # and top-5 is another loss
    assert kd_loss(teacher[:, :-1], *teacher_targets(teacher, None)).item() == pytest.approx(
        0.0, abs=1e-6
    )
    with pytest.raises(RecoveryError, match=r"top_k is 129.*128 tokens"):
        teacher_targets(teacher, VOCAB + 1)


def test_the_trainer_distils_what_kd_loss_defines():
    """The first step's recorded kd term is the hand-computed KD of the untrained student (its
    LoRA B factors start at zero) on micro-batch 0; ce+kd records ce + weight * kd."""
    windows = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(1))
    dense = tiny_llama(layers=2, seed=3)
    student = tiny_llama(layers=2, seed=5)
    rows = window_rows(0, 8, 2, 0)
    want = _hand_kd(
        _logits(student, windows[rows])[:, :-1], _logits(dense, windows[rows])[:, :-1], 2.0, 7
    )
    settings = RecoveryConfig(
        path="x",
        steps=3,
        batch_size=2,
        lr=1e-2,
        checkpoint_every=0,
        loss="ce+kd",
        kd={"temperature": 2.0, "top_k": 7, "weight": 0.5},
    )
    trainer = LoraTrainer(student, settings, windows, teacher=OnlineTeacher(dense, 7))
    record = trainer.train()
    kd, ce = record["kd"]["loss_kd"], record["kd"]["loss_ce"]
    assert kd[0] == pytest.approx(want, rel=1e-5)
    assert len(kd) == len(ce) == 3 and kd[1] != kd[0]
    for total, c, k in zip(record["loss"], ce, kd, strict=True):
        assert total == pytest.approx(c + 0.5 * k, rel=1e-6)
    assert record["kd"]["teacher"] == {"mode": "online", "source": "", "top_k": 7}
    with pytest.raises(RecoveryError, match="give the trainer its teacher"):
        LoraTrainer(tiny_llama(layers=2, seed=5), settings, windows)
    with pytest.raises(RecoveryError, match="recovery.loss is ce"):
        LoraTrainer(
            tiny_llama(layers=2, seed=5),
            RecoveryConfig(path="x", steps=2, checkpoint_every=0),
            windows,
            teacher=OnlineTeacher(dense),
        )


def test_the_cache_holds_every_window_seen_as_computed_in_its_first_batch():
    """More micro-batches than windows (two passes): each window is cached once, with the
    teacher's top-k from the micro-batch it is first trained in (equal to the online teacher
    there), and the later passes read the same targets back."""
    windows = torch.randint(0, VOCAB, (5, 10), generator=torch.Generator().manual_seed(2))
    dense = tiny_llama(layers=2, seed=3)
    settings = RecoveryConfig(
        path="x", steps=4, batch_size=2, checkpoint_every=0, loss="kd", kd={"top_k": 6}
    )
    cache = TeacherCache.build(dense, windows, settings, seed=0)
    assert sorted(cache.slots) == [0, 1, 2, 3, 4] and cache.values.shape == (5, 9, 6)
    assert cache.info["bytes"] == cache_bytes(5, 10, 6) == 5 * 9 * 6 * 8
    online = OnlineTeacher(dense, 6)
    first: dict[int, int] = {}
    for micro in range(4):
        rows = window_rows(micro, 5, 2, 0)
        values, indices = cache.targets(rows, windows[rows])
        live_v, live_i = online.targets(rows, windows[rows])
        for j, r in enumerate(rows):
            if first.setdefault(r, micro) == micro:  # its first batch: exactly the online one
                assert torch.equal(values[j], live_v[j]) and torch.equal(indices[j], live_i[j])
            else:  # computed in another batch: the same top-k, to rounding
                assert torch.equal(indices[j], live_i[j])
                assert torch.allclose(values[j], live_v[j], atol=1e-5, rtol=0)
    assert any(m > 0 for m in first.values()) and len(first) == 5  # a second pass happened


# ------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------


def test_kd_weight_zero_equals_ce_recovery_bit_for_bit(workdir, tmp_path):
    base = _recipe(workdir)
    base["output"] = {"save_model": True}
    zero = _recipe(workdir, loss="ce+kd", kd={"weight": 0.0})
    zero["output"] = {"save_model": True}
    ce = apply(base, output=tmp_path / "ce")
    kd0 = apply(zero, output=tmp_path / "kd0")
    assert kd0["recovery"]["loss"] == ce["recovery"]["loss"]
    assert all(k > 0.01 for k in kd0["recovery"]["kd"]["loss_kd"])  # the teacher did run
    assert kd0["recovery"]["kd"]["loss_ce"] == ce["recovery"]["loss"]
    a = load_file(str(tmp_path / "ce" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "kd0" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert kd0["metrics"] == ce["metrics"]
    # and a weight above 0 changes the weights
    one = apply(_recipe(workdir, loss="ce+kd", checkpoint_every=0), output=tmp_path / "kd1")
    assert one["recovery"]["loss"][0] != ce["recovery"]["loss"][0]
    assert one["metrics"]["eval"]["ppl"] != ce["metrics"]["eval"]["ppl"]


def test_the_cached_teacher_equals_the_online_one(workdir, tmp_path):
    """The same top-k online (the dense copy kept for timing, or the model loaded again) and
    cached (computed before pruning): the same losses, exactly, since every window's targets
    come from the same micro-batch through the same weights; with top_k the whole vocabulary,
    the same as the full KL to rounding."""
    kd = {"top_k": VOCAB, "temperature": 2.0}
    timed = {"batches": 1, "repeats": 5, "warmup": 0}
    runs = {}
    for name, extra, runtime in (
        ("reloaded", {}, None),
        ("timing copy", {}, timed),
        ("cache", {"cache": True}, None),
    ):
        recipe = _recipe(workdir, loss="kd", kd={**kd, **extra}, checkpoint_every=0)
        if runtime:
            recipe["runtime"] = runtime
        runs[name] = apply(recipe, output=tmp_path / name.replace(" ", "_"))["recovery"]
    assert runs["reloaded"]["kd"]["teacher"]["source"].endswith("loaded again")
    assert runs["timing copy"]["kd"]["teacher"]["source"] == "the dense copy kept for timing"
    teacher = runs["cache"]["kd"]["teacher"]
    assert teacher["mode"] == "cache" and teacher["source"] == "the dense model, before pruning"
    assert teacher["windows"] == 12 and teacher["bytes"] == cache_bytes(12, 16, VOCAB)
    assert runs["reloaded"]["loss"] == runs["timing copy"]["loss"] == runs["cache"]["loss"]
    full = apply(
        _recipe(workdir, loss="kd", kd={"temperature": 2.0}, checkpoint_every=0),
        output=tmp_path / "full",
    )["recovery"]
    assert full["loss"] == pytest.approx(runs["cache"]["loss"], rel=1e-5)
    for rec in (*runs.values(), full):  # peak memory is recorded
        mem = rec["memory"]
        assert mem["process_peak_rss_bytes"] >= mem["process_peak_rss_bytes_before"] > 1e6
    assert teacher["memory"]["process_peak_rss_bytes"] > 1e6
    # the resolved recipe a run writes (kd's defaults spelled out) validates again
    for name in ("reloaded", "cache"):
        saved = yaml.safe_load((tmp_path / name / "recipe.yaml").read_text())
        assert saved["recovery"]["kd"]["weight"] == 1.0 and saved["recovery"]["loss"] == "kd"
        validate(saved, check_output=False)


@pytest.mark.parametrize(
    "kd",
    [
        pytest.param({"loss": "ce+kd", "kd": {"temperature": 2.0, "weight": 0.5}}, id="online"),
        pytest.param({"loss": "kd", "kd": {"top_k": 16, "cache": True}}, id="cache"),
    ],
)
def test_an_interrupted_kd_recovery_resumes_to_the_same_weights(
    workdir, tmp_path, interrupted_apply, kd
):
    recipe = _recipe(workdir, steps=7, checkpoint_every=2, **kd)
    recipe["output"] = {"save_model": True}
    whole = apply(recipe, output=tmp_path / "whole")
    interrupted_apply(recipe, tmp_path / "cut", at_step=6)
    assert sorted(p.name for p in (tmp_path / "cut-recovery").iterdir()) == ["step-000004"]
    resumed = apply(recipe, output=tmp_path / "cut")
    assert resumed["recovery"]["resumed_from_step"] == 4
    assert resumed["recovery"]["loss"] == whole["recovery"]["loss"]
    assert resumed["recovery"]["kd"]["loss_kd"] == whole["recovery"]["kd"]["loss_kd"]
    assert len(resumed["recovery"]["kd"]["loss_ce"]) == 7
    a = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["metrics"] == whole["metrics"]


@pytest.mark.parametrize(
    ("method", "cache"),
    [
        pytest.param(
            {"name": "llm-pruner", "ratio": 0.5, "skip_layers": []}, False, id="llm-pruner"
        ),
        pytest.param(
            {
                "name": "loraprune",
                "ratio": 0.25,
                "skip_layers": [0],
                "round_to": 1,
                "keep_lora": True,
                "finetune": {"steps": 6, "batch_size": 2, "lr": 5e-3, "checkpoint_every": 0},
            },
            True,
            id="loraprune-cache",
        ),
    ],
)
def test_the_teacher_is_the_dense_parent(workdir, tmp_path, method, cache):
    """After pruning (LoRAPrune: also its own fine-tune, merged), the first step's kd term is
    the KD between the pruned model and the *dense* checkpoint on micro-batch 0."""
    pytest.importorskip("prunekit_plugins.lora_prune")
    kd = {"top_k": 9, "temperature": 1.5, "cache": cache}
    result = apply(
        _recipe(workdir, method, loss="kd", kd=kd, checkpoint_every=0), output=tmp_path / "o"
    )
    pruned = prepare(_recipe(workdir, method, loss="kd", kd=kd, steps=1, lr=1e-12))
    plain = _recipe(workdir, method)
    plain.pop("recovery")
    student = prepare(plain).model
    windows = recovery_windows(pruned.plan, pruned.loaded)[0]
    rows = window_rows(0, windows.shape[0], 2, 0)
    dense = tiny_llama(layers=2, seed=3)
    ids = windows[rows]
    want = _hand_kd(_logits(student, ids)[:, :-1], _logits(dense, ids)[:, :-1], 1.5, 9)
    assert result["recovery"]["kd"]["loss_kd"][0] == pytest.approx(want, rel=1e-5)
    assert result["recovery"]["kd"]["teacher"]["mode"] == ("cache" if cache else "online")
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in dense.parameters())


# ------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recovery", "match"),
    [
        ({"kd": {"temperature": 2.0}}, r"recovery\.kd: recovery\.kd sets up distillation, but "),
        ({"loss": "kd", "kd": {"weight": 0.5}}, r"recovery\.kd\.weight: the weight \(0\.5\) mixes"),
        ({"loss": "kd", "kd": {"cache": True}}, r"recovery\.kd\.cache: the cache keeps"),
        ({"loss": "ce+kd", "kd": {"top_k": 129}}, r"recovery\.kd\.top_k: top_k 129 is above .*128"),
        ({"loss": "kd", "kd": {"top_k": 0}}, r"recovery\.kd\.top_k: .*greater than or equal to 1"),
        ({"loss": "kd", "kd": {"temperature": 0}}, r"recovery\.kd\.temperature: the temperature"),
        ({"loss": "kd", "kd": {"temperature": -1.0}}, r"recovery\.kd\.temperature"),
        ({"loss": "ce+kd", "kd": {"weight": -0.1}}, r"recovery\.kd\.weight: the weight of the kd"),
        ({"loss": "kl"}, r"recovery\.loss: .*'ce', 'kd' or 'ce\+kd'"),
        ({"loss": "kd", "kd": {"topk": 5}}, r"recovery\.kd\.topk: unknown key .*top_k"),
    ],
)
def test_bad_distillation_settings_fail_at_validate(workdir, recovery, match):
    with pytest.raises(RecipeError, match=match):
        validate(_recipe(workdir, **recovery), check_output=False)


def test_a_teacher_that_does_not_fit_fails_at_validate(workdir, monkeypatch):
    """Memory reported as 1.5 times the dense weights: the weights fit, an online teacher
    (a second copy) does not; a cache does, unless it is larger than what is left."""
    import prunekit.host as host

    need = host.parameter_count(str(workdir / "tiny"), None) * 4
    total = int(1.5 * need)
    monkeypatch.setattr(host, "memory_available", lambda device: (total, total))
    with pytest.raises(RecipeError, match=r"recovery\.loss: the online teacher is a second copy"):
        validate(_recipe(workdir, loss="kd"), check_output=False)
    validate(_recipe(workdir, loss="kd"), check_output=False, here=False)  # checked elsewhere
    validate(_recipe(workdir, loss="kd", kd={"top_k": 8, "cache": True}), check_output=False)
    # 12 windows of 16 tokens: top_k such that the cache alone exceeds what the weights leave
    k = VOCAB
    assert cache_bytes(12, 16, k) + need > total  # the tiny model's vocabulary makes it so
    with pytest.raises(RecipeError, match=r"recovery\.kd\.top_k: the teacher's cache of top-128"):
        validate(_recipe(workdir, loss="kd", kd={"top_k": k, "cache": True}), check_output=False)


def test_a_bad_kd_setting_exits_2_at_validate_with_one_line(workdir, tmp_path, capsys, monkeypatch):
    import prunekit.loading
    from prunekit.cli import main

    def no_weights(*args, **kwargs):
        raise AssertionError("validate loaded weights")

    monkeypatch.setattr(prunekit.loading, "load_model", no_weights)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(workdir, kd={"top_k": 5})))
    assert main(["validate", str(path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"{path}:" in lines[0] and "recovery.kd: recovery.kd sets up distillation" in lines[0]


def test_a_ce_recovery_is_dumped_as_before_distillation_existed(workdir):
    """``loss: ce`` without ``kd`` adds no key to the resolved recipe, so sweep cells and
    recovery checkpoints keep their keys; a kd recovery spells both out."""
    plain = Recipe(**_recipe(workdir)).model_dump(mode="json")["recovery"]
    assert "loss" not in plain and "kd" not in plain
    kd = Recipe(**_recipe(workdir, loss="ce+kd")).model_dump(mode="json")["recovery"]
    assert kd["loss"] == "ce+kd"
    assert kd["kd"] == {"temperature": 1.0, "top_k": None, "weight": 1.0, "cache": False}
    assert kd == Recipe(**_recipe(workdir, loss="ce+kd", kd={})).model_dump(mode="json")["recovery"]
    assert RecoveryConfig(path="x", loss="kd").distillation.temperature == 1.0
    assert RecoveryConfig(path="x").distillation is None
