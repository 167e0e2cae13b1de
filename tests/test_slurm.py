"""`prunekit sweep --executor submitit` on a real Slurm: a single-node cluster started for the
session (tests/slurm_cluster.py) with no accounting (``sacct`` fails there, as on many small
clusters). Skipped without Slurm or root, except where ``PRUNEKIT_REQUIRE_SLURM=1`` (CI) makes
that a failure.

Cells are tiny-model applies, each a Slurm job of a few seconds. A cell that must stay running
while a test cancels, requeues or times it out is held by a test-only plugin (``hold``), which
only the cells' processes load: its entry point is on the PYTHONPATH the jobs inherit from the
submission, not on this process's path.
"""

from __future__ import annotations

import _thread
import importlib.util
import json
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import slurm_cluster
from sweep_setup import sweep_workdir

from prunekit.cli import main
from prunekit.sweep import load_sweep

REQUIRED = os.environ.get("PRUNEKIT_REQUIRE_SLURM", "").strip() == "1"


@pytest.fixture(scope="session")
def slurm() -> Iterator[slurm_cluster.Cluster]:
    why = slurm_cluster.missing()
    if why is None and importlib.util.find_spec("submitit") is None:
        why = "submitit is not installed (pip install 'prunekit[cluster]')"
    if why:
        if REQUIRED:
            pytest.fail(f"PRUNEKIT_REQUIRE_SLURM=1, but {why}", pytrace=False)
        pytest.skip(why)
    cluster = slurm_cluster.start()
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        slurm_cluster.stop(cluster)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The sweep tests' directory (tests/sweep_setup.py), and the ``hold`` plugin."""
    root = sweep_workdir(tmp_path_factory.mktemp("slurm"))
    plugin = root / "hold-plugin"
    dist = plugin / "prunekit_test_hold-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: prunekit-test-hold\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text("[prunekit]\nhold = prunekit_test_hold\n")
    (plugin / "prunekit_test_hold.py").write_text(HOLD_PLUGIN)
    (root / "cache").mkdir()
    return root


HOLD_PLUGIN = '''"""Test-only prunekit plugin (tests/test_slurm.py): while $PRUNEKIT_TEST_HOLD_DIR/<array
task id, 0 for a plain job>.hold exists, a Slurm cell waits in its registry hook; each start is appended to
<task id>.started."""

import os
import time
from pathlib import Path

from prunekit import hookimpl


@hookimpl
def prunekit_register_methods(register):
    root = os.environ.get("PRUNEKIT_TEST_HOLD_DIR")
    if not root or "SLURM_JOB_ID" not in os.environ:
        return
    task = os.environ.get("SLURM_ARRAY_TASK_ID", "0")  # a one-cell sweep is a plain job
    with open(Path(root) / f"{task}.started", "a") as log:
        log.write(f"pid {os.getpid()} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}\\n")
    while (Path(root) / f"{task}.hold").exists():
        time.sleep(0.2)
'''


@contextmanager
def submission_env(workdir: Path, hold: Path | None = None) -> Iterator[None]:
    """The environment sbatch hands the jobs (it exports this process's): the session's cache
    and, with ``hold``, the hold plugin and its directory."""
    values = {"PRUNEKIT_CACHE_DIR": str(workdir / "cache"), "PRUNEKIT_QUIET": "1"}
    if hold is not None:
        hold.mkdir(parents=True, exist_ok=True)
        path = os.environ.get("PYTHONPATH")
        values["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workdir / "hold-plugin"), path]))
        values["PRUNEKIT_TEST_HOLD_DIR"] = str(hold)
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sweep_args(workdir: Path, out: Path, *extra: str, time_min: int = 5) -> list[str]:
    return [
        "sweep",
        str(workdir / "r.yaml"),
        "--executor",
        "submitit",
        "-x",
        "cluster=slurm",
        "--time-min",
        str(time_min),
        "-o",
        str(out),
        "-q",
        *extra,
    ]


def wait_until(
    ready: Callable[[], bool], timeout_s: float, what: str, slurm: slurm_cluster.Cluster
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            queue = slurm.run("squeue", "-h", "-r", "-t", "all", check=False)
            pytest.fail(
                f"{what}: not within {timeout_s:.0f} s\nsqueue:\n{queue}\n{slurm.logs()}",
                pytrace=False,
            )
        time.sleep(0.25)


def job_ids(out: Path) -> list[str]:
    return json.loads((out / "sweep.json").read_text())["executor_info"]["job_ids"]


def statuses(out: Path) -> list[dict]:
    return [c.status() for c in load_sweep(out)[1]]


def started(hold: Path, task: int) -> list[str]:
    path = hold / f"{task}.started"
    return path.read_text().splitlines() if path.exists() else []


def release_requeued(slurm: slurm_cluster.Cluster, job: str) -> bool:
    """Start a requeued job now: Slurm holds one back for about two minutes (its begin time),
    which would only slow the tests down. True when it was held."""
    if slurm.queue(job).get(job) != ("PENDING", "BeginTime"):
        return False
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    return True


# ------------------------------------------------------------------------------------------
# a cell past its time limit: submitted first, checked last (it runs while the others do)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def time_limited(slurm, workdir, tmp_path_factory):
    """A detached sweep of one held cell with a 1-minute time limit and one requeue allowed,
    its requeued job released at once (release_requeued). prunekit asks Slurm for submitit's
    signal 30 s before the end of a 1-minute limit, which Slurm, checking every 30 s, sends
    30 to 60 s into each attempt; 50 s before the end shortens that to 10 to 40 s, still
    leaving the cell's Python the time to install submitit's handler (a few seconds of
    imports)."""
    out = tmp_path_factory.mktemp("time-limit") / "sweep"
    hold = out.parent / "hold"
    with submission_env(workdir, hold):
        (hold / "0.hold").touch()  # never removed: the cell runs until its time is up
        code = main(
            sweep_args(
                workdir,
                out,
                "-x",
                "max_requeues=1",
                "--sbatch",
                "signal=USR2@50",
                "--detach",
                time_min=1,
            )
        )
    stop = threading.Event()

    def release() -> None:
        (job,) = job_ids(out)
        while not stop.wait(0.5):
            release_requeued(slurm, job)

    releaser = threading.Thread(target=release, daemon=True)
    if code == 0:
        releaser.start()
    yield code, out, hold
    stop.set()
    if releaser.is_alive():
        releaser.join(timeout=5)


def test_a_detached_sweep_returns_at_once_and_status_reports_it_unfinished(
    slurm, time_limited, capsys
):
    code, out, _ = time_limited
    assert code == 0
    (job,) = job_ids(out)
    assert re.fullmatch(r"\d+", job)  # one cell: a plain job, not an array
    assert slurm.queue(job)[job][0] in ("PENDING", "RUNNING")
    (cell,) = load_sweep(out)[1]
    record = json.loads((cell.dir / "job.json").read_text())
    assert record["job_id"] == job and record["executor"] == "submitit"
    capsys.readouterr()
    assert main(["sweep", "--status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 cells: 1 " in printed and ("1 pending" in printed or "1 running" in printed)
    assert cell.status()["state"] in ("pending", "running")


# ------------------------------------------------------------------------------------------
# submitting, finishing, failing, re-running
# ------------------------------------------------------------------------------------------


def test_an_attached_sweep_runs_its_cells_as_slurm_jobs_and_a_rerun_skips_finished_ones(
    slurm, workdir, tmp_path
):
    out = tmp_path / "attached"
    grid = ["--grid", f"model.id={workdir / 'tiny'},{workdir / 'broken'}"]
    with submission_env(workdir):
        code = main(sweep_args(workdir, out, *grid))
    assert code == 1  # the broken model's cell failed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["states"]["done"] == 1 and summary["states"]["failed"] == 1
    good, bad = summary["rows"]
    assert good["metrics"]["text.ppl"]["n"] == 1 and good["metrics"]["text.ppl"]["mean"] > 1
    assert "could not load" in bad["failed"][0]
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["executor_info"]["cluster"] == "slurm"
    first = manifest["executor_info"]["job_ids"]
    array = first[0].split("_")[0]
    assert first == [f"{array}_0", f"{array}_1"]
    # both ran as Slurm jobs, in this Python (a venv's, unactivated on the node), and ended
    # normally (the cell's failure is the cell's outcome, not the job's)
    script = (out / "submitit" / f"{array}_submission.sh").read_text()
    assert f"{shlex.quote(sys.executable)} -u -m submitit.core._submit" in script
    wait_until(
        lambda: {state for state, _ in slurm.queue(array).values()} == {"COMPLETED"},
        30,
        f"the jobs of array {array} completing",
        slurm,
    )
    for job in first:
        assert (out / "submitit" / f"{job}_0_log.out").is_file()
    cells = load_sweep(out)[1]
    done = next(c for c in cells if c.status()["state"] == "done")
    before = (done.dir / "status.json").read_text()
    # a re-run submits only the failed cell
    with submission_env(workdir):
        assert main(sweep_args(workdir, out, *grid)) == 1
    assert (done.dir / "status.json").read_text() == before
    rerun = job_ids(out)
    assert len(rerun) == 1 and rerun[0].split("_")[0] != array
    failed = next(c for c in cells if c.status()["state"] == "failed")
    assert failed.status()["attempt"] == 2 and "could not load" in failed.status()["error"]


def test_a_detached_sweep_is_collected_by_status(slurm, workdir, tmp_path, capsys):
    out = tmp_path / "detached"
    with submission_env(workdir):
        assert main(sweep_args(workdir, out, "--detach")) == 0
    assert "prunekit sweep --status" in capsys.readouterr().out
    wait_until(
        lambda: statuses(out)[0]["state"] == "done", 120, "the detached cell finishing", slurm
    )
    assert main(["sweep", "--status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 cells: 1 done" in printed
    assert (out / "table.md").read_text().count("| recipe | 1 |") == 1


# ------------------------------------------------------------------------------------------
# cancelled, requeued
# ------------------------------------------------------------------------------------------


def test_a_cell_cancelled_while_running_is_failed_with_its_job_id_and_reruns(
    slurm, workdir, tmp_path, capsys
):
    """scancel of a running cell, with no accounting to ask: --status reports it failed,
    naming the job, not pending or interrupted; a re-run then finishes it."""
    out, hold = tmp_path / "cancel", tmp_path / "hold"
    with submission_env(workdir, hold):
        (hold / "0.hold").touch()
        assert main(sweep_args(workdir, out, "--detach")) == 0
    (job,) = job_ids(out)
    wait_until(lambda: started(hold, 0), 120, "the held cell starting", slurm)
    slurm.run("scancel", job)
    wait_until(
        lambda: slurm.queue(job).get(job, ("gone",))[0] in ("CANCELLED", "gone"),
        60,
        f"job {job} leaving the queue",
        slurm,
    )
    capsys.readouterr()
    assert main(["sweep", "--status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 cells: 1 failed" in printed and job in printed
    status = statuses(out)[0]
    assert status["state"] == "failed" and status["job_id"] == job
    assert f"job {job} " in status["error"] and "CANCELLED" in status["error"]
    stderr = out / "submitit" / f"{job}_0_log.err"
    assert str(stderr) in status["error"] and stderr.is_file()
    # a re-run (the hold released) runs it again, to the end
    (hold / "0.hold").unlink()
    with submission_env(workdir, hold):
        assert main(sweep_args(workdir, out)) == 0
    status = statuses(out)[0]
    assert status["state"] == "done" and status["attempt"] == 2
    assert len(started(hold, 0)) == 2


def test_an_attached_sweep_whose_jobs_are_cancelled_ends_instead_of_waiting(
    slurm, workdir, tmp_path
):
    """scancel of the array while one cell runs and the other waits for its turn: the
    attached sweep reports both failed (no accounting to ask) instead of waiting forever."""
    out, hold = tmp_path / "cancel-attached", tmp_path / "hold"
    hold.mkdir()
    (hold / "0.hold").touch()
    returned = threading.Event()

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 120
        while not started(hold, 0) and time.monotonic() < deadline:
            time.sleep(0.25)
        try:
            (array,) = {
                line.split("|")[0]
                for line in slurm.run("squeue", "-h", "-o", "%F|%k").splitlines()
                if line.endswith("|cancel-attached")
            }
            slurm.run("scancel", array)
        finally:
            if not returned.wait(60):  # the sweep hangs: interrupt it (the test then fails)
                _thread.interrupt_main()

    canceller = threading.Thread(target=cancel_when_running, daemon=True)
    canceller.start()
    try:
        with submission_env(workdir, hold):
            code = main(
                sweep_args(
                    workdir,
                    out,
                    "--grid",
                    "method.ratio=0.25,0.5",
                    "-x",
                    "array_parallelism=1",
                    "--sbatch",
                    "comment=cancel-attached",
                )
            )
    finally:
        returned.set()
        (hold / "0.hold").unlink()
        canceller.join(timeout=10)
    assert code == 1, "the sweep did not end by itself after its jobs were cancelled"
    ran, waited = ({s["job_id"]: s for s in statuses(out)}[job] for job in sorted(job_ids(out)))
    for status in (ran, waited):
        assert status["state"] == "failed"
        assert f"job {status['job_id']} " in status["error"] and "CANCELLED" in status["error"]
    assert str(out / "submitit" / f"{ran['job_id']}_0_log.err") in ran["error"]
    assert "never started" in waited["error"]


def test_a_running_cell_that_slurm_requeues_starts_again_and_completes(
    slurm, workdir, tmp_path, capsys
):
    out, hold = tmp_path / "requeue", tmp_path / "hold"
    with submission_env(workdir, hold):
        (hold / "0.hold").touch()
        assert main(sweep_args(workdir, out, "--detach")) == 0
    (job,) = job_ids(out)
    wait_until(lambda: started(hold, 0), 120, "the held cell starting", slurm)
    slurm.run("scontrol", "requeue", job)
    wait_until(lambda: release_requeued(slurm, job), 60, f"job {job} requeued", slurm)
    # requeued and waiting: still the cell's job, not a lost one
    capsys.readouterr()
    assert main(["sweep", "--status", str(out)]) == 0
    assert "1 cells: 1 interrupted" in capsys.readouterr().out
    assert statuses(out)[0]["state"] == "running"  # the killed attempt's, until the next
    (hold / "0.hold").unlink()
    wait_until(lambda: statuses(out)[0]["state"] == "done", 120, "the requeued cell", slurm)
    status = statuses(out)[0]
    assert status["attempt"] == 2
    assert [line.split()[-1] for line in started(hold, 0)] == ["0", "1"]  # SLURM_RESTART_COUNT
    assert main(["sweep", "--status", str(out)]) == 0
    assert "1 cells: 1 done" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# refused at submission
# ------------------------------------------------------------------------------------------


def test_a_gpu_request_the_cluster_cannot_meet_is_refused_with_sbatchs_message(
    slurm, workdir, tmp_path, capsys
):
    out = tmp_path / "gpu"
    with submission_env(workdir):
        code = main(sweep_args(workdir, out, "--gpus-per-cell", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "sbatch: error: Invalid generic resource (gres) specification" in err
    assert "--gpus-per-cell" in err
    assert not list((out / "cells").glob("*/job.json"))


# ------------------------------------------------------------------------------------------
# the time-limited cell (submitted by the first test)
# ------------------------------------------------------------------------------------------


def test_a_cell_past_its_time_limit_is_requeued_then_fails(slurm, time_limited, capsys):
    code, out, hold = time_limited
    assert code == 0
    wait_until(lambda: statuses(out)[0]["state"] == "failed", 150, "the time-limited cell", slurm)
    status = statuses(out)[0]
    assert status["attempt"] == 2  # requeued once (max_requeues=1), then out of requeues
    assert [line.split()[-1] for line in started(hold, 0)] == ["0", "1"]
    assert "time limit" in status["error"] and "1 min" in status["error"]
    assert "max_requeues" in status["error"]
    assert main(["sweep", "--status", str(out)]) == 0
    assert "1 cells: 1 failed" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# without a cluster: what squeue says, and what the cells become
# ------------------------------------------------------------------------------------------


def test_cells_whose_job_squeue_no_longer_queues_are_failed_the_others_left_alone(
    tmp_path, monkeypatch
):
    """A fake squeue: array 7 is unknown to Slurm (gone longer than MinJobAge), array 8 has
    one task waiting and one cancelled before it started. Runs everywhere (no Slurm needed)."""
    from prunekit.sweep import Cell, reconcile, record_lost

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text(
        "#!/bin/sh\n"
        'echo "$@" >> "$(dirname "$0")/calls"\n'
        'case "$*" in\n'
        '  *"-j 7 "*) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;;\n'
        '  *"-j 8 "*) printf "8_0|PENDING\\n8_1|CANCELLED\\n";;\n'
        '  *) echo "squeue: error: Unable to contact slurm controller" >&2; exit 1;;\n'
        "esac\n"
    )
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def cell(name: str, job: str, status: dict | None) -> Cell:
        path = tmp_path / "cells" / name
        path.mkdir(parents=True)
        if status is not None:
            (path / "status.json").write_text(json.dumps(status))
        log = tmp_path / "submitit" / f"{job}_0_log.err"
        record = {"executor": "submitit", "cluster": "slurm", "job_id": job, "stderr": str(log)}
        (path / "job.json").write_text(json.dumps(record))
        return Cell(name, {}, 0, [], None, path)

    (tmp_path / "submitit").mkdir()
    (tmp_path / "submitit" / "7_0_0_log.err").write_text(
        "some output\nslurmstepd-n1: error: *** JOB 9 ON n1 CANCELLED AT 2026-01-01T00:00:00 ***\n"
    )
    running = cell("running", "7_0", {"state": "running", "attempt": 1, "host": "n1"})
    done = cell("done", "7_1", {"state": "done"})
    (done.dir / "run").mkdir()
    (done.dir / "run" / "results.json").write_text("{}")
    waiting = cell("waiting", "8_0", None)
    cancelled = cell("cancelled", "8_1", None)
    other = cell("other", "9_0", None)  # the controller does not answer for it

    assert reconcile([running, done, waiting, cancelled]) == 2
    status = running.status()
    assert status["state"] == "failed" and status["job_id"] == "7_0"
    assert status["attempt"] == 1 and status["host"] == "n1"
    log = tmp_path / "submitit" / "7_0_0_log.err"
    assert status["error"] == (
        "job 7_0 left the Slurm queue without finishing (cancelled, or killed by the "
        "scheduler): slurmstepd-n1: error: *** JOB 9 ON n1 CANCELLED AT 2026-01-01T00:00:00 "
        f"***; see {log}"
    )
    assert done.status() == {"state": "done"}  # not asked about: it finished
    assert waiting.status()["state"] == "pending"
    status = cancelled.status()
    assert status["state"] == "failed" and status["error"].startswith(
        "job 8_1 ended as CANCELLED (scancel, or an administrator) before the cell finished; "
        "it never started (no log at "
    )
    calls = (bin_dir / "calls").read_text().splitlines()
    assert len(calls) == 2  # one squeue per array, finished cells not asked about
    # squeue that cannot reach the controller: nothing is known to be gone
    assert reconcile([other]) == 0 and other.status()["state"] == "pending"
    # a cell submitted again meanwhile is not failed for its old job's end
    again = cell("again", "8_0", {"state": "interrupted"})
    assert not record_lost(again.dir, "7_2", "job 7_2 left")
    assert again.status()["state"] == "interrupted"
