"""``prunekit sweep``: a grid of recipes, each cell one full ``apply`` in its own process.

A sweep directory holds::

    sweep.json            the sweep: base recipe, grid, variants, seeds, metrics, cells
    cells/<key>/          one per cell, named by the hash of its resolved recipe
        cell.json         its labels (grid values, variant), seed, and the overrides it adds
        recipe.yaml       its resolved recipe (``prunekit apply`` it to get the same numbers)
        status.json       pending / running / done / failed (with the error) / interrupted
        job.json          the scheduler's job that runs it (an executor that submits jobs)
        run/              the run's outputs (results.json, provenance.json, ...)
        log.txt           the cell process's output
    table.md, table.csv   the chosen metrics, mean and spread over seeds, failures included
    plot.png              the first metric against the first numeric grid key (matplotlib)

A cell is identified by its resolved recipe (everything but ``output.dir``), so re-running a
sweep, or another sweep that contains the same cell, skips it once finished (``--force``
runs it again). Where the cells run is an executor component (``prunekit components
executor``): ``local`` (a process pool on this machine) and ``submitit`` (a Slurm job array,
or submitit's local executor) ship with prunekit; others register like any component
(``prunekit_register_executors``). Every file is written atomically, and a cell holds a lock
while it runs, so two sweeps sharing a directory never run one cell twice or corrupt a file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import signal
import socket
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from prunekit._files import atomic_path, file_lock, write_atomic
from prunekit.errors import PrunekitError, RecipeError, Terminated, sigterm_as_exception
from prunekit.recipe import (
    OPTIONAL_SECTIONS,
    LoadedRecipe,
    Recipe,
    SweepConfig,
    dump_recipe,
    load_recipe,
)

SWEEP_FILE = "sweep.json"
CELL_FILE = "cell.json"
STATUS_FILE = "status.json"
RUN_DIR = "run"
LOG_FILE = "log.txt"
#: written by an executor that submits each cell as a scheduler job: ``{"executor": name,
#: "job_id": ..., ...}``; its class's ``lost_jobs(records)`` says which of them left the
#: scheduler without their cell recording an outcome (see :func:`reconcile`)
JOB_FILE = "job.json"
#: the states of a cell (``status.json``); ``pending`` when it has none yet
STATES = ("pending", "running", "done", "failed", "interrupted")


class SweepFailed(PrunekitError):
    """Some cells of a sweep failed (the others finished; the table says which and why)."""

    exit_code = 1


# --------------------------------------------------------------------------------------------
# Files: atomic writes, the cell lock
# --------------------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextmanager
def cell_lock(cell_dir: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the cell's lock (``flock`` on ``cell_dir/.lock``) while the block runs; yields
    whether it was taken (always, when ``wait``). The lock dies with its process, so a killed
    cell never leaves a stale one. Where locking is unavailable there is no lock (True)."""
    with file_lock(cell_dir / ".lock", wait=wait) as taken:
        yield taken is not False


# --------------------------------------------------------------------------------------------
# Building the cells
# --------------------------------------------------------------------------------------------


def split_values(text: str) -> list[str]:
    """``"0.2,0.4,[1,2]"`` -> ``["0.2", "0.4", "[1,2]"]``: commas inside brackets, braces or
    quotes do not split."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_grid(exprs: Sequence[str]) -> dict[str, list[Any]]:
    """``["method.ratio=0.2,0.4", ...]`` (``--grid``) -> ``{"method.ratio": [0.2, 0.4]}``; each
    value is parsed as YAML, like a ``--set`` value."""
    import yaml

    grid: dict[str, list[Any]] = {}
    for expr in exprs:
        key, eq, text = expr.partition("=")
        key = key.strip()
        if not eq or not key or not text.strip():
            raise RecipeError(
                f"--grid {expr}: expected KEY=V1,V2,..., e.g. --grid method.ratio=0.2,0.4"
            )
        values = []
        for part in split_values(text):
            if not part:
                raise RecipeError(f"--grid {expr}: an empty value (two commas in a row?)")
            try:
                values.append(yaml.safe_load(part))
            except yaml.YAMLError:
                values.append(part)
        if key in grid:
            raise RecipeError(f"--grid {expr}: {key} is given twice; list all its values once")
        grid[key] = values
    return grid


def _override(key: str, value: Any) -> str:
    # JSON is YAML: the value comes back exactly as given, whatever its type
    return f"{key}={json.dumps(value)}"


def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def cell_key(recipe: Recipe) -> str:
    """The identity of a cell: a hash of its resolved recipe, every default spelled out,
    without ``output.dir`` (where it is written), without a ``sweep`` section, and without
    the optional sections it does not have (so that a prunekit which adds one keeps the keys
    of the cells run before)."""
    data = recipe.model_dump(mode="json")
    for section in OPTIONAL_SECTIONS:
        if data.get(section) is None:
            data.pop(section, None)
    data.pop("sweep", None)
    data["output"].pop("dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Cell:
    """One run of a sweep."""

    key: str
    #: what distinguishes it in the table: variant name and grid values (not the seed)
    labels: dict[str, str]
    seed: int
    #: the ``--set`` expressions that make it from the base recipe (after the sweep's own)
    overrides: list[str]
    #: its recipe, with where each key came from (None for a cell read back from its files)
    loaded: LoadedRecipe | None
    dir: Path

    @property
    def recipe(self) -> Recipe:
        assert self.loaded is not None, "a cell read back from its directory has no recipe"
        return self.loaded.recipe

    @property
    def run_dir(self) -> Path:
        return self.dir / RUN_DIR

    def status(self) -> dict:
        status = read_json(self.dir / STATUS_FILE) or {"state": "pending"}
        if status.get("state") == "done" and not (self.run_dir / "results.json").is_file():
            status = {"state": "pending", "note": "run/results.json is missing"}
        return status

    def result(self) -> dict | None:
        return read_json(self.run_dir / "results.json")


@dataclass
class Sweep:
    """A resolved sweep: its directory, settings and cells."""

    dir: Path
    config: SweepConfig
    cells: list[Cell]
    base: LoadedRecipe
    base_overrides: list[str] = field(default_factory=list)

    @property
    def cells_dir(self) -> Path:
        return (Path(self.config.cells) if self.config.cells else self.dir / "cells").absolute()

    @property
    def label_keys(self) -> list[str]:
        return (["variant"] if self.config.variants else []) + list(self.config.grid)


def resolve_sweep(
    recipe: str | os.PathLike,
    overrides: Sequence[str] = (),
    grid: Sequence[str] = (),
    seeds: int | None = None,
    metrics: Sequence[str] = (),
    output: str | os.PathLike | None = None,
    executor: str | None = None,
    executor_options: dict[str, Any] | None = None,
) -> Sweep:
    """The cells of a sweep: the recipe's ``sweep`` section, updated by the command line
    (``--grid`` adds or replaces grid keys, the others replace their setting), each cell's
    recipe loaded and checked like ``prunekit validate`` checks one."""
    base = load_recipe(recipe, list(overrides))
    data = (base.recipe.sweep or SweepConfig()).model_dump(mode="json")
    data["grid"] = {**data["grid"], **parse_grid(grid)}
    if seeds is not None:
        data["seeds"] = seeds
    if metrics:
        data["metrics"] = list(metrics)
    if executor is not None or executor_options:
        name = executor or data["executor"]["name"]
        kept = data["executor"] if name == data["executor"]["name"] else {}
        data["executor"] = {**kept, **(executor_options or {}), "name": name}
    try:
        config = SweepConfig.model_validate(data)
    except ValidationError as exc:  # a --grid key such as `seed`, --seeds 0
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise RecipeError(f"{recipe}: sweep: {problems}") from None
    if output is not None:
        config.dir = str(output)
    sweep_dir = Path(config.dir or Path("runs") / f"sweep-{Path(recipe).stem}")
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise RecipeError(
            f"sweep directory {str(sweep_dir)!r} is an existing file; give a "
            "directory with --output or sweep.dir"
        )
    cells_root = (Path(config.cells) if config.cells else sweep_dir / "cells").absolute()
    if cells_root.exists() and not cells_root.is_dir():
        raise RecipeError(f"sweep.cells {str(cells_root)!r} is an existing file; give a directory")
    variants = config.variants or {"": {}}
    cells: list[Cell] = []
    seen: dict[str, Cell] = {}
    combos = list(itertools.product(*config.grid.values())) if config.grid else [()]
    for (variant, settings), combo in itertools.product(variants.items(), combos):
        for s in range(config.seeds):
            seed = base.recipe.seed + s
            labels = {"variant": variant} if config.variants else {}
            cell_sets = [_override(k, v) for k, v in settings.items()]
            for key, value in zip(config.grid, combo, strict=True):
                labels[key] = _label(value)
                cell_sets.append(_override(key, value))
            cell_sets.append(_override("seed", seed))
            where = ", ".join(f"{k}={v}" for k, v in labels.items()) or "the recipe"
            try:
                loaded = load_recipe(recipe, [*overrides, *cell_sets, "sweep=null"])
            except RecipeError as exc:
                message = str(exc)
                for expr in cell_sets:  # a grid value or a variant's key, not a --set
                    message = message.replace(f"--set {expr}", f"sweep value {expr}")
                raise RecipeError(f"sweep cell ({where}, seed {seed}): {message}") from None
            key = cell_key(loaded.recipe)
            if key in seen:
                raise RecipeError(
                    f"sweep cells ({where}, seed {seed}) and "
                    f"({', '.join(f'{k}={v}' for k, v in seen[key].labels.items())}"
                    f", seed {seen[key].seed}) resolve to the same recipe; "
                    "remove the duplicate grid value or variant"
                )
            cell_dir = cells_root / key
            loaded.recipe.output.dir = str((cell_dir / RUN_DIR).absolute())
            cell = Cell(key, labels, seed, cell_sets, loaded, cell_dir)
            seen[key] = cell
            cells.append(cell)
    return Sweep(sweep_dir, config, cells, base, list(overrides))


def dry_run(sweep: Sweep, registry=None) -> dict:
    """What ``prunekit sweep`` would do, without doing it or writing anything: the cells
    (labels, seed, the overrides each adds, already finished or not, invalid with the error)
    and the executor's submission (its ``describe(cells)`` when it has one)."""
    from prunekit.registry import get_registry

    registry = registry or get_registry()
    ex_cfg = sweep.config.executor
    executor = registry.create("executor", ex_cfg.name, ex_cfg.options, where="sweep.executor")
    invalid = validate_cells(sweep, registry, executor)
    cells = [
        {
            "key": c.key,
            "labels": c.labels,
            "seed": c.seed,
            "overrides": c.overrides,
            "finished": c.status()["state"] == "done",  # read only: no lock taken
            **({"invalid": invalid[c.key]} if c.key in invalid else {}),
        }
        for c in sweep.cells
    ]
    runnable = sum(1 for c in cells if not c["finished"] and "invalid" not in c)
    describe = getattr(executor, "describe", None)
    return {
        "dir": str(sweep.dir),
        "cells": cells,
        "to_run": runnable,
        "executor": describe(runnable) if describe else {"executor": ex_cfg.name},
    }


def validate_cells(sweep: Sweep, registry=None, executor=None) -> dict[str, str]:
    """Check every cell as ``prunekit validate`` checks a recipe (no weights load): the
    errors by cell key. When every cell fails, the sweep is wrong, not a cell: raise the
    first error.

    An executor whose cells run on other machines (``runs_elsewhere``, a scheduler) leaves
    the host-dependent checks (the device) to each cell, which makes them
    first on its own node; instead its ``device_problem(device)``, when it has one, says
    whether what it requests for a cell provides the recipe's device (a cuda recipe with no
    GPU requested is an error here, at submission)."""
    from prunekit.runner import validate

    here = not getattr(executor, "runs_elsewhere", False)
    device_problem = getattr(executor, "device_problem", None)
    errors: dict[str, str] = {}
    for cell in sweep.cells:
        try:
            validate(cell.loaded, registry=registry, here=here)
        except PrunekitError as exc:
            errors[cell.key] = str(exc)
            continue
        problem = device_problem(cell.loaded.recipe.model.device) if device_problem else None
        if problem:
            errors[cell.key] = f"{cell.loaded.where(('model', 'device'))}: {problem}"
    if errors and len(errors) == len(sweep.cells):
        first = sweep.cells[0]
        labels = ", ".join(f"{k}={v}" for k, v in first.labels.items()) or "the recipe"
        raise RecipeError(
            f"every cell of the sweep is invalid; the first ({labels}, seed "
            f"{first.seed}): {errors[first.key]}"
        )
    return errors


def prepare_cells(sweep: Sweep, force: bool = False) -> list[Cell]:
    """Write each cell's ``cell.json`` and ``recipe.yaml``; the cells still to run (every
    cell not finished, or every cell with ``force``)."""
    todo = []
    for cell in sweep.cells:
        with cell_lock(cell.dir, wait=False) as free:
            if not free:  # running in another sweep: its lock makes run_cell wait for it
                todo.append(cell)
                continue
            write_json(
                cell.dir / CELL_FILE,
                {
                    "key": cell.key,
                    "labels": cell.labels,
                    "seed": cell.seed,
                    "recipe_file": str(sweep.base.path) if sweep.base.path else None,
                    "overrides": [*sweep.base_overrides, *cell.overrides],
                    "cwd": os.getcwd(),
                },
            )
            write_atomic(cell.dir / "recipe.yaml", dump_recipe(cell.recipe))
            if force and cell.status()["state"] != "pending":
                write_json(
                    cell.dir / STATUS_FILE,
                    {
                        "state": "pending",
                        "note": "--force",
                        "attempt": cell.status().get("attempt"),
                    },
                )
            if cell.status()["state"] != "done":
                # the job of an earlier submission no longer runs it (the executor records
                # its new one): its end must not fail the cell
                (cell.dir / JOB_FILE).unlink(missing_ok=True)
                todo.append(cell)
    return todo


def record_invalid(cell: Cell, message: str) -> None:
    write_json(
        cell.dir / STATUS_FILE,
        {
            "state": "failed",
            "stage": "validate",
            "exit_code": 2,
            "error": message,
            "finished": _now(),
        },
    )


def record_lost(cell_dir: Path, job_id: str, message: str) -> bool:
    """Record the cell as failed because its scheduler job ``job_id`` ended without the cell
    recording an outcome (``message``: what the scheduler said, and where its log is).
    Nothing is written when the cell finished after all, runs in a process of this machine
    (its lock is held), or was submitted again under another job; True when written."""
    with cell_lock(cell_dir, wait=False) as free:
        if not free:
            return False
        status = read_json(cell_dir / STATUS_FILE) or {}
        if status.get("state") in ("done", "failed"):
            return False
        record = read_json(cell_dir / JOB_FILE) or {}
        if str(record.get("job_id")) != str(job_id):
            return False
        kept = {k: status[k] for k in ("host", "started", "attempt") if k in status}
        write_json(
            cell_dir / STATUS_FILE,
            {
                "state": "failed",
                "stage": "scheduler",
                "exit_code": 1,
                "job_id": job_id,
                "error": message,
                **kept,
                "finished": _now(),
            },
        )
        return True


def reconcile(cells: Sequence[Cell], registry=None) -> int:
    """Fail the cells whose scheduler job is gone while they are still pending, running or
    interrupted: a job cancelled or killed before the cell could record an outcome (with
    Slurm, submitit never hears of it where the cluster keeps no accounting). Each such
    cell's ``job.json`` names its executor, whose class's ``lost_jobs(records)`` returns
    the errors of the jobs that left the scheduler, by job id (an executor without it
    reports none). Returns how many cells were failed."""
    waiting: dict[str, list[tuple[Cell, dict]]] = {}
    for cell in cells:
        if cell.status()["state"] in ("done", "failed"):
            continue
        record = read_json(cell.dir / JOB_FILE)
        if record and record.get("job_id") is not None and record.get("executor"):
            waiting.setdefault(str(record["executor"]), []).append((cell, record))
    if not waiting:
        return 0
    from prunekit.registry import get_registry

    registry = registry or get_registry()
    failed = 0
    for name, items in waiting.items():
        try:
            factory = registry.get("executor", name).factory
        except PrunekitError:  # its plugin is gone: nothing to ask
            continue
        lost_jobs = getattr(factory, "lost_jobs", None)
        if lost_jobs is None:
            continue
        lost = lost_jobs([record for _, record in items])
        for cell, record in items:
            message = lost.get(str(record["job_id"]))
            if message and record_lost(cell.dir, str(record["job_id"]), message):
                failed += 1
    return failed


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------------------------
# Running one cell (in its own process: ``python -m prunekit.sweep CELL_DIR``)
# --------------------------------------------------------------------------------------------


def run_cell(cell_dir: str | os.PathLike) -> dict:
    """Run the cell in ``cell_dir`` (``prunekit apply`` of its ``recipe.yaml`` into ``run/``)
    unless it is finished, and record its outcome in ``status.json``; the outcome.

    Waits while another process runs the same cell (its lock), then finds it finished. Never
    raises for a failed run: the error (a :class:`PrunekitError`'s message, or the exception
    with its traceback in ``log.txt``) is recorded and the status returned. An interrupt
    records ``interrupted`` and propagates; ``apply`` itself leaves no partial ``run/``.
    """
    cell_dir = Path(cell_dir).absolute()
    with cell_lock(cell_dir):
        meta = read_json(cell_dir / CELL_FILE) or {}
        status = read_json(cell_dir / STATUS_FILE) or {}
        if status.get("state") == "done" and (cell_dir / RUN_DIR / "results.json").is_file():
            return status
        started = time.time()
        running = {
            "state": "running",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _now(),
            "attempt": int(status.get("attempt") or 0) + 1,
        }
        write_json(cell_dir / STATUS_FILE, running)
        try:
            if meta.get("cwd"):  # relative data paths are relative to where the sweep started
                os.chdir(meta["cwd"])
            from prunekit.runner import apply

            apply(cell_dir / "recipe.yaml", output=cell_dir / RUN_DIR)
            status = {"state": "done"}
        except PrunekitError as exc:
            status = {"state": "failed", "error": str(exc), "exit_code": exc.exit_code}
        except (KeyboardInterrupt, SystemExit, Terminated) as exc:
            write_json(
                cell_dir / STATUS_FILE,
                {**running, "state": "interrupted", "error": type(exc).__name__},
            )
            raise
        except Exception as exc:  # a bug or a plugin fault: recorded, the sweep goes on
            traceback.print_exc()
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            status = {
                "state": "failed",
                "error": f"{detail} (traceback in the cell's log)",
                "exit_code": 1,
            }
        status.update(
            host=running["host"],
            started=running["started"],
            finished=_now(),
            seconds=round(time.time() - started, 3),
            attempt=running["attempt"],
        )
        write_json(cell_dir / STATUS_FILE, status)
        return status


def cell_main(argv: Sequence[str] | None = None) -> int:
    """``python -m prunekit.sweep CELL_DIR``: run one cell; 0 when done, 1 when failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m prunekit.sweep CELL_DIR", file=sys.stderr)
        return 2
    from prunekit.progress import set_quiet

    set_quiet(True)  # the output goes to the cell's log: no progress bars in it
    # the executor stops a cell with SIGINT: honour it even where the sweep was started in the
    # background (whose children inherit SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with sigterm_as_exception():
            status = run_cell(argv[0])
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 143
    if status["state"] == "failed":
        print(f"cell failed: {status.get('error')}", file=sys.stderr)
    return 0 if status["state"] == "done" else 1


# --------------------------------------------------------------------------------------------
# The whole sweep
# --------------------------------------------------------------------------------------------


def _manifest(sweep: Sweep, executor_info: dict | None) -> dict:
    return {
        "recipe": str(sweep.base.path) if sweep.base.path else None,
        "overrides": sweep.base_overrides,
        "sweep": sweep.config.model_dump(mode="json"),
        "label_keys": sweep.label_keys,
        "cells_dir": str(sweep.cells_dir),
        "cells": [{"key": c.key, "labels": c.labels, "seed": c.seed} for c in sweep.cells],
        "executor_info": executor_info,
    }


def run_sweep(
    sweep: Sweep, force: bool = False, wait: bool = True, registry=None, report=None
) -> dict:
    """Validate, prepare and run the cells of ``sweep`` with its executor, then write the
    table. Returns :func:`collect`'s summary. ``report(message)`` receives progress lines."""
    from prunekit.registry import get_registry

    registry = registry or get_registry()
    ex_cfg = sweep.config.executor
    executor = registry.create("executor", ex_cfg.name, ex_cfg.options, where="sweep.executor")
    if not wait and not getattr(executor, "detaches", False):
        raise RecipeError(
            f"executor {ex_cfg.name!r} cannot detach: it runs the cells in this "
            "process's children; drop --detach or use an executor that submits "
            "to a scheduler (submitit)"
        )
    invalid = validate_cells(sweep, registry, executor)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep.dir / SWEEP_FILE, _manifest(sweep, None))
    todo = prepare_cells(sweep, force=force)
    for cell in todo:
        if cell.key in invalid:
            record_invalid(cell, invalid[cell.key])
    runnable = [c for c in todo if c.key not in invalid]
    say = report or (lambda message: None)
    finished = len(sweep.cells) - len(todo)
    say(
        f"sweep {sweep.dir}: {len(sweep.cells)} cells, {finished} already finished, "
        f"{len(invalid)} invalid, {len(runnable)} to run on executor {ex_cfg.name!r}"
    )
    info = None
    if runnable:
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(runnable, stop, say), daemon=True)
        watcher.start()
        try:
            info = executor.run([c.dir for c in runnable], sweep.dir, wait=wait)
        finally:
            stop.set()
            watcher.join(timeout=5)
    write_json(sweep.dir / SWEEP_FILE, _manifest(sweep, info))
    return collect(sweep.dir)


def _watch(cells: list[Cell], stop: threading.Event, say) -> None:
    """Report each cell as it ends (read from its status file, whatever the executor)."""
    pending = {c.key: c for c in cells}
    total, ended = len(cells), 0
    while pending and not stop.wait(0.5):
        for key, cell in list(pending.items()):
            status = cell.status()
            if status["state"] in ("done", "failed"):
                ended += 1
                del pending[key]
                what = ", ".join(f"{k}={v}" for k, v in cell.labels.items()) or "the recipe"
                tail = (
                    f"done in {status.get('seconds', 0):.0f} s"
                    if status["state"] == "done"
                    else f"FAILED: {str(status.get('error')).splitlines()[0]}"
                )
                say(f"  [{ended}/{total}] {what}, seed {cell.seed}: {tail}")


def load_sweep(sweep_dir: str | os.PathLike) -> tuple[dict, list[Cell]]:
    """A sweep directory's manifest and cells (``prunekit sweep --status DIR``)."""
    sweep_dir = Path(sweep_dir)
    manifest = read_json(sweep_dir / SWEEP_FILE)
    if manifest is None:
        what = "does not exist" if not sweep_dir.exists() else f"has no readable {SWEEP_FILE}"
        raise RecipeError(
            f"{sweep_dir}: not a sweep directory ({what}); give the directory "
            "that prunekit sweep wrote (--output or sweep.dir)"
        )
    root = Path(manifest.get("cells_dir") or sweep_dir / "cells")
    cells = [
        Cell(c["key"], c["labels"], c["seed"], [], None, root / c["key"]) for c in manifest["cells"]
    ]
    return manifest, cells


def cell_state(cell: Cell) -> str:
    """``status.json``'s state, with a ``running`` cell whose process is gone (its lock is
    free) reported as ``interrupted``."""
    state = cell.status()["state"]
    if state == "running":
        with cell_lock(cell.dir, wait=False) as free:
            if free:
                return "interrupted"
    return state


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def default_metrics(results: list[dict]) -> list[str]:
    """Every perplexity, the tasks' average, the decoder MACs kept, and the speed-up when the
    runs were timed."""
    names: list[str] = []
    for result in results:
        for label, metric in result.get("metrics", {}).items():
            for key in ("ppl", "acc_norm"):
                if key in metric and "questions" not in metric and f"{label}.{key}" not in names:
                    names.append(f"{label}.{key}")
    names.append("reduction.flops_kept_fraction")
    if any((r.get("runtime") or {}).get("speedup") for r in results):
        names.append("runtime.speedup")
    return names


def metric_value(result: dict, name: str) -> float | None:
    """``label.key`` in ``metrics``, else a dotted path in results.json; None when absent."""
    for node in (result.get("metrics", {}), result):
        for part in name.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                node = None
                break
        if isinstance(node, int | float) and not isinstance(node, bool):
            return float(node)
    return None


@dataclass
class Row:
    labels: dict[str, str]
    seeds: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    failed: list[tuple[int, str]] = field(default_factory=list)
    unfinished: int = 0


def summarize(values: list[float]) -> dict:
    """Mean, standard deviation (n-1; 0 for one value), min and max."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": std,
        "min": min(values),
        "max": max(values),
    }


def collect(sweep_dir: str | os.PathLike) -> dict:
    """Read every cell of the sweep in ``sweep_dir``, write ``table.md``, ``table.csv`` and
    ``plot.png`` (atomically), and return the summary (rows, counts by state, failures).
    A cell whose scheduler job is gone without its recording an outcome is failed first
    (:func:`reconcile`)."""
    sweep_dir = Path(sweep_dir)
    manifest, cells = load_sweep(sweep_dir)
    reconcile(cells)
    config = manifest["sweep"]
    label_keys = manifest["label_keys"]
    results = {c.key: c.result() for c in cells}
    states = {c.key: cell_state(c) for c in cells}
    finished = [r for k, r in results.items() if r is not None and states[k] == "done"]
    metrics = config["metrics"] or default_metrics(finished)
    rows: dict[tuple, Row] = {}
    failures = []
    for cell in cells:
        ident = tuple(cell.labels.get(k, "") for k in label_keys)
        row = rows.setdefault(ident, Row(dict(cell.labels)))
        state = states[cell.key]
        if state == "done" and results[cell.key] is not None:
            row.seeds.append(cell.seed)
            for name in metrics:
                value = metric_value(results[cell.key], name)
                if value is not None:
                    row.values.setdefault(name, []).append(value)
        elif state == "failed":
            error = str(cell.status().get("error", "?"))
            row.failed.append((cell.seed, error.splitlines()[0] if error else "?"))
            failures.append(
                {"key": cell.key, "labels": cell.labels, "seed": cell.seed, "error": error}
            )
        else:
            row.unfinished += 1
    counts = {s: sum(1 for v in states.values() if v == s) for s in STATES}
    # a metric no finished cell has is a typo, not a missing value: say what exists
    unknown = [m for m in metrics if finished and not any(r.values.get(m) for r in rows.values())]
    table = [
        {
            "labels": r.labels,
            "seeds": r.seeds,
            "metrics": {
                m: {**summarize(r.values.get(m, [])), "values": r.values.get(m, [])}
                for m in metrics
            },
            "failed": _failures(r.failed),
            "unfinished": r.unfinished,
        }
        for r in rows.values()
    ]
    summary = {
        "dir": str(sweep_dir),
        "cells": len(cells),
        "states": counts,
        "metrics": metrics,
        "label_keys": label_keys,
        "rows": table,
        "failures": failures,
        "unknown_metrics": unknown,
        "available_metrics": default_metrics(finished) if unknown else [],
    }
    write_atomic(sweep_dir / "table.md", markdown_table(summary))
    write_atomic(sweep_dir / "table.csv", csv_table(summary))
    write_json(sweep_dir / "summary.json", summary)
    summary["plot"] = plot(summary, sweep_dir / "plot.png")
    return summary


def _failures(failed: list[tuple[int, str]]) -> list[str]:
    """``seeds 0, 1: <error>``: one line per distinct error of a row."""
    by_error: dict[str, list[int]] = {}
    for seed, error in failed:
        by_error.setdefault(error, []).append(seed)
    return [
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}: {error}"
        for error, seeds in by_error.items()
    ]


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.3f}"
    return f"{value:.4f}"


def markdown_table(summary: dict) -> str:
    """Mean ± standard deviation over seeds, with the min-max range and the seed count."""
    keys, metrics = summary["label_keys"], summary["metrics"]
    head = [*(keys or ["cell"]), "seeds", *metrics, "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["rows"]:
        cells = [row["labels"].get(k, "") for k in keys] or ["recipe"]
        cells.append(
            str(len(row["seeds"]))
            + (f" (+{row['unfinished']} unfinished)" if row["unfinished"] else "")
        )
        for m in metrics:
            s = row["metrics"][m]
            if s["n"] == 0:
                cells.append("-")
            elif s["n"] == 1:
                cells.append(_fmt(s["mean"]))
            else:
                cells.append(
                    f"{_fmt(s['mean'])} ± {_fmt(s['std'])} ({_fmt(s['min'])}-{_fmt(s['max'])})"
                )
        cells.append("; ".join(row["failed"]).replace("|", "/") or "")
        lines.append("| " + " | ".join(cells) + " |")
    states = ", ".join(f"{n} {s}" for s, n in summary["states"].items() if n)
    lines += [
        "",
        f"{summary['cells']} cells: {states}. Values: mean ± standard deviation over "
        "seeds (min-max); one seed: its value.",
    ]
    if summary.get("unknown_metrics"):
        lines += [
            "",
            f"No finished cell has {', '.join(summary['unknown_metrics'])}; metrics "
            f"they have include {', '.join(summary['available_metrics'])} (or any dotted "
            "path into results.json).",
        ]
    return "\n".join(lines) + "\n"


def csv_table(summary: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    keys, metrics = summary["label_keys"], summary["metrics"]
    writer.writerow(
        [
            *keys,
            "seeds",
            *(f"{m}_{s}" for m in metrics for s in ("mean", "std", "min", "max", "n")),
            "failed",
            "unfinished",
        ]
    )
    for row in summary["rows"]:
        line: list[Any] = [row["labels"].get(k, "") for k in keys]
        line.append(" ".join(map(str, row["seeds"])))
        for m in metrics:
            s = row["metrics"][m]
            line += ["" if s[k] is None else s[k] for k in ("mean", "std", "min", "max", "n")]
        line += ["; ".join(row["failed"]), row["unfinished"]]
        writer.writerow(line)
    return out.getvalue()


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def plot(summary: dict, path: Path) -> str | None:
    """The first metric (mean, with the min-max over seeds as error bars) against the first
    grid key whose values are all numbers, one line per combination of the other labels; a
    bar per row when no key is numeric. Returns the path, or None without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metrics, keys, rows = summary["metrics"], summary["label_keys"], summary["rows"]
    rows = [r for r in rows if metrics and r["metrics"][metrics[0]]["n"]]
    if not rows:
        return None
    metric = metrics[0]
    x_key = next(
        (k for k in keys if all(_number(r["labels"].get(k)) is not None for r in rows)), None
    )
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if x_key is not None:
        lines: dict[tuple, list] = {}
        for r in rows:
            other = tuple((k, r["labels"].get(k)) for k in keys if k != x_key)
            lines.setdefault(other, []).append(r)
        for other, members in lines.items():
            members.sort(key=lambda r: _number(r["labels"][x_key]))
            xs = [_number(r["labels"][x_key]) for r in members]
            s = [r["metrics"][metric] for r in members]
            ys = [v["mean"] for v in s]
            err = [
                [y - v["min"] for y, v in zip(ys, s, strict=True)],
                [v["max"] - y for y, v in zip(ys, s, strict=True)],
            ]
            name = ", ".join(f"{k}={v}" for k, v in other) or metric
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xlabel(x_key)
        if len(lines) > 1:
            ax.legend(fontsize="small")
    else:
        names = [", ".join(r["labels"].values()) or "recipe" for r in rows]
        s = [r["metrics"][metric] for r in rows]
        ys = [v["mean"] for v in s]
        err = [
            [y - v["min"] for y, v in zip(ys, s, strict=True)],
            [v["max"] - y for y, v in zip(ys, s, strict=True)],
        ]
        ax.bar(range(len(rows)), ys, yerr=err, capsize=3)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return str(path)


__all__ = [
    "Cell",
    "Sweep",
    "SweepFailed",
    "cell_key",
    "collect",
    "load_sweep",
    "parse_grid",
    "reconcile",
    "record_lost",
    "resolve_sweep",
    "run_cell",
    "run_sweep",
    "dry_run",
    "validate_cells",
]
