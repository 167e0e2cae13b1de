"""The built-in sweep executors, registered like any plugin's (entry point ``executors``).

* ``local``: a pool of ``jobs`` processes on this machine, each cell ``python -m
  prunekit.sweep CELL_DIR`` with its output in the cell's ``log.txt``.
* ``submitit``: the cells as one job array through `submitit
  <https://github.com/facebookincubator/submitit>`_ (Slurm, or submitit's local executor with
  ``cluster: local``); a preempted or timed-out cell is requeued and starts again (an ``apply``
  leaves nothing half-written, so a cell restarts from its beginning).

Both only start cells: :func:`prunekit.sweep.run_cell` records each outcome in the cell.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prunekit.errors import RecipeError
from prunekit.hookspecs import hookimpl
from prunekit.sweep import LOG_FILE, STATUS_FILE, read_json, run_cell, write_json

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
    makes submitit requeue the cell when Slurm preempts it or its time runs out."""

    def __call__(self, cell_dir: str) -> str:
        from prunekit.progress import set_quiet

        set_quiet(True)
        return run_cell(cell_dir)["state"]

    def checkpoint(self, cell_dir: str) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(CellJob(), cell_dir)


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
        jobs = ex.map_array(CellJob(), [str(c) for c in cells])
        info = {"executor": "submitit", "cluster": ex.cluster, "job_ids": [j.job_id for j in jobs]}
        if not wait:
            return info
        try:
            for cell, job in zip(cells, jobs, strict=True):
                try:
                    job.result()
                except Exception as exc:  # the job died (killed, out of memory, requeues spent)
                    status = read_json(Path(cell) / STATUS_FILE) or {}
                    if status.get("state") != "done":
                        write_json(
                            Path(cell) / STATUS_FILE,
                            {
                                "state": "failed",
                                "exit_code": 1,
                                "job_id": job.job_id,
                                "error": f"submitit job {job.job_id} failed: "
                                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}",
                            },
                        )
        except BaseException:
            for job in jobs:
                job.cancel(check=False)
            raise
        return info


@hookimpl
def prunekit_register_executors(register) -> None:
    register("local", LocalExecutor, "this machine: a pool of `jobs` processes, one per cell")
    register(
        "submitit",
        SubmititExecutor,
        "a Slurm job array through submitit (or submitit's local executor)",
    )
