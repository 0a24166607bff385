"""Several emulated hosts on one machine, each with its own address, and a real Slurm cluster across them.

Each host is a Linux network namespace joined to a private bridge by a veth pair: host ``ctl`` runs
slurmctld, hosts ``node1`` .. ``nodeN`` run one slurmd each. The bridge has no address in the machine's
own namespace and no host has a default route, so nothing leaves the private /24. Every command of a
host runs under ``nsenter --net`` + ``unshare --mount --uts`` with the host's own hostname and /etc/hosts
(bind-mounted in its own mount namespace): torchrun, gloo and Slurm then find each other by name, as on
real machines. (``ip netns exec`` is not used: it remounts /sys, and slurmd then finds no cgroup
file system and exits.) One munged, whose socket is a path and so reachable from every namespace,
authenticates them all. Everything else lives in a scratch directory (slurm.conf through ``SLURM_CONF``,
state, spool, logs); nothing under /etc is read or changed.

Names carry a random suffix (namespaces ``odh-<suffix>-<host>``, bridge ``odhb<suffix>``) and the
subnet is drawn from 10.100-254.x.0/24, so two clusters, or the single-node cluster of
:mod:`tests.cluster.slurm`, never collide. :meth:`EmulatedCluster.stop` (also registered with
``atexit``) kills every process of every host by pid (``ip netns pids``), then removes the namespaces,
veths, bridge and munged; :meth:`EmulatedCluster.leftovers` lists anything it left.

By hand (as root)::

    python -m tests.cluster.multihost --hosts 3                       # up; prints how to enter a host; Ctrl-C ends it
    python -m tests.cluster.multihost --hosts 2 -- srun -N2 hostname  # up, run one command on ctl, down
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import pwd
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster.slurm import CLIENTS, PLUGIN_SETTINGS, ClusterUnavailable, SlurmCluster, alive

TOOLS = ("ip", "nsenter", "unshare", "munged", "slurmctld", "slurmd", *CLIENTS)
HOST_IFNAME = "host0"  # the interface of every emulated host (GLOO_SOCKET_IFNAME=host0 selects it)
RUN_NETNS = Path("/run/netns")
CPUS_PER_HOST = 2

# Runs as a host: $0 = hostname, $1 = hosts file, $2 = resolv.conf, the rest = the command.
_AS_HOST = 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && hostname "$0" && shift 2 && exec "$@"'


def _config(root: Path, munge_socket: Path, addresses: dict[str, str]) -> str:
    nodes = [h for h in addresses if h != "ctl"]
    node_lines = [
        f"NodeName={h} NodeAddr={addresses[h]} NodeHostname={h} CPUs={CPUS_PER_HOST} Sockets=1 "
        f"CoresPerSocket={CPUS_PER_HOST} ThreadsPerCore=1 RealMemory=2000 State=UNKNOWN"
        for h in nodes
    ]
    return "\n".join(
        [
            "ClusterName=odhosts",
            f"FirstJobId={random.randint(1000, 99999)}",
            f"SlurmctldHost=ctl({addresses['ctl']})",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # a requeued job becomes eligible cred_expire + 1 s after the requeue (default: 121 s)
            f"AuthInfo=socket={munge_socket},cred_expire=10",
            *PLUGIN_SETTINGS,
            "ReturnToService=2",  # a node that was down comes back as soon as its slurmd registers
            "SlurmdTimeout=10",  # a silent node is declared down after ~25-30 s
            "MinJobAge=600",
            "KillWait=10",
            "SchedulerParameters=bf_interval=2",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd-%n.pid",
            f"SlurmdSpoolDir={root}/spool/%n",
            f"StateSaveLocation={root}/state",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd-%n.log",
            *node_lines,
            f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise ClusterUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class EmulatedCluster(SlurmCluster):
    """Hosts ``ctl``, ``node1`` .. ``nodeN`` in network namespaces, with slurmctld and a slurmd per node.

    Attributes:
        root: the scratch directory.
        env: the environment for client commands and jobs (``SLURM_CONF`` set, no inherited ``SLURM_*``).
        nodes: the compute hosts' names (``node1`` ..).
        addresses: every host's IP address.
        suffix: the random part of this cluster's namespace and link names.
    """

    def __init__(self, root: Path, hosts: int) -> None:
        """Name everything; :meth:`start` creates it.

        Args:
            root: an empty scratch directory.
            hosts: compute hosts (at least 2).
        """
        if hosts < 2:
            raise ValueError(f"an emulated cluster needs at least 2 compute hosts, got {hosts}")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(root / "slurm.conf")
        super().__init__(root, env, gpus=False)
        self.suffix = secrets.token_hex(3)
        self.nodes = [f"node{i}" for i in range(1, hosts + 1)]
        subnet = f"10.{random.randint(100, 254)}.{random.randint(0, 255)}"
        self.addresses = {h: f"{subnet}.{10 + i}" for i, h in enumerate(["ctl", *self.nodes])}
        self.bridge = f"odhb{self.suffix}"
        self._munge_dir: Path | None = None
        self._made_run_netns = False
        self._stopped = False

    # ----------------------------------------------------------------- names

    def namespace(self, host: str) -> str:
        """The network namespace of ``host``."""
        return f"odh-{self.suffix}-{host}"

    def _veth(self, host: str) -> str:
        return f"odh{self.suffix}{list(self.addresses).index(host)}"

    def on(self, host: str, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` as ``host`` (its network, hostname and /etc/hosts)."""
        files = self.root / "hosts" / host
        return [
            "nsenter",
            f"--net={RUN_NETNS / self.namespace(host)}",
            "unshare",
            "--mount",
            "--uts",
            "/bin/sh",
            "-c",
            _AS_HOST,
            host,
            str(files / "hosts"),
            str(files / "resolv.conf"),
            *argv,
        ]

    def client_argv(self, args: list[str]) -> list[str]:
        """Slurm clients run on the controller host."""
        return self.on("ctl", args)

    # ----------------------------------------------------------------- life cycle

    @classmethod
    def start(cls, root: Path, hosts: int = 2) -> EmulatedCluster:  # type: ignore[override]
        """Create the hosts and start munged, slurmctld and the slurmds; returns once every node is idle.

        Args:
            root: an empty scratch directory.
            hosts: compute hosts (at least 2).

        Raises:
            ClusterUnavailable: not root, a tool missing, namespaces not allowed, or a daemon does not come up;
                everything created so far is removed first.
        """
        if os.geteuid() != 0:
            raise ClusterUnavailable("network namespaces and slurmd need root; this test is not root")
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise ClusterUnavailable(
                f"{', '.join(missing)} missing: "
                "bash scripts/system-deps.sh installs Slurm, munge, iproute2 and util-linux"
            )
        cluster = cls(root, hosts)
        atexit.register(cluster.stop)
        try:
            cluster._network_up()
            cluster._daemons_up()
            cluster.wait_idle(cluster.nodes, timeout=30)
        except BaseException as exc:
            logs = cluster.logs()
            cluster.stop()
            if isinstance(exc, ClusterUnavailable | TimeoutError):
                raise ClusterUnavailable(f"{exc}\n{logs}") from exc
            raise
        return cluster

    def _network_up(self) -> None:
        self._made_run_netns = not RUN_NETNS.exists()
        _ip("link", "add", self.bridge, "type", "bridge")
        Path(f"/proc/sys/net/ipv6/conf/{self.bridge}/disable_ipv6").write_text("1")
        _ip("link", "set", self.bridge, "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{ip} {h}\n" for h, ip in self.addresses.items())
        for host, address in self.addresses.items():
            ns, veth = self.namespace(host), self._veth(host)
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", HOST_IFNAME, "netns", ns)
            Path(f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6").write_text("1")
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", HOST_IFNAME)
            _ip("-n", ns, "link", "set", HOST_IFNAME, "up")
            files = self.root / "hosts" / host
            files.mkdir(parents=True)
            (files / "hosts").write_text(hosts_file)
            # names not in the hosts file (reverse lookups of the dual-stack store) stay on the host's loopback
            (files / "resolv.conf").write_text("nameserver 127.0.0.1\n")

    def _daemons_up(self) -> None:
        for sub in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged runs as the munge user, which cannot enter root's private temporary directories
        self._munge_dir = Path(tempfile.mkdtemp(prefix=f"odh-munge-{self.suffix}-"))
        try:
            munge = pwd.getpwnam("munge")
        except KeyError as exc:
            raise ClusterUnavailable("no munge user: reinstall munge (bash scripts/system-deps.sh)") from exc
        os.chown(self._munge_dir, munge.pw_uid, munge.pw_gid)
        self._munge_dir.chmod(0o755)
        socket = self._munge_dir / "munge.socket"
        (self.root / "slurm.conf").write_text(_config(self.root, socket, self.addresses))
        d = self._munge_dir
        munged = f"munged --socket={socket} --pid-file={d}/munged.pid --log-file={d}/munged.log --seed-file={d}/seed"
        self._daemon(["su", "-s", "/bin/sh", "munge", "-c", munged], "munged")
        self._daemon(self.on("ctl", ["slurmctld", "-f", self.env["SLURM_CONF"]]), "slurmctld")
        for node in self.nodes:
            self.boot(node)

    def _daemon(self, argv: list[str], name: str) -> None:
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise ClusterUnavailable(f"{name} did not start: {result.stderr.strip()}")

    def boot(self, node: str) -> None:
        """Start the node's slurmd (again, after :meth:`crash`); with ReturnToService=2 it rejoins at once."""
        self._daemon(self.on(node, ["slurmd", "-f", self.env["SLURM_CONF"], "-N", node]), f"slurmd on {node}")

    def wait_idle(self, nodes: list[str], timeout: float) -> None:
        """Wait until every node of ``nodes`` is idle.

        Raises:
            TimeoutError: one is not idle after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2], strict=False))
            if all(states.get(n) == "idle" for n in nodes):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes not idle after {timeout} s: {states}")
            time.sleep(0.2)

    # ----------------------------------------------------------------- failures

    def host_pids(self, host: str) -> list[int]:
        """The processes running in the host's network namespace (daemons, job steps, stray processes)."""
        out = _ip("netns", "pids", self.namespace(host), check=False).stdout
        return [int(p) for p in out.split()]

    def crash(self, host: str) -> None:
        """The host dies: SIGKILL to every process in it, until none is left. Its network stays up."""
        deadline = time.monotonic() + 10
        while pids := self.host_pids(host):
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes of {host} survive SIGKILL: {pids}")
            for pid in pids:
                _kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def mark_down(self, node: str) -> None:
        """The fast path: tell slurmctld the node is down now (Slurm's own detection takes ~25-30 s)."""
        self.run("scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=test-host-lost")

    def cut_network(self, host: str) -> None:
        """Unplug the host: its interface goes down, its processes keep running."""
        _ip("-n", self.namespace(host), "link", "set", HOST_IFNAME, "down")

    def restore_network(self, host: str) -> None:
        """Plug the host back in."""
        _ip("-n", self.namespace(host), "link", "set", HOST_IFNAME, "up")

    def heal(self, timeout: float = 60) -> None:
        """Bring every node back to idle: jobs cancelled, network up, slurmd started where it died, DOWN
        nodes resumed."""
        if self.run("squeue", "-h", check=False).stdout.strip():
            self.run("scancel", "--user=root", check=False)
        for node in self.nodes:
            self.restore_network(node)
            pid_file = self.root / f"slurmd-{node}.pid"
            pid = int(pid_file.read_text()) if pid_file.exists() else 0
            if not pid or not alive(pid):
                self.boot(node)
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
        for node, state in zip(out[::2], out[1::2], strict=False):
            if state.startswith(("down", "drain")):
                self.run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
        self.wait_idle(self.nodes, timeout)

    def snapshot(self) -> str:
        """What each host runs, its TCP sockets, addresses and neighbour table, for failure messages."""
        parts = []
        for host in self.addresses:
            parts.append(f"--- {host}: processes ---")
            for pid in self.host_pids(host):
                try:
                    args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                parts.append(f"{pid} {args[:300]}")
            sockets = subprocess.run(
                ["nsenter", f"--net={RUN_NETNS / self.namespace(host)}", "ss", "-tanp"],
                capture_output=True,
                text=True,
                check=False,
            )
            parts.append(f"--- {host}: sockets ---\n{sockets.stdout}{sockets.stderr}")
            links = _ip("-n", self.namespace(host), "-br", "addr", check=False).stdout
            neighbours = _ip("-n", self.namespace(host), "neigh", check=False).stdout
            parts.append(f"--- {host}: addresses and neighbours ---\n{links}{neighbours}")
        return "\n".join(parts)

    def logs(self) -> str:
        """The tail of every daemon's log, for failure messages."""
        names = ["slurmctld", *(f"slurmd-{n}" for n in self.nodes)]
        parts = []
        for name in names:
            log = self.root / "log" / f"{name}.log"
            if log.exists():
                parts.append(f"--- {name}.log ---\n" + "\n".join(log.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    # ----------------------------------------------------------------- teardown

    def _daemon_pids(self) -> list[int]:
        files = [self.root / "slurmctld.pid", *(self.root / f"slurmd-{n}.pid" for n in self.nodes)]
        if self._munge_dir is not None:
            files.append(self._munge_dir / "munged.pid")
        pids = []
        for file in files:
            try:
                pids.append(int(file.read_text()))
            except (OSError, ValueError):
                continue
        return pids

    def stop(self) -> None:
        """Power everything off: daemons, jobs and stray processes, then namespaces, veths, bridge. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        daemons = self._daemon_pids()
        for pid in daemons:  # a clean stop first (slurmd and slurmctld save their state)
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while any(alive(p) for p in daemons) and time.monotonic() < deadline:
            time.sleep(0.05)
        for host in self.addresses:
            if (RUN_NETNS / self.namespace(host)).exists():
                with contextlib.suppress(TimeoutError):  # what survives is listed by leftovers()
                    self.crash(host)
        for pid in daemons:
            _kill(pid, signal.SIGKILL)
        for host in self.addresses:
            _ip("netns", "delete", self.namespace(host), check=False)
            _ip("link", "delete", self._veth(host), check=False)
        _ip("link", "delete", self.bridge, check=False)
        # `ip netns add` made /run/netns a mount point of itself; undo that only if nobody else uses it
        if self._made_run_netns and RUN_NETNS.is_dir() and not any(RUN_NETNS.iterdir()):
            subprocess.run(["umount", str(RUN_NETNS)], capture_output=True, timeout=30)
            with contextlib.suppress(OSError):
                RUN_NETNS.rmdir()
        if self._munge_dir is not None:
            shutil.rmtree(self._munge_dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What :meth:`stop` failed to remove (empty after a clean teardown)."""
        found = [f"process {pid}" for pid in self._daemon_pids() if alive(pid)]
        namespaces = _ip("netns", "list", check=False).stdout
        found += [f"namespace {line.split()[0]}" for line in namespaces.splitlines() if self.suffix in line]
        links = _ip("-o", "link", "show", check=False).stdout
        found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if self.suffix in line]
        if self._made_run_netns and RUN_NETNS.exists() and not any(RUN_NETNS.iterdir()):
            found.append(f"{RUN_NETNS} (empty)")
        if self._munge_dir is not None and self._munge_dir.exists():
            found.append(f"directory {self._munge_dir}")
        return found


def main(argv: list[str]) -> int:
    """Bring a cluster up by hand: run one command on ``ctl`` and tear down, or wait for Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.multihost", description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=2, help="compute hosts (default 2)")
    parser.add_argument("--dir", type=Path, help="scratch directory, kept (default: a temporary one, removed)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command to run on ctl, then tear down")
    args = parser.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="odh-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        return _session(root, args.hosts, command)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def _session(root: Path, hosts: int, command: list[str]) -> int:
    try:
        cluster = EmulatedCluster.start(root, hosts)
    except ClusterUnavailable as exc:
        print(f"multihost: {exc}", file=sys.stderr)
        return 2
    try:
        if command:
            return subprocess.run(cluster.client_argv(command), env=cluster.env).returncode
        print(f"hosts {cluster.addresses}; enter one with:")
        for host in cluster.addresses:
            print(f"  SLURM_CONF={cluster.env['SLURM_CONF']} {shlex.join(cluster.on(host, ['bash']))}")
        print("Ctrl-C tears it down")
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0
    finally:
        cluster.stop()
        left = cluster.leftovers()
        if left:
            print(f"multihost: left behind: {left}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
