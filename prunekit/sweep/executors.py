"""The built-in sweep executors, registered like any plugin's (entry point ``executors``).

* ``local``: a pool of ``jobs`` processes on this machine, each cell ``python -m
  prunekit.sweep CELL_DIR`` with its output in the cell's ``log.txt``.
* ``submitit``: the cells as one job array through `submitit
  <https://github.com/facebookincubator/submitit>`_ (Slurm, or submitit's local executor with
  ``cluster: local``); a preempted or timed-out cell is requeued and starts again (an ``apply``
  leaves nothing half-written, so a cell restarts from its beginning). Each cell's job is
  recorded in its ``job.json``; a job that leaves the Slurm queue without its cell recording
  an outcome (cancelled, killed by the scheduler) makes the cell failed, with the job's id
  and log, found from ``squeue`` and the job's files (no accounting, ``sacct``, needed).

Both only start cells: :func:`prunekit.sweep.run_cell` records each outcome in the cell.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prunekit.errors import RecipeError
from prunekit.hookspecs import hookimpl
from prunekit.sweep import (
    JOB_FILE,
    LOG_FILE,
    STATUS_FILE,
    read_json,
    record_lost,
    run_cell,
    write_json,
)

#: threads per cell when ``jobs`` cells share the machine and ``threads`` is not set
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class LocalExecutor:
    """Runs the cells on this machine, ``jobs`` at a time, each in its own process."""

    detaches = False

    def __init__(self, jobs: int = 1, threads: int | None = None, python: str | None = None):
        """:param jobs: cells running at once.
        :param threads: CPU threads per cell (OMP_NUM_THREADS); default: the CPU count divided
            by ``jobs`` when ``jobs`` > 1 and the variable is not already set.
        :param python: interpreter for the cells (default: this one)."""
        if not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be a whole number >= 1, got {jobs!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
        self.jobs, self.threads, self.python = jobs, threads, python or sys.executable
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def describe(self, cells: int) -> dict:
        """What would run (``prunekit sweep --dry-run``): ``cells`` processes on this machine,
        ``jobs`` at a time."""
        return {"executor": "local", "cells": cells, "jobs": self.jobs, "threads": self.threads}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        threads = self.threads
        if threads is None and self.jobs > 1 and "OMP_NUM_THREADS" not in env:
            threads = max(1, (os.cpu_count() or 1) // self.jobs)
        if threads is not None:
            env.update({var: str(threads) for var in THREAD_VARS})
        return env

    def _run_one(self, cell: Path, env: dict[str, str]) -> int:
        with self._lock:
            if self._stopping:
                return 130
            with open(cell / LOG_FILE, "ab") as log:
                proc = subprocess.Popen(
                    [self.python, "-m", "prunekit.sweep", str(cell)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                )
            self._procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)

    def run(self, cells: list[Path], folder: Path, wait: bool = True) -> dict:
        env = self._env()
        pool = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="prunekit-cell")
        futures = [pool.submit(self._run_one, Path(c), env) for c in cells]
        try:
            codes = [f.result() for f in futures]
        except BaseException:  # Ctrl-C: every running cell gets an interrupt and cleans up
            self.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
        return {"executor": "local", "jobs": self.jobs, "exit_codes": codes}

    def stop(self, grace_s: float = 30.0) -> None:
        """Interrupt every running cell (SIGINT, so ``apply`` removes its staging directory),
        then kill what is left after ``grace_s``."""
        with self._lock:
            self._stopping = True
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()


class CellJob:
    """What submitit runs for one cell: :func:`prunekit.sweep.run_cell`. Its ``checkpoint``
    makes submitit requeue the cell when Slurm preempts it or its time runs out; when
    submitit gives up (``max_requeues`` spent), the cell's error says so."""

    #: the executor's settings, for the error of a cell out of time (None in pickles of
    #: an older prunekit)
    time_min: int | None = None
    max_requeues: int | None = None

    def __init__(self, time_min: int | None = None, max_requeues: int | None = None):
        self.time_min, self.max_requeues = time_min, max_requeues

    def __call__(self, cell_dir: str) -> str:
        from prunekit.progress import set_quiet

        set_quiet(True)
        out_of_time = _watch_requeue_refusal()
        status = run_cell(cell_dir)
        if out_of_time and status["state"] == "failed":
            status = self._record_out_of_time(Path(cell_dir), status, out_of_time[0])
        return status["state"]

    def checkpoint(self, cell_dir: str) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(CellJob(self.time_min, self.max_requeues), cell_dir)

    def _record_out_of_time(self, cell_dir: Path, status: dict, reason: str) -> dict:
        """The failed status of a cell that submitit refused to requeue once more: wherever
        the signal interrupted the run (a plugin's hook, a data loader), the error says
        what happened and what to change."""
        limit = f" ({self.time_min} min)" if self.time_min else ""
        spent = (
            f", its {self.max_requeues} requeue(s) spent (max_requeues)"
            if self.max_requeues is not None
            else ""
        )
        error = (
            f"the cell reached its Slurm time limit{limit} on attempt "
            f"{status.get('attempt', '?')}{spent}: give each cell more time (--time-min, "
            "sweep.executor.time_min) or more requeues (sweep.executor.max_requeues)"
        )
        status = {**status, "error": error, "exit_code": 1, "detail": f"submitit: {reason}"}
        write_json(cell_dir / STATUS_FILE, status)
        return status


def _watch_requeue_refusal() -> list[str]:
    """Wrap submitit's handler of its requeue signal (``SIGUSR2``, or
    ``$SUBMITIT_PREEMPT_SIGNAL``): the returned list receives submitit's reason when it
    refuses to requeue the job (timed out too often), which it raises wherever the cell
    is."""
    reasons: list[str] = []
    try:
        from submitit.core.utils import UncompletedJobError
    except ImportError:
        return reasons
    signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    handler = signal.getsignal(signum) if signum is not None else None
    if not callable(handler):  # not under submitit's Slurm environment
        return reasons

    def refused(sig: int, frame: Any) -> None:
        try:
            handler(sig, frame)
        except UncompletedJobError as exc:
            reasons.append(str(exc))
            raise

    try:
        signal.signal(signum, refused)
    except ValueError:  # not the main thread
        pass
    return reasons


#: Slurm job states of a job still in the queue: waiting, starting, running, being requeued
SLURM_QUEUED = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "SPECIAL_EXIT",
        "STOPPED",
        "RESV_DEL_HOLD",
        # preempted with PreemptMode=REQUEUE goes back to PENDING; with CANCEL it leaves the
        # queue after MinJobAge, and is lost then
        "PREEMPTED",
    }
)
#: what a job that ended in this state before its cell finished went through
SLURM_ENDED = {
    "CANCELLED": "scancel, or an administrator",
    "TIMEOUT": "killed at its time limit",
    "NODE_FAIL": "its node failed",
    "OUT_OF_MEMORY": "killed for using more memory than requested: raise --mem-gb",
    "FAILED": "its process exited with an error",
    "BOOT_FAIL": "its node failed to boot",
    "DEADLINE": "cancelled at its deadline",
    "COMPLETED": "its process exited",
}


def slurm_queue(jobs: Iterable[str], timeout_s: float = 60) -> dict[str, str] | None:
    """What ``squeue`` says of ``jobs`` (``12``, or array tasks ``12_3``): job id -> state, for
    every task of their arrays that Slurm still knows (ended ones stay for ``MinJobAge``,
    5 minutes by default). None when ``squeue`` cannot be asked (not installed, the
    controller does not answer): then nothing is known to be gone."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    states: dict[str, str] = {}
    for base in sorted({str(j).split("_")[0] for j in jobs}):
        try:
            proc = subprocess.run(
                [squeue, "-h", "-r", "-t", "all", "-j", base, "-o", "%i|%T"],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:  # gone for longer than MinJobAge
                continue
            return None
        for line in proc.stdout.splitlines():
            job, _, state = line.strip().partition("|")
            if job:
                states[job] = state.split()[0] if state.strip() else "UNKNOWN"
    return states


def lost_slurm_job(job_id: str, state: str | None, stderr: str | os.PathLike | None) -> str:
    """The error of a cell whose Slurm job ``job_id`` ended (``state``, or None when it left
    the queue) without the cell recording an outcome: what Slurm said, and the job's log."""
    if state is None:
        what = "left the Slurm queue without finishing (cancelled, or killed by the scheduler)"
    else:
        why = SLURM_ENDED.get(state, "no reason given")
        what = f"ended as {state} ({why}) before the cell finished"
    message = f"job {job_id} {what}"
    log = Path(stderr) if stderr else None
    if log is None:
        return message
    if not log.is_file():
        return f"{message}; it never started (no log at {log})"
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    said = [line.strip() for line in lines if "***" in line]  # slurmstepd: *** JOB 12 ... ***
    return message + (f": {said[-1]}" if said else "") + f"; see {log}"


class SubmititExecutor:
    """Submits the cells as one job array through submitit: Slurm, or ``cluster: local``."""

    detaches = True
    #: the cells run on the nodes the scheduler picks: each checks its own device and disk
    #: first, and submission checks only that what is requested can provide the device
    runs_elsewhere = True

    def __init__(
        self,
        cluster: str | None = None,
        partition: str | None = None,
        gpus_per_cell: int = 0,
        cpus_per_cell: int | None = None,
        mem_gb: float | None = None,
        time_min: int = 60,
        sbatch: dict[str, Any] | None = None,
        array_parallelism: int | None = None,
        max_requeues: int = 3,
        name: str = "prunekit-sweep",
    ):
        """:param cluster: ``slurm``, ``local`` or ``debug`` (default: Slurm when ``sbatch``
            exists here, else local).
        :param partition: Slurm partition.
        :param gpus_per_cell: GPUs per cell (``--gpus-per-node``).
        :param cpus_per_cell: CPUs per cell (``--cpus-per-task``).
        :param mem_gb: memory per cell in GB.
        :param time_min: time limit per cell in minutes; a cell that runs out is requeued.
        :param sbatch: extra ``#SBATCH`` options, e.g. ``{account: myacct, qos: high}``.
        :param array_parallelism: cells of the array running at once (Slurm ``%N``).
        :param max_requeues: requeues after a timeout before a cell counts as failed."""
        for key, value in (
            ("gpus_per_cell", gpus_per_cell),
            ("time_min", time_min),
            ("max_requeues", max_requeues),
        ):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be a whole number >= 0, got {value!r}")
        if sbatch is not None and not isinstance(sbatch, dict):
            raise ValueError(f"sbatch must be a mapping of #SBATCH option to value, got {sbatch!r}")
        if cluster not in (None, "slurm", "local", "debug"):
            raise ValueError(f"cluster must be slurm, local or debug, got {cluster!r}")
        self.options = {
            "cluster": cluster,
            "partition": partition,
            "gpus_per_cell": gpus_per_cell,
            "cpus_per_cell": cpus_per_cell,
            "mem_gb": mem_gb,
            "time_min": time_min,
            "sbatch": dict(sbatch or {}),
            "array_parallelism": array_parallelism,
            "max_requeues": max_requeues,
            "name": name,
        }

    def device_problem(self, device: str) -> str | None:
        """Why the requested resources cannot provide ``device`` (None when they can): a
        cuda device needs GPUs per cell."""
        wanted = str(device).strip().lower()
        if wanted.startswith("cuda") and not self.options["gpus_per_cell"]:
            return (
                f"device {device!r} needs a GPU, but the executor requests none for a cell: "
                "give --gpus-per-cell N (sweep.executor.gpus_per_cell), or model.device: cpu"
            )
        if wanted.startswith("cuda:") and wanted[5:].isdigit():
            index = int(wanted[5:])
            if index >= self.options["gpus_per_cell"]:
                return (
                    f"device {device!r} is GPU {index} of the node, but a cell gets "
                    f"{self.options['gpus_per_cell']} (--gpus-per-cell): use cuda, or request "
                    f"{index + 1} GPUs"
                )
        return None

    def executor(self, folder: Path):
        try:
            import submitit
        except ImportError:
            raise RecipeError(
                "sweep.executor submitit needs the submitit package: pip install "
                "submitit (or pip install 'prunekit[cluster]')"
            ) from None
        o = self.options
        try:
            ex = submitit.AutoExecutor(
                folder=str(folder / "submitit"),
                cluster=o["cluster"],
                slurm_max_num_timeout=o["max_requeues"],
            )
        except RuntimeError as exc:
            raise RecipeError(
                f"submitit found no cluster here ({exc}); set "
                "sweep.executor.cluster: local to run without Slurm"
            ) from None
        ex.update_parameters(**self.parameters(ex.cluster))
        return ex

    def parameters(self, cluster: str) -> dict[str, Any]:
        """What submitit's ``update_parameters`` receives on ``cluster`` (``slurm``, ``local``,
        ``debug``): the job's time limit, name and resources, and on Slurm the partition, the
        extra ``#SBATCH`` options and the array's parallelism."""
        o = self.options
        params: dict[str, Any] = {
            "timeout_min": o["time_min"],
            "name": o["name"],
            "gpus_per_node": o["gpus_per_cell"],
        }
        if o["cpus_per_cell"] is not None:
            params["cpus_per_task"] = o["cpus_per_cell"]
        if o["mem_gb"] is not None:
            params["mem_gb"] = o["mem_gb"]
        if cluster == "slurm":
            # Slurm signals a job (submitit requeues it) this long before its end, checking
            # every 30 s: submitit's 90 s would signal a job of under 3 minutes at once, and
            # requeue it until its requeues are spent even when it could have finished
            if 0 < o["time_min"] < 3:
                params["slurm_signal_delay_s"] = o["time_min"] * 30
            if o["partition"]:
                params["slurm_partition"] = o["partition"]
            if o["sbatch"]:
                params["slurm_additional_parameters"] = o["sbatch"]
            if o["array_parallelism"]:
                params["slurm_array_parallelism"] = o["array_parallelism"]
        return params

    def describe(self, cells: int) -> dict[str, Any]:
        """The submission without submitting (``prunekit sweep --dry-run``): one job array of
        ``cells`` tasks and the parameters submitit would use."""
        cluster = self.options["cluster"] or ("slurm" if shutil.which("sbatch") else "local")
        return {
            "executor": "submitit",
            "cluster": cluster,
            "array_size": cells,
            "requeues_after_timeout": self.options["max_requeues"],
            "parameters": self.parameters(cluster),
        }

    def run(self, cells: list[Path], folder: Path, wait: bool = True) -> dict:
        ex = self.executor(Path(folder))
        jobs = self._submit(ex, [Path(c) for c in cells], Path(folder))
        info = {"executor": "submitit", "cluster": ex.cluster, "job_ids": [j.job_id for j in jobs]}
        for cell, job in zip(cells, jobs, strict=True):
            write_json(
                Path(cell) / JOB_FILE,
                {
                    "executor": "submitit",
                    "cluster": ex.cluster,
                    "job_id": job.job_id,
                    "stdout": str(job.paths.stdout),
                    "stderr": str(job.paths.stderr),
                    "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
        if not wait:
            return info
        try:
            if ex.cluster == "slurm":
                self._wait_slurm(list(zip(cells, jobs, strict=True)))
            else:
                for cell, job in zip(cells, jobs, strict=True):
                    try:
                        job.result()
                    except Exception as exc:  # the job died (killed, requeues spent)
                        _record_job_error(Path(cell), job, exc)
        except BaseException:
            for job in jobs:
                job.cancel(check=False)
            raise
        return info

    def _submit(self, ex, cells: list[Path], folder: Path) -> list:
        """Submit the array; a refusal (sbatch's error: a partition, a GPU request or a time
        limit the cluster does not have) is a :class:`RecipeError` with the scheduler's own
        message, not a traceback."""
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        job = CellJob(self.options["time_min"], self.options["max_requeues"])
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):  # submitit prints sbatch's error too
                return ex.map_array(job, [str(c) for c in cells])
        except (FailedJobError, FailedSubmissionError) as exc:
            reason = str(exc).strip() or said.getvalue().strip() or type(exc).__name__
            asked = ", ".join(f"{k}={v}" for k, v in self.parameters(ex.cluster).items())
            scripts = sorted(
                (folder / "submitit").glob(".submission_file_*.sh"),
                key=lambda p: p.stat().st_mtime,
            )
            script = f"; the script: {scripts[-1]}" if scripts else ""
            raise RecipeError(
                f"{ex.cluster} refused to queue the sweep's {len(cells)} cell(s): "
                f"{reason}\nasked for each cell: {asked}{script}\nchange the request "
                "(--partition, --gpus-per-cell, --cpus-per-cell, --mem-gb, --time-min, "
                "--sbatch OPTION=VALUE; prunekit sweep --dry-run shows it) to one the cluster "
                "can meet"
            ) from None

    #: seconds a Slurm job that exited or left the queue must stay without a result before
    #: its cell counts as lost (a shared filesystem may show the job's last files late)
    lost_grace_s = 10.0

    def _wait_slurm(self, pending: list[tuple[Path, Any]]) -> None:
        """Wait for every job without asking Slurm's accounting (``sacct``, which many
        clusters do not keep, and without which submitit waits for ever): a job has ended
        when its result file exists, or when ``squeue`` no longer has it queued; a cell whose
        job ended without its recording an outcome is failed with the job's id and log."""
        jobs = {job.job_id: (Path(cell), job) for cell, job in pending}
        gone_since: dict[str, float] = {}
        start = last_query = time.monotonic()
        while jobs:
            for job_id, (cell, job) in list(jobs.items()):
                if job.paths.result_pickle.exists():
                    try:
                        job.result()
                    except Exception as exc:
                        _record_job_error(cell, job, exc)
                    del jobs[job_id]
            now = time.monotonic()
            if jobs and now - last_query >= max(2.0, min(30.0, (now - start) / 10)):
                last_query = now
                states = slurm_queue(jobs)
                for job_id, (cell, job) in list(jobs.items()):
                    state = None if states is None else states.get(job_id)
                    if states is None or state in SLURM_QUEUED:
                        gone_since.pop(job_id, None)
                        continue
                    # a job killed (cancelled, out of time or memory) leaves no result; one
                    # that exited may have left it where this machine does not see it yet
                    late = state is None or state in ("COMPLETED", "FAILED")
                    if late and now - gone_since.setdefault(job_id, now) < self.lost_grace_s:
                        continue
                    if not job.paths.result_pickle.exists():
                        record_lost(cell, job_id, lost_slurm_job(job_id, state, job.paths.stderr))
                        del jobs[job_id]
            if jobs:
                time.sleep(1.0)

    @staticmethod
    def lost_jobs(records: list[dict]) -> dict[str, str]:
        """Of the cells' job records (``job.json``), the Slurm jobs no longer queued, by job
        id, each with the error its cell gets (``prunekit sweep --status``). Jobs of
        submitit's local executor cannot be checked: none is reported."""
        slurm = [r for r in records if r.get("cluster") == "slurm" and r.get("job_id")]
        states = slurm_queue(str(r["job_id"]) for r in slurm) if slurm else None
        if states is None:
            return {}
        lost = {}
        for record in slurm:
            job_id = str(record["job_id"])
            state = states.get(job_id)
            if state not in SLURM_QUEUED:
                lost[job_id] = lost_slurm_job(job_id, state, record.get("stderr"))
        return lost


def _record_job_error(cell: Path, job, exc: Exception) -> None:
    """A job that ended with an error outside the cell's own run (killed, requeues spent):
    the cell is failed with it, unless it finished."""
    status = read_json(cell / STATUS_FILE) or {}
    if status.get("state") == "done":
        return
    text = str(exc).strip()
    write_json(
        cell / STATUS_FILE,
        {
            "state": "failed",
            "exit_code": 1,
            "job_id": job.job_id,
            "error": f"submitit job {job.job_id} failed: "
            f"{text.splitlines()[-1] if text else type(exc).__name__}",
        },
    )


@hookimpl
def prunekit_register_executors(register) -> None:
    register("local", LocalExecutor, "this machine: a pool of `jobs` processes, one per cell")
    register(
        "submitit",
        SubmititExecutor,
        "a Slurm job array through submitit (or submitit's local executor)",
    )
