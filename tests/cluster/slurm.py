"""A real single-node Slurm cluster for tests: slurmctld and slurmd on localhost, started as root.

Everything lives in a scratch directory (its own slurm.conf, reached through ``SLURM_CONF``, free
ports, state, logs), so nothing under /etc is read or changed and several clusters can run on one
machine. Authentication is ``auth/none`` (no munged needed). The node has eight fake GPUs (character
devices like /dev/null, which Slurm only counts), so jobs see ``--gpus-per-node=8`` as on a GPU node.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

from tests.train.distributed import free_port

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "sdiag", "scancel", "srun")
FAKE_GPUS = 8


#: the plugin settings every test cluster uses (single node here, emulated hosts in multihost.py)
PLUGIN_SETTINGS = (
    "MpiDefault=none",
    # the cgroup plugins fail on these machines' hybrid cgroup v1 hierarchy
    "ProctrackType=proctrack/linuxproc",
    "TaskPlugin=task/none",
    "JobAcctGatherType=jobacct_gather/none",
    "AccountingStorageType=accounting_storage/none",
    "SelectType=select/cons_tres",
    "SelectTypeParameters=CR_Core",
)


class ClusterUnavailable(RuntimeError):
    """Slurm cannot run here; the message is the reason (tests skip with it)."""


def _config(root: Path, ctld_port: int, slurmd_port: int, gpus: bool) -> str:
    cpus = os.cpu_count() or 1
    gres = f" Gres=gpu:{FAKE_GPUS}" if gpus else ""
    return "\n".join(
        [
            "ClusterName=odtest",
            # job ids (and so the default rendezvous ports, 20000 + id mod 10000) differ between test clusters
            # that run on one machine at the same time
            f"FirstJobId={random.randint(1000, 99999)}",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            "AuthInfo=cred_expire=10",  # a requeued job may start 11 s after the requeue (default: 121 s)
            *PLUGIN_SETTINGS,
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=10",
            "SchedulerParameters=bf_interval=2",
            *(["GresTypes=gpu"] if gpus else []),
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmdSpoolDir={root}/spool",
            f"StateSaveLocation={root}/state",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd.log",
            f"NodeName=localhost CPUs={cpus} RealMemory=1000{gres} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


class SlurmCluster:
    """A running test cluster; :meth:`stop` ends its jobs and daemons.

    Attributes:
        root: the scratch directory.
        env: the environment for client commands and jobs (``SLURM_CONF`` set, no inherited ``SLURM_*``).
        gpus: whether the node has the fake GPUs (else jobs must ask for ``--gpus-per-node=0``).
    """

    def __init__(self, root: Path, env: dict[str, str], gpus: bool) -> None:
        self.root, self.env, self.gpus = root, env, gpus

    @classmethod
    def start(cls, root: Path) -> SlurmCluster:
        """Write the configuration and start the daemons; returns once the node is idle.

        Raises:
            ClusterUnavailable: not root, Slurm not installed, or the daemons do not come up.
        """
        if os.geteuid() != 0:
            raise ClusterUnavailable("slurmd must run as root to start jobs as other users; this test is not root")
        missing = [tool for tool in (*DAEMONS, *CLIENTS) if shutil.which(tool) is None]
        if missing:
            raise ClusterUnavailable(
                f"Slurm is not installed ({', '.join(missing)} missing): bash scripts/system-deps.sh"
            )
        for sub in ("spool", "state", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        gpus = cls._make_fake_gpus(root)
        conf = root / "slurm.conf"
        conf.write_text(_config(root, free_port(), free_port(), gpus))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(conf)
        cluster = cls(root, env, gpus)
        for daemon in DAEMONS:
            result = subprocess.run([daemon, "-f", str(conf)], env=env, capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                cluster.stop()
                raise ClusterUnavailable(f"{daemon} did not start: {result.stderr.strip()} {cluster.logs()}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return cluster
            time.sleep(0.2)
        cluster.stop()
        raise ClusterUnavailable(f"the node did not become idle (state {state!r}): {cluster.logs()}")

    @staticmethod
    def _make_fake_gpus(root: Path) -> bool:
        gres = [f"NodeName=localhost Name=gpu File={root}/gpu[0-{FAKE_GPUS - 1}]"]
        try:
            for i in range(FAKE_GPUS):
                os.mknod(root / f"gpu{i}", 0o600 | 0o020000, os.makedev(1, 3))  # a character device
        except OSError:
            return False  # no CAP_MKNOD: a node without GPUs
        (root / "gres.conf").write_text("\n".join(gres) + "\n")
        return True

    def client_argv(self, args: list[str]) -> list[str]:
        """The command line of a Slurm client command (run as it is here, on the cluster's host)."""
        return args

    def run(self, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster."""
        result = subprocess.run(
            self.client_argv(list(args)), env=self.env, capture_output=True, text=True, timeout=300, cwd=cwd
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll the job until its state is one of ``states``.

        Raises:
            TimeoutError: it did not get there in ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while info.get("JobState") not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {info.get('JobState')}, not {states}: {info}")
            time.sleep(0.3)
            info = self.job(job_id)
        return info

    def start_now(self, job_id: str, timeout: float = 60) -> None:
        """Start a requeued job without Slurm's delay (credential expiry + scheduler cadence).

        After ``scontrol requeue`` the job goes through COMPLETING / REQUEUED to PENDING; the new
        start time only takes once it is pending, so it is set again until the job runs. slurmd
        revokes the job's credential when its run ends and, counting in whole seconds, takes a new
        credential made in that same second for the revoked one ("Killing non-startable batch job:
        Job credential revoked": the job fails), so the first start is asked for in the next second.
        """
        deadline = time.monotonic() + timeout
        self.wait_for(job_id, {"PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"}, timeout)
        time.sleep(1.05 - time.time() % 1)
        while self.job(job_id).get("JobState") not in {"RUNNING", "COMPLETED", "FAILED", "CANCELLED"}:
            if time.monotonic() > deadline:
                raise TimeoutError(f"requeued job {job_id} did not start: {self.job(job_id)}")
            self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            time.sleep(0.5)

    def start_when_eligible(self, job_id: str, timeout: float = 60) -> None:
        """Start a requeued job once Slurm's requeue delay is over, skipping only the scheduler's cadence.

        A requeued job becomes eligible cred_expire + 1 s after the requeue (11 s here). Across hosts that
        delay matters: a rerun forced 0.7 s after a lost node rejoined got both nodes, slurmctld then listed
        that node idle under it, and its srun never started the step. :meth:`start_now` skips the delay and
        is for one-node clusters.
        """
        deadline = time.monotonic() + timeout
        info = self.wait_for(job_id, {"PENDING"}, timeout)
        with contextlib.suppress(KeyError, ValueError):  # no parsable EligibleTime: start at once
            eligible = datetime.fromisoformat(info["EligibleTime"])  # slurmctld's local time, seconds
            while datetime.now() < eligible + timedelta(seconds=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"requeued job {job_id} is not eligible by {eligible}: {self.job(job_id)}")
                time.sleep(0.2)
        self.start_now(job_id, timeout=max(deadline - time.monotonic(), 10))

    def logs(self) -> str:
        """The daemons' logs, for failure messages."""
        parts = []
        for name in ("slurmctld", "slurmd"):
            log = self.root / "log" / f"{name}.log"
            if log.exists():
                parts.append(f"--- {name}.log ---\n" + "\n".join(log.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job of this cluster, then stop its daemons."""
        if (self.root / "slurmctld.pid").exists():
            self.run("scancel", "--full", "--user=root", check=False)
            time.sleep(1)
        for daemon in reversed(DAEMONS):
            pid_file = self.root / f"{daemon}.pid"
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            deadline = time.monotonic() + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)


def alive(pid: int) -> bool:
    """Whether the process runs (a daemon's zombie, left to a parent that does not reap it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
