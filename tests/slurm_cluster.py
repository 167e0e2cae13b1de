"""A throwaway single-node Slurm cluster for the tests: munged, slurmctld and slurmd started as
root from Debian's packages (``apt-get install slurm-wlm munge``), with their configuration,
key, sockets, state and logs in one temporary directory, and stopped again afterwards.

The cluster keeps no accounting (``sacct`` fails, as on many small clusters), has one partition
and no GPUs; it talks on two free TCP ports, so a Slurm already installed on the machine is left
alone (every command the tests run reads ``SLURM_CONF``, which :func:`start` sets).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: what must be on PATH: the daemons, and the commands submitit and the tests run
PROGRAMS = (
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "squeue",
    "sinfo",
    "scontrol",
    "scancel",
)
PARTITION = "debug"
#: the PATH when the tests started (see :meth:`Cluster.run`)
_IMPORT_PATH = os.environ.get("PATH", "")


def missing() -> str | None:
    """Why this machine cannot run the cluster (None when it can)."""
    absent = [p for p in PROGRAMS if shutil.which(p) is None]
    if absent:
        return (
            f"Slurm is not installed ({', '.join(absent)} not found): as root, "
            "apt-get install -y slurm-wlm munge"
        )
    if os.geteuid() != 0:
        return "the test Slurm cluster runs its daemons as root, and this is not root"
    return None


class ClusterError(RuntimeError):
    """The cluster did not come up (the message holds the daemons' logs)."""


@dataclass
class Cluster:
    root: Path
    conf: Path
    node: str
    cpus: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        """A Slurm command against this cluster; its stdout. The program is looked up on the
        PATH this module was imported with: a test that puts a fake ``squeue`` first on PATH
        while a fixture's thread still polls the cluster must not receive its calls."""
        exe = shutil.which(cmd[0], path=_IMPORT_PATH) or cmd[0]
        proc = subprocess.run(
            [exe, *cmd[1:]], capture_output=True, text=True, env=self.env(), timeout=timeout
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}\n{self.logs()}"
            )
        return proc.stdout

    def queue(self, job: str) -> dict[str, tuple[str, str]]:
        """``squeue`` for the array (or job) ``job``: task id -> (state, reason), finished
        tasks included while Slurm remembers them."""
        out = self.run("squeue", "-h", "-r", "-t", "all", "-j", job, "-o", "%i|%T|%r", check=False)
        tasks = {}
        for line in out.splitlines():
            task, state, reason = line.split("|", 2)
            tasks[task] = (state, reason)
        return tasks

    def logs(self) -> str:
        """The daemons' logs (the tail of each), for a failure message."""
        parts = []
        for name in ("munged", "slurmctld", "slurmd"):
            log = self.root / "log" / f"{name}.log"  # munged logs to its output in foreground
            if not log.exists():
                log = log.with_suffix(".out")
            if not log.exists():
                continue
            lines = log.read_text(errors="replace").splitlines()[-40:]
            parts.append(f"--- {log} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts) or f"(no logs under {self.root / 'log'})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 * 9 // 10  # below what slurmd finds
    return 1000


def start(timeout_s: float = 60.0) -> Cluster:
    """Start the daemons and wait until ``sinfo`` shows the node idle; raise
    :class:`ClusterError` with their logs when it does not within ``timeout_s``."""
    root = Path(tempfile.mkdtemp(prefix="prunekit-slurm-"))  # short: it holds a unix socket
    for sub in ("key", "run", "state", "spool", "log"):
        (root / sub).mkdir()
    (root / "key").chmod(0o700)
    (root / "run").chmod(0o755)
    key = root / "key" / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=prunekit-test",
                f"SlurmctldHost={node}(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={root / 'run' / 'munge.socket'}",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "MpiDefault=none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "SchedulerType=sched/backfill",
                "ReturnToService=2",
                # a cancelled job's processes get SIGKILL 2 s after SIGTERM (default 30)
                "KillWait=2",
                # finished jobs stay visible to squeue for 5 minutes
                "MinJobAge=300",
                f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mb()} "
                "State=UNKNOWN",
                f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=30 State=UP",
                "",
            ]
        )
    )
    cluster = Cluster(root, conf, node, cpus)
    daemons = {
        "munged": [
            "munged",
            "--foreground",
            "--force",
            f"--socket={root / 'run' / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={root / 'run' / 'munged.pid'}",
            f"--seed-file={root / 'state' / 'munged.seed'}",
            f"--log-file={root / 'log' / 'munged.log'}",
        ],
        "slurmctld": ["slurmctld", "-D", "-f", str(conf)],
        "slurmd": ["slurmd", "-D", "-f", str(conf)],
    }
    try:
        for name, cmd in daemons.items():
            with open(root / "log" / f"{name}.out", "wb") as out:
                cluster.procs[name] = subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=cluster.env(),
                    start_new_session=True,  # a Ctrl-C of pytest reaches them through stop()
                )
            if name == "munged":
                _wait_for(lambda: (root / "run" / "munge.socket").exists(), 10, cluster, name)
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(
                        f"{name} exited ({proc.returncode}) while the cluster started\n"
                        + cluster.logs()
                    )
            state = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).strip()
            if state == "idle":
                return cluster
            time.sleep(0.5)
        raise ClusterError(
            f"the node {node} was not idle {timeout_s:.0f} s after the daemons started "
            f"(sinfo says {state or 'nothing'!r})\n" + cluster.logs()
        )
    except BaseException:
        stop(cluster)
        raise


def _wait_for(ready, timeout_s: float, cluster: Cluster, name: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if cluster.procs[name].poll() is not None or time.monotonic() > deadline:
            raise ClusterError(f"{name} did not start\n" + cluster.logs())
        time.sleep(0.1)


def stop(cluster: Cluster, keep: bool = False) -> None:
    """Cancel every job, wait for their processes to go, stop the daemons (slurmd, slurmctld,
    munged), and remove the cluster's directory unless ``keep``."""
    if cluster.procs.get("slurmctld") and cluster.procs["slurmctld"].poll() is None:
        cluster.run("scancel", "--user", "root", check=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = cluster.run("squeue", "-h", "-o", "%i", check=False)
            if not out.strip():
                break
            time.sleep(0.5)
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if not keep:
        shutil.rmtree(cluster.root, ignore_errors=True)
