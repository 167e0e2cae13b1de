"""The plugin author's pages run: every ```python block of the four plugin pages.

Pages, in this order: docs/plugins.md, docs/plugins-tutorial.md, docs/plugins-reference.md,
docs/plugins-testing.md. Every fenced ```python block is run, unless the line directly
before its fence is a marker saying otherwise. The markers (HTML comments, invisible when the
page is rendered):

* no marker: the block runs alone, in a fresh namespace.
* ``<!-- not run: REASON -->``: the block is not run (an outline of a class, a fragment that
  needs a ``self``). REASON is required; keep such blocks few.
* ``<!-- module: NAME -->``: the block is the source of the Python module ``NAME`` (a
  plugin's ``__init__.py``). The first such block creates the module (a fresh module object,
  put in ``sys.modules`` while it is in use, so ``import NAME`` finds it); a later one
  continues the same file, in the module's namespace. The module belongs to group ``NAME``.
* ``<!-- run: NAME -->``: the block runs in group ``NAME``, in one namespace shared by the
  group's ``run`` blocks, after the group's earlier blocks (typically: code that imports the
  module ``NAME`` and prunes a tiny model with it).

A group runs as one test, its blocks in page order (a group may span pages: a test on the
testing page can use the tutorial's plugin module). Each solo block and each group runs
inside a fresh ``prunekit.testing.isolated_plugin_manager()``, in a temporary working
directory, so nothing it registers outlives it.

After a block runs, every ``test_*`` function it defined is called, and every ``test_*``
method of every ``Test*`` class it defined (on a fresh instance): the pages show pytest tests
for plugin authors, and those tests run here. Their arguments are pytest fixtures, supplied
by name: ``tmp_path`` (a fresh directory) and ``prunekit_pm`` (a fresh plugin manager, as the
fixture of ``prunekit.testing``).

A block (or a test it defines) that raises fails its test. Every runnable block imports from
prunekit only ``prunekit`` itself (for ``prunekit.prune``, ``prunekit.apply``...),
``prunekit.plugin`` and ``prunekit.testing``: the plugin front and the test kit.

The hook reference (docs/plugins-reference.md) has a ``### `name(args)``` heading for every
hook of ``prunekit/hookspecs.py`` and for nothing else, and states how many there are. Links
from the docs into the four pages point at headings that exist.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import prunekit
from prunekit.testing import isolated_plugin_manager, prunekit_imports

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = ["plugins.md", "plugins-tutorial.md", "plugins-reference.md", "plugins-testing.md"]
#: the prunekit modules a runnable block may import
ALLOWED_MODULES = {"prunekit", "prunekit.plugin", "prunekit.testing"}
MARKER = re.compile(r"^<!--\s*(not run|run|module):\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```python\s*$")


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the first line of code
    code: str
    kind: str  # "solo", "not run", "run" or "module"
    arg: str  # the reason, the group or the module name

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def _blocks_of(page: str) -> list[Block]:
    lines = (DOCS / page).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if not FENCE.match(lines[i]):
            i += 1
            continue
        start = i + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"docs/{page}:{i + 1}: unclosed ```python block"
        before = lines[i - 1].strip() if i > 0 else ""
        kind, arg = "solo", ""
        if before.startswith("<!--"):
            m = MARKER.match(before)
            assert m, (
                f"docs/{page}:{i}: unknown marker {before!r} (expected "
                "<!-- not run: REASON -->, <!-- run: NAME --> or <!-- module: NAME -->)"
            )
            kind, arg = m.groups()
            assert arg, f"docs/{page}:{i}: {kind} marker without its argument"
        blocks.append(Block(page, start + 1, "\n".join(lines[start:end]) + "\n", kind, arg))
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in _blocks_of(page)]
RUNNABLE = [b for b in BLOCKS if b.kind != "not run"]


def _units() -> list[tuple[str, list[Block]]]:
    """What runs as one test: each solo block alone, each group's blocks together."""
    units: list[tuple[str, list[Block]]] = []
    groups: dict[str, list[Block]] = {}
    for b in RUNNABLE:
        if b.kind == "solo":
            units.append((b.where.removeprefix("docs/"), [b]))
        else:
            if b.arg not in groups:
                groups[b.arg] = []
                units.append((f"group {b.arg}", groups[b.arg]))
            groups[b.arg].append(b)
    return units


UNITS = _units()


# --------------------------------------------------------------------------------------------
# Running a unit
# --------------------------------------------------------------------------------------------


def _call_test(fn, what: str, tmp_path: Path, counter: list[int]) -> None:
    """Call a pytest-style test defined by a block, with the fixtures it names."""
    with contextlib.ExitStack() as stack:
        kwargs = {}
        for name in inspect.signature(fn).parameters:
            if name == "self":
                continue
            if name == "tmp_path":
                counter[0] += 1
                kwargs[name] = tmp_path / f"test-{counter[0]}"
                kwargs[name].mkdir()
            elif name == "prunekit_pm":
                kwargs[name] = stack.enter_context(isolated_plugin_manager())
            else:
                raise AssertionError(
                    f"{what}: unknown fixture {name!r} (known: tmp_path, prunekit_pm)"
                )
        fn(**kwargs)


def _run_tests(
    namespace: dict, names: list[str], block: Block, tmp_path: Path, counter: list[int]
) -> list[str]:
    ran = []
    for name in names:
        obj = namespace[name]
        if name.startswith("test_") and inspect.isfunction(obj):
            _call_test(obj, f"{block.where} {name}", tmp_path, counter)
            ran.append(name)
        elif name.startswith("Test") and inspect.isclass(obj):
            for method in sorted(n for n in dir(obj) if n.startswith("test_")):
                _call_test(
                    getattr(obj(), method), f"{block.where} {name}.{method}", tmp_path, counter
                )
                ran.append(f"{name}.{method}")
    return ran


def _exec(block: Block, namespace: dict) -> list[str]:
    """Run ``block`` in ``namespace``; the names it defined or rebound, in definition order."""
    before = dict(namespace)
    # padded so that a traceback names the page's own line numbers
    code = compile("\n" * (block.line - 1) + block.code, str(DOCS / block.page), "exec")
    exec(code, namespace)
    return [
        n
        for n, v in namespace.items()
        if not n.startswith("__") and (n not in before or before[n] is not v)
    ]


def _run_unit(blocks: list[Block], tmp_path: Path) -> None:
    namespace: dict = {"__name__": "__docs__"}
    modules: dict[str, types.ModuleType] = {}
    counter = [0]
    try:
        with isolated_plugin_manager():
            for block in blocks:
                if block.kind == "module":
                    module = modules.get(block.arg)
                    if module is None:
                        assert block.arg not in sys.modules, (
                            f"{block.where}: module {block.arg!r} is already imported"
                        )
                        module = modules[block.arg] = types.ModuleType(block.arg)
                        module.__file__ = str(DOCS / block.page)
                        sys.modules[block.arg] = module
                    target = vars(module)
                else:
                    target = namespace
                try:
                    defined = _exec(block, target)
                    _run_tests(target, defined, block, tmp_path, counter)
                except Exception as exc:
                    raise AssertionError(
                        f"the block at {block.where} failed: {type(exc).__name__}: {exc}"
                    ) from exc
    finally:
        for name in modules:
            sys.modules.pop(name, None)


@pytest.mark.parametrize("blocks", [u for _, u in UNITS], ids=[n for n, _ in UNITS])
def test_block_runs(blocks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    _run_unit(blocks, work)


# --------------------------------------------------------------------------------------------
# What the blocks are
# --------------------------------------------------------------------------------------------


def test_the_pages_have_blocks_and_few_are_not_run():
    assert len(RUNNABLE) >= 10, [b.where for b in RUNNABLE]
    not_run = [b for b in BLOCKS if b.kind == "not run"]
    assert len(not_run) <= 6, [f"{b.where}: {b.arg}" for b in not_run]
    for b in BLOCKS:
        if b.kind in ("run", "module"):
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", b.arg), f"{b.where}: name {b.arg!r}"


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where.removeprefix("docs/") for b in RUNNABLE])
def test_block_imports_only_the_front(block):
    """A runnable block imports prunekit, prunekit.plugin or prunekit.testing, and reads of
    the top-level ``prunekit`` module only its public names."""
    tree = ast.parse(block.code)
    bad = [
        f"line {block.line + n - 1}: {m}"
        for n, m in prunekit_imports(tree)
        if m not in ALLOWED_MODULES
    ]
    public = {*prunekit.__all__, "plugin", "testing"}
    bad += [
        f"line {block.line + n.lineno - 1}: prunekit.{n.attr}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id == "prunekit"
        and n.attr not in public
    ]
    assert not bad, f"{block.where} reaches past the plugin front: {bad}"


# --------------------------------------------------------------------------------------------
# The hook reference
# --------------------------------------------------------------------------------------------


def _hookspecs() -> dict[str, list[str]]:
    """The hooks of prunekit/hookspecs.py (functions decorated with ``hookspec``) and their
    arguments, read from its syntax tree."""
    tree = ast.parse((REPO / "prunekit" / "hookspecs.py").read_text())
    return {
        node.name: [a.arg for a in node.args.args]
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any(isinstance(d, ast.Name) and d.id == "hookspec" for d in node.decorator_list)
    }


def test_the_reference_documents_every_hook_and_only_hooks():
    specs = _hookspecs()
    assert len(specs) >= 11, specs  # the registration hooks and the two observers
    import prunekit.hookspecs as hookspecs

    assert {n for n in dir(hookspecs) if n.startswith("prunekit_")} == set(specs)
    text = (DOCS / "plugins-reference.md").read_text()
    headings = re.findall(r"^### `(\w+)\(([^)]*)\)`", text, flags=re.MULTILINE)
    documented = {
        name: [a.strip() for a in args.split(",") if a.strip()]
        for name, args in headings
        if name.startswith("prunekit_")
    }
    assert len(documented) == len([h for h in headings if h[0].startswith("prunekit_")]), (
        "a hook has two headings"
    )
    missing = sorted(set(specs) - set(documented))
    assert not missing, f"docs/plugins-reference.md has no ### `name(...)` heading for {missing}"
    unknown = sorted(set(documented) - set(specs))
    assert not unknown, f"docs/plugins-reference.md documents hooks that do not exist: {unknown}"
    for name, args in documented.items():
        assert args == specs[name], f"{name}: documented ({args}), spec ({specs[name]})"
    # the count the page states
    m = re.search(r"prunekit has (\d+) hooks: (\d+) registration hooks", text)
    assert m, (
        "docs/plugins-reference.md does not state 'prunekit has N hooks: M registration hooks'"
    )
    registration = [n for n in specs if n.startswith("prunekit_register_")]
    assert (int(m.group(1)), int(m.group(2))) == (len(specs), len(registration)), m.group(0)


# --------------------------------------------------------------------------------------------
# Links into the pages
# --------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def _check_link(source: Path, target: str, anchor: str | None, bad: list[str]) -> None:
    page = (source.parent / target).resolve()
    if not page.is_file():
        bad.append(f"{source.relative_to(REPO)}: {target}{anchor or ''} (no such page)")
    elif anchor and anchor[1:] not in _anchors(page):
        bad.append(f"{source.relative_to(REPO)}: {target}{anchor} (no such heading)")


def test_links_into_the_plugin_pages_resolve():
    """Every link of the docs and READMEs into the four pages names a page and heading that
    exist (after the split of docs/plugins.md into four pages)."""
    sources = [
        REPO / "README.md",
        *sorted(DOCS.glob("*.md")),
        *sorted((REPO / "examples").rglob("README.md")),
    ]
    link = re.compile(r"\]\(([^)\s#]*plugins(?:-\w+)?\.md)(#[^)\s]*)?\)")
    bad: list[str] = []
    for source in sources:
        for m in link.finditer(source.read_text()):
            _check_link(source, m.group(1), m.group(2), bad)
    assert not bad, bad


def test_links_of_the_plugin_pages_resolve():
    """Every relative link of the four pages names a file that exists, and a heading that
    exists when it names one."""
    link = re.compile(r"\]\(([^)\s#:]+\.md)(#[^)\s]*)?\)")
    bad: list[str] = []
    for name in PAGES:
        source = DOCS / name
        for m in link.finditer(source.read_text()):
            _check_link(source, m.group(1), m.group(2), bad)
    assert not bad, bad
