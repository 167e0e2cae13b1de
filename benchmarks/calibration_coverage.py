"""How much distinct text the calibration windows of a sweep hold.

Calibration follows the GPTQ/Wanda C4 protocol: each window draws a document *with
replacement* among those longer than the window, then a random offset in it. On the full C4
corpus every window comes from a new document; on a bounded sample (prunekit's local C4 split
has 1,000 documents) the windows soon re-draw the same documents and overlap, so "more
windows" stops meaning "more text". This script measures it for every cell of a sweep, with
the windows the cell's run draws (the runner's own code path, the cell's seed), and writes
``benchmarks/results/calibration_coverage.json``; ``benchmarks/ablations.py`` shows it in the
calibration-size section.

    python benchmarks/calibration_coverage.py                        # the calibration-size sweep
    python benchmarks/calibration_coverage.py recipes/ablations/calibration_size.yaml

Only the tokenizer and the data are read; no forward pass (seconds on a CPU).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "calibration_coverage.json"
DEFAULT_RECIPE = ROOT / "recipes" / "ablations" / "calibration_size.yaml"


def _window_index(docs: list[torch.Tensor], seq_len: int, probe: int = 16) -> dict:
    """(document, offset) of every window a document can give, keyed by tokens 1..probe of
    the window (token 0 may be replaced by BOS)."""
    index: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for d, ids in enumerate(docs):
        n = int(ids.numel())
        if n <= seq_len:
            continue
        rows = ids.unfold(0, probe + 1, 1)[: n - seq_len, 1:].tolist()
        for j, row in enumerate(rows):
            index.setdefault(tuple(row), []).append((d, j))
    return index


def locate(
    windows: torch.Tensor, docs: list[torch.Tensor], index: dict, probe: int = 16
) -> list[tuple[int, int]]:
    """The (document, offset) each window was cut from (its tokens compared in full)."""
    seq_len = windows.shape[1]
    found = []
    for w in windows:
        for d, j in index.get(tuple(w[1 : probe + 1].tolist()), []):
            if torch.equal(docs[d][j + 1 : j + seq_len], w[1:]):
                found.append((d, j))
                break
        else:
            raise SystemExit(
                "a calibration window matches no document: the calibration "
                "sampling changed; update this script"
            )
    return found


def coverage(places: list[tuple[int, int]], docs: list[torch.Tensor], seq_len: int) -> dict:
    """Distinct documents and tokens among windows at ``places`` against the pool they are
    drawn from (every document longer than ``seq_len``)."""
    from prunekit.data.corpora import distinct_tokens

    eligible = [int(t.numel()) for t in docs if int(t.numel()) > seq_len]
    drawn = len(places) * seq_len
    distinct = distinct_tokens(places, seq_len)
    return {
        "windows": len(places),
        "tokens_drawn": drawn,
        "distinct_documents": len({d for d, _ in places}),
        "distinct_tokens": distinct,
        "distinct_share": distinct / drawn,
        "pool_documents": len(eligible),
        "pool_tokens": sum(eligible),
        "pool_share_covered": distinct / sum(eligible),
    }


def main(argv: list[str] | None = None) -> int:
    from prunekit._files import write_atomic
    from prunekit.context import PruneContext
    from prunekit.data.corpora import _encode, load_documents
    from prunekit.runner import load, validate
    from prunekit.sweep import resolve_sweep

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    sweep = resolve_sweep(args.recipe)
    plans = [(cell, validate(cell.loaded, check_output=False)) for cell in sweep.cells]
    plans = [(c, p) for c, p in plans if p.method_cls.uses_calibration]
    if not plans:
        raise SystemExit(f"{args.recipe}: no cell of this sweep calibrates")
    loaded = load(plans[0][1])  # one model for every cell: the tokenizer is what matters
    corpora: dict = {}
    rows = []
    for cell, plan in plans:
        if plan.recipe.model.id != plans[0][1].recipe.model.id:
            raise SystemExit(f"{args.recipe}: its cells use several models; run it per model")
        ctx = PruneContext(
            model=loaded.model,
            tokenizer=loaded.tokenizer,
            adapter=loaded.adapter,
            settings=plan.settings,
            run_recipe=plan.recipe,
            calibration_source=plan.calibration_source,
            use_cache=False,
        )
        windows = ctx.calibration_windows()
        seq_len = windows.shape[1]
        source = ctx.calibration_source
        key = (source.describe(), seq_len)
        if key not in corpora:
            docs = [_encode(loaded.tokenizer, text) for text in load_documents(source)]
            corpora[key] = (docs, _window_index(docs, seq_len))
        docs, index = corpora[key]
        corpus = (f"{source.dataset}/{source.split}" if source.dataset else "file") + (
            f" ({Path(source.location).name})" if source.kind != "hub" else f" ({source.location})"
        )
        rows.append(
            {
                "labels": cell.labels,
                "seed": cell.seed,
                "corpus": corpus,
                "seq_len": seq_len,
                **coverage(locate(windows, docs, index), docs, seq_len),
            }
        )
        r = rows[-1]
        print(
            f"{cell.labels} seed {cell.seed}: {r['windows']} windows, "
            f"{r['distinct_documents']} of {r['pool_documents']} documents, "
            f"{r['distinct_share']:.1%} of the tokens drawn distinct",
            file=sys.stderr,
        )
    command = "python benchmarks/calibration_coverage.py " + shlex.quote(
        str(args.recipe.resolve().relative_to(ROOT))
        if args.recipe.resolve().is_relative_to(ROOT)
        else str(args.recipe)
    )
    write_atomic(
        args.out,
        json.dumps(
            {"command": command, "model": plans[0][1].recipe.model.id, "rows": rows}, indent=2
        )
        + "\n",
    )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
