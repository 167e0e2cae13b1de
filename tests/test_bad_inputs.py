"""Wrong inputs end in one clear line and exit 2, fast, with nothing written."""

from __future__ import annotations

import time

import pytest

from prunekit.cli import main

ALIAS_BOMB = """\
a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _validate(capsys, *args) -> tuple[int, str]:
    code = main(["validate", *map(str, args)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_a_binary_recipe_file(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"method:\n  name: pp\n\xff\xfe\x00\x01garbage")
    code, err = _validate(capsys, path)
    assert code == 2
    assert f"{path}:3: not a text file (byte 19 is not UTF-8)" in err


def test_nested_yaml_aliases_are_refused(tmp_path, capsys):
    # unguarded, this recipe expands to 10**9 values and never finishes: a timeout far above
    # the guard's milliseconds tells "refused" from "hung" even on a loaded machine
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    start = time.perf_counter()
    code, err = _validate(capsys, path)
    assert time.perf_counter() - start < 60
    assert code == 2 and "expands to more than 100000 values through YAML aliases" in err


def test_aliases_that_stay_small_still_work(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "defaults: &w {dataset: wikitext2, seq_len: 128, windows: 4}\n"
        "evaluation:\n  perplexity: [*w]\n"
    )
    code, err = _validate(capsys, path)
    # the alias expanded fine; the unknown top-level key is what is reported
    assert code == 2 and "defaults" in err and "expands" not in err


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p.mkdir(), "is a directory; give a YAML file"),
        (
            lambda p: p.write_bytes(b"#" * (1 << 20) + b"\n"),
            "is not a recipe (a recipe is a YAML text file of at most 1048576 bytes)",
        ),
        (lambda p: p.write_text("[" * 5000 + "]" * 5000), "nested too deeply"),
        (lambda p: p.write_text("- just\n- a list\n"), "the top level must be a mapping"),
    ],
)
def test_recipe_files_that_are_not_recipes(tmp_path, capsys, make, needle):
    path = tmp_path / "recipe.yaml"
    make(path)
    code, err = _validate(capsys, path)
    assert code == 2 and needle in err


@pytest.mark.parametrize(
    "layout, needle",
    [
        ("file", "is an existing file, not a directory"),
        ("under-a-file", "cannot be created"),
    ],
)
def test_an_output_dir_that_cannot_be_written_fails_at_validate(tmp_path, capsys, layout, needle):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    out = blocker if layout == "file" else blocker / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"method: {{name: dense}}\nevaluation: {{perplexity: []}}\noutput: {{dir: '{out}'}}\n"
    )
    code, err = _validate(capsys, recipe)
    assert code == 2 and "output.dir" in err and needle in err
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_a_device_this_machine_does_not_have_is_checked_where_the_run_happens(
    tmp_path, capsys, monkeypatch, device
):
    """``prunekit validate`` checks what holds anywhere (a recipe is often written on a laptop
    for a GPU node) and says that the device is checked where the recipe runs; ``apply`` on
    this machine fails at once, before any weight loads, with the device message."""
    import torch

    if device == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{device: '{device}'}}\nmethod: {{name: dense}}\nevaluation: {{perplexity: []}}\n"
    )
    code = main(["validate", str(recipe)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"not checked on this machine: model.device '{device}': not on this machine" in out
    assert "checked where the recipe runs" in out
    start = time.perf_counter()
    code = main(["apply", str(recipe), "-o", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and f"{recipe}:1: model.device" in err and "Traceback" not in err
    assert ("not available" in err) if device == "cuda" else ("cuda:0 to cuda:0" in err)
    assert time.perf_counter() - start < 30 and not (tmp_path / "run").exists()


def _text_recipe(tmp_path, text: str, **evaluation) -> str:
    (tmp_path / "text.txt").write_text(text)
    path = tmp_path / "r.yaml"
    ppl = {"path": str(tmp_path / "text.txt"), "seq_len": 16, "windows": 4, **evaluation}
    path.write_text(
        f"method: {{name: dense}}\nevaluation: {{perplexity: [{ppl!r}]}}\n".replace("'", '"')
    )
    return str(path)


@pytest.mark.parametrize(
    "text, evaluation, needle",
    [
        ("", {}, "is empty"),
        ("hi\n", {}, "fewer than one window of seq_len=16"),
        ("w " * 200, {"windows": 1000}, "1000 windows of 16 tokens need 16000 tokens"),
    ],
)
def test_text_too_short_for_the_request_fails_at_validate(
    tmp_path, capsys, text, evaluation, needle
):
    """Checked from the file's size alone (no tokenizer, no weights): at most one token per
    byte with any tokenizer."""
    code, err = _validate(capsys, _text_recipe(tmp_path, text, **evaluation))
    assert code == 2 and needle in err and "evaluation.perplexity.0" in err


@pytest.mark.parametrize(
    "rows, needle",
    [
        ('{"text": "a b c"}\n{"text": "d e\n', "t.jsonl:2: not valid JSON"),
        ('{"text": "a b c"}\n[1, 2]\n', "t.jsonl:2: expected a JSON object"),
        ('{"body": "a b c"}\n', "t.jsonl:1: row has no field 'text'"),
        ('{"text": 3}\n', "t.jsonl:1: field 'text' is int, expected a string"),
    ],
)
def test_a_malformed_jsonl_corpus_fails_at_validate(tmp_path, capsys, rows, needle):
    """The first rows of a JSON-lines corpus are read at validate, so a broken file is
    reported with its line before any weight loads, not at evaluation."""
    (tmp_path / "t.jsonl").write_text(rows + '{"text": "more words"}\n' * 40)
    path = tmp_path / "r.yaml"
    ppl = {"path": str(tmp_path / "t.jsonl"), "seq_len": 16, "windows": 2}
    path.write_text(
        f"method: {{name: dense}}\nevaluation: {{perplexity: [{ppl!r}]}}\n".replace("'", '"')
    )
    code, err = _validate(capsys, path)
    assert code == 2 and needle in err and "evaluation.perplexity.0.path" in err


def test_a_hub_id_is_reported_as_not_checked_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: {id: some-org/some-model}\nmethod: {name: dense}\nevaluation: {perplexity: []}\n"
    )
    code = main(["validate", str(path)])
    out = capsys.readouterr().out
    assert code == 0 and "is a Hugging Face hub id: not checked offline" in out


@pytest.mark.parametrize(
    "text",
    [
        'seed: !!python/object/apply:os.system ["touch {marker}"]\n',
        "seed: !!python/name:os.system\n",
        "seed: !custom 3\n",
    ],
)
def test_a_recipe_is_data_yaml_tags_construct_nothing(tmp_path, capsys, text):
    marker = tmp_path / "ran"
    path = tmp_path / "r.yaml"
    path.write_text(text.format(marker=marker))
    code, err = _validate(capsys, path)
    assert code == 2 and "could not determine a constructor" in err
    assert not marker.exists()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Saved tiny OPT (learned positions) and LLaMA (rotary), both with a 512-position
    context; configs only are read at validate."""
    from prunekit.testing import tiny_llama, tiny_opt, tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny-context")
    for name, model in (("opt", tiny_opt()), ("llama", tiny_llama(layers=4))):
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root


@pytest.mark.parametrize("model", ["opt", "llama"])
@pytest.mark.parametrize(
    "section, key",
    [
        (
            "calibration: {path: TEXT, samples: 2, seq_len: 1024}\nmethod: {name: wanda-sp, ratio: 0.2, "
            "skip_layers: []}\nevaluation: {perplexity: []}\n",
            "calibration.seq_len",
        ),
        (
            "method: {name: dense}\nevaluation: {perplexity: [{path: TEXT, seq_len: 600, windows: 1}]}\n",
            "evaluation.perplexity.0.seq_len",
        ),
        (
            "method: {name: dense}\nevaluation: {perplexity: [], tasks: [{name: piqa, "
            "max_length: 513}]}\n",
            "evaluation.tasks.0.max_length",
        ),
    ],
)
def test_a_window_longer_than_the_models_context_fails_at_validate(
    tmp_path, capsys, tiny_dirs, model, section, key
):
    """Past max_position_embeddings, OPT's learned positions raised an IndexError in the middle
    of calibration (reported as a prunekit bug) and rotary models ran outside the lengths they
    were trained on: both are refused from the config alone, naming the key."""
    (tmp_path / "t.txt").write_text("word " * 5000)
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {{id: {tiny_dirs / model}}}\n" + section.replace("TEXT", str(tmp_path / "t.txt"))
    )
    code, err = _validate(capsys, path)
    assert code == 2 and f"{key}: " in err
    assert "longer than the model's context (512 positions, max_position_embeddings" in err
    assert "use at most 512" in err
    # at the limit it validates
    path.write_text(
        path.read_text().replace("1024", "512").replace("600", "512").replace("513", "512")
    )
    code, err = _validate(capsys, path)
    assert code == 0, err


def test_calibration_on_too_little_text_warns_and_runs(tmp_path, capsys, tiny_dirs):
    """Asking for more calibration windows than a file holds is allowed (the windows are drawn
    with replacement) but the user is told, in one line, that most of them repeat the text."""
    (tmp_path / "t.txt").write_text("word " * 400)
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {{id: {tiny_dirs / 'llama'}}}\n"
        f"calibration: {{path: {tmp_path / 't.txt'}, samples: 16, seq_len: 128, "
        "batch_size: 8}\nmethod: {name: wanda-sp, ratio: 0.2, skip_layers: []}\n"
        "evaluation: {perplexity: []}\n"
    )
    code = main(["apply", str(path), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [line for line in err.splitlines() if "calibration:" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "warning: calibration: the 16 windows of 128 tokens drawn from file "
    )
    assert "distinct text" in lines[0] and "Traceback" not in err and "RuntimeWarning" not in err
    assert (tmp_path / "out" / "results.json").is_file()


@pytest.mark.parametrize(
    "rows, limit, needle",
    [
        (
            '{"q": "a", "opts": ["x", "y"], "label": 5}\n',
            None,
            "t.jsonl:1: task mine: gold value 5 gives index 5, out of range for 2 choices",
        ),
        (
            '{"q": "a", "opts": ["x", "y"], "label": 0}\n{"qq": "b", "opts": ["x"], "label": 0}\n',
            None,
            "t.jsonl:2: task mine: the record has no field 'q'",
        ),
        ('{"q": "a", "opts": "x y", "label": 0}\n', None, "field 'opts' must be a list of strings"),
        ("", None, "holds no records"),
    ],
)
def test_a_broken_task_file_fails_at_validate(tmp_path, capsys, rows, limit, needle):
    """Every question a task file gives the run is built at validate (no tokenizer, no
    weights), so a bad row is reported with its line before the model loads."""
    (tmp_path / "t.jsonl").write_text(rows)
    path = tmp_path / "r.yaml"
    path.write_text(
        "method: {name: dense}\nevaluation:\n  perplexity: []\n  tasks:\n"
        f"    - {{name: mine, path: {tmp_path / 't.jsonl'}, context: '{{q}}', "
        "choices: opts, gold: label}\n"
    )
    code, err = _validate(capsys, path)
    assert code == 2 and needle in err and "evaluation.tasks.0.path" in err


def test_task_rows_past_the_limit_are_not_checked(tmp_path, capsys):
    """`limit: 1` evaluates the first question only, so a bad second row is no error."""
    (tmp_path / "t.jsonl").write_text(
        '{"q": "a", "opts": ["x", "y"], "label": 0}\n{"q": "b", "opts": ["x", "y"], "label": 9}\n'
    )
    path = tmp_path / "r.yaml"
    path.write_text(
        "method: {name: dense}\nevaluation:\n  perplexity: []\n  tasks:\n"
        f"    - {{name: mine, limit: 1, path: {tmp_path / 't.jsonl'}, context: "
        "'{q}', choices: opts, gold: label}\n"
    )
    code, err = _validate(capsys, path)
    assert code == 0, err
    path.write_text(path.read_text().replace("limit: 1", "limit: 2"))
    code, err = _validate(capsys, path)
    assert code == 2 and "t.jsonl:2: task mine: gold value 9" in err


def _incomplete(directory, what: str) -> None:
    import json

    if what == "weights":
        for p in directory.glob("*.safetensors"):
            p.unlink()
    elif what == "tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (directory / name).unlink()
    else:  # a sharded checkpoint whose index names a shard that is not there
        weights = directory / "model.safetensors"
        weights.rename(directory / "model-00001-of-00002.safetensors")
        (directory / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "weight_map": {
                        "a": "model-00001-of-00002.safetensors",
                        "b": "model-00002-of-00002.safetensors",
                    }
                }
            )
        )


@pytest.mark.parametrize(
    "what, needle",
    [
        ("weights", "has config.json but no weights"),
        ("tokenizer", "has no tokenizer"),
        (
            "shard",
            "model.safetensors.index.json names 1 shard(s) that are missing "
            "(model-00002-of-00002.safetensors)",
        ),
    ],
)
def test_an_incomplete_local_checkpoint_fails_at_validate(
    tmp_path, capsys, tiny_dirs, what, needle
):
    """A directory copied without its weights, a shard or its tokenizer failed only once
    `apply` was loading it; its file names tell at validate."""
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_dirs / "llama", model_dir)
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {{id: {model_dir}}}\nmethod: {{name: dense}}\nevaluation: {{perplexity: []}}\n"
    )
    assert _validate(capsys, path)[0] == 0
    _incomplete(model_dir, what)
    code, err = _validate(capsys, path)
    assert code == 2 and f"{path}:1: model.id: " in err and needle in err


# --------------------------------------------------------------------------------------------
# The classes of wrong input that used to pass validate (issue 31, section 2)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, first",
    [
        ("method: {name: dense}\nseed: 1\nseed: 2\n", 3, 2),  # top level
        ("method:\n  name: dense\n  ratio: 0.2\n  ratio: 0.4\n", 4, 3),  # nested
        # inside a list entry (evaluation.perplexity)
        (
            "evaluation:\n  perplexity:\n    - dataset: ptb\n      seq_len: 64\n      seq_len: 128\n",
            5,
            4,
        ),
    ],
)
def test_a_key_given_twice_in_a_recipe_fails_with_both_lines(tmp_path, capsys, text, line, first):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    code, err = _validate(capsys, path)
    assert code == 2
    assert (
        f"{path}:{line}: key " in err
        and f"appears twice in this mapping (first at line {first})" in err
    )


def test_a_yaml_merge_key_is_not_a_duplicate(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "x-ppl: &p {dataset: wikitext2, seq_len: 64, windows: 2, batch_size: 2}\n"
        "evaluation:\n  perplexity:\n    - <<: *p\n      seq_len: 32\n"
    )
    code, err = _validate(capsys, path)
    # the merge is fine; the unknown top-level key x-ppl is what is reported
    assert code == 2 and "appears twice" not in err and "x-ppl" in err


def test_a_key_set_twice_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("method: {name: dense}\nevaluation: {perplexity: []}\n")
    code, err = _validate(capsys, path, "--set", "seed=1", "--set", "seed=2")
    assert code == 2
    assert "--set seed=2: seed is already set by --set seed=1; give each key once" in err


def test_a_key_twice_in_a_task_record_fails_at_validate(tmp_path, capsys):
    rows = tmp_path / "t.jsonl"
    rows.write_text(
        '{"q": "a", "opts": ["x", "y"], "label": 0}\n'
        '{"q": "a", "opts": ["x", "y"], "label": 0, "label": 1}\n'
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "method: {name: dense}\nevaluation:\n  perplexity: []\n  tasks:\n"
        f"    - {{name: mine, path: '{rows}', context: '{{q}}', choices: opts, gold: label}}\n"
    )
    code, err = _validate(capsys, path)
    assert code == 2 and f"{rows}:2: key 'label' appears twice in this record" in err


def test_an_output_location_the_system_refuses_fails_at_validate(tmp_path, monkeypatch):
    """Permission bits can say yes where creating fails (a read-only mount, ACLs, root on a
    squashed share): validate creates and removes a probe entry instead of asking os.access."""
    import errno
    import tempfile

    from prunekit.plan import output_problem

    out = tmp_path / "runs" / "x"
    assert output_problem(out) is None
    assert list(tmp_path.iterdir()) == []  # the probe left nothing behind

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    problem = output_problem(out)
    assert problem is not None
    assert f"{str(tmp_path)!r} is not writable (Read-only file system)" in problem


def test_calibration_that_would_only_repeat_the_text_fails_at_validate(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("word " * 400)  # 2,000 bytes: at most 4,001 tokens
    path = tmp_path / "r.yaml"
    path.write_text(
        f"calibration: {{path: {tmp_path / 't.txt'}, samples: 1000, seq_len: 128}}\n"
        "method: {name: wanda-sp, ratio: 0.2, skip_layers: []}\nevaluation: {perplexity: []}\n"
    )
    code, err = _validate(capsys, path)
    assert code == 2 and "calibration.samples" in err
    assert "1000 windows of 128 tokens ask for 128,000 tokens" in err
    assert "holds at most 4,001 with any tokenizer" in err and "at most 62 samples" in err


def test_more_timed_batches_than_evaluated_fails_at_validate(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(
        "method: {name: dense}\nruntime: {batches: 3}\nevaluation:\n  perplexity:\n"
        "    - {dataset: wikitext2, seq_len: 64, windows: 4, batch_size: 2}\n"
    )
    code, err = _validate(capsys, path)
    assert code == 2 and "runtime.batches" in err
    assert "3 timed batches, but evaluation.perplexity[0] has only 2" in err
